"""Files the app serves: only regular files inside the outputs folder (no traversal, no links out)."""

from __future__ import annotations

import os
from pathlib import Path

from starlette.exceptions import HTTPException


def output_file(root: Path, name: str) -> Path:
    """The file `name` names under `root`; 404 for anything else. (Interim: see issue 18's shared rules.)"""
    if not name or "\0" in name or name.startswith("/") or any(part in ("", ".", "..") for part in name.split("/")):
        raise HTTPException(404)
    base = os.path.realpath(root)
    real = os.path.realpath(os.path.join(base, name))
    if os.path.commonpath([base, real]) != base or not os.path.isfile(real):
        raise HTTPException(404)
    return Path(real)
