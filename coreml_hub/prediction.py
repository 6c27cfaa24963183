"""One prediction with any Core ML model: what `coreml-hub predict` runs.

    result = predict("Classifier.mlpackage", {"image": "cat.png"})
    result = predict("org/name:compiled", {"x": "x.npy", "t": "[1, 2, 3]"}, component="unet",
                     state_in="state.npz", state_out="state.npz", output_dir="out/")

TARGET is a bundle (`.mlpackage`, `.mlmodelc`), a folder holding bundles, or a pulled
`MODEL[:VARIANT]`; `component` names the bundle where there are several. An input value is
an array (numpy, torch, list), a PIL image, or text: a `.npy` or `.npz` file, an image file,
or a JSON number or list. The model checks every input against what it declares and names
the input and the declaration when one does not fit.
"""

from __future__ import annotations

import json
import math
import os
import re
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from .errors import InvalidBundle, InvalidImage, ModelInputError, UsageError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp")
TOP_K = 5


@dataclass(frozen=True)
class OutputSummary:
    """One output as `predict` reports it."""

    name: str
    kind: str  # array, image, label, probabilities
    dtype: str  # numpy dtype name; an image's PIL mode; "str"/"int" for a label; "dict" for probabilities
    shape: tuple[int, ...] | None
    summary: str
    top: tuple[tuple[Any, float], ...] = ()  # the most probable classes, for probabilities
    path: Path | None = None  # where --output-dir put it

    def to_dict(self) -> dict[str, Any]:
        data: dict[str, Any] = {"name": self.name, "kind": self.kind, "dtype": self.dtype,
                                "shape": list(self.shape) if self.shape is not None else None,
                                "summary": self.summary, "path": str(self.path) if self.path else None}
        if self.top:
            data["top"] = [{"label": label, "probability": p} for label, p in self.top]
        return data


@dataclass(frozen=True)
class Prediction:
    """What `predict` did: the bundle, function and device, each output, the timings."""

    bundle: Path
    function: str
    device: str
    outputs: tuple[OutputSummary, ...]
    load_seconds: float
    predict_seconds: float
    state_out: Path | None = None
    values: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    def to_dict(self) -> dict[str, Any]:
        return {"bundle": str(self.bundle), "function": self.function, "device": self.device,
                "outputs": [o.to_dict() for o in self.outputs], "state_out": str(self.state_out) if self.state_out else None,
                "load_seconds": round(self.load_seconds, 4), "predict_seconds": round(self.predict_seconds, 4)}


def predict(
    target: str | os.PathLike[str],
    inputs: Mapping[str, Any],
    *,
    component: str | None = None,
    function: str | None = None,
    device: str = "auto",
    state_in: str | os.PathLike[str] | None = None,
    state_out: str | os.PathLike[str] | None = None,
    output_dir: str | os.PathLike[str] | None = None,
    loaded: Any = None,
) -> Prediction:
    """Load the bundle TARGET names, run it once on `inputs`, summarize (and save) the outputs.

    `loaded` is a model already in memory (from `load_model` of `find_bundle(target, component)`):
    `component`, `function` and `device` are then not used (how `batch` keeps a model warm).
    """
    from .mil.model import load_model

    started = time.perf_counter()
    if loaded is None:
        bundle = find_bundle(target, component)
        model = load_model(bundle, device=device, function_name=function)
    else:
        model, bundle = loaded, Path(loaded.path)
    ready = time.perf_counter()
    features = {f.name: f for f in model.input_description}
    values = {name: read_value(value, name, features.get(name)) for name, value in inputs.items()}
    state = None
    if model.is_stateful:
        state = model.make_state()
        if state_in is not None:
            load_state(state, Path(state_in))
    elif state_in is not None or state_out is not None:
        raise UsageError(f"{bundle.name} declares no state; --state-in/--state-out are for stateful models.")
    began = time.perf_counter()
    outputs = model.predict(values, state=state)
    finished = time.perf_counter()
    saved: dict[str, Path] = {}
    if output_dir is not None:
        saved = save_outputs(outputs, Path(output_dir))
    state_path = None
    if state is not None and state_out is not None:
        state_path = save_state(state, Path(state_out))
    summaries = tuple(summarize(name, value, saved.get(name)) for name, value in outputs.items())
    return Prediction(bundle, model.function_name, model.device.type, summaries, ready - started,
                      finished - began, state_path, dict(outputs))


# -- which bundle ---------------------------------------------------------------------------


def find_bundle(target: str | os.PathLike[str], component: str | None = None) -> Path:
    """The bundle TARGET names: itself, or the one (or `component`) in a folder or pulled variant."""
    from .bundle import component_name, find_bundles, is_bundle, resolve_target

    path = resolve_target(target)
    if not path.exists():
        raise InvalidBundle(f"{path} does not exist.", hint="Give a .mlpackage/.mlmodelc bundle, a folder or MODEL[:VARIANT].")
    if path.is_dir() and is_bundle(path):
        if component and component_name(path.name)[0] != component and path.stem.lower() != component.lower():
            raise UsageError(f"{path.name} is a single bundle; --component is for folders that hold several.")
        return path
    if path.is_file() and path.suffix == ".mlmodel":
        return path  # a bare spec: what it is decides whether it runs (NeuralNetwork models do not)
    if not path.is_dir():
        raise InvalidBundle(f"{path} is a file; a Core ML bundle is a folder (.mlpackage or .mlmodelc).")
    bundles = find_bundles(path)
    if not bundles:
        raise InvalidBundle(f"No Core ML bundles (.mlpackage, .mlmodelc) in {path}.")
    names = {b: component_name(b.name)[0] for b in bundles}
    if component:
        wanted = component.lower()
        matches = [b for b in bundles if names[b].lower() == wanted or b.stem.lower() == wanted
                   or b.name.lower() == wanted]
        if not matches:
            raise UsageError(f"{path} has no component {component!r}; it has: {', '.join(sorted(set(names.values())))}.",
                             hint="Pass one of those to --component.")
        # a folder with both forms of a component: the compiled bundle, as `run` reads it
        return sorted(matches, key=lambda b: b.suffix != ".mlmodelc")[0]
    if len(bundles) == 1:
        return bundles[0]
    listing = ", ".join(sorted(set(names.values())))
    raise UsageError(f"{path} holds {len(bundles)} bundles ({listing}); name one with --component.",
                     hint=f"For example: coreml-hub predict {target} --component {sorted(set(names.values()))[0]} ...")


# -- input values ---------------------------------------------------------------------------


def read_value(value: Any, name: str, feature: Any = None) -> Any:
    """An input value: arrays and images as given; text as a .npy/.npz/image file or JSON."""
    if not isinstance(value, (str, os.PathLike)):
        return value
    text = str(value)
    path = Path(text).expanduser()
    suffix = path.suffix.lower()
    if suffix == ".npy" or suffix == ".npz" or suffix in IMAGE_SUFFIXES or path.is_file():
        if not path.is_file():
            raise ModelInputError(f"Input '{name}': no such file {path}.", hint="Check the path after `name=`.")
        if suffix == ".npy":
            return _load_npy(path, name)
        if suffix == ".npz":
            return _load_npz(path, name)
        return _load_image(path, name)
    try:
        parsed = json.loads(text)
    except ValueError:
        raise ModelInputError(
            f"Input '{name}': {text!r} is neither a file nor a JSON number or list.",
            hint="Pass name=FILE.npy, name=FILE.npz, name=IMAGE.png, or a JSON value like name=3 or name=[1,2,3].",
        ) from None
    if isinstance(parsed, (dict, str)) or parsed is None:
        raise ModelInputError(f"Input '{name}': JSON {type(parsed).__name__} values are not arrays.",
                              hint="Give a JSON number or a (nested) list of numbers.")
    try:
        array = np.asarray(parsed)
    except ValueError as exc:
        raise ModelInputError(f"Input '{name}': the JSON list is ragged ({exc}).") from None
    if array.dtype.kind not in "biuf":
        raise ModelInputError(f"Input '{name}': the JSON value holds non-numbers.")
    if array.dtype.kind == "f":
        array = array.astype(np.float32)
    elif array.dtype.kind == "i":
        array = array.astype(np.int32) if feature is not None and feature.dtype == "int32" else array
    # a flat JSON list (or one number) fills a fixed shape with as many elements
    shape = getattr(feature, "shape", None)
    if shape is not None and array.shape != tuple(shape) and array.size == math.prod(shape) and array.ndim <= 1:
        array = array.reshape(shape)
    return array


def _load_npy(path: Path, name: str) -> np.ndarray:
    try:
        return np.load(path, allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise ModelInputError(f"Input '{name}': cannot read {path} as a .npy array ({exc}).") from None


def _load_npz(path: Path, name: str) -> np.ndarray:
    try:
        with np.load(path, allow_pickle=False) as archive:
            if name in archive.files:
                return archive[name]
            if len(archive.files) == 1:
                return archive[archive.files[0]]
            raise ModelInputError(f"Input '{name}': {path.name} holds {', '.join(archive.files)} and no '{name}'.",
                                  hint=f"Name the array '{name}' in the .npz, or save it alone.")
    except (OSError, ValueError) as exc:
        raise ModelInputError(f"Input '{name}': cannot read {path} as a .npz archive ({exc}).") from None


def _load_image(path: Path, name: str) -> Any:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as img:
            img.load()
            return img.copy()
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as exc:
        raise InvalidImage(f"Input '{name}': cannot read {path} as an image ({type(exc).__name__}: {exc}).",
                           hint="Pass a PNG or JPEG for image inputs, .npy/.npz for arrays.") from None


# -- state files ----------------------------------------------------------------------------


def load_state(state: Any, path: Path) -> None:
    """Set a model's state from a .npz holding one array per state name."""
    if not path.is_file():
        raise ModelInputError(f"State file {path} does not exist.", hint="Write one first with --state-out.")
    try:
        with np.load(path, allow_pickle=False) as archive:
            arrays = {k: archive[k] for k in archive.files}
    except (OSError, ValueError) as exc:
        raise ModelInputError(f"Cannot read {path} as a .npz of states ({exc}).") from None
    unknown = sorted(set(arrays) - set(state.names))
    if unknown:
        raise ModelInputError(f"{path.name} holds {', '.join(unknown)}, which the model has no state for; "
                              f"its states are: {', '.join(state.names)}.")
    for key, array in arrays.items():
        state.write_state(key, array)


def save_state(state: Any, path: Path) -> Path:
    """Write every state to a .npz (atomically: a failure leaves any old file as it was)."""
    if path.suffix != ".npz":
        path = path.with_name(path.name + ".npz")
    _write_atomic(path, lambda fh: np.savez(fh, **state.arrays()))
    return path


# -- outputs --------------------------------------------------------------------------------


def _safe_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]", "_", name) or "output"


def save_outputs(outputs: Mapping[str, Any], folder: Path) -> dict[str, Path]:
    """Arrays as `<name>.npy`, 8-bit images as `<name>.png` (float images as .npy), labels and
    probabilities as `<name>.json`; each written under a temporary name, then renamed."""
    folder.mkdir(parents=True, exist_ok=True)
    saved: dict[str, Path] = {}
    for name, value in outputs.items():
        stem = _safe_name(name)
        if _is_image(value) and value.mode != "F":
            path = folder / f"{stem}.png"
            _write_atomic(path, lambda fh, image=value: image.save(fh, format="PNG"))
        elif _is_image(value) or isinstance(value, np.ndarray):
            path = folder / f"{stem}.npy"
            array = np.asarray(value, dtype=np.float32) if _is_image(value) else value
            _write_atomic(path, lambda fh, a=array: np.save(fh, a, allow_pickle=False))
        else:
            path = folder / f"{stem}.json"
            text = json.dumps(_jsonable(value), indent=2) + "\n"
            _write_atomic(path, lambda fh, t=text: fh.write(t.encode()))
        saved[name] = path
    return saved


def _write_atomic(path: Path, write: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            write(fh)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): float(v) for k, v in value.items()}
    if isinstance(value, np.generic):
        return value.item()
    return value


def _is_image(value: Any) -> bool:
    from .mil.features import is_pil_image

    return is_pil_image(value)


def summarize(name: str, value: Any, path: Path | None = None) -> OutputSummary:
    """One line about an output: array statistics, an image's mode and size, a label, the top classes."""
    if _is_image(value):
        width, height = value.size
        return OutputSummary(name, "image", value.mode, (height, width), f"{value.mode} image {width}x{height}",
                             path=path)
    if isinstance(value, dict):
        top = tuple(sorted(((k, float(v)) for k, v in value.items()), key=lambda kv: -kv[1])[:TOP_K])
        text = ", ".join(f"{label} {p:.3f}" for label, p in top)
        return OutputSummary(name, "probabilities", "dict", (len(value),), f"top {len(top)}: {text}", top, path)
    if isinstance(value, (str, int, np.integer)) and not isinstance(value, bool):
        return OutputSummary(name, "label", type(value).__name__ if isinstance(value, str) else "int", None,
                             str(value), path=path)
    array = np.asarray(value)
    return OutputSummary(name, "array", str(array.dtype), tuple(array.shape), _array_summary(array), path=path)


def _array_summary(array: np.ndarray) -> str:
    if array.size == 0:
        return "empty"
    if array.size <= 6:
        return "values " + np.array2string(array.reshape(-1), precision=4, separator=", ")
    if array.dtype.kind == "b":
        return f"{int(array.sum())} of {array.size} true"
    if array.dtype.kind not in "biuf":
        return f"{array.size} values"
    values = array.astype(np.float64)
    finite = values[np.isfinite(values)]
    text = ""
    if finite.size:
        text = f"min {finite.min():.4g}, max {finite.max():.4g}, mean {finite.mean():.4g}"
    if finite.size != values.size:
        text += f"{', ' if text else ''}{values.size - finite.size} not finite"
    return text
