"""Stateful models (iOS 18 ML Programs): the `State` object, and how the state ops run.

A stateful function takes `state<tensor<...>>` inputs. Its ops read them (`read_state`) and
overwrite them (`coreml_update_state`, which writes and returns the value, and `write_state`);
what they write persists into the next prediction made with the same state object, as with
coremltools' `model.make_state()`, `predict(inputs, state=state)` and `MLState.read_state` /
`write_state`. A new state holds zeros, as Core ML's does.

The state ops run in place (`mil/ops/state.py`, and `executor.FunctionRunner`): each state
input is the `State`'s own tensor, `read_state` reads it (a copy only where a later write
would change a value still in use), and `write_state` / `coreml_update_state` copy the new
value into it. Outputs that would alias a state tensor are copies.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ..errors import ModelInputError
from .spec import FeatureDescription


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
