"""The `coreml` backend: Core ML itself, through coremltools. macOS only.

`.mlpackage` loads with `ct.models.MLModel`, `.mlmodelc` with `ct.models.CompiledMLModel`;
both predict on numpy arrays in the dtype the model declares.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from coreml_hub.hookspecs import hookimpl

COMPUTE_UNITS = ("ALL", "CPU_AND_GPU", "CPU_ONLY", "CPU_AND_NE")

# Core ML's ArrayFeatureType data types (protobuf enum values and metadata.json spellings).
_PROTO_DTYPES = {65552: "float16", 65568: "float32", 65600: "float64", 131104: "int32", 131080: "int8"}
_SCHEMA_DTYPES = {"float16": "float16", "float32": "float32", "float64": "float64", "double": "float64",
                  "int32": "int32", "int8": "int8"}


@dataclass(frozen=True)
class TensorSpec:
    name: str
    shape: tuple[int, ...]
    dtype: str


class CoreMLModel:
    """A loaded Core ML model with the Model interface the pipeline uses."""

    def __init__(self, model: Any, inputs: list[TensorSpec], outputs: list[TensorSpec], path: Path) -> None:
        self._model = model
        self.input_description = inputs
        self.output_description = outputs
        self.path = path

    def predict(self, inputs: dict[str, Any]) -> dict[str, Any]:
        """Cast each input to its declared dtype and shape, predict, return float32/int arrays."""
        import numpy as np

        feed = {}
        for spec in self.input_description:
            if spec.name not in inputs:
                raise KeyError(f"{self.path.name} needs input {spec.name!r}")
            array = np.asarray(inputs[spec.name], dtype=np.dtype(spec.dtype))
            if spec.shape and tuple(array.shape) != spec.shape:
                raise ValueError(f"{self.path.name}: input {spec.name!r} has shape {tuple(array.shape)}, "
                                 f"the model takes {spec.shape}")
            feed[spec.name] = array
        raw = self._model.predict(feed)
        result = {}
        for name, value in raw.items():
            array = np.asarray(value)
            result[name] = array.astype(np.float32) if array.dtype.kind == "f" else array
        return result


def compute_unit(name: str | None) -> Any:
    """`ALL`, `CPU_AND_GPU`, `CPU_ONLY`, `CPU_AND_NE` -> coremltools' ComputeUnit."""
    import coremltools as ct

    from coreml_hub.errors import UsageError

    key = (name or "ALL").upper()
    if key not in COMPUTE_UNITS:
        raise UsageError(f"Unknown compute unit {name!r}.", hint=f"Choose one of: {', '.join(COMPUTE_UNITS)}.")
    return ct.ComputeUnit[key]


def describe_spec(spec: Any) -> tuple[list[TensorSpec], list[TensorSpec]]:
    """Inputs and outputs of a protobuf Model spec (what `MLModel.get_spec()` returns)."""

    def one(feature: Any) -> TensorSpec:
        array = feature.type.multiArrayType
        return TensorSpec(feature.name, tuple(int(d) for d in array.shape),
                          _PROTO_DTYPES.get(int(array.dataType), "float32"))

    return [one(f) for f in spec.description.input], [one(f) for f in spec.description.output]


def describe_compiled(bundle: Path) -> tuple[list[TensorSpec], list[TensorSpec]]:
    """Inputs and outputs of a `.mlmodelc` from its metadata.json schemas."""
    meta = json.loads((bundle / "metadata.json").read_text())
    entry = meta[0] if isinstance(meta, list) else meta

    def one(item: dict[str, Any]) -> TensorSpec:
        shape = tuple(int(d) for d in json.loads(item.get("shape", "[]") or "[]"))
        dtype = _SCHEMA_DTYPES.get(str(item.get("dataType", "Float32")).lower(), "float32")
        return TensorSpec(item["name"], shape, dtype)

    return [one(i) for i in entry.get("inputSchema", [])], [one(o) for o in entry.get("outputSchema", [])]


class CoreMLBackend:
    """Native Core ML; needs macOS and coremltools' native extension."""

    name = "coreml"
    formats = ("packages", "compiled")
    compute_units = COMPUTE_UNITS  # what `--compute-unit` may name; a backend without this ignores it
    description = "native Core ML through coremltools (macOS only; CPU, GPU, Neural Engine)"

    def available(self) -> tuple[bool, str]:
        if sys.platform != "darwin":
            return False, f"Core ML runs only on macOS (this is {sys.platform})"
        try:
            import coremltools as ct  # noqa: F401
            from coremltools import libcoremlpython  # noqa: F401  (the native predictor)
        except Exception as exc:
            return False, f"coremltools cannot predict here ({type(exc).__name__}: {exc})"
        return True, "Core ML on macOS"

    def load(self, component_path: Path | str, *, device: str | None = None, compute_unit: str | None = "ALL",
             dtype: str | None = None) -> CoreMLModel:
        """Load one bundle; `device`/`dtype` are PyTorch notions and are ignored."""
        from coreml_hub.errors import BackendUnavailable

        ok, reason = self.available()
        if not ok:
            raise BackendUnavailable(f"The coreml backend is not available: {reason}.",
                                     hint="Use --backend torch (the portable runtime), which runs everywhere.")
        return open_model(Path(component_path), compute_unit)


def open_model(path: Path, unit: str | None, ct: Any = None) -> CoreMLModel:
    """Open `path` with coremltools (`ct` may be given to stand in for the module)."""
    if ct is None:
        import coremltools as ct
    units = compute_unit(unit)
    if path.suffix == ".mlmodelc":
        model = ct.models.CompiledMLModel(str(path), compute_units=units)
        inputs, outputs = describe_compiled(path)
    else:
        model = ct.models.MLModel(str(path), compute_units=units)
        inputs, outputs = describe_spec(model.get_spec())
    return CoreMLModel(model, inputs, outputs, path)


@hookimpl
def register_backends(register: Any) -> None:
    register(CoreMLBackend())
