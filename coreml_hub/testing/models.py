"""Tiny single models converted with coremltools (cached on disk), with the I/O of real Hub repos.

Plain Core ML repos hold one complete model per bundle. These builders give tiny,
random-weight stand-ins with the same input and output names and types:

- `depth(precision)`: Apple's Depth Anything export (apple/coreml-depth-anything-v2-small):
  an `image` input (ImageType, RGB, pixel values 0..255, ImageNet normalization inside the
  model) and a `depth` output (grayscale float16 image), normalized to [0, 1] by its maximum.
- `text_lm()`: the `exporters` text-generation export (coreml-projects/Llama-2-7b-chat-coreml):
  `input_ids` and `attention_mask` (int32, [1, SEQ]) in, `logits` ([1, SEQ, VOCAB]) out, with
  the `co.huggingface.exporters.*` metadata (`lm_models.exporters_lm`).

`bundle_files(bundle, name)` lists a bundle's files as repo paths for
`coreml_hub.testing.hubrepo.make_repo`. The torch module is returned by `depth_module()` so
outputs can be compared with the converted model.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from . import factory

CODE = ("testing/models.py",)
DEPTH_SIZE = (42, 28)  # (width, height): multiples of 14, like Apple's 518 x 392
SEQ = 32  # lm_models.SEQ
VOCAB = 192  # lm_models.VOCAB


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


def text_lm() -> Path:
    """`llama-2-7b-chat.mlpackage`-shaped package (cached): exporters' text-generation I/O and metadata
    (a tiny LlamaForCausalLM; see `coreml_hub.testing.lm_models.exporters_lm`)."""
    from .lm_models import exporters_lm

    return exporters_lm()


def bundle_files(bundle: Path, name: str) -> dict[str, bytes]:
    """{`<name>/<path inside the bundle>`: bytes} for every file of `bundle`."""
    bundle = Path(bundle)
    return {f"{name}/{p.relative_to(bundle).as_posix()}": p.read_bytes()
            for p in sorted(bundle.rglob("*")) if p.is_file()}


__all__ = ["DEPTH_SIZE", "SEQ", "VOCAB", "bundle_files", "depth", "depth_module", "text_lm"]
