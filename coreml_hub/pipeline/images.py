"""Images in and out of the pipeline: init images to [-1, 1] tensors, decodes to PIL."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..errors import InvalidImage, UnsupportedSize

# How far an init image's aspect ratio may differ from the model's before it is refused
# (a resize would visibly distort it).
ASPECT_TOLERANCE = 0.02
# What `--fit` does with an image of another aspect ratio than the model's (init images, image tasks).
FITS = ("crop", "pad", "stretch")


def open_init_image(path: Path | str) -> Any:
    """Read an init image as RGB, with a clear error for anything that is not one."""
    return open_image(path, what="Init image")


def open_image(path: Path | str, *, what: str = "Image", option: str = "--image", convert: Any = "RGB") -> Any:
    """Read an image file as RGB (or as `convert` says: a PIL mode, or a function of the opened image);
    a missing file or one that is not an image is one clear error naming the `option` it came from."""
    from PIL import Image, UnidentifiedImageError

    path = Path(path)
    if not path.is_file():
        raise InvalidImage(f"{what} {path} does not exist.", hint=f"Pass the path of a PNG or JPEG to {option}.")
    try:
        with Image.open(path) as img:
            img.load()
            return convert(img) if callable(convert) else img.convert(convert)
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as exc:
        raise InvalidImage(f"Cannot read {path} as an image ({type(exc).__name__}: {exc}).",
                           hint=f"Pass a PNG or JPEG file to {option}.") from exc


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
    mode = fit if check_aspect(image.size, width, height, fit) else "stretch"
    return fit_image(image, width, height, mode, resample=Image.LANCZOS), True


def fit_image(image: Any, width: int, height: int, fit: str = "stretch", *, resample: Any = None) -> Any:
    """`image` at width x height: stretched to it, its middle of that shape cropped (`crop`), or all of
    it centred on black bars of that shape (`pad`), then resized (bicubic unless `resample` says)."""
    from PIL import Image

    if image.size == (width, height):
        return image
    if fit not in FITS:
        raise UnsupportedSize(f"Unknown --fit {fit!r}.", hint=f"Choose one of: {', '.join(FITS)}.")
    w, h = image.size
    wider = w * height > h * width  # than the wanted shape
    if fit == "crop":  # keep the middle, at the wanted shape
        keep = (round(h * width / height), h) if wider else (w, round(w * height / width))
        left, top = (w - keep[0]) // 2, (h - keep[1]) // 2
        image = image.crop((left, top, left + keep[0], top + keep[1]))
    elif fit == "pad":  # all of it, centred on black at the wanted shape
        canvas = Image.new("RGB", (w, round(w * height / width)) if wider else (round(h * width / height), h))
        canvas.paste(image, ((canvas.width - w) // 2, (canvas.height - h) // 2))
        image = canvas
    return image.resize((width, height), resample=Image.BICUBIC if resample is None else resample)


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


# Stops of the colormap for depth maps (0 = far, 1 = near): dark blue through purple and orange to
# pale yellow, lightness rising all the way, so the map also reads in grayscale.
_RAMP = ((0.0, (13, 8, 50)), (0.25, (84, 24, 120)), (0.5, (175, 48, 110)), (0.75, (240, 120, 50)),
         (1.0, (252, 240, 170)))


def colorize(values: Any) -> Any:
    """A 2-D array in [0, 1] -> an RGB PIL image through the depth colormap."""
    import numpy as np
    from PIL import Image

    v = np.clip(np.asarray(values, dtype=np.float32), 0.0, 1.0)
    stops = np.array([s for s, _ in _RAMP], dtype=np.float32)
    colors = np.array([c for _, c in _RAMP], dtype=np.float32)
    rgb = np.stack([np.interp(v, stops, colors[:, i]) for i in range(3)], axis=-1)
    return Image.fromarray(np.round(rgb).astype(np.uint8), mode="RGB")


def palette(count: int) -> list[tuple[int, int, int]]:
    """`count` well separated colors, the same ones every time (hues a golden angle apart)."""
    import colorsys

    colors = []
    for i in range(count):
        hue = (i * 0.618033988749895) % 1.0
        light = 0.45 + 0.15 * ((i // 3) % 2)
        r, g, b = colorsys.hls_to_rgb(hue, light, 0.75)
        colors.append((round(r * 255), round(g * 255), round(b * 255)))
    return colors
