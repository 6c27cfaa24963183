"""Core ML weight files (`weights/weight.bin`): read with numpy over mmap, and write.

Format (MILBlob storage, version 2), all integers little endian:

- file header, 64 bytes: u32 count, u32 version (= 2), reserved
- per blob, 64-byte metadata at a 64-byte aligned offset: u32 sentinel 0xDEADBEEF,
  u32 dtype code, u64 size in bytes, u64 data offset, u64 padding bits (unused bits in the
  last byte of a sub-byte blob; older writers left this field uninitialized), reserved
- data 64-byte aligned, normally right after its metadata

Sub-byte types (uint1/2/3/4/6, int4) are packed least significant bit first: element i
occupies bits [i*n, (i+1)*n) of the little-endian bit stream, possibly spanning two bytes.

A constant names its blob by the offset of the blob's *metadata*. Reading never trusts a
declared size: every offset and size is checked against the file before numpy sees it, so
a corrupt file gives a `BlobError`, never a huge allocation or a crash.
"""

from __future__ import annotations

import mmap
import os
import struct
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np

from ..errors import CoremlHubError
from .program import DTYPES, dtype_nbits, integer_range

HEADER_SIZE = 64
METADATA_SIZE = 64
ALIGNMENT = 64
SENTINEL = 0xDEADBEEF
VERSION = 2

# dtype code -> MIL dtype name (as in model.mil and program.DTYPES)
DTYPE_NAMES: dict[int, str] = {
    1: "fp16",
    2: "fp32",
    3: "uint8",
    4: "int8",
    5: "bf16",
    6: "int16",
    7: "uint16",
    8: "int4",
    9: "uint1",
    10: "uint2",
    11: "uint4",
    12: "uint3",
    13: "uint6",
    14: "int32",
    15: "uint32",
    16: "fp8e4m3fn",
    17: "fp8e5m2",
}
DTYPE_CODES: dict[str, int] = {name: code for code, name in DTYPE_NAMES.items()}

NBITS: dict[str, int] = {name: dtype_nbits(name) for name in DTYPE_NAMES.values()}  # storage bits per element
# numpy type a blob reads as (bf16 and fp8 as raw bits; sub-byte types unpacked)
NUMPY_TYPES: dict[str, np.dtype] = {name: DTYPES[name].newbyteorder("<") for name in DTYPE_NAMES.values()}

_METADATA = struct.Struct("<IIQQQ")
_HEADER = struct.Struct("<II")


class BlobError(CoremlHubError):
    """A weight file or one blob in it is missing, truncated or malformed.

    `reason` is the message without the file and offset, for reports that name those apart.
    """

    default_hint = "The weight file is damaged: re-pull the model with `coreml-hub pull ... --force`."

    def __init__(self, message: str, *, hint: str | None = None, path: Path | None = None,
                 offset: int | None = None, reason: str | None = None) -> None:
        super().__init__(message, hint=hint)
        self.path = path
        self.offset = offset
        self.reason = reason if reason is not None else message


def _fail(path: Path, offset: int | None, reason: str) -> BlobError:
    where = f"{path} @ {offset}" if offset is not None else str(path)
    return BlobError(f"{where}: {reason}", path=path, offset=offset, reason=reason)


@dataclass(frozen=True)
class BlobInfo:
    """What the metadata at one offset says about its blob (already checked against the file)."""

    offset: int  # of the metadata
    dtype_code: int
    dtype: str
    size: int  # bytes of data
    data_offset: int
    padding_bits: int  # as stored; meaningful for sub-byte types written by newer tools

    def count(self) -> int:
        """Element count implied by size (and, for sub-byte types, the padding field)."""
        bits = NBITS[self.dtype]
        if bits >= 8:
            return self.size * 8 // bits
        pad = self.padding_bits if self.padding_bits < 8 else 0
        return (self.size * 8 - pad) // bits


def packed_size(dtype: str, count: int) -> int:
    """Bytes that `count` elements of `dtype` occupy in a blob."""
    return (count * NBITS[dtype] + 7) // 8


class BlobFile:
    """One weight file, memory-mapped read-only; arrays it returns are views into the map.

    Keep the object (or any returned array) alive while using the data; `close()` only
    succeeds once no array view remains.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        try:
            with open(self.path, "rb") as fh:
                self.size = os.fstat(fh.fileno()).st_size
                if self.size < HEADER_SIZE:
                    raise _fail(self.path, None, f"{self.size} bytes, too small for a weight file header "
                                                 f"({HEADER_SIZE} bytes)")
                self._mm = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ)
        except FileNotFoundError:
            raise _fail(self.path, None, "weight file not found") from None
        except IsADirectoryError:
            raise _fail(self.path, None, "is a directory, not a weight file") from None
        except PermissionError as exc:
            error = _fail(self.path, None, f"cannot read the weight file ({exc.strerror})")
            error.hint = "Check the file's permissions."
            raise error from None
        except (OSError, ValueError) as exc:  # ValueError: a NUL in the name, an unmappable file
            raise _fail(self.path, None, f"cannot map the weight file ({exc})") from None
        self.count, self.version = _HEADER.unpack_from(self._mm, 0)
        if self.version != VERSION:
            raise _fail(self.path, None, f"weight file version {self.version}, expected {VERSION}")

    # -- metadata -----------------------------------------------------------------

    def info(self, offset: int) -> BlobInfo:
        """The checked metadata of the blob at `offset` (the offset a BLOBFILE reference names)."""
        if offset < HEADER_SIZE:
            raise _fail(self.path, offset, f"offset lies inside the {HEADER_SIZE}-byte file header")
        if offset + METADATA_SIZE > self.size:
            raise _fail(self.path, offset, f"offset is past the end of the file ({self.size} bytes)")
        sentinel, code, size, data_offset, padding = _METADATA.unpack_from(self._mm, offset)
        if sentinel != SENTINEL:
            raise _fail(self.path, offset, f"no blob here (sentinel 0x{sentinel:08X}, expected 0xDEADBEEF)")
        dtype = DTYPE_NAMES.get(code)
        if dtype is None:
            raise _fail(self.path, offset, f"unknown blob data type code {code}")
        if data_offset < offset + METADATA_SIZE or data_offset > self.size:
            raise _fail(self.path, offset, f"data offset {data_offset} is outside the file or overlaps the metadata")
        if size > self.size - data_offset:
            raise _fail(self.path, offset, f"blob declares {size} bytes at {data_offset} but the file ends at "
                                           f"{self.size} (short by {size - (self.size - data_offset)} bytes)")
        return BlobInfo(offset=offset, dtype_code=code, dtype=dtype, size=size, data_offset=data_offset,
                        padding_bits=padding)

    def offsets(self) -> list[int]:
        """Metadata offsets of every blob, walking the file as its writer laid it out."""
        found: list[int] = []
        offset = HEADER_SIZE
        for _ in range(self.count):
            info = self.info(offset)
            found.append(offset)
            end = info.data_offset + info.size
            offset = end + (-end % ALIGNMENT)
        return found

    def __iter__(self) -> Iterator[BlobInfo]:
        for offset in self.offsets():
            yield self.info(offset)

    # -- data ---------------------------------------------------------------------

    def raw(self, offset: int) -> np.ndarray:
        """The blob's bytes as a uint8 view."""
        info = self.info(offset)
        return np.frombuffer(self._mm, dtype=np.uint8, count=info.size, offset=info.data_offset)

    def read(self, offset: int, dtype: str | None = None, shape: tuple[int, ...] | None = None) -> np.ndarray:
        """The blob as numpy: a zero-copy view for byte-aligned types, unpacked for sub-byte ones.

        `dtype` (a MIL name) must match the blob's; `shape` must hold exactly as many elements
        as the blob stores. Without `shape` a flat array is returned.
        """
        info = self.info(offset)
        if dtype is not None and dtype != info.dtype:
            raise _fail(self.path, offset, f"blob holds {info.dtype}, the program declares {dtype}")
        if shape is not None:
            count = 1
            for dim in shape:
                count *= int(dim)
            expected = packed_size(info.dtype, count)
            if expected != info.size:
                raise _fail(self.path, offset, f"{info.size} bytes of {info.dtype}, but shape {list(shape)} "
                                               f"needs {expected} bytes")
        else:
            count = info.count()
        bits = NBITS[info.dtype]
        if bits >= 8:
            array = np.frombuffer(self._mm, dtype=NUMPY_TYPES[info.dtype], count=count, offset=info.data_offset)
        else:
            packed = np.frombuffer(self._mm, dtype=np.uint8, count=info.size, offset=info.data_offset)
            array = unpack_bits(packed, bits, count, signed=info.dtype == "int4")
        return array.reshape(shape) if shape is not None else array

    def close(self) -> None:
        """Unmap; raises BufferError while numpy views into the file are alive."""
        self._mm.close()

    def __enter__(self) -> "BlobFile":
        return self

    def __exit__(self, *exc: object) -> None:
        try:
            self.close()
        except BufferError:  # views escaped; the map closes when they are gone
            pass


# -- sub-byte packing ---------------------------------------------------------------

_CHUNK = 1 << 22  # bytes unpacked per step, to bound temporaries on big palettized weights


def unpack_bits(packed: np.ndarray | bytes, bits: int, count: int, signed: bool = False) -> np.ndarray:
    """`count` elements of `bits` bits each from LSB-first packed bytes (uint8, or int8 when signed)."""
    packed = np.frombuffer(packed, np.uint8) if isinstance(packed, bytes) else np.asarray(packed, np.uint8).reshape(-1)
    if count * bits > packed.size * 8:
        raise BlobError(f"{count} elements of {bits} bits need more than the {packed.size} bytes given")
    out = np.empty(count, dtype=np.uint8)
    if 8 % bits == 0:
        per_byte = 8 // bits
        mask = (1 << bits) - 1
        step = _CHUNK
        for start in range(0, (count + per_byte - 1) // per_byte, step):
            chunk = packed[start:start + step]
            spread = np.empty((chunk.size, per_byte), dtype=np.uint8)
            for k in range(per_byte):
                spread[:, k] = (chunk >> (k * bits)) & mask
            flat = spread.reshape(-1)
            first = start * per_byte
            n = min(flat.size, count - first)
            out[first:first + n] = flat[:n]
    else:
        # n-bit values straddle bytes: a group of bytes holds a whole number of them
        # (3 bytes = 8 x 3-bit or 4 x 6-bit; 5 bytes = 8 x 5-bit), at most 7 bytes, one uint64 word
        group_bytes = bits * 8 // np.gcd(bits, 8) // 8
        per_group = group_bytes * 8 // bits
        mask = (1 << bits) - 1
        groups = (count + per_group - 1) // per_group
        step = max(1, _CHUNK // group_bytes)
        for g0 in range(0, groups, step):
            g1 = min(groups, g0 + step)
            chunk = packed[g0 * group_bytes:g1 * group_bytes]
            if chunk.size < (g1 - g0) * group_bytes:  # last group may be partial
                chunk = np.concatenate([chunk, np.zeros((g1 - g0) * group_bytes - chunk.size, np.uint8)])
            words = np.zeros(g1 - g0, dtype=np.uint64)
            for b in range(group_bytes):
                words |= chunk[b::group_bytes].astype(np.uint64) << np.uint64(8 * b)
            spread = np.empty((g1 - g0, per_group), dtype=np.uint8)
            for k in range(per_group):
                spread[:, k] = (words >> np.uint64(k * bits)) & np.uint64(mask)
            flat = spread.reshape(-1)
            first = g0 * per_group
            n = min(flat.size, count - first)
            out[first:first + n] = flat[:n]
    if signed:  # two's complement: the top bit of each value is its sign
        signed_out = out.view(np.int8)
        signed_out[out >= (1 << (bits - 1))] -= np.int8(1 << bits)
        return signed_out
    return out


def pack_bits(values: np.ndarray, bits: int) -> bytes:
    """LSB-first packing of integer values (two's complement for negatives) into bytes."""
    flat = np.asarray(values).reshape(-1).astype(np.int64) & ((1 << bits) - 1)
    nbytes = (flat.size * bits + 7) // 8
    out = np.zeros(nbytes + 1, dtype=np.uint16)  # one spare byte for values spilling over
    bit_pos = np.arange(flat.size, dtype=np.int64) * bits
    index, shift = bit_pos // 8, bit_pos % 8
    spread = flat.astype(np.uint16) << shift.astype(np.uint16)
    np.add.at(out, index, spread & 0xFF)
    np.add.at(out, index + 1, spread >> 8)
    return out[:nbytes].astype(np.uint8).tobytes()


# -- reading program constants ------------------------------------------------------

_cache: dict[tuple[str, int, int, int], BlobFile] = {}
_cache_lock = threading.Lock()


def open_blob_file(path: str | os.PathLike[str]) -> BlobFile:
    """A cached `BlobFile` per path; a file replaced on disk gets a fresh mapping."""
    resolved = os.path.realpath(path)
    try:
        st = os.stat(resolved)
    except (OSError, ValueError):
        return BlobFile(resolved)  # raises the typed error
    key = (resolved, st.st_ino, st.st_size, st.st_mtime_ns)
    with _cache_lock:
        cached = _cache.get(key)
        if cached is None:
            cached = BlobFile(resolved)
            for old in [k for k in _cache if k[0] == resolved]:
                del _cache[old]  # arrays still referencing the old map keep it alive
            _cache[key] = cached
        return cached


def resolve_blob_path(path: str, base_dir: str | os.PathLike[str] | None) -> Path:
    """`@model_path/weights/weight.bin` -> a file under `base_dir` (never outside it)."""
    prefix = "@model_path/"
    relative = path[len(prefix):] if path.startswith(prefix) else path
    if "\0" in path or not relative:
        raise BlobError(f"Weight path {path!r} is not a file name")
    if base_dir is None:
        raise BlobError(f"Cannot resolve {path!r}: the program was loaded without a model folder",
                        hint="Load the program from its bundle (`mil.text.load(path)`), not from a string.")
    parts = Path(relative).parts
    if Path(relative).is_absolute() or ".." in parts:
        raise BlobError(f"Weight path {path!r} points outside the model folder")
    return Path(base_dir) / relative


def read_blob_value(value: "TensorValue") -> np.ndarray:  # noqa: F821 - avoids an import cycle
    """The data of a file-backed constant, shaped as its declared type (a view over mmap)."""
    ref = value.data
    shape = value.type.static_shape
    if shape is None:
        raise BlobError(f"Constant at {ref.path} @ {ref.offset} has no static shape ({value.type.shape})")
    blob = open_blob_file(resolve_blob_path(ref.path, value.base_dir))
    return blob.read(ref.offset, dtype=value.type.dtype, shape=shape)


# -- writing ------------------------------------------------------------------------


class BlobWriter:
    """Writes a weight file blob by blob; `add` returns the offset a BLOBFILE reference names.

    Written to `<path>.tmp` and renamed into place by `close()` (or leaving the `with` block),
    so a failed write never leaves a half file at `path`.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self._tmp = self.path.with_name(self.path.name + ".tmp")
        self._fh = open(self._tmp, "wb")
        self._count = 0
        self._fh.write(_HEADER.pack(0, VERSION) + bytes(HEADER_SIZE - _HEADER.size))

    def add(self, array: np.ndarray, dtype: str | None = None) -> int:
        """Append one blob. `dtype` is the MIL name; by default it follows the array's numpy type."""
        array = np.asarray(array)
        if dtype is None:
            dtype = _default_dtype(array.dtype)
        if dtype not in DTYPE_CODES:
            raise ValueError(f"cannot store dtype {dtype!r} in a weight file")
        bits = NBITS[dtype]
        count = array.size
        if bits < 8:
            low, high = integer_range(dtype)
            if count and (array.min() < low or array.max() > high):
                raise ValueError(f"values out of range for {dtype} [{low}, {high}]")
            payload = pack_bits(array, bits)
            padding = (-count * bits) % 8
        else:
            payload = np.ascontiguousarray(array, dtype=NUMPY_TYPES[dtype]).tobytes()
            padding = 0
        return self._append(DTYPE_CODES[dtype], payload, padding)

    def copy(self, source: BlobFile, offset: int) -> int:
        """Append the blob at `offset` of `source` byte for byte (dtype and padding field kept)."""
        info = source.info(offset)
        return self._append(info.dtype_code, source.raw(offset), info.padding_bits)

    def _append(self, code: int, payload: bytes | np.ndarray, padding: int) -> int:
        position = self._fh.tell()
        position += -position % ALIGNMENT
        self._fh.seek(position)
        data_offset = position + METADATA_SIZE
        self._fh.write(_METADATA.pack(SENTINEL, code, len(payload), data_offset, padding)
                       + bytes(METADATA_SIZE - _METADATA.size))
        self._fh.write(payload)
        self._count += 1
        return position

    def close(self) -> Path:
        if self._fh.closed:
            return self.path
        self._fh.seek(0)
        self._fh.write(_HEADER.pack(self._count, VERSION))
        self._fh.close()
        os.replace(self._tmp, self.path)
        return self.path

    def abort(self) -> None:
        if not self._fh.closed:
            self._fh.close()
        self._tmp.unlink(missing_ok=True)

    def __enter__(self) -> "BlobWriter":
        return self

    def __exit__(self, exc_type: object, *rest: object) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


def _default_dtype(np_dtype: np.dtype) -> str:
    mapping = {
        np.dtype(np.float16): "fp16", np.dtype(np.float32): "fp32", np.dtype(np.uint8): "uint8",
        np.dtype(np.int8): "int8", np.dtype(np.int16): "int16", np.dtype(np.uint16): "uint16",
        np.dtype(np.int32): "int32", np.dtype(np.uint32): "uint32",
    }
    try:
        return mapping[np.dtype(np_dtype)]
    except KeyError:
        raise ValueError(f"no weight-file dtype for numpy {np_dtype}; pass dtype=") from None
