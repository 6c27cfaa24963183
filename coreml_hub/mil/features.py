"""Model-level features around a program function: images in and out, classifier outputs,
optional inputs, and checking what a caller gives against what the model declares.

Images. An image input reaches the program as a float tensor `[1, C, H, W]` of pixel values
0-255 in the declared channel order (RGB or BGR, one channel for GRAYSCALE) or, for
GRAYSCALE_FLOAT16, the float values of a PIL "F" image as fp16; the program applies the
conversion's `scale` and `bias` itself (see `mil.spec`). An image output comes back as a
PIL image, as coremltools returns it: 8-bit RGB (channels reversed for BGR) or L, values
rounded and clipped to 0-255, and mode "F" for GRAYSCALE_FLOAT16.

Classifiers. coremltools ends a classifier's program with a `classify` op whose outputs are
the predicted label (a string or int64 scalar) and a dictionary label -> probability: values
no tensor runtime holds. The op is therefore taken out of the program before it is compiled
(`strip_classifiers`): the program returns the probabilities, and `ClassifierHead` builds
the label and the dictionary from them, in Python, with the op's own class list.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Mapping

import numpy as np

from ..errors import ModelInputError, UnsupportedOperation
from .program import Block, Function, ListValue, TensorValue
from .spec import FeatureDescription, ImageFormat

# numpy dtype kinds each MIL input type accepts without losing meaning
ACCEPTED_KINDS = {"fp16": "biuf", "fp32": "biuf", "fp64": "biuf", "int32": "biu", "int16": "biu", "int8": "biu",
                  "uint8": "bu", "uint16": "bu", "int64": "biu", "bool": "b"}
KIND_NAMES = {"f": "float", "i": "signed integer", "u": "unsigned integer", "b": "boolean", "c": "complex",
              "U": "string", "O": "object"}


# -- images -------------------------------------------------------------------------------


def is_pil_image(value: Any) -> bool:
    try:
        from PIL import Image
    except ImportError:  # pragma: no cover - Pillow is a dependency
        return False
    return isinstance(value, Image.Image)


def image_to_array(image: Any, feature: FeatureDescription, model_name: str) -> np.ndarray:
    """A PIL image as the `[1, C, H, W]` tensor the program takes (see the module docstring)."""
    fmt = feature.image
    assert fmt is not None
    width, height = image.size
    if not fmt.accepts(width, height):
        raise ModelInputError(
            f"{model_name}: image '{feature.name}' is {width}x{height}; the model takes {fmt.describe()} images.",
            hint="Resize the image to a size the model declares.")
    if fmt.color_layout == "GRAYSCALE_FLOAT16":
        pixels = np.asarray(image if image.mode == "F" else image.convert("F"), dtype=np.float32)
        return pixels.astype(np.float16)[None, None]
    if fmt.color_layout == "GRAYSCALE":
        pixels = np.asarray(image if image.mode == "L" else image.convert("L"), dtype=np.float32)
        return pixels[None, None]
    rgb = np.asarray(image if image.mode == "RGB" else image.convert("RGB"), dtype=np.float32)
    if fmt.color_layout == "BGR":
        rgb = rgb[..., ::-1]
    return np.ascontiguousarray(rgb.transpose(2, 0, 1))[None]


def array_to_image(array: np.ndarray, fmt: ImageFormat, name: str) -> Any:
    """An image output (`[1, C, H, W]`, `[C, H, W]` or `[H, W]`) as a PIL image."""
    from PIL import Image

    values = np.asarray(array)
    while values.ndim > 3 and values.shape[0] == 1:
        values = values[0]
    if fmt.channels == 1 and values.ndim == 3 and values.shape[0] == 1:
        values = values[0]
    if fmt.color_layout == "GRAYSCALE_FLOAT16":
        if values.ndim != 2:
            raise UnsupportedOperation(f"image output '{name}' has shape {list(array.shape)}, not one gray plane")
        return Image.fromarray(values.astype(np.float32), "F")
    pixels = np.clip(np.rint(values.astype(np.float32)), 0, 255).astype(np.uint8)
    if fmt.channels == 1:
        if pixels.ndim != 2:
            raise UnsupportedOperation(f"image output '{name}' has shape {list(array.shape)}, not one gray plane")
        return Image.fromarray(pixels, "L")
    if pixels.ndim != 3 or pixels.shape[0] != 3:
        raise UnsupportedOperation(f"image output '{name}' has shape {list(array.shape)}, not [1, 3, H, W]")
    if fmt.color_layout == "BGR":
        pixels = pixels[::-1]
    return Image.fromarray(np.ascontiguousarray(pixels.transpose(1, 2, 0)), "RGB")


# -- inputs -------------------------------------------------------------------------------


def as_array(value: Any) -> np.ndarray:
    """A caller's value (numpy, torch tensor, list, scalar) as a numpy array."""
    if isinstance(value, np.ndarray):
        return value
    if hasattr(value, "detach") and hasattr(value, "cpu"):  # a torch tensor, without importing torch
        return value.detach().cpu().numpy()
    return np.asarray(value)


def prepare_inputs(given: Mapping[str, Any], features: tuple[FeatureDescription, ...],
                   model_name: str) -> dict[str, np.ndarray]:
    """Check the caller's inputs against the declared ones and turn them into arrays.

    PIL images become the tensors their image inputs take; missing optional inputs get
    their declared default. Raises one ModelInputError naming every problem found.
    """
    declared = {f.name: f for f in features}
    problems: list[str] = []
    unknown = sorted(set(given) - set(declared))
    if unknown:
        problems.append(f"unknown input(s): {', '.join(unknown)}")
    missing = [f.name for f in features if f.name not in given and not (f.optional and _has_default(f))]
    if missing:
        problems.append(f"missing input(s): {', '.join(missing)}")
        unknown_defaults = [f.name for f in features if f.name in missing and f.optional]
        if unknown_defaults:
            # a compiled bundle keeps the defaults in coremldata.bin (Apple-private), not metadata.json
            problems.append(f"{', '.join(unknown_defaults)} is optional, but the bundle does not say its default "
                            "in a form coreml-hub reads (a .mlpackage does); pass it")
    arrays: dict[str, np.ndarray] = {}
    for feature in features:
        if feature.name not in given:
            if feature.optional and _has_default(feature):
                arrays[feature.name] = default_value(feature)
            continue
        value = given[feature.name]
        if feature.kind == "image" and is_pil_image(value):
            arrays[feature.name] = image_to_array(value, feature, model_name)
            continue
        if is_pil_image(value):
            problems.append(f"'{feature.name}' is an image, the model takes {feature.declared()}")
            continue
        array = as_array(value)
        problem = check_array(array, feature)
        if problem:
            problems.append(problem)
        else:
            arrays[feature.name] = array
    if problems:
        raise ModelInputError(f"{model_name}: " + "; ".join(problems), hint="The model takes: " + "; ".join(
            f"{f.name} {f.declared()}{' (optional)' if f.optional else ''}" for f in features) + ".")
    return arrays


def check_array(array: Any, feature: FeatureDescription, shape: tuple[int, ...] | None = None,
                kind: str | None = None) -> str | None:
    """What is wrong with `array` as `feature`, or None (`shape`/`kind` for non-numpy values)."""
    shape = tuple(array.shape) if shape is None else shape
    kind = array.dtype.kind if kind is None else kind
    if feature.kind == "image":
        expected = feature.shape
        fmt = feature.image
        if len(shape) != 4 or shape[:2] != (1, fmt.channels if fmt else shape[1]) or (
                fmt is not None and not fmt.accepts(shape[3], shape[2])):
            if expected is not None and shape == expected:
                return None
            return (f"'{feature.name}' has shape {list(shape)}, the model takes {feature.declared()} "
                    "(a PIL image, or an array [1, C, H, W])")
    elif not feature.accepts_shape(shape):
        return f"'{feature.name}' has shape {list(shape)}, the model takes {feature.declared_shape()}"
    if kind not in ACCEPTED_KINDS.get(feature.dtype, "biuf"):
        return f"'{feature.name}' has a {KIND_NAMES.get(kind, kind)} type, the model takes {feature.dtype}"
    return None


def _has_default(feature: FeatureDescription) -> bool:
    return feature.default is not None and feature.default_shape is not None


def default_value(feature: FeatureDescription) -> np.ndarray:
    """An optional input's declared default: its default shape filled with the default value."""
    assert feature.default_shape is not None and feature.default is not None
    return np.full(feature.default_shape, feature.default, dtype=feature.numpy_dtype)


# -- classifiers --------------------------------------------------------------------------


@dataclass(frozen=True)
class ClassifierHead:
    """A `classify` op taken out of the program: where its probabilities come from, its classes."""

    label_output: str
    probabilities_output: str  # the name the dictionary is returned under
    probabilities_var: str  # the program value holding the probabilities
    classes: tuple[Any, ...]  # str or int labels, in the order of the probabilities

    def outputs(self, probabilities: np.ndarray) -> dict[str, Any]:
        """{label_output: the most probable class, probabilities_output: {class: probability}}."""
        values = np.asarray(probabilities, dtype=np.float64)
        while values.ndim > 1 and values.shape[0] == 1:
            values = values[0]
        if values.ndim != 1 or values.shape[0] != len(self.classes):
            raise UnsupportedOperation(
                f"classify: {len(self.classes)} classes but probabilities of shape {list(np.shape(probabilities))}")
        probs = {label: float(p) for label, p in zip(self.classes, values)}
        return {self.label_output: self.classes[int(np.argmax(values))], self.probabilities_output: probs}

    def top(self, probabilities: Mapping[Any, float], k: int = 5) -> list[tuple[Any, float]]:
        return sorted(probabilities.items(), key=lambda kv: -kv[1])[:k]


def strip_classifiers(fn: Function) -> tuple[Function, tuple[ClassifierHead, ...]]:
    """`fn` without its `classify` ops, returning their probabilities instead (module docstring)."""
    found = [op for op in fn.block.operations if op.type == "classify"]
    if not found:
        if any(op.type == "classify" for op in fn.block.walk()):
            raise UnsupportedOperation(f"function {fn.name}: a classify op inside control flow is not supported")
        return fn, ()
    consts = {op.outputs[0].name: op.attributes.get("val") for op in fn.block.operations if op.type == "const"}
    heads: list[ClassifierHead] = []
    renames: dict[str, str] = {}
    for op in found:
        probabilities = op.inputs.get("probabilities")
        if not isinstance(probabilities, str) or len(op.outputs) != 2:
            raise UnsupportedOperation(f"function {fn.name}: classify op {op.name!r} is not in the form coremltools writes")
        classes = _classes(op.inputs.get("classes"), consts)
        label, probs = op.outputs[0].name, op.outputs[1].name
        heads.append(ClassifierHead(label, probs, probabilities, classes))
        renames[label] = renames[probs] = probabilities
    kept = [op for op in fn.block.operations if op.type != "classify"]
    readers = {name for op in kept for name in op.input_names()}
    if readers & set(renames):
        raise UnsupportedOperation(f"function {fn.name}: a classify op's outputs are read by other ops")
    outputs: list[str] = []
    for name in fn.block.outputs:
        target = renames.get(name, name)
        if target not in outputs:
            outputs.append(target)
    block = Block(kept, tuple(outputs), fn.block.inputs)
    return replace(fn, block=block), tuple(heads)


def _classes(arg: Any, consts: dict[str, Any]) -> tuple[Any, ...]:
    value = consts.get(arg) if isinstance(arg, str) else arg
    if isinstance(value, ListValue):
        items = [item.array() if isinstance(item, TensorValue) else item for item in value.items]
        return tuple(_plain(np.asarray(i).item()) for i in items)
    if isinstance(value, TensorValue):
        return tuple(_plain(v) for v in np.asarray(value.array()).reshape(-1).tolist())
    raise UnsupportedOperation("classify: the classes are not a constant list")


def _plain(value: Any) -> Any:
    if isinstance(value, bytes):
        return value.decode()
    if isinstance(value, (np.integer,)):
        return int(value)
    return value
