"""Element-wise ops: unary math, activations, binary arithmetic and comparisons, casts."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from . import Context, along_axis, kernel

# -- unary ---------------------------------------------------------------------------

_UNARY = {
    "abs": torch.abs,
    "acos": torch.acos,
    "asin": torch.asin,
    "atan": torch.atan,
    "atanh": torch.atanh,
    "ceil": torch.ceil,
    "cos": torch.cos,
    "cosh": torch.cosh,
    "erf": torch.erf,
    "exp": torch.exp,
    "exp2": torch.exp2,
    "floor": torch.floor,
    "round": torch.round,  # half to even, as numpy's round in the op definition
    "sign": torch.sign,
    "sin": torch.sin,
    "sinh": torch.sinh,
    "sqrt": torch.sqrt,
    "square": torch.square,
    "tan": torch.tan,
    "tanh": torch.tanh,
    "relu": torch.relu,
    "sigmoid": torch.sigmoid,
    "silu": F.silu,
    "softsign": F.softsign,
    "logical_not": torch.logical_not,
}


def _unary(fn: Any) -> Any:
    def run(x: torch.Tensor) -> torch.Tensor:
        return fn(x)

    return run


for _name, _fn in _UNARY.items():
    kernel(_name)(_unary(_fn))


@kernel("relu6")
def relu6(x: torch.Tensor) -> torch.Tensor:
    return torch.clamp(x, 0.0, 6.0)


@kernel("softplus")
def softplus(x: torch.Tensor) -> torch.Tensor:
    return F.softplus(x)


@kernel("inverse")
def inverse(x: torch.Tensor, epsilon: float = 1e-4) -> torch.Tensor:
    return torch.reciprocal(x + epsilon)


@kernel("log")
def log(x: torch.Tensor, epsilon: float = 1e-45) -> torch.Tensor:
    return torch.log(x + epsilon)


@kernel("rsqrt")
def rsqrt(x: torch.Tensor, epsilon: float = 1e-12) -> torch.Tensor:
    return torch.rsqrt(x + epsilon)


@kernel("clip")
def clip(x: torch.Tensor, alpha: float, beta: float) -> torch.Tensor:
    return torch.clamp(x, alpha, beta)


@kernel("threshold")
def threshold(x: torch.Tensor, alpha: float) -> torch.Tensor:
    return torch.clamp(x, min=alpha)


# -- activations with parameters -----------------------------------------------------


@kernel("gelu")
def gelu(x: torch.Tensor, mode: str = "EXACT") -> torch.Tensor:
    if mode == "EXACT":
        return F.gelu(x)
    if mode == "TANH_APPROXIMATION":
        return F.gelu(x, approximate="tanh")
    if mode == "SIGMOID_APPROXIMATION":
        return x * torch.sigmoid(1.702 * x)
    raise ValueError(f"gelu: unknown mode {mode!r}")


@kernel("clamped_relu")
def clamped_relu(x: torch.Tensor, alpha: float, beta: float) -> torch.Tensor:
    return torch.clamp(torch.where(x >= 0, x, alpha * x), max=beta)


@kernel("elu")
def elu(x: torch.Tensor, alpha: float) -> torch.Tensor:
    return torch.where(x > 0, x, alpha * torch.expm1(x))


@kernel("leaky_relu")
def leaky_relu(x: torch.Tensor, alpha: float) -> torch.Tensor:
    return torch.where(x >= 0, x, alpha * x)


@kernel("linear_activation")
def linear_activation(x: torch.Tensor, alpha: float, beta: float) -> torch.Tensor:
    return x * alpha + beta


@kernel("prelu", tensors=("x", "alpha"))
def prelu(x: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
    return torch.where(x > 0, x, x * along_axis(alpha, 1, x.dim()))


@kernel("scaled_tanh")
def scaled_tanh(x: torch.Tensor, alpha: float, beta: float) -> torch.Tensor:
    return alpha * torch.tanh(beta * x)


@kernel("sigmoid_hard")
def sigmoid_hard(x: torch.Tensor, alpha: float, beta: float) -> torch.Tensor:
    return torch.clamp(alpha * x + beta, 0.0, 1.0)


@kernel("softplus_parametric", tensors=("x", "alpha", "beta"))
def softplus_parametric(x: torch.Tensor, alpha: torch.Tensor, beta: torch.Tensor) -> torch.Tensor:
    rank = x.dim()
    return along_axis(alpha, 1, rank) * F.softplus(x * along_axis(beta, 1, rank))


@kernel("thresholded_relu")
def thresholded_relu(x: torch.Tensor, alpha: float) -> torch.Tensor:
    return torch.where(x >= alpha, x, torch.zeros_like(x))


@kernel("softmax")
def softmax(x: torch.Tensor, axis: int = -1) -> torch.Tensor:
    return torch.softmax(x, axis)


# -- binary --------------------------------------------------------------------------


def _binary(fn: Any) -> Any:
    def run(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return fn(x, y)

    return run


_BINARY = {
    "add": torch.add,
    "sub": torch.sub,
    "mul": torch.mul,
    "maximum": torch.maximum,
    "minimum": torch.minimum,
    "equal": torch.eq,
    "not_equal": torch.ne,
    "greater": torch.gt,
    "greater_equal": torch.ge,
    "less": torch.lt,
    "less_equal": torch.le,
    "logical_and": torch.logical_and,
    "logical_or": torch.logical_or,
    "logical_xor": torch.logical_xor,
    "mod": torch.remainder,  # the sign follows the divisor, as Python's %
}

for _name, _fn in _BINARY.items():
    kernel(_name, tensors=("x", "y"))(_binary(_fn))


@kernel("real_div", tensors=("x", "y"))
def real_div(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    if x.is_floating_point() or y.is_floating_point():
        return torch.div(x, y)
    # integer inputs keep their type: the true quotient cast back, i.e. truncated
    return torch.div(x, y, rounding_mode="trunc")


@kernel("floor_div", tensors=("x", "y"))
def floor_div(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return torch.div(x, y, rounding_mode="floor")


@kernel("pow", tensors=("x", "y"))
def pow_(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return torch.pow(x, y)


@kernel("select", tensors=("cond", "a", "b"))
def select(cond: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.where(cond if cond.dtype == torch.bool else cond != 0, a, b)


# -- casts ---------------------------------------------------------------------------


@kernel("cast")
def cast(ctx: Context, x: torch.Tensor, dtype: str) -> torch.Tensor:
    target = ctx.dtype(dtype)
    if x.dtype == target:
        return x
    if x.is_floating_point() and not target.is_floating_point and target != torch.bool:
        # float -> int truncates toward zero (numpy's astype); guard the NaN/inf cases torch leaves undefined
        return torch.nan_to_num(x).trunc().to(target)
    return x.to(target)


@kernel("identity")
def identity(x: Any) -> Any:
    return x

