"""Images in and out of the pipeline: init images to [-1, 1] tensors, decodes to PIL."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..errors import InvalidImage, UnsupportedSize

# How far an init image's aspect ratio may differ from the model's before it is refused
# (a resize would visibly distort it).
ASPECT_TOLERANCE = 0.02
# What `--fit` does with an init image of another aspect ratio.
FITS = ("crop", "pad", "stretch")


def open_init_image(path: Path | str) -> Any:
    """Read an init image as RGB, with a clear error for anything that is not one."""
    from PIL import Image, UnidentifiedImageError

    path = Path(path)
    if not path.is_file():
        raise InvalidImage(f"Init image {path} does not exist.", hint="Pass the path of a PNG or JPEG to --image.")
    try:
        with Image.open(path) as img:
            img.load()
            return img.convert("RGB")
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as exc:
        raise InvalidImage(f"Cannot read {path} as an image ({type(exc).__name__}: {exc}).",
                           hint="Pass a PNG or JPEG file to --image.") from exc


def check_aspect(size: tuple[int, int], width: int, height: int, fit: str | None) -> bool:
    """True when an init image of `size` needs `fit` for a model of width x height; without a
    `fit`, another aspect ratio is refused (before any model is loaded, when the size is known)."""
    w, h = size
    if abs((w / h) / (width / height) - 1.0) <= ASPECT_TOLERANCE:
        return False
    if fit is None:
        raise UnsupportedSize(
            f"The init image is {w}x{h}, but this model makes {width}x{height} images "
            "(a different aspect ratio).",
            hint=f"Pass --fit crop (cut to the model's shape), --fit pad (add black bars) or --fit stretch, "
                 f"or crop the image to {width}x{height} yourself.",
        )
    if fit not in FITS:
        raise UnsupportedSize(f"Unknown --fit {fit!r}.", hint=f"Choose one of: {', '.join(FITS)}.")
    return True


def fit_init_image(image: Any, width: int, height: int, fit: str | None = None) -> tuple[Any, bool]:
    """The init image at the model's size: resized when only the scale differs; of another aspect
    ratio, cropped to the middle, padded with black bars or stretched as `fit` says (else refused)."""
    from PIL import Image

    if image.size == (width, height):
        return image, False
    w, h = image.size
    if check_aspect((w, h), width, height, fit):
        wider = w * height > h * width  # than the model's shape
        if fit == "crop":  # keep the middle, at the model's shape
            keep = (round(h * width / height), h) if wider else (w, round(w * height / width))
            left, top = (w - keep[0]) // 2, (h - keep[1]) // 2
            image = image.crop((left, top, left + keep[0], top + keep[1]))
        elif fit == "pad":  # all of it, centred on black at the model's shape
            canvas = Image.new("RGB", (w, round(w * height / width)) if wider else (round(h * width / height), h))
            canvas.paste(image, ((canvas.width - w) // 2, (canvas.height - h) // 2))
            image = canvas
    return image.resize((width, height), resample=Image.LANCZOS), True


def image_to_tensor(image: Any) -> Any:
    """PIL RGB -> float32 tensor [1, 3, H, W] in [-1, 1]."""
    import numpy as np
    import torch

    array = np.asarray(image, dtype=np.float32) / 255.0
    return torch.from_numpy(array.transpose(2, 0, 1).copy()).unsqueeze(0) * 2.0 - 1.0


def tensor_to_unit(image: Any) -> Any:
    """Decoder output [1, 3, H, W] in [-1, 1] (on any device) -> float numpy [H, W, 3] in [0, 1]."""
    return (image / 2 + 0.5).clamp(0, 1)[0].permute(1, 2, 0).float().cpu().numpy()


def unit_to_pil(array: Any) -> Any:
    """float [H, W, 3] in [0, 1] -> 8-bit PIL image (rounded, as diffusers does)."""
    import numpy as np
    from PIL import Image

    return Image.fromarray((array * 255).round().astype(np.uint8))
