"""A variant folder's components, loaded through a backend, with one calling convention.

Whatever backend loaded it, a component is called with torch tensors (on any device) and
returns float32 tensors on its own `device`: the model's device for a backend that runs
on torch tensors (so a GPU pipeline does not copy every output to the CPU), the CPU
otherwise. Inputs are cast to the dtype the model declares. Shapes come from the models'
own input descriptions.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

from ..errors import BackendUnavailable, CoremlHubError, InvalidBundle
from ..layouts import COMPILED_NAMES, component_of_stem

BACKEND_CHOICES = ("auto", "torch", "coreml")
TOKEN_INPUT_COMPONENTS = ("text_encoder", "text_encoder_2", "text_encoder_t5")

_DTYPE_ALIASES = {
    "fp16": "float16", "float16": "float16", "half": "float16", "torch.float16": "float16",
    "fp32": "float32", "float32": "float32", "float": "float32", "torch.float32": "float32",
    "fp64": "float64", "float64": "float64", "double": "float64",
    "int32": "int32", "torch.int32": "int32", "int64": "int64", "torch.int64": "int64",
    "int8": "int8", "uint8": "uint8", "bool": "bool",
}


@dataclass(frozen=True)
class TensorSpec:
    """One input or output: name, static shape, dtype name (`float16`, `float32`, `int32`...)."""

    name: str
    shape: tuple[int, ...]
    dtype: str


def _dtype_name(dtype: Any) -> str:
    if isinstance(dtype, type):  # numpy scalar types such as np.float16
        import numpy as np

        dtype = np.dtype(dtype).name
    text = str(getattr(dtype, "name", None) or dtype).lower()
    text = text.removeprefix("np.").removeprefix("numpy.")
    return _DTYPE_ALIASES.get(text, text if text in _DTYPE_ALIASES.values() else "float32")


def _spec(item: Any, name: str | None = None) -> TensorSpec:
    if isinstance(item, TensorSpec):
        return item
    if isinstance(item, dict):
        name = item.get("name", name)
        shape, dtype = item.get("shape"), item.get("dtype", item.get("dataType"))
    elif isinstance(item, (tuple, list)) and not hasattr(item, "name"):
        if len(item) == 3:
            name, shape, dtype = item
        else:
            shape, dtype = item
    else:
        name = getattr(item, "name", name)
        shape, dtype = getattr(item, "shape", ()), getattr(item, "dtype", "float32")
    if isinstance(shape, str):
        shape = [int(d) for d in shape.strip("[]() ").split(",") if d.strip()]
    dims = tuple(int(d) if isinstance(d, (int,)) or str(d).lstrip("-").isdigit() else -1 for d in (shape or ()))
    return TensorSpec(str(name), dims, _dtype_name(dtype))


def describe(description: Any) -> dict[str, TensorSpec]:
    """Normalize a model's input/output description (list or mapping) to name -> TensorSpec."""
    if description is None:
        return {}
    if isinstance(description, dict):
        return {str(k): _spec(v, str(k)) for k, v in description.items()}
    specs = [_spec(item) for item in description]
    return {s.name: s for s in specs}


class Component:
    """One loaded model: `component(inputs)` with torch tensors -> dict of float32 tensors on `device`.

    With a `loader` and a `residency` the component is on demand (`run --reduce-memory`): the
    model is loaded when the component is called and released when another on-demand
    component of the same residency is called, so only one is in memory at a time. `model`
    is then the one loaded already (to read its descriptions), or None.
    """

    def __init__(self, name: str, path: Path, model: Any, *, loader: Callable[[], Any] | None = None,
                 residency: "Residency | None" = None) -> None:
        import torch

        self.name = name
        self.path = path
        self._model = model
        self._loader = loader
        self._residency = residency
        self.loads = 1 if model is not None else 0  # how often the model was loaded (on demand: may be more)
        self.inputs = describe(getattr(model, "input_description", None))
        self.outputs = describe(getattr(model, "output_description", None))
        self._torch_path = hasattr(model, "predict_torch")
        self.device = torch.device(getattr(model, "device", "cpu") if self._torch_path else "cpu")

    @property
    def model(self) -> Any:
        if self._model is None:
            if self._loader is None:
                raise InvalidBundle(f"{self.path.name} was released and cannot be loaded again.")
            if self._residency is not None:
                self._residency.admit(self)
            self._model = self._loader()
            self.loads += 1
        elif self._residency is not None:
            self._residency.admit(self)
        return self._model

    @property
    def resident(self) -> bool:
        return self._model is not None

    def release(self) -> None:
        """Drop the model (on-demand components only); the next call loads it again."""
        if self._loader is None or self._model is None:
            return
        self._model = None
        free_memory(self.device.type)

    def input_shape(self, name: str) -> tuple[int, ...]:
        if name not in self.inputs:
            raise InvalidBundle(f"{self.path.name} has no input {name!r} (it has: {', '.join(self.inputs)}).")
        return self.inputs[name].shape

    def __call__(self, inputs: dict[str, Any]) -> dict[str, Any]:
        import numpy as np
        import torch

        feed = {}
        for name, spec in self.inputs.items():
            if name not in inputs:
                raise InvalidBundle(f"{self.path.name} needs input {name!r}, which the pipeline does not make.")
            value = inputs[name]
            if spec.shape and all(d > 0 for d in spec.shape) and tuple(value.shape) != spec.shape:
                raise InvalidBundle(f"{self.path.name}: input {name!r} has shape {tuple(value.shape)}, "
                                    f"the model takes {spec.shape}.")
            feed[name] = value
        model = self.model
        if self._torch_path:
            cast = {k: v.to(getattr(torch, self.inputs[k].dtype, torch.float32)) for k, v in feed.items()}
            raw = model.predict_torch(cast)
            return {k: v.detach().float() if v.is_floating_point() else v.detach() for k, v in raw.items()}
        arrays = {k: v.detach().cpu().numpy().astype(np.dtype(self.inputs[k].dtype)) for k, v in feed.items()}
        raw = model.predict(arrays)
        out = {}
        for k, v in raw.items():
            array = np.asarray(v)
            out[k] = torch.from_numpy(array.astype(np.float32) if array.dtype.kind == "f" else array.copy())
        return out


class Residency:
    """Keeps at most one on-demand component loaded: admitting one releases the one before."""

    def __init__(self) -> None:
        self.current: Component | None = None

    def admit(self, component: Component) -> None:
        if self.current is not None and self.current is not component:
            self.current.release()
        self.current = component


def free_memory(device: str = "cpu") -> None:
    """Hand memory freed by released models back to the system, so peak memory really drops.

    glibc keeps freed heap memory for reuse unless asked to trim it; CUDA's caching allocator
    keeps freed blocks until emptied.
    """
    import gc

    gc.collect()
    if device == "cuda":
        import torch

        torch.cuda.empty_cache()
    if sys.platform.startswith("linux"):
        import ctypes

        try:
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except (OSError, AttributeError):
            pass  # not glibc: its allocator returns memory on its own terms


# ---- finding bundles in a folder ---------------------------------------------------------

def component_of(bundle: Path) -> str | None:
    """`TextEncoder.mlmodelc` / `..._text_encoder.mlpackage` / `unet.mlpackage` -> component name."""
    if bundle.suffix == ".mlmodelc":
        return COMPILED_NAMES.get(bundle.stem)
    if bundle.suffix == ".mlpackage":
        return component_of_stem(bundle.stem)
    return None


def find_components(folder: Path) -> dict[str, Path]:
    """Component name -> bundle path for the variant in `folder` (compiled first when both exist).

    Bundles directly in the folder, else one level down (an extracted archive's `compiled/`).
    """
    from ..bundle import open_bundle

    found: dict[str, Path] = {}
    for comp in open_bundle(folder).components:
        if comp.known and comp.name not in found:
            found[comp.name] = comp.path
    return found


def unet_names(found: Iterable[str]) -> tuple[str, ...]:
    """The Unet form to use: the full Unet when present, else both chunks."""
    names = set(found)
    if "unet" in names:
        return ("unet",)
    if {"unet_chunk1", "unet_chunk2"} <= names:
        return ("unet_chunk1", "unet_chunk2")
    return ()


def require_vae_encoder(found: dict[str, Path], folder: Path) -> str:
    """The VAE encoder image-to-image needs, or a clear error when the variant has none."""
    if "vae_encoder" not in found:
        raise InvalidBundle(f"{folder} has no VAEEncoder, so it cannot do image-to-image.",
                            hint="Drop --image, or use a variant that ships a VAE encoder.")
    return "vae_encoder"


# ---- backends ----------------------------------------------------------------------------

def select_backend(name: str = "auto") -> Any:
    """The backend object for `--backend NAME`; `auto` is coreml on macOS, torch elsewhere."""
    from ..plugins import excluded, get_backends, restriction

    name = (name or "auto").lower()
    backends = get_backends()
    left_out = excluded()
    # a backend missing because COREML_HUB_PLUGINS filtered its plugin out is not "not installed"
    missing = f"not loaded ({restriction()} leaves out {', '.join(left_out)})" if left_out else "not installed"
    env_hint = f"Add the plugin to {restriction()}, or unset COREML_HUB_PLUGINS." if left_out else None
    if name == "auto":
        candidates = ["coreml", "torch"] if sys.platform == "darwin" else ["torch"]
        reasons = []
        for candidate in candidates:
            backend = backends.get(candidate)
            if backend is None:
                reasons.append(f"{candidate}: {missing}")
                continue
            ok, reason = backend.available()
            if ok:
                return backend
            reasons.append(f"{candidate}: {reason}")
        raise BackendUnavailable("No backend can run here (" + "; ".join(reasons) + ").",
                                 hint=env_hint or "Install PyTorch for the portable runtime, or run on macOS for "
                                                  "Core ML.")
    if name not in backends:
        known = ", ".join(sorted(backends)) or "none"
        what = "loaded" if left_out else "installed"
        raise BackendUnavailable(f"No backend named {name!r} is {what} ({what}: {known}"
                                 + (f"; {restriction()} leaves out {', '.join(left_out)}" if left_out else "") + ").",
                                 hint=env_hint or "Run `coreml-hub plugins` to see the backends and why each is "
                                                  "(un)available.")
    backend = backends[name]
    ok, reason = backend.available()
    if not ok:
        other = "torch" if name != "torch" else "coreml"
        raise BackendUnavailable(f"The {name} backend is not available: {reason}.",
                                 hint=f"Use --backend {other} or --backend auto; `coreml-hub plugins` lists them.")
    return backend


@dataclass(frozen=True)
class LoadedComponents:
    components: dict[str, Component]
    seconds: float
    backend: str
    device: str | None


def load_components(found: dict[str, Path], names: Iterable[str], backend: Any, *, device: str | None = "auto",
                    compute_unit: str | None = "ALL", progress: bool = False,
                    reduce_memory: bool = False, dtype: str | None = None) -> LoadedComponents:
    """Load the named components with `backend`; `found` is `find_components` of the variant folder.

    `reduce_memory` (the Swift CLI's --reduce-memory): each component is loaded once now (so a
    broken bundle fails before any work, and its descriptions are known), then released; it is
    loaded again when the pipeline calls it and released when another one is called. Peak memory
    is then the largest component's, not the sum. `names` come in the order the pipeline first
    calls them: they are loaded in reverse, so the first one needed stays loaded.
    `dtype` (fp32, fp16, bf16) is the float type a torch-tensor backend computes in; None lets
    the backend choose (the torch backend: fp32 on the CPU, the model's own on a GPU).
    """
    if dtype is not None and not getattr(backend, "dtypes", ()):
        raise BackendUnavailable(f"The {backend.name} backend does not take --dtype.",
                                 hint="Drop --dtype, or use --backend torch.")
    options = {"dtype": dtype} if dtype is not None else {}
    # text encoders take token ids as floats (Apple's contract), which bf16 cannot hold exactly
    # (ids above 256 round); they are a small part of a run, so they keep the backend's choice
    fmt = "compiled" if any(p.suffix == ".mlmodelc" for p in found.values()) else "packages"
    if fmt not in getattr(backend, "formats", ("packages", "compiled")):
        raise BackendUnavailable(f"The {backend.name} backend cannot load {fmt} bundles.",
                                 hint="Pull the other format of the model, or choose another --backend.")
    resolved = backend.resolve_device(device) if hasattr(backend, "resolve_device") else device
    wanted = list(names)
    loaded: dict[str, Component] = {}
    start = time.perf_counter()
    from tqdm import tqdm

    def load(name: str) -> Any:
        try:
            extra = options if name not in TOKEN_INPUT_COMPONENTS else {}
            return backend.load(found[name], device=resolved, compute_unit=compute_unit, **extra)
        except CoremlHubError:
            raise
        except (OSError, ValueError, KeyError) as exc:
            raise InvalidBundle(f"Cannot load {found[name].name}: {type(exc).__name__}: {exc}") from exc

    residency = Residency() if reduce_memory else None
    order = list(reversed(wanted)) if reduce_memory else wanted
    bar = tqdm(order, desc="Loading", unit="model", disable=not progress, file=sys.stderr, leave=False)
    for name in bar:
        bar.set_postfix_str(name)
        if residency is None:
            loaded[name] = Component(name, found[name], load(name))
            continue
        if residency.current is not None:
            residency.current.release()  # before the next one loads: one model in memory at a time
        component = Component(name, found[name], load(name), loader=lambda name=name: load(name),
                              residency=residency)
        residency.current = component
        loaded[name] = component
    bar.close()
    loaded = {name: loaded[name] for name in wanted}
    return LoadedComponents(loaded, time.perf_counter() - start, backend.name, resolved)
