"""Stable Diffusion 3 over Core ML components, as Apple's Swift pipeline loads them and diffusers runs them.

Components: TextEncoder and TextEncoder2 (CLIP, penultimate states and projected pooled
outputs), optional TextEncoderT5, MultiModalDiffusionTransformer (Apple's contract from
DiffusionKit: `latent_image_embeddings`, `token_level_text_embeddings` [B, D, 1, 77 + T],
`pooled_text_embeddings` [B, P, 1, 1], `timestep` -> `denoiser_output`), a 16-channel VAE.

A prompt becomes the two CLIP encoders' states side by side, zero padded to the transformer's
width D, followed by T tokens of T5 states (zeros when there is no T5, as Apple's pipeline and
diffusers do); the pooled outputs of both CLIP encoders side by side. The denoising loop is
diffusers' flow-matching Euler scheduler with the model's shift; latents are decoded as
`latents / 1.5305 + 0.0609` (SD3's VAE scale and shift, the values Apple's pipeline uses).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from ..errors import InvalidBundle, UnsupportedSize, UsageError
from .components import Component
from .diffusion import Conditioning, Geometry, StableDiffusion
from .schedulers import DEFAULT_FLOW_SCHEDULER, FLOW_SCHEDULERS
from .tokenizer import EOS, ClipTokenizer, find_tokenizer_files, model_roots

SCALE_SD3 = 1.5305
SHIFT_SD3 = 0.0609
CLIP_TOKENS = 77
# Where a variant keeps the T5 tokenizer: beside compiled bundles (Apple's Swift layout), or the
# PyTorch model's `tokenizer_3/` (packages variants, `convert -o` folders).
T5_TOKENIZER_DIRS = ("", "tokenizer_3")
T5_HINT = ("Run without T5 (--no-t5), or put the T5 tokenizer's tokenizer.json and tokenizer_config.json "
           "(Apple's converter takes google-t5/t5-small's) beside the bundles.")


class T5Tokenizer:
    """SentencePiece ids for T5 from `tokenizer.json`: the text's pieces, `</s>`, then `<pad>` up to `length`."""

    def __init__(self, folder: Path, length: int = CLIP_TOKENS) -> None:
        from tokenizers import Tokenizer

        self.folder = folder
        self.length = length
        try:
            self._tok = Tokenizer.from_file(str(folder / "tokenizer.json"))
            config = json.loads((folder / "tokenizer_config.json").read_text(encoding="utf-8"))
        except (OSError, ValueError, Exception) as exc:  # tokenizers raises its own Exception type
            raise InvalidBundle(f"Cannot read the T5 tokenizer in {folder}: {exc}.", hint=T5_HINT) from exc

        def token_id(key: str, default: str) -> int:
            token = config.get(key, default)
            token = token.get("content", default) if isinstance(token, dict) else token
            found = self._tok.token_to_id(str(token))
            if found is None:
                raise InvalidBundle(f"The T5 tokenizer in {folder} has no token {token!r}.", hint=T5_HINT)
            return found

        self.eos_id = token_id("eos_token", "</s>")
        self.pad_id = token_id("pad_token", "<pad>")

    def encode(self, text: str) -> list[int]:
        pieces = self._tok.encode(text, add_special_tokens=False).ids[: self.length - 1]
        ids = [*pieces, self.eos_id]
        return ids + [self.pad_id] * (self.length - len(ids))


def find_t5_tokenizer(variant_dir: Path, also: tuple[Path, ...] = ()) -> Path | None:
    """The folder holding the T5 tokenizer of a variant, if any."""
    for root in dict.fromkeys(r for base in (*also, variant_dir) for r in model_roots(base)):
        for sub in T5_TOKENIZER_DIRS:
            folder = root / sub if sub else root
            if _is_t5_folder(folder):
                return folder
    return None


def _is_t5_folder(folder: Path) -> bool:
    """tokenizer.json (a Unigram model: T5's, not a CLIP one) and tokenizer_config.json."""
    path = folder / "tokenizer.json"
    if not (path.is_file() and (folder / "tokenizer_config.json").is_file()):
        return False
    try:
        model = json.loads(path.read_text(encoding="utf-8")).get("model")
    except (OSError, ValueError):
        return False
    return isinstance(model, dict) and model.get("type") == "Unigram"


def clip_tokenizers(variant_dir: Path, also: tuple[Path, ...]) -> list[ClipTokenizer]:
    """The two CLIP tokenizers, padding as Apple's SD3 pipeline does (end token, then "!")."""
    tokenizers = []
    for which, pad in ((1, EOS), (2, "!")):
        try:
            files = find_tokenizer_files(variant_dir, which, default_pad=pad, also=also)
        except InvalidBundle:
            files = None
        if files is None or (files.vocab is None and _is_t5_folder(files.folder)):  # T5's tokenizer.json is no CLIP
            raise InvalidBundle(f"This SD3 variant has no CLIP tokenizer files (vocab.json + merges.txt) in "
                                f"{variant_dir}.", hint="Re-pull the variant; compiled SD3 variants carry them "
                                                        "beside the bundles.")
        # beside compiled SD3 bundles, tokenizer_config.json is T5's: CLIP's padding is fixed instead
        tokenizers.append(ClipTokenizer(dataclasses.replace(files, pad_token=pad, max_length=CLIP_TOKENS)))
    return tokenizers


class StableDiffusion3(StableDiffusion):
    """SD3 text-to-image and image-to-image; the loop, VAE and noise handling are StableDiffusion's."""

    sample_input = "latent_image_embeddings"
    context_input = "token_level_text_embeddings"
    prediction_output = "denoiser_output"
    default_scheduler = DEFAULT_FLOW_SCHEDULER
    shift_factor = SHIFT_SD3

    def __init__(self, components: dict[str, Component], tokenizers: list[ClipTokenizer],
                 t5_tokenizer: T5Tokenizer | None, scheduler_config: dict[str, Any]) -> None:
        from .schedulers import make_scheduler

        for required in ("text_encoder", "text_encoder_2", "mmdit", "vae_decoder"):
            if required not in components:
                raise InvalidBundle(f"This SD3 variant has no {required}.",
                                    hint="Re-pull the variant, or run `coreml-hub verify` on the folder.")
        self.components = components
        self.tokenizers = tokenizers
        self.t5_tokenizer = t5_tokenizer if "text_encoder_t5" in components else None
        self.scheduler_config = scheduler_config
        self.unet_parts = [components["mmdit"]]
        self.geometry = self._read_geometry()
        self.scale_factor = SCALE_SD3
        self.zero_empty_negative = False  # SD3 encodes an empty negative prompt (diffusers and Apple alike)
        for tokenizer, name in zip(tokenizers, ("text_encoder", "text_encoder_2")):
            tokenizer.length = components[name].input_shape("input_ids")[-1]
        if self.t5_tokenizer is not None:
            self.t5_tokenizer.length = components["text_encoder_t5"].input_shape("input_ids")[-1]
        make_scheduler(self.default_scheduler, scheduler_config)

    @property
    def uses_t5(self) -> bool:
        return self.t5_tokenizer is not None

    def _read_geometry(self) -> Geometry:
        mmdit = self.components["mmdit"]
        for name in (self.sample_input, self.context_input, "pooled_text_embeddings", "timestep"):
            if name not in mmdit.inputs:
                raise InvalidBundle(f"The transformer has no {name!r} input (inputs: {', '.join(mmdit.inputs)}).")
        sample = mmdit.inputs[self.sample_input]
        tokens = mmdit.input_shape(self.context_input)
        if len(sample.shape) != 4 or any(d <= 0 for d in sample.shape) or len(tokens) != 4:
            raise UnsupportedSize(f"The transformer's input shapes are not fixed 4-D shapes (latents {sample.shape}, "
                                  f"text {tokens}); only fixed-size models can run.")
        batch, channels, lh, lw = sample.shape
        if batch not in (1, 2):
            raise UnsupportedSize(f"The transformer takes a batch of {batch}; only 1 or 2 are supported.")
        if tokens[3] < CLIP_TOKENS:
            raise InvalidBundle(f"The transformer takes {tokens[3]} text tokens; SD3 needs at least {CLIP_TOKENS}.")
        decoder = self.components["vae_decoder"]
        z = decoder.input_shape(next(iter(decoder.inputs)))
        if tuple(z[1:]) != (channels, lh, lw):
            raise UnsupportedSize(f"The VAE decoder takes {z[1]}x{z[2]}x{z[3]} latents but the transformer makes "
                                  f"{channels}x{lh}x{lw}.", hint="The components come from different conversions.")
        out = next(iter(decoder.outputs.values()), None)
        ih, iw = (out.shape[2], out.shape[3]) if out is not None and len(out.shape) == 4 else (lh * 8, lw * 8)
        return Geometry(unet_batch=batch, latent_channels=channels, latent_height=lh, latent_width=lw,
                        text_length=CLIP_TOKENS, hidden_size=tokens[1], image_height=ih, image_width=iw,
                        sdxl=False, latent_dtype=sample.dtype)

    # ---- text -------------------------------------------------------------------------
    def _t5_states(self, text: str, width: int, count: int, device: Any) -> Any:
        """[1, width, 1, count] T5 states for `text`; zeros without T5 (Apple's pipeline and diffusers)."""
        import torch

        if self.t5_tokenizer is None or count == 0:
            return torch.zeros((1, width, 1, count), dtype=torch.float32, device=device)
        encoder = self.components["text_encoder_t5"]
        ids = torch.tensor([self.t5_tokenizer.encode(text)], dtype=torch.float32)
        feed = {"input_ids": ids}
        if "attention_mask" in encoder.inputs:  # 1 marks ignored padding; diffusers attends to every token
            feed["attention_mask"] = torch.zeros_like(ids)
        states = next(iter(encoder(feed).values())).to(device)
        if states.shape[1] != width:
            raise InvalidBundle(f"TextEncoderT5 makes {states.shape[1]}-wide states but the transformer takes {width}.")
        states = states[..., :count]  # Apple's pipeline keeps the first 77 T5 tokens
        if states.shape[-1] < count:
            pad = torch.zeros((1, width, 1, count - states.shape[-1]), dtype=states.dtype, device=device)
            states = torch.cat([states, pad], dim=-1)
        return states

    def encode_prompt(self, text: str) -> tuple[Any, dict[str, Any]]:
        """One prompt -> `token_level_text_embeddings` [1, D, 1, S] and `pooled_text_embeddings` [1, P, 1, 1]."""
        import torch

        hidden1, pooled1 = self._encode_one(self.components["text_encoder"], self.tokenizers[0], text)
        hidden2, pooled2 = self._encode_one(self.components["text_encoder_2"], self.tokenizers[1], text)
        clip = torch.cat([hidden1, hidden2.to(hidden1.device)], dim=-1)  # [1, 77, C1 + C2]
        width, total = self.geometry.hidden_size, self.components["mmdit"].input_shape(self.context_input)[3]
        if clip.shape[-1] > width:
            raise InvalidBundle(f"The CLIP encoders make {clip.shape[-1]}-wide states but the transformer takes "
                                f"{width}.")
        clip = torch.nn.functional.pad(clip, (0, width - clip.shape[-1])).permute(0, 2, 1).unsqueeze(2)
        t5 = self._t5_states(text, width, total - clip.shape[-1], clip.device)
        pooled = torch.cat([pooled1, pooled2.to(pooled1.device)], dim=-1)[:, :, None, None]
        return torch.cat([clip, t5], dim=-1), {"pooled_text_embeddings": pooled}

    def condition(self, prompt: str, negative_prompt: str) -> Conditioning:
        cond, cond_extras = self.encode_prompt(prompt)
        uncond, uncond_extras = self.encode_prompt(negative_prompt)
        return Conditioning((uncond, cond), (uncond_extras, cond_extras))

    # ---- flow matching ------------------------------------------------------------------
    def img2img_start(self, steps: int, strength: float) -> int:
        # diffusers' SD3 image-to-image rounds the kept steps down only after subtracting
        return int(max(steps - min(steps * strength, steps), 0))

    def noised(self, sched: Any, init: Any, noise: Any, t: Any) -> Any:
        return sched.scale_noise(init, t, noise)


def check_scheduler(name: str | None, flow: bool) -> None:
    """SD3 steps with the flow-matching scheduler only; the others only with noise-predicting Unets."""
    if name is None:
        return
    if flow and name not in FLOW_SCHEDULERS:
        raise UsageError(f"SD3 runs with the flow-matching Euler scheduler, not {name!r}.",
                         hint=f"Drop --scheduler, or pass --scheduler {DEFAULT_FLOW_SCHEDULER}.")
    if not flow and name in FLOW_SCHEDULERS:
        raise UsageError(f"--scheduler {name} is SD3's flow-matching scheduler; this model predicts noise.",
                         hint="Drop --scheduler, or choose pndm, dpmpp, euler, euler_a, ddim or lms.")


def load_sd3(model: Any, found: dict[str, Path], backend: Any, *, device: str | None, compute_unit: str | None,
             img2img: bool, progress: bool, use_t5: bool = True, shift: float | None = None) -> Any:
    """Load an SD3 variant's components (T5 when present and wanted) -> (pipeline, LoadedComponents)."""
    from .components import load_components, require_vae_encoder
    from .schedulers import FLOW_DEFAULT_CONFIG, scheduler_config

    names = ["text_encoder", "text_encoder_2", "mmdit", "vae_decoder"]
    missing = [n for n in names if n not in found]
    if missing:
        raise InvalidBundle(f"{model.path} lacks SD3 component(s): {', '.join(missing)}.",
                            hint="Re-pull the variant, or run `coreml-hub verify` on the folder.")
    beside = (found["text_encoder"].parent,)
    tokenizers = clip_tokenizers(model.path, beside)
    t5_tokenizer = None
    if use_t5 and "text_encoder_t5" in found:
        folder = find_t5_tokenizer(model.path, beside)
        if folder is None:
            raise InvalidBundle(f"{model.path} has TextEncoderT5 but not its tokenizer (tokenizer.json + "
                                "tokenizer_config.json).", hint=T5_HINT)
        t5_tokenizer = T5Tokenizer(folder)
        names.insert(2, "text_encoder_t5")
    if img2img:
        names.append(require_vae_encoder(found, model.path))
    loaded = load_components(found, names, backend, device=device, compute_unit=compute_unit, progress=progress)
    config = scheduler_config(model.path, also=beside, defaults=FLOW_DEFAULT_CONFIG)
    if shift is not None:
        if shift <= 0:
            raise UsageError(f"--shift must be positive, got {shift}.")
        config["shift"] = float(shift)
    pipe = StableDiffusion3(loaded.components, tokenizers, t5_tokenizer, config)
    return pipe, loaded
