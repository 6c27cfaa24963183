"""Writing files and folders so that readers see the old version or the new one, never half of it.

Everything is built under a temporary name next to its destination (same file system) and
put in place with one rename; a failure removes the temporary and leaves the destination as it was.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator

from .errors import CoremlHubError


def _read_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


# Read once, at import: changing the umask to read it is not safe while other threads create files.
_UMASK = _read_umask()


def write_text_atomic(path: Path, text: str, *, fsync: bool = False) -> None:
    """Write `text` through a temp file and a rename; `fsync` also waits until it is on disk."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        # mkstemp creates 0600; a store shared between users needs the umask's usual mode.
        os.fchmod(fd, 0o666 & ~_UMASK)
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
            if fsync:
                fh.flush()
                os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def write_json_atomic(path: Path, data: Any) -> None:
    """Indented JSON, synced to disk before the rename: manifests must survive a crash."""
    write_text_atomic(path, json.dumps(data, indent=2, default=str) + "\n", fsync=True)


def check_empty_dest(dest: Path, doing: str) -> None:
    """Refuse a destination that is a file, a link or a folder with something in it."""
    if dest.is_symlink() or (dest.exists() and not dest.is_dir()):
        raise CoremlHubError(f"Cannot {doing} {dest}: it exists and is not a folder.")
    if dest.is_dir() and any(dest.iterdir()):
        raise CoremlHubError(f"Cannot {doing} {dest}: the folder is not empty.",
                             hint="Remove it or choose another destination.")


def temp_dir_beside(dest: Path, what: str) -> Path:
    """A new hidden folder next to `dest`, on its file system, so a rename can publish it."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f".{dest.name}.", suffix=f".{what}", dir=dest.parent))


@contextlib.contextmanager
def building_dir(dest: Path, what: str) -> Iterator[Path]:
    """A folder to fill; it becomes `dest` (missing or empty) when the block ends, and is removed if it fails."""
    staging = temp_dir_beside(dest, what)
    try:
        yield staging
        staging.chmod(0o755)  # mkdtemp's 0700 would carry over to the published folder
        os.replace(staging, dest)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
