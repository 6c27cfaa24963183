"""Tiny single models converted with coremltools (cached on disk), with the I/O of real Hub repos.

Plain Core ML repos hold one complete model per bundle. These builders give tiny,
random-weight stand-ins with the same input and output names and types:

- `depth(precision)`: Apple's Depth Anything export (apple/coreml-depth-anything-v2-small):
  an `image` input (ImageType, RGB, pixel values 0..255, ImageNet normalization inside the
  model) and a `depth` output (grayscale float16 image), normalized to [0, 1] by its maximum.
- `text_lm()`: the `exporters` text-generation export (coreml-projects/Llama-2-7b-chat-coreml):
  `input_ids` and `attention_mask` (int32, [1, SEQ]) in, `logits` ([1, SEQ, VOCAB]) out, with
  the `co.huggingface.exporters.*` metadata.

`bundle_files(bundle, name)` lists a bundle's files as repo paths for
`coreml_hub.testing.hubrepo.make_repo`. The torch modules are returned by `depth_module()` and
`text_lm_module()` so outputs can be compared with the converted models.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from . import factory

CODE = ("testing/models.py",)
DEPTH_SIZE = (42, 28)  # (width, height): multiples of 14, like Apple's 518 x 392
SEQ = 8
VOCAB = 32
LM_SOURCE = "coreml-projects/tiny-llama-coreml-source"  # what co.huggingface.exporters.name names


def depth_module() -> Any:
    """The tiny depth estimator (deterministic random weights), pixels in [0, 255] in, [0, 1] depth out."""
    import torch

    class TinyDepth(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = torch.nn.Conv2d(3, 4, 3, padding=1)
            self.head = torch.nn.Conv2d(4, 1, 1)
            self.register_buffer("mean", torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1) * 255)
            self.register_buffer("std", torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1) * 255)

        def forward(self, pixels: Any) -> Any:
            x = (pixels - self.mean) / self.std
            depth = torch.relu(self.head(torch.relu(self.conv(x)))) + 1e-3
            return depth / depth.max()

    torch.manual_seed(14)
    return TinyDepth().eval()


def depth(precision: str = "fp16") -> Path:
    """`DepthAnything...<F16|F32>.mlpackage`-shaped package (cached); returns the .mlpackage folder."""
    if precision not in ("fp16", "fp32"):
        raise ValueError(f"precision must be fp16 or fp32, not {precision!r}")

    def build(tmp: Path) -> None:
        import coremltools as ct
        import torch

        module = depth_module()
        width, height = DEPTH_SIZE
        example = torch.rand(1, 3, height, width) * 255
        traced = torch.jit.trace(module, example)
        with factory._quiet_loading():
            model = ct.convert(
                traced,
                inputs=[ct.ImageType(name="image", shape=example.shape)],
                outputs=[ct.ImageType(name="depth", color_layout=ct.colorlayout.GRAYSCALE_FLOAT16)],
                minimum_deployment_target=ct.target.macOS14,
                compute_precision=ct.precision.FLOAT16 if precision == "fp16" else ct.precision.FLOAT32,
                convert_to="mlprogram",
                skip_model_load=True,
            )
        model.short_description = "Tiny random-weight depth estimator with Depth Anything's I/O."
        model.user_defined_metadata["com.apple.coreml.model.preview.type"] = "depthEstimation"
        model.save(str(tmp / "model.mlpackage"))

    return factory.cached("depth", build, CODE, precision=precision) / "model.mlpackage"


def text_lm_module() -> Any:
    """The tiny causal LM: embedding, one causal self-attention mixing step, and a vocabulary head."""
    import torch

    class TinyLM(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed = torch.nn.Embedding(VOCAB, 16)
            self.mix = torch.nn.Linear(16, 16)
            self.head = torch.nn.Linear(16, VOCAB)

        def forward(self, input_ids: Any, attention_mask: Any) -> Any:
            h = self.embed(input_ids)
            causal = torch.tril(torch.ones(input_ids.shape[-1], input_ids.shape[-1]))
            weights = causal * attention_mask.unsqueeze(1).to(h.dtype)
            weights = weights / weights.sum(-1, keepdim=True).clamp(min=1.0)
            h = h + torch.tanh(self.mix(weights @ h))
            return self.head(h)

    torch.manual_seed(7)
    return TinyLM().eval()


def text_lm() -> Path:
    """`llama-2-7b-chat.mlpackage`-shaped package (cached): exporters' text-generation I/O and metadata."""

    def build(tmp: Path) -> None:
        import coremltools as ct
        import numpy as np
        import torch

        module = text_lm_module()
        ids = torch.zeros((1, SEQ), dtype=torch.int32)
        mask = torch.ones((1, SEQ), dtype=torch.int32)
        traced = torch.jit.trace(module, (ids, mask))
        with factory._quiet_loading():
            model = ct.convert(
                traced,
                inputs=[ct.TensorType(name="input_ids", shape=(1, SEQ), dtype=np.int32),
                        ct.TensorType(name="attention_mask", shape=(1, SEQ), dtype=np.int32)],
                outputs=[ct.TensorType(name="logits")],
                minimum_deployment_target=ct.target.macOS13,
                compute_precision=ct.precision.FLOAT16,
                convert_to="mlprogram",
                skip_model_load=True,
            )
        model.user_defined_metadata.update({
            "co.huggingface.exporters.name": LM_SOURCE,
            "co.huggingface.exporters.task": "text-generation",
            "co.huggingface.exporters.architecture": "LlamaForCausalLM",
            "co.huggingface.exporters.framework": "pytorch",
            "co.huggingface.exporters.precision": "float16",
        })
        model.save(str(tmp / "model.mlpackage"))

    return factory.cached("text-lm", build, CODE, seq=SEQ, vocab=VOCAB) / "model.mlpackage"


def bundle_files(bundle: Path, name: str) -> dict[str, bytes]:
    """{`<name>/<path inside the bundle>`: bytes} for every file of `bundle`."""
    bundle = Path(bundle)
    return {f"{name}/{p.relative_to(bundle).as_posix()}": p.read_bytes()
            for p in sorted(bundle.rglob("*")) if p.is_file()}


__all__ = ["DEPTH_SIZE", "LM_SOURCE", "SEQ", "VOCAB", "bundle_files", "depth", "depth_module", "text_lm",
           "text_lm_module"]
