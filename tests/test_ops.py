"""Op kernels against numpy references written from the MIL op definitions.

Each case builds a one-op program in the shared program model (inputs as function
inputs, parameters as immediate values, exactly as a converted model holds them), runs
it through the executor on the CPU and compares with a reference computed here from
the definitions in coremltools' `mil/ops/defs` (and their documented examples).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest
import torch

from coreml_hub.mil.executor import CompiledFunction
from coreml_hub.mil.ops import Context
from coreml_hub.mil.program import Block, Function, Operation, TensorType, TensorValue, Var

_NP_TO_MIL = {
    np.dtype(np.float32): "fp32",
    np.dtype(np.float16): "fp16",
    np.dtype(np.float64): "fp32",
    np.dtype(np.int32): "int32",
    np.dtype(np.int64): "int32",
    np.dtype(np.int8): "int8",
    np.dtype(np.uint8): "uint8",
    np.dtype(np.int16): "int16",
    np.dtype(np.uint16): "uint16",
    np.dtype(np.bool_): "bool",
}


def immediate(value: Any, dtype: str | None = None) -> TensorValue:
    if isinstance(value, str):
        return TensorValue(TensorType("string", ()), np.array(value, dtype=object))
    array = np.asarray(value)
    if dtype is None:
        dtype = _NP_TO_MIL[array.dtype] if array.dtype != np.float64 else "fp32"
    numpy_type = {"fp32": np.float32, "fp16": np.float16, "int32": np.int32, "uint1": np.uint8, "uint2": np.uint8,
                  "uint4": np.uint8, "int4": np.int8, "uint32": np.uint32}.get(dtype)
    if numpy_type is not None:
        array = array.astype(numpy_type)
    return TensorValue(TensorType(dtype, tuple(array.shape)), array)


def run_op(
    op_type: str,
    inputs: dict[str, Any] | None = None,
    params: dict[str, Any] | None = None,
    outputs: int = 1,
    out_dtype: str = "fp32",
    floats: torch.dtype = torch.float32,
    typed: dict[str, str] | None = None,
    opset: str = "ios18",
) -> Any:
    """Run one op: `inputs` are function inputs (numpy), `params` immediate values."""
    inputs = inputs or {}
    params = params or {}
    typed = typed or {}
    fn_inputs: list[Var] = []
    bindings: dict[str, Any] = {}
    arrays: list[np.ndarray] = []
    for key, value in inputs.items():
        if isinstance(value, (list, tuple)) and key in ("values", "ref_tensors"):
            names = []
            for j, item in enumerate(value):
                array = np.asarray(item)
                var = Var(f"{key}_{j}", TensorType(_NP_TO_MIL[array.dtype], tuple(array.shape)))
                fn_inputs.append(var)
                arrays.append(array)
                names.append(var.name)
            bindings[key] = tuple(names)
        else:
            array = np.asarray(value)
            var = Var(key, TensorType(typed.get(key, _NP_TO_MIL[array.dtype]), tuple(array.shape)))
            fn_inputs.append(var)
            arrays.append(array)
            bindings[key] = key
    for key, value in params.items():
        if value is None:
            continue
        if isinstance(value, tuple):
            bindings[key] = tuple(immediate(v) for v in value)
        else:
            bindings[key] = immediate(value, typed.get(key))
    outs = tuple(Var(f"out{i}", TensorType(out_dtype, None)) for i in range(outputs))
    op = Operation(op_type, bindings, outs, {"name": immediate("op")})
    fn = Function("main", opset, tuple(fn_inputs), Block([op], tuple(v.name for v in outs)))
    ctx = Context.create("cpu", {"fp16": floats, "fp32": floats, "fp64": floats, "bf16": floats})
    compiled = CompiledFunction(fn, ctx, fuse=False)
    tensors = [torch.from_numpy(a if a.flags.c_contiguous else a.copy()) for a in arrays]
    tensors = [t.to(floats) if t.is_floating_point() else t for t in tensors]
    result = [t.numpy() if t.dtype != torch.bfloat16 else t.float().numpy() for t in compiled(*tensors)]
    return result[0] if outputs == 1 else result


def close(actual: Any, expected: Any, tol: float = 1e-5) -> None:
    actual, expected = np.asarray(actual), np.asarray(expected)
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    if expected.dtype.kind in "biu":
        np.testing.assert_array_equal(actual, expected)
    else:
        np.testing.assert_allclose(actual.astype(np.float64), expected.astype(np.float64), rtol=tol, atol=tol)


rng = np.random.default_rng(7)


def randn(*shape: int) -> np.ndarray:
    return rng.standard_normal(shape).astype(np.float32)


# -- element-wise --------------------------------------------------------------------

UNARY_REFS = {
    "abs": np.abs, "acos": np.arccos, "asin": np.arcsin, "atan": np.arctan, "atanh": np.arctanh,
    "ceil": np.ceil, "cos": np.cos, "cosh": np.cosh, "exp": np.exp, "exp2": np.exp2, "floor": np.floor,
    "round": np.round, "sign": np.sign, "sin": np.sin, "sinh": np.sinh, "sqrt": np.sqrt, "square": np.square,
    "tan": np.tan, "tanh": np.tanh, "relu": lambda x: np.maximum(x, 0), "relu6": lambda x: np.minimum(np.maximum(x, 0), 6),
    "sigmoid": lambda x: 1 / (1 + np.exp(-x)), "silu": lambda x: x / (1 + np.exp(-x)),
    "softplus": lambda x: np.log(1 + np.exp(-np.abs(x))) + np.maximum(x, 0), "softsign": lambda x: x / (1 + np.abs(x)),
    "erf": np.vectorize(math.erf),
}


@pytest.mark.parametrize("op_type", sorted(UNARY_REFS))
def test_unary(op_type: str) -> None:
    x = rng.uniform(-0.9, 0.9, (3, 5)).astype(np.float32)
    if op_type in ("sqrt",):
        x = np.abs(x)
    if op_type == "round":
        x = np.array([-2.5, -1.5, -0.5, 0.5, 1.5, 2.5, 0.4, -0.6], np.float32)  # halves go to even
    if op_type == "relu6":
        x = x * 10
    close(run_op(op_type, {"x": x}), UNARY_REFS[op_type](x).astype(np.float32), 1e-5)


@pytest.mark.parametrize("op_type, eps, ref", [
    ("inverse", None, lambda x, e: 1 / (x + 1e-4)), ("inverse", 0.5, lambda x, e: 1 / (x + e)),
    ("log", None, lambda x, e: np.log(x + 1e-45)), ("log", 0.25, lambda x, e: np.log(x + e)),
    ("rsqrt", None, lambda x, e: 1 / np.sqrt(x + 1e-12)), ("rsqrt", 2.0, lambda x, e: 1 / np.sqrt(x + e)),
])
def test_unary_with_epsilon(op_type: str, eps: float | None, ref: Any) -> None:
    x = rng.uniform(0.1, 3, (4, 3)).astype(np.float32)
    close(run_op(op_type, {"x": x}, {"epsilon": eps}), ref(x, eps), 1e-5)


def test_clip_threshold_logical_not() -> None:
    x = randn(4, 4)
    close(run_op("clip", {"x": x}, {"alpha": -0.5, "beta": 0.25}), np.minimum(np.maximum(x, -0.5), 0.25))
    close(run_op("threshold", {"x": x}, {"alpha": 0.1}), np.maximum(x, 0.1))
    b = x > 0
    close(run_op("logical_not", {"x": b}, out_dtype="bool"), ~b)


@pytest.mark.parametrize("mode", ["EXACT", "TANH_APPROXIMATION", "SIGMOID_APPROXIMATION", None])
def test_gelu_modes(mode: str | None) -> None:
    x = randn(3, 7) * 3
    if mode == "TANH_APPROXIMATION":
        expected = 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x**3)))
    elif mode == "SIGMOID_APPROXIMATION":
        expected = x / (1 + np.exp(-1.702 * x))
    else:
        expected = 0.5 * x * (1 + np.vectorize(math.erf)(x / np.sqrt(2)))
    close(run_op("gelu", {"x": x}, {"mode": mode}), expected, 1e-5)


def test_activations_with_parameters() -> None:
    x = randn(2, 3, 4, 4) * 2
    a, b = 0.3, 1.2
    close(run_op("clamped_relu", {"x": x}, {"alpha": a, "beta": b}),
          np.where(x >= 0, np.minimum(np.maximum(x, 0), b), np.minimum(np.minimum(x, 0) * a, b)))
    close(run_op("elu", {"x": x}, {"alpha": a}), np.where(x > 0, x, a * (np.exp(x) - 1)), 1e-5)
    close(run_op("leaky_relu", {"x": x}, {"alpha": a}), np.where(x >= 0, x, a * x))
    close(run_op("linear_activation", {"x": x}, {"alpha": a, "beta": b}), a * x + b)
    close(run_op("scaled_tanh", {"x": x}, {"alpha": a, "beta": b}), a * np.tanh(b * x), 1e-5)
    close(run_op("sigmoid_hard", {"x": x}, {"alpha": a, "beta": b}), np.minimum(np.maximum(a * x + b, 0), 1))
    close(run_op("thresholded_relu", {"x": x}, {"alpha": a}), np.where(x >= a, x, 0))
    alpha = np.float32([0.1, 0.2, 0.3])
    beta = np.float32([1.0, 2.0, 0.5])
    ab = alpha.reshape(1, 3, 1, 1)
    bb = beta.reshape(1, 3, 1, 1)
    close(run_op("prelu", {"x": x}, {"alpha": alpha}), np.maximum(x, 0) + np.minimum(x, 0) * ab)
    close(run_op("softplus_parametric", {"x": x}, {"alpha": alpha, "beta": beta}), ab * np.log(1 + np.exp(x * bb)), 1e-5)


@pytest.mark.parametrize("axis", [None, -1, 0, 1, 2])
def test_softmax_axes(axis: int | None) -> None:
    x = randn(2, 3, 5) * 4
    ax = -1 if axis is None else axis
    e = np.exp(x - x.max(axis=ax, keepdims=True))
    close(run_op("softmax", {"x": x}, {"axis": axis}), e / e.sum(axis=ax, keepdims=True), 1e-6)


BINARY_REFS = {
    "add": np.add, "sub": np.subtract, "mul": np.multiply, "real_div": np.true_divide,
    "maximum": np.maximum, "minimum": np.minimum, "pow": np.power,
    "floor_div": np.floor_divide, "mod": np.mod,
}


@pytest.mark.parametrize("op_type", sorted(BINARY_REFS))
@pytest.mark.parametrize("shapes", [((2, 3, 4), (2, 3, 4)), ((2, 1, 4), (3, 1)), ((4,), ()), ((), (2, 2))])
def test_binary_broadcasting(op_type: str, shapes: tuple[tuple[int, ...], tuple[int, ...]]) -> None:
    x = rng.uniform(-3, 3, shapes[0]).astype(np.float32)
    y = rng.uniform(0.5, 2, shapes[1]).astype(np.float32) * rng.choice([-1, 1], shapes[1]).astype(np.float32)
    if op_type == "pow":
        x = np.abs(x) + 0.1
    close(run_op(op_type, {"x": x, "y": y}), BINARY_REFS[op_type](x, y).astype(np.float32), 1e-5)


def test_integer_division_and_modulo() -> None:
    x = np.int32([7, -7, 7, -7, 6])
    y = np.int32([2, 2, -2, -2, 3])
    close(run_op("floor_div", {"x": x, "y": y}, out_dtype="int32"), x // y)  # floor
    close(run_op("mod", {"x": x, "y": y}, out_dtype="int32"), np.mod(x, y))  # sign of divisor
    close(run_op("real_div", {"x": x, "y": y}, out_dtype="int32"), (x / y).astype(np.int32))  # cast truncates
    close(run_op("add", {"x": x, "y": y}, out_dtype="int32"), x + y)


@pytest.mark.parametrize("op_type, ref", [
    ("equal", np.equal), ("not_equal", np.not_equal), ("greater", np.greater), ("greater_equal", np.greater_equal),
    ("less", np.less), ("less_equal", np.less_equal),
])
def test_comparisons(op_type: str, ref: Any) -> None:
    x = rng.integers(-2, 3, (3, 4)).astype(np.float32)
    y = rng.integers(-2, 3, (4,)).astype(np.float32)
    close(run_op(op_type, {"x": x, "y": y}, out_dtype="bool"), ref(x, y))


@pytest.mark.parametrize("op_type, ref", [("logical_and", np.logical_and), ("logical_or", np.logical_or),
                                          ("logical_xor", np.logical_xor)])
def test_logical(op_type: str, ref: Any) -> None:
    x = rng.integers(0, 2, (3, 4)).astype(bool)
    y = rng.integers(0, 2, (3, 4)).astype(bool)
    close(run_op(op_type, {"x": x, "y": y}, out_dtype="bool"), ref(x, y))


def test_select_broadcasts() -> None:
    cond = np.array([True, False, True])
    a, b = randn(2, 3), randn(1, 3)
    close(run_op("select", {"cond": cond, "a": a, "b": b}), np.where(cond, a, b))


def test_cast() -> None:
    x = np.float32([-2.7, -0.5, 0.5, 2.7, 3.0])
    close(run_op("cast", {"x": x}, {"dtype": "int32"}, out_dtype="int32"), x.astype(np.int32))  # toward zero
    close(run_op("cast", {"x": x}, {"dtype": "bool"}, out_dtype="bool"), x.astype(bool))
    i = np.int32([1, -3, 70000])
    close(run_op("cast", {"x": i}, {"dtype": "fp32"}), i.astype(np.float32))
    b = np.array([True, False])
    close(run_op("cast", {"x": b}, {"dtype": "int32"}, out_dtype="int32"), b.astype(np.int32))


def test_fp16_arithmetic_when_asked() -> None:
    x, y = randn(8).astype(np.float16), randn(8).astype(np.float16)
    out = run_op("mul", {"x": x, "y": y}, floats=torch.float16, out_dtype="fp16")
    assert out.dtype == np.float16
    np.testing.assert_array_equal(out, x * y)


# -- convolution ---------------------------------------------------------------------


def ref_pads(pad_type: str, pad: list[int] | None, sizes: tuple[int, ...], k: tuple[int, ...],
             s: list[int], d: list[int]) -> list[tuple[int, int]]:
    """Padding per the conv definition: custom pairs, or 'same' totals split (extra after; before for same_lower)."""
    if pad_type == "valid":
        return [(0, 0)] * len(k)
    if pad_type == "custom":
        return [(pad[2 * i], pad[2 * i + 1]) for i in range(len(k))]
    out = []
    for i in range(len(k)):
        dk = (k[i] - 1) * d[i] + 1
        total = max(0, s[i] * math.ceil(sizes[i] / s[i]) - sizes[i] + dk - s[i])
        small, large = total // 2, total - total // 2
        out.append((small, large) if pad_type == "same" else (large, small))
    return out


def ref_conv(x: np.ndarray, w: np.ndarray, b: np.ndarray | None, strides: list[int], pads: list[tuple[int, int]],
             dil: list[int], groups: int) -> np.ndarray:
    nd = x.ndim - 2
    xp = np.pad(x, [(0, 0), (0, 0)] + pads)
    k = w.shape[2:]
    out_sizes = [(xp.shape[2 + i] - ((k[i] - 1) * dil[i] + 1)) // strides[i] + 1 for i in range(nd)]
    n, c_in = x.shape[:2]
    c_out = w.shape[0]
    out = np.zeros((n, c_out, *out_sizes), np.float64)
    cin_g, cout_g = c_in // groups, c_out // groups
    for pos in np.ndindex(*out_sizes):
        window = tuple(slice(pos[i] * strides[i], pos[i] * strides[i] + (k[i] - 1) * dil[i] + 1, dil[i]) for i in range(nd))
        patch = xp[(slice(None), slice(None)) + window]  # n, c_in, *k
        for g in range(groups):
            pg = patch[:, g * cin_g:(g + 1) * cin_g]
            wg = w[g * cout_g:(g + 1) * cout_g]
            out[(slice(None), slice(g * cout_g, (g + 1) * cout_g)) + pos] = np.tensordot(pg, wg, axes=(list(range(1, 2 + nd)), list(range(1, 2 + nd))))
    if b is not None:
        out += b.reshape((1, -1) + (1,) * nd)
    return out


@pytest.mark.parametrize("case", [
    dict(shape=(1, 4, 7, 6), k=(3, 3), pad_type="valid"),
    dict(shape=(2, 4, 7, 6), k=(3, 3), pad_type="same", strides=[2, 2]),
    dict(shape=(1, 4, 8, 5), k=(4, 2), pad_type="same", strides=[1, 1]),
    dict(shape=(1, 4, 8, 5), k=(4, 2), pad_type="same_lower", strides=[3, 2]),
    dict(shape=(1, 4, 6, 6), k=(3, 3), pad_type="custom", pad=[1, 2, 0, 1], strides=[2, 1]),
    dict(shape=(1, 4, 9, 9), k=(3, 3), pad_type="custom", pad=[2, 2, 2, 2], dilations=[2, 2]),
    dict(shape=(1, 4, 6, 6), k=(3, 3), pad_type="same", groups=2, bias=False),
    dict(shape=(1, 4, 6, 6), k=(1, 1), pad_type="valid", groups=4),
    dict(shape=(2, 4, 9), k=(3,), pad_type="same", strides=[2]),
    dict(shape=(1, 2, 4, 5, 4), k=(2, 3, 2), pad_type="custom", pad=[0, 1, 1, 1, 1, 0]),
])
def test_conv_variants(case: dict[str, Any]) -> None:
    x = randn(*case["shape"])
    groups = case.get("groups", 1)
    c_out = 6 if groups != 4 else 8
    w = randn(c_out, case["shape"][1] // groups, *case["k"])
    b = randn(c_out) if case.get("bias", True) else None
    nd = len(case["k"])
    strides = case.get("strides", [1] * nd)
    dil = case.get("dilations", [1] * nd)
    params = {"pad_type": case["pad_type"], "strides": case.get("strides"), "pad": case.get("pad"),
              "dilations": case.get("dilations"), "groups": groups if groups != 1 else None, "bias": b, "weight": w}
    pads = ref_pads(case["pad_type"], case.get("pad"), case["shape"][2:], case["k"], strides, dil)
    close(run_op("conv", {"x": x}, params), ref_conv(x, w, b, strides, pads, dil, groups), 1e-4)


def ref_conv_transpose(x: np.ndarray, w: np.ndarray, strides: list[int], dil: list[int]) -> np.ndarray:
    """Full transposed convolution: every input element scatters x * w into the output."""
    nd = x.ndim - 2
    k = w.shape[2:]
    sizes = [(x.shape[2 + i] - 1) * strides[i] + (k[i] - 1) * dil[i] + 1 for i in range(nd)]
    out = np.zeros((x.shape[0], w.shape[1], *sizes))
    for pos in np.ndindex(*x.shape[2:]):
        contrib = np.tensordot(x[(slice(None), slice(None)) + pos], w, axes=([1], [0]))  # n, c_out, *k
        for kpos in np.ndindex(*k):
            o = tuple(pos[i] * strides[i] + kpos[i] * dil[i] for i in range(nd))
            out[(slice(None), slice(None)) + o] += contrib[(slice(None), slice(None)) + kpos]
    return out


@pytest.mark.parametrize("case", [
    dict(pad_type="valid", strides=[2, 2]),
    dict(pad_type="custom", pad=[1, 1, 0, 1], strides=[2, 2]),
    dict(pad_type="custom", pad=[1, 1, 1, 1], strides=[2, 2], output_shape=[1, 3, 8, 8]),
    dict(pad_type="valid", strides=[1, 1], dilations=[2, 1]),
])
def test_conv_transpose(case: dict[str, Any]) -> None:
    x = randn(1, 4, 4, 4)
    w = randn(4, 3, 3, 3)
    b = randn(3)
    dil = case.get("dilations", [1, 1])
    full = ref_conv_transpose(x, w, case["strides"], dil)
    p = case.get("pad", [0, 0, 0, 0])
    expected = full[:, :, p[0]: full.shape[2] - p[1], p[2]: full.shape[3] - p[3]]
    if "output_shape" in case:
        # an explicit output size extends past the cropped end into the full result (torch's
        # output_padding), and with zeros beyond it, where no input contributes
        target = case["output_shape"][2:]
        grown = np.zeros(expected.shape[:2] + tuple(target))
        tail = full[:, :, p[0]:, p[2]:]
        h, w_ = min(target[0], tail.shape[2]), min(target[1], tail.shape[3])
        grown[:, :, :h, :w_] = tail[:, :, :h, :w_]
        expected = grown
    expected = expected + b.reshape(1, -1, 1, 1)
    params = {"weight": w, "bias": b, "pad_type": case["pad_type"], "pad": case.get("pad"), "strides": case["strides"],
              "dilations": case.get("dilations"), "output_shape": case.get("output_shape")}
    close(run_op("conv_transpose", {"x": x}, params), expected, 1e-4)


# -- linear algebra ------------------------------------------------------------------


def test_linear() -> None:
    x, w, b = randn(2, 5, 4), randn(3, 4), randn(3)
    close(run_op("linear", {"x": x}, {"weight": w, "bias": b}), x @ w.T + b, 1e-5)
    close(run_op("linear", {"x": x}, {"weight": w}), x @ w.T, 1e-5)


@pytest.mark.parametrize("sx, sy, tx, ty", [
    ((2, 3, 4), (2, 4, 5), False, False), ((10, 4, 3), (5, 10, 4, 2), True, False),
    ((2, 3, 4), (2, 5, 4), False, True), ((4,), (10, 4, 3), False, False), ((10, 3, 4), (4,), False, False),
    ((4,), (4,), False, False), ((3, 2), (3, 5), True, None),
])
def test_matmul(sx: tuple[int, ...], sy: tuple[int, ...], tx: bool, ty: bool | None) -> None:
    x, y = randn(*sx), randn(*sy)
    xa = np.swapaxes(x, -1, -2) if tx and x.ndim > 1 else x
    ya = np.swapaxes(y, -1, -2) if ty and y.ndim > 1 else y
    close(run_op("matmul", {"x": x, "y": y}, {"transpose_x": tx, "transpose_y": ty}), np.matmul(xa, ya), 1e-5)


@pytest.mark.parametrize("equation, sa, sb", [
    ("nchw,nwhu->nchu", (2, 3, 4, 5), (2, 5, 4, 6)),
    ("chw,whr->chr", (3, 4, 5), (5, 4, 2)),
    ("nchw,nwhu->nchu", (1, 3, 1, 5), (2, 5, 4, 6)),  # B and H broadcast
    ("bkhc,bchq->bkhq", (2, 7, 1, 4), (2, 4, 1, 3)),
])
def test_einsum(equation: str, sa: tuple[int, ...], sb: tuple[int, ...]) -> None:
    a, b = randn(*sa), randn(*sb)
    lhs = equation.split("->")[0].split(",")
    sizes = {}
    for labels, arr in ((lhs[0], a), (lhs[1], b)):
        for label, n in zip(labels, arr.shape):
            sizes[label] = max(sizes.get(label, 1), n)
    ea = np.broadcast_to(a, [sizes[c] for c in lhs[0]])
    eb = np.broadcast_to(b, [sizes[c] for c in lhs[1]])
    close(run_op("einsum", {"values": [a, b]}, {"equation": equation}), np.einsum(equation, ea, eb), 1e-5)


# -- normalization -------------------------------------------------------------------


def ref_layer_norm(x: np.ndarray, axes: list[int], gamma: Any, beta: Any, eps: float) -> np.ndarray:
    rank = x.ndim
    axes = [a % rank for a in axes]
    shape = [x.shape[i] if i in axes else 1 for i in range(rank)]
    g = np.ones(shape) if gamma is None else np.reshape(gamma, shape)
    bb = np.zeros(shape) if beta is None else np.reshape(beta, shape)
    num = x - x.mean(axis=tuple(axes), keepdims=True)
    den = np.sqrt((num**2).sum(axis=tuple(axes), keepdims=True) / np.prod([x.shape[a] for a in axes]) + eps)
    return num / den * g + bb


@pytest.mark.parametrize("axes, affine", [([-1], True), ([2, 3], True), ([1], True), ([1, 3], False), (None, False)])
def test_layer_norm(axes: list[int] | None, affine: bool) -> None:
    x = randn(2, 3, 4, 5) * 3 + 1
    ax = list(range(4)) if axes is None else axes
    shape = [x.shape[a % 4] for a in sorted(a % 4 for a in ax)]
    gamma = randn(*shape) if affine else None
    beta = randn(*shape) if affine else None
    out = run_op("layer_norm", {"x": x}, {"axes": axes, "gamma": gamma, "beta": beta, "epsilon": 1e-3})
    close(out, ref_layer_norm(x, ax, gamma, beta, 1e-3), 1e-4)


def test_batch_instance_l2_lrn() -> None:
    x = randn(2, 3, 4, 5) * 2
    mean, var, gamma, beta = randn(3), np.abs(randn(3)) + 0.5, randn(3), randn(3)
    c = lambda v: v.reshape(1, 3, 1, 1)  # noqa: E731
    close(run_op("batch_norm", {"x": x}, {"mean": mean, "variance": var, "gamma": gamma, "beta": beta, "epsilon": 1e-3}),
          c(gamma) * (x - c(mean)) / np.sqrt(c(var) + 1e-3) + c(beta), 1e-5)
    close(run_op("batch_norm", {"x": x}, {"mean": mean, "variance": var}), (x - c(mean)) / np.sqrt(c(var) + 1e-5), 1e-5)
    m = x.mean(axis=(2, 3), keepdims=True)
    v = x.var(axis=(2, 3), keepdims=True)
    close(run_op("instance_norm", {"x": x}, {"gamma": gamma, "beta": beta}), c(gamma) * (x - m) / np.sqrt(v + 1e-5) + c(beta), 1e-4)
    flat = x.reshape(2, -1)
    close(run_op("l2_norm", {"x": x}, {"epsilon": 1e-6}), (flat / np.sqrt((flat**2).sum(1, keepdims=True) + 1e-6)).reshape(x.shape), 1e-5)
    x3 = randn(3, 4, 5)
    close(run_op("l2_norm", {"x": x3}), x3 / np.sqrt((x3**2).sum() + 1e-6), 1e-5)
    size, alpha, beta_, k = 3, 1e-2, 0.75, 2.0
    sq = np.pad(x**2, [(0, 0), (size // 2, (size - 1) // 2), (0, 0), (0, 0)])
    window = np.stack([sq[:, i: i + 3].sum(1) for i in range(3)], 1)
    close(run_op("local_response_norm", {"x": x}, {"size": size, "alpha": alpha, "beta": beta_, "k": k}),
          x / (k + alpha / size * window) ** beta_, 1e-5)


# -- pooling -------------------------------------------------------------------------


def ref_pool(x: np.ndarray, k: list[int], s: list[int], pads: list[tuple[int, int]], kind: str, exclude: bool = False) -> np.ndarray:
    nd = len(k)
    fill = -np.inf if kind == "max" else 0.0
    xp = np.pad(x, [(0, 0), (0, 0)] + pads, constant_values=fill)
    ones = np.pad(np.ones(x.shape[2:]), pads)
    sizes = [(xp.shape[2 + i] - k[i]) // s[i] + 1 for i in range(nd)]
    out = np.zeros(x.shape[:2] + tuple(sizes))
    for pos in np.ndindex(*sizes):
        win = tuple(slice(pos[i] * s[i], pos[i] * s[i] + k[i]) for i in range(nd))
        patch = xp[(slice(None), slice(None)) + win].reshape(x.shape[:2] + (-1,))
        if kind == "max":
            out[(slice(None), slice(None)) + pos] = patch.max(-1)
        elif kind == "l2":
            out[(slice(None), slice(None)) + pos] = np.sqrt((patch**2).sum(-1))
        else:
            count = ones[win].sum() if exclude else np.prod(k)
            out[(slice(None), slice(None)) + pos] = patch.sum(-1) / count
    return out


@pytest.mark.parametrize("kind", ["avg", "max", "l2"])
@pytest.mark.parametrize("case", [
    dict(pad_type="valid", k=[2, 2], s=[2, 2]),
    dict(pad_type="same", k=[3, 3], s=[2, 2]),
    dict(pad_type="custom", k=[3, 2], s=[1, 2], pad=[1, 1, 0, 1]),
    dict(pad_type="custom", k=[3, 3], s=[2, 2], pad=[2, 0, 1, 2], exclude=True),
    dict(pad_type="same_lower", k=[2, 3], s=[1, 1], exclude=True),
])
def test_pooling(kind: str, case: dict[str, Any]) -> None:
    x = randn(2, 3, 7, 6)
    pads = ref_pads(case["pad_type"], case.get("pad"), x.shape[2:], tuple(case["k"]), case["s"], [1, 1])
    params = {"kernel_sizes": case["k"], "strides": case["s"], "pad_type": case["pad_type"], "pad": case.get("pad")}
    if kind == "avg":
        params["exclude_padding_from_average"] = case.get("exclude", False)
    expected = ref_pool(x, case["k"], case["s"], pads, kind, case.get("exclude", False))
    close(run_op(f"{kind}_pool", {"x": x}, params), expected, 1e-5)


def test_pool_ceil_mode() -> None:
    x = randn(1, 2, 7, 7)
    out = run_op("max_pool", {"x": x}, {"kernel_sizes": [2, 2], "strides": [2, 2], "pad_type": "valid", "ceil_mode": True})
    # ceil: floor((7 - 2 + 1) / 2) + 1 = 4 windows per axis, the last one covering a single row/column
    expected = np.zeros((1, 2, 4, 4))
    for i in range(4):
        for j in range(4):
            expected[:, :, i, j] = x[:, :, 2 * i: 2 * i + 2, 2 * j: 2 * j + 2].max(axis=(2, 3))
    close(out, expected)


# -- resizing ------------------------------------------------------------------------


def grid(x_in: int, x_out: int, mode: str) -> np.ndarray:
    """Sampling grid exactly as the resize_bilinear documentation spells each mode."""
    i = np.arange(x_out, dtype=np.float64)
    if mode in ("STRICT_ALIGN_CORNERS", "ALIGN_CORNERS"):
        if x_out == 1:
            return np.array([(x_in - 1) / 2 if mode == "ALIGN_CORNERS" else 0.0])
        g = i * (x_in - 1) / (x_out - 1)
    elif mode == "DEFAULT":
        g = i * (x_in - x_in / x_out) / (x_out - 1) if x_out > 1 else i * 0
    elif mode == "OFFSET_CORNERS":
        delta = max(1, x_in - 1) / x_out
        g = 0.5 * delta + i * ((x_out - 1) * delta) / (x_out - 1)
    else:
        spacing = x_in / x_out
        g = i * spacing + 0.5 * spacing - 0.5
    return np.minimum(x_in - 1, np.maximum(0, g))


def test_documented_grids() -> None:
    from coreml_hub.mil.ops.nn import sample_points

    np.testing.assert_allclose(sample_points(2, 5, "UNALIGN_CORNERS"), [0.0, 0.1, 0.5, 0.9, 1.0], atol=1e-9)
    np.testing.assert_allclose(sample_points(2, 5, "ALIGN_CORNERS"), [0.0, 0.25, 0.5, 0.75, 1.0], atol=1e-9)
    np.testing.assert_allclose(sample_points(2, 5, "DEFAULT"), [0.0, 0.4, 0.8, 1.0, 1.0], atol=1e-9)
    np.testing.assert_allclose(sample_points(2, 5, "OFFSET_CORNERS"), [0.1, 0.3, 0.5, 0.7, 0.9], atol=1e-9)
    np.testing.assert_allclose(sample_points(2, 6, "OFFSET_CORNERS"), [0.08, 0.25, 0.42, 0.58, 0.75, 0.92], atol=5e-3)
    np.testing.assert_allclose(sample_points(2, 6, "UNALIGN_CORNERS"), [0, 0, 0.33, 0.67, 1, 1], atol=5e-3)


def ref_bilinear(x: np.ndarray, h: int, w: int, mode: str) -> np.ndarray:
    def along(a: np.ndarray, axis: int, n: int) -> np.ndarray:
        g = grid(a.shape[axis], n, mode)
        lo = np.floor(g).astype(int)
        hi = np.minimum(lo + 1, a.shape[axis] - 1)
        f = (g - lo).reshape([-1 if d == axis % a.ndim else 1 for d in range(a.ndim)])
        return np.take(a, lo, axis) * (1 - f) + np.take(a, hi, axis) * f
    return along(along(x, -2, h), -1, w)


@pytest.mark.parametrize("mode", ["STRICT_ALIGN_CORNERS", "ALIGN_CORNERS", "DEFAULT", "OFFSET_CORNERS", "UNALIGN_CORNERS"])
def test_resize_bilinear_modes(mode: str) -> None:
    x = randn(2, 3, 4, 5)
    out = run_op("resize_bilinear", {"x": x}, {"target_size_height": 7, "target_size_width": 3, "sampling_mode": mode})
    close(out, ref_bilinear(x, 7, 3, mode), 1e-5)


@pytest.mark.parametrize("align, half, mode", [(True, None, "STRICT_ALIGN_CORNERS"), (False, None, "UNALIGN_CORNERS"),
                                               (False, False, "DEFAULT"), (False, True, "UNALIGN_CORNERS")])
def test_upsample_bilinear(align: bool, half: bool | None, mode: str) -> None:
    x = randn(1, 2, 3, 4)
    out = run_op("upsample_bilinear", {"x": x}, {"scale_factor_height": 2.0, "scale_factor_width": 1.5,
                                                  "align_corners": align, "half_pixel_centers": half})
    close(out, ref_bilinear(x, 6, 6, mode), 1e-5)


def test_nearest_neighbor_resizing() -> None:
    x = randn(2, 3, 4, 5)
    out = run_op("upsample_nearest_neighbor", {"x": x}, {"scale_factor_height": 2, "scale_factor_width": 3})
    close(out, x.repeat(2, axis=2).repeat(3, axis=3))
    frac = run_op("upsample_nearest_neighbor", {"x": x}, {"scale_factor_height": 1.5, "scale_factor_width": 0.5})
    hi = np.floor(np.arange(6) / 1.5).astype(int)
    wi = np.floor(np.arange(2) / 0.5).astype(int)
    close(frac, x[:, :, hi][:, :, :, wi])
    # Core ML takes source pixel floor(i * in / out): 3 pixels at scale 1.12 -> 0, 1, 2 (floor(i / 1.12): 0, 0, 1)
    odd = run_op("upsample_nearest_neighbor", {"x": x[..., :3]}, {"scale_factor_height": 1.0, "scale_factor_width": 1.12})
    close(odd, x[..., :3])
    resized = run_op("resize_nearest_neighbor", {"x": x}, {"target_size_height": 8, "target_size_width": 10})
    close(resized, x.repeat(2, axis=2).repeat(2, axis=3))


def test_resize_ios17() -> None:
    x = randn(1, 2, 3, 4)
    out = run_op("resize", {"x": x}, {"shape": np.int32([1, 6, 8]), "resized_dims": np.uint32(2),
                                       "interpolation_mode": "LINEAR", "sampling_mode": "ALIGN_CORNERS"},
                 typed={"resized_dims": "uint32"})
    close(out, ref_bilinear(x, 6, 8, "ALIGN_CORNERS"), 1e-5)
    keep = run_op("resize", {"x": x}, {"shape": np.int32([0, 6]), "resized_dims": np.uint32(1),
                                        "interpolation_mode": "NEAREST_NEIGHBOR"}, typed={"resized_dims": "uint32"})
    close(keep, x[..., np.floor(np.arange(6) * 4 / 6).astype(int)])


# -- reductions ----------------------------------------------------------------------

REDUCTIONS = {
    "reduce_sum": np.sum, "reduce_mean": np.mean, "reduce_max": np.max, "reduce_min": np.min, "reduce_prod": np.prod,
    "reduce_l1_norm": lambda x, axis, keepdims: np.sum(np.abs(x), axis=axis, keepdims=keepdims),
    "reduce_l2_norm": lambda x, axis, keepdims: np.sqrt(np.sum(x * x, axis=axis, keepdims=keepdims)),
    "reduce_sum_square": lambda x, axis, keepdims: np.sum(x * x, axis=axis, keepdims=keepdims),
    "reduce_log_sum": lambda x, axis, keepdims: np.log(np.sum(x, axis=axis, keepdims=keepdims)),
    "reduce_log_sum_exp": lambda x, axis, keepdims: np.log(np.sum(np.exp(x), axis=axis, keepdims=keepdims)),
}


@pytest.mark.parametrize("op_type", sorted(REDUCTIONS))
@pytest.mark.parametrize("axes, keep", [(None, False), ([1], True), ([0, 2], False), ([-1], False), (None, True)])
def test_reductions(op_type: str, axes: list[int] | None, keep: bool) -> None:
    x = rng.uniform(0.5, 1.5, (2, 3, 4)).astype(np.float32)
    expected = REDUCTIONS[op_type](x, axis=None if axes is None else tuple(axes), keepdims=keep)
    close(run_op(op_type, {"x": x}, {"axes": axes, "keep_dims": keep if keep else None}), np.asarray(expected, np.float32), 1e-5)


@pytest.mark.parametrize("op_type, ref", [("reduce_argmax", np.argmax), ("reduce_argmin", np.argmin)])
@pytest.mark.parametrize("axis, keep", [(None, False), (0, True), (1, False)])
def test_arg_reductions(op_type: str, ref: Any, axis: int | None, keep: bool) -> None:
    x = randn(3, 5)
    ax = -1 if axis is None else axis
    expected = ref(x, axis=ax)
    if keep:
        expected = np.expand_dims(expected, ax)
    close(run_op(op_type, {"x": x}, {"axis": axis, "keep_dims": keep}, out_dtype="int32"), expected.astype(np.int32))


# -- shapes and data movement --------------------------------------------------------


def test_reshape_expand_squeeze_transpose() -> None:
    x = randn(2, 3, 4)
    close(run_op("reshape", {"x": x}, {"shape": np.int32([0, -1, 2])}), x.reshape(2, 6, 2))
    close(run_op("reshape", {"x": x}, {"shape": np.int32([4, -1])}), x.reshape(4, 6))
    close(run_op("expand_dims", {"x": x}, {"axes": np.int32([0, -1])}), x.reshape(1, 2, 3, 4, 1))
    close(run_op("expand_dims", {"x": x}, {"axes": np.int32([1, 3])}), x.reshape(2, 1, 3, 1, 4))
    y = randn(1, 3, 1, 4)
    close(run_op("squeeze", {"x": y}), y.reshape(3, 4))
    close(run_op("squeeze", {"x": y}, {"axes": np.int32([0, 1])}), y.reshape(3, 1, 4))  # non-1 axis ignored
    close(run_op("transpose", {"x": x}, {"perm": np.int32([2, 0, 1])}), x.transpose(2, 0, 1))
    close(run_op("transpose", {"x": x}, {"perm": np.int32([0, -1, -2])}), x.transpose(0, 2, 1))
    close(run_op("flatten2d", {"x": x}, {"axis": -1}), x.reshape(6, 4))
    close(run_op("flatten2d", {"x": x}), x.reshape(2, 12))
    close(run_op("flatten2d", {"x": x}, {"axis": 3}), x.reshape(24, 1))  # axis == rank
    close(run_op("shape", {"x": x}, out_dtype="int32"), np.int32([2, 3, 4]))
    close(run_op("reverse", {"x": x}, {"axes": np.int32([0, 2])}), x[::-1, :, ::-1])
    close(run_op("reverse", {"x": x}), x[::-1, ::-1, ::-1])
    close(run_op("identity", {"x": x}), x)


@pytest.mark.parametrize("case", [
    dict(begin=[0, 1, 0], end=[2, 3, 4]),
    dict(begin=[1, -2, 1], end=[2, -1, 4], stride=[1, 1, 2]),
    dict(begin=[0, 0, 0], end=[0, 0, 0], begin_mask=[True, True, True], end_mask=[True, True, True], stride=[1, -1, -2]),
    dict(begin=[1, 2, 3], end=[0, 0, 0], stride=[-1, -1, -1]),
    dict(begin=[1, 0, -1], end=[2, 3, 0], squeeze_mask=[True, False, True]),
    dict(begin=[0, 5, 0], end=[2, 9, 4]),  # out of range clamps to empty
    dict(begin=[0, 1, 0], end=[2, 100, 4], end_mask=[False, False, True]),
])
def test_slice_by_index(case: dict[str, Any]) -> None:
    x = randn(2, 3, 4)
    slices: list[Any] = []
    for i in range(3):
        b = None if case.get("begin_mask", [False] * 3)[i] else case["begin"][i]
        e = None if case.get("end_mask", [False] * 3)[i] else case["end"][i]
        s = case.get("stride", [1] * 3)[i]
        if case.get("squeeze_mask", [False] * 3)[i]:
            slices.append(b if b is not None else 0)
        else:
            slices.append(slice(b, e, s))
    params = {k: (np.int32(v) if k in ("begin", "end", "stride") else np.array(v)) for k, v in case.items()}
    close(run_op("slice_by_index", {"x": x}, params), x[tuple(slices)])


def test_slice_by_size_and_update() -> None:
    x = randn(3, 4, 5)
    close(run_op("slice_by_size", {"x": x}, {"begin": np.int32([1, -3, 0]), "size": np.int32([2, -1, 3])}), x[1:3, 1:, 0:3])
    update = randn(1, 2, 5)
    out = run_op("slice_update", {"x": x, "update": update}, {"begin": np.int32([1, 1, 0]), "end": np.int32([2, 3, 5])})
    expected = x.copy()
    expected[1:2, 1:3, 0:5] = update
    close(out, expected)


def test_concat_split_stack() -> None:
    a, b = randn(2, 3), randn(2, 3)
    close(run_op("concat", {"values": [a, b]}, {"axis": 1}), np.concatenate([a, b], 1))
    close(run_op("concat", {"values": [a, b]}, {"axis": 0, "interleave": True}), np.stack([a, b], 1).reshape(4, 3))
    s1, s2 = np.float32(1.5), np.float32(-2)
    close(run_op("concat", {"values": [s1, s2]}, {"axis": 0}), np.float32([1.5, -2]))
    close(run_op("stack", {"values": [a, b]}, {"axis": 2}), np.stack([a, b], 2))
    x = randn(2, 6)
    parts = run_op("split", {"x": x}, {"axis": 1, "split_sizes": np.int32([1, 2, 3])}, outputs=3)
    for got, want in zip(parts, np.split(x, [1, 3], axis=1)):
        close(got, want)
    parts = run_op("split", {"x": x}, {"axis": -1, "num_splits": 3}, outputs=3)
    for got, want in zip(parts, np.split(x, 3, axis=1)):
        close(got, want)


def test_gather_family() -> None:
    x = randn(4, 5, 3)
    idx = np.int32([[0, -1], [2, 1]])
    close(run_op("gather", {"x": x, "indices": idx}, {"axis": 1}), np.take(x, idx, axis=1))
    close(run_op("gather", {"x": x, "indices": np.int32(2)}, {"axis": 0}), x[2])
    close(run_op("gather", {"x": x, "indices": np.int32([3, 0])}), x[[3, 0]])
    # batch_dims: one gather per leading index
    bidx = np.int32([[1, 2], [0, 0], [4, 3], [2, 2]])
    expected = np.stack([np.take(x[i], bidx[i], axis=0) for i in range(4)])
    close(run_op("gather", {"x": x, "indices": bidx}, {"axis": 1, "batch_dims": 1}), expected)
    bidx2 = bidx % 3
    expected2 = np.stack([np.take(x[i], bidx2[i], axis=1) for i in range(4)])
    close(run_op("gather", {"x": x, "indices": bidx2}, {"axis": 2, "batch_dims": 1}), expected2)
    along = rng.integers(0, 5, (4, 2, 3)).astype(np.int32)
    close(run_op("gather_along_axis", {"x": x, "indices": along}, {"axis": 1}), np.take_along_axis(x, along, 1))
    nd = np.int32([[0, 1], [3, 4], [2, 0]])
    close(run_op("gather_nd", {"x": x, "indices": nd}), np.stack([x[0, 1], x[3, 4], x[2, 0]]))
    nd_b = np.int32([[[1]], [[4]], [[0]], [[2]]])  # batch_dims=1: x[b, nd_b[b, 0, 0]]
    close(run_op("gather_nd", {"x": x, "indices": nd_b}, {"batch_dims": 1}), np.stack([x[b, nd_b[b, 0, 0]] for b in range(4)])[:, None])


def test_gather_validate_indices() -> None:
    x = randn(3, 2)
    with pytest.raises(IndexError, match="index 3 is out of bounds"):
        run_op("gather", {"x": x, "indices": np.int32([3])}, {"validate_indices": True})
    # iOS16 counts negative indices from the end; from iOS17 on they are out of bounds
    close(run_op("gather", {"x": x, "indices": np.int32([-1])}, {"validate_indices": True}, opset="ios16"), x[[-1]])
    with pytest.raises(IndexError, match="index -1 is out of bounds"):
        run_op("scatter", {"data": x, "indices": np.int32([-1]), "updates": x[:1]}, {"validate_indices": True},
               opset="ios17")
    # without validation an out-of-bound index is undefined but harmless: the update is dropped
    close(run_op("scatter", {"data": x, "indices": np.int32([5]), "updates": x[:1]}, {"mode": "update"}), x)


@pytest.mark.parametrize("mode", ["update", "add", "sub", "mul", "div", "max", "min"])
def test_scatter_modes(mode: str) -> None:
    data = rng.uniform(1, 2, (3, 4)).astype(np.float32)
    idx = np.int32([2, 0])
    upd = rng.uniform(1, 2, (2, 4)).astype(np.float32)
    ops = {"update": lambda a, b: b, "add": np.add, "sub": np.subtract, "mul": np.multiply, "div": np.divide,
           "max": np.maximum, "min": np.minimum}
    expected = data.copy()
    for i, j in enumerate(idx):
        expected[j] = ops[mode](expected[j], upd[i])
    close(run_op("scatter", {"data": data, "indices": idx, "updates": upd}, {"axis": 0, "mode": mode}), expected, 1e-6)
    # along axis 1
    idx1 = np.int32([[1, 3], [0, 2], [3, 1]])
    upd1 = rng.uniform(1, 2, (3, 2)).astype(np.float32)
    expected1 = data.copy()
    for r in range(3):
        for c in range(2):
            expected1[r, idx1[r, c]] = ops[mode](expected1[r, idx1[r, c]], upd1[r, c])
    out = run_op("scatter_along_axis", {"data": data, "indices": idx1, "updates": upd1}, {"axis": 1, "mode": mode})
    close(out, expected1, 1e-6)
    # nd: rows (0,1) and (2,3) of a 3x4
    idxn = np.int32([[0, 1], [2, 3]])
    updn = np.float32([5, 7])
    expectedn = data.copy()
    for (r, c), u in zip(idxn, updn):
        expectedn[r, c] = ops[mode](expectedn[r, c], u)
    close(run_op("scatter_nd", {"data": data, "indices": idxn, "updates": updn}, {"mode": mode}), expectedn, 1e-6)


def test_scatter_default_mode_is_add() -> None:
    data, idx, upd = np.ones((3, 2), np.float32), np.int32([1, 1]), np.ones((2, 2), np.float32)
    close(run_op("scatter", {"data": data, "indices": idx, "updates": upd}), np.float32([[1, 1], [3, 3], [1, 1]]))


@pytest.mark.parametrize("mode", ["constant", "reflect", "replicate"])
def test_pad(mode: str) -> None:
    x = randn(2, 3, 4)
    pad = np.int32([1, 2, 2, 1])  # last two dims
    np_mode = {"constant": "constant", "reflect": "reflect", "replicate": "edge"}[mode]
    kwargs = {"constant_values": 0.5} if mode == "constant" else {}
    expected = np.pad(x, [(0, 0), (1, 2), (2, 1)], np_mode, **kwargs)
    close(run_op("pad", {"x": x}, {"pad": pad, "mode": mode, "constant_val": 0.5 if mode == "constant" else None}), expected)


def test_construction_ops() -> None:
    close(run_op("fill", params={"shape": np.int32([2, 3]), "value": 1.5}), np.full((2, 3), 1.5, np.float32))
    close(run_op("fill", params={"shape": np.int32([2])}, out_dtype="fp32"), np.zeros(2, np.float32))
    ref = randn(2, 2)
    close(run_op("fill_like", {"ref_tensor": ref}, {"value": 3.0}), np.full((2, 2), 3.0, np.float32))
    close(run_op("range_1d", params={"start": np.int32(2), "end": np.int32(11), "step": np.int32(3)}, out_dtype="int32"),
          np.arange(2, 11, 3, dtype=np.int32))
    close(run_op("range_1d", params={"start": 1.0, "end": 0.0, "step": -0.25}), np.arange(1.0, 0.0, -0.25, dtype=np.float32))
    x = randn(4, 5)
    band = run_op("band_part", {"x": x}, {"lower": 1, "upper": 0})
    m, n = np.indices((4, 5))
    close(band, np.where(((m - n) <= 1) & ((n - m) <= 0), x, 0))
    close(run_op("band_part", {"x": x}), x)
    idx = np.int32([1, 0, 3])
    close(run_op("one_hot", {"indices": idx}, {"one_hot_vector_size": 4, "on_value": 2.0, "off_value": -1.0}),
          np.where(np.eye(4)[idx] > 0, 2.0, -1.0).astype(np.float32))
    close(run_op("one_hot", {"indices": idx}, {"one_hot_vector_size": 4, "axis": 0}), np.eye(4)[idx].T.astype(np.float32))
    close(run_op("tile", {"x": x}, {"reps": np.int32([2, 1])}), np.tile(x, (2, 1)))


@pytest.mark.parametrize("exclusive, reverse", [(False, False), (True, False), (False, True), (True, True)])
def test_cumsum(exclusive: bool, reverse: bool) -> None:
    x = randn(3, 4)
    data = np.flip(x, 1) if reverse else x
    out = np.cumsum(data, 1)
    if exclusive:
        out = np.concatenate([np.zeros((3, 1), np.float32), out[:, :-1]], 1)
    if reverse:
        out = np.flip(out, 1)
    close(run_op("cumsum", {"x": x}, {"axis": 1, "exclusive": exclusive, "reverse": reverse}), out, 1e-5)


def test_sorting_and_nonzero() -> None:
    x = np.float32([[3, 1, 2, 5], [0, -1, 4, 4.5]])
    close(run_op("argsort", {"x": x}, out_dtype="int32"), np.argsort(-x, axis=-1).astype(np.int32))
    close(run_op("argsort", {"x": x}, {"ascending": True, "axis": 1}, out_dtype="int32"), np.argsort(x, axis=1).astype(np.int32))
    values, indices = run_op("topk", {"x": x}, {"k": 2}, outputs=2)
    order = np.argsort(-x, axis=-1)[:, :2]
    close(values, np.take_along_axis(x, order, -1))
    close(indices, order.astype(np.int32))
    values, indices = run_op("topk", {"x": x}, {"k": 1, "axis": 0, "ascending": True}, outputs=2)
    close(values, x.min(0, keepdims=True))
    close(run_op("non_zero", {"x": np.float32([[0, 1], [2, 0]])}, out_dtype="int32"), np.int32([[0, 1], [1, 0]]))


def test_space_and_depth() -> None:
    x = randn(1, 8, 2, 3)
    b = 2
    # depth_to_space (DCR): out[n, c, h*b+i, w*b+j] = x[n, (i*b+j)*C' + c, h, w]
    out = np.zeros((1, 2, 4, 6), np.float32)
    for c in range(2):
        for i in range(b):
            for j in range(b):
                out[0, c, i::b, j::b] = x[0, (i * b + j) * 2 + c]
    close(run_op("depth_to_space", {"x": x}, {"block_size": 2}), out)
    close(run_op("space_to_depth", {"x": out}, {"block_size": 2}), x)
    # pixel_shuffle (CRD): channel c*b*b + i*b + j
    ps = np.zeros((1, 2, 4, 6), np.float32)
    for c in range(2):
        for i in range(b):
            for j in range(b):
                ps[0, c, i::b, j::b] = x[0, c * b * b + i * b + j]
    close(run_op("pixel_shuffle", {"x": x}, {"upscale_factor": 2}), ps)
    close(run_op("pixel_unshuffle", {"x": ps}, {"downscale_factor": np.uint32(2)}, typed={"downscale_factor": "uint32"}), x)
    s = randn(2, 7, 3)
    win = run_op("sliding_windows", {"x": s}, {"axis": 1, "size": 3, "stride": 2})
    close(win, np.stack([s[:, i: i + 3] for i in range(0, 5, 2)], 1))


def test_reverse_sequence() -> None:
    x = randn(3, 5, 2)
    lengths = np.int32([2, 5, 0])
    expected = x.copy()
    for b, n in enumerate(lengths):
        expected[b, :n] = x[b, :n][::-1]
    close(run_op("reverse_sequence", {"x": x, "lengths": lengths}, {"seq_axis": 1, "batch_axis": 0}), expected)


# -- attention and quantization ------------------------------------------------------


def ref_sdpa(q: np.ndarray, k: np.ndarray, v: np.ndarray, mask: np.ndarray | None) -> np.ndarray:
    s = q @ np.swapaxes(k, -1, -2) / np.sqrt(q.shape[-1])
    if mask is not None:
        s = s + (np.where(mask, 0, -np.inf) if mask.dtype == bool else mask)
    e = np.exp(s - s.max(-1, keepdims=True))
    return (e / e.sum(-1, keepdims=True)) @ v


@pytest.mark.parametrize("mask_kind", [None, "bool", "float"])
def test_scaled_dot_product_attention(mask_kind: str | None) -> None:
    q, k, v = randn(2, 3, 5, 4), randn(2, 3, 6, 4), randn(2, 3, 6, 7)
    mask = None
    if mask_kind == "bool":
        mask = rng.integers(0, 2, (5, 6)).astype(bool)
        mask[:, 0] = True
    elif mask_kind == "float":
        mask = randn(1, 5, 6)
    inputs = {"query": q, "key": k, "value": v}
    if mask is not None:
        inputs["attn_mask"] = mask
    close(run_op("scaled_dot_product_attention", inputs), ref_sdpa(q, k, v, mask), 1e-5)


def test_quantize_dequantize() -> None:
    x = randn(2, 3, 4) * 10
    scale = np.float32([0.1, 0.2, 0.5])
    zp = np.int8([0, 3, -4])
    q = run_op("quantize", {"input": x}, {"scale": scale, "zero_point": zp, "axis": 1, "output_dtype": "int8"}, out_dtype="int8")
    expected = np.clip(np.round(x / scale.reshape(1, 3, 1)) + zp.reshape(1, 3, 1), -128, 127).astype(np.int8)
    close(q, expected)
    deq = run_op("dequantize", {"input": expected}, {"scale": scale, "zero_point": zp, "axis": 1})
    close(deq, (expected.astype(np.float32) - zp.reshape(1, 3, 1)) * scale.reshape(1, 3, 1), 1e-5)
    u = run_op("quantize", {"input": x}, {"scale": np.float32(0.5), "output_dtype": "uint8"}, out_dtype="uint8")
    close(u, np.clip(np.round(x / 0.5), 0, 255).astype(np.uint8))


# -- weight decompression (constexpr) ------------------------------------------------


def run_constexpr(op_type: str, params: dict[str, Any], typed: dict[str, str] | None = None, outputs: int = 1) -> Any:
    """A constexpr op feeding an identity, so the decompressed constant is the program output."""
    typed = typed or {}
    bindings = {k: immediate(v, typed.get(k)) for k, v in params.items()}
    outs = tuple(Var(f"w{i}", TensorType("fp32", None)) for i in range(outputs))
    ops = [Operation(op_type, bindings, outs, {"name": immediate("decompress")})]
    results = []
    for i, out in enumerate(outs):
        ops.append(Operation("identity", {"x": out.name}, (Var(f"y{i}", TensorType("fp32", None)),), {}))
        results.append(f"y{i}")
    x = Var("x", TensorType("fp32", (1,)))
    fn = Function("main", "ios18", (x,), Block(ops, tuple(results)))
    ctx = Context.create("cpu", {"fp16": torch.float32, "fp32": torch.float32, "fp64": torch.float32, "bf16": torch.float32})
    values = CompiledFunction(fn, ctx, fuse=False)(torch.zeros(1))
    arrays = [v.numpy() for v in values]
    return arrays[0] if outputs == 1 else arrays


def test_ios16_lut_to_dense_packed_indices() -> None:
    # the documented 2-bit packing: indices [0, 3, 2, 1, 3] -> bytes LSB first
    values = [0, 3, 2, 1, 3]
    packed = np.uint8([0 | 3 << 2 | 2 << 4 | 1 << 6, 3])
    lut = np.float32([10, 20, 30, 40])
    out = run_constexpr("constexpr_lut_to_dense", {"indices": packed, "lut": lut, "shape": np.uint32([5])},
                        typed={"shape": "uint32"})
    close(out, lut[values])


def test_ios16_sparse_to_dense_packed_mask() -> None:
    # documented example: shape (5,), mask bits 0b01100 -> elements 2 and 3 are set
    mask = np.uint8([0b00001100])
    out = run_constexpr("constexpr_sparse_to_dense", {"nonzero_data": np.float32([7, 9]), "mask": mask,
                                                      "shape": np.uint32([5])}, typed={"shape": "uint32"})
    close(out, np.float32([0, 0, 7, 9, 0]))


def test_affine_dequantize_and_cast() -> None:
    q = rng.integers(0, 255, (3, 4)).astype(np.uint8)
    zp = np.uint8([1, 2, 3])
    scale = np.float32([0.5, 0.25, 2.0])
    out = run_constexpr("constexpr_affine_dequantize", {"quantized_data": q, "zero_point": zp, "scale": scale,
                                                        "axis": np.int32(0)})
    close(out, scale.reshape(3, 1) * (q.astype(np.float32) - zp.reshape(3, 1)))
    scalar = run_constexpr("constexpr_affine_dequantize", {"quantized_data": q, "zero_point": np.uint8(4),
                                                           "scale": np.float32(0.1), "axis": np.int32(1)})
    close(scalar, 0.1 * (q.astype(np.float32) - 4), 1e-6)
    half = randn(2, 3).astype(np.float16)
    close(run_constexpr("constexpr_cast", {"source_val": half, "output_dtype": "fp32"}), half.astype(np.float32))


def test_ios18_lut_per_group_documented_case() -> None:
    indices = np.uint8([2, 3, 3, 0, 1, 0, 3, 0, 2, 1, 0, 3]).reshape(6, 2)
    lut = np.float32([1.0, 5.0, 9.0, 13.0, 2.0, 10.0, 18.0, 26.0]).reshape(2, 1, 4, 1)
    out = run_constexpr("constexpr_lut_to_dense", {"indices": indices, "lut": lut}, typed={"indices": "uint2"})
    close(out, np.float32([[9, 13], [13, 1], [5, 1], [26, 2], [18, 10], [2, 26]]))


@pytest.mark.parametrize("vector_axis", [1, 2])
def test_ios18_lut_vector_documented_case(vector_axis: int) -> None:
    indices = np.uint8([[[0, 0], [1, 0]], [[1, 1], [0, 0]]])
    a, b = [1.0, 2.0, 3.0], [4.0, 5.0, 6.0]
    lut = np.float32([a, b]).reshape(1, 1, 1, 2, 3)
    out = run_constexpr("constexpr_lut_to_dense", {"indices": indices, "lut": lut, "vector_axis": np.int32(vector_axis)},
                        typed={"indices": "uint1"})
    if vector_axis == 1:
        expected = [[[a[0], a[0]], [a[1], a[1]], [a[2], a[2]], [b[0], a[0]], [b[1], a[1]], [b[2], a[2]]],
                    [[b[0], b[0]], [b[1], b[1]], [b[2], b[2]], [a[0], a[0]], [a[1], a[1]], [a[2], a[2]]]]
    else:
        expected = [[a + a, b + a], [b + b, a + a]]
    close(out, np.float32(expected))


def test_ios18_sparse_and_shift_scale() -> None:
    mask = np.uint8([[1, 1, 0, 0], [1, 1, 1, 0], [0, 0, 1, 1], [1, 1, 0, 0]])
    nonzero = np.int8([10, 11, 3, 4, 5, 6, 7, 8, 9])
    dense = run_constexpr("constexpr_sparse_to_dense", {"nonzero_data": nonzero.astype(np.float32), "mask": mask},
                          typed={"mask": "uint1"})
    expected = np.zeros((4, 4), np.float32)
    expected[mask != 0] = nonzero
    close(dense, expected)
    scale = np.float32([[0.1, 0.2, 0.3, 0.4]])
    offset = np.int8([[1, 2, 3, 4]])
    out_mask, values = run_constexpr("constexpr_sparse_blockwise_shift_scale",
                                     {"data_mask": mask, "nonzero_data": nonzero, "scale": scale, "offset": offset},
                                     typed={"data_mask": "uint1"}, outputs=2)
    close(out_mask, mask)
    close(values, np.float32([0.9, 1.8, 0.2, 0.4, 0.6, 0.9, 1.2, 0.7, 1.4]), 1e-6)
    data = rng.integers(-8, 8, (4, 6)).astype(np.int8)
    bscale = np.float32([[0.5, 2.0], [1.0, 0.25]])  # blocks of 2x3
    boffset = np.int8([[1, -1], [0, 2]])
    out = run_constexpr("constexpr_blockwise_shift_scale", {"data": data, "scale": bscale, "offset": boffset},
                        typed={"data": "int4", "offset": "int4"})
    expected = np.zeros((4, 6), np.float32)
    for i in range(4):
        for j in range(6):
            expected[i, j] = bscale[i // 2, j // 3] * (data[i, j] - boffset[i // 2, j // 3])
    close(out, expected)


def test_ios18_lut_to_sparse_documented_case() -> None:
    mask = np.uint8([[1, 1, 0, 0, 0, 0], [1, 1, 0, 0, 0, 1], [0, 1, 1, 0, 1, 0], [0, 0, 0, 1, 0, 0]])
    nonzero = np.uint8([0, 1, 1, 0, 1, 1, 0, 0, 1])
    lut = np.float32([2.0, 3.0]).reshape(1, 1, 2, 1)
    out_mask, values = run_constexpr("constexpr_lut_to_sparse",
                                     {"indices_mask": mask, "indices_nonzero_data": nonzero, "lut": lut},
                                     typed={"indices_mask": "uint1", "indices_nonzero_data": "uint1"}, outputs=2)
    close(out_mask, mask)
    close(values, np.float32([2, 3, 3, 2, 3, 3, 2, 2, 3]))
    vlut = np.float32([[2.0, 2.0], [3.0, 3.0]]).reshape(1, 1, 2, 2)
    out_mask, values = run_constexpr("constexpr_lut_to_sparse", {"indices_mask": mask, "indices_nonzero_data": nonzero,
                                                                 "lut": vlut, "vector_axis": np.int32(0)},
                                     typed={"indices_mask": "uint1", "indices_nonzero_data": "uint1"}, outputs=2)
    close(out_mask, np.repeat(mask, 2, axis=0))
    assert values.size == 18


def test_unknown_input_is_a_load_time_error() -> None:
    from coreml_hub.errors import UnsupportedOperation

    with pytest.raises(UnsupportedOperation, match="not supported"):
        run_op("relu", {"x": randn(2)}, {"frobnicate": 1.0})


# -- cross-check with coremltools' own value inference -------------------------------


@pytest.mark.slow
def test_matches_coremltools_value_inference(tmp_path: Any) -> None:
    """Ops built with coremltools' MIL builder on constants carry the value coremltools'
    own op definitions infer; the saved package, run here, must give the same numbers."""
    ct = pytest.importorskip("coremltools", reason="coremltools builds and saves the program")
    from coreml_hub.mil import load_model
    from coremltools.converters.mil import Builder as mb
    from coremltools.converters.mil.mil import types

    g = np.random.default_rng(11)
    x = g.standard_normal((2, 3, 4)).astype(np.float32)
    pos = np.abs(x) + 0.5
    img = g.standard_normal((1, 2, 5, 6)).astype(np.float32)
    ints = g.integers(-5, 6, (3, 4)).astype(np.int32)
    expected: dict[str, np.ndarray] = {}

    @mb.program(input_specs=[mb.TensorSpec(shape=(1,), dtype=types.fp32)], opset_version=ct.target.iOS16)
    def prog(dummy):  # type: ignore[no-untyped-def]
        outs = []

        def keep(name: str, var: Any) -> None:
            if var.val is None:
                return
            expected[name] = np.asarray(var.val)
            outs.append(mb.identity(x=var, name=name))

        for op_name in ("abs", "ceil", "cos", "exp", "floor", "round", "sign", "sin", "square", "tanh", "relu",
                        "sigmoid", "softsign", "atan", "exp2"):
            keep(f"u_{op_name}", getattr(mb, op_name)(x=x))
        for op_name in ("sqrt", "rsqrt", "log", "inverse"):
            keep(f"u_{op_name}", getattr(mb, op_name)(x=pos))
        keep("u_rsqrt_eps", mb.rsqrt(x=pos, epsilon=0.5))
        keep("u_clip", mb.clip(x=x, alpha=-0.3, beta=0.6))
        for mode in ("EXACT", "TANH_APPROXIMATION", "SIGMOID_APPROXIMATION"):
            keep(f"gelu_{mode}", mb.gelu(x=x, mode=mode))
        keep("elu", mb.elu(x=x, alpha=0.7))
        keep("leaky", mb.leaky_relu(x=x, alpha=0.2))
        keep("softmax0", mb.softmax(x=x, axis=0))
        keep("softmax_last", mb.softmax(x=x))
        for op_name in ("add", "sub", "mul", "real_div", "maximum", "minimum", "floor_div", "mod", "pow"):
            keep(f"b_{op_name}", getattr(mb, op_name)(x=pos, y=pos[0, :, :1] + 0.25))
        keep("i_floor_div", mb.floor_div(x=ints, y=np.int32(3)))
        keep("i_mod", mb.mod(x=ints, y=np.int32(-3)))
        for op_name in ("equal", "greater", "less_equal", "not_equal"):
            keep(f"c_{op_name}", getattr(mb, op_name)(x=ints, y=np.int32(1)))
        for op_name in ("reduce_sum", "reduce_mean", "reduce_max", "reduce_min", "reduce_prod", "reduce_l2_norm",
                        "reduce_log_sum_exp", "reduce_sum_square", "reduce_l1_norm"):
            keep(f"r_{op_name}", getattr(mb, op_name)(x=pos, axes=[0, 2], keep_dims=True))
            keep(f"r_{op_name}_all", getattr(mb, op_name)(x=pos))
        keep("argmax", mb.reduce_argmax(x=x, axis=1, keep_dims=True))
        keep("argmin", mb.reduce_argmin(x=x))
        keep("slice_neg", mb.slice_by_index(x=x, begin=[1, -2, 3], end=[0, 0, 0], stride=[-1, -1, -2]))
        keep("slice_masks", mb.slice_by_index(x=x, begin=[0, 1, 0], end=[1, 3, 2], begin_mask=[False, False, True],
                                              end_mask=[True, False, False], squeeze_mask=[True, False, False]))
        keep("slice_size", mb.slice_by_size(x=x, begin=[0, 1, -2], size=[2, -1, 2]))
        keep("gather_b", mb.gather(x=x, indices=np.int32([[2, 0], [1, 1]]), axis=1, batch_dims=1))
        keep("gather_neg", mb.gather(x=x, indices=np.int32([-1, 0]), axis=2))
        keep("gather_axis", mb.gather_along_axis(x=x, indices=g.integers(0, 3, (2, 3, 4)).astype(np.int32), axis=1))
        keep("gather_nd", mb.gather_nd(x=x, indices=np.int32([[1, 2], [0, 0]])))
        keep("concat", mb.concat(values=[x, x * 2], axis=-1))
        # (interleave is left out: coremltools' value inference ignores it; test_concat_split_stack covers it)
        keep("stack", mb.stack(values=[x, x], axis=1))
        keep("tile", mb.tile(x=x, reps=[1, 2, 1]))
        keep("pad_c", mb.pad(x=x, pad=[1, 0, 0, 2], mode="constant", constant_val=3.0))
        keep("pad_r", mb.pad(x=x, pad=[1, 2, 2, 1], mode="reflect"))
        keep("pad_e", mb.pad(x=x, pad=[0, 2], mode="replicate"))
        keep("reshape", mb.reshape(x=x, shape=[0, -1, 2]))
        keep("expand", mb.expand_dims(x=x, axes=[-1, 0]))
        keep("squeeze", mb.squeeze(x=mb.expand_dims(x=x, axes=[1]), axes=[1]))
        keep("transpose", mb.transpose(x=x, perm=[2, 0, 1]))
        keep("reverse", mb.reverse(x=x, axes=[1]))
        keep("band", mb.band_part(x=x, lower=0, upper=1))
        keep("cumsum", mb.cumsum(x=x, axis=1, reverse=True))
        keep("fill", mb.fill(shape=np.int32([2, 2]), value=1.5))
        keep("range", mb.range_1d(start=np.int32(1), end=np.int32(9), step=np.int32(2)))
        keep("argsort", mb.argsort(x=x, axis=-1, ascending=True))
        keep("flatten", mb.flatten2d(x=x, axis=2))
        keep("layer_norm", mb.layer_norm(x=x, axes=[1], epsilon=1e-3))
        keep("l2_norm", mb.l2_norm(x=x))
        keep("linear", mb.linear(x=x, weight=g.standard_normal((5, 4)).astype(np.float32), bias=np.arange(5, dtype=np.float32)))
        keep("matmul", mb.matmul(x=x, y=x, transpose_y=True))
        keep("einsum", mb.einsum(values=(img, g.standard_normal((1, 6, 5, 3)).astype(np.float32)), equation="nchw,nwhu->nchu"))
        keep("cast_i", mb.cast(x=x * 3, dtype="int32"))
        keep("select", mb.select(cond=x > 0, a=x, b=x * 10))
        keep("split0", mb.split(x=x, num_splits=2, axis=0)[1])
        keep("split_sizes", mb.split(x=x, split_sizes=[1, 3], axis=2)[1])
        keep("band2", mb.band_part(x=x, lower=-1, upper=0))
        keep("topk_v", mb.topk(x=x, k=2, axis=1)[0])
        keep("avg_pool", mb.avg_pool(x=img, kernel_sizes=[2, 3], strides=[1, 2], pad_type="valid"))
        keep("max_pool", mb.max_pool(x=img, kernel_sizes=[3, 3], strides=[2, 2], pad_type="same"))
        keep("upsample", mb.upsample_nearest_neighbor(x=img, scale_factor_height=2, scale_factor_width=2))
        keep("conv", mb.conv(x=img, weight=g.standard_normal((3, 2, 3, 3)).astype(np.float32), pad_type="same",
                             strides=[2, 1]))
        outs.append(mb.add(x=dummy, y=np.float32(1.0), name="out_dummy"))
        return tuple(outs)

    package = tmp_path / "value_inference.mlpackage"
    ct.convert(prog, convert_to="mlprogram", pass_pipeline=ct.PassPipeline.EMPTY,
               minimum_deployment_target=ct.target.iOS16).save(str(package))
    out = load_model(package).predict({"dummy": np.zeros(1, np.float32)})
    assert len(expected) >= 90
    for name, value in expected.items():
        try:
            close(out[name], value.astype(out[name].dtype) if value.dtype != out[name].dtype else value, 1e-4)
        except AssertionError as exc:
            raise AssertionError(f"{name}: {exc}") from None


# -- recurrent -----------------------------------------------------------------------


def ref_lstm(x: np.ndarray, h: np.ndarray, c: np.ndarray, w_ih: np.ndarray, w_hh: np.ndarray, b: np.ndarray,
             p: np.ndarray | None, reverse: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The lstm equations of the op definition (gates i, f, o, z), with i/f peepholes on c_{t-1}, o on c_t."""
    hidden = w_hh.shape[1]
    sig = lambda v: 1 / (1 + np.exp(-v))  # noqa: E731
    outs = [None] * len(x)
    for t in (range(len(x) - 1, -1, -1) if reverse else range(len(x))):
        g = x[t] @ w_ih.T + h @ w_hh.T + b
        i, f, o, z = (g[:, k * hidden:(k + 1) * hidden] for k in range(4))
        if p is not None:
            i, f = i + p[:hidden] * c, f + p[hidden:2 * hidden] * c
        c = sig(f) * c + sig(i) * np.tanh(z)
        if p is not None:
            o = o + p[2 * hidden:] * c
        h = sig(o) * np.tanh(c)
        outs[t] = h
    return np.stack(outs), h, c


@pytest.mark.parametrize("direction", ["forward", "reverse", "bidirectional"])
@pytest.mark.parametrize("output_sequence", [False, True])
@pytest.mark.parametrize("peephole", [False, True])
def test_lstm(direction: str, output_sequence: bool, peephole: bool) -> None:
    s, b, i, hsz = 5, 2, 3, 4
    d = 2 if direction == "bidirectional" else 1
    x = randn(s, b, i)
    h0, c0 = randn(b, d * hsz) * 0.5, randn(b, d * hsz) * 0.5
    w = [randn(4 * hsz, i) * 0.5 for _ in range(d)]
    r = [randn(4 * hsz, hsz) * 0.5 for _ in range(d)]
    bias = [randn(4 * hsz) * 0.1 for _ in range(d)]
    peep = [randn(3 * hsz) * 0.3 if peephole else None for _ in range(d)]
    params: dict[str, Any] = {"weight_ih": w[0], "weight_hh": r[0], "bias": bias[0], "peephole": peep[0],
                              "direction": direction, "output_sequence": output_sequence}
    if d == 2:
        params.update(weight_ih_back=w[1], weight_hh_back=r[1], bias_back=bias[1], peephole_back=peep[1])
    seq, h, c = run_op("lstm", {"x": x, "initial_h": h0, "initial_c": c0}, params, outputs=3)
    runs = [ref_lstm(x, h0[:, k * hsz:(k + 1) * hsz], c0[:, k * hsz:(k + 1) * hsz], w[k], r[k], bias[k], peep[k],
                     direction == "reverse" or k == 1) for k in range(d)]
    full = np.concatenate([run[0] for run in runs], -1)
    if direction == "reverse":
        full = full[::-1]  # a single reverse direction lists its steps in the order it ran them
    if output_sequence:
        close(seq, full, 1e-5)
    else:
        last = np.concatenate([runs[0][0][-1:]] + ([runs[1][0][:1]] if d == 2 else []), -1)
        close(seq, runs[0][1][None] if direction == "reverse" else last, 1e-5)
    close(h, np.concatenate([run[1] for run in runs], -1), 1e-5)
    close(c, np.concatenate([run[2] for run in runs], -1), 1e-5)
