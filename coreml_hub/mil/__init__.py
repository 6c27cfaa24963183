"""Portable ML Program tooling: program model, model.mil text, weight blobs, and a PyTorch runtime."""

from __future__ import annotations

from typing import Any


def load_model(path: Any, device: str = "cpu", dtype: Any = None, **kwargs: Any) -> Any:
    """Load a `.mlpackage` or `.mlmodelc` for prediction on PyTorch (see `mil.model`)."""
    from .model import load_model as _load

    return _load(path, device=device, dtype=dtype, **kwargs)
