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

Also enabled by `COREML_HUB_COREMLTOOLS=1` in the environment (when coreml_hub is imported,
and in every pytest run, see `coreml_hub.pytest_plugin`) and by `pytest -p coreml_hub.pytest_plugin`.

The module has four parts: `to_model` (an MLModel or CompiledMLModel as the runtime's
`Model`), `convert_inputs`, `convert_outputs`, and `install`/`uninstall`.
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import os
import sys
from pathlib import Path
from typing import Any, Mapping

ENV_VAR = "COREML_HUB_COREMLTOOLS"
_CACHE_ATTR = "_coreml_hub_model"

# (owner class, attribute) -> the original, while installed
_originals: dict[tuple[Any, str], Any] = {}
_settings: dict[str, Any] = {"device": None, "force": False}


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

    numpy arrays, torch tensors, lists and Python numbers become numpy arrays; PIL images
    stay images (the model converts them by the declared color layout and checks the size).
    """
    if not isinstance(data, Mapping):
        raise TypeError(f'"data" parameter must be either a dict or list of dict, but got {type(data)}.')
    from .mil.features import as_array, is_pil_image

    return {str(name): value if is_pil_image(value) else as_array(value) for name, value in data.items()}


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
        return [convert_outputs(model, model.predict(convert_inputs(model, item))) for item in data]
    return convert_outputs(model, model.predict(convert_inputs(model, data), state=_state_of(state)))


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

    _settings["device"] = device
    _settings["force"] = force
    if _originals:
        return
    patches = [
        (ct.models.MLModel, "predict", _predict),
        (ct.models.MLModel, "make_state", _make_state),
        (ct.models.CompiledMLModel, "__init__", _compiled_init),
        (ct.models.CompiledMLModel, "predict", _predict),
        (ct.models.CompiledMLModel, "make_state", _make_state),
    ]
    for owner, name, replacement in patches:
        _originals[(owner, name)] = owner.__dict__[name]
        setattr(owner, name, replacement)


def uninstall() -> None:
    """Put coremltools' own methods back."""
    for (owner, name), original in _originals.items():
        setattr(owner, name, original)
    _originals.clear()
    _settings.update(device=None, force=False)


def installed() -> bool:
    return bool(_originals)


class _InstallAfterImport(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Installs right after `coremltools` itself is imported (armed by the environment variable)."""

    def __init__(self) -> None:
        self._loader: Any = None

    def find_spec(self, fullname: str, path: Any, target: Any = None) -> Any:
        if fullname != "coremltools":
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(fullname)
        if spec is None or spec.loader is None:
            return spec
        self._loader = spec.loader
        spec.loader = self
        return spec

    def create_module(self, spec: Any) -> Any:
        return self._loader.create_module(spec)

    def exec_module(self, module: Any) -> None:
        self._loader.exec_module(module)
        install()


def armed() -> bool:
    """Whether `install()` waits for coremltools to be imported."""
    return any(isinstance(f, _InstallAfterImport) for f in sys.meta_path)


def install_when_imported() -> None:
    """`install()` now if coremltools is imported, else as soon as it is (imports nothing itself)."""
    if "coremltools" in sys.modules:
        install()
    elif not armed():
        sys.meta_path.insert(0, _InstallAfterImport())
