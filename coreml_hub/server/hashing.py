"""Content ids the way the Hub derives them: git blob sha1 for small files, LFS pointers for large ones.

Hashing a multi-GB bundle takes seconds, so digests are cached by (path, size, mtime_ns):
a repeated request for an unchanged file costs one `stat`.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from ..atomic import write_text_atomic

# The Hub refuses plain-git files of 10 MB and more.
LFS_THRESHOLD = 10 * 1024 * 1024

# Patterns from the `.gitattributes` every new Hub repo starts with (matched on the file name).
LFS_NAME_PATTERNS = (
    "*.7z", "*.arrow", "*.bin", "*.bz2", "*.ckpt", "*.ftz", "*.gz", "*.h5", "*.joblib", "*.lfs.*",
    "*.mlmodel", "*.model", "*.msgpack", "*.npy", "*.npz", "*.onnx", "*.ot", "*.parquet", "*.pb",
    "*.pickle", "*.pkl", "*.pt", "*.pth", "*.rar", "*.safetensors", "*.tar.*", "*.tar", "*.tflite",
    "*.tgz", "*.wasm", "*.xz", "*.zip", "*.zst", "*tfevents*",
)

_CHUNK = 1 << 20


def is_lfs(path: str, size: int) -> bool:
    """Whether the Hub would store this repo path in LFS."""
    if size >= LFS_THRESHOLD:
        return True
    name = path.rsplit("/", 1)[-1]
    if path.startswith("saved_model/"):
        return True
    return any(fnmatch.fnmatchcase(name, pattern) for pattern in LFS_NAME_PATTERNS)


def lfs_pointer(sha256: str, size: int) -> bytes:
    """The small text file git stores in place of an LFS object."""
    return f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha256}\nsize {size}\n".encode()


def git_blob_sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


@dataclass(frozen=True)
class Digest:
    """What the Hub reports about one file."""

    blob_id: str  # git blob sha1 of the content, or of the LFS pointer
    sha256: str | None  # LFS files only
    pointer_size: int | None  # LFS files only

    @property
    def etag(self) -> str:
        return self.sha256 or self.blob_id


def digest_file(path: Path, size: int, lfs: bool) -> Digest:
    """Read the file once and derive its ids: an LFS file's sha256 and pointer, else its git blob sha1."""
    h = hashlib.sha256() if lfs else hashlib.sha1(b"blob %d\0" % size)
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    if not lfs:
        return Digest(blob_id=h.hexdigest(), sha256=None, pointer_size=None)
    pointer = lfs_pointer(h.hexdigest(), size)
    return Digest(blob_id=git_blob_sha1(pointer), sha256=h.hexdigest(), pointer_size=len(pointer))


class DigestCache:
    """Thread-safe memo of file digests; one hashing pass per file version, even under concurrency.

    With `persist_to`, digests survive restarts (a JSON file written atomically), so a
    mirror of many GB does not rehash everything each time it starts.
    """

    SAVE_INTERVAL = 2.0  # seconds between saves triggered by requests

    def __init__(self, persist_to: Path | None = None) -> None:
        self._done: dict[tuple[str, int, int, bool], Digest] = {}
        self._locks: dict[tuple[str, int, int, bool], threading.Lock] = {}
        self._guard = threading.Lock()
        self._persist_to = persist_to
        self._dirty = False
        self._last_save = 0.0
        if persist_to is not None:
            self._load(persist_to)

    def get(self, path: Path, size: int, mtime_ns: int, lfs: bool) -> Digest:
        key = (str(path), size, mtime_ns, lfs)
        found = self._done.get(key)
        if found is not None:
            return found
        with self._guard:
            lock = self._locks.setdefault(key, threading.Lock())
        with lock:
            found = self._done.get(key)
            if found is None:
                found = digest_file(path, size, lfs)
                self._done[key] = found
                self._dirty = True
        with self._guard:
            self._locks.pop(key, None)
        if time.monotonic() - self._last_save > self.SAVE_INTERVAL:
            self.save()
        return found

    def _load(self, source: Path) -> None:
        try:
            rows = json.loads(source.read_text())
            for path, size, mtime_ns, lfs, blob_id, sha256, pointer_size in rows:
                self._done[(path, size, mtime_ns, lfs)] = Digest(blob_id, sha256, pointer_size)
        except (OSError, ValueError, TypeError):
            return  # no cache yet, or an unreadable one: hash again

    def save(self) -> None:
        """Write the digests out if anything changed; a read-only ROOT just means no cache."""
        if self._persist_to is None or not self._dirty:
            return
        with self._guard:
            self._last_save = time.monotonic()
            self._dirty = False
            rows = [[*key, d.blob_id, d.sha256, d.pointer_size] for key, d in list(self._done.items())
                    if os.path.exists(key[0])]
        try:
            write_text_atomic(self._persist_to, json.dumps(rows))
        except OSError:
            pass
