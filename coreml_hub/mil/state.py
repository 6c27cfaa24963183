"""Stateful models (iOS 18 ML Programs): the `State` object, and how the state ops run.

A stateful function takes `state<tensor<...>>` inputs. Its ops read them (`read_state`) and
overwrite them (`coreml_update_state`, which writes and returns the value, and `write_state`);
what they write persists into the next prediction made with the same state object, as with
coremltools' `model.make_state()`, `predict(inputs, state=state)` and `MLState.read_state` /
`write_state`. A new state holds zeros, as Core ML's does.

Here the state is threaded through the program as plain values (`lower_states`): each state
input becomes an ordinary tensor input, each `read_state` reads the state's current value,
each write makes the written value the current one, and the function additionally returns
the final value of every state it wrote. The model keeps those tensors in the `State` for
the next call. So no kernel writes in place, and the compiled function stays a pure
function of its inputs (which also keeps it friendly to torch.compile).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Mapping

import numpy as np

from ..errors import ModelInputError, UnsupportedOperation
from .program import Block, Function, Operation, StateType, Var
from .spec import FeatureDescription

STATE_OPS = frozenset({"read_state", "write_state", "coreml_update_state"})


@dataclass(frozen=True)
class StatePlan:
    """What `lower_states` did: the state inputs, and which program value holds each written state."""

    names: tuple[str, ...]
    written: dict[str, str]  # state name -> program value returned as its new value


def lower_states(fn: Function) -> tuple[Function, StatePlan]:
    """`fn` with its state inputs and state ops turned into plain values (see the module docstring)."""
    states = {v.name for v in fn.inputs if isinstance(v.type, StateType)}
    if not states:
        return fn, StatePlan((), {})
    for op in fn.block.operations:
        if op.blocks and any(inner.type in STATE_OPS for block in op.blocks for inner in block.walk()):
            raise UnsupportedOperation(f"function {fn.name}: state ops inside control flow ({op.type}) are not supported")
    current = {name: name for name in states}
    ops: list[Operation] = []
    for op in fn.block.operations:
        if op.type == "read_state":
            state = _state_arg(fn, op, ("input",), current)
            ops.append(Operation("identity", {"x": current[state]}, op.outputs, _name_only(op)))
        elif op.type == "coreml_update_state":
            state = _state_arg(fn, op, ("state",), current)
            ops.append(Operation("identity", {"x": op.inputs["value"]}, op.outputs, _name_only(op)))
            current[state] = op.outputs[0].name
        elif op.type == "write_state":
            state = _state_arg(fn, op, ("state", "input"), current)
            value = op.inputs.get("value", op.inputs.get("data"))
            if not isinstance(value, str):
                raise UnsupportedOperation(f"function {fn.name}: write_state of an immediate value is not supported")
            current[state] = value
        else:
            ops.append(op)
    written = {name: value for name, value in current.items() if value != name}
    outputs = list(fn.block.outputs)
    outputs += [value for value in dict.fromkeys(written.values()) if value not in outputs]
    inputs = tuple(Var(v.name, v.type.wrapped) if isinstance(v.type, StateType) else v for v in fn.inputs)
    lowered = replace(fn, inputs=inputs, block=Block(ops, tuple(outputs), fn.block.inputs))
    return lowered, StatePlan(tuple(v.name for v in fn.inputs if v.name in states), written)


def _state_arg(fn: Function, op: Operation, keys: tuple[str, ...], current: Mapping[str, str]) -> str:
    for key in keys:
        arg = op.inputs.get(key)
        if isinstance(arg, str) and arg in current:
            return arg
    raise UnsupportedOperation(f"function {fn.name}: {op.type} op {op.name!r} does not name a state input")


def _name_only(op: Operation) -> dict[str, Any]:
    return {k: v for k, v in op.attributes.items() if k == "name"}


class State:
    """The state of one stateful model between predictions (coremltools' `MLState`).

    `read_state(name)` returns a copy as numpy in the declared type; `write_state(name,
    value)` replaces it (the shape must match). Get one with `model.make_state()`.
    """

    def __init__(self, owner: Any, features: tuple[FeatureDescription, ...], tensors: dict[str, Any]) -> None:
        self._owner = owner
        self._features = {f.name: f for f in features}
        self._tensors = tensors

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(self._features)

    @property
    def description(self) -> tuple[FeatureDescription, ...]:
        return tuple(self._features.values())

    def __repr__(self) -> str:
        return f"State({', '.join(f'{f.name} {f.declared()}' for f in self._features.values())})"

    def _feature(self, name: str) -> FeatureDescription:
        if name not in self._features:
            raise ModelInputError(f"The model has no state {name!r}; its states are: {', '.join(self._features)}.",
                                  hint="Read or write one of the model's states.")
        return self._features[name]

    def read_state(self, name: str) -> np.ndarray:
        """The current value of state `name`, as a numpy array of its declared type."""
        import torch

        feature = self._feature(name)
        tensor = self._tensors[name].detach()
        if tensor.dtype == torch.bfloat16:
            tensor = tensor.float()
        return tensor.cpu().numpy().astype(feature.numpy_dtype, copy=True)

    def write_state(self, name: str, value: Any) -> None:
        """Set state `name` to `value` (numpy or torch, of the state's shape)."""
        import torch

        from .features import as_array, check_array

        feature = self._feature(name)
        array = as_array(value)
        problem = check_array(array, feature)
        if problem:
            raise ModelInputError(f"write_state: {problem}", hint=f"State {name} is {feature.declared()}.")
        old = self._tensors[name]
        self._tensors[name] = torch.as_tensor(np.array(array)).to(device=old.device, dtype=old.dtype)

    def arrays(self) -> dict[str, np.ndarray]:
        """Every state's value, as `read_state` gives it."""
        return {name: self.read_state(name) for name in self._features}

    # used by the model that made it
    def tensors_for(self, owner: Any) -> dict[str, Any]:
        if owner is not self._owner:
            raise ModelInputError("This state was made by another model; pass the state of the model that predicts.",
                                  hint="Use model.make_state() of the same model.")
        return self._tensors

    def update(self, values: Mapping[str, Any]) -> None:
        for name, tensor in values.items():
            self._tensors[name] = tensor
