"""The SafetyChecker component: CLIP image preprocessing, the check, blacking out flagged images."""

from __future__ import annotations

from typing import Any

from .components import Component

# CLIP's image normalization (the feature extractor the SD safety checker was trained with).
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def clip_input(image: Any, size: int) -> Any:
    """PIL image -> [1, 3, size, size]: shortest side to `size` (bicubic), center crop, normalize."""
    import numpy as np
    import torch
    from PIL import Image

    w, h = image.size
    scale = size / min(w, h)
    resized = image.resize((max(size, round(w * scale)), max(size, round(h * scale))), resample=Image.BICUBIC)
    left = (resized.width - size) // 2
    top = (resized.height - size) // 2
    crop = resized.crop((left, top, left + size, top + size))
    array = np.asarray(crop, dtype=np.float32) / 255.0
    array = (array - np.array(CLIP_MEAN, dtype=np.float32)) / np.array(CLIP_STD, dtype=np.float32)
    return torch.from_numpy(array.transpose(2, 0, 1).copy()).unsqueeze(0)


def is_flagged(checker: Component, unit_image: Any, pil_image: Any) -> bool:
    """Run the checker on one image ([H, W, 3] float in [0, 1]); True when it flags it."""
    import torch

    size = checker.input_shape("clip_input")[-1]
    feed: dict[str, Any] = {"clip_input": clip_input(pil_image, size)}
    if "images" in checker.inputs:
        feed["images"] = torch.from_numpy(unit_image.copy()).unsqueeze(0)
    if "adjustment" in checker.inputs:
        feed["adjustment"] = torch.zeros(checker.inputs["adjustment"].shape or (1,))
    out = checker(feed)
    flags = out.get("has_nsfw_concepts")
    if flags is None:
        raise KeyError("the SafetyChecker has no has_nsfw_concepts output")
    return bool((flags.float() > 0.5).any())


def blacked_out(unit_image: Any) -> Any:
    import numpy as np

    return np.zeros_like(unit_image)
