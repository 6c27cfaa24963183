"""`mil.proto`: .mlpackage specs read into the program model, checked against coremltools' own loader."""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np
import pytest

from coreml_hub.errors import InvalidBundle
from coreml_hub.mil import proto
from coreml_hub.mil.program import BlobRef, TensorType, TensorValue

ct = pytest.importorskip("coremltools", reason="coremltools writes the .mlpackage fixtures")
torch = pytest.importorskip("torch", reason="torch modules are converted into fixtures")

_BLOB_NUMPY = {1: np.float16, 2: np.float32, 3: np.uint8, 4: np.int8, 6: np.int16, 7: np.uint16, 14: np.int32, 15: np.uint32}


def read_blob_independently(value: TensorValue) -> np.ndarray:
    """Read a byte-aligned blob straight from the file layout (64-byte metadata at the offset)."""
    assert isinstance(value.data, BlobRef) and value.base_dir is not None
    file = value.base_dir / value.data.path.replace("@model_path/", "")
    raw = file.read_bytes()
    sentinel, dtype_code, size, data_offset = struct.unpack_from("<IIQQ", raw, value.data.offset)
    assert sentinel == 0xDEADBEEF
    data = np.frombuffer(raw[data_offset : data_offset + size], dtype=_BLOB_NUMPY[dtype_code])
    return data.reshape(value.type.static_shape)


class _Block(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(4, 8, 3, padding=1)
        self.norm = torch.nn.GroupNorm(2, 8)
        self.linear = torch.nn.Linear(8, 6)

    def forward(self, x: "torch.Tensor") -> "torch.Tensor":
        y = self.norm(self.conv(x)).permute(0, 2, 3, 1)
        return torch.cat([torch.nn.functional.gelu(self.linear(y)), y[..., :2]], dim=-1)


def _convert_torch(path: Path, precision: str) -> Path:
    torch.manual_seed(0)
    module = _Block().eval()
    example = torch.randn(1, 4, 8, 8)
    traced = torch.jit.trace(module, example)
    model = ct.convert(
        traced,
        inputs=[ct.TensorType(name="x", shape=example.shape)],
        outputs=[ct.TensorType(name="out")],
        convert_to="mlprogram",
        compute_precision=ct.precision.FLOAT16 if precision == "fp16" else ct.precision.FLOAT32,
        minimum_deployment_target=ct.target.iOS16,
    )
    model.save(str(path))
    return path


def _builder_program(path: Path) -> Path:
    """Every immediate dtype the spec stores, plus a palettized constant with sub-byte indices."""
    from coremltools.converters.mil import Builder as mb
    from coremltools.converters.mil.mil import types

    rng = np.random.default_rng(0)

    @mb.program(input_specs=[mb.TensorSpec(shape=(2, 3), dtype=types.fp32)], opset_version=ct.target.iOS18)
    def prog(x):  # type: ignore[no-untyped-def]
        consts = [
            mb.const(val=np.arange(6, dtype=np.float16).reshape(2, 3) - 2.5, name="c_fp16"),
            mb.const(val=np.int8([[-1, 2, 3], [4, 5, -6]]), name="c_int8"),
            mb.const(val=np.uint8([[1, 2, 3], [4, 5, 255]]), name="c_uint8"),
            mb.const(val=np.int32([[1, -2, 3], [2**31 - 1, 5, -(2**31)]]), name="c_int32"),
            mb.const(val=np.float32([[0.5, -1e-7, 3e38], [4, 5, 6]]), name="c_fp32"),
        ]
        flags = mb.const(val=np.array([True, False, True]), name="c_bool")
        scalar = mb.const(val=np.int32(7), name="c_int32_scalar")
        half_scalar = mb.const(val=np.float16(0.333), name="c_fp16_scalar")
        big = mb.const(val=rng.standard_normal((8, 2, 3)).astype(np.float16), name="c_blob_fp16")
        palettized = mb.constexpr_lut_to_dense(
            indices=np.array([[0, 1, 15], [3, 2, 9]], dtype=types.np_uint4_dtype),
            lut=np.arange(16, dtype=np.float32).reshape(1, 1, 16, 1),
            name="c_lut",
        )
        y = x
        for c in consts:
            y = mb.add(x=y, y=mb.cast(x=c, dtype="fp32"))
        y = mb.add(x=y, y=mb.cast(x=mb.cast(x=flags, dtype="int32"), dtype="fp32"))
        y = mb.mul(x=y, y=mb.cast(x=scalar, dtype="fp32"))
        y = mb.mul(x=y, y=mb.cast(x=half_scalar, dtype="fp32"))
        y = mb.add(x=y, y=mb.cast(x=mb.gather(x=big, indices=np.int32(3), axis=0), dtype="fp32"))
        y = mb.add(x=y, y=palettized)
        return mb.concat(values=[y], axis=0, name="out")

    model = ct.convert(
        prog,
        convert_to="mlprogram",
        pass_pipeline=ct.PassPipeline.EMPTY,
        minimum_deployment_target=ct.target.iOS18,
    )
    model.save(str(path))
    return path


@pytest.fixture(scope="module")
def packages(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("proto")
    return {
        "torch_fp16": _convert_torch(root / "torch_fp16.mlpackage", "fp16"),
        "torch_fp32": _convert_torch(root / "torch_fp32.mlpackage", "fp32"),
        "builder_ios18": _builder_program(root / "builder.mlpackage"),
    }


def _pymil(path: Path):  # type: ignore[no-untyped-def]
    from coremltools.converters.mil.frontend.milproto.load import load

    spec = ct.models.MLModel(str(path), skip_model_load=True).get_spec()
    weights = path / "Data" / "com.apple.CoreML" / "weights"
    return load(spec, spec.specificationVersion, file_weights_dir=str(weights))


def _pymil_dtype(var) -> str:  # type: ignore[no-untyped-def]
    from coremltools.converters.mil.mil import types

    dtype = var.dtype if not types.is_tensor(var.sym_type) else var.sym_type.get_primitive()
    return types.builtin_to_string(dtype)


def _as_array(value: TensorValue) -> np.ndarray:
    return read_blob_independently(value) if value.is_blob else np.asarray(value.data)


def _same(ours: TensorValue, theirs) -> None:  # type: ignore[no-untyped-def]
    expected = np.asarray(theirs)
    actual = _as_array(ours)
    if ours.type.dtype == "string":
        assert actual.dtype == object and actual.shape == ()
        assert actual.item() == str(theirs)
        return
    assert actual.dtype == ours.type.numpy_dtype
    assert actual.shape == ours.type.static_shape == expected.shape
    np.testing.assert_array_equal(actual, expected.astype(actual.dtype))


@pytest.mark.slow
@pytest.mark.parametrize("name", ["torch_fp16", "torch_fp32", "builder_ios18"])
def test_matches_coremltools_loader(packages: dict[str, Path], name: str) -> None:
    path = packages[name]
    ours = proto.load_program(path)
    theirs = _pymil(path).functions["main"]

    main = ours.main
    assert main.opset == ("ios18" if name == "builder_ios18" else "ios16")
    assert [v.name for v in main.inputs] == list(theirs.inputs)
    for var in main.inputs:
        assert var.type.shape == tuple(theirs.inputs[var.name].shape)
        assert var.type.dtype == _pymil_dtype(theirs.inputs[var.name])
    assert main.outputs == tuple(v.name for v in theirs.outputs)

    their_vars = {out.name: out for op in theirs.operations for out in op.outputs}
    checked_values = 0
    for op in main.block.operations:
        for out in op.outputs:
            var = their_vars[out.name]
            assert out.type.dtype == _pymil_dtype(var), out.name
            assert out.type.shape == tuple(var.shape), out.name
            if op.type == "const":
                _same(op.attributes["val"], var.val)
                checked_values += 1
        their_op = their_vars[op.outputs[0].name].op
        assert their_op.op_type == op.type
        for key, binding in op.inputs.items():
            their_binding = their_op.inputs[key]
            args = binding if isinstance(binding, tuple) else (binding,)
            their_args = their_binding if isinstance(their_binding, (list, tuple)) else (their_binding,)
            assert len(args) == len(their_args)
            for arg, their_arg in zip(args, their_args):
                if isinstance(arg, str):
                    assert arg == their_arg.name
                else:
                    _same(arg, their_arg.val)
                    checked_values += 1
    assert checked_values >= 8


@pytest.mark.slow
def test_immediate_dtypes_are_exact(packages: dict[str, Path]) -> None:
    program = proto.load_program(packages["builder_ios18"])
    consts = {op.outputs[0].name: op.attributes["val"] for op in program.main.block.operations if op.type == "const"}
    assert consts["c_fp16"].type == TensorType("fp16", (2, 3))
    np.testing.assert_array_equal(consts["c_fp16"].data, np.arange(6, dtype=np.float16).reshape(2, 3) - 2.5)
    assert consts["c_int8"].data.dtype == np.int8 and consts["c_int8"].data[1, 2] == -6
    assert consts["c_uint8"].data.dtype == np.uint8 and consts["c_uint8"].data[1, 2] == 255
    assert consts["c_int32"].data[1, 2] == -(2**31)
    assert consts["c_fp32"].data[0, 2] == np.float32(3e38)
    assert consts["c_bool"].data.dtype == np.bool_ and consts["c_bool"].data.tolist() == [True, False, True]
    scalar = consts["c_int32_scalar"]
    assert scalar.type == TensorType("int32", ()) and scalar.data.shape == () and scalar.data.dtype == np.int32
    half = consts["c_fp16_scalar"]
    assert half.type == TensorType("fp16", ()) and half.data == np.float16(0.333)
    assert consts["c_blob_fp16"].is_blob
    assert consts["c_blob_fp16"].base_dir == packages["builder_ios18"] / "Data" / "com.apple.CoreML"
    names = [op.name for op in program.main.block.operations if op.type == "const"]
    assert all(isinstance(n, str) for n in names)
    strings = [v for v in consts.values() if v.type.dtype == "string"]
    assert strings and all(s.data.dtype == object and isinstance(s.data.item(), str) for s in strings)

    lut = next(op for op in program.main.block.operations if op.type == "constexpr_lut_to_dense")
    indices = lut.inputs["indices"]
    assert isinstance(indices, TensorValue) and indices.type == TensorType("uint4", (2, 3))
    np.testing.assert_array_equal(indices.data, [[0, 1, 15], [3, 2, 9]])


@pytest.mark.slow
def test_variadic_inputs_and_single_arguments(packages: dict[str, Path]) -> None:
    program = proto.load_program(packages["builder_ios18"])
    concat = next(op for op in program.main.block.operations if op.type == "concat")
    assert isinstance(concat.inputs["values"], tuple) and len(concat.inputs["values"]) == 1
    assert isinstance(concat.inputs["axis"], str)
    add = next(op for op in program.main.block.operations if op.type == "add")
    assert all(isinstance(b, str) for b in add.inputs.values())


@pytest.mark.slow
def test_program_attributes_and_description(packages: dict[str, Path]) -> None:
    program = proto.load_program(packages["torch_fp16"])
    assert program.version == "1.0"
    build = program.attributes["buildInfo"]
    keys = {str(k.data.item()) for k, _ in build.items}
    assert "coremltools-version" in keys
    assert program.op_histogram()["conv"] == 1
    assert program.base_dir == packages["torch_fp16"] / "Data" / "com.apple.CoreML"

    desc = proto.model_description(packages["torch_fp16"])
    assert desc.inputs == (proto.FeatureDescription("x", (1, 4, 8, 8), "fp16"),)
    assert desc.outputs[0].name == "out" and desc.outputs[0].shape == (1, 8, 8, 8)
    assert desc.specification_version >= 7
    desc32 = proto.model_description(packages["torch_fp32"])
    assert desc32.inputs[0].dtype == "fp32"


@pytest.mark.slow
def test_model_file_and_package_agree(packages: dict[str, Path]) -> None:
    pkg = packages["torch_fp32"]
    from_file = proto.load_program(pkg / "Data" / "com.apple.CoreML" / "model.mlmodel")
    assert from_file == proto.load_program(pkg)


def test_broken_inputs_raise_typed_errors(tmp_path: Path) -> None:
    with pytest.raises(InvalidBundle, match="No such model"):
        proto.load_program(tmp_path / "missing.mlpackage")
    empty = tmp_path / "empty.mlpackage"
    empty.mkdir()
    with pytest.raises(InvalidBundle, match="no Core ML model spec"):
        proto.load_program(empty)
    garbage = tmp_path / "garbage.mlmodel"
    garbage.write_bytes(b"\xff\xff\xff\xff not a protobuf")
    with pytest.raises(InvalidBundle, match="not a readable"):
        proto.load_program(garbage)


def test_unpack_bits_is_lsb_first() -> None:
    # values 1, 2, 3, 15 as uint4: low nibble first
    raw = bytes([0x21, 0xF3])
    np.testing.assert_array_equal(proto.unpack_bits(raw, 4, 4), [1, 2, 3, 15])
    np.testing.assert_array_equal(proto.unpack_bits(raw, 4, 4, signed=True), [1, 2, 3, -1])
    np.testing.assert_array_equal(proto.unpack_bits(bytes([0b10110001]), 1, 8), [1, 0, 0, 0, 1, 1, 0, 1])
    # uint3 across a byte boundary: 5, 6, 7 -> bits 101 011 111 (LSB first per value)
    packed = 5 | (6 << 3) | (7 << 6)
    np.testing.assert_array_equal(proto.unpack_bits(packed.to_bytes(2, "little"), 3, 3), [5, 6, 7])


def test_opset_names() -> None:
    assert proto.opset_name("CoreML5") == "ios15"
    assert proto.opset_name("CoreML8") == "ios18"
    assert proto.opset_name("CoreML9") == "ios19"

