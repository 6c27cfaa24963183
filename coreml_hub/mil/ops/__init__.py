"""PyTorch kernels for ML Program ops, keyed by op type.

A kernel is a plain function whose keyword parameters are the op's MIL input names.
Inputs listed in `tensors` arrive as torch tensors (or tuples of them for variadic
inputs); every other input is a *parameter* and arrives as a plain Python value
(`int`, `float`, `bool`, `str` or a list of them), converted once at load time when the
input is constant. An absent optional input takes the kernel's Python default, which
is the default the MIL op definition gives.

Four extra parameter names are bound by the executor, never by the program:
`ctx` (the `Context`: device and float type), `out_dtype` (the torch dtype of the
op's first declared output, or of its elements for a list), `out_shape` (that
output's declared shape, symbols included) and `opset` (the function's opset as a
number, 15 for iOS15 ... 18 for iOS18) for ops whose meaning changed between opsets.

A kernel registered with `foldable=False` runs at every prediction even when all its
inputs are constant: random ops, list construction, state reads and writes.

Weight-decompression ops (`constexpr_*`) are `CONSTEXPR` functions over numpy arrays,
evaluated once at load time.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np
import torch


@dataclass(frozen=True)
class Context:
    """Where a program runs, and the torch dtype each MIL float type runs as.

    `floats` maps "fp16", "fp32", "fp64" and "bf16" to torch dtypes: on a CPU every float
    runs as float32; on a GPU an fp16 program keeps fp16 (and its fp32 parts fp32).
    """

    device: torch.device
    floats: tuple[tuple[str, torch.dtype], ...]

    @classmethod
    def create(cls, device: torch.device | str, floats: dict[str, torch.dtype]) -> "Context":
        return cls(torch.device(device), tuple(sorted(floats.items())))

    def dtype(self, mil_dtype: str) -> torch.dtype:
        """The torch dtype a value of MIL dtype `mil_dtype` runs as."""
        for name, dtype in self.floats:
            if name == mil_dtype:
                return dtype
        if mil_dtype in INT_DTYPES:
            return INT_DTYPES[mil_dtype]
        raise KeyError(f"no run-time type for MIL dtype {mil_dtype!r}")


# Non-float MIL dtypes at run time. Unsigned types wider than 8 bits have no full torch
# support, so they run in the next wider signed type.
INT_DTYPES: dict[str, torch.dtype] = {
    "bool": torch.bool,
    "int8": torch.int8,
    "uint8": torch.uint8,
    "int16": torch.int16,
    "uint16": torch.int32,
    "int32": torch.int32,
    "uint32": torch.int64,
    "int64": torch.int64,
    "uint64": torch.int64,
    "int4": torch.int8,
    "uint1": torch.uint8,
    "uint2": torch.uint8,
    "uint3": torch.uint8,
    "uint4": torch.uint8,
    "uint6": torch.uint8,
}


@dataclass(frozen=True)
class Kernel:
    name: str
    fn: Callable[..., Any]
    tensors: frozenset[str]
    params: frozenset[str]  # every keyword the function accepts from the program
    wants_ctx: bool
    wants_out_dtype: bool
    wants_out_shape: bool = False
    wants_opset: bool = False
    foldable: bool = True


KERNELS: dict[str, Kernel] = {}
CONSTEXPR: dict[str, Callable[..., Any]] = {}


_BOUND = ("ctx", "out_dtype", "out_shape", "opset")


def kernel(
    *names: str, tensors: tuple[str, ...] = ("x",), foldable: bool = True, internal: tuple[str, ...] = ()
) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Register `fn` as the kernel of the op types `names`.

    `internal`: keyword parameters the executor binds itself (never taken from the program).
    """

    def register(fn: Callable[..., Any]) -> Callable[..., Any]:
        sig = inspect.signature(fn).parameters
        accepted = frozenset(p for p in sig if p not in _BOUND and p not in internal)
        for name in names:
            KERNELS[name] = Kernel(
                name=name,
                fn=fn,
                tensors=frozenset(tensors),
                params=accepted,
                wants_ctx="ctx" in sig,
                wants_out_dtype="out_dtype" in sig,
                wants_out_shape="out_shape" in sig,
                wants_opset="opset" in sig,
                foldable=foldable,
            )
        return fn

    return register


def constexpr(*names: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Register a load-time numpy function for weight-decompression op types."""

    def register(fn: Callable[..., Any]) -> Callable[..., Any]:
        for name in names:
            CONSTEXPR[name] = fn
        return fn

    return register


# Ops the executor handles itself: constants, and control flow (emitted as Python control flow).
EXECUTOR_OPS = frozenset({"const", "_const_symbolic", "cond", "while_loop"})


def supported_ops() -> frozenset[str]:
    """Every op type the runtime can run (`const` and control flow included)."""
    return frozenset(KERNELS) | frozenset(CONSTEXPR) | EXECUTOR_OPS


def to_python(value: Any) -> Any:
    """A constant or run-time parameter as plain Python (lists, scalars, strings)."""
    if isinstance(value, torch.Tensor):
        return value.tolist()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, tuple):
        return [to_python(v) for v in value]
    return value


def along_axis(v: Any, axis: int | None, rank: int) -> Any:
    """A scalar or a vector (torch or numpy) shaped to broadcast along `axis` of a rank-`rank` tensor."""
    if v.ndim == 0 or axis is None:
        return v
    shape = [1] * rank
    shape[axis % rank] = -1
    return v.reshape(shape)


def pad_pairs(pad: Sequence[int]) -> list[tuple[int, int]]:
    """MIL's flat pad list [before0, after0, before1, after1, ...] as (before, after) per dimension."""
    return [(int(pad[2 * i]), int(pad[2 * i + 1])) for i in range(len(pad) // 2)]


def torch_pad(pairs: Sequence[tuple[int, int]]) -> list[int]:
    """(before, after) per dimension, first dimension first, as F.pad wants it: last dimension first."""
    return [n for before, after in reversed(pairs) for n in (before, after)]


# Registration happens on import of the kernel modules.
from . import control as _control  # noqa: E402,F401
from . import decompress as _decompress  # noqa: E402,F401
from . import elementwise as _elementwise  # noqa: E402,F401
from . import image as _image  # noqa: E402,F401
from . import nn as _nn  # noqa: E402,F401
from . import random as _random  # noqa: E402,F401
from . import state as _state  # noqa: E402,F401
from . import tensor as _tensor  # noqa: E402,F401
