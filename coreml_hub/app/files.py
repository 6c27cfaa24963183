"""Files the app serves and lists: regular files directly in the outputs folder, by the rules of
coreml_hub.safeserve (no traversal, no links out of the folder, no hidden files)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterator

from starlette.exceptions import HTTPException

from ..safeserve import resolve_under


def output_file(root: Path, name: str) -> Path:
    """The file `name` (one URL-decoded path segment) names in `root`; 404 for anything else."""
    found = resolve_under(root, name) if "/" not in name else None
    if found is None or not found.is_file():
        raise HTTPException(404)
    return found


def output_entries(root: Path) -> Iterator[tuple[str, os.stat_result]]:
    """(name, stat of the real file) for each file `output_file` would serve."""
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
