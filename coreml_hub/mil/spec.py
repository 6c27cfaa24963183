"""What a Core ML model declares about itself, from either file format.

A `.mlpackage` declares it in the protobuf spec (`Model.description`); a compiled
`.mlmodelc` in `metadata.json`, which Apple's compiler writes from the same description
(`inputSchema`, `outputSchema`, `stateSchema`: one object of strings per feature, the
fields of Core ML's `FeatureType::toDictionary`). Both give the same `ModelSpec`: the kind
of model, its functions with their inputs, outputs and states (image formats, flexible
shapes, optional inputs with their defaults, descriptions), the default function and the
metadata (author, license, version, short description, user-defined entries).

Image preprocessing is not part of the description of an ML Program: coremltools writes
an image's `scale`, per-channel `bias` and a channel-last layout as `mul`, `add` and
`transpose` ops right after the input, so the program itself applies them. The
description only says which color layout and which sizes an image input or output has.
Classifier labels likewise live in the program (the `classify` op's `classes`), see
`mil.features`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import InvalidBundle, UnsupportedModel
from .program import DictType, Function, StateType, TensorType

COLOR_LAYOUTS = ("RGB", "BGR", "GRAYSCALE", "GRAYSCALE_FLOAT16")

NUMPY_TYPES = {
    "fp16": np.float16, "fp32": np.float32, "fp64": np.float64, "int8": np.int8, "uint8": np.uint8,
    "int16": np.int16, "uint16": np.uint16, "int32": np.int32, "uint32": np.uint32, "int64": np.int64,
    "bool": np.bool_,
}
# FeatureTypes.proto ArrayDataType -> MIL dtype; metadata.json spells the same types as words
_PROTO_ARRAY_TYPES = {65552: "fp16", 65568: "fp32", 65600: "fp64", 131104: "int32", 131080: "int8"}
_SCHEMA_ARRAY_TYPES = {"float16": "fp16", "float32": "fp32", "double": "fp64", "float64": "fp64",
                       "int32": "int32", "int8": "int8"}
_SCHEMA_KINDS = {"multiarray": "array", "image": "image", "string": "string", "int64": "int64",
                 "double": "double", "dictionary": "dict", "sequence": "sequence", "state": "state"}
_PROTO_KINDS = {"multiArrayType": "array", "imageType": "image", "stringType": "string", "int64Type": "int64",
                "doubleType": "double", "dictionaryType": "dict", "sequenceType": "sequence", "stateType": "state"}
_PROTO_COLORS = {10: "GRAYSCALE", 20: "RGB", 30: "BGR", 40: "GRAYSCALE_FLOAT16"}


@dataclass(frozen=True)
class ImageFormat:
    """An image input or output: color layout and the sizes it may have (width x height)."""

    color_layout: str  # one of COLOR_LAYOUTS
    width: int  # the default size
    height: int
    sizes: tuple[tuple[int, int], ...] = ()  # enumerated (width, height) sizes, when flexible
    width_range: tuple[int, int] | None = None  # (lower, upper); upper -1 means unbounded
    height_range: tuple[int, int] | None = None

    @property
    def channels(self) -> int:
        return 3 if self.color_layout in ("RGB", "BGR") else 1

    @property
    def pil_mode(self) -> str:
        """The PIL mode coremltools expects: RGB for color, L for 8-bit gray, F for float16 gray."""
        return {"RGB": "RGB", "BGR": "RGB", "GRAYSCALE": "L"}.get(self.color_layout, "F")

    @property
    def flexible(self) -> bool:
        return bool(self.sizes) or self.width_range is not None

    def accepts(self, width: int, height: int) -> bool:
        if self.sizes:
            return (width, height) in self.sizes
        if self.width_range is not None and self.height_range is not None:
            return _in_range(width, self.width_range) and _in_range(height, self.height_range)
        return (width, height) == (self.width, self.height)

    def describe(self) -> str:
        """`RGB 224x224`, `RGB 64..512 x 64..512`, `GRAYSCALE one of 8x8, 16x16`."""
        if self.sizes:
            return f"{self.color_layout} one of " + ", ".join(f"{w}x{h}" for w, h in self.sizes)
        if self.width_range is not None and self.height_range is not None:
            return f"{self.color_layout} {_range_text(self.width_range)} x {_range_text(self.height_range)}"
        return f"{self.color_layout} {self.width}x{self.height}"

    def to_dict(self) -> dict[str, Any]:
        return {"color_layout": self.color_layout, "width": self.width, "height": self.height,
                "sizes": [list(s) for s in self.sizes] or None,
                "width_range": list(self.width_range) if self.width_range else None,
                "height_range": list(self.height_range) if self.height_range else None}


@dataclass(frozen=True)
class FeatureDescription:
    """One input, output or state of a model function.

    `shape` is the fixed shape, None where the shape is flexible or unknown; a flexible
    array lists its `shapes` (enumerated) or `ranges` (lower, upper per dimension; upper -1
    is unbounded) and its `default_shape`. `dtype` is the MIL type of the values
    ("fp16", "fp32", "int32", ...; "string" and "dict" for a classifier's outputs).
    """

    name: str
    shape: tuple[int, ...] | None
    dtype: str
    kind: str = "array"  # array, image, string, int64, double, dict, state
    description: str = ""
    optional: bool = False
    default: float | int | None = None  # an optional array's fill value
    default_shape: tuple[int, ...] | None = None
    shapes: tuple[tuple[int, ...], ...] = ()
    ranges: tuple[tuple[int, int], ...] = ()
    image: ImageFormat | None = None

    @property
    def numpy_dtype(self) -> np.dtype:
        return np.dtype(NUMPY_TYPES.get(self.dtype, np.float32))

    @property
    def flexible(self) -> bool:
        return bool(self.shapes or self.ranges) or (self.image is not None and self.image.flexible)

    def accepts_shape(self, shape: tuple[int, ...]) -> bool:
        """Whether an array of `shape` is one this feature takes."""
        if self.shapes:
            return tuple(shape) in self.shapes
        if self.ranges:
            return len(shape) == len(self.ranges) and all(_in_range(d, r) for d, r in zip(shape, self.ranges))
        return self.shape is None or tuple(shape) == self.shape

    def declared(self) -> str:
        """What the model takes, in words: `fp32[1, 3, 8]`, `fp16[1, 1..16, 8]`, `RGB image 8x8`."""
        if self.kind == "image" and self.image is not None:
            return f"{self.image.describe()} image"
        if self.kind in ("string", "int64", "double", "dict"):
            return {"string": "a string", "int64": "an int64", "double": "a double", "dict": "a dictionary"}[self.kind]
        shape = self.declared_shape()
        return f"{self.dtype} {shape}" if self.shapes else f"{self.dtype}{shape}"

    def declared_shape(self) -> str:
        """`[1, 3, 8]`, `[1, 1..16, 8]` (ranges), `one of [1, 3, 8], [2, 4, 8]` (enumerated), `[?]`."""
        if self.shapes:
            return "one of " + ", ".join(_shape_text(s) for s in self.shapes)
        if self.ranges:
            return "[" + ", ".join(_range_text(r) for r in self.ranges) + "]"
        return _shape_text(self.shape)

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name, "kind": self.kind, "dtype": self.dtype,
            "shape": list(self.shape) if self.shape is not None else None,
            "default_shape": list(self.default_shape) if self.default_shape is not None else None,
            "shapes": [list(s) for s in self.shapes] or None,
            "ranges": [list(r) for r in self.ranges] or None,
            "image": self.image.to_dict() if self.image else None,
            "optional": self.optional, "default": self.default, "description": self.description,
        }


@dataclass(frozen=True)
class Metadata:
    author: str = ""
    license: str = ""
    version: str = ""
    short_description: str = ""
    user_defined: dict[str, str] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"author": self.author, "license": self.license, "version": self.version,
                "short_description": self.short_description, "user_defined": dict(self.user_defined)}


@dataclass(frozen=True)
class FunctionSpec:
    """One function's declared interface (a single-function model has one, named `main`)."""

    name: str
    inputs: tuple[FeatureDescription, ...] = ()
    outputs: tuple[FeatureDescription, ...] = ()
    states: tuple[FeatureDescription, ...] = ()
    predicted_feature: str = ""  # a classifier's label output
    predicted_probabilities: str = ""  # a classifier's probabilities output


@dataclass(frozen=True)
class ModelSpec:
    """A model's declared kind, functions and metadata (see the module docstring)."""

    path: Path
    model_type: str  # "mlProgram", "neuralNetwork", "pipeline", ...
    specification_version: int
    functions: tuple[FunctionSpec, ...]
    default_function: str  # "" where the model names none
    metadata: Metadata

    def function(self, name: str) -> FunctionSpec | None:
        return next((f for f in self.functions if f.name == name), None)


def read_spec(path: str | Path, message: Any = None) -> ModelSpec:
    """The declared interface of a `.mlpackage`, `.mlmodel` file or `.mlmodelc` folder.

    `message`: the package's already parsed protobuf `Model`, to not parse it twice.
    Raises UnsupportedModel for anything but an ML Program (NeuralNetwork models, pipelines
    of them, tree ensembles, ...), naming the spec type.
    """
    path = Path(path)
    if is_compiled(path):
        return _read_compiled(path)
    return _read_package(path, message)


def is_compiled(path: Path) -> bool:
    """A `.mlmodelc` folder (model.mil and metadata.json) rather than a package or spec file."""
    return path.is_dir() and (path.suffix == ".mlmodelc" or (path / "metadata.json").is_file()
                              or (path / "model.mil").is_file()) and not (path / "Manifest.json").is_file()


def choose_function(spec: ModelSpec, available: list[str], wanted: str | None) -> str:
    """The function to run: `wanted`, else the model's default, else `main`, else the only one."""
    if wanted:
        if wanted not in available:
            raise InvalidBundle(f"{spec.path.name} has no function {wanted!r}; it has: {', '.join(sorted(available))}.",
                                hint="Pass one of those as function_name (CLI: --function).")
        return wanted
    for candidate in (spec.default_function, "main"):
        if candidate and candidate in available:
            return candidate
    if len(available) == 1:
        return available[0]
    raise InvalidBundle(f"{spec.path.name} has several functions ({', '.join(available)}) and names no default.",
                        hint="Pass function_name (CLI: --function).")


def describe_function(fn: Function, declared: FunctionSpec | None) -> FunctionSpec:
    """The interface of a program function, completed with what the model declares about it.

    The program gives names, value types and the fixed shapes it was compiled for; the
    declaration adds the kind (image, string, ...), flexible shapes, optional inputs and
    descriptions. Declared order wins (a compiled `model.mil` lists inputs alphabetically).
    """
    declared = declared or FunctionSpec(fn.name)
    known = {f.name: f for f in (*declared.inputs, *declared.states)}
    order = [f.name for f in (*declared.inputs, *declared.states)]
    program_inputs = {v.name: v for v in fn.inputs}
    names = [n for n in order if n in program_inputs] + [v.name for v in fn.inputs if v.name not in order]
    inputs, states = [], []
    for name in names:
        vtype = program_inputs[name].type
        if isinstance(vtype, StateType):
            states.append(_merge(name, vtype.wrapped, known.get(name), kind="state"))
        else:
            inputs.append(_merge(name, vtype, known.get(name)))
    types = fn.output_types()
    declared_outputs = {f.name: f for f in declared.outputs}
    outputs = tuple(_merge(name, types.get(name), declared_outputs.get(name)) for name in fn.outputs)
    return FunctionSpec(fn.name, tuple(inputs), outputs, tuple(states),
                        declared.predicted_feature, declared.predicted_probabilities)


def _merge(name: str, vtype: Any, declared: FeatureDescription | None, kind: str | None = None) -> FeatureDescription:
    if isinstance(vtype, DictType):
        program = FeatureDescription(name, None, "dict", kind="dict")
    elif isinstance(vtype, TensorType):
        program_kind = {"string": "string"}.get(vtype.dtype, kind or "array")
        program = FeatureDescription(name, vtype.static_shape, vtype.dtype, kind=program_kind)
    else:
        program = FeatureDescription(name, None, "unknown", kind=kind or "array")
    if declared is None:
        return program
    flexible = declared.flexible
    shape = None if flexible else (program.shape if program.shape is not None else declared.shape)
    chosen_kind = declared.kind if declared.kind not in ("array", "state") else program.kind
    dtype = program.dtype if program.dtype != "unknown" else declared.dtype
    if chosen_kind == "int64" and program.kind == "array":
        chosen_kind = "array"  # a program tensor declared as a plain int64 feature still runs as a tensor
    return refine_image(FeatureDescription(
        name, shape, dtype, kind=chosen_kind, description=declared.description, optional=declared.optional,
        default=declared.default, default_shape=declared.default_shape or program.shape,
        shapes=declared.shapes, ranges=declared.ranges, image=declared.image))


# -- .mlpackage / .mlmodel: the protobuf spec ------------------------------------------


def _read_package(path: Path, message: Any = None) -> ModelSpec:
    from .proto import load_spec

    spec = message if message is not None else load_spec(path)
    model_type = spec.WhichOneof("Type") or "unknown"
    if model_type != "mlProgram":
        raise unsupported_model(path, model_type, inner_model_types(spec))
    desc = spec.description
    if len(desc.functions):
        functions = tuple(FunctionSpec(f.name, _features(f.input), _features(f.output), _features(f.state),
                                       f.predictedFeatureName, f.predictedProbabilitiesName)
                          for f in desc.functions)
    else:
        functions = (FunctionSpec("main", _features(desc.input), _features(desc.output), _features(desc.state),
                                  desc.predictedFeatureName, desc.predictedProbabilitiesName),)
    meta = desc.metadata
    metadata = Metadata(meta.author, meta.license, meta.versionString, meta.shortDescription,
                        dict(sorted(meta.userDefined.items())))
    return ModelSpec(path, model_type, int(spec.specificationVersion), functions, desc.defaultFunctionName, metadata)


def inner_model_types(spec: Any) -> list[str]:
    """The spec types of a pipeline's models (empty for anything else)."""
    kind = spec.WhichOneof("Type")
    if kind in ("pipeline", "pipelineClassifier", "pipelineRegressor"):
        pipeline = spec.pipeline if kind == "pipeline" else getattr(spec, kind).pipeline
        return [m.WhichOneof("Type") or "unknown" for m in pipeline.models]
    return []


def unsupported_model(path: Path, model_type: str, inner: list[str] | None = None) -> UnsupportedModel:
    """The error for a model that is not an ML Program, naming its spec type."""
    what = f"a '{model_type}' model"
    if inner:
        what = f"a '{model_type}' of {len(inner)} model(s) ({', '.join(inner)})"
    return UnsupportedModel(f"{path.name} is {what}; the portable runtime runs ML Programs (spec type "
                            "'mlProgram') only.")


def _features(items: Any) -> tuple[FeatureDescription, ...]:
    return tuple(_proto_feature(f) for f in items)


def _proto_feature(feature: Any) -> FeatureDescription:
    ftype = feature.type
    which = ftype.WhichOneof("Type")
    kind = _PROTO_KINDS.get(which, str(which))
    common = {"description": feature.shortDescription, "optional": bool(ftype.isOptional)}
    if which == "stateType":
        array = ftype.stateType.arrayType
        return FeatureDescription(feature.name, tuple(int(d) for d in array.shape) or None,
                                  _PROTO_ARRAY_TYPES.get(array.dataType, "fp32"), kind="state", **common)
    if which == "multiArrayType":
        return _proto_array(feature.name, ftype.multiArrayType, common)
    if which == "imageType":
        image = _proto_image(ftype.imageType)
        dtype = "fp16" if image.color_layout == "GRAYSCALE_FLOAT16" else "fp32"
        shape = None if image.flexible else (1, image.channels, image.height, image.width)
        return FeatureDescription(feature.name, shape, dtype, kind="image", image=image,
                                  default_shape=(1, image.channels, image.height, image.width), **common)
    dtype = {"string": "string", "int64": "int64", "double": "fp64", "dict": "dict"}.get(kind, kind)
    return FeatureDescription(feature.name, () if kind in ("int64", "double") else None, dtype, kind=kind, **common)


def _proto_array(name: str, array: Any, common: dict[str, Any]) -> FeatureDescription:
    dtype = _PROTO_ARRAY_TYPES.get(array.dataType, "fp32")
    default_shape = tuple(int(d) for d in array.shape) or None
    shapes: tuple[tuple[int, ...], ...] = ()
    ranges: tuple[tuple[int, int], ...] = ()
    flex = array.WhichOneof("ShapeFlexibility")
    if flex == "enumeratedShapes":
        shapes = tuple(tuple(int(d) for d in s.shape) for s in array.enumeratedShapes.shapes)
        default_shape = default_shape or (shapes[0] if shapes else None)
    elif flex == "shapeRange":
        ranges = tuple((int(r.lowerBound), int(r.upperBound)) for r in array.shapeRange.sizeRanges)
        default_shape = default_shape or tuple(lo for lo, _ in ranges)
    default = None
    which_default = array.WhichOneof("defaultOptionalValue")
    if which_default is not None:
        default = getattr(array, which_default)
    shape = None if (shapes or ranges) else default_shape
    return FeatureDescription(name, shape, dtype, kind="array", default=default, default_shape=default_shape,
                              shapes=shapes, ranges=ranges, **common)


def _proto_image(image: Any) -> ImageFormat:
    color = _PROTO_COLORS.get(int(image.colorSpace), "RGB")
    width, height = int(image.width), int(image.height)
    sizes: tuple[tuple[int, int], ...] = ()
    width_range = height_range = None
    flex = image.WhichOneof("SizeFlexibility")
    if flex == "enumeratedSizes":
        sizes = tuple((int(s.width), int(s.height)) for s in image.enumeratedSizes.sizes)
    elif flex == "imageSizeRange":
        rng = image.imageSizeRange
        width_range = (int(rng.widthRange.lowerBound), int(rng.widthRange.upperBound))
        height_range = (int(rng.heightRange.lowerBound), int(rng.heightRange.upperBound))
    if not (width > 0 and height > 0):  # Core ML's default size of a flexible image
        if sizes:
            width, height = sizes[0]
        elif width_range and height_range:
            width, height = width_range[0], height_range[0]
    return ImageFormat(color, width, height, sizes, width_range, height_range)


# -- .mlmodelc: metadata.json ------------------------------------------------------------


def _read_compiled(path: Path) -> ModelSpec:
    entry: dict[str, Any] = {}
    meta_file = path / "metadata.json"
    if meta_file.is_file():
        try:
            data = json.loads(meta_file.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise InvalidBundle(f"{meta_file} is not readable JSON: {exc}") from exc
        entry = data[0] if isinstance(data, list) and data and isinstance(data[0], dict) else (
            data if isinstance(data, dict) else {})
    type_name = str((entry.get("modelType") or {}).get("name", "")) if isinstance(entry.get("modelType"), dict) else ""
    model_type = type_name.removeprefix("MLModelType_") or "mlProgram"
    if model_type != "mlProgram" or not (path / "model.mil").is_file():
        if model_type == "mlProgram":
            raise InvalidBundle(f"{path} is not a compiled Core ML model (no model.mil)")
        structure = (entry.get("modelType") or {}).get("structure") if isinstance(entry.get("modelType"), dict) else None
        inner = [str(s.get("name", "?")).removeprefix("MLModelType_") for s in structure
                 if isinstance(s, dict)] if isinstance(structure, list) else None
        raise unsupported_model(path, model_type, inner)
    main = FunctionSpec(
        "main",
        tuple(_schema_feature(i) for i in entry.get("inputSchema") or () if isinstance(i, dict)),
        tuple(_schema_feature(o) for o in entry.get("outputSchema") or () if isinstance(o, dict)),
        tuple(_schema_feature(s, kind="state") for s in entry.get("stateSchema") or () if isinstance(s, dict)),
    )
    metadata = Metadata(str(entry.get("author", "")), str(entry.get("license", "")), str(entry.get("version", "")),
                        str(entry.get("shortDescription", "")),
                        {str(k): str(v) for k, v in sorted((entry.get("userDefinedMetadata") or {}).items())})
    try:
        version = int(entry.get("specificationVersion", 0))
    except (TypeError, ValueError):
        version = 0
    # A compiled bundle's description holds one interface; it is the default function's.
    default = str(entry.get("defaultFunctionName", "") or "")
    if default:
        main = FunctionSpec(default, main.inputs, main.outputs, main.states)
    return ModelSpec(path, model_type, version, (main,), default, metadata)


def _schema_feature(item: dict[str, Any], kind: str | None = None) -> FeatureDescription:
    name = str(item.get("name", ""))
    kind = kind or _SCHEMA_KINDS.get(str(item.get("type", "MultiArray")).lower(), str(item.get("type", "")).lower())
    common = {"description": str(item.get("shortDescription", "")), "optional": str(item.get("isOptional")) == "1"}
    if kind == "image":
        image = _schema_image(item)
        shape = None if image.flexible else (1, image.channels, image.height, image.width)
        dtype = "fp16" if image.color_layout == "GRAYSCALE_FLOAT16" else "fp32"
        return FeatureDescription(name, shape, dtype, kind="image", image=image,
                                  default_shape=(1, image.channels, image.height, image.width), **common)
    if kind in ("array", "state"):
        dtype = _SCHEMA_ARRAY_TYPES.get(str(item.get("dataType", "Float32")).lower(), "fp32")
        default_shape = _ints(item.get("shape"))
        shapes = tuple(tuple(s) for s in _nested(item.get("enumeratedShapes")))
        ranges = tuple((r[0], r[1]) for r in _nested(item.get("shapeRange")) if len(r) == 2)
        shape = None if (shapes or ranges) else default_shape
        return FeatureDescription(name, shape, dtype, kind=kind, default_shape=default_shape, shapes=shapes,
                                  ranges=ranges, **common)
    dtype = {"string": "string", "int64": "int64", "double": "fp64", "dict": "dict"}.get(kind, kind)
    return FeatureDescription(name, () if kind in ("int64", "double") else None, dtype, kind=kind, **common)


def _schema_image(item: dict[str, Any]) -> ImageFormat:
    space = str(item.get("colorspace", "RGB"))
    lowered = space.lower().replace("_", "")
    if lowered.startswith("gray"):
        # The float16 layout is told apart by the program's input type (see `refine_image`).
        color = "GRAYSCALE_FLOAT16" if "float16" in lowered else "GRAYSCALE"
    else:
        color = "BGR" if lowered == "bgr" else "RGB"
    width, height = _int(item.get("width")), _int(item.get("height"))
    sizes = tuple((s[0], s[1]) for s in _nested(item.get("enumeratedSizes")) if len(s) == 2)
    ranges = [(r[0], r[1]) for r in _nested(item.get("sizeRange")) if len(r) == 2]
    width_range, height_range = (ranges[0], ranges[1]) if len(ranges) == 2 else (None, None)
    return ImageFormat(color, width, height, sizes, width_range, height_range)


def refine_image(feature: FeatureDescription) -> FeatureDescription:
    """A grayscale image whose program value is fp16 is GRAYSCALE_FLOAT16 (metadata.json may not say)."""
    image = feature.image
    if image is None or image.color_layout != "GRAYSCALE" or feature.dtype != "fp16":
        return feature
    from dataclasses import replace

    return replace(feature, image=replace(image, color_layout="GRAYSCALE_FLOAT16"))


def _int(value: Any) -> int:
    try:
        return int(str(value))
    except (TypeError, ValueError):
        return 0


def _ints(text: Any) -> tuple[int, ...] | None:
    try:
        values = json.loads(text) if isinstance(text, str) else text
    except ValueError:
        return None
    if not isinstance(values, list) or not values or not all(isinstance(v, int) for v in values):
        return None  # an output of flexible shape is written as "[]"
    return tuple(values)


def _nested(text: Any) -> list[list[int]]:
    """`"[[1, 3, 8], [1, 5, 8]]"` -> [[1, 3, 8], [1, 5, 8]]; anything else -> []."""
    try:
        values = json.loads(text) if isinstance(text, str) else text
    except ValueError:
        return []
    if not isinstance(values, list):
        return []
    return [list(v) for v in values if isinstance(v, list) and all(isinstance(d, int) for d in v)]


def _in_range(value: int, bounds: tuple[int, int]) -> bool:
    lower, upper = bounds
    return value >= lower and (upper < 0 or value <= upper)


def _range_text(bounds: tuple[int, int]) -> str:
    lower, upper = bounds
    if lower == upper:
        return str(lower)
    return f"{lower}.." if upper < 0 else f"{lower}..{upper}"


def _shape_text(shape: tuple[int, ...] | None) -> str:
    return "[" + ", ".join(str(d) for d in shape) + "]" if shape is not None else "[?]"
