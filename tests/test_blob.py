"""Weight files: our reader and writer against coremltools' MILBlob storage (libmilstoragepython)."""

from __future__ import annotations

import filecmp
import struct
import tracemalloc
from pathlib import Path

import numpy as np
import pytest

from coreml_hub.mil import blob
from coreml_hub.mil.blob import BlobError, BlobFile, BlobWriter, open_blob_file, read_blob_value
from coreml_hub.mil.program import BlobRef, TensorType, TensorValue

from _mil_fixtures import SAMPLES, SAMPLES_MISSING

storage = pytest.importorskip("coremltools.libmilstoragepython")

RNG = np.random.default_rng(1234)

# MIL dtype -> (values, coremltools writer/reader suffix)
CASES = {
    "fp16": (RNG.standard_normal(37).astype(np.float16), "fp16"),
    "fp32": (RNG.standard_normal(11).astype(np.float32), "float"),
    "uint8": (RNG.integers(0, 256, 13).astype(np.uint8), "uint8"),
    "int8": (RNG.integers(-128, 128, 13).astype(np.int8), "int8"),
    "int16": (RNG.integers(-30000, 30000, 5).astype(np.int16), "int16"),
    "uint16": (RNG.integers(0, 65536, 5).astype(np.uint16), "uint16"),
    "int32": (RNG.integers(-(2**31), 2**31 - 1, 5).astype(np.int32), "int32"),
    "uint32": (RNG.integers(0, 2**32 - 1, 5, dtype=np.uint64).astype(np.uint32), "uint32"),
    "int4": (RNG.integers(-8, 8, 33).astype(np.int8), "int4"),
    "uint1": (RNG.integers(0, 2, 35).astype(np.uint8), "uint1"),
    "uint2": (RNG.integers(0, 4, 35).astype(np.uint8), "uint2"),
    "uint3": (RNG.integers(0, 8, 35).astype(np.uint8), "uint3"),
    "uint4": (RNG.integers(0, 16, 35).astype(np.uint8), "uint4"),
    "uint6": (RNG.integers(0, 64, 35).astype(np.uint8), "uint6"),
}


def _ct_write(path: Path, items: dict[str, np.ndarray]) -> dict[str, int]:
    writer = storage._BlobStorageWriter(str(path))
    offsets = {}
    for dtype, values in items.items():
        suffix = CASES[dtype][1]
        data = values.view(np.uint16) if dtype == "fp16" else values
        offsets[dtype] = getattr(writer, f"write_{suffix}_data")(data)
    del writer  # flushes and closes
    return offsets


def _ct_read(path: Path, dtype: str, offset: int) -> np.ndarray:
    reader = storage._BlobStorageReader(str(path))
    data = getattr(reader, f"read_{CASES[dtype][1]}_data")(offset)
    return np.asarray(data).view(np.float16) if dtype == "fp16" else np.asarray(data)


def test_writer_output_is_byte_identical_to_coremltools(tmp_path: Path) -> None:
    items = {dtype: values for dtype, (values, _) in CASES.items()}
    theirs = _ct_write(tmp_path / "ct.bin", items)
    with BlobWriter(tmp_path / "ours.bin") as writer:
        ours = {dtype: writer.add(values, dtype=dtype) for dtype, values in items.items()}
    assert ours == theirs
    assert filecmp.cmp(tmp_path / "ct.bin", tmp_path / "ours.bin", shallow=False)


@pytest.mark.parametrize("dtype", sorted(CASES))
def test_reads_what_coremltools_writes(tmp_path: Path, dtype: str) -> None:
    values = CASES[dtype][0]
    offsets = _ct_write(tmp_path / "w.bin", {"fp32": CASES["fp32"][0], dtype: values})
    with BlobFile(tmp_path / "w.bin") as f:
        got = f.read(offsets[dtype], dtype=dtype, shape=values.shape)
        assert got.dtype == blob.NUMPY_TYPES[dtype]
        np.testing.assert_array_equal(got, values)
        assert f.info(offsets[dtype]).dtype_code == blob.DTYPE_CODES[dtype]
        # without a shape, sub-byte element counts come from the padding field
        np.testing.assert_array_equal(f.read(offsets[dtype]), values)


@pytest.mark.parametrize("dtype", sorted(CASES))
def test_coremltools_reads_what_we_write(tmp_path: Path, dtype: str) -> None:
    values = CASES[dtype][0]
    with BlobWriter(tmp_path / "w.bin") as writer:
        writer.add(np.arange(3, dtype=np.float32))
        offset = writer.add(values, dtype=dtype)
    np.testing.assert_array_equal(_ct_read(tmp_path / "w.bin", dtype, offset), values)


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 6])
@pytest.mark.parametrize("count", [0, 1, 2, 3, 5, 7, 8, 9, 15, 16, 17, 63, 64, 65])
def test_sub_byte_counts_that_do_not_fill_a_byte(tmp_path: Path, bits: int, count: int) -> None:
    dtype = f"uint{bits}"
    values = np.random.default_rng(count).integers(0, 1 << bits, count).astype(np.uint8)
    packed = blob.pack_bits(values, bits)
    assert len(packed) == blob.packed_size(dtype, count) == (count * bits + 7) // 8
    np.testing.assert_array_equal(blob.unpack_bits(np.frombuffer(packed, np.uint8), bits, count), values)
    if count:  # coremltools writes the same bytes and we read its file back
        offsets = _ct_write(tmp_path / "ct.bin", {dtype: values})
        with BlobWriter(tmp_path / "ours.bin") as writer:
            writer.add(values, dtype=dtype)
        assert filecmp.cmp(tmp_path / "ct.bin", tmp_path / "ours.bin", shallow=False)
        with BlobFile(tmp_path / "ct.bin") as f:
            np.testing.assert_array_equal(f.read(offsets[dtype], dtype=dtype, shape=(count,)), values)


def test_chunked_unpacking_matches_one_pass(monkeypatch: pytest.MonkeyPatch) -> None:
    rng = np.random.default_rng(7)
    for bits in (1, 2, 3, 4, 6):
        values = rng.integers(0, 1 << bits, 10_001).astype(np.uint8)
        packed = np.frombuffer(blob.pack_bits(values, bits), np.uint8)
        monkeypatch.setattr(blob, "_CHUNK", 5)  # many chunks, with a partial one at the end
        np.testing.assert_array_equal(blob.unpack_bits(packed, bits, values.size), values)
        monkeypatch.setattr(blob, "_CHUNK", 1 << 22)


def test_int4_is_sign_extended() -> None:
    values = np.array([-8, -1, 0, 7, 3, -5], dtype=np.int8)
    packed = np.frombuffer(blob.pack_bits(values, 4), np.uint8)
    assert packed.tolist() == [0xF8, 0x70, 0xB3]  # low nibble first, two's complement
    np.testing.assert_array_equal(blob.unpack_bits(packed, 4, 6, signed=True), values)


def test_byte_aligned_reads_are_zero_copy_views(tmp_path: Path) -> None:
    values = np.arange(1000, dtype=np.float16)
    with BlobWriter(tmp_path / "w.bin") as writer:
        offset = writer.add(values)
    f = BlobFile(tmp_path / "w.bin")
    array = f.read(offset, dtype="fp16", shape=(10, 100))
    assert not array.flags.owndata and not array.flags.writeable
    raw = np.frombuffer(f._mm, dtype=np.uint8)
    assert np.shares_memory(array, raw)
    with pytest.raises(BufferError):  # the map cannot go away under a live view
        f.close()
    del array, raw
    f.close()


def test_bf16_and_fp8_round_trip_with_their_codes(tmp_path: Path) -> None:
    bf16 = (np.array([1.0, -2.5, 3.140625], np.float32).view(np.uint32) >> 16).astype(np.uint16)
    fp8 = np.array([0, 0x38, 0xFF], np.uint8)
    with BlobWriter(tmp_path / "w.bin") as writer:
        offsets = [writer.add(bf16, dtype="bf16"), writer.add(fp8, dtype="fp8e4m3fn"), writer.add(fp8, dtype="fp8e5m2")]
    raw = (tmp_path / "w.bin").read_bytes()
    assert [struct.unpack_from("<I", raw, o + 4)[0] for o in offsets] == [5, 16, 17]  # MILBlob's BlobDataType
    with BlobFile(tmp_path / "w.bin") as f:
        np.testing.assert_array_equal(f.read(offsets[0], "bf16", (3,)), bf16)
        np.testing.assert_array_equal(f.read(offsets[1], "fp8e4m3fn", (3,)), fp8)
        assert [i.dtype for i in f] == ["bf16", "fp8e4m3fn", "fp8e5m2"]


def test_copy_moves_blobs_byte_for_byte(tmp_path: Path) -> None:
    """What the Unet chunker uses: a coremltools-written file, blobs copied in another order and subset."""
    offsets = _ct_write(tmp_path / "src.bin", {d: v for d, (v, _) in CASES.items()})
    chosen = ["uint3", "fp16", "int4", "uint32"]
    with BlobFile(tmp_path / "src.bin") as src, BlobWriter(tmp_path / "dst.bin") as writer:
        moved = {d: writer.copy(src, offsets[d]) for d in chosen}
    src_raw, dst_raw = (tmp_path / "src.bin").read_bytes(), (tmp_path / "dst.bin").read_bytes()
    with BlobFile(tmp_path / "src.bin") as src, BlobFile(tmp_path / "dst.bin") as dst:
        assert dst.count == len(chosen)
        for dtype in chosen:
            a, b = src.info(offsets[dtype]), dst.info(moved[dtype])
            assert (a.dtype_code, a.size, a.padding_bits) == (b.dtype_code, b.size, b.padding_bits)
            assert src_raw[a.data_offset:a.data_offset + a.size] == dst_raw[b.data_offset:b.data_offset + b.size]
            np.testing.assert_array_equal(_ct_read(tmp_path / "dst.bin", dtype, moved[dtype]), CASES[dtype][0])


def test_tensor_value_array_resolves_model_path(tmp_path: Path) -> None:
    (tmp_path / "weights").mkdir()
    values = np.arange(12, dtype=np.float32).reshape(3, 4)
    with BlobWriter(tmp_path / "weights" / "weight.bin") as writer:
        offset = writer.add(values)
    value = TensorValue(TensorType("fp32", (3, 4)), BlobRef("@model_path/weights/weight.bin", offset),
                        base_dir=tmp_path)
    np.testing.assert_array_equal(value.array(), values)
    assert open_blob_file(tmp_path / "weights" / "weight.bin") is open_blob_file(tmp_path / "weights" / "weight.bin")
    outside = TensorValue(TensorType("fp32", (3, 4)), BlobRef("@model_path/../secret.bin", offset), base_dir=tmp_path)
    with pytest.raises(BlobError, match="points outside the model folder"):
        read_blob_value(outside)
    wrong = TensorValue(TensorType("fp16", (3, 4)), BlobRef("@model_path/weights/weight.bin", offset),
                        base_dir=tmp_path)
    with pytest.raises(BlobError, match="blob holds fp32, the program declares fp16"):
        wrong.array()


def test_replaced_file_gets_a_fresh_mapping(tmp_path: Path) -> None:
    path = tmp_path / "w.bin"
    with BlobWriter(path) as writer:
        offset = writer.add(np.ones(4, np.float32))
    first = open_blob_file(path).read(offset, "fp32", (4,))
    with BlobWriter(path) as writer:  # written aside and renamed over: a new inode
        writer.add(np.full(4, 2, np.float32))
    np.testing.assert_array_equal(first, np.ones(4))  # the old view keeps the old map
    np.testing.assert_array_equal(open_blob_file(path).read(offset, "fp32", (4,)), np.full(4, 2))


def test_writer_leaves_nothing_on_failure(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="out of range for uint2"):
        with BlobWriter(tmp_path / "w.bin") as writer:
            writer.add(np.array([0, 4], np.uint8), dtype="uint2")
    assert list(tmp_path.iterdir()) == []


# -- corrupt files: a typed error naming the fault, never a crash or a huge allocation -----


def _one_blob(tmp_path: Path) -> tuple[Path, int, bytearray]:
    path = tmp_path / "w.bin"
    with BlobWriter(path) as writer:
        writer.add(np.arange(8, dtype=np.float16))
        offset = writer.add(np.arange(100, dtype=np.float32))
    return path, offset, bytearray(path.read_bytes())


def _expect(path: Path, data: bytes, offset: int, reason: str) -> None:
    path.write_bytes(bytes(data))
    tracemalloc.start()
    try:
        with pytest.raises(BlobError) as caught:
            with BlobFile(path) as f:
                f.read(offset, dtype="fp32", shape=(100,))
        assert caught.value.reason == reason
        assert tracemalloc.get_traced_memory()[1] < 1 << 20
    finally:
        tracemalloc.stop()


def test_corrupt_files_give_the_exact_reason(tmp_path: Path) -> None:
    path, offset, good = _one_blob(tmp_path)
    size = len(good)
    data_offset = offset + 64

    _expect(path, good[:40], offset, "40 bytes, too small for a weight file header (64 bytes)")
    bad = bytearray(good); bad[4:8] = struct.pack("<I", 1)
    _expect(path, bad, offset, "weight file version 1, expected 2")
    _expect(path, good, 32, "offset lies inside the 64-byte file header")
    _expect(path, good, size + 64, f"offset is past the end of the file ({size} bytes)")
    bad = bytearray(good); bad[offset:offset + 4] = b"\0\0\0\0"
    _expect(path, bad, offset, "no blob here (sentinel 0x00000000, expected 0xDEADBEEF)")
    bad = bytearray(good); bad[offset + 4:offset + 8] = struct.pack("<I", 99)
    _expect(path, bad, offset, "unknown blob data type code 99")
    bad = bytearray(good); bad[offset + 8:offset + 16] = struct.pack("<Q", 2**64 - 1)
    _expect(path, bad, offset, f"blob declares {2**64 - 1} bytes at {data_offset} but the file ends at {size} "
                               f"(short by {2**64 - 1 - (size - data_offset)} bytes)")
    bad = bytearray(good); bad[offset + 16:offset + 24] = struct.pack("<Q", 2**63)
    _expect(path, bad, offset, f"data offset {2**63} is outside the file or overlaps the metadata")
    _expect(path, good[:-10], offset, f"blob declares 400 bytes at {data_offset} but the file ends at {size - 10} "
                                      "(short by 10 bytes)")
    bad = bytearray(good); bad[offset + 8:offset + 16] = struct.pack("<Q", 396)
    _expect(path, bad, offset, "396 bytes of fp32, but shape [100] needs 400 bytes")
    bad = bytearray(good); bad[offset + 4:offset + 8] = struct.pack("<I", 1)
    _expect(path, bad, offset, "blob holds fp16, the program declares fp32")


def test_missing_and_directory_paths(tmp_path: Path) -> None:
    with pytest.raises(BlobError) as caught:
        BlobFile(tmp_path / "nope.bin")
    assert caught.value.reason == "weight file not found"
    with pytest.raises(BlobError) as caught:
        BlobFile(tmp_path)
    assert caught.value.reason == "is a directory, not a weight file"


def test_walking_a_file_with_an_inflated_count_stops_with_an_error(tmp_path: Path) -> None:
    path, _offset, good = _one_blob(tmp_path)
    good[0:4] = struct.pack("<I", 1_000_000)
    path.write_bytes(bytes(good))
    with BlobFile(path) as f, pytest.raises(BlobError, match="past the end of the file"):
        f.offsets()


# -- real weight files from Apple's toolchain ------------------------------------------------

REAL = sorted(SAMPLES.glob("bundles/*.mlmodelc")) + sorted(SAMPLES.glob("bundles/*.mlpackage"))


@pytest.mark.skipif(not REAL, reason=SAMPLES_MISSING)
@pytest.mark.parametrize("bundle", REAL, ids=lambda p: p.name)
def test_real_weight_files_read_like_coremltools_reads_them(bundle: Path) -> None:
    weight = next(bundle.rglob("weight.bin"))
    reader = storage._BlobStorageReader(str(weight))
    names = {"fp16": "fp16", "fp32": "float", "uint8": "uint8", "int8": "int8", "int16": "int16",
             "uint16": "uint16", "int32": "int32", "uint32": "uint32"}
    with BlobFile(weight) as f:
        infos = list(f)
        assert len(infos) == f.count > 0
        for info in infos:
            ours = f.read(info.offset)
            theirs = np.asarray(getattr(reader, f"read_{names[info.dtype]}_data")(info.offset))
            if info.dtype == "fp16":
                theirs = theirs.view(np.float16)
            assert ours.tobytes() == theirs.tobytes()
