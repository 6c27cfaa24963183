"""`coremltools.models.MLModel(...).predict` on any machine, through the portable runtime.

    import coreml_hub.coremltools_compat as compat
    compat.install()                      # or COREML_HUB_COREMLTOOLS=1, or -p coreml_hub.pytest_plugin
    model = coremltools.models.MLModel("Model.mlpackage", compute_units=ct.ComputeUnit.CPU_ONLY)
    model.predict({"x": np.ones((1, 3), np.float32)})

On macOS coremltools hands predictions to Core ML through a native extension
(`libcoremlpython._MLModelProxy`); elsewhere that extension is missing and `predict`
raises. `install()` puts `PortableModelProxy` where coremltools looks for the extension,
so every `MLModel` (and `CompiledMLModel`) loads its ML Program with coreml-hub's runtime
and predicts on PyTorch, with coremltools' conventions: a dict of numpy arrays in, a dict
of numpy arrays out, `compute_units` mapped to a device (CPU_ONLY runs on the CPU, the
others on the best device present).

It also opens the gates coremltools keeps for a working Core ML: its macOS-version checks
answer `RUNTIME_MACOS_VERSION` (the Core ML release whose ML Program opsets the runtime
implements), `MLModel.make_state` works, and coremltools' own test helpers
(`testing_utils._IS_MACOS`) compare predictions instead of skipping them.

The conversion from an `MLModel` to a portable model happens in one place (`load_portable`),
inputs are prepared in one place (`runtime_inputs`) and outputs returned in one place
(`coreml_outputs`), so that other value kinds (images, classifier outputs) extend those.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import os
import sys
import threading
from types import ModuleType
from typing import Any, Callable, Mapping

from .errors import CoremlHubError

# The Core ML release whose ML Program opsets (iOS15..iOS18) the portable runtime implements,
# as coremltools' `_macos_version()` reports it; it answers coremltools' "can Core ML do this" checks.
RUNTIME_MACOS_VERSION = (15, 5)
# The newest Model spec version coremltools may hand over (iOS26 = 10); the loader names any
# op it cannot run, which is a clearer error than coremltools' version refusal.
MAX_SPECIFICATION_VERSION = 10

# compute_units name -> portable runtime device
DEVICES = {"CPU_ONLY": "cpu"}

_lock = threading.Lock()
_installed = False
_predictions = 0


def prediction_count() -> int:
    """How many predictions went through the portable runtime in this process."""
    return _predictions


class NotAnMLProgram(RuntimeError):
    """The model is not an ML Program (a NeuralNetwork spec, a pipeline of them): nothing to run portably.

    A RuntimeError, as Core ML's load failures are: coremltools keeps it and raises it from `predict`.
    """

    def __init__(self, path: str, kind: str) -> None:
        super().__init__(f"{os.path.basename(path.rstrip('/'))} is a '{kind}' model; the portable runtime "
                         "runs ML Programs only (convert with convert_to='mlprogram')")
        self.kind = kind


class PredictionError(RuntimeError):
    """A prediction failed in the portable runtime (Core ML raises RuntimeError here too)."""


def device_for(compute_units: str) -> str:
    """The runtime device for a coremltools ComputeUnit name: CPU_ONLY -> cpu, anything else -> auto."""
    return DEVICES.get(compute_units, "auto")


def load_portable(path: str, compute_units: str = "ALL", function_name: str | None = None) -> Any:
    """The portable model for a `.mlpackage` / `.mlmodelc` path, as coremltools' proxy is given it."""
    from .mil.model import Model

    kwargs: dict[str, Any] = {}
    if function_name and function_name != "main":  # multifunction models name the one to run
        kwargs["function_name"] = function_name
    return Model(path, device=device_for(compute_units), **kwargs)


def runtime_inputs(model: Any, data: Mapping[str, Any]) -> dict[str, Any]:
    """coremltools input values -> what `Model.predict` takes.

    Multi-array inputs are converted to the type the model declares, as Core ML converts
    them (coremltools' helpers pass float32 for every input, integer inputs included).
    """
    import numpy as np

    numpy_types = {"fp16": np.float16, "fp32": np.float32, "fp64": np.float64, "int32": np.int32, "int8": np.int8,
                   "uint8": np.uint8, "int16": np.int16, "uint16": np.uint16, "int64": np.int64, "bool": np.bool_}
    declared = {d.name: d for d in model.input_description}
    feeds: dict[str, Any] = {}
    for name, value in data.items():
        desc = declared.get(name)
        array = np.asarray(value)
        if desc is not None and desc.dtype in numpy_types and array.dtype != numpy_types[desc.dtype]:
            array = array.astype(numpy_types[desc.dtype])
        feeds[name] = array
    return feeds


def coreml_outputs(model: Any, outputs: Mapping[str, Any]) -> dict[str, Any]:
    """`Model.predict` outputs -> the dict Core ML returns (numpy arrays by output name)."""
    return dict(outputs)


class PortableState:
    """Stands in for Core ML's state handle (`MLState.__proxy__`): the model's state tensors."""

    def __init__(self, proxy: "PortableModelProxy") -> None:
        self._model = proxy.model()
        self.tensors = self._model._fn.new_states()

    def read_state(self, name: str) -> Any:
        if name not in self.tensors:
            raise RuntimeError(f"the model has no state named {name!r}; it has: {', '.join(self.tensors)}")
        return self._model._fn.state_to_numpy(name, self.tensors[name])

    def write_state(self, name: str, value: Any) -> None:
        if name not in self.tensors:
            raise RuntimeError(f"the model has no state named {name!r}; it has: {', '.join(self.tensors)}")
        self._model._fn.write_state(self.tensors, name, value)


class PortableModelProxy:
    """What coremltools calls `_MLModelProxy`, backed by the portable runtime.

    The model is read when first needed (a prediction, a state), not when coremltools
    constructs the proxy: `coremltools.convert` builds an MLModel for every conversion.
    """

    def __init__(self, path: str, compute_units: str = "ALL", function_name: str = "",
                 optimization_hints: Any = None, asset: Any = None) -> None:
        if asset is not None:
            raise RuntimeError("MLModelAsset is not supported by the portable runtime; load the model from its path")
        _check_ml_program(path)
        self.path = path
        self.compute_units = compute_units
        self.function_name = function_name or None
        self._model: Any = None
        self._lock = threading.Lock()

    @staticmethod
    def maximum_supported_specification_version() -> int:
        return MAX_SPECIFICATION_VERSION

    def model(self) -> Any:
        with self._lock:
            if self._model is None:
                self._model = load_portable(self.path, self.compute_units, self.function_name)
            return self._model

    def predict(self, data: Mapping[str, Any], state: PortableState | None = None) -> dict[str, Any]:
        global _predictions
        model = self.model()
        with _lock:
            _predictions += 1
        states = state.tensors if state is not None else None
        try:
            outputs = model.predict(runtime_inputs(model, data), states=states)
        except (CoremlHubError, ArithmeticError, LookupError, ValueError, RuntimeError) as exc:
            # what Core ML reports for a failed prediction, with the runtime's reason
            raise PredictionError(f"Unable to compute the prediction using ML Program ({type(exc).__name__}: {exc})") \
                from exc
        return coreml_outputs(model, outputs)

    def batchPredict(self, data: list[Mapping[str, Any]]) -> list[dict[str, Any]]:  # noqa: N802 - Core ML's name
        return [self.predict(item) for item in data]

    def newState(self) -> PortableState:  # noqa: N802 - Core ML's name
        return PortableState(self)

    def get_compiled_model_path(self) -> str:
        return self.path


def _check_ml_program(path: str) -> None:
    """Raise NotAnMLProgram for a spec that is not an ML Program (a compiled `.mlmodelc` is read later)."""
    folder = os.path.join(path, "model.mil")
    if os.path.isdir(path) and os.path.isfile(folder):
        return
    from .mil.proto import load_spec

    kind = load_spec(path).WhichOneof("Type")
    if kind != "mlProgram":
        raise NotAnMLProgram(path, str(kind))


def install() -> None:
    """Route coremltools' predictions through the portable runtime (idempotent).

    Imports coremltools. Safe to call before or after coremltools' test helpers are imported.
    """
    global _installed
    with _lock:
        if _installed:
            return
        import coremltools.models._compiled_model as compiled_module
        import coremltools.models.model as model_module
        import coremltools.models.utils as utils_module

        for module in (model_module, compiled_module):
            module._MLModelProxy = PortableModelProxy
        for module in (utils_module, model_module, compiled_module):
            if hasattr(module, "_macos_version"):
                module._macos_version = _runtime_macos_version
        _patch_make_state(model_module)
        _after_import("coremltools.converters.mil.testing_utils", _open_test_helpers)
        _installed = True


def installed() -> bool:
    return _installed


def _runtime_macos_version() -> tuple[int, ...]:
    return RUNTIME_MACOS_VERSION


def _patch_make_state(model_module: ModuleType) -> None:
    mlmodel = model_module.MLModel
    original = mlmodel.make_state

    def make_state(self: Any) -> Any:
        proxy = getattr(self, "__proxy__", None)
        if isinstance(proxy, PortableModelProxy):
            return model_module.MLState(proxy.newState())
        return original(self)

    make_state.__doc__ = original.__doc__
    mlmodel.make_state = make_state


def _open_test_helpers(module: ModuleType) -> None:
    # compare_backend() and compare_shapes() predict only where this says Core ML runs
    module._IS_MACOS = True


# -- patch a module once it is imported ------------------------------------------------------


def _after_import(name: str, patch: Callable[[ModuleType], None]) -> None:
    """Call `patch(module)` now if `name` is imported, else right after its first import."""
    if name in sys.modules:
        patch(sys.modules[name])
        return
    for finder in sys.meta_path:
        if isinstance(finder, _PatchOnImport):
            finder.patches[name] = patch
            return
    sys.meta_path.insert(0, _PatchOnImport({name: patch}))


class _PatchOnImport(importlib.abc.MetaPathFinder):
    def __init__(self, patches: dict[str, Callable[[ModuleType], None]]) -> None:
        self.patches = patches

    def find_spec(self, fullname: str, path: Any, target: Any = None) -> Any:
        patch = self.patches.get(fullname)
        if patch is None:
            return None
        spec = importlib.machinery.PathFinder.find_spec(fullname, path)
        if spec is None or spec.loader is None:
            return None
        loader = spec.loader
        original = loader.exec_module

        def exec_module(module: ModuleType) -> None:
            original(module)
            self.patches.pop(fullname, None)
            patch(module)

        loader.exec_module = exec_module  # type: ignore[method-assign]
        return spec


def install_when_imported() -> None:
    """Install as soon as coremltools is imported (what COREML_HUB_COREMLTOOLS=1 asks for).

    Importing coremltools takes seconds; this waits for whoever imports it first.
    """
    if "coremltools" in sys.modules and hasattr(sys.modules["coremltools"], "models"):
        install()
        return
    _after_import("coremltools", lambda module: install())

