"""State ops (iOS18): read and update a `state<tensor<...>>` function input in place.

A state input arrives as the caller's tensor. `read_state` returns it as is; the
executor asks for a copy where a later write would change a value still in use.
"""

from __future__ import annotations

import torch

from . import kernel


@kernel("read_state", tensors=("input",), foldable=False, internal=("copy",))
def read_state(input: torch.Tensor, copy: bool = False) -> torch.Tensor:
    return input.clone() if copy else input


def _write(state: torch.Tensor, value: torch.Tensor) -> None:
    if value.data_ptr() != state.data_ptr():
        state.copy_(value.reshape(state.shape))


@kernel("write_state", tensors=("input", "data"), foldable=False)
def write_state(input: torch.Tensor, data: torch.Tensor) -> None:
    _write(input, data)


@kernel("coreml_update_state", tensors=("state", "value"), foldable=False)
def coreml_update_state(state: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """The converter's write-then-read form: the value written is the result."""
    _write(state, value)
    return value

