"""The gallery: every PNG in the outputs folder, newest first, with the settings read back
from its metadata (coreml_hub.pipeline.png), whether this app made it or `coreml-hub run` did.

Intermediate decodes (`--save-every`) are left out; so are files that are not images, hidden files
(files still being written are hidden) and links out of the folder: the gallery lists exactly what
the file route serves. Metadata is read once per file version (name, size, mtime).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

IMAGE_SUFFIXES = (".png",)


@dataclass(frozen=True)
class GalleryImage:
    name: str
    size_bytes: int
    modified: float
    parameters: dict[str, Any] | None

    def to_dict(self, url: str) -> dict[str, Any]:
        return {"name": self.name, "url": url, "size_bytes": self.size_bytes, "modified": self.modified,
                "parameters": self.parameters}


class Gallery:
    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self._lock = threading.Lock()
        self._cache: dict[str, tuple[tuple[int, int], dict[str, Any] | None]] = {}

    def _metadata(self, path: Path, stamp: tuple[int, int]) -> dict[str, Any] | None:
        from ..pipeline.png import read_metadata

        with self._lock:
            hit = self._cache.get(path.name)
        if hit is not None and hit[0] == stamp:
            return hit[1]
        found = read_metadata(path)
        with self._lock:
            self._cache[path.name] = (stamp, found)
        return found

    def images(self) -> list[GalleryImage]:
        """Newest first."""
        from .files import output_entries

        found = []
        names = set()
        for name, st in output_entries(self.folder):
            names.add(name)
            if not name.lower().endswith(IMAGE_SUFFIXES):
                continue
            params = self._metadata(self.folder / name, (st.st_mtime_ns, st.st_size))
            if params is not None and params.get("step") is not None:
                continue  # an intermediate decode
            found.append(GalleryImage(name, st.st_size, st.st_mtime, params))
        found.sort(key=lambda img: (img.modified, img.name), reverse=True)
        with self._lock:  # forget files that are gone
            for stale in [n for n in self._cache if n not in names]:
                del self._cache[stale]
        return found
