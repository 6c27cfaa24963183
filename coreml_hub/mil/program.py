"""One program model for ML Programs, whichever file they came from.

`.mlmodelc/model.mil` (text, `mil.text`) and `.mlpackage` (protobuf, `mil.proto`) both
load into these classes; the verifier and the executor only ever see these.

Values are typed. File-backed constants hold a `BlobRef` and are read lazily
(zero copy, via `mil.blob`) when `TensorValue.array()` is called.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Union

import numpy as np

# MIL dtype names as written in model.mil, with their numpy storage type.
# Sub-byte types unpack to the smallest numpy integer type that holds them.
DTYPES: dict[str, np.dtype] = {
    "fp16": np.dtype(np.float16),
    "fp32": np.dtype(np.float32),
    "fp64": np.dtype(np.float64),
    "bf16": np.dtype(np.uint16),  # raw bits; converted by consumers
    "int8": np.dtype(np.int8),
    "int16": np.dtype(np.int16),
    "int32": np.dtype(np.int32),
    "int64": np.dtype(np.int64),
    "uint8": np.dtype(np.uint8),
    "uint16": np.dtype(np.uint16),
    "uint32": np.dtype(np.uint32),
    "uint64": np.dtype(np.uint64),
    "int4": np.dtype(np.int8),
    "uint1": np.dtype(np.uint8),
    "uint2": np.dtype(np.uint8),
    "uint3": np.dtype(np.uint8),
    "uint4": np.dtype(np.uint8),
    "uint6": np.dtype(np.uint8),
    "bool": np.dtype(np.bool_),
    "string": np.dtype(object),
    # 8-bit floats exist only in weight files so far (blob dtype codes 16, 17); raw bits
    "fp8e4m3fn": np.dtype(np.uint8),
    "fp8e5m2": np.dtype(np.uint8),
}
FLOAT_DTYPES = ("fp16", "fp32", "fp64", "bf16")
# Storage bits of the types narrower than a byte; they are packed least significant bit first.
SUB_BYTE_BITS = {"int4": 4, "uint1": 1, "uint2": 2, "uint3": 3, "uint4": 4, "uint6": 6}

# Input parameters that take a tuple of arguments even when the tuple has one element.
# A protobuf binding with several arguments is always a tuple; with one, only for these.
VARIADIC_INPUTS: frozenset[tuple[str, str]] = frozenset({
    ("concat", "values"),
    ("stack", "values"),
    ("einsum", "values"),
    ("identity_n", "x"),
    ("while_loop", "loop_vars"),
})



def binding(op_type: str, key: str, args: tuple["Arg", ...]) -> "Binding":
    """The arguments of one input as the program model keeps them (see `VARIADIC_INPUTS`)."""
    return args[0] if len(args) == 1 and (op_type, key) not in VARIADIC_INPUTS else args


# Function opsets use the model.mil spelling; the protobuf's "CoreML<N>" maps to these.
OPSETS_FROM_PROTO = {"CoreML5": "ios15", "CoreML6": "ios16", "CoreML7": "ios17", "CoreML8": "ios18"}

Dim = Union[int, str]  # str: a symbolic dimension such as "is0"


@dataclass(frozen=True)
class TensorType:
    """`tensor<dtype, shape>`; a scalar has shape (). shape None means unknown rank."""

    dtype: str
    shape: tuple[Dim, ...] | None = ()

    @property
    def rank(self) -> int | None:
        return None if self.shape is None else len(self.shape)

    @property
    def static_shape(self) -> tuple[int, ...] | None:
        if self.shape is None or any(not isinstance(d, int) for d in self.shape):
            return None
        return tuple(int(d) for d in self.shape)

    @property
    def numpy_dtype(self) -> np.dtype:
        return DTYPES[self.dtype]


@dataclass(frozen=True)
class ListType:
    element: "ValueType"
    length: Dim | None = None


@dataclass(frozen=True)
class TupleType:
    elements: tuple["ValueType", ...]


@dataclass(frozen=True)
class DictType:
    key: "ValueType"
    value: "ValueType"


@dataclass(frozen=True)
class StateType:
    """`state<tensor<...>>`: a function input that ops read and update in place (iOS 18)."""

    wrapped: "ValueType"


ValueType = Union[TensorType, ListType, TupleType, DictType, StateType]


@dataclass(frozen=True)
class BlobRef:
    """A constant stored in a weight file: `BLOBFILE(path = "@model_path/weights/weight.bin", offset = 64)`."""

    path: str
    offset: int


@dataclass(eq=False)
class TensorValue:
    """A constant tensor: immediate data, or a `BlobRef` read on demand."""

    type: TensorType
    data: np.ndarray | BlobRef
    base_dir: Path | None = field(default=None, repr=False)  # folder that `@model_path` names

    @property
    def is_blob(self) -> bool:
        return isinstance(self.data, BlobRef)

    def array(self) -> np.ndarray:
        """The value as a numpy array of the declared shape (a view over mmap for blobs)."""
        if isinstance(self.data, np.ndarray):
            return self.data
        from .blob import read_blob_value  # lazy: only needed when weights are touched

        return read_blob_value(self)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, TensorValue) or self.type != other.type:
            return False
        if isinstance(self.data, BlobRef) or isinstance(other.data, BlobRef):
            return self.data == other.data
        a, b = np.asarray(self.data), np.asarray(other.data)
        if a.shape != b.shape:
            return False
        if a.dtype == b.dtype and a.dtype.kind in "fc":
            # bitwise, so that NaN == NaN and -0.0 != 0.0 survive a print/parse round trip
            return a.tobytes() == b.tobytes()
        return bool(np.array_equal(a, b))

    __hash__ = None  # type: ignore[assignment]


@dataclass(eq=True)
class DictValue:
    type: DictType
    items: tuple[tuple["Value", "Value"], ...]


@dataclass(eq=True)
class ListValue:
    type: ListType | TupleType
    items: tuple["Value", ...]


Value = Union[TensorValue, DictValue, ListValue]


@dataclass(frozen=True)
class Var:
    """A named, typed SSA value: a function input or an op output."""

    name: str
    type: ValueType


# An op argument: a variable name, or an immediate value.
Arg = Union[str, Value]
# An input parameter binds one argument, or a tuple of them (variadic: concat's `values`).
Binding = Union[Arg, tuple[Arg, ...]]


@dataclass(eq=True)
class Operation:
    type: str
    inputs: dict[str, Binding]
    outputs: tuple[Var, ...]
    attributes: dict[str, Value] = field(default_factory=dict)
    blocks: tuple["Block", ...] = ()

    @property
    def name(self) -> str | None:
        value = self.attributes.get("name")
        if isinstance(value, TensorValue) and isinstance(value.data, np.ndarray):
            return str(value.data.item() if value.data.shape == () else value.data)
        return None

    def input_names(self) -> Iterator[str]:
        """Names of the variables this op reads (immediate values skipped)."""
        for binding in self.inputs.values():
            for arg in binding if isinstance(binding, tuple) else (binding,):
                if isinstance(arg, str):
                    yield arg


@dataclass(eq=True)
class Block:
    operations: list[Operation]
    outputs: tuple[str, ...]
    inputs: tuple[Var, ...] = ()

    def walk(self) -> Iterator[Operation]:
        for op in self.operations:
            yield op
            for block in op.blocks:
                yield from block.walk()


@dataclass(eq=True)
class Function:
    name: str
    opset: str  # e.g. "ios16", "ios18"
    inputs: tuple[Var, ...]
    block: Block
    attributes: dict[str, Value] = field(default_factory=dict)

    @property
    def outputs(self) -> tuple[str, ...]:
        return self.block.outputs

    def output_types(self) -> dict[str, ValueType]:
        """Types of the function outputs (from the ops that produce them, or inputs passed through)."""
        types = {v.name: v.type for v in self.inputs}
        for op in self.block.walk():
            for var in op.outputs:
                types[var.name] = var.type
        return {name: types[name] for name in self.outputs if name in types}


@dataclass(eq=True)
class Program:
    version: str  # "1.0", "1.3", ...
    functions: dict[str, Function]
    attributes: dict[str, Value] = field(default_factory=dict)
    base_dir: Path | None = field(default=None, compare=False, repr=False)

    @property
    def main(self) -> Function:
        return self.functions["main"]

    def op_histogram(self) -> Counter[str]:
        """Op type -> count over all functions (const included), like Core ML's metadata."""
        counts: Counter[str] = Counter()
        for function in self.functions.values():
            for op in function.block.walk():
                counts[op.type] += 1
        return counts

    def blob_values(self) -> Iterator[tuple[Operation, str, TensorValue]]:
        """Every file-backed constant: (op, attribute or input name, value)."""
        for function in self.functions.values():
            for op in function.block.walk():
                for key, value in op.attributes.items():
                    if isinstance(value, TensorValue) and value.is_blob:
                        yield op, key, value
                for key, binding in op.inputs.items():
                    for arg in binding if isinstance(binding, tuple) else (binding,):
                        if isinstance(arg, TensorValue) and arg.is_blob:
                            yield op, key, arg


def dtype_nbits(dtype: str) -> int:
    """Storage bits per element of a MIL dtype (sub-byte types included)."""
    return SUB_BYTE_BITS.get(dtype) or DTYPES[dtype].itemsize * 8


def integer_range(dtype: str) -> tuple[int, int]:
    """Smallest and largest value of an integer dtype (of the raw bits, for 8-bit floats)."""
    bits = dtype_nbits(dtype)
    if dtype.startswith("int"):
        return -(1 << (bits - 1)), (1 << (bits - 1)) - 1
    return 0, (1 << bits) - 1


def describe(t: Any) -> str:
    """Short human form of a type: fp16[2, 4, 64, 64]."""
    if isinstance(t, TensorType):
        return f"{t.dtype}{list(t.shape) if t.shape is not None else '[?]'}"
    return repr(t)
