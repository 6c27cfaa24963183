"""Safe zip extraction for archive variants.

Every entry is checked before a byte is written: no absolute paths, no `..`,
no links or special files, no duplicates (compared case-insensitively, as a
macOS disk would), no two entries sharing one data block, no encryption, and
a declared total no larger than the bound. The bound is `max_total_bytes`
when given, else `min(20 x the archive's size, 64 GiB)`: real model archives
barely compress (weights are noise to deflate), so a larger ratio means a
bomb, and 64 GiB is above any Stable Diffusion variant.

Entries are then decompressed with a byte counter, so an entry that inflates
past its declared size (a header that lies) is stopped at the first extra
byte. Everything is written into a temporary folder next to `dest` that is
renamed to `dest` only when all entries are complete: a failure leaves
nothing behind.
"""

from __future__ import annotations

import os
import re
import stat
import struct
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Callable

from .atomic import building_dir, check_empty_dest
from .errors import UnsafeArchive

RATIO_BOUND = 20
ABSOLUTE_BOUND = 64 * 1024**3
CHUNK = 1 << 20

Progress = Callable[[int, int], None]

_LOCAL_HEADER = struct.Struct("<4sHHHHHIIIHH")
_LOCAL_MAGIC = b"PK\x03\x04"
_DRIVE = re.compile(r"^[A-Za-z]:")


def default_bound(archive_size: int) -> int:
    """The most bytes an archive of `archive_size` bytes may expand to by default."""
    return min(RATIO_BOUND * archive_size, ABSOLUTE_BOUND)


@dataclass(frozen=True)
class Entry:
    """One checked archive entry and where it goes, relative to the destination."""

    info: zipfile.ZipInfo
    parts: tuple[str, ...]
    is_dir: bool

    @property
    def relpath(self) -> str:
        return "/".join(self.parts)


def _parts(name: str) -> tuple[str, ...]:
    if "\x00" in name:
        raise UnsafeArchive(f"Archive entry {name!r} has a NUL byte in its name.")
    norm = name.replace("\\", "/")
    if norm.startswith("/") or _DRIVE.match(norm):
        raise UnsafeArchive(f"Archive entry {name!r} has an absolute path.")
    parts = tuple(p for p in norm.split("/") if p not in ("", "."))
    if ".." in parts:
        raise UnsafeArchive(f"Archive entry {name!r} points outside the destination ('..').")
    return parts


def _check_type(info: zipfile.ZipInfo) -> None:
    kind = stat.S_IFMT(info.external_attr >> 16)
    if kind == stat.S_IFLNK:
        raise UnsafeArchive(f"Archive entry {info.filename!r} is a symbolic link.")
    if kind not in (0, stat.S_IFREG, stat.S_IFDIR):
        raise UnsafeArchive(f"Archive entry {info.filename!r} is not a regular file or folder.")
    if info.flag_bits & 0x1:
        raise UnsafeArchive(f"Archive entry {info.filename!r} is encrypted.")


def plan(zip_path: str | os.PathLike[str], *, max_total_bytes: int | None = None) -> list[Entry]:
    """Check every entry of `zip_path` and return them; raise UnsafeArchive on the first problem."""
    zip_path = Path(zip_path)
    try:
        with zipfile.ZipFile(zip_path) as zf:
            infos = zf.infolist()
    except (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError, ValueError) as exc:
        raise UnsafeArchive(f"{zip_path.name} is not a readable zip archive ({exc}).") from exc

    entries: list[Entry] = []
    seen: dict[str, str] = {}
    offsets: dict[int, str] = {}
    for info in infos:
        _check_type(info)
        parts = _parts(info.filename)
        is_dir = info.is_dir()
        if not parts:
            if is_dir:
                continue  # "./" names the destination itself
            raise UnsafeArchive(f"Archive entry {info.filename!r} has no file name.")
        key = "/".join(parts).casefold()
        if key in seen:
            raise UnsafeArchive(f"Archive has the entry {info.filename!r} twice (also as {seen[key]!r}).")
        seen[key] = info.filename
        if not is_dir:
            if info.header_offset in offsets:
                raise UnsafeArchive(
                    f"Archive entries {offsets[info.header_offset]!r} and {info.filename!r} share their data "
                    "(an overlapping-entry zip bomb)."
                )
            offsets[info.header_offset] = info.filename
        entries.append(Entry(info=info, parts=parts, is_dir=is_dir))

    files = {e.relpath.casefold() for e in entries if not e.is_dir}
    for entry in entries:
        for depth in range(1, len(entry.parts)):
            prefix = "/".join(entry.parts[:depth]).casefold()
            if prefix in files:
                raise UnsafeArchive(f"Archive entry {entry.info.filename!r} lies under a file of the same name.")

    declared = sum(e.info.file_size for e in entries if not e.is_dir)
    bound = max_total_bytes if max_total_bytes is not None else default_bound(zip_path.stat().st_size)
    if declared > bound:
        raise UnsafeArchive(
            f"{zip_path.name} would expand to {declared:,} bytes, above the limit of {bound:,} bytes "
            "(a zip bomb, or pass a larger max_total_bytes)."
        )
    return entries


def _data_start(fp: BinaryIO, info: zipfile.ZipInfo) -> int:
    fp.seek(info.header_offset)
    header = fp.read(_LOCAL_HEADER.size)
    if len(header) != _LOCAL_HEADER.size or header[:4] != _LOCAL_MAGIC:
        raise UnsafeArchive(f"Archive entry {info.filename!r} has a damaged local header.")
    fields = _LOCAL_HEADER.unpack(header)
    name_len, extra_len = fields[9], fields[10]
    raw_name = fp.read(name_len)
    encoding = "utf-8" if info.flag_bits & 0x800 else "cp437"
    if raw_name != info.orig_filename.encode(encoding, errors="replace"):
        raise UnsafeArchive(
            f"Archive entry {info.filename!r} has another name in its local header ({raw_name!r})."
        )
    return info.header_offset + _LOCAL_HEADER.size + name_len + extra_len


class _Counter:
    """Writes decompressed bytes, refusing any byte past the declared size."""

    def __init__(self, info: zipfile.ZipInfo, out: BinaryIO, on_bytes: Callable[[int], None]) -> None:
        self.info = info
        self.out = out
        self.on_bytes = on_bytes
        self.written = 0
        self.crc = 0

    def write(self, data: bytes) -> None:
        if not data:
            return
        self.written += len(data)
        if self.written > self.info.file_size:
            raise UnsafeArchive(
                f"Archive entry {self.info.filename!r} expands beyond its declared size of "
                f"{self.info.file_size:,} bytes (a zip bomb with a lying header)."
            )
        self.crc = zlib.crc32(data, self.crc)
        self.out.write(data)
        self.on_bytes(len(data))

    def finish(self, check_crc: bool = True) -> None:
        if self.written != self.info.file_size:
            raise UnsafeArchive(
                f"Archive entry {self.info.filename!r} holds {self.written:,} bytes, not the declared "
                f"{self.info.file_size:,} (the archive is damaged)."
            )
        if check_crc and self.crc != self.info.CRC:
            raise UnsafeArchive(f"Archive entry {self.info.filename!r} fails its CRC check (the archive is damaged).")


def _copy_raw(fp: BinaryIO, info: zipfile.ZipInfo, sink: _Counter) -> None:
    """Stored and deflated entries, read straight from the archive with bounded output."""
    fp.seek(_data_start(fp, info))
    remaining = info.compress_size
    inflater = zlib.decompressobj(-15) if info.compress_type == zipfile.ZIP_DEFLATED else None
    try:
        while remaining > 0:
            raw = fp.read(min(CHUNK, remaining))
            if not raw:
                raise UnsafeArchive(f"Archive entry {info.filename!r} is cut short (the archive is damaged).")
            remaining -= len(raw)
            if inflater is None:
                sink.write(raw)
                continue
            pending = raw
            while pending and not inflater.eof:
                sink.write(inflater.decompress(pending, CHUNK))
                pending = inflater.unconsumed_tail
        while inflater is not None and not inflater.eof:
            data = inflater.decompress(inflater.unconsumed_tail, CHUNK)
            if not data:
                raise UnsafeArchive(f"Archive entry {info.filename!r} ends early (the archive is damaged).")
            sink.write(data)
    except zlib.error as exc:
        raise UnsafeArchive(f"Archive entry {info.filename!r} is not valid deflate data ({exc}).") from exc
    sink.finish()


def _copy_other(zf: zipfile.ZipFile, info: zipfile.ZipInfo, sink: _Counter) -> None:
    """Other compression methods go through zipfile, still counted."""
    try:
        with zf.open(info) as src:
            while True:
                data = src.read(CHUNK)
                if not data:
                    break
                sink.write(data)
    except NotImplementedError as exc:
        raise UnsafeArchive(f"Archive entry {info.filename!r} uses an unsupported compression ({exc}).") from exc
    except (zipfile.BadZipFile, zlib.error, EOFError) as exc:
        raise UnsafeArchive(f"Archive entry {info.filename!r} is damaged ({exc}).") from exc
    sink.finish(check_crc=False)  # zipfile checked it


def safe_extract(
    zip_path: str | os.PathLike[str],
    dest: str | os.PathLike[str],
    *,
    max_total_bytes: int | None = None,
    progress: Progress | None = None,
) -> list[Path]:
    """Extract `zip_path` into `dest` (missing or empty) and return the files written.

    Raises UnsafeArchive, with nothing written anywhere, for an unsafe entry or a
    total above the bound; raises UnsafeArchive with `dest` untouched for an entry
    that lies about its size. `progress(done_bytes, total_bytes)` is called as
    bytes are written.
    """
    zip_path = Path(zip_path)
    dest = Path(dest)
    check_empty_dest(dest, "extract into")
    entries = plan(zip_path, max_total_bytes=max_total_bytes)
    total = sum(e.info.file_size for e in entries if not e.is_dir)
    done = 0

    def on_bytes(n: int) -> None:
        nonlocal done
        done += n
        if progress is not None:
            progress(done, total)

    with building_dir(dest, "extracting") as staging, zipfile.ZipFile(zip_path) as zf, open(zip_path, "rb") as fp:
        root = staging.resolve()
        for entry in entries:
            target = staging.joinpath(*entry.parts)
            if not target.resolve().is_relative_to(root):  # belt and braces over _parts
                raise UnsafeArchive(f"Archive entry {entry.info.filename!r} points outside the destination.")
            if entry.is_dir:
                target.mkdir(parents=True, exist_ok=True)
                continue
            target.parent.mkdir(parents=True, exist_ok=True)
            with open(target, "xb") as out:
                sink = _Counter(entry.info, out, on_bytes)
                if entry.info.compress_type in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED):
                    _copy_raw(fp, entry.info, sink)
                else:
                    _copy_other(zf, entry.info, sink)
        if progress is not None:
            progress(done, total)
    return [dest.joinpath(*e.parts) for e in entries if not e.is_dir]
