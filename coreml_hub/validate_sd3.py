"""The pipeline contract of a Stable Diffusion 3 variant (what Apple's Swift SD3 pipeline loads).

TextEncoder + TextEncoder2 (CLIP, `hidden_embeds` [1, 77, C] and `pooled_outputs` [1, P]),
optional TextEncoderT5 (`encoder_hidden_states` [1, D, 1, L]), MultiModalDiffusionTransformer
(`latent_image_embeddings` [B, 16, h, w], `token_level_text_embeddings` [B, D, 1, 77 + T5 tokens],
`pooled_text_embeddings` [B, P1 + P2, 1, 1], `timestep` [B] -> `denoiser_output`), and a VAE
whose latents have the transformer's channels. Compiled variants carry `vocab.json` + `merges.txt`,
and `tokenizer.json` + `tokenizer_config.json` when they carry T5.
"""

from __future__ import annotations

from .bundle import ERROR, REPULL_HINT, WARNING, Bundle, Component, Problem
from .validate import _display, _fmt_shape, _static

T5_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")
CLIP_TOKENS = 77


def check_sd3_contract(bundle: Bundle) -> list[Problem]:
    problems: list[Problem] = []

    def need(ok: bool, component: Component | None, message: str, hint: str | None = REPULL_HINT) -> None:
        if not ok:
            where = bundle.relative(component.path) if component is not None else "."
            problems.append(Problem(ERROR, where, message, hint))

    compiled = any(c.format == "compiled" for c in bundle.components)
    te, te2, t5 = bundle.get("text_encoder"), bundle.get("text_encoder_2"), bundle.get("text_encoder_t5")
    mmdit, vd, ve = bundle.get("mmdit"), bundle.get("vae_decoder"), bundle.get("vae_encoder")
    for component, name in ((te, "text_encoder"), (te2, "text_encoder_2"), (vd, "vae_decoder")):
        need(component is not None, None, f"no {_display(name, compiled)} bundle: SD3 variants need it")
    if bundle.tokenizer_dir() is None:
        if compiled:
            need(False, None, "vocab.json and merges.txt are missing: compiled variants carry their tokenizer")
        else:
            problems.append(Problem(WARNING, ".", "no tokenizer files (vocab.json, merges.txt) next to the packages",
                                    "`coreml-hub pull` fetches them from the model's PyTorch repo; generating "
                                    "needs them."))
    if t5 is not None and compiled:
        missing = [name for name in T5_TOKENIZER_FILES if not (bundle.path / name).is_file()]
        need(not missing, None, f"TextEncoderT5 is present but its tokenizer is not ({', '.join(missing)} missing)",
             "Copy tokenizer.json and tokenizer_config.json of the T5 tokenizer (e.g. google-t5/t5-small) beside "
             "the bundles, or remove TextEncoderT5.mlmodelc to run without T5.")

    if mmdit is None or mmdit.program is None:
        return problems
    latent = _static(mmdit.port("latent_image_embeddings"))
    tokens = _static(mmdit.port("token_level_text_embeddings"))
    pooled = _static(mmdit.port("pooled_text_embeddings"))
    timestep = _static(mmdit.port("timestep"))
    for name in ("latent_image_embeddings", "token_level_text_embeddings", "pooled_text_embeddings", "timestep"):
        need(mmdit.port(name) is not None, mmdit, f"has no input {name!r}")
    batch = None
    if latent is not None:
        need(len(latent) == 4, mmdit, f"latent_image_embeddings is {_fmt_shape(latent)}; expected [B, C, H, W]")
        batch = latent[0] if latent else None
        need(batch in (1, 2), mmdit, f"batch size {batch}: the transformer takes a batch of 1 or 2")
        out = _static(mmdit.port("denoiser_output", output=True))
        need(mmdit.port("denoiser_output", output=True) is not None, mmdit, "has no output 'denoiser_output'")
        if out is not None:
            need(out == latent, mmdit, f"denoiser_output is {_fmt_shape(out)} but latent_image_embeddings is "
                                       f"{_fmt_shape(latent)}")
    if timestep is not None and batch is not None:
        need(timestep == (batch,), mmdit, f"timestep is {_fmt_shape(timestep)}; with batch {batch} it must be [{batch}]")
    width = None
    if tokens is not None:
        ok = len(tokens) == 4 and tokens[2] == 1 and tokens[3] >= CLIP_TOKENS and (batch is None or tokens[0] == batch)
        need(ok, mmdit, f"token_level_text_embeddings is {_fmt_shape(tokens)}; expected [B, C, 1, 77 + T5 tokens]")
        width = tokens[1] if ok else None
    if pooled is not None:
        need(len(pooled) == 4 and pooled[2:] == (1, 1), mmdit,
             f"pooled_text_embeddings is {_fmt_shape(pooled)}; expected [B, P, 1, 1]")

    # CLIP: hidden widths fit the joint width (zero padded), pooled widths add up to P
    hidden_total, pooled_total, known = 0, 0, True
    for encoder in (te, te2):
        if encoder is None or encoder.program is None:
            known = False
            continue
        hidden = _static(encoder.port("hidden_embeds", output=True))
        pool = _static(encoder.port("pooled_outputs", output=True))
        need(encoder.port("hidden_embeds", output=True) is not None, encoder,
             "has no output 'hidden_embeds' (SD3 takes the states before the last layer, as SDXL)")
        need(encoder.port("pooled_outputs", output=True) is not None, encoder, "has no output 'pooled_outputs'")
        if hidden is None or pool is None or len(hidden) != 3:
            known = False
            continue
        need(hidden[1] == CLIP_TOKENS, encoder, f"hidden_embeds has {hidden[1]} tokens; SD3 takes {CLIP_TOKENS}")
        hidden_total += hidden[2]
        pooled_total += pool[-1]
    if known and width is not None:
        need(hidden_total <= width, mmdit, f"token_level_text_embeddings is {width} wide, narrower than the CLIP "
                                           f"encoders' {hidden_total}")
    if known and pooled is not None and len(pooled) == 4:
        need(pooled_total == pooled[1], mmdit, f"pooled_text_embeddings takes {pooled[1]} values but the CLIP "
                                               f"encoders pool {pooled_total}")
    if t5 is not None and t5.program is not None:
        states = _static(t5.port("encoder_hidden_states", output=True))
        need(t5.port("encoder_hidden_states", output=True) is not None, t5, "has no output 'encoder_hidden_states'")
        need(t5.port("input_ids") is not None, t5, "has no input 'input_ids'")
        if states is not None and width is not None:
            need(len(states) == 4 and states[1] == width, t5,
                 f"encoder_hidden_states is {_fmt_shape(states)}; the transformer takes {width}-wide T5 states")

    # VAE: the transformer's latents
    if latent is not None and len(latent) == 4:
        channels, hw = latent[1], latent[2:]
        if vd is not None and vd.program is not None:
            z = _static(vd.port("z"))
            need(vd.port("z") is not None, vd, "has no input 'z'")
            if z is not None:
                need(len(z) == 4 and z[1] == channels and z[2:] == hw, vd,
                     f"z is {_fmt_shape(z)} but the transformer's latents are {_fmt_shape(latent)}")
        if ve is not None and ve.program is not None:
            moments = _static(ve.port("latent", output=True))
            if moments is not None:
                need(len(moments) == 4 and moments[1] == 2 * channels and moments[2:] == hw, ve,
                     f"latent is {_fmt_shape(moments)}; for {channels}-channel latents it must be "
                     f"[1, {2 * channels}, {hw[0]}, {hw[1]}]")
    return problems
