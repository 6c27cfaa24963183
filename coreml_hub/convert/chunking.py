"""Split an ML Program into two packages of about equal weight size, chained by tensor names.

Works on the Core ML protobuf directly: the main block's operations are cut in two at
the first point where the weights defined so far pass half the total. Every tensor
computed before the cut and read after it becomes an output of the first chunk and an
input of the second, under the same name. Like Apple's chunker, tensors cross the cut
in float32 (a cast on each side), and constants read on both sides are copied into
both. Each chunk gets a weight file with only its own blobs.
"""

from __future__ import annotations

import copy
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator

from ..errors import ConversionError
from ..mil.blob import BlobFile

_FLOAT_TYPES = ("FLOAT16", "FLOAT32")


@dataclass(frozen=True)
class ChunkPlan:
    cut: int  # index of the first operation of chunk 2
    boundary: tuple[str, ...]  # names that cross from chunk 1 to chunk 2
    chunk1_bytes: int
    total_bytes: int


def _is_const(op: Any) -> bool:
    return op.type == "const" or op.type.startswith("constexpr_")


def _values(op: Any) -> Iterator[Any]:
    """Every immediate or file-backed Value an op holds (attributes and inline input bindings)."""
    yield from op.attributes.values()
    for arg in op.inputs.values():
        for binding in arg.arguments:
            if binding.HasField("value"):
                yield binding.value


def _reads(op: Any) -> Iterator[str]:
    for arg in op.inputs.values():
        for binding in arg.arguments:
            if binding.WhichOneof("binding") == "name":
                yield binding.name
    for block in op.blocks:
        for inner in block.operations:
            yield from _reads(inner)
        yield from block.outputs


def _op_bytes(op: Any, weights: BlobFile) -> int:
    return sum(weights.info(v.blobFileValue.offset).size for v in _values(op) if v.HasField("blobFileValue"))


def _static_float_tensor(vtype: Any) -> bool:
    from coremltools.proto import MIL_pb2

    if vtype.WhichOneof("type") != "tensorType":
        return False
    tensor = vtype.tensorType
    if MIL_pb2.DataType.Name(tensor.dataType) not in _FLOAT_TYPES:
        return False
    return all(d.WhichOneof("dimension") == "constant" for d in tensor.dimensions)


def plan(ops: list[Any], outputs: Iterable[str], weights: BlobFile) -> ChunkPlan:
    """Where to cut: after the first non-constant op at or past half the weight bytes whose cut is clean."""
    sizes = [_op_bytes(op, weights) for op in ops]
    total = sum(sizes)
    if total == 0:
        raise ConversionError("Cannot chunk a model without weights.")
    out_names = set(outputs)
    last_read: dict[str, int] = {}
    for i, op in enumerate(ops):
        for name in _reads(op):
            last_read[name] = i
    for name in out_names:
        last_read[name] = len(ops)
    producer_types: dict[str, Any] = {}
    live: dict[str, None] = {}  # non-constant values defined so far and still read later, in order
    cumulative = 0
    for i, op in enumerate(ops):
        cumulative += sizes[i]
        if not _is_const(op):
            for var in op.outputs:
                producer_types[var.name] = var.type
                live[var.name] = None
        for name in [n for n in live if last_read.get(n, -1) <= i]:
            del live[name]
        if i + 1 >= len(ops) or _is_const(op) or cumulative * 2 < total:
            continue
        boundary = tuple(live)
        if boundary and all(_static_float_tensor(producer_types[n]) for n in boundary) and not (set(boundary) & out_names):
            return ChunkPlan(cut=i + 1, boundary=boundary, chunk1_bytes=cumulative, total_bytes=total)
    raise ConversionError("Found no place to cut the Unet into two chunks (no clean float boundary past half the weights).")


def _rename(ops: Iterable[Any], old: str, new: str) -> None:
    for op in ops:
        for arg in op.inputs.values():
            for binding in arg.arguments:
                if binding.WhichOneof("binding") == "name" and binding.name == old:
                    binding.name = new
        for var in op.outputs:
            if var.name == old:
                var.name = new


def _string_value(text: str) -> Any:
    from coremltools.proto import MIL_pb2

    value = MIL_pb2.Value()
    value.type.tensorType.dataType = MIL_pb2.DataType.Value("STRING")
    value.immediateValue.tensor.strings.values.append(text)
    return value


def _cast_ops(src: str, dest: str, dest_type: Any, dtype: str) -> list[Any]:
    """A `const` dtype and a `cast(x=src, dtype)` writing `dest` of `dest_type`."""
    from coremltools.proto import MIL_pb2

    const = MIL_pb2.Operation(type="const")
    dtype_name = f"{dest}_dtype_0"
    out = const.outputs.add()
    out.name = dtype_name
    out.type.tensorType.dataType = MIL_pb2.DataType.Value("STRING")
    const.attributes["val"].CopyFrom(_string_value(dtype))
    const.attributes["name"].CopyFrom(_string_value(dtype_name))
    cast = MIL_pb2.Operation(type="cast")
    cast.inputs["x"].arguments.add().name = src
    cast.inputs["dtype"].arguments.add().name = dtype_name
    var = cast.outputs.add()
    var.name = dest
    var.type.CopyFrom(dest_type)
    cast.attributes["name"].CopyFrom(_string_value(dest))
    return [const, cast]


def _with_dtype(vtype: Any, dtype: str) -> Any:
    from coremltools.proto import MIL_pb2

    out = copy.deepcopy(vtype)
    out.tensorType.dataType = MIL_pb2.DataType.Value(dtype)
    return out


def _prune(ops: list[Any], needed: Iterable[str]) -> list[Any]:
    """Drop ops whose outputs nothing needs (walking backwards from `needed`)."""
    want = set(needed)
    kept = []
    for op in reversed(ops):
        if any(v.name in want for v in op.outputs):
            kept.append(op)
            want.update(_reads(op))
    return list(reversed(kept))


def _feature(name: str, vtype: Any) -> Any:
    """A model-description multi-array feature for a static tensor type."""
    from coremltools.proto import FeatureTypes_pb2, MIL_pb2, Model_pb2

    feature = Model_pb2.FeatureDescription(name=name)
    array = feature.type.multiArrayType
    array.shape.extend(d.constant.size for d in vtype.tensorType.dimensions)
    dtype = MIL_pb2.DataType.Name(vtype.tensorType.dataType)
    array.dataType = FeatureTypes_pb2.ArrayFeatureType.ArrayDataType.Value(
        {"FLOAT16": "FLOAT16", "FLOAT32": "FLOAT32", "INT32": "INT32"}[dtype]
    )
    return feature


def _rewrite_weights(ops: list[Any], source: Path, dest_dir: Path) -> None:
    """Copy the blobs `ops` reference from `source` into a new `dest_dir/weight.bin`, updating offsets."""
    from ..mil.blob import BlobWriter

    dest_dir.mkdir(parents=True, exist_ok=True)
    moved: dict[int, int] = {}
    with BlobFile(source) as blobs, BlobWriter(dest_dir / "weight.bin") as writer:
        for op in ops:
            for value in _values(op):
                if not value.HasField("blobFileValue"):
                    continue
                old = value.blobFileValue.offset
                if old not in moved:
                    moved[old] = writer.copy(blobs, old)
                value.blobFileValue.offset = moved[old]


def chunk_package(package: Path, out1: Path, out2: Path) -> tuple[Path, Path]:
    """Write `out1` and `out2` (.mlpackage): `package` cut in two, chained by tensor names."""
    from .components import _quiet, import_coremltools

    ct = import_coremltools()
    spec = ct.utils.load_spec(str(package))
    weights_file = package / "Data" / "com.apple.CoreML" / "weights" / "weight.bin"
    function = spec.mlProgram.functions["main"]
    block = function.block_specializations[function.opset]
    if any(op.blocks for op in block.operations):
        raise ConversionError("Cannot chunk a program with control flow.")
    ops = list(block.operations)
    outputs = list(block.outputs)
    with BlobFile(weights_file) as weights:  # mapped, not read: a full Unet's file is gigabytes
        p = plan(ops, outputs, weights)
    types = {v.name: v.type for op in ops for v in op.outputs}

    # chunk 1: everything before the cut, the boundary as float32 outputs
    ops1 = [copy.deepcopy(op) for op in ops[: p.cut]]
    tail1 = []
    for name in p.boundary:
        vtype = types[name]
        if vtype.tensorType.dataType != _with_dtype(vtype, "FLOAT32").tensorType.dataType:
            _rename(ops1, name, f"{name}__chunk_fp16")
            tail1 += _cast_ops(f"{name}__chunk_fp16", name, _with_dtype(vtype, "FLOAT32"), "fp32")
    ops1 = _prune(ops1 + tail1, p.boundary)

    # chunk 2: the boundary as float32 inputs, constants it reads from before the cut, the rest
    rest = [copy.deepcopy(op) for op in ops[p.cut :]]
    head2 = []
    for name in p.boundary:
        vtype = types[name]
        if vtype.tensorType.dataType != _with_dtype(vtype, "FLOAT32").tensorType.dataType:
            _rename(rest, name, f"{name}__chunk_fp16")
            head2 += _cast_ops(name, f"{name}__chunk_fp16", vtype, "fp16")
    consts = [copy.deepcopy(op) for op in ops[: p.cut] if _is_const(op)]
    ops2 = _prune(consts + head2 + rest, outputs)
    read2 = {n for op in ops2 for n in _reads(op)}

    inputs = {v.name: v for v in function.inputs}
    in_features = {f.name: f for f in spec.description.input}
    boundary_inputs = []
    for name in p.boundary:
        var = copy.deepcopy(function.inputs[0])
        var.name = name
        var.type.CopyFrom(_with_dtype(types[name], "FLOAT32"))
        boundary_inputs.append(var)

    with tempfile.TemporaryDirectory(prefix=".chunk-", dir=package.parent) as tmp:
        results = []
        for index, (chunk_ops, chunk_outputs, chunk_inputs, dest) in enumerate(
            (
                (ops1, list(p.boundary), list(function.inputs), out1),
                (ops2, outputs, boundary_inputs + [v for n, v in inputs.items() if n in read2], out2),
            ),
            start=1,
        ):
            chunk = copy.deepcopy(spec)
            fn = chunk.mlProgram.functions["main"]
            del fn.inputs[:]
            fn.inputs.extend(chunk_inputs)
            blk = fn.block_specializations[fn.opset]
            del blk.operations[:]
            blk.operations.extend(chunk_ops)
            del blk.outputs[:]
            blk.outputs.extend(chunk_outputs)
            del chunk.description.input[:]
            for var in chunk_inputs:
                chunk.description.input.append(in_features.get(var.name) or _feature(var.name, var.type))
            if index == 1:
                del chunk.description.output[:]
                for name in p.boundary:
                    chunk.description.output.append(_feature(name, _with_dtype(types[name], "FLOAT32")))
            weights_dir = Path(tmp) / f"weights{index}"
            _rewrite_weights(list(blk.operations), weights_file, weights_dir)
            chunk.description.metadata.userDefined["com.github.coreml-hub.chunk"] = f"{index}/2"
            staged = Path(tmp) / dest.name
            with _quiet():
                ct.models.MLModel(chunk, weights_dir=str(weights_dir), skip_model_load=True).save(str(staged))
            results.append((staged, dest))
        for staged, dest in results:
            if dest.exists():
                shutil.rmtree(dest)
            staged.rename(dest)
    return out1, out2
