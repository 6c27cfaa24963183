"""The SDXL refiner's Unet, converted beside an SDXL base as Apple's `torch2coreml --refiner-version` does.

The refiner is a second SDXL Unet that denoises the last part of the schedule. It reads only the
second text encoder's states and pooled output (the base's TextEncoder2 serves both) and five time
ids instead of six: original height and width, crop top and left, and an aesthetic score. Apple
names it `Stable_Diffusion_version_<base model>_refiner.mlpackage` (`_refiner_chunk1/2` when the
Unets are chunked), compiled `UnetRefiner.mlmodelc` (`UnetRefinerChunk1/2`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..errors import ConversionError, UsageError

REFINER = "refiner"
REFINER_TIME_IDS = 5  # height, width, crop top, crop left, aesthetic score
BASE_TIME_IDS = 6  # original size, crop, target size


def _config(folder: Path, sub: str) -> dict[str, Any]:
    path = folder / sub / "config.json"
    try:
        return json.loads(path.read_text()) if path.is_file() else {}
    except (OSError, ValueError):
        return {}


def time_ids_of(unet: dict[str, Any], text_embeds_dim: int | None) -> int | None:
    """How many time ids an SDXL-style Unet takes (6 base, 5 refiner); None when it takes none or it is unclear."""
    if unet.get("addition_embed_type") != "text_time" or not text_embeds_dim:
        return None
    width, step = unet.get("projection_class_embeddings_input_dim"), unet.get("addition_time_embed_dim")
    if not isinstance(width, int) or not isinstance(step, int) or step <= 0 or (width - text_embeds_dim) % step:
        return None
    return (width - text_embeds_dim) // step


def refiner_source(refiner: str | Path, base: Any, revision: str | None = None) -> Any:
    """The refiner pipeline (local folder or Hub repo id; only its Unet is fetched), checked against `base`."""
    from . import source as sources

    if base.arch != "sdxl":
        raise UsageError(f"--refiner goes with an SDXL base; SOURCE is a {base.pipeline_class}.",
                         hint="Drop --refiner, or convert an SDXL pipeline (StableDiffusionXLPipeline).")
    path = Path(str(refiner)).expanduser()
    if path.is_dir():
        src, _ = sources.from_folder(path, ("unet",))
    elif sources.looks_like_repo_id(str(refiner)):
        src, _ = sources.from_hub(str(refiner), ("unet",), revision=revision)
    else:
        raise ConversionError(f"--refiner {refiner} is neither a folder nor a Hub repo id.",
                              hint="Pass the refiner's diffusers folder, or e.g. stabilityai/stable-diffusion-xl-refiner-1.0.")
    check_refiner(src, base)
    return src


def check_refiner(src: Any, base: Any) -> None:
    """The refiner must be an SDXL refiner for this base: 5 time ids, the base's second encoder's width."""
    where = src.repo_id or str(src.folder)
    hint = "Pass an SDXL refiner (e.g. stabilityai/stable-diffusion-xl-refiner-1.0) made for this base."
    if src.arch != "sdxl":
        raise ConversionError(f"--refiner {where} is a {src.pipeline_class}, not an SDXL refiner.", hint=hint)
    unet = _config(src.folder, "unet")
    base_encoder = _config(base.folder, "text_encoder_2")
    encoder = _config(src.folder, "text_encoder_2") or base_encoder
    ids = time_ids_of(unet, encoder.get("projection_dim"))
    if ids != REFINER_TIME_IDS:
        what = "no time ids" if ids is None else f"{ids} time ids"
        raise ConversionError(f"--refiner {where} is an SDXL pipeline but not a refiner: its Unet takes {what}, "
                              f"not the refiner's {REFINER_TIME_IDS} (sizes, crop, aesthetic score).", hint=hint)
    context = unet.get("cross_attention_dim")
    width = base_encoder.get("hidden_size")
    if width is not None and context != width:
        raise ConversionError(f"--refiner {where} belongs to another model family: its Unet reads {context}-wide "
                              f"text states, this base's second text encoder makes {width}.", hint=hint)
