"""Weight decompression ops, evaluated once at load time over numpy arrays.

Both generations are handled: iOS16 (`shape` given, indices and masks packed into
uint8 bytes, least significant bit first) and iOS18 (typed sub-byte tensors that
already carry their shape, block-wise LUTs and scales).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ..blob import unpack_bits
from . import along_axis, constexpr


@constexpr("constexpr_affine_dequantize")
def affine_dequantize(quantized_data: np.ndarray, zero_point: np.ndarray, scale: np.ndarray, axis: int) -> np.ndarray:
    rank = quantized_data.ndim
    scale = np.asarray(scale)
    data = quantized_data.astype(np.float32) - along_axis(np.asarray(zero_point), axis, rank).astype(np.float32)
    return (data * along_axis(scale, axis, rank).astype(np.float32)).astype(scale.dtype)


@constexpr("constexpr_cast")
def cast(source_val: np.ndarray, output_dtype: str) -> np.ndarray:
    return source_val.astype({"fp32": np.float32, "fp16": np.float16}[output_dtype])


def _repeat_blocks(values: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """Repeat per-block values (one per block along each axis) up to `shape`."""
    for axis, (have, want) in enumerate(zip(values.shape, shape)):
        if have != want:
            values = np.repeat(values, want // have, axis=axis)
    return values


def _lut_lookup(indices: np.ndarray, lut: np.ndarray, vector_axis: int | None) -> np.ndarray:
    """iOS18 LUT: lut is [*groups, palettes, vector]; each group covers a block of indices."""
    rank = indices.ndim
    vector = lut.shape[-1]
    if vector > 1:
        axis = (vector_axis if vector_axis is not None else 0) % rank
        indices = np.swapaxes(indices, -1, axis)
        lut = np.swapaxes(lut, rank - 1, axis)
    palettes = lut.shape[-2]
    groups = lut.shape[:rank]
    # the group each index belongs to, as a flat number
    group_id = np.zeros(indices.shape, dtype=np.int64)
    for dim, (size, count) in enumerate(zip(indices.shape, groups)):
        block = size // count
        shape = [1] * rank
        shape[dim] = size
        group_id = group_id * count + (np.arange(size) // block).reshape(shape)
    table = lut.reshape(-1, palettes, vector)
    out = table[group_id, indices.astype(np.int64)]  # indices.shape + (vector,)
    if vector > 1:
        out = out.reshape(indices.shape[:-1] + (indices.shape[-1] * vector,))
        out = np.swapaxes(out, -1, axis)
    else:
        out = out[..., 0]
    return out


@constexpr("constexpr_lut_to_dense")
def lut_to_dense(
    indices: np.ndarray, lut: np.ndarray, shape: Any = None, vector_axis: int | None = None
) -> np.ndarray:
    if shape is not None:  # iOS16: packed indices into a flat palette
        shape = tuple(int(s) for s in np.asarray(shape).reshape(-1))
        count = int(np.prod(shape))
        nbits = int(np.log2(lut.size))
        flat = unpack_bits(indices, nbits, count)
        return lut.reshape(-1)[flat.astype(np.int64)].reshape(shape)
    return _lut_lookup(indices, lut, vector_axis)


@constexpr("constexpr_sparse_to_dense")
def sparse_to_dense(nonzero_data: np.ndarray, mask: np.ndarray, shape: Any = None) -> np.ndarray:
    if shape is not None:  # iOS16: a packed bit mask over the flattened shape
        shape = tuple(int(s) for s in np.asarray(shape).reshape(-1))
        count = int(np.prod(shape))
        mask = unpack_bits(mask, 1, count).reshape(shape)
    out = np.zeros(mask.shape, dtype=nonzero_data.dtype)
    out[mask != 0] = nonzero_data
    return out


def _shift_scale(data: np.ndarray, scale: np.ndarray, offset: np.ndarray | None) -> np.ndarray:
    values = data.astype(np.float32)
    if offset is not None:
        values = values - _repeat_blocks(np.asarray(offset).astype(np.float32), data.shape)
    return (values * _repeat_blocks(scale.astype(np.float32), data.shape)).astype(scale.dtype)


@constexpr("constexpr_blockwise_shift_scale")
def blockwise_shift_scale(data: np.ndarray, scale: np.ndarray, offset: np.ndarray | None = None) -> np.ndarray:
    return _shift_scale(data, scale, offset)


@constexpr("constexpr_lut_to_sparse")
def lut_to_sparse(
    indices_mask: np.ndarray, indices_nonzero_data: np.ndarray, lut: np.ndarray, vector_axis: int | None = None
) -> tuple[np.ndarray, np.ndarray]:
    indices = sparse_to_dense(indices_nonzero_data, indices_mask)
    dense = _lut_lookup(indices, lut, vector_axis)
    mask = indices_mask
    if lut.shape[-1] > 1:
        mask = np.repeat(mask, lut.shape[-1], axis=(vector_axis if vector_axis is not None else 0))
    return mask, dense[mask != 0].reshape(-1)


@constexpr("constexpr_sparse_blockwise_shift_scale")
def sparse_blockwise_shift_scale(
    data_mask: np.ndarray, nonzero_data: np.ndarray, scale: np.ndarray, offset: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    dense = sparse_to_dense(nonzero_data, data_mask)
    values = _shift_scale(dense, scale, offset)
    return data_mask, values[data_mask != 0].reshape(-1)
