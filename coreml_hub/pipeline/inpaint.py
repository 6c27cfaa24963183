"""Inpainting masks: read, checked against the init image before any model loads, and prepared as
diffusers' mask processor prepares them (grayscale, resized to the model's size with Lanczos,
binarized at 0.5; 1 = repaint).

White pixels are repainted. A mask with transparent pixels (Mochi Diffusion's and Apple's
convention) is read from its alpha channel instead: fully transparent = repaint.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..errors import UnsupportedSize
from .images import ASPECT_TOLERANCE


def open_mask(path: str | Path) -> Any:
    """The mask as an 8-bit grayscale PIL image (white = repaint)."""
    from .images import open_image

    return open_image(path, what="Mask", option="--mask", convert=_repaint_channel)


def _repaint_channel(img: Any) -> Any:
    from PIL import ImageOps

    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        alpha = img.convert("RGBA").getchannel("A")
        if alpha.getextrema()[0] < 255:  # transparent pixels mark the hole
            return ImageOps.invert(alpha)
    return img.convert("L")


def check_same_aspect(image: Any, mask: Any) -> None:
    """The init image and the mask must frame the same picture: refuse different aspect ratios."""
    (iw, ih), (mw, mh) = image.size, mask.size
    if abs((iw / ih) / (mw / mh) - 1.0) > ASPECT_TOLERANCE:
        raise UnsupportedSize(f"The mask is {mw}x{mh} but the init image is {iw}x{ih}: a different aspect ratio.",
                              hint="Make the mask from the init image (same size, or the same aspect ratio).")


def mask_array(mask: Any, width: int, height: int) -> Any:
    """float32 [H, W] with 1 where the model repaints, at the model's size."""
    import numpy as np
    from PIL import Image

    if mask.size != (width, height):
        mask = mask.resize((width, height), resample=Image.LANCZOS)
    array = np.asarray(mask, dtype=np.float32) / 255.0
    return (array >= 0.5).astype(np.float32)
