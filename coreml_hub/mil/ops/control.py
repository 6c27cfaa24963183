"""List ops.

A MIL list is a Python list of tensors at run time (`None` where nothing was written yet).
`list_write` and `list_scatter` return a new list: MIL values are never updated in place,
and a list read before a write must keep what it held.

`cond` and `while_loop` are not kernels: the executor emits them as Python control flow.
`classify` is not one either: the model takes it out of the program (`features.strip_classifiers`).
"""

from __future__ import annotations

from typing import Any

import torch

from . import Context, kernel


def _elem_shape(elem_shape: Any) -> list[int] | None:
    if elem_shape is None:
        return None
    dims = elem_shape if isinstance(elem_shape, (list, tuple)) else [elem_shape]
    if any(not isinstance(d, int) for d in dims):
        return None  # symbolic: known once an element is written
    return [int(d) for d in dims]


class TensorList(list):  # type: ignore[type-arg]
    """A list value with what an empty slot reads as: zeros of the element shape and type."""

    def __init__(self, items: Any, elem_shape: list[int] | None, dtype: torch.dtype, device: torch.device,
                 dynamic: bool = True) -> None:
        super().__init__(items)
        self.elem_shape = elem_shape
        self.dtype = dtype
        self.device = device
        self.dynamic = dynamic

    def like(self, items: Any) -> "TensorList":
        return TensorList(items, self.elem_shape, self.dtype, self.device, self.dynamic)

    def element(self, index: int) -> torch.Tensor:
        value = self[index] if 0 <= index < len(self) else None
        if value is not None:
            return value
        shape = self.elem_shape or next((list(v.shape) for v in self if v is not None), None)
        if shape is None:
            raise ValueError(f"list element {index} was never written and the element shape is unknown")
        return torch.zeros(shape, dtype=self.dtype, device=self.device)

    def written(self, index: int, value: torch.Tensor) -> "TensorList":
        if index < 0:
            index += len(self)
        items = list(self)
        if index >= len(items):
            if not self.dynamic:
                raise IndexError(f"list index {index} is past the fixed length {len(items)}")
            items.extend([None] * (index + 1 - len(items)))
        items[index] = value.to(self.dtype) if value.dtype != self.dtype and value.is_floating_point() else value
        return self.like(items)


@kernel("make_list", tensors=(), foldable=False)
def make_list(
    ctx: Context,
    out_dtype: torch.dtype,
    elem_shape: Any = None,
    init_length: int = 1,
    dynamic_length: bool = True,
    dtype: str = "fp32",
) -> TensorList:
    element = out_dtype if out_dtype is not None else ctx.dtype(dtype)
    return TensorList([None] * int(init_length), _elem_shape(elem_shape), element, ctx.device, bool(dynamic_length))


@kernel("list_length", tensors=("ls",), foldable=False)
def list_length(ctx: Context, ls: TensorList) -> torch.Tensor:
    return torch.tensor(len(ls), dtype=torch.int32, device=ctx.device)


@kernel("list_write", tensors=("ls", "value"), foldable=False)
def list_write(ls: TensorList, index: int, value: torch.Tensor) -> TensorList:
    return ls.written(int(index), value)


@kernel("list_read", tensors=("ls",), foldable=False)
def list_read(ls: TensorList, index: int) -> torch.Tensor:
    return ls.element(int(index))


@kernel("list_gather", tensors=("ls", "indices"), foldable=False)
def list_gather(ls: TensorList, indices: torch.Tensor) -> torch.Tensor:
    picked = [ls.element(int(i)) for i in indices.reshape(-1).tolist()]
    if not picked:
        shape = ls.elem_shape or []
        return torch.zeros([0] + shape, dtype=ls.dtype, device=ls.device)
    return torch.stack(picked, 0)


@kernel("list_scatter", tensors=("ls", "indices", "value"), foldable=False)
def list_scatter(ls: TensorList, indices: torch.Tensor, value: torch.Tensor) -> TensorList:
    out = ls
    for row, index in enumerate(indices.reshape(-1).tolist()):
        out = out.written(int(index), value[row])
    return out
