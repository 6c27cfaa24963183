"""Files the app serves and lists: regular files inside the outputs folder, by the rules of
coreml_hub.safeserve (no traversal, no links out of the folder, no hidden files). What a listing
shows is exactly what the file route serves."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Iterator

from starlette.exceptions import HTTPException

from ..safeserve import resolve_under, walk_under


def output_file(root: Path, relpath: str) -> Path:
    """The file `relpath` (URL-decoded once) names under `root`; 404 for anything else."""
    found = resolve_under(root, relpath)
    if found is None or not found.is_file():
        raise HTTPException(404)
    return found


def output_entries(root: Path) -> Iterator[tuple[str, os.stat_result]]:
    """(name, stat of the real file) for each file directly in `root` that `output_file` would serve."""
    try:
        names = sorted(entry.name for entry in os.scandir(root))
    except OSError:
        return
    for name in names:
        found = resolve_under(root, name)
        if found is None:
            continue
        try:
            st = found.stat()
        except OSError:
            continue
        if found.is_file():
            yield name, st


def _describe(path: str, size: int, mtime_ns: int) -> dict[str, Any]:
    return {"path": path, "size": size, "modified": mtime_ns / 1e9}


def list_files(root: Path) -> list[dict[str, Any]]:
    """Every file under `root` the file route serves, subfolders included."""
    return [_describe(f.path, f.size, f.mtime_ns) for f in walk_under(root)]


def files_info(root: Path, paths: list[str]) -> list[dict[str, Any]]:
    """The files among `paths` that exist under `root` (the others are left out, as the Hub's paths-info does)."""
    found = []
    for path in dict.fromkeys(paths):
        real = resolve_under(root, path)
        if real is not None and real.is_file():
            st = real.stat()
            found.append(_describe(path, st.st_size, st.st_mtime_ns))
    return found
