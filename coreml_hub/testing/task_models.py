"""Tiny vision models with the I/O of real plain Core ML repos, converted with coremltools and cached.

Each builder converts a small torch module with deterministic random weights (what
`<name>_module()` returns, so outputs can be compared) and returns the `.mlpackage`:

| builder | real repo | contract |
|---|---|---|
| `classifier()` | apple/coreml-FastViT-T8 (`FastViTT8F16`) | `image` RGB ImageType in (pixels 0..255, scaled by the ImageType, ImageNet normalization inside); a classifier: `classLabel` + `classLabel_probs` over ImageNet-style labels |
| `segmenter(precision)` | apple/coreml-detr-semantic-segmentation | `image` in; `semanticPredictions` int32 [H, W] class ids (argmax inside); labels as JSON in `com.apple.coreml.model.preview.params`, `"--"` for empty classes |
| `clip_image()`, `clip_text()` | apple/coreml-mobileclip (`mobileclip_s0_image`, `_text`) | `image` in / `text` int32 [1, 77] CLIP ids (zero-padded) in; `final_emb_1` [1, D] out, not normalized |
| `ambiguous()` | none | `image` in; a grayscale `depth` image and `semanticPredictions` out: two tasks fit it equally |

The depth model is `coreml_hub.testing.models.depth`. Sizes are small (the real models take
256, 448 or 518x392 pixels); the tasks read them from the models.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from . import factory

CODE = ("testing/task_models.py",)
CLASSIFIER_SIZE = 32  # FastViT: 256
CLASS_LABELS = ("tench", "goldfish", "great white shark", "tiger shark", "hammerhead", "electric ray", "stingray",
                "cock", "hen", "ostrich")
SEGMENTER_SIZE = 32  # DETR: 448
SEGMENT_LABELS = ("--", "person", "--", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat", "dog", "cat")
CLIP_SIZE = 32  # MobileCLIP S0: 256
CLIP_LENGTH = 77
CLIP_DIM = 16
CLIP_VOCAB = 1000  # coreml_hub.testing.tiny.VOCAB_SIZE: the tiny CLIP tokenizer's vocabulary
SEGMENTER_PARAMS_KEY = "com.apple.coreml.model.preview.params"
PREVIEW_KEY = "com.apple.coreml.model.preview.type"


def _normalize(x: Any) -> Any:
    import torch

    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    return (x - mean) / std


def classifier_module() -> Any:
    """FastViT stand-in: [0, 1] pixels -> class probabilities (softmax)."""
    import torch

    class TinyClassifier(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = torch.nn.Conv2d(3, 8, 3, stride=2, padding=1)
            self.fc = torch.nn.Linear(8, len(CLASS_LABELS))

        def forward(self, image: Any) -> Any:
            features = torch.relu(self.conv(_normalize(image))).mean(dim=(2, 3))
            return torch.softmax(self.fc(features) * 4.0, dim=-1)  # * 4: well separated probabilities

    torch.manual_seed(1401)
    return TinyClassifier().eval()


def segmenter_module() -> Any:
    """DETR semantic segmentation stand-in: [0, 1] pixels -> int class ids [H, W]."""
    import torch

    class TinySegmenter(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = torch.nn.Conv2d(3, 8, 3, padding=1)
            self.head = torch.nn.Conv2d(8, len(SEGMENT_LABELS), 1)

        def logits(self, image: Any) -> Any:
            return self.head(torch.relu(self.conv(_normalize(image))))

        def forward(self, image: Any) -> Any:
            return self.logits(image).argmax(dim=1)[0].to(torch.int32)

    torch.manual_seed(1402)
    return TinySegmenter().eval()


def clip_image_module() -> Any:
    """MobileCLIP image encoder stand-in: [0, 1] pixels -> an embedding [1, CLIP_DIM]."""
    import torch

    class TinyImageEncoder(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = torch.nn.Conv2d(3, 8, 3, stride=2, padding=1)
            self.proj = torch.nn.Linear(8, CLIP_DIM)

        def forward(self, image: Any) -> Any:
            return self.proj(torch.relu(self.conv(_normalize(image))).mean(dim=(2, 3)))

    torch.manual_seed(1403)
    return TinyImageEncoder().eval()


def clip_text_module() -> Any:
    """MobileCLIP text encoder stand-in: CLIP ids [1, 77] -> an embedding [1, CLIP_DIM], read at the
    end-of-text token (the largest id in a CLIP vocabulary), as CLIP does."""
    import torch

    class TinyTextEncoder(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed = torch.nn.Embedding(CLIP_VOCAB, CLIP_DIM)
            self.position = torch.nn.Parameter(torch.randn(CLIP_LENGTH, CLIP_DIM) * 0.1)
            self.mix = torch.nn.Linear(CLIP_DIM, CLIP_DIM)
            self.proj = torch.nn.Linear(CLIP_DIM, CLIP_DIM)

        def forward(self, text: Any) -> Any:
            h = self.embed(text) + self.position
            h = h + torch.tanh(self.mix(h.cumsum(dim=1) / torch.arange(1, CLIP_LENGTH + 1).view(1, -1, 1)))
            end = text.argmax(dim=-1)
            return self.proj(h[torch.arange(h.shape[0]), end])

    torch.manual_seed(1404)
    return TinyTextEncoder().eval()


def ambiguous_module() -> Any:
    """A two-headed image model: a grayscale depth-like image and a class map."""
    import torch

    class TwoHeads(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = torch.nn.Conv2d(3, 4, 1)

        def forward(self, image: Any) -> Any:
            h = self.conv(image)
            return torch.sigmoid(h[:, :1]), h.argmax(dim=1)[0].to(torch.int32)

    torch.manual_seed(1405)
    return TwoHeads().eval()


def _precision(ct: Any, precision: str) -> Any:
    if precision not in ("fp16", "fp32"):
        raise ValueError(f"precision must be fp16 or fp32, not {precision!r}")
    return ct.precision.FLOAT16 if precision == "fp16" else ct.precision.FLOAT32


def _image_type(ct: Any, size: int) -> Any:
    # Pixels 0..255 scaled to 0..1 by the ImageType: the program's first op, as Apple's exports do
    return ct.ImageType(name="image", shape=(1, 3, size, size), scale=1 / 255.0, color_layout=ct.colorlayout.RGB)


def _trace(module: Any, *examples: Any) -> Any:
    import torch

    with torch.no_grad():
        return torch.jit.trace(module, examples)


def _convert(kind: str, module: Any, example: Any, precision: str, *, inputs: list[Any], edit: Any = None,
             target: str = "iOS16", **options: Any) -> Path:
    """Trace `module` on `example`, convert it (cached under `kind`), let `edit(model)` add metadata, save."""

    def build(tmp: Path) -> None:
        import coremltools as ct

        with factory._quiet_loading():
            model = ct.convert(_trace(module, example), inputs=inputs, compute_precision=_precision(ct, precision),
                               minimum_deployment_target=getattr(ct.target, target), convert_to="mlprogram",
                               skip_model_load=True, **options)
        if edit is not None:
            edit(model)
        model.save(str(tmp / "model.mlpackage"))

    return factory.cached(kind, build, CODE, precision=precision) / "model.mlpackage"


def classifier(precision: str = "fp16") -> Path:
    """`FastViTT8F16.mlpackage`-shaped classifier (cached)."""
    import coremltools as ct
    import torch

    def edit(model: Any) -> None:
        model.short_description = "Tiny random-weight classifier with FastViT's I/O."

    return _convert("task-classifier", classifier_module(), torch.rand(1, 3, CLASSIFIER_SIZE, CLASSIFIER_SIZE),
                    precision, inputs=[_image_type(ct, CLASSIFIER_SIZE)],
                    classifier_config=ct.ClassifierConfig(list(CLASS_LABELS)), edit=edit)


def segmenter(precision: str = "fp32") -> Path:
    """`DETRResnet50SemanticSegmentation<F16|F32>.mlpackage`-shaped segmenter (cached)."""
    import coremltools as ct
    import numpy as np
    import torch

    def edit(model: Any) -> None:
        model.short_description = "Tiny random-weight semantic segmentation with DETR's I/O."
        model.user_defined_metadata[PREVIEW_KEY] = "imageSegmenter"
        model.user_defined_metadata[SEGMENTER_PARAMS_KEY] = json.dumps({"labels": list(SEGMENT_LABELS)})

    return _convert("task-segmenter", segmenter_module(), torch.rand(1, 3, SEGMENTER_SIZE, SEGMENTER_SIZE),
                    precision, inputs=[_image_type(ct, SEGMENTER_SIZE)],
                    outputs=[ct.TensorType(name="semanticPredictions", dtype=np.int32)], edit=edit)


def clip_image(precision: str = "fp32") -> Path:
    """`mobileclip_s0_image.mlpackage`-shaped image encoder (cached)."""
    import coremltools as ct
    import torch

    return _convert("task-clip-image", clip_image_module(), torch.rand(1, 3, CLIP_SIZE, CLIP_SIZE), precision,
                    inputs=[_image_type(ct, CLIP_SIZE)], outputs=[ct.TensorType(name="final_emb_1")])


def clip_text(precision: str = "fp32") -> Path:
    """`mobileclip_s0_text.mlpackage`-shaped text encoder (cached)."""
    import coremltools as ct
    import numpy as np
    import torch

    ids = torch.zeros((1, CLIP_LENGTH), dtype=torch.int32)
    ids[0, :3] = torch.tensor([CLIP_VOCAB - 2, 5, CLIP_VOCAB - 1])
    return _convert("task-clip-text", clip_text_module(), ids, precision,
                    inputs=[ct.TensorType(name="text", shape=(1, CLIP_LENGTH), dtype=np.int32)],
                    outputs=[ct.TensorType(name="final_emb_1")])


def ambiguous() -> Path:
    """A model two tasks fit equally (depth-estimation and image-segmentation) (cached)."""
    import coremltools as ct
    import numpy as np
    import torch

    return _convert("task-ambiguous", ambiguous_module(), torch.rand(1, 3, 8, 8), "fp32",
                    inputs=[ct.ImageType(name="image", shape=(1, 3, 8, 8), scale=1 / 255.0)],
                    outputs=[ct.ImageType(name="depth", color_layout=ct.colorlayout.GRAYSCALE_FLOAT16),
                             ct.TensorType(name="semanticPredictions", dtype=np.int32)], target="macOS14")


BUILDERS = ("classifier", "segmenter", "clip_image", "clip_text", "ambiguous")


__all__ = ["BUILDERS", "CLASSIFIER_SIZE", "CLASS_LABELS", "CLIP_DIM", "CLIP_LENGTH", "CLIP_SIZE", "CLIP_VOCAB",
           "SEGMENTER_SIZE", "SEGMENT_LABELS", "ambiguous", "classifier", "classifier_module", "clip_image",
           "clip_image_module", "clip_text", "clip_text_module", "segmenter", "segmenter_module"]
