"""ControlNets in `run`: finding them, checking them against the Unet before anything loads,
preparing their images, and the residuals they add to the Unet at each step.

Apple's contract (ControlNet.swift, Unet.swift): the controlled Unet takes `additional_residual_0..N`
after its usual inputs; each ControlNet takes `sample`, `timestep`, `encoder_hidden_states` and
`controlnet_cond` ([B, 3, H, W] in [0, 1]; SDXL ControlNets also `time_ids`, `text_embeds`) and
returns `additional_residual_i`. As in diffusers' MultiControlNet (guess mode off), every ControlNet
sees both guidance branches, its residuals are multiplied by its scale, and the residuals of several
ControlNets are summed.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

from ..controlnet_io import (RESIDUAL_PREFIX, BundleIO, bundle_io, controlnet_mismatches, residual_index,
                             unet_io)
from ..errors import InvalidBundle, UsageError
from ..layouts import CONTROLNET_DIR, CONTROLNET_PREFIX, controlnet_base_key, controlnet_key

__all__ = ["BundleIO", "bundle_io", "unet_io", "check_controlnet", "control_tensor", "inpaint_control_tensor",
           "find_controlnets", "resolve_controlnet", "residuals", "pair_requests"]


@dataclass(frozen=True)
class ControlRequest:
    """One `--controlnet NAME_OR_PATH --control-image IMG [--control-scale S]` as the user gave it."""

    controlnet: str
    image: str | Path | None = None
    scale: float = 1.0


@dataclass(frozen=True)
class ControlInput:
    """A ControlNet ready to run: its bundle, the prepared image (a PIL image at the model's size), its scale."""

    name: str
    path: Path
    image: Any
    scale: float
    image_source: str  # the file the image came from (or how it was made)
    image_sha256: str


# ---- finding ControlNets ------------------------------------------------------------------------

def find_controlnets(folder: Path) -> dict[str, Path]:
    """ControlNets of a variant folder: `controlnet/<Name>.mlmodelc` (Apple's compiled layout) and
    `ControlNet_<org>_<name>.mlpackage` (packages), by the name they are asked for (`<Name>`, or the
    package name without `ControlNet_`)."""
    found: dict[str, Path] = {}
    places = [folder / CONTROLNET_DIR, folder]
    for place in places:
        if not place.is_dir():
            continue
        for bundle in sorted(place.iterdir()):
            if not bundle.is_dir() or bundle.suffix not in (".mlmodelc", ".mlpackage"):
                continue
            if place == folder and not bundle.name.startswith(CONTROLNET_PREFIX):
                continue
            found.setdefault(bundle.stem.removeprefix(CONTROLNET_PREFIX), bundle)
    return found


def resolve_controlnet(folder: Path, name_or_path: str) -> Path | None:
    """A ControlNet bundle: an existing `.mlmodelc`/`.mlpackage` path, or one of the variant's by name
    (compared without case and separators: `LllyasvielSdControlnetCanny` = `lllyasviel/sd-controlnet-canny`)."""
    candidate = Path(name_or_path).expanduser()
    if candidate.suffix in (".mlmodelc", ".mlpackage") and candidate.is_dir():
        return candidate.resolve()
    wanted = controlnet_key(name_or_path)
    found = find_controlnets(folder)
    for name, path in found.items():
        if controlnet_key(name) == wanted:
            return path
    loose = [path for name, path in found.items() if controlnet_base_key(name) == wanted]
    return loose[0] if len(loose) == 1 else None


def controlled_unet_names(found: Iterable[str]) -> tuple[str, ...]:
    """The controlled Unet form to use: whole when present, else both chunks; () when there is none."""
    names = set(found)
    if "controlled_unet" in names:
        return ("controlled_unet",)
    if {"controlled_unet_chunk1", "controlled_unet_chunk2"} <= names:
        return ("controlled_unet_chunk1", "controlled_unet_chunk2")
    return ()


# ---- checks before loading -----------------------------------------------------------------------

def check_controlnet(cn: BundleIO, unet: BundleIO, image_size: tuple[int, int], name: str) -> None:
    """Refuse a ControlNet that cannot drive this Unet, saying what differs (from descriptions only)."""
    problems = controlnet_mismatches(cn, unet, image_size, name)
    if problems:
        raise InvalidBundle(problems[0], hint="Use a ControlNet converted for this model (same base model, "
                                              "resolution and attention).")


def pair_requests(controlnets: Iterable[str], images: Iterable[str | Path], scales: Iterable[float]) -> list[ControlRequest]:
    """Pair `--controlnet`, `--control-image` and `--control-scale` in order (scales default to 1)."""
    names, pictures, factors = list(controlnets), list(images), list(scales)
    if len(pictures) > len(names):
        raise UsageError(f"{len(pictures)} control images but {len(names)} ControlNet(s): each --control-image "
                         "goes with the --controlnet at the same position.",
                         hint="Add a --controlnet for each extra image, or drop the extra --control-image.")
    if len(factors) > len(names):
        raise UsageError(f"{len(factors)} --control-scale values but {len(names)} ControlNet(s).",
                         hint="Give at most one --control-scale per --controlnet, in the same order.")
    return [ControlRequest(name, pictures[i] if i < len(pictures) else None,
                           float(factors[i]) if i < len(factors) else 1.0) for i, name in enumerate(names)]


# ---- images ------------------------------------------------------------------------------------

def open_control_image(path: str | Path) -> Any:
    """A control image as RGBA (alpha kept: fully transparent pixels are holes, as in Apple's pipeline)."""
    from .images import open_image

    return open_image(path, what="Control image", option="--control-image", convert="RGBA")


def sha256_file(path: str | Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def control_tensor(image: Any, width: int, height: int) -> Any:
    """A control image as diffusers' ControlNet image processor makes it: RGB, resized to the model's
    size (Lanczos), [1, 3, H, W] float in [0, 1]; pixels whose alpha is 0 become -1 (Apple's hole
    punching, the inpaint ControlNet's masked pixels)."""
    import numpy as np
    import torch
    from PIL import Image

    rgba = image.convert("RGBA")
    if rgba.size != (width, height):
        rgba = rgba.resize((width, height), resample=Image.LANCZOS)
    array = np.asarray(rgba, dtype=np.float32) / 255.0
    rgb = array[..., :3].copy()
    rgb[array[..., 3] == 0] = -1.0
    return torch.from_numpy(rgb.transpose(2, 0, 1).copy()).unsqueeze(0)


def inpaint_control_tensor(init: Any, mask: Any) -> Any:
    """The inpaint ControlNet's image: the init image in [0, 1] with the pixels to repaint set to -1
    (diffusers' StableDiffusionControlNetInpaintPipeline examples; Apple's hole punching). `init` is a PIL
    image at the model's size, `mask` a float array [H, W] where 1 marks a pixel to repaint."""
    import numpy as np
    import torch

    rgb = np.asarray(init.convert("RGB"), dtype=np.float32) / 255.0
    rgb = rgb.copy()
    rgb[np.asarray(mask) > 0.5] = -1.0
    return torch.from_numpy(rgb.transpose(2, 0, 1).copy()).unsqueeze(0)


# ---- residuals at each step ---------------------------------------------------------------------

def _batched(component: Any, feed: dict[str, Any], batch: int) -> dict[str, Any]:
    """Run `component` on `feed` (batch `batch`) whatever batch the component was converted for."""
    import torch

    size = component.inputs["sample"].shape[0] if component.inputs["sample"].shape else batch
    if size == batch or size <= 0:
        return component(feed)
    parts: list[dict[str, Any]] = []
    for start in range(0, batch, size):
        piece = {}
        for key, value in feed.items():
            chunk = value[start:start + size]
            if chunk.shape[0] < size:  # pad the last piece by repeating its last item
                chunk = torch.cat([chunk] + [chunk[-1:]] * (size - chunk.shape[0]))
            piece[key] = chunk
        parts.append(component(piece))
    return {k: torch.cat([p[k] for p in parts])[:batch] for k in parts[0]}


def residuals(controls: list[tuple[Any, Any, float]], unet_inputs: dict[str, Any], sample: Any, timestep: Any,
              hidden: Any, extras: dict[str, Any]) -> dict[str, Any]:
    """The Unet's `additional_residual_i` inputs for one call: zeros without ControlNets, else each
    ControlNet's residuals times its scale, summed. `controls` holds (component, cond [1, 3, H, W], scale)."""
    import torch

    names = sorted((n for n in unet_inputs if n.startswith(RESIDUAL_PREFIX)), key=residual_index)
    batch = sample.shape[0]
    if not controls:
        return {n: torch.zeros(unet_inputs[n].shape, dtype=torch.float32, device=sample.device) for n in names}
    total: dict[str, Any] = {}
    for component, cond, scale in controls:
        feed = {"sample": sample, "timestep": timestep, "encoder_hidden_states": hidden,
                "controlnet_cond": cond.to(sample.device).expand(batch, -1, -1, -1).contiguous()}
        for key in ("time_ids", "text_embeds"):
            if key in component.inputs:
                feed[key] = extras[key]
        out = _batched(component, feed, batch)
        made = sorted((n for n in out if n.startswith(RESIDUAL_PREFIX)), key=residual_index)
        for ours, theirs in zip(names, made):
            value = out[theirs].to(sample.device) * scale
            total[ours] = value if ours not in total else total[ours] + value
    return total
