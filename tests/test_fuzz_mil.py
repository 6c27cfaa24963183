"""Property tests and a fuzz run: generated programs round-trip through model.mil text; damaged
text, weight files and bundles give typed errors or problems, never another exception or a hang.

COREML_HUB_FUZZ_EXAMPLES scales the number of examples (default 150 per property).
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
import tracemalloc
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from coreml_hub.bundle import verify
from coreml_hub.mil.blob import BlobError, BlobFile, BlobWriter
from coreml_hub.mil.program import (
    DTYPES,
    VARIADIC_INPUTS,
    BlobRef,
    Block,
    DictType,
    DictValue,
    Function,
    ListType,
    ListValue,
    Operation,
    Program,
    StateType,
    TensorType,
    TensorValue,
    TupleType,
    Var,
)
from coreml_hub.mil.text import MILSyntaxError, dumps, loads

from _mil_fixtures import SAMPLES, sd_specs, write_compiled

pytestmark = pytest.mark.extended  # extended tier: property tests of the MIL readers

EXAMPLES = int(os.environ.get("COREML_HUB_FUZZ_EXAMPLES", "150"))
FUZZ = settings(max_examples=EXAMPLES, deadline=None, derandomize=False,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                       HealthCheck.function_scoped_fixture])
TIME_LIMIT = 5.0  # seconds for one parse or check of a small input: anything slower is a hang

# -- generated programs ---------------------------------------------------------------------

RESERVED = set(DTYPES) | {"tensor", "dict", "list", "tuple", "state", "BLOBFILE", "block", "func", "program",
                          "true", "false", "inf", "nan"}
names = st.from_regex(r"[A-Za-z_][A-Za-z0-9_]{0,6}(\.[a-z0-9]{1,3})?", fullmatch=True)
op_types = names.filter(lambda n: n not in RESERVED)
value_dtypes = st.sampled_from(sorted(d for d in DTYPES if d not in ("fp8e4m3fn", "fp8e5m2")))
static_shapes = st.lists(st.integers(0, 3), min_size=0, max_size=3).map(tuple)
texts = st.text(st.characters(exclude_categories=["Cs"]), max_size=12)


def _canonical_floats(array: np.ndarray) -> np.ndarray:
    """NaN payloads do not survive text (it has only `nan`/`-nan`): keep NaNs canonical."""
    flat = array.reshape(-1)
    for i, x in enumerate(flat):
        if np.isnan(x):
            flat[i] = -np.nan if np.signbit(x) else np.nan
    return array


@st.composite
def tensor_data(draw: Any, dtype: str, shape: tuple[int, ...]) -> np.ndarray:
    count = int(np.prod(shape, dtype=np.int64))
    if dtype == "string":
        array = np.empty(count, dtype=object)
        array[:] = draw(st.lists(texts, min_size=count, max_size=count))
        return array.reshape(shape)
    if dtype == "bool":
        return np.array(draw(st.lists(st.booleans(), min_size=count, max_size=count)), dtype=bool).reshape(shape)
    if dtype in ("fp16", "fp32", "fp64"):
        width = {"fp16": 16, "fp32": 32, "fp64": 64}[dtype]
        values = draw(st.lists(st.floats(width=width), min_size=count, max_size=count))
        return _canonical_floats(np.array(values, dtype=DTYPES[dtype]).reshape(shape))
    if dtype == "bf16":
        floats = draw(st.lists(st.floats(width=32, allow_nan=False), min_size=count, max_size=count))
        return (np.array(floats, np.float32).view(np.uint32) >> 16).astype(np.uint16).reshape(shape)
    from coreml_hub.mil.text import _INT_RANGES

    low, high = _INT_RANGES[dtype]
    values = draw(st.lists(st.integers(low, high), min_size=count, max_size=count))
    return np.array(values, dtype=DTYPES[dtype]).reshape(shape)


@st.composite
def tensor_values(draw: Any) -> TensorValue:
    dtype = draw(value_dtypes)
    shape = draw(static_shapes)
    if dtype not in ("string", "bool", "int64", "uint64", "fp64") and draw(st.integers(0, 4)) == 0:
        ref = BlobRef(draw(st.sampled_from(["@model_path/weights/weight.bin", "@model_path/w/other.bin"])),
                      draw(st.integers(0, 2**64 - 1)))
        return TensorValue(TensorType(dtype, shape), ref)
    return TensorValue(TensorType(dtype, shape), draw(tensor_data(dtype, shape)))


def _literal_for(vtype: Any) -> Any:
    """A strategy for values of exactly this type (elements inside dicts/lists/tuples)."""
    if isinstance(vtype, TensorType):
        return tensor_data(vtype.dtype, vtype.shape).map(lambda a, t=vtype: TensorValue(t, a))
    if isinstance(vtype, DictType):
        pair = st.tuples(_literal_for(vtype.key), _literal_for(vtype.value))
        return st.lists(pair, max_size=2).map(lambda items, t=vtype: DictValue(t, tuple(items)))
    if isinstance(vtype, TupleType):
        return st.tuples(*[_literal_for(e) for e in vtype.elements]).map(lambda items, t=vtype: ListValue(t, items))
    count = vtype.length
    return st.lists(_literal_for(vtype.element), min_size=count or 0, max_size=count if count is not None else 2) \
        .map(lambda items, t=vtype: ListValue(t, tuple(items)))


value_types = st.recursive(
    st.builds(TensorType, value_dtypes, st.lists(st.integers(0, 2), max_size=2).map(tuple)),
    lambda inner: st.one_of(
        st.builds(DictType, st.builds(TensorType, st.sampled_from(["string", "int32"]), st.just(())), inner),
        st.builds(lambda e: TupleType(tuple(e)), st.lists(inner, min_size=1, max_size=3)),
        st.builds(ListType, inner, st.one_of(st.none(), st.integers(0, 2))),
    ),
    max_leaves=4,
)
values = st.one_of(tensor_values(), value_types.flatmap(_literal_for))

var_dims = st.one_of(st.integers(0, 64), st.just("?"), st.sampled_from(["is0", "is1", "batch"]))
var_types = st.one_of(
    st.builds(TensorType, value_dtypes, st.one_of(st.none(), st.lists(var_dims, max_size=4).map(tuple))),
    value_types,
)


@st.composite
def operations(draw: Any, depth: int = 0) -> Operation:
    op_type = draw(op_types)
    outputs = tuple(Var(n, t) for n, t in draw(st.lists(st.tuples(names, var_types), max_size=3)))
    inputs: dict[str, Any] = {}
    for key in draw(st.lists(names, max_size=4, unique=True)):
        arg = st.one_of(names, values)
        if (op_type, key) in VARIADIC_INPUTS or draw(st.booleans()):
            size = (1, 3) if (op_type, key) in VARIADIC_INPUTS else (2, 3)
            inputs[key] = tuple(draw(st.lists(arg, min_size=size[0], max_size=size[1])))
        else:
            inputs[key] = draw(arg)
    attributes = dict(draw(st.dictionaries(names, values, max_size=2)))
    blocks: tuple[Block, ...] = ()
    if depth < 2 and draw(st.integers(0, 5)) == 0:
        blocks = tuple(draw(st.lists(blocks_(depth + 1), min_size=1, max_size=2)))
    return Operation(op_type, inputs, outputs, attributes, blocks)


@st.composite
def blocks_(draw: Any, depth: int) -> Block:
    ops = draw(st.lists(operations(depth), max_size=2))
    params = tuple(Var(n, t) for n, t in draw(st.lists(st.tuples(names, var_types), max_size=2)))
    return Block(ops, tuple(draw(st.lists(names, max_size=2))), params)


@st.composite
def programs(draw: Any) -> Program:
    functions = {}
    for name in draw(st.lists(names, min_size=1, max_size=2, unique=True)):
        input_types = st.one_of(var_types, var_types.map(StateType))
        inputs = tuple(Var(n, t) for n, t in draw(st.lists(st.tuples(names, input_types), max_size=3)))
        block = Block(draw(st.lists(operations(), max_size=4)), tuple(draw(st.lists(names, max_size=3))))
        attributes = draw(st.dictionaries(names, values, max_size=1))
        functions[name] = Function(name, draw(st.sampled_from(["ios15", "ios16", "ios17", "ios18"])), inputs,
                                   block, attributes)
    attributes = draw(st.dictionaries(names, values, max_size=2))
    return Program(draw(st.sampled_from(["1.0", "1.3", "1"])), functions, attributes)


@settings(FUZZ, phases=[Phase.explicit, Phase.reuse, Phase.generate])  # shrinking these takes minutes
@given(programs())
def test_generated_programs_round_trip_in_both_styles(program: Program) -> None:
    for style in (None, "bare", "tensor"):
        text = dumps(program, style=style)
        assert loads(text) == program
    assert dumps(loads(dumps(program))) == dumps(program)


# -- damaged text -----------------------------------------------------------------------------


def _seed_texts() -> list[str]:
    found = [p.read_text() for p in sorted(SAMPLES.glob("*.mil")) if p.stat().st_size < 20_000]
    if not found:  # without the public samples, printed programs stand in
        with tempfile.TemporaryDirectory() as tmp:
            inputs, outputs = sd_specs()["unet"]
            found.append((write_compiled(Path(tmp) / "Unet.mlmodelc", inputs, outputs, einsum=True)
                          / "model.mil").read_text())
    return found


SEEDS = _seed_texts()


def _parse_or_syntax_error(text: str) -> None:
    start = time.perf_counter()
    try:
        loads(text)
    except MILSyntaxError as exc:
        assert exc.line >= 0 and exc.reason
    assert time.perf_counter() - start < TIME_LIMIT


@FUZZ
@given(st.data())
def test_truncated_text(data: Any) -> None:
    text = data.draw(st.sampled_from(SEEDS))
    _parse_or_syntax_error(text[: data.draw(st.integers(0, len(text)))])


@FUZZ
@given(st.data())
def test_deleted_or_inserted_brackets(data: Any) -> None:
    text = data.draw(st.sampled_from(SEEDS))
    positions = [i for i, ch in enumerate(text) if ch in "[](){}<>,=;\""]
    for _ in range(data.draw(st.integers(1, 3))):
        i = data.draw(st.sampled_from(positions))
        if data.draw(st.booleans()):
            text = text[:i] + text[i + 1:]
        else:
            text = text[:i] + data.draw(st.sampled_from("[](){}<>,=;\"")) + text[i:]
        positions = [p for p in positions if p < len(text)] or [0]
    _parse_or_syntax_error(text)


@FUZZ
@given(st.data())
def test_random_characters(data: Any) -> None:
    text = list(data.draw(st.sampled_from(SEEDS)))
    for _ in range(data.draw(st.integers(1, 8))):
        i = data.draw(st.integers(0, len(text) - 1))
        text[i] = data.draw(st.characters(exclude_categories=["Cs"]))
    _parse_or_syntax_error("".join(text))


@pytest.mark.parametrize("digit", ["\u00b2", "\u0663", "\uff15"])  # superscript two, Arabic-Indic three, fullwidth five
def test_digits_outside_ascii_are_syntax_errors(digit: str) -> None:
    # str.isdigit() takes these, int() does not: each one, in place of every digit of a real
    # program (dimensions, the program version, numbers), is a parse error, never a ValueError
    text = SEEDS[0]
    for i in [i for i, ch in enumerate(text) if ch in "0123456789"]:
        _parse_or_syntax_error(text[:i] + digit + text[i + 1:])
    with pytest.raises(MILSyntaxError):
        loads("program(1.0)\n{\n    func main<ios16>(tensor<fp32, [1, " + digit + "]> x) {\n    } -> (x);\n}\n")


@FUZZ
@given(st.text(st.sampled_from(list("[](){}<>,=;\"-0123456789.xpP?* abcdefintsorgu_\n")), max_size=300))
def test_token_soup(text: str) -> None:
    _parse_or_syntax_error(text)
    _parse_or_syntax_error("program(1.0)\n{\n    func main<ios16>() {\n" + text)


# -- damaged weight files ---------------------------------------------------------------------

BLOB_CONTENT = [
    ("fp16", np.arange(10, dtype=np.float16)), ("fp32", np.arange(5, dtype=np.float32)),
    ("uint4", np.arange(9, dtype=np.uint8) % 16), ("int8", np.arange(-3, 4, dtype=np.int8)),
    ("uint6", np.arange(7, dtype=np.uint8)), ("int4", np.array([-8, 7, 0], np.int8)),
]


@pytest.fixture(scope="module")
def blob_file(tmp_path_factory: pytest.TempPathFactory) -> tuple[bytes, list[int]]:
    path = tmp_path_factory.mktemp("blobs") / "w.bin"
    with BlobWriter(path) as writer:
        offsets = [writer.add(values, dtype=dtype) for dtype, values in BLOB_CONTENT]
    return path.read_bytes(), offsets


@FUZZ
@given(st.data())
def test_damaged_weight_files(blob_file: tuple[bytes, list[int]], tmp_path: Path, data: Any) -> None:
    good, offsets = blob_file
    raw = bytearray(good)
    for _ in range(data.draw(st.integers(1, 6))):
        # mostly headers: the 64 bytes of the file header and of each blob's metadata
        base = data.draw(st.sampled_from([0] + offsets + [data.draw(st.integers(0, len(raw) - 1))]))
        at = min(len(raw) - 1, base + data.draw(st.integers(0, 31)))
        width = data.draw(st.sampled_from([1, 4, 8]))
        raw[at:at + width] = data.draw(st.binary(min_size=width, max_size=width))
    if data.draw(st.booleans()):
        raw = raw[: data.draw(st.integers(0, len(raw)))]
    path = Path(tempfile.mkdtemp(dir=tmp_path)) / "w.bin"
    path.write_bytes(bytes(raw))
    tracemalloc.start()
    try:
        try:
            with BlobFile(path) as f:
                for (dtype, values), offset in zip(BLOB_CONTENT, offsets):
                    try:
                        array = f.read(offset, dtype=dtype, shape=values.shape)
                        assert array.shape == values.shape
                    except BlobError:
                        pass
                try:
                    f.offsets()
                except BlobError:
                    pass
        except BlobError:
            pass
        assert tracemalloc.get_traced_memory()[1] < 4 << 20
    finally:
        tracemalloc.stop()


# -- damaged bundles: verify reports, it never crashes ------------------------------------------


@pytest.fixture(scope="module")
def good_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    inputs, outputs = sd_specs()["unet"]
    return write_compiled(tmp_path_factory.mktemp("bundle") / "Unet.mlmodelc", inputs, outputs)


@FUZZ
@given(st.data())
def test_verify_never_crashes_on_damaged_bundles(good_bundle: Path, tmp_path: Path, data: Any) -> None:
    bundle = Path(tempfile.mkdtemp(dir=tmp_path)) / "Unet.mlmodelc"
    shutil.copytree(good_bundle, bundle)
    target = bundle / data.draw(st.sampled_from(["model.mil", "metadata.json", "weights/weight.bin",
                                                 "coremldata.bin"]))
    raw = bytearray(target.read_bytes())
    action = data.draw(st.sampled_from(["truncate", "flip", "delete", "garbage"]))
    if action == "truncate":
        target.write_bytes(bytes(raw[: data.draw(st.integers(0, len(raw)))]))
    elif action == "flip":
        for _ in range(data.draw(st.integers(1, 5))):
            i = data.draw(st.integers(0, len(raw) - 1))
            raw[i] = data.draw(st.integers(0, 255))
        target.write_bytes(bytes(raw))
    elif action == "delete":
        target.unlink()
    else:
        target.write_bytes(data.draw(st.binary(max_size=200)))
    start = time.perf_counter()
    report = verify(bundle, plugins=False)
    assert time.perf_counter() - start < TIME_LIMIT
    assert not [p for p in report.problems if "internal error" in p.message], report.problems
    if action == "delete" and target.name != "weight.bin":
        assert not report.ok

