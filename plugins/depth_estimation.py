"""The `depth-estimation` task: monocular depth models (apple/coreml-depth-anything-v2-small, -small).

Apple's Depth Anything export takes an `image` (518x392, RGB) and gives `depth`, a grayscale
float16 image of relative depth in [0, 1] (divided by its maximum; near is bright). Each image is
stretched to the model's size, as Apple's samples do, and the depth map is resized back to the
image's own size (bilinear), then written twice:

- `<name>-depth.png`: 16-bit grayscale, value = depth x 65535 for depth in [0, 1]; a model whose
  depth leaves [0, 1] is scaled from its minimum to its maximum, and both are recorded in the
  PNG's text chunks (`depth_min`, `depth_max`), so the values can be recovered.
- `<name>-depth-color.png`: the map stretched to its own range, through a colormap.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any


from coreml_hub.hookspecs import hookimpl
from coreml_hub.human import plural
from coreml_hub.tasks import (KNOWN, NAMED, SHAPED, BundleSpec, ModelInfo, Rendering, TaskRequest, image_input,
                              load_image_model, read_images)

DEPTH_NAMES = ("depth", "predicted_depth", "depthmap", "depth_map")

if TYPE_CHECKING:
    import numpy as np


def depth_output(spec: BundleSpec) -> tuple[Any, float] | None:
    """The depth output and how sure that is: a grayscale image or float map named like depth, or any
    grayscale image when it is the only output."""
    for out in spec.outputs:
        gray = out.kind == "image" and out.image is not None and out.image.channels == 1
        if out.name.lower() in DEPTH_NAMES and (gray or (out.kind == "array" and out.dtype.startswith("fp"))):
            return out, KNOWN
    grays = [o for o in spec.outputs if o.kind == "image" and o.image is not None and o.image.channels == 1]
    if len(grays) == 1 and len(spec.outputs) == 1:
        return grays[0], SHAPED
    return None


def as_map(value: Any) -> np.ndarray:
    """A depth output (PIL image or array [1, 1, H, W] / [1, H, W] / [H, W]) as float32 [H, W]."""
    import numpy as np

    array = np.asarray(value, dtype=np.float32)
    while array.ndim > 2 and array.shape[0] == 1:
        array = array[0]
    if array.ndim != 2:
        raise ValueError(f"a depth map of shape {array.shape}")
    return array


def resize_map(depth: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """A float map resized (bilinear) to `size` = (width, height)."""
    import numpy as np
    from PIL import Image

    if (depth.shape[1], depth.shape[0]) == size:
        return depth
    return np.asarray(Image.fromarray(depth, mode="F").resize(size, resample=Image.BILINEAR), dtype=np.float32)


def to_16bit(depth: np.ndarray) -> tuple[np.ndarray, dict[str, str]]:
    """uint16 values and the text chunks that say how they map back to depth."""
    import numpy as np

    low, high = float(depth.min()), float(depth.max())
    if low >= 0.0 and high <= 1.0:
        return np.round(depth * 65535).astype(np.uint16), {"depth_scale": "value / 65535", "depth_min": "0",
                                                           "depth_max": "1"}
    span = high - low or 1.0
    values = np.round((depth - low) / span * 65535).astype(np.uint16)
    return values, {"depth_scale": "depth_min + value / 65535 * (depth_max - depth_min)", "depth_min": repr(low),
                    "depth_max": repr(high)}


@dataclass(frozen=True)
class DepthMap:
    path: Path
    size: tuple[int, int]
    depth_png: Path
    color_png: Path
    minimum: float
    maximum: float

    def to_dict(self) -> dict[str, Any]:
        return {"path": str(self.path), "width": self.size[0], "height": self.size[1],
                "depth_png": str(self.depth_png), "color_png": str(self.color_png), "min": self.minimum,
                "max": self.maximum}


@dataclass(frozen=True)
class DepthResult:
    model: ModelInfo
    maps: tuple[DepthMap, ...]
    load_seconds: float
    seconds: float

    def to_dict(self) -> dict[str, Any]:
        return {"task": DepthEstimation.name, "model": self.model.to_dict(),
                "images": [m.to_dict() for m in self.maps], "load_seconds": round(self.load_seconds, 3),
                "seconds": round(self.seconds, 3)}

    def render(self) -> Rendering:
        rows = tuple({"image": str(m.path), "size": f"{m.size[0]}x{m.size[1]}", "depth": str(m.depth_png),
                      "color": str(m.color_png)} for m in self.maps)
        return Rendering(rows=rows, columns=(("image", "IMAGE"), ("size", "SIZE"), ("depth", "DEPTH (16-BIT)"),
                                             ("color", "COLORIZED")),
                         quiet=tuple(str(p) for m in self.maps for p in (m.depth_png, m.color_png)))


class DepthEstimation:
    name = "depth-estimation"
    description = "A depth map of each image, as a 16-bit PNG and a colorized PNG at the image's size."
    options: tuple[str, ...] = ()

    def recognize(self, model: ModelInfo) -> float:
        spec = model.single
        if spec is None or image_input(spec) is None:
            return 0.0
        found = depth_output(spec)
        if found is None:
            return 0.0
        return (NAMED if model.names_task(self.name) else found[1]) + model.tag_bonus(self.name)

    def run(self, model: ModelInfo, request: TaskRequest) -> DepthResult:
        from coreml_hub.errors import UsageError
        from coreml_hub.pipeline.images import colorize
        from coreml_hub.pipeline.png import save_png

        images = read_images(request, f"coreml-hub run {model.ref} photo.jpg")
        found = depth_output(model.single) if model.single is not None else None
        if found is None:
            raise UsageError(f"{model.name} is not a depth model this task can run. {model.describe()}")
        output = found[0]
        estimator = load_image_model(model, request, "a depth model")
        load_seconds = estimator.load_seconds
        folder = request.folder()
        t0 = time.perf_counter()
        maps = []
        for path, image in images:
            depth = resize_map(as_map(estimator.predict(image)[output.name]), image.size)
            values, chunks = to_16bit(depth)
            chunks.update({"model": model.name, "source_image": str(path), "Software": "coreml-hub"})
            stem = f"{path.stem}-depth"
            depth_png = save_png(_gray16(values), folder, stem, chunks)
            low, high = float(depth.min()), float(depth.max())
            color_png = save_png(colorize((depth - low) / ((high - low) or 1.0)), folder, f"{stem}-color",
                                 {"model": model.name, "source_image": str(path), "Software": "coreml-hub"})
            maps.append(DepthMap(path, image.size, depth_png, color_png, low, high))
        seconds = time.perf_counter() - t0
        request.say(f"Estimated depth for {plural(len(maps), 'image')} with {model.name} in "
                    f"{seconds:.2f} s (loaded in {load_seconds:.1f} s).")
        return DepthResult(model, tuple(maps), load_seconds, seconds)


def _gray16(values: np.ndarray) -> Any:
    import numpy as np
    from PIL import Image

    return Image.fromarray(values.astype(np.uint16))  # mode I;16: a 16-bit grayscale PNG


@hookimpl
def register_tasks(register: Any) -> None:
    register(DepthEstimation())
