"""Read a `.mlpackage` (protobuf Model spec) straight into the shared program model.

The spec is parsed with coremltools' generated protobuf classes only (no pymil: building a
pymil Program runs type inference on every op and is slow for a full Unet). Values follow
the conventions of `mil.program`: immediate tensors become numpy arrays of the MIL dtype's
numpy type (scalars have shape ()), strings are object arrays holding `str`, file-backed
constants become `BlobRef`s resolved against the folder that `@model_path` names.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import sys
import types
from dataclasses import dataclass
from itertools import count
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from ..errors import InvalidBundle, UnsupportedOperation
from .blob import unpack_bits
from .program import (
    DTYPES,
    OPSETS_FROM_PROTO,
    SUB_BYTE_BITS,
    BlobRef,
    Block,
    DictType,
    DictValue,
    Function,
    ListType,
    ListValue,
    Operation,
    StateType,
    Program,
    StateType,
    TensorType,
    TensorValue,
    TupleType,
    Value,
    ValueType,
    Var,
    binding,
)

# MIL.proto DataType enum value -> MIL dtype name as written in model.mil.
PROTO_DTYPES: dict[int, str] = {
    1: "bool",
    2: "string",
    10: "fp16",
    11: "fp32",
    12: "fp64",
    13: "bf16",
    21: "int8",
    22: "int16",
    23: "int32",
    24: "int64",
    25: "int4",
    31: "uint8",
    32: "uint16",
    33: "uint32",
    34: "uint64",
    35: "uint4",
    36: "uint2",
    37: "uint1",
    38: "uint6",
    39: "uint3",
}

# FeatureTypes.proto ArrayFeatureType.ArrayDataType -> MIL dtype name.
ARRAY_DTYPES = {65552: "fp16", 65568: "fp32", 65600: "fp64", 131104: "int32", 131080: "int8"}


@dataclass(frozen=True)
class FeatureDescription:
    """One model input or output as the model description declares it (like MLModel's spec)."""

    name: str
    shape: tuple[int, ...] | None  # None: not a fixed-shape multi-array (flexible, image, ...)
    dtype: str  # MIL dtype name: "fp16", "fp32", "int32", ... ; "image", "string", ... otherwise
    description: str = ""


@dataclass(frozen=True)
class ModelDescription:
    inputs: tuple[FeatureDescription, ...]
    outputs: tuple[FeatureDescription, ...]
    metadata: dict[str, str]
    specification_version: int


def spec_file(path: str | Path) -> Path:
    """The `model.mlmodel` inside a `.mlpackage` (following Manifest.json), or `path` itself."""
    path = Path(path)
    if path.is_file():
        return path
    if not path.is_dir():
        raise InvalidBundle(f"No such model: {path}")
    manifest = path / "Manifest.json"
    if manifest.is_file():
        try:
            data = json.loads(manifest.read_text())
            root = data["itemInfoEntries"][data["rootModelIdentifier"]]["path"]
            candidate = path / "Data" / root
            if candidate.is_file():
                return candidate
        except (ValueError, KeyError, TypeError):
            pass  # fall back to the conventional location below
    candidate = path / "Data" / "com.apple.CoreML" / "model.mlmodel"
    if candidate.is_file():
        return candidate
    raise InvalidBundle(f"{path} holds no Core ML model spec (Data/com.apple.CoreML/model.mlmodel)")


def proto_module(name: str = "Model_pb2") -> Any:
    """One of coremltools' generated protobuf modules, without importing coremltools itself.

    `import coremltools` pulls in its converters and takes seconds; the generated modules
    alone load in milliseconds. When coremltools is already imported its own modules are
    used, so that messages from both places are the same classes.
    """
    if "coremltools.proto" in sys.modules or "coremltools" in sys.modules:
        return importlib.import_module(f"coremltools.proto.{name}")
    if _PROTO_PACKAGE not in sys.modules:
        found = importlib.util.find_spec("coremltools")
        if found is None or found.origin is None:
            raise ModuleNotFoundError("coremltools is needed to read .mlpackage files: pip install coremltools")
        package = types.ModuleType(_PROTO_PACKAGE)
        package.__path__ = [str(Path(found.origin).parent / "proto")]
        sys.modules[_PROTO_PACKAGE] = package
    return importlib.import_module(f"{_PROTO_PACKAGE}.{name}")


_PROTO_PACKAGE = "_coreml_hub_coremltools_proto"


def load_spec(path: str | Path) -> Any:
    """The parsed protobuf `Model` of a `.mlpackage` folder or a `model.mlmodel` file."""
    file = spec_file(path)
    spec = proto_module("Model_pb2").Model()
    try:
        spec.ParseFromString(file.read_bytes())
    except Exception as exc:  # protobuf raises its own DecodeError
        raise InvalidBundle(f"{file} is not a readable Core ML model spec: {exc}") from exc
    return spec


def load_program(path: str | Path) -> Program:
    """The ML Program of a `.mlpackage` folder (or a `model.mlmodel` file) as a `Program`."""
    file = spec_file(path)
    spec = load_spec(file)
    if spec.WhichOneof("Type") != "mlProgram":
        kind = spec.WhichOneof("Type")
        raise UnsupportedOperation(
            f"{path} is a '{kind}' model, not an ML Program; only ML Programs can be run portably",
            hint="Convert the model with convert_to='mlprogram'.",
        )
    return program_from_proto(spec.mlProgram, base_dir=file.parent)


def program_from_proto(proto: Any, base_dir: Path | None = None) -> Program:
    """Translate a `MIL_pb2.Program` message; `base_dir` is the folder `@model_path` names."""
    reader = _Reader(base_dir)
    functions = {name: reader.function(name, fn) for name, fn in proto.functions.items()}
    attributes = {key: reader.value(val) for key, val in proto.attributes.items()}
    return Program(
        version=f"{proto.version}.0",
        functions=functions,
        attributes=attributes,
        base_dir=base_dir,
    )


def opset_name(proto_opset: str) -> str:
    """`CoreML6` -> `ios16`: the model.mil spelling of a function's opset."""
    if proto_opset in OPSETS_FROM_PROTO:
        return OPSETS_FROM_PROTO[proto_opset]
    if proto_opset.startswith("CoreML") and proto_opset[6:].isascii() and proto_opset[6:].isdigit():
        return f"ios{int(proto_opset[6:]) + 10}"
    return proto_opset


def model_description(path: str | Path) -> ModelDescription:
    """Inputs, outputs and user metadata of a `.mlpackage` from its protobuf description."""
    spec = load_spec(path)
    desc = spec.description
    return ModelDescription(
        inputs=tuple(_feature(f) for f in desc.input),
        outputs=tuple(_feature(f) for f in desc.output),
        metadata=dict(desc.metadata.userDefined),
        specification_version=int(spec.specificationVersion),
    )


def _feature(feature: Any) -> FeatureDescription:
    kind = feature.type.WhichOneof("Type")
    shape: tuple[int, ...] | None = None
    if kind == "multiArrayType":
        array = feature.type.multiArrayType
        dtype = ARRAY_DTYPES.get(array.dataType, f"array{array.dataType}")
        if array.WhichOneof("ShapeFlexibility") is None and len(array.shape):
            shape = tuple(int(d) for d in array.shape)
        elif array.WhichOneof("ShapeFlexibility") == "enumeratedShapes" and len(array.shape):
            shape = tuple(int(d) for d in array.shape)  # the default shape
    elif kind == "imageType":
        dtype = "image"
    elif kind == "stringType":
        dtype = "string"
    elif kind == "int64Type":
        dtype, shape = "int64", ()
    elif kind == "doubleType":
        dtype, shape = "fp64", ()
    else:
        dtype = str(kind)
    return FeatureDescription(feature.name, shape, dtype, feature.shortDescription)


class _Reader:
    """Protobuf -> program model, with one counter for naming unknown dimensions."""

    def __init__(self, base_dir: Path | None) -> None:
        self.base_dir = base_dir
        self._symbols: Iterator[int] = count()

    def function(self, name: str, fn: Any) -> Function:
        opset = fn.opset
        if opset not in fn.block_specializations:
            raise InvalidBundle(f"ML Program function has no block for its opset {opset!r}")
        return Function(
            name=name,
            opset=opset_name(opset),
            inputs=tuple(self.var(v) for v in fn.inputs),
            block=self.block(fn.block_specializations[opset]),
            attributes={k: self.value(v) for k, v in fn.attributes.items()},
        )

    def block(self, block: Any) -> Block:
        return Block(
            operations=[self.operation(op) for op in block.operations],
            outputs=tuple(block.outputs),
            inputs=tuple(self.var(v) for v in block.inputs),
        )

    def operation(self, op: Any) -> Operation:
        return Operation(
            type=op.type,
            inputs={key: binding(op.type, key, tuple(self.argument(b) for b in argument.arguments))
                    for key, argument in op.inputs.items()},
            outputs=tuple(self.var(v) for v in op.outputs),
            attributes={k: self.value(v) for k, v in op.attributes.items()},
            blocks=tuple(self.block(b) for b in op.blocks),
        )

    def argument(self, arg: Any) -> Any:
        if arg.WhichOneof("binding") == "name":
            return arg.name
        return self.value(arg.value)

    def var(self, named: Any) -> Var:
        return Var(named.name, self.type(named.type))

    def type(self, vt: Any) -> ValueType:
        which = vt.WhichOneof("type")
        if which == "tensorType":
            t = vt.tensorType
            dtype = PROTO_DTYPES.get(t.dataType)
            if dtype is None:
                raise UnsupportedOperation(f"ML Program uses a data type the runtime does not know (enum {t.dataType})")
            if t.rank < 0:
                return TensorType(dtype, None)
            dims = tuple(self.dim(d) for d in t.dimensions)
            if len(dims) != t.rank:  # rank known, sizes not written
                dims = tuple(f"is{next(self._symbols)}" for _ in range(t.rank))
            return TensorType(dtype, dims)
        if which == "listType":
            length = self.dim(vt.listType.length) if vt.listType.HasField("length") else None
            return ListType(self.type(vt.listType.type), length)
        if which == "tupleType":
            return TupleType(tuple(self.type(t) for t in vt.tupleType.types))
        if which == "dictionaryType":
            return DictType(self.type(vt.dictionaryType.keyType), self.type(vt.dictionaryType.valueType))
        if which == "stateType":
            return StateType(self.type(vt.stateType.wrappedType))
        raise InvalidBundle(f"ML Program value type {which!r} is not understood")

    def dim(self, d: Any) -> int | str:
        if d.WhichOneof("dimension") == "constant":
            return int(d.constant.size)
        return f"is{next(self._symbols)}"

    def value(self, v: Any) -> Value:
        vtype = self.type(v.type)
        which = v.WhichOneof("value")
        if which == "blobFileValue":
            if not isinstance(vtype, TensorType):
                raise InvalidBundle("A weight-file value must be a tensor")
            blob = v.blobFileValue
            return TensorValue(vtype, BlobRef(blob.fileName, int(blob.offset)), base_dir=self.base_dir)
        if which != "immediateValue":
            raise InvalidBundle("ML Program value has neither immediate data nor a weight-file reference")
        imm = v.immediateValue
        kind = imm.WhichOneof("value")
        if kind == "tensor":
            if not isinstance(vtype, TensorType):
                raise InvalidBundle(f"Tensor data given for a value of type {vtype}")
            return TensorValue(vtype, tensor_data(vtype, imm.tensor), base_dir=self.base_dir)
        if kind == "dictionary":
            if not isinstance(vtype, DictType):
                raise InvalidBundle(f"Dictionary data given for a value of type {vtype}")
            items = tuple((self.value(kv.key), self.value(kv.value)) for kv in imm.dictionary.values)
            return DictValue(vtype, items)
        if kind in ("list", "tuple"):
            if not isinstance(vtype, (ListType, TupleType)):
                raise InvalidBundle(f"{kind} data given for a value of type {vtype}")
            values = imm.list.values if kind == "list" else imm.tuple.values
            return ListValue(vtype, tuple(self.value(x) for x in values))
        raise InvalidBundle(f"ML Program immediate value kind {kind!r} is not understood")


def tensor_data(ttype: TensorType, tensor: Any) -> np.ndarray:
    """The numpy array of an immediate `MIL_pb2.TensorValue` with the declared type."""
    shape = ttype.static_shape
    if shape is None:
        raise InvalidBundle(f"Immediate tensor of type {ttype} has no static shape")
    npdtype = DTYPES[ttype.dtype]
    size = int(np.prod(shape, dtype=np.int64))
    which = tensor.WhichOneof("value")
    if which == "strings":
        arr = np.empty(len(tensor.strings.values), dtype=object)
        arr[:] = list(tensor.strings.values)
        if arr.size != size:
            raise InvalidBundle(f"String tensor of shape {shape} holds {arr.size} values")
        return arr.reshape(shape)
    if which == "bytes":
        raw = bytes(tensor.bytes.values)
        if ttype.dtype in SUB_BYTE_BITS:
            nbits = SUB_BYTE_BITS[ttype.dtype]
            if len(raw) * 8 < size * nbits:
                raise InvalidBundle(f"Packed {nbits}-bit data holds {len(raw) * 8 // nbits} values, {size} expected")
            arr = unpack_bits(raw, nbits, size, signed=ttype.dtype == "int4")
        else:
            arr = np.frombuffer(raw, dtype=npdtype)[:size].copy() if size else np.zeros(0, npdtype)
    elif which is None:
        arr = np.zeros(0, dtype=npdtype)
    else:
        arr = np.asarray(list(getattr(tensor, which).values))
        arr = arr.astype(npdtype) if arr.size else np.zeros(0, dtype=npdtype)
    if arr.size != size:
        raise InvalidBundle(f"Immediate {ttype.dtype} tensor of shape {shape} holds {arr.size} values")
    return arr.reshape(shape)

