"""Small Core ML models, one per model-level feature, converted with real coremltools and cached.

`package(name)` gives the `.mlpackage` of a model (converted once, kept in the test cache
keyed by this file's source, the coremltools/torch versions and the name); `compiled(name)`
the same model as a `.mlmodelc` test fixture (`coreml_hub.testing.compiled`); `reference(name)`
the torch module it was converted from, with the very weights of the conversion. The
feature each model shows:

| name | what |
|---|---|
| image_rgb, image_bgr, image_gray, image_gray16 | ImageType input of each color layout, with scale and per-channel bias |
| image_flexible, image_enumerated | an RGB image input with a size range / enumerated sizes |
| image_outputs | RGB, BGR, GRAYSCALE and GRAYSCALE_FLOAT16 image outputs |
| classifier, classifier_int | ClassifierConfig with string / int64 labels, plus metadata and descriptions |
| range_dim, enumerated_shapes | RangeDim / EnumeratedShapes array inputs |
| multifunction | two functions (`double`, `shift`), `shift` the default |
| accumulator | a state that adds each input (iOS 18) |
| kv_cache | one attention step over key/value cache states, written at a position |
| optional | optional inputs with defaults (a MIL builder program, iOS 17) |
| neural_network, nn_pipeline | a NeuralNetwork model and a pipeline of two (`.mlmodel`), which the runtime refuses |
"""

from __future__ import annotations

import contextlib
import io
import logging
import warnings
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np

from . import factory

CODE = ("testing/feature_models.py",)
CODE_COMPILED = CODE + ("testing/compiled.py", "mil/text.py", "mil/blob.py", "mil/proto.py", "mil/program.py")

# ImageType settings per color layout: (scale, bias)
IMAGE_LAYOUTS = {
    "image_rgb": ("RGB", 1 / 255, [-0.5, -0.25, 0.125]),
    "image_bgr": ("BGR", 2 / 255, [-1.0, -0.5, 0.5]),
    "image_gray": ("GRAYSCALE", 1 / 127.5, [-1.0]),
    "image_gray16": ("GRAYSCALE_FLOAT16", 0.5, [0.25]),
}
IMAGE_SIZE = (8, 8)  # height, width of the fixed-size image inputs
FLEX_SIZES = ((8, 8), (16, 12))  # enumerated image sizes as (height, width)
CLASS_LABELS = ("cat", "dog", "bird", "fish", "frog", "horse")
INT_LABELS = (3, 14, 15, 92, 65)
METADATA = {"author": "coreml-hub tests", "license": "Apache-2.0", "version": "1.2.3",
            "short_description": "A tiny classifier of six animals.",
            "user_defined": {"com.example.purpose": "testing", "com.example.classes": "6"}}
KV_LENGTH, KV_WIDTH = 6, 8
NAMES = ("image_rgb", "image_bgr", "image_gray", "image_gray16", "image_flexible", "image_enumerated",
         "image_outputs", "classifier", "classifier_int", "range_dim", "enumerated_shapes", "multifunction",
         "accumulator", "kv_cache", "optional", "neural_network", "nn_pipeline")


def package(name: str) -> Path:
    """The converted model `name` (a `.mlpackage`, or a `.mlmodel` file for the NeuralNetwork ones)."""
    if name not in NAMES:
        raise KeyError(f"no feature model {name!r}; known: {', '.join(NAMES)}")
    entry = factory.cached("feature", lambda tmp: _build(name, tmp), code=CODE, name=name)
    return next(p for p in sorted(entry.iterdir()) if p.suffix in (".mlpackage", ".mlmodel"))


def compiled(name: str) -> Path:
    """Model `name` as a compiled `.mlmodelc` test fixture (model.mil, weights, metadata.json)."""
    from .compiled import build_mlmodelc

    source = package(name)
    entry = factory.cached("feature-compiled", lambda tmp: build_mlmodelc(source, tmp / f"{name}.mlmodelc"),
                           code=CODE_COMPILED, name=name)
    return entry / f"{name}.mlmodelc"


def reference(name: str) -> Any:
    """The torch module model `name` was converted from, with the conversion's weights (eval mode)."""
    import torch

    package(name)  # the weights are saved next to the package
    entry = factory.cached("feature", lambda tmp: _build(name, tmp), code=CODE, name=name)
    module = _MODULES[name]()
    module.load_state_dict(torch.load(entry / "reference.pt", weights_only=True))
    return module.eval()


# -- the torch modules -------------------------------------------------------------------


def _modules() -> dict[str, Callable[[], Any]]:
    import torch
    from torch import nn

    class ImageHead(nn.Module):
        """conv 1x1 -> relu -> per-channel spatial mean: any image size, exact in fp32."""

        def __init__(self, channels: int) -> None:
            super().__init__()
            self.conv = nn.Conv2d(channels, 4, 1)

        def forward(self, image: torch.Tensor) -> torch.Tensor:
            return torch.relu(self.conv(image)).mean(dim=(2, 3))

    class ImageMaker(nn.Module):
        """One input array -> four image-like outputs in [0, 255] (and beyond, to test clipping)."""

        def __init__(self) -> None:
            super().__init__()
            self.mix = nn.Conv2d(3, 3, 1)
            self.gray = nn.Conv2d(3, 1, 1)

        def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
            color = torch.sigmoid(self.mix(x)) * 300 - 20
            gray = torch.sigmoid(self.gray(x)) * 255
            return color, color.flip(1), gray, self.gray(x) * 0.5

    class Classifier(nn.Module):
        def __init__(self, classes: int) -> None:
            super().__init__()
            self.fc = nn.Linear(10, classes)

        def forward(self, features: torch.Tensor) -> torch.Tensor:
            return torch.softmax(self.fc(features), dim=-1)

    class Rows(nn.Module):
        """A linear layer over the last axis of [B, N, 8]; B and N may vary."""

        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(8, 4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.tanh(self.fc(x))

    class Double(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x * 2

    class Shift(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(4, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc(x) + 1

    class Accumulator(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.register_buffer("total", torch.zeros(1, 4))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            self.total.add_(x)
            return self.total * 1.0

    class KVCacheAttention(nn.Module):
        """One token of single-head attention: write k, v at `pos` into the caches, attend to 0..pos."""

        def __init__(self) -> None:
            super().__init__()
            self.q, self.k, self.v = (nn.Linear(KV_WIDTH, KV_WIDTH) for _ in range(3))
            self.register_buffer("k_cache", torch.zeros(1, KV_LENGTH, KV_WIDTH))
            self.register_buffer("v_cache", torch.zeros(1, KV_LENGTH, KV_WIDTH))

        def forward(self, x: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
            p = pos[0]
            self.k_cache[:, p:p + 1, :] = self.k(x)
            self.v_cache[:, p:p + 1, :] = self.v(x)
            mask = (torch.arange(KV_LENGTH) > p).float() * -1e4
            scores = self.q(x) @ self.k_cache.transpose(1, 2) / KV_WIDTH ** 0.5 + mask
            return scores.softmax(-1) @ self.v_cache

    class Nothing(nn.Module):  # the builder-program and NeuralNetwork models keep no torch weights
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x

    class Pair(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.doubler, self.shifter = Double(), Shift()  # (nn.Module has a method named double)

    modules: dict[str, Callable[[], Any]] = {
        "image_rgb": lambda: ImageHead(3), "image_bgr": lambda: ImageHead(3), "image_gray": lambda: ImageHead(1),
        "image_gray16": lambda: ImageHead(1), "image_flexible": lambda: ImageHead(3),
        "image_enumerated": lambda: ImageHead(3), "image_outputs": ImageMaker,
        "classifier": lambda: Classifier(len(CLASS_LABELS)), "classifier_int": lambda: Classifier(len(INT_LABELS)),
        "range_dim": Rows, "enumerated_shapes": Rows, "multifunction": Pair, "accumulator": Accumulator,
        "kv_cache": KVCacheAttention, "optional": Nothing, "neural_network": Rows, "nn_pipeline": Rows,
    }
    return modules


class _LazyModules(dict):
    def __missing__(self, key: str) -> Callable[[], Any]:
        self.update(_modules())
        return dict.__getitem__(self, key)


_MODULES: dict[str, Callable[[], Any]] = _LazyModules()


# -- converting ---------------------------------------------------------------------------


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """coremltools' progress bars and warnings stay out of the test output."""
    with warnings.catch_warnings(), contextlib.redirect_stderr(io.StringIO()):
        warnings.simplefilter("ignore")
        level = logging.getLogger("coremltools").level
        logging.getLogger("coremltools").setLevel(logging.ERROR)
        try:
            yield
        finally:
            logging.getLogger("coremltools").setLevel(level)


def _build(name: str, tmp: Path) -> None:
    import torch

    torch.manual_seed(sum(name.encode()))
    module = _MODULES[name]().eval()
    with _quiet():
        _BUILDERS[name](name, module, tmp)
    torch.save(module.state_dict(), tmp / "reference.pt")


def _trace(module: Any, *examples: Any) -> Any:
    import torch

    with torch.no_grad():
        return torch.jit.trace(module, examples)


def _image_input(name: str, module: Any, tmp: Path) -> None:
    import coremltools as ct
    import torch

    layout, scale, bias = IMAGE_LAYOUTS[name]
    channels = 3 if layout in ("RGB", "BGR") else 1
    h, w = IMAGE_SIZE
    model = ct.convert(
        _trace(module, torch.rand(1, channels, h, w)),
        inputs=[ct.ImageType(name="image", shape=(1, channels, h, w), scale=scale, bias=bias,
                             color_layout=getattr(ct.colorlayout, layout))],
        outputs=[ct.TensorType(name="features")],
        compute_precision=ct.precision.FLOAT32, minimum_deployment_target=ct.target.iOS16)
    model.save(str(tmp / f"{name}.mlpackage"))


def _image_flexible(name: str, module: Any, tmp: Path) -> None:
    import coremltools as ct
    import torch

    if name == "image_flexible":
        shape: Any = ct.Shape((1, 3, ct.RangeDim(4, 16, default=8), ct.RangeDim(4, 32, default=8)))
    else:
        shape = ct.EnumeratedShapes(shapes=[(1, 3, h, w) for h, w in FLEX_SIZES], default=(1, 3, *FLEX_SIZES[0]))
    model = ct.convert(
        _trace(module, torch.rand(1, 3, 8, 8)),
        inputs=[ct.ImageType(name="image", shape=shape, scale=1 / 255, bias=[0.0, -0.5, 0.5],
                             color_layout=ct.colorlayout.RGB)],
        outputs=[ct.TensorType(name="features")],
        compute_precision=ct.precision.FLOAT32, minimum_deployment_target=ct.target.iOS16)
    model.save(str(tmp / f"{name}.mlpackage"))


def _image_outputs(name: str, module: Any, tmp: Path) -> None:
    import coremltools as ct
    import torch

    model = ct.convert(
        _trace(module, torch.rand(1, 3, *IMAGE_SIZE)),
        inputs=[ct.TensorType(name="x", shape=(1, 3, *IMAGE_SIZE))],
        outputs=[ct.ImageType(name="rgb", color_layout=ct.colorlayout.RGB),
                 ct.ImageType(name="bgr", color_layout=ct.colorlayout.BGR),
                 ct.ImageType(name="gray", color_layout=ct.colorlayout.GRAYSCALE),
                 ct.ImageType(name="gray16", color_layout=ct.colorlayout.GRAYSCALE_FLOAT16)],
        compute_precision=ct.precision.FLOAT32, minimum_deployment_target=ct.target.iOS16)
    model.save(str(tmp / f"{name}.mlpackage"))


def _classifier(name: str, module: Any, tmp: Path) -> None:
    import coremltools as ct
    import torch

    labels = list(CLASS_LABELS if name == "classifier" else INT_LABELS)
    model = ct.convert(
        _trace(module, torch.rand(1, 10)),
        inputs=[ct.TensorType(name="features", shape=(1, 10))],
        classifier_config=ct.ClassifierConfig(labels),
        compute_precision=ct.precision.FLOAT32, minimum_deployment_target=ct.target.iOS16)
    if name == "classifier":
        model.author = METADATA["author"]
        model.license = METADATA["license"]
        model.version = METADATA["version"]
        model.short_description = METADATA["short_description"]
        model.user_defined_metadata.update(METADATA["user_defined"])
        model.input_description["features"] = "Ten numbers describing an animal."
        model.output_description["classLabel"] = "The most likely animal."
    model.save(str(tmp / f"{name}.mlpackage"))


def _flexible_array(name: str, module: Any, tmp: Path) -> None:
    import coremltools as ct
    import torch

    if name == "range_dim":
        shape: Any = (1, ct.RangeDim(1, 16, default=3), 8)
    else:
        shape = ct.EnumeratedShapes(shapes=[(1, 3, 8), (1, 5, 8), (2, 4, 8)], default=(1, 3, 8))
    model = ct.convert(
        _trace(module, torch.rand(1, 3, 8)),
        inputs=[ct.TensorType(name="x", shape=shape)],
        outputs=[ct.TensorType(name="y")],
        compute_precision=ct.precision.FLOAT32, minimum_deployment_target=ct.target.iOS16)
    model.save(str(tmp / f"{name}.mlpackage"))


def _multifunction(name: str, module: Any, tmp: Path) -> None:
    import coremltools as ct
    import torch

    parts = tmp / "parts"
    parts.mkdir()
    for part, example in (("double", torch.rand(2, 3)), ("shift", torch.rand(1, 4))):
        model = ct.convert(
            _trace(module.doubler if part == "double" else module.shifter, example),
            inputs=[ct.TensorType(name="x", shape=tuple(example.shape))], outputs=[ct.TensorType(name="y")],
            compute_precision=ct.precision.FLOAT32, minimum_deployment_target=ct.target.iOS16)
        model.save(str(parts / f"{part}.mlpackage"))
    desc = ct.utils.MultiFunctionDescriptor()
    desc.add_function(str(parts / "double.mlpackage"), src_function_name="main", target_function_name="double")
    desc.add_function(str(parts / "shift.mlpackage"), src_function_name="main", target_function_name="shift")
    desc.default_function_name = "shift"
    ct.utils.save_multifunction(desc, str(tmp / f"{name}.mlpackage"))
    import shutil

    shutil.rmtree(parts)


def _stateful(name: str, module: Any, tmp: Path) -> None:
    import coremltools as ct
    import torch

    if name == "accumulator":
        example: tuple[Any, ...] = (torch.rand(1, 4),)
        inputs = [ct.TensorType(name="x", shape=(1, 4))]
        states = [ct.StateType(wrapped_type=ct.TensorType(shape=(1, 4)), name="total")]
        outputs = [ct.TensorType(name="total_out")]
    else:
        example = (torch.rand(1, 1, KV_WIDTH), torch.tensor([0], dtype=torch.int32))
        inputs = [ct.TensorType(name="x", shape=(1, 1, KV_WIDTH)), ct.TensorType(name="pos", shape=(1,), dtype=np.int32)]
        states = [ct.StateType(wrapped_type=ct.TensorType(shape=(1, KV_LENGTH, KV_WIDTH)), name=n)
                  for n in ("k_cache", "v_cache")]
        outputs = [ct.TensorType(name="y")]
    traced = _trace(module, *example)
    module.load_state_dict({k: v * 0 if k.endswith(("cache", "total")) else v for k, v in module.state_dict().items()})
    model = ct.convert(traced, inputs=inputs, outputs=outputs, states=states,
                       minimum_deployment_target=ct.target.iOS18)  # states are fp16: Core ML's requirement
    model.save(str(tmp / f"{name}.mlpackage"))


def _optional(name: str, module: Any, tmp: Path) -> None:
    import coremltools as ct
    from coremltools.converters.mil import Builder as mb
    from coremltools.converters.mil.mil import types

    @mb.program(input_specs=[mb.TensorSpec(shape=(2, 3)), mb.TensorSpec(shape=(2, 3)),
                             mb.TensorSpec(shape=(2, 3), dtype=types.int32)], opset_version=ct.target.iOS17)
    def program(x: Any, scale: Any, offset: Any) -> Any:
        return mb.add(x=mb.mul(x=x, y=scale), y=mb.cast(x=offset, dtype="fp32"), name="y")

    model = ct.convert(
        program,
        inputs=[ct.TensorType(name="x", shape=(2, 3)),
                ct.TensorType(name="scale", shape=(2, 3), default_value=np.full((2, 3), 0.5, np.float32)),
                ct.TensorType(name="offset", shape=(2, 3), dtype=np.int32,
                              default_value=np.full((2, 3), 3, np.int32))],
        compute_precision=ct.precision.FLOAT32, minimum_deployment_target=ct.target.iOS17)
    model.save(str(tmp / f"{name}.mlpackage"))


def _neural_network(name: str, module: Any, tmp: Path) -> None:
    import coremltools as ct
    import torch

    nn_model = ct.convert(_trace(module, torch.rand(1, 3, 8)), inputs=[ct.TensorType(name="x", shape=(1, 3, 8))],
                          outputs=[ct.TensorType(name="y")], convert_to="neuralnetwork")
    if name == "neural_network":
        nn_model.save(str(tmp / f"{name}.mlmodel"))
        return
    from coremltools.models import datatypes
    from coremltools.models.pipeline import Pipeline

    first = nn_model.get_spec()
    second = nn_model.get_spec()
    ct.utils.rename_feature(second, "x", "y_in")  # the second model reads the first one's output
    ct.utils.rename_feature(second, "y", "z")
    ct.utils.rename_feature(second, "y_in", "y")
    pipeline = Pipeline(input_features=[("x", datatypes.Array(1, 3, 8))], output_features=[("z", datatypes.Array(1, 3, 4))])
    pipeline.add_model(first)
    pipeline.add_model(second)
    ct.models.MLModel(pipeline.spec, skip_model_load=True).save(str(tmp / f"{name}.mlmodel"))


_BUILDERS: dict[str, Callable[[str, Any, Path], None]] = {
    **dict.fromkeys(IMAGE_LAYOUTS, _image_input),
    "image_flexible": _image_flexible, "image_enumerated": _image_flexible, "image_outputs": _image_outputs,
    "classifier": _classifier, "classifier_int": _classifier, "range_dim": _flexible_array,
    "enumerated_shapes": _flexible_array, "multifunction": _multifunction, "accumulator": _stateful,
    "kv_cache": _stateful, "optional": _optional, "neural_network": _neural_network, "nn_pipeline": _neural_network,
}
