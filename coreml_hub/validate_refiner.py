"""The contract between an SDXL variant and the refiner it carries (UnetRefiner, or its two chunks).

The refiner continues the base Unet's latents (same `sample` shape and batch), reads the
second text encoder's states (`encoder_hidden_states` [B, C2, 1, 77]) and pooled output
(`text_embeds` [B, P2]) and takes five time ids (`time_ids` [B, 5]); its chunks chain by name.
"""

from __future__ import annotations

from .bundle import ERROR, REPULL_HINT, Bundle, Component, Problem
from .validate import _fmt_shape, _static

REFINER_TIME_IDS = 5


def refiner_parts(bundle: Bundle) -> list[Component]:
    """The refiner's bundles in calling order: the full one, else both chunks."""
    full = bundle.get("refiner")
    if full is not None:
        return [full]
    chunks = [bundle.get("refiner_chunk1"), bundle.get("refiner_chunk2")]
    return [c for c in chunks if c is not None]


def check_refiner_contract(bundle: Bundle) -> list[Problem]:
    problems: list[Problem] = []
    parts = refiner_parts(bundle)
    if not parts:
        return problems
    first = parts[0]

    def need(ok: bool, component: Component, message: str) -> None:
        if not ok:
            problems.append(Problem(ERROR, bundle.relative(component.path), message, REPULL_HINT))

    if first.name == "refiner_chunk1" and len(parts) < 2:
        need(False, first, "only the first chunk of the refiner is present: both chunks are needed")
    if any(p.program is None for p in parts):
        return problems
    time_ids = _static(first.port("time_ids"))
    need(time_ids is not None and len(time_ids) == 2 and time_ids[1] == REFINER_TIME_IDS, first,
         f"time_ids is {_fmt_shape(time_ids)}; an SDXL refiner takes [B, {REFINER_TIME_IDS}] "
         "(sizes, crop, aesthetic score)")
    unet = bundle.get("unet") or bundle.get("unet_chunk1")
    sample = _static(first.port("sample"))
    if unet is not None and unet.program is not None and sample is not None:
        base = _static(unet.port("sample"))
        if base is not None:
            need(sample[1:] == base[1:], first, f"sample is {_fmt_shape(sample)} but the Unet's is {_fmt_shape(base)}: "
                                                "the refiner continues the Unet's latents")
    te2 = bundle.get("text_encoder_2")
    context = _static(first.port("encoder_hidden_states"))
    if te2 is not None and te2.program is not None and context is not None:
        hidden = _static(te2.port("hidden_embeds", output=True))
        pooled = _static(te2.port("pooled_outputs", output=True))
        if hidden is not None and len(context) == 4:
            need(context[1] == hidden[-1], first, f"encoder_hidden_states has {context[1]} channels but TextEncoder2 "
                                                  f"makes {hidden[-1]}: the refiner reads the second encoder only")
        embeds = _static(first.port("text_embeds"))
        if pooled is not None and embeds is not None and len(embeds) == 2:
            need(embeds[1] == pooled[-1], first, f"text_embeds takes {embeds[1]} values but TextEncoder2 pools "
                                                 f"{pooled[-1]}")
    final = parts[-1]
    noise = _static(final.port("noise_pred", output=True))
    need(final.port("noise_pred", output=True) is not None, final, "has no output 'noise_pred'")
    if noise is not None and sample is not None:
        need(noise == sample, final, f"noise_pred is {_fmt_shape(noise)} but sample is {_fmt_shape(sample)}")
    return problems
