"""`MLModel.predict` on Linux: coremltools' prediction API routed through the portable runtime.

    import coremltools as ct
    from coreml_hub import coremltools_compat

    coremltools_compat.install()
    mlmodel = ct.convert(traced, inputs=[ct.ImageType(name="image", shape=(1, 3, 224, 224))],
                         classifier_config=ct.ClassifierConfig(labels))
    mlmodel.predict({"image": PIL.Image.open("cat.png")})    # {"classLabel": "cat", ...}
    state = stateful.make_state(); stateful.predict({"x": x}, state=state)
    ct.models.CompiledMLModel("Model.mlmodelc").predict({"x": x})

After `install()`, `MLModel.predict`, `MLModel.make_state`, and `CompiledMLModel(...)`
with its `predict` and `make_state` work where Core ML does not, with coremltools'
conventions: a dict of numpy arrays, torch tensors, lists or PIL images in; a dict of numpy
arrays, PIL images (image outputs), a label and a probability dictionary (classifiers) out;
a list of dicts for a batch; `compute_units` mapped to a device (`device_for`). Where Core
ML itself can predict (macOS), it keeps doing so unless `install(force=True)`.

It also opens the gates coremltools keeps for a working Core ML: its macOS-version checks
answer `RUNTIME_MACOS_VERSION` (the Core ML release whose ML Program opsets the runtime
implements), and coremltools' own testing utilities (`testing_utils._IS_MACOS`) compare
predictions instead of skipping them, so coremltools' op tests run against the runtime
(`bench/coremltools_optests.py`). A prediction that fails in the runtime raises
`PredictionError`, a RuntimeError as Core ML's is; wrong inputs raise `ModelInputError`.

Also enabled by `COREML_HUB_COREMLTOOLS=1` in the environment (when coreml_hub is imported,
and in every pytest run, see `coreml_hub.pytest_plugin`) and by `pytest -p coreml_hub.pytest_plugin`.

The module has four parts: `to_model` (an MLModel or CompiledMLModel as the runtime's
`Model`), `convert_inputs`, `convert_outputs`, and `install`/`uninstall`.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import os
import sys
import threading
from pathlib import Path
from types import ModuleType
from typing import Any, Callable, Mapping

from .errors import CoremlHubError, ModelInputError, UnsupportedModel

ENV_VAR = "COREML_HUB_COREMLTOOLS"
_CACHE_ATTR = "_coreml_hub_model"
# The Core ML release whose ML Program opsets (iOS15..iOS18) the portable runtime implements,
# as coremltools' `_macos_version()` reports it; it answers coremltools' "can Core ML do this" checks.
RUNTIME_MACOS_VERSION = (15, 5)
TESTING_UTILS = "coremltools.converters.mil.testing_utils"

# (owner class or module, attribute) -> the original, while installed
_originals: dict[tuple[Any, str], Any] = {}
_settings: dict[str, Any] = {"device": None, "force": False}
_lock = threading.Lock()
_predictions = 0


class PredictionError(RuntimeError):
    """A prediction failed in the portable runtime (Core ML raises RuntimeError here too)."""


def prediction_count() -> int:
    """How many predictions went through the portable runtime in this process."""
    return _predictions


def enabled_by_environment() -> bool:
    return os.environ.get(ENV_VAR, "").strip().lower() in ("1", "true", "yes", "on")


# -- 1. MLModel / CompiledMLModel -> Model ------------------------------------------------


def device_for(compute_units: Any) -> str:
    """Where a coremltools compute-unit choice runs here.

    CPU_ONLY -> the CPU. ALL and CPU_AND_GPU -> a GPU when torch sees one (CUDA, MPS), else
    the CPU. CPU_AND_NE -> the CPU (there is no Neural Engine to use). `install(device=...)`
    overrides all of them.
    """
    if _settings["device"]:
        return str(_settings["device"])
    name = str(getattr(compute_units, "name", compute_units or "ALL")).upper()
    return "auto" if name in ("ALL", "CPU_AND_GPU") else "cpu"


def to_model(obj: Any) -> Any:
    """The portable runtime's `Model` for a coremltools MLModel or CompiledMLModel (made once, kept on it)."""
    cached = getattr(obj, _CACHE_ATTR, None)
    if cached is not None:
        return cached
    from .mil.model import load_model
    from .mil.spec import inner_model_types, unsupported_model

    spec = getattr(obj, "_spec", None)
    if spec is not None:
        model_type = spec.WhichOneof("Type") or "unknown"
        if model_type != "mlProgram":
            raise unsupported_model(Path(str(getattr(obj, "package_path", None) or "model")), model_type,
                                    inner_model_types(spec))
        path = getattr(obj, "package_path", None)
    else:
        path = getattr(obj, "path_or_asset", None)
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError("coreml-hub predicts with models saved as a .mlpackage or .mlmodelc folder "
                        "(an in-memory model asset is not supported)")
    function_name = getattr(obj, "function_name", None) or None
    model = load_model(path, device=device_for(getattr(obj, "compute_unit", None)), function_name=function_name)
    try:
        setattr(obj, _CACHE_ATTR, model)
    except AttributeError:  # pragma: no cover - coremltools' classes take attributes
        pass
    return model


# -- 2. inputs ----------------------------------------------------------------------------


def convert_inputs(model: Any, data: Mapping[str, Any]) -> dict[str, Any]:
    """coremltools' input conventions -> what `Model.predict` takes.

    numpy arrays, torch tensors, lists and Python numbers become numpy arrays of the type
    the model declares, as Core ML converts them (coremltools passes float32 for fp16 inputs,
    and its testing utilities float32 for integer inputs); PIL images stay images (the model
    converts them by the declared color layout and checks the size).
    """
    if not isinstance(data, Mapping):
        raise TypeError(f'"data" parameter must be either a dict or list of dict, but got {type(data)}.')
    from .mil.features import as_array, is_pil_image

    declared = {d.name: d for d in model.input_description}
    feeds: dict[str, Any] = {}
    for name, value in data.items():
        if is_pil_image(value):
            feeds[str(name)] = value
            continue
        array = as_array(value)
        desc = declared.get(str(name))
        if desc is not None and desc.kind != "image" and array.dtype.kind in "biuf" \
                and array.dtype != desc.numpy_dtype:
            array = array.astype(desc.numpy_dtype)
        feeds[str(name)] = array
    return feeds


# -- 3. outputs ---------------------------------------------------------------------------


def convert_outputs(model: Any, outputs: Mapping[str, Any]) -> dict[str, Any]:
    """`Model.predict`'s outputs in coremltools' form: numpy arrays, PIL images, a label (str or
    int) and a {label: probability} dictionary of Python values."""
    import numpy as np

    result: dict[str, Any] = {}
    for name, value in outputs.items():
        if isinstance(value, np.generic):
            value = value.item()
        elif isinstance(value, dict):
            value = {(k.item() if isinstance(k, np.generic) else k): float(v) for k, v in value.items()}
        result[name] = value
    return result


# -- 4. install ---------------------------------------------------------------------------


def _native(obj: Any) -> bool:
    """Whether Core ML itself can predict with `obj` (and we were not told to take over)."""
    if _settings["force"]:
        return False
    return getattr(obj, "__proxy__", None) is not None or getattr(obj, "_proxy", None) is not None


def _state_of(state: Any) -> Any:
    if state is None:
        return None
    return getattr(state, "__proxy__", state)


def _original(obj: Any, name: str) -> Any:
    for owner in type(obj).__mro__:
        if (owner, name) in _originals:
            return _originals[(owner, name)]
    raise AttributeError(name)  # pragma: no cover - only patched classes reach here


def _predict(self: Any, data: Any, state: Any = None) -> Any:
    if _native(self):
        return _original(self, "predict")(self, data, state)
    model = to_model(self)
    if isinstance(data, list):
        if not all(isinstance(item, dict) for item in data):
            raise TypeError('"data" list must contain only dictionaries')
        if state is not None:
            raise ValueError("State can only be used for unbatched predictions")
        return [_predict_one(self, model, item, None) for item in data]
    return _predict_one(self, model, data, _state_of(state))


def _predict_one(owner: Any, model: Any, data: Any, state: Any) -> dict[str, Any]:
    global _predictions
    verify = getattr(owner, "_verify_input_dict", None)  # coremltools' own checks (names, PIL modes)
    if verify is not None and isinstance(data, Mapping):
        verify(data)
    feeds = convert_inputs(model, data)
    with _lock:
        _predictions += 1
    try:
        outputs = model.predict(feeds, state=state)
    except (ModelInputError, UnsupportedModel):
        raise
    except (CoremlHubError, ArithmeticError, LookupError, ValueError, RuntimeError) as exc:
        # what Core ML reports for a failed prediction, with the runtime's reason
        raise PredictionError(f"Unable to compute the prediction using ML Program ({type(exc).__name__}: {exc})") \
            from exc
    return convert_outputs(model, outputs)


def _make_state(self: Any) -> Any:
    if _native(self):
        return _original(self, "make_state")(self)
    from coremltools.models.model import MLState

    return MLState(to_model(self).make_state())


def _compiled_init(self: Any, path: str, compute_units: Any = None, function_name: str | None = None,
                   optimization_hints: dict | None = None, asset: Any = None) -> None:
    import coremltools as ct

    from coremltools.models import _compiled_model

    if getattr(_compiled_model, "_MLModelProxy", None) is not None and not _settings["force"]:
        _originals[(ct.models.CompiledMLModel, "__init__")](
            self, path, compute_units if compute_units is not None else ct.ComputeUnit.ALL, function_name,
            optimization_hints, asset)
        return
    if asset is not None:
        raise TypeError("coreml-hub predicts with compiled models on disk; pass the .mlmodelc path, not an asset")
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError('The "path" parameter must be of type "str".')
    self.compute_unit = compute_units if compute_units is not None else ct.ComputeUnit.ALL
    self.function_name = function_name or ""
    self.path_or_asset = os.path.expanduser(str(path))
    self.optimization_hints = dict(optimization_hints) if optimization_hints else None
    self._proxy = None
    to_model(self)  # load now, as Core ML does: a broken bundle fails here


def install(device: str | None = None, force: bool = False) -> None:
    """Route coremltools' MLModel/CompiledMLModel predictions through the portable runtime.

    `device`: "cpu", "cuda", "mps" or "auto" for every model (default: from each model's
    `compute_units`, see `device_for`). `force`: also where Core ML itself could predict.
    Calling it again changes the settings; `uninstall()` restores coremltools.
    """
    import coremltools as ct
    import coremltools.models._compiled_model as compiled_module
    import coremltools.models.model as model_module
    import coremltools.models.utils as utils_module

    _settings["device"] = device
    _settings["force"] = force
    if _originals:
        return
    patches: list[tuple[Any, str, Any]] = [
        (ct.models.MLModel, "predict", _predict),
        (ct.models.MLModel, "make_state", _make_state),
        (ct.models.CompiledMLModel, "__init__", _compiled_init),
        (ct.models.CompiledMLModel, "predict", _predict),
        (ct.models.CompiledMLModel, "make_state", _make_state),
    ]
    if getattr(model_module, "_MLModelProxy", None) is None or force:  # no Core ML here: answer its checks
        patches += [(module, "_macos_version", _runtime_macos_version)
                    for module in (utils_module, model_module, compiled_module) if hasattr(module, "_macos_version")]
        _after_import(TESTING_UTILS, _open_testing_utils)
    for owner, name, replacement in patches:
        _originals[(owner, name)] = owner.__dict__[name]
        setattr(owner, name, replacement)


def uninstall() -> None:
    """Put coremltools' own methods and checks back."""
    for (owner, name), original in _originals.items():
        setattr(owner, name, original)
    _originals.clear()
    _settings.update(device=None, force=False)
    for finder in sys.meta_path:
        if isinstance(finder, _PatchOnImport):
            finder.patches.pop(TESTING_UTILS, None)


def installed() -> bool:
    return bool(_originals)


def _runtime_macos_version() -> tuple[int, ...]:
    return RUNTIME_MACOS_VERSION


def _open_testing_utils(module: ModuleType) -> None:
    # compare_backend() and compare_shapes() predict only where this says Core ML runs
    if (module, "_IS_MACOS") not in _originals:
        _originals[(module, "_IS_MACOS")] = module._IS_MACOS
    module._IS_MACOS = True


# -- patch a module once it is imported ------------------------------------------------------


def _after_import(name: str, patch: Callable[[ModuleType], None]) -> None:
    """Call `patch(module)` now if `name` is imported, else right after its first import."""
    if name in sys.modules and (name != "coremltools" or hasattr(sys.modules[name], "models")):
        patch(sys.modules[name])
        return
    for finder in sys.meta_path:
        if isinstance(finder, _PatchOnImport):
            finder.patches[name] = patch
            return
    sys.meta_path.insert(0, _PatchOnImport({name: patch}))


class _PatchOnImport(importlib.abc.MetaPathFinder):
    """Runs a patch right after a module's first import (one finder for every pending patch)."""

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
            if self.patches.get(fullname) is patch:
                del self.patches[fullname]
                patch(module)

        loader.exec_module = exec_module  # type: ignore[method-assign]
        return spec


def armed() -> bool:
    """Whether `install()` waits for coremltools to be imported."""
    return any(isinstance(f, _PatchOnImport) and "coremltools" in f.patches for f in sys.meta_path)


def install_when_imported() -> None:
    """`install()` now if coremltools is imported, else as soon as it is (imports nothing itself)."""
    _after_import("coremltools", lambda module: install())
