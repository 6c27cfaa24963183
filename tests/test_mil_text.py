"""model.mil: parsing real compiler output, printing it back, both scalar styles, errors."""

from __future__ import annotations

import json
import re
import time
import tracemalloc
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from coreml_hub.mil import text
from coreml_hub.mil.program import (
    BlobRef,
    DictType,
    DictValue,
    ListType,
    ListValue,
    StateType,
    TensorType,
    TensorValue,
    TupleType,
)
from coreml_hub.mil.text import MILSyntaxError, dumps, loads

from _mil_fixtures import SAMPLES, SAMPLES_MISSING, package_to_compiled, torch_modules, convert_package

REAL_FILES = sorted(SAMPLES.glob("*.mil")) + sorted(SAMPLES.glob("bundles/*.mlmodelc/model.mil"))
needs_samples = pytest.mark.skipif(not REAL_FILES, reason=SAMPLES_MISSING)


def _id(path: Path) -> str:
    return path.parent.name if path.name == "model.mil" else path.name


def _statement_ops(source: str) -> Counter[str]:
    """Op types counted straight from the text, one per `... = op(` statement."""
    return Counter(re.findall(r"^\s+[^\n]*?\s=\s([A-Za-z_][A-Za-z0-9_]*)\(", source, flags=re.M))


@needs_samples
@pytest.mark.parametrize("path", REAL_FILES, ids=_id)
def test_real_files_parse_and_print_back_identically(path: Path) -> None:
    source = path.read_text()
    program = text.load(path)
    assert program.op_histogram() == _statement_ops(source)
    assert dumps(program) == source.rstrip("\n")
    assert loads(dumps(program)) == program
    assert "coremlc-version" in {k.data.item() for k, _ in program.attributes["buildInfo"].items}
    assert program.main.opset in {"ios15", "ios16", "ios17"}


@needs_samples
@pytest.mark.parametrize("bundle", sorted(SAMPLES.glob("bundles/*.mlmodelc")), ids=lambda p: p.name)
def test_real_histograms_match_apples_metadata(bundle: Path) -> None:
    metadata = json.loads((bundle / "metadata.json").read_text())[0]
    expected: Counter[str] = Counter()
    for key, count in metadata["mlProgramOperationTypeHistogram"].items():
        name = key.split(".", 1)[-1]  # "Ios16.constexprAffineDequantize", "SliceByIndex"
        expected[re.sub(r"(?<!^)([A-Z])", r"_\1", name).lower()] += count
    histogram = text.load(bundle).op_histogram()
    del histogram["const"]  # Core ML's histogram leaves out constants
    assert histogram == expected


@needs_samples
@pytest.mark.parametrize("name", ["unified_int8", "unified_palette_4bit"])
def test_compiled_text_and_package_protobuf_load_to_the_same_program(name: str) -> None:
    """The .mlmodelc Apple compiled from a .mlpackage: model.mil (our parser) and the spec
    (the protobuf loader) give the same ops, values and weight references."""
    from coreml_hub.mil.proto import load_program

    compiled = text.load(SAMPLES / "bundles" / f"{name}.mlmodelc")
    package = load_program(SAMPLES / "bundles" / f"{name}.mlpackage")
    assert compiled.main.block == package.main.block
    assert sorted(compiled.main.inputs, key=lambda v: v.name) == sorted(package.main.inputs, key=lambda v: v.name)
    ours = {(op.name, key): v.array() for op, key, v in compiled.blob_values()}
    theirs = {(op.name, key): v.array() for op, key, v in package.blob_values()}
    assert ours.keys() == theirs.keys()
    for key in ours:
        assert ours[key].tobytes() == theirs[key].tobytes()


@needs_samples
def test_real_blob_constants_read_like_coremltools() -> None:
    storage = pytest.importorskip("coremltools.libmilstoragepython")
    bundle = SAMPLES / "bundles" / "unified_palette_4bit.mlmodelc"
    reader = storage._BlobStorageReader(str(bundle / "weights" / "weight.bin"))
    read = {"fp16": reader.read_fp16_data, "fp32": reader.read_float_data, "uint8": reader.read_uint8_data}
    checked = 0
    for _op, _key, value in text.load(bundle).blob_values():
        theirs = np.asarray(read[value.type.dtype](value.data.offset))
        assert value.array().shape == value.type.static_shape
        assert value.array().tobytes() == theirs.tobytes()
        checked += 1
    assert checked == 20


@needs_samples
def test_flexible_shape_attribute_and_unknown_dims() -> None:
    program = text.load(SAMPLES / "fluidaudio_transpose_encoder.mil")
    (x,) = program.main.inputs
    assert x.type == TensorType("fp16", (1, "?", "?"))
    info = program.main.attributes["FlexibleShapeInformation"]
    assert isinstance(info, ListValue) and isinstance(info.type, TupleType)
    default, ranges = info.items
    assert default.items[0].data.item() == "DefaultShapes"
    (key, shape), = default.items[1].items
    assert key.data.item() == "x" and shape.data.tolist() == [1, 1, 1]
    assert isinstance(ranges.items[1].type, DictType)
    ((_, bounds),) = ranges.items[1].items
    assert isinstance(bounds.type, ListType) and bounds.type.length is None
    assert [b.data.tolist() for b in bounds.items] == [[1, 1], [1, 2048], [1, 2048]]


@needs_samples
def test_multi_output_ops_and_special_floats() -> None:
    program = text.load(SAMPLES / "fluidaudio_joint_decision.mil")
    topk = next(op for op in program.main.block.operations if op.type == "topk")
    assert [v.type.dtype for v in topk.outputs] == ["fp16", "uint16"]
    decoder = text.load(SAMPLES / "fluidaudio_decoder.mil")
    lstm = next(op for op in decoder.main.block.operations if op.type == "lstm")
    assert len(lstm.outputs) == 3
    silero = text.load(SAMPLES / "bundles" / "unified_int8.mlmodelc")
    infs = [op.attributes["val"].data for op in silero.main.block.operations
            if op.type == "const" and op.attributes["val"].type.dtype == "fp16"
            and op.attributes["val"].type.shape == () and np.isinf(op.attributes["val"].data)]
    assert infs and all(v == -np.inf and v.dtype == np.float16 for v in infs)


# -- the iOS 18 spelling -------------------------------------------------------------------

NEW_STYLE = """program(1.3)
[buildInfo = dict<string, string>({{"coremlc-component-MIL", "3510.2.1"}, {"coremlc-version", "3505.4.1"}})]
{
    func main<ios18>(tensor<fp32, [1, 4, 1, 8]> x, fp16 scale, state<tensor<fp16, [1, 8]>> cache) {
            string pad_type = const()[name = string("pad_type"), val = string("valid")];
            int32 groups = const()[name = string("groups"), val = int32(1)];
            fp16 eps = const()[name = string("eps"), val = fp16(0x1.8p-3)];
            bool interleave = const()[name = string("interleave"), val = bool(false)];
            tensor<fp16, [8, 4, 1, 1]> W = const()[name = string("W"), val = tensor<fp16, [8, 4, 1, 1]>(BLOBFILE(path = string("@model_path/weights/weight.bin"), offset = uint64(64)))];
            tensor<fp16, [32, 32]> dense = constexpr_sparse_to_dense(mask = tensor<uint1, [32, 32]>(BLOBFILE(path = string("@model_path/weights/weight.bin"), offset = uint64(192))), nonzero_data = tensor<fp16, [3]>([0x1p+0, -inf, nan]))[name = string("dense")];
            tensor<fp16, [1, 8]> y = concat(axis = groups, interleave = interleave, values = (x, x))[name = string("y")];
        } -> (y);
}"""


def test_new_style_parses_and_prints_back() -> None:
    program = loads(NEW_STYLE)
    assert dumps(program) == NEW_STYLE
    main = program.main
    assert main.opset == "ios18"
    assert main.inputs[1].type == TensorType("fp16", ())
    assert main.inputs[2].type == StateType(TensorType("fp16", (1, 8)))
    ops = {op.name: op for op in main.block.operations}
    assert ops["pad_type"].attributes["val"].data.dtype == object
    assert ops["pad_type"].attributes["val"].data.item() == "valid"
    assert ops["eps"].attributes["val"].data.item() == 0.1875
    assert ops["W"].attributes["val"].data == BlobRef("@model_path/weights/weight.bin", 64)
    mask = ops["dense"].inputs["mask"]
    assert isinstance(mask, TensorValue) and mask.type == TensorType("uint1", (32, 32))
    assert ops["y"].inputs["values"] == ("x", "x")


def test_scalar_style_follows_the_version_and_can_be_forced() -> None:
    program = loads(NEW_STYLE)
    old = dumps(program, style="tensor")
    assert 'tensor<string, []>("valid")' in old and "tensor<uint64, []>(64)" in old
    assert "tensor<fp16, []> scale" in old
    assert loads(old) == program
    program.version = "1.0"
    assert dumps(program) == old.replace("program(1.3)", "program(1.0)", 1)
    with pytest.raises(ValueError):
        dumps(program, style="fancy")


# -- values ----------------------------------------------------------------------------------

def _const(type_text: str, literal: str) -> TensorValue:
    source = ("program(1.0)\n{\n    func main<ios16>() {\n"
              f"            {type_text} c = const()[name = tensor<string, []>(\"c\"), val = {type_text}({literal})];\n"
              "        } -> (c);\n}")
    program = loads(source)
    assert dumps(program) == source or loads(dumps(program)) == program
    return program.main.block.operations[0].attributes["val"]


@pytest.mark.parametrize("literal,value", [
    ("0x1p+0", 1.0), ("-0x1.8p-3", -0.1875), ("0x1.e28358p-6", float.fromhex("0x1.e28358p-6")),
    ("0x1p-149", 2.0**-149), ("0x0p+0", 0.0), ("1.5", 1.5), ("-2", -2.0), ("1e-3", 1e-3),
    ("inf", np.inf), ("-inf", -np.inf),
])
def test_float_spellings(literal: str, value: float) -> None:
    assert _const("tensor<fp32, []>", literal).data.item() == np.float32(value)


def test_nan_and_signed_zero_survive_a_round_trip() -> None:
    value = _const("tensor<fp32, [3]>", "[nan, -0x0p+0, 0x0p+0]")
    assert np.isnan(value.data[0]) and np.signbit(value.data[1]) and not np.signbit(value.data[2])


@pytest.mark.parametrize("value,printed", [
    (1.0, "0x1p+0"), (0.1875, "0x1.8p-3"), (-0.0, "-0x0p+0"), (2.0**-24, "0x1p-24"), (65504.0, "0x1.ffcp+15"),
    (np.inf, "inf"), (-np.inf, "-inf"), (np.nan, "nan"),
])
def test_floats_print_as_c99_hex(value: float, printed: str) -> None:
    assert text._hex_float(value) == printed


def test_tensor_literals() -> None:
    assert _const("tensor<fp16, [2, 3]>", "[[0x1p+0, 0x1p+1, 0x1.8p+1], [0x0p+0, -0x1p+0, inf]]").data.tolist() \
        == [[1, 2, 3], [0, -1, np.inf]]
    assert _const("tensor<fp32, [0]>", "[]").data.shape == (0,)
    assert _const("tensor<fp32, [2, 0]>", "[[], []]").data.shape == (2, 0)
    assert _const("tensor<int32, [3]>", "[-1, 0, 2147483647]").data.dtype == np.int32
    assert _const("tensor<uint64, []>", "18446744073709551615").data.item() == 2**64 - 1
    assert _const("tensor<bool, [2]>", "[true, false]").data.tolist() == [True, False]
    strings = _const("tensor<string, [3]>", r'["a\"b", "tab\there", "ü\\"]').data
    assert strings.dtype == object and strings.tolist() == ['a"b', "tab\there", "ü\\"]
    assert _const("tensor<int4, [2]>", "[-8, 7]").data.tolist() == [-8, 7]
    bf16 = _const("tensor<bf16, [2]>", "[0x1p+0, -0x1.8p+1]")
    assert bf16.data.dtype == np.uint16 and bf16.data.tolist() == [0x3F80, 0xC040]


def test_dict_list_tuple_literals_round_trip() -> None:
    dict_value = _const("dict<tensor<string, []>, tensor<int32, [?]>>", '{{"a", [1, 2]}, {"b", []}}')
    assert isinstance(dict_value, DictValue) and [v.data.tolist() for _, v in dict_value.items] == [[1, 2], []]
    list_value = _const("list<tensor<int32, []>, 3>", "[1, 2, 3]")
    assert isinstance(list_value, ListValue) and [v.data.item() for v in list_value.items] == [1, 2, 3]
    tuple_value = _const("tuple<tensor<string, []>, tensor<bool, []>>", '("x", true)')
    assert [v.data.item() for v in tuple_value.items] == ["x", True]


def test_nested_blocks_round_trip() -> None:
    source = """program(1.0)
{
    func main<ios16>(tensor<bool, []> p, tensor<fp32, [2]> x) {
            tensor<fp32, [2]> y = cond(pred = p)[name = tensor<string, []>("y")] {
                block() {
                    tensor<fp32, [2]> a = relu(x = x)[name = tensor<string, []>("a")];
                } -> (a);
                block() {
                } -> (x);
            };
            tensor<int32, []> n = while_loop(loop_vars = (y))[name = tensor<string, []>("n")] {
                block(tensor<fp32, [2]> v) {
                    tensor<bool, []> go = less(x = v, y = v)[name = tensor<string, []>("go")];
                } -> (go);
            };
        } -> (y, n);
}"""
    program = loads(source)
    assert dumps(program) == source
    cond, loop = program.main.block.operations
    assert [len(b.operations) for b in cond.blocks] == [1, 0]
    assert loop.blocks[0].inputs[0].name == "v"
    assert program.op_histogram() == Counter({"cond": 1, "relu": 1, "while_loop": 1, "less": 1})


# -- errors ------------------------------------------------------------------------------------

SMALL = """program(1.0)
{
    func main<ios16>(tensor<fp16, [1, 10]> x) {
            tensor<int32, []> a = const()[name = tensor<string, []>("a"), val = tensor<int32, []>(-1)];
            tensor<fp16, [1, 10]> y = mul(x = x, y = x)[name = tensor<string, []>("y")];
        } -> (y);
}"""


@pytest.mark.parametrize("old,new,line,column,reason", [
    ('(-1)];', "(-1)];;", 4, 104, "expected a type, found ';'"),
    ('[name = tensor<string, []>("y")]', '[name = tensor<string, []>("y")', 5, 87,
     "expected ']', found ';'"),
    ("tensor<fp16, [1, 10]> y", "tensor<fp99, [1, 10]> y", 5, 13, "unknown data type 'fp99'"),
    ("(-1)", "(-1.5)", 4, 99, "expected an integer, found '-1.5'"),
    ("(-1)", "(4294967296)", 4, 99, "4294967296 is out of range for int32"),
    ('"a")', '"a)', 4, 69, "expected a string, found '\"'"),
    ("} -> (y);", "}", 7, 1, "expected '->', found '}'"),
    ("y = mul(x = x, y = x)", "y = mul(x = x, x = x)", 5, 50, "input 'x' given twice"),
    ("func main", "fun main", 3, 5, "expected 'func' or '}', found 'fun'"),
    ("[1, 10]> x", "[1, -10]> x", 3, 22, "invalid dimension '-10'"),
])
def test_syntax_errors_say_where_and_what(old: str, new: str, line: int, column: int, reason: str) -> None:
    assert old in SMALL
    with pytest.raises(MILSyntaxError) as caught:
        loads(SMALL.replace(old, new, 1))
    assert (caught.value.line, caught.value.column, caught.value.reason) == (line, column, reason)
    assert caught.value.message.startswith(f"{line}:{column}: {reason}")


def test_truncation_is_an_end_of_file_error() -> None:
    with pytest.raises(MILSyntaxError) as caught:
        loads(SMALL[:200])
    assert "end of file" in caught.value.reason
    with pytest.raises(MILSyntaxError, match="expected 'program"):
        loads("")


def test_declared_shapes_never_allocate() -> None:
    tracemalloc.start()
    try:
        with pytest.raises(MILSyntaxError) as caught:
            _const("tensor<fp32, [100000000000, 100000000000]>", "[[0x1p+0]]")
        assert tracemalloc.get_traced_memory()[1] < 1 << 22
    finally:
        tracemalloc.stop()
    assert caught.value.reason == "tensor literal has shape [1, 1], its type declares [100000000000, 100000000000]"
    with pytest.raises(MILSyntaxError, match="ragged tensor literal"):
        _const("tensor<fp32, [2, 2]>", "[[0x1p+0, 0x1p+0], [0x1p+0]]")
    with pytest.raises(MILSyntaxError, match="list of declared length 4 holds 1 values"):
        _const("list<tensor<int32, []>, 4>", "[1]")


def test_deep_nesting_is_refused_not_recursed() -> None:
    deep_type = "list<" * 5000 + "tensor<int32, []>" + ", ?>" * 5000
    start = time.perf_counter()
    with pytest.raises(MILSyntaxError, match="nesting deeper than 48 levels"):
        _const(deep_type, "[]")
    deep_blocks = SMALL.replace("} -> (y);", "} -> (y);" + "".join(
        f"tensor<fp16, [1]> c{i} = cond(pred = x)[name = tensor<string, []>(\"c\")] {{ block() {{" for i in range(100)))
    with pytest.raises(MILSyntaxError):
        loads(deep_blocks)
    with pytest.raises(MILSyntaxError, match="expected a number"):
        _const("tensor<fp32, [1]>", "[" * 10000 + "]" * 10000)
    assert time.perf_counter() - start < 5


def test_load_reports_files_it_cannot_read(tmp_path: Path) -> None:
    with pytest.raises(MILSyntaxError, match="file not found"):
        text.load(tmp_path / "nope.mlmodelc")
    (tmp_path / "model.mil").write_bytes(SMALL.encode()[:100] + b"\xff\xfe" + SMALL.encode()[100:])
    with pytest.raises(MILSyntaxError) as caught:
        text.load(tmp_path)
    assert (caught.value.reason, caught.value.line) == ("not UTF-8 text", 4)


# -- programs from coremltools, through the printer ---------------------------------------------

@pytest.fixture(scope="module")
def converted(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("converted")
    modules = torch_modules(einsum=True)
    return convert_package(modules["unet"], [("sample", (2, 4, 8, 8), None), ("timestep", (2,), None),
                                             ("encoder_hidden_states", (2, 32, 1, 77), None)],
                           ["noise_pred"], folder / "unet.mlpackage")


def test_a_converted_package_prints_and_parses_to_the_same_program(converted: Path, tmp_path: Path) -> None:
    from coreml_hub.mil.proto import load_program

    program = load_program(converted)
    assert loads(dumps(program), base_dir=program.base_dir) == program
    assert program.op_histogram()["einsum"] == 1
    compiled = package_to_compiled(converted, tmp_path / "Unet.mlmodelc")
    reloaded = text.load(compiled)
    assert reloaded.op_histogram() == program.op_histogram()
    weights = {op.name: v.array() for op, _k, v in reloaded.blob_values()}
    for op, _key, value in load_program(converted).blob_values():
        assert weights[op.name].tobytes() == value.array().tobytes()
