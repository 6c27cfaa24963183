"""Safe zip extraction: hostile archives are refused with nothing written, good ones extract atomically."""

from __future__ import annotations

import io
import os
import stat
import struct
import zipfile
import zlib
from pathlib import Path

import pytest

from coreml_hub.archive import ABSOLUTE_BOUND, default_bound, plan, safe_extract
from coreml_hub.errors import CoremlHubError, UnsafeArchive


def build(path: Path, entries: list[tuple[zipfile.ZipInfo | str, bytes]],
          compression: int = zipfile.ZIP_DEFLATED) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(path, "w", compression) as zf:
        for name, data in entries:
            if isinstance(name, zipfile.ZipInfo):
                name.compress_type = compression
            zf.writestr(name, data)
    return path


def snapshot(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


@pytest.fixture
def area(tmp_path: Path) -> Path:
    """A folder holding `in/` (archives) and where `out/dest` goes; everything written is visible here."""
    (tmp_path / "in").mkdir()
    (tmp_path / "out").mkdir()
    return tmp_path


def assert_refused(area: Path, zip_path: Path, match: str, **kwargs: object) -> None:
    before = snapshot(area)
    with pytest.raises(UnsafeArchive, match=match):
        safe_extract(zip_path, area / "out" / "dest", **kwargs)  # type: ignore[arg-type]
    assert snapshot(area) == before, "something was written"


def test_extracts_with_progress(area: Path) -> None:
    payload = os.urandom(3 * 1024 * 1024) + b"\0" * (5 * 1024 * 1024)  # crosses several read chunks
    zip_path = build(area / "in" / "model_original_compiled.zip", [
        ("model/", b""),
        ("model/Unet.mlmodelc/weights/weight.bin", payload),
        ("model/Unet.mlmodelc/model.mil", b"program(1.0)\n"),
        ("model/vocab.json", b"{}"),
    ])
    seen: list[tuple[int, int]] = []
    dest = area / "out" / "dest"
    written = safe_extract(zip_path, dest, progress=lambda done, total: seen.append((done, total)))
    assert sorted(str(p.relative_to(dest)) for p in written) == [
        "model/Unet.mlmodelc/model.mil", "model/Unet.mlmodelc/weights/weight.bin", "model/vocab.json"]
    assert (dest / "model/Unet.mlmodelc/weights/weight.bin").read_bytes() == payload
    total = len(payload) + len(b"program(1.0)\n") + 2
    assert seen[-1] == (total, total)
    assert [d for d, _ in seen] == sorted(d for d, _ in seen)
    assert len(seen) > 3
    assert sorted(p.name for p in (area / "out").iterdir()) == ["dest"]  # no staging folder left


@pytest.mark.parametrize("compression", [zipfile.ZIP_STORED, zipfile.ZIP_BZIP2, zipfile.ZIP_LZMA])
def test_other_compressions(area: Path, compression: int) -> None:
    data = os.urandom(150_000) + b"weights" * 1000
    zip_path = build(area / "in" / "a.zip", [("a/b.bin", data)], compression)
    safe_extract(zip_path, area / "out" / "dest")
    assert (area / "out" / "dest" / "a" / "b.bin").read_bytes() == data


def test_into_existing_empty_folder(area: Path) -> None:
    (area / "out" / "dest").mkdir()
    safe_extract(build(area / "in" / "a.zip", [("x.txt", b"x")]), area / "out" / "dest")
    assert (area / "out" / "dest" / "x.txt").read_bytes() == b"x"


def test_refuses_non_empty_dest(area: Path) -> None:
    (area / "out" / "dest").mkdir()
    (area / "out" / "dest" / "keep").write_text("x")
    with pytest.raises(CoremlHubError, match="not empty"):
        safe_extract(build(area / "in" / "a.zip", [("x.txt", b"x")]), area / "out" / "dest")
    assert snapshot(area / "out") == {"dest", "dest/keep"}


@pytest.mark.parametrize("name", ["../evil.txt", "model/../../evil.txt", "..\\evil.txt", "a/..\\..\\evil.txt"])
def test_refuses_parent_traversal(area: Path, name: str) -> None:
    zip_path = build(area / "in" / "a.zip", [("ok.txt", b"fine"), (zipfile.ZipInfo(name), b"owned")])
    assert_refused(area, zip_path, r"outside the destination")


@pytest.mark.parametrize("name", ["/abs/evil.txt", "/etc/cron.d/evil", "C:/evil.txt", "\\\\server\\share\\evil"])
def test_refuses_absolute_paths(area: Path, name: str) -> None:
    zip_path = build(area / "in" / "a.zip", [("ok.txt", b"fine"), (zipfile.ZipInfo(name), b"owned")])
    assert_refused(area, zip_path, "absolute path")


def test_refuses_symlink_entry(area: Path) -> None:
    link = zipfile.ZipInfo("model/Unet.mlmodelc")
    link.create_system = 3
    link.external_attr = (stat.S_IFLNK | 0o777) << 16
    zip_path = build(area / "in" / "a.zip", [(link, b"/etc"), ("model/vocab.json", b"{}")])
    assert_refused(area, zip_path, "symbolic link")


def test_refuses_special_file(area: Path) -> None:
    fifo = zipfile.ZipInfo("pipe")
    fifo.create_system = 3
    fifo.external_attr = (stat.S_IFIFO | 0o644) << 16
    assert_refused(area, build(area / "in" / "a.zip", [(fifo, b"")]), "not a regular file")


@pytest.mark.parametrize("names", [("a/x.bin", "a/x.bin"), ("a/X.bin", "a/x.bin"), ("a/x.bin", "./a//x.bin")])
def test_refuses_duplicates(area: Path, names: tuple[str, str]) -> None:
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # zipfile warns about writing a duplicate name
        zip_path = build(area / "in" / "a.zip", [(zipfile.ZipInfo(n), b"1") for n in names])
    assert_refused(area, zip_path, "twice")


def test_refuses_file_and_folder_of_one_name(area: Path) -> None:
    zip_path = build(area / "in" / "a.zip", [("a", b"file"), ("a/b", b"under it")])
    assert_refused(area, zip_path, "under a file")


def _patch_sizes(zip_path: Path, name: str, new_size: int, new_crc: int) -> None:
    """Rewrite an entry's declared uncompressed size and CRC in both its local and central headers."""
    with zipfile.ZipFile(zip_path) as zf:
        info = zf.getinfo(name)
        start_dir = zf.start_dir
    raw = bytearray(zip_path.read_bytes())
    local = info.header_offset
    assert raw[local:local + 4] == b"PK\x03\x04"
    struct.pack_into("<I", raw, local + 14, new_crc)
    struct.pack_into("<I", raw, local + 22, new_size)
    central = start_dir
    while True:  # walk the central directory to the entry
        assert raw[central:central + 4] == b"PK\x01\x02"
        name_len, extra_len, comment_len = struct.unpack_from("<HHH", raw, central + 28)
        if raw[central + 46:central + 46 + name_len].decode() == name:
            break
        central += 46 + name_len + extra_len + comment_len
    struct.pack_into("<I", raw, central + 16, new_crc)
    struct.pack_into("<I", raw, central + 24, new_size)
    zip_path.write_bytes(bytes(raw))


def test_refuses_entry_larger_than_declared(area: Path) -> None:
    data = b"\0" * (4 * 1024 * 1024)
    zip_path = build(area / "in" / "bomb.zip", [("first.txt", b"written before the bomb"), ("bomb.bin", data)])
    # Declare 1000 bytes with the CRC of those 1000 bytes: zipfile alone would quietly truncate.
    _patch_sizes(zip_path, "bomb.bin", 1000, zlib.crc32(data[:1000]))
    assert plan(zip_path)  # the headers alone look harmless
    assert_refused(area, zip_path, "beyond its declared size")


def test_refuses_bomb_over_default_bound(area: Path) -> None:
    zip_path = build(area / "in" / "bomb.zip", [("zeros.bin", b"\0" * (32 * 1024 * 1024))])
    archive_size = zip_path.stat().st_size
    assert archive_size * 20 < 32 * 1024 * 1024
    assert default_bound(archive_size) == 20 * archive_size
    assert_refused(area, zip_path, "above the limit")
    # the caller may raise the bound for an archive it trusts
    safe_extract(zip_path, area / "out" / "dest", max_total_bytes=32 * 1024 * 1024)
    assert (area / "out" / "dest" / "zeros.bin").stat().st_size == 32 * 1024 * 1024


def test_bound_is_capped() -> None:
    assert default_bound(10 * 1024**3) == ABSOLUTE_BOUND == 64 * 1024**3


def test_refuses_explicit_bound(area: Path) -> None:
    zip_path = build(area / "in" / "a.zip", [("a.bin", os.urandom(2000))])
    assert_refused(area, zip_path, "above the limit", max_total_bytes=1999)


def test_refuses_overlapping_entries(area: Path) -> None:
    zip_path = build(area / "in" / "a.zip", [("a.bin", b"\0" * 100_000)])
    raw = bytearray(zip_path.read_bytes())
    eocd = raw.rindex(b"PK\x05\x06")
    count, cd_size, cd_offset = struct.unpack_from("<HII", raw, eocd + 10)
    record = bytes(raw[cd_offset:cd_offset + cd_size])
    twin = record.replace(b"a.bin", b"b.bin")  # a second name for the same data
    struct.pack_into("<HHII", raw, eocd + 8, count + 1, count + 1, cd_size * 2, cd_offset)
    zip_path.write_bytes(bytes(raw[:cd_offset + cd_size]) + twin + bytes(raw[cd_offset + cd_size:]))
    with zipfile.ZipFile(zip_path) as zf:
        assert zf.namelist() == ["a.bin", "b.bin"]
    assert_refused(area, zip_path, "share their data")


def test_refuses_damaged_data(area: Path) -> None:
    zip_path = build(area / "in" / "a.zip", [("a.bin", b"A" * 5000)], zipfile.ZIP_STORED)
    raw = bytearray(zip_path.read_bytes())
    raw[raw.index(b"AAAA") + 10] = ord("B")
    zip_path.write_bytes(bytes(raw))
    assert_refused(area, zip_path, "CRC")


def test_refuses_encrypted(area: Path) -> None:
    zip_path = build(area / "in" / "a.zip", [("a.bin", b"x")])
    with zipfile.ZipFile(zip_path) as zf:
        offset = zf.getinfo("a.bin").header_offset
        start_dir = zf.start_dir
    raw = bytearray(zip_path.read_bytes())
    for at in (offset + 6, start_dir + 8):  # general purpose flag, local then central
        struct.pack_into("<H", raw, at, struct.unpack_from("<H", raw, at)[0] | 0x1)
    zip_path.write_bytes(bytes(raw))
    assert_refused(area, zip_path, "encrypted")


def test_refuses_not_a_zip(area: Path) -> None:
    bogus = area / "in" / "a.zip"
    bogus.write_bytes(b"<html>not found</html>")
    assert_refused(area, bogus, "not a readable zip")


def test_refuses_local_name_mismatch(area: Path) -> None:
    zip_path = build(area / "in" / "a.zip", [("good.txt", b"x")], zipfile.ZIP_STORED)
    raw = bytearray(zip_path.read_bytes())
    local = raw.index(b"good.txt")  # first occurrence: the local header
    raw[local:local + 8] = b"evil.txt"
    zip_path.write_bytes(bytes(raw))
    assert_refused(area, zip_path, "another name")


def test_plan_lists_entries(tmp_path: Path) -> None:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("d/", b"")
        zf.writestr("d/f.txt", b"abc")
    (tmp_path / "a.zip").write_bytes(buf.getvalue())
    entries = plan(tmp_path / "a.zip")
    assert [(e.relpath, e.is_dir) for e in entries] == [("d", True), ("d/f.txt", False)]
