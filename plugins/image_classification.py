"""The `image-classification` task: Core ML classifiers of images (apple/coreml-FastViT-T8, -MA36, ...).

A classifier declares its label output (`classLabel`) and a dictionary of probabilities
(`classLabel_probs`) over the class labels it carries. Each image is center-cropped to the
model's aspect ratio (or padded, or stretched: `--fit`) and resized to its input size (FastViT:
256x256); the top-k labels are printed with their probabilities.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from coreml_hub.errors import UsageError
from coreml_hub.hookspecs import hookimpl
from coreml_hub.human import plural
from coreml_hub.tasks import (KNOWN, NAMED, ModelInfo, Rendering, TaskRequest, image_input, load_image_model,
                              read_images)

DEFAULT_TOP_K = 5


@dataclass(frozen=True)
class Classified:
    path: Path
    top: tuple[tuple[Any, float], ...]  # (label, probability), most probable first

    def to_dict(self) -> dict[str, Any]:
        return {"path": str(self.path), "label": self.top[0][0] if self.top else None,
                "top": [{"label": label, "probability": p} for label, p in self.top]}


@dataclass(frozen=True)
class ClassificationResult:
    model: ModelInfo
    images: tuple[Classified, ...]
    load_seconds: float
    seconds: float

    def to_dict(self) -> dict[str, Any]:
        return {"task": ImageClassification.name, "model": self.model.to_dict(),
                "images": [i.to_dict() for i in self.images], "load_seconds": round(self.load_seconds, 3),
                "seconds": round(self.seconds, 3)}

    def render(self) -> Rendering:
        several = len(self.images) > 1
        rows = tuple({"image": str(item.path), "label": str(label), "probability": f"{p:.4f}"}
                     for item in self.images for label, p in item.top)
        columns = (("image", "IMAGE"),) if several else ()
        quiet = tuple((f"{item.path}\t" if several else "") + str(item.top[0][0]) for item in self.images if item.top)
        return Rendering(rows=rows, columns=columns + (("label", "LABEL"), ("probability", "PROBABILITY")),
                         quiet=quiet)


class ImageClassification:
    name = "image-classification"
    description = "The top-k labels of images, with their probabilities, from a Core ML classifier."
    options = ("top_k", "fit")

    def recognize(self, model: ModelInfo) -> float:
        spec = model.single
        if spec is None or not spec.classifier or image_input(spec) is None:
            return 0.0
        return (NAMED if model.names_task(self.name) else KNOWN) + model.tag_bonus(self.name)

    def run(self, model: ModelInfo, request: TaskRequest) -> ClassificationResult:
        images = read_images(request, f"coreml-hub run {model.ref} photo.jpg")
        top_k = int(request.option("top_k", DEFAULT_TOP_K))
        fit = request.option("fit", "crop")
        if top_k < 1:
            raise UsageError("--top-k must be at least 1.")
        spec = model.single
        probabilities = next((o.name for o in spec.outputs if o.kind == "dict"), None) if spec else None
        if probabilities is None:
            raise UsageError(f"{model.name} is not an image classifier. {model.describe()}")
        classifier = load_image_model(model, request, "an image classifier")
        t0 = time.perf_counter()
        found = []
        for path, image in images:
            scores = classifier.predict(image, fit=fit)[probabilities]
            ranked = sorted(((label, float(p)) for label, p in scores.items()), key=lambda lp: -lp[1])
            found.append(Classified(path, tuple(ranked[:top_k])))
        seconds = time.perf_counter() - t0
        request.say(f"Classified {plural(len(found), 'image')} with {model.name} in "
                    f"{seconds:.2f} s (loaded in {classifier.load_seconds:.1f} s).")
        return ClassificationResult(model, tuple(found), classifier.load_seconds, seconds)


@hookimpl
def register_tasks(register: Any) -> None:
    register(ImageClassification())
