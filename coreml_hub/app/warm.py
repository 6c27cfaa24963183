"""Loaded pipelines kept warm between requests: one per model, released when another model is
needed and memory is short (or more models are loaded than `max_models` allows).

Only the generation worker loads and uses pipelines; the lock is for the pages that list them
and for removing a model from the store while it is loaded.
"""

from __future__ import annotations

import gc
import os
import sys
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable

# A pipeline takes about twice its files' size in memory: fp16 weights run in float32 on the CPU.
MEMORY_FACTOR = 2.0
MEMORY_MARGIN = 512 * 1024 * 1024


def available_memory() -> int | None:
    """Bytes of memory a new model can take now; None where the system does not say."""
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def weights_size(folder: Path) -> int:
    total = 0
    for dirpath, _dirs, names in os.walk(folder):
        for name in names:
            try:
                total += (Path(dirpath) / name).stat().st_size
            except OSError:
                pass
    return total


@dataclass(frozen=True)
class LoadOptions:
    backend: str = "auto"
    device: str | None = "auto"
    compute_unit: str | None = "ALL"
    prediction_type: str | None = None
    controlnets: tuple[str, ...] = ()  # ControlNet bundles loaded with the Unet that takes their residuals


@dataclass
class WarmEntry:
    loaded: Any  # coreml_hub.pipeline.generate.LoadedPipeline
    options: LoadOptions
    size: int
    last_used: float


def _same(entry: WarmEntry, wanted: LoadOptions) -> bool:
    """Whether the loaded pipeline is what `wanted` would load: naming the prediction type the model's
    config gives anyway (as settings read back from a PNG do) needs no second load."""
    if entry.options == wanted:
        return True
    effective = entry.loaded.pipeline.scheduler_config.get("prediction_type")
    return (wanted.prediction_type is not None and wanted.prediction_type == effective
            and replace(wanted, prediction_type=None) == replace(entry.options, prediction_type=None))


class WarmPipelines:
    """Model folder -> loaded pipeline, least recently used first out."""

    def __init__(self, *, max_models: int | None = None,
                 memory: Callable[[], int | None] = available_memory) -> None:
        self.max_models = max_models if max_models and max_models > 0 else None
        self._memory = memory
        self._lock = threading.Lock()
        self._entries: OrderedDict[str, WarmEntry] = OrderedDict()
        self.released: list[str] = []  # names of models released to make room, oldest first (shown on the page)

    def get(self, model: Any, options: LoadOptions, *, on_message: Callable[[str], None] | None = None
            ) -> tuple[Any, bool]:
        """The loaded pipeline for `model` (a ResolvedModel) and whether it was warm already."""
        key = str(model.path)
        with self._lock:
            entry = self._entries.get(key)
            if entry is not None and _same(entry, options):
                entry.last_used = time.monotonic()
                self._entries.move_to_end(key)
                return entry.loaded, True
        if entry is not None:  # loaded with other options: one pipeline per model, so this one goes
            self.release(key)
        size = weights_size(model.path)
        self._make_room(size, on_message)
        loaded = self._load(model, options)
        with self._lock:
            self._entries[key] = WarmEntry(loaded, options, size, time.monotonic())
        return loaded, False

    def _load(self, model: Any, options: LoadOptions) -> Any:
        from ..pipeline.components import find_components
        from ..pipeline.generate import load_pipeline

        found = find_components(model.path)
        # Everything the model ships is loaded once, so any later request (image-to-image, with or
        # without the safety checker) runs on the same warm pipeline.
        return load_pipeline(model, backend=options.backend, device=options.device,
                             compute_unit=options.compute_unit, img2img="vae_encoder" in found,
                             safety="safety_checker" in found, prediction_type=options.prediction_type,
                             controlnets=tuple(Path(p) for p in options.controlnets))

    def _make_room(self, size: int, on_message: Callable[[str], None] | None) -> None:
        need = int(size * MEMORY_FACTOR) + MEMORY_MARGIN
        while True:
            with self._lock:
                if not self._entries:
                    return
                too_many = self.max_models is not None and len(self._entries) >= self.max_models
                free = self._memory()
                if not too_many and (free is None or free >= need):
                    return
                oldest = next(iter(self._entries))
                name = self._entries[oldest].loaded.model.name
            if on_message is not None:
                on_message(f"Releasing {name} to make room for the next model.")
            self.release(oldest)

    def release(self, key: str | Path) -> bool:
        """Drop one model's pipeline (its memory returns once no job holds it)."""
        with self._lock:
            entry = self._entries.pop(str(key), None)
            if entry is None:
                return False
            self.released.append(entry.loaded.model.name)
            del self.released[:-20]
        del entry
        gc.collect()
        torch = sys.modules.get("torch")
        if torch is not None and torch.cuda.is_available():
            torch.cuda.empty_cache()
        return True

    def release_under(self, folder: Path) -> None:
        """Drop every pipeline loaded from `folder` or below it (a model being removed from the store)."""
        folder = Path(folder)
        with self._lock:
            keys = [k for k in self._entries if Path(k) == folder or folder in Path(k).parents]
        for key in keys:
            self.release(key)

    def is_warm(self, folder: Path) -> bool:
        with self._lock:
            return str(folder) in self._entries

    def describe(self) -> list[dict[str, Any]]:
        with self._lock:
            return [{"model": e.loaded.model.name, "variant": e.loaded.model.variant, "path": key,
                     "backend": e.loaded.backend, "device": e.loaded.device, "size_bytes": e.size,
                     "load_seconds": round(e.loaded.load_seconds, 3)} for key, e in self._entries.items()]

    def clear(self) -> None:
        with self._lock:
            keys = list(self._entries)
        for key in keys:
            self.release(key)
