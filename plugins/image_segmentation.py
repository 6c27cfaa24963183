"""The `image-segmentation` task: semantic segmentation models (apple/coreml-detr-semantic-segmentation).

Apple's DETR export takes an `image` (448x448) and gives `semanticPredictions`, an int32 map of
class ids [H, W] (the argmax is inside the model); the class names are a JSON list in the
metadata entry `com.apple.coreml.model.preview.params` (`{"labels": [...]}`, `"--"` for ids with
no class). Without it, a `labels.txt`/`labels.json` beside the model names them, else `class N`.
Each image is stretched to the model's size and the map resized back (nearest). Written:

- `<name>-classes.png`: the class id of every pixel (8-bit grayscale, 16-bit above 255 classes);
- `<name>-overlay.png`: the image with each class's color over it (half transparent) and, below,
  a legend of the classes present with their share of the pixels.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any


from coreml_hub.hookspecs import hookimpl
from coreml_hub.human import plural
from coreml_hub.tasks import (KNOWN, NAMED, SHAPED, BundleSpec, ModelInfo, Rendering, TaskRequest, image_input,
                              load_image_model, read_images)

PARAMS_KEY = "com.apple.coreml.model.preview.params"
KNOWN_NAMES = ("semanticPredictions", "semantic_predictions", "segmentation", "labels_map", "classes")
EMPTY_LABEL = "--"

if TYPE_CHECKING:
    import numpy as np


def class_map_output(spec: BundleSpec) -> tuple[Any, float] | None:
    """The integer class-map output [H, W] (or [1, H, W]) and how sure that is."""
    for out in spec.outputs:
        if out.kind != "array" or not out.dtype.startswith("int"):
            continue
        rank = len(out.shape) if out.shape is not None else len(out.ranges)
        if rank in (2, 3):
            return out, KNOWN if out.name in KNOWN_NAMES else SHAPED
    return None


def labels_of(spec: BundleSpec, folder: Path) -> list[str]:
    """Class names by id: the model's metadata, else a labels file beside it; may be empty."""
    raw = spec.metadata.get(PARAMS_KEY)
    if raw:
        try:
            labels = json.loads(raw).get("labels")
            if isinstance(labels, list):
                return [str(label) for label in labels]
        except (ValueError, AttributeError):
            pass
    for name in ("labels.json", "labels.txt", "classes.txt"):
        path = folder / name
        if not path.is_file():
            continue
        text = path.read_text(encoding="utf-8", errors="replace")
        if name.endswith(".json"):
            try:
                data = json.loads(text)
            except ValueError:
                continue
            if isinstance(data, dict):  # {"0": "person", ...} or {"labels": [...]}
                data = data.get("labels", [data[k] for k in sorted(data, key=lambda k: int(k) if k.isdigit() else 0)])
            return [str(label) for label in data]
        return [line.strip() for line in text.splitlines() if line.strip()]
    return []


def label_of(labels: list[str], class_id: int) -> str:
    if 0 <= class_id < len(labels) and labels[class_id] != EMPTY_LABEL:
        return labels[class_id]
    return f"class {class_id}"


@dataclass(frozen=True)
class Segmented:
    path: Path
    size: tuple[int, int]
    classes_png: Path
    overlay_png: Path
    present: tuple[tuple[int, str, float], ...]  # (id, label, share of pixels), largest first

    def to_dict(self) -> dict[str, Any]:
        return {"path": str(self.path), "width": self.size[0], "height": self.size[1],
                "classes_png": str(self.classes_png), "overlay_png": str(self.overlay_png),
                "classes": [{"id": i, "label": label, "share": round(share, 6)} for i, label, share in self.present]}


@dataclass(frozen=True)
class SegmentationResult:
    model: ModelInfo
    images: tuple[Segmented, ...]
    load_seconds: float
    seconds: float

    def to_dict(self) -> dict[str, Any]:
        return {"task": ImageSegmentation.name, "model": self.model.to_dict(),
                "images": [i.to_dict() for i in self.images], "load_seconds": round(self.load_seconds, 3),
                "seconds": round(self.seconds, 3)}

    def render(self) -> Rendering:
        several = len(self.images) > 1
        rows = tuple({"image": str(s.path), "id": str(i), "label": label, "share": f"{share * 100:.1f}%"}
                     for s in self.images for i, label, share in s.present)
        columns = ((("image", "IMAGE"),) if several else ()) + (("id", "ID"), ("label", "CLASS"), ("share", "PIXELS"))
        files = tuple(str(p) for s in self.images for p in (s.classes_png, s.overlay_png))
        return Rendering(rows=rows, columns=columns, lines=("",) + files, quiet=files)


class ImageSegmentation:
    name = "image-segmentation"
    description = "A class map of each image and a colored overlay with a legend of the classes present."
    options: tuple[str, ...] = ()

    def recognize(self, model: ModelInfo) -> float:
        spec = model.single
        if spec is None or image_input(spec) is None:
            return 0.0
        found = class_map_output(spec)
        if found is None:
            return 0.0
        return (NAMED if model.names_task(self.name) else found[1]) + model.tag_bonus(self.name)

    def run(self, model: ModelInfo, request: TaskRequest) -> SegmentationResult:
        import numpy as np

        from coreml_hub.errors import UsageError

        images = read_images(request, f"coreml-hub run {model.ref} street.jpg")
        found = class_map_output(model.single) if model.single is not None else None
        if found is None:
            raise UsageError(f"{model.name} is not a segmentation model this task can run. {model.describe()}")
        output = found[0]
        segmenter = load_image_model(model, request, "a segmentation model")
        labels = labels_of(segmenter.spec, model.folder)
        load_seconds = segmenter.load_seconds
        folder = request.folder()
        t0 = time.perf_counter()
        done = []
        for path, image in images:
            ids = np.asarray(segmenter.predict(image)[output.name])
            while ids.ndim > 2 and ids.shape[0] == 1:
                ids = ids[0]
            ids = _resize_ids(ids.astype(np.int32), image.size)
            done.append(_write(path, image, ids, labels, folder, model.name))
        seconds = time.perf_counter() - t0
        request.say(f"Segmented {plural(len(done), 'image')} with {model.name} in "
                    f"{seconds:.2f} s (loaded in {load_seconds:.1f} s).")
        return SegmentationResult(model, tuple(done), load_seconds, seconds)


def _resize_ids(ids: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    import numpy as np
    from PIL import Image

    if (ids.shape[1], ids.shape[0]) == size:
        return ids
    return np.asarray(Image.fromarray(ids, mode="I").resize(size, resample=Image.NEAREST), dtype=np.int32)


def _write(path: Path, image: Any, ids: np.ndarray, labels: list[str], folder: Path, model: str) -> Segmented:
    import numpy as np
    from PIL import Image

    from coreml_hub.pipeline.images import palette
    from coreml_hub.pipeline.png import save_png

    counts = np.bincount(ids.ravel().clip(min=0))
    present = tuple((int(i), label_of(labels, int(i)), float(counts[i]) / ids.size)
                    for i in np.argsort(-counts, kind="stable") if counts[i] > 0)
    chunks = {"model": model, "source_image": str(path), "Software": "coreml-hub",
              "labels": json.dumps({str(i): label for i, label, _ in present})}
    top = int(ids.max()) if ids.size else 0
    class_image = Image.fromarray(ids.astype(np.uint8 if top < 256 else np.uint16))
    classes_png = save_png(class_image, folder, f"{path.stem}-classes", chunks)
    colors = np.array(palette(max(top + 1, len(labels), 1)), dtype=np.float32)
    tinted = 0.5 * np.asarray(image, dtype=np.float32) + 0.5 * colors[ids.clip(min=0)]
    overlay = _with_legend(Image.fromarray(np.round(tinted).astype(np.uint8), mode="RGB"),
                           [(label, tuple(int(c) for c in colors[i]), share) for i, label, share in present])
    overlay_png = save_png(overlay, folder, f"{path.stem}-overlay", chunks)
    return Segmented(path, image.size, classes_png, overlay_png, present)


def _with_legend(image: Any, entries: list[tuple[str, tuple[int, ...], float]]) -> Any:
    """The image with a legend below it: a color swatch, the class and its share of pixels per line."""
    from PIL import Image, ImageDraw, ImageFont

    font = ImageFont.load_default()
    line = 16
    texts = [f"{label} ({share * 100:.1f}%)" for label, _color, share in entries]
    probe = ImageDraw.Draw(image)
    text_width = max((int(probe.textlength(t, font=font)) for t in texts), default=0)
    width = max(image.width, text_width + 28)
    canvas = Image.new("RGB", (width, image.height + 6 + line * len(entries)), (255, 255, 255))
    canvas.paste(image, (0, 0))
    draw = ImageDraw.Draw(canvas)
    for n, ((_label, color, _share), text) in enumerate(zip(entries, texts)):
        y = image.height + 4 + n * line
        draw.rectangle((4, y + 2, 16, y + 13), fill=tuple(color), outline=(0, 0, 0))
        draw.text((22, y), text, fill=(0, 0, 0), font=font)
    return canvas


@hookimpl
def register_tasks(register: Any) -> None:
    register(ImageSegmentation())
