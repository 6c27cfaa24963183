"""Shape and data-movement ops: reshape, slicing, concatenation, gather/scatter, reductions."""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F

from . import Context, kernel, pad_pairs, torch_pad

# -- shapes --------------------------------------------------------------------------


def reshape_target(shape_in: tuple[int, ...], shape: list[int]) -> list[int]:
    """MIL reshape shape: 0 copies the input dimension (when the ranks match), -1 is inferred."""
    if 0 in shape and len(shape) == len(shape_in):
        return [shape_in[i] if s == 0 else s for i, s in enumerate(shape)]
    return list(shape)


@kernel("reshape")
def reshape(x: torch.Tensor, shape: list[int]) -> torch.Tensor:
    return x.reshape(reshape_target(tuple(x.shape), shape))


@kernel("reshape_like", tensors=("x", "ref_tensors"))
def reshape_like(
    x: torch.Tensor, ref_tensors: tuple[torch.Tensor, ...], begins: list[int], ends: list[int], end_masks: list[bool]
) -> torch.Tensor:
    shape: list[int] = []
    for ref, b, e, m in zip(ref_tensors, begins, ends, end_masks):
        dims = list(ref.shape)
        shape += dims[b:] if m else dims[b:e]
    return x.reshape(shape)


@kernel("expand_dims")
def expand_dims(x: torch.Tensor, axes: list[int]) -> torch.Tensor:
    rank = x.dim() + len(axes)
    shape = list(x.shape)
    for axis in sorted(a + rank if a < 0 else a for a in axes):
        shape.insert(axis, 1)
    return x.reshape(shape)


@kernel("squeeze")
def squeeze(x: torch.Tensor, axes: list[int] | None = None) -> torch.Tensor:
    if axes is None:
        return x.squeeze()
    return x.squeeze(tuple(axes))


@kernel("transpose")
def transpose(x: torch.Tensor, perm: list[int]) -> torch.Tensor:
    return x.permute(perm)


@kernel("flatten2d")
def flatten2d(x: torch.Tensor, axis: int = 1) -> torch.Tensor:
    # axis lies in [-rank, rank]: axis == rank flattens everything into the first dimension
    axis = axis + x.dim() if axis < 0 else axis
    return x.reshape(math.prod(x.shape[:axis]), math.prod(x.shape[axis:]))


@kernel("shape")
def shape(ctx: Context, x: torch.Tensor) -> torch.Tensor:
    return torch.tensor(list(x.shape), dtype=torch.int32, device=ctx.device)


@kernel("reverse")
def reverse(x: torch.Tensor, axes: list[int] | None = None) -> torch.Tensor:
    return x.flip(list(range(x.dim())) if axes is None else axes)


@kernel("reverse_sequence", tensors=("x", "lengths"))
def reverse_sequence(x: torch.Tensor, lengths: torch.Tensor, seq_axis: int = 0, batch_axis: int = 0) -> torch.Tensor:
    rank = x.dim()
    seq_axis, batch_axis = seq_axis % rank, batch_axis % rank
    n = x.shape[seq_axis]
    pos = torch.arange(n, device=x.device).reshape(1, n)
    lens = lengths.to(torch.int64).reshape(-1, 1)
    index = torch.where(pos < lens, lens - 1 - pos, pos)  # [batch, seq]
    shape = [1] * rank
    shape[batch_axis], shape[seq_axis] = index.shape[0], n
    if batch_axis > seq_axis:
        index = index.t()
        shape[seq_axis], shape[batch_axis] = n, lengths.shape[0]
    index = index.reshape(shape).expand(x.shape)
    return torch.gather(x, seq_axis, index)


@kernel("depth_to_space")
def depth_to_space(x: torch.Tensor, block_size: int) -> torch.Tensor:
    n, c, h, w = x.shape
    b = block_size
    return x.reshape(n, b, b, c // (b * b), h, w).permute(0, 3, 4, 1, 5, 2).reshape(n, c // (b * b), h * b, w * b)


@kernel("space_to_depth")
def space_to_depth(x: torch.Tensor, block_size: int) -> torch.Tensor:
    n, c, h, w = x.shape
    b = block_size
    return x.reshape(n, c, h // b, b, w // b, b).permute(0, 3, 5, 1, 2, 4).reshape(n, c * b * b, h // b, w // b)


@kernel("space_to_batch")
def space_to_batch(x: torch.Tensor, block_shape: list[int], paddings: list[list[int]]) -> torch.Tensor:
    """Pad H and W, then move each (block row, block column) offset into its own batch group."""
    (top, bottom), (left, right) = paddings
    b0, b1 = block_shape
    x = F.pad(x, [left, right, top, bottom])
    n, c, h, w = x.shape
    x = x.reshape(n, c, h // b0, b0, w // b1, b1).permute(3, 5, 0, 1, 2, 4)
    return x.reshape(b0 * b1 * n, c, h // b0, w // b1)


@kernel("batch_to_space")
def batch_to_space(x: torch.Tensor, block_shape: list[int], crops: list[list[int]]) -> torch.Tensor:
    """The inverse of space_to_batch: batch groups back into H and W, then crop."""
    (top, bottom), (left, right) = crops
    b0, b1 = block_shape
    nb, c, h, w = x.shape
    n = nb // (b0 * b1)
    x = x.reshape(b0, b1, n, c, h, w).permute(2, 3, 4, 0, 5, 1).reshape(n, c, h * b0, w * b1)
    return x[:, :, top : h * b0 - bottom, left : w * b1 - right]


@kernel("pixel_shuffle")
def pixel_shuffle(x: torch.Tensor, upscale_factor: int) -> torch.Tensor:
    return F.pixel_shuffle(x, upscale_factor)


@kernel("pixel_unshuffle")
def pixel_unshuffle(x: torch.Tensor, downscale_factor: int) -> torch.Tensor:
    return F.pixel_unshuffle(x, downscale_factor)


@kernel("sliding_windows")
def sliding_windows(x: torch.Tensor, axis: int, size: int, stride: int = 1) -> torch.Tensor:
    axis = axis % x.dim()
    return x.unfold(axis, size, stride).movedim(-1, axis + 1)


@kernel("tile")
def tile(x: torch.Tensor, reps: list[int]) -> torch.Tensor:
    return x.repeat(reps)


# -- slicing -------------------------------------------------------------------------


@kernel("slice_by_index")
def slice_by_index(
    x: torch.Tensor,
    begin: list[int],
    end: list[int],
    stride: list[int] | None = None,
    begin_mask: list[bool] | None = None,
    end_mask: list[bool] | None = None,
    squeeze_mask: list[bool] | None = None,
) -> torch.Tensor:
    index: list[Any] = []
    for i in range(x.dim()):
        n = x.shape[i]
        masked_begin = bool(begin_mask and begin_mask[i])
        if squeeze_mask and squeeze_mask[i]:
            # a pure index: Python's slice(begin, None, huge) keeps exactly one element
            start = 0 if masked_begin else begin[i]
            index.append(start + n if start < 0 else start)
            continue
        b = None if masked_begin else begin[i]
        e = None if end_mask and end_mask[i] else end[i]
        step = stride[i] if stride else 1
        start, stop, step = slice(b, e, step).indices(n)
        if step > 0:
            index.append(slice(start, max(start, stop), step))
        else:
            count = len(range(start, stop, step))
            x = x.flip(i)
            first = n - 1 - start
            index.append(slice(first, first + count * (-step) if count else first, -step))
    return x[tuple(index)]


@kernel("slice_by_size")
def slice_by_size(x: torch.Tensor, begin: list[int], size: list[int]) -> torch.Tensor:
    index = []
    for i, (b, s) in enumerate(zip(begin, size)):
        b = b + x.shape[i] if b < 0 else b
        index.append(slice(b, None) if s < 0 else slice(b, b + s))
    return x[tuple(index)]


@kernel("slice_update", tensors=("x", "update"))
def slice_update(
    x: torch.Tensor,
    update: torch.Tensor,
    begin: list[int],
    end: list[int],
    stride: list[int] | None = None,
    begin_mask: list[bool] | None = None,
    end_mask: list[bool] | None = None,
    squeeze_mask: list[bool] | None = None,
) -> torch.Tensor:
    out = x.clone()
    view = slice_by_index(out, begin, end, stride, begin_mask, end_mask, squeeze_mask)
    # a view into `out` (not into a flipped copy); compared by storage, as inference mode keeps no `_base`
    if view.untyped_storage().data_ptr() == out.untyped_storage().data_ptr():
        view.copy_(update.reshape(view.shape))
        return out
    # negative strides slice a flipped copy; write through explicit indices instead
    flat_index = torch.arange(out.numel(), device=out.device).reshape(out.shape)
    target = slice_by_index(flat_index, begin, end, stride, begin_mask, end_mask, squeeze_mask)
    out.view(-1)[target.reshape(-1)] = update.reshape(-1).to(out.dtype)
    return out


# -- joining and splitting -----------------------------------------------------------


@kernel("concat", tensors=("values",))
def concat(values: tuple[torch.Tensor, ...], axis: int, interleave: bool = False) -> torch.Tensor:
    if values[0].dim() == 0:
        return torch.stack(values, 0)
    if len(values) == 1:
        return values[0]
    if not interleave:
        return torch.cat(values, axis)
    axis = axis % values[0].dim()
    stacked = torch.stack(values, axis + 1)
    shape = list(values[0].shape)
    shape[axis] *= len(values)
    return stacked.reshape(shape)


@kernel("stack", tensors=("values",))
def stack(values: tuple[torch.Tensor, ...], axis: int) -> torch.Tensor:
    return torch.stack(values, axis)


@kernel("split")
def split(
    x: torch.Tensor, axis: int, num_splits: int | None = None, split_sizes: list[int] | None = None
) -> tuple[torch.Tensor, ...]:
    if split_sizes is not None:
        return tuple(torch.split(x, list(split_sizes), axis))
    assert num_splits is not None, "split needs num_splits or split_sizes"
    return tuple(torch.split(x, x.shape[axis] // num_splits, axis))


# -- gather and scatter --------------------------------------------------------------


def _merge_batch(x: torch.Tensor, indices: torch.Tensor, batch_dims: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`x` and `indices` with their leading `batch_dims` dimensions merged into one."""
    p = math.prod(x.shape[:batch_dims])
    return x.reshape((p,) + x.shape[batch_dims:]), indices.reshape((p,) + indices.shape[batch_dims:])


def _positive(indices: torch.Tensor, size: int) -> torch.Tensor:
    indices = indices.to(torch.int64)
    return torch.where(indices < 0, indices + size, indices)


def _indices(op: str, indices: torch.Tensor, size: int, validate: bool, opset: int) -> torch.Tensor:
    """Indices along an axis of `size`, negative ones counted from the end where that is defined.

    Before iOS17 an index may count from the end (-size <= i < size); from iOS17 on only
    0 <= i < size is in bounds. With `validate_indices` an out-of-bound index is an error;
    without it the op definitions leave the result undefined: gathers still count negative
    indices from the end (as coremltools' constant folding does), and from iOS17 on a scatter
    drops the updates of negative indices (Core ML does not apply them at the end either).
    """
    idx = indices.to(torch.int64)
    low = 0 if opset >= 17 else -size
    if validate and idx.numel() and bool(((idx < low) | (idx >= size)).any()):
        bad = idx[(idx < low) | (idx >= size)].reshape(-1)[0].item()
        raise IndexError(f"{op}: index {bad} is out of bounds for an axis of size {size}")
    if opset >= 17 and op.startswith("scatter"):
        return idx
    return torch.where(idx < 0, idx + size, idx)


def _in_bounds(idx: torch.Tensor, size: int) -> torch.Tensor:
    """Unvalidated indices kept inside the axis: the result is undefined, reading memory is not."""
    return idx.clamp(0, max(size - 1, 0))


@kernel("gather", tensors=("x", "indices"))
def gather(
    opset: int, x: torch.Tensor, indices: torch.Tensor, axis: int = 0, batch_dims: int = 0,
    validate_indices: bool = False,
) -> torch.Tensor:
    axis = axis % x.dim()
    idx = _in_bounds(_indices("gather", indices, x.shape[axis], validate_indices, opset), x.shape[axis])
    if batch_dims == 0:
        out = x.index_select(axis, idx.reshape(-1))
        return out.reshape(x.shape[:axis] + idx.shape + x.shape[axis + 1 :])
    # batched: x [B..., pre..., D, rest...], indices [B..., N...]
    batch = x.shape[:batch_dims]
    xb, ib = _merge_batch(x, idx, batch_dims)
    p = xb.shape[0]
    a = axis - batch_dims  # axis inside one batch element
    moved = xb.movedim(a + 1, 1)  # [P, D, pre..., rest...]
    rows = torch.arange(p, device=x.device).reshape((p,) + (1,) * (ib.dim() - 1))
    picked = moved[rows, ib]  # [P, N..., pre..., rest...]
    n_dims = ib.dim() - 1
    order = [0] + list(range(1 + n_dims, 1 + n_dims + a)) + list(range(1, 1 + n_dims))
    order += list(range(1 + n_dims + a, picked.dim()))
    picked = picked.permute(order)
    return picked.reshape(batch + picked.shape[1:])


@kernel("gather_along_axis", tensors=("x", "indices"))
def gather_along_axis(
    opset: int, x: torch.Tensor, indices: torch.Tensor, axis: int = 0, validate_indices: bool = False
) -> torch.Tensor:
    axis = axis % x.dim()
    idx = _indices("gather_along_axis", indices, x.shape[axis], validate_indices, opset)
    return torch.gather(x, axis, _in_bounds(idx, x.shape[axis]))


def _nd_indices(op: str, indices: torch.Tensor, shape: tuple[int, ...], validate: bool, opset: int) -> torch.Tensor:
    """gather_nd / scatter_nd index tuples [..., k], each coordinate resolved by `_indices`."""
    coords = [_indices(op, indices[..., i], shape[i], validate, opset) for i in range(indices.shape[-1])]
    return torch.stack(coords, -1) if coords else indices.to(torch.int64)


@kernel("gather_nd", tensors=("x", "indices"))
def gather_nd(
    opset: int, x: torch.Tensor, indices: torch.Tensor, batch_dims: int = 0, validate_indices: bool = False
) -> torch.Tensor:
    shape = tuple(x.shape[batch_dims:])
    idx = _nd_indices("gather_nd", indices, shape, validate_indices, opset)
    k = idx.shape[-1]
    idx = torch.stack([_in_bounds(idx[..., i], shape[i]) for i in range(k)], -1) if k else idx
    if batch_dims == 0:
        return x[tuple(idx[..., i] for i in range(k))]
    batch = x.shape[:batch_dims]
    xb, ib = _merge_batch(x, idx, batch_dims)
    p = xb.shape[0]
    rows = torch.arange(p, device=x.device).reshape((p,) + (1,) * (ib.dim() - 2))
    out = xb[(rows,) + tuple(ib[..., i] for i in range(k))]
    return out.reshape(batch + out.shape[1:])


_REDUCE = {"add": "sum", "sub": "sum", "mul": "prod", "div": "prod", "max": "amax", "min": "amin"}


def _updates_for(mode: str, updates: torch.Tensor) -> torch.Tensor:
    if mode == "sub":
        return -updates
    if mode == "div":
        return torch.reciprocal(updates)
    return updates


def _scatter_rows(out: torch.Tensor, idx: torch.Tensor, upd: torch.Tensor, mode: str) -> torch.Tensor:
    """Scatter rows of `upd` into rows `idx` of `out` (in place); out-of-range rows are dropped."""
    keep = (idx >= 0) & (idx < out.shape[0])
    if not bool(keep.all()):  # undefined without validation; memory stays safe
        idx, upd = idx[keep], upd[keep]
    if mode == "update":
        out[idx] = upd
    elif mode in ("add", "sub"):
        out.index_add_(0, idx, _updates_for(mode, upd))
    else:
        index = idx.reshape((-1,) + (1,) * (upd.dim() - 1)).expand(upd.shape)
        out.scatter_reduce_(0, index, _updates_for(mode, upd), _REDUCE[mode], include_self=True)
    return out


@kernel("scatter", tensors=("data", "indices", "updates"))
def scatter(
    opset: int,
    data: torch.Tensor,
    indices: torch.Tensor,
    updates: torch.Tensor,
    axis: int = 0,
    mode: str = "add",
    validate_indices: bool = False,
) -> torch.Tensor:
    axis = axis % data.dim()
    idx = _indices("scatter", indices, data.shape[axis], validate_indices, opset).reshape(-1)
    out = data.movedim(axis, 0).clone()
    _scatter_rows(out, idx, updates.movedim(axis, 0).to(out.dtype), mode)
    return out.movedim(0, axis)


@kernel("scatter_along_axis", tensors=("data", "indices", "updates"))
def scatter_along_axis(
    opset: int,
    data: torch.Tensor,
    indices: torch.Tensor,
    updates: torch.Tensor,
    axis: int = 0,
    mode: str = "add",
    validate_indices: bool = False,
) -> torch.Tensor:
    axis = axis % data.dim()
    idx = _in_bounds(_indices("scatter_along_axis", indices, data.shape[axis], validate_indices, opset),
                     data.shape[axis])
    upd = updates.to(data.dtype)
    if mode == "update":
        return data.scatter(axis, idx, upd)
    return data.scatter_reduce(axis, idx, _updates_for(mode, upd), _REDUCE[mode], include_self=True)


@kernel("scatter_nd", tensors=("data", "indices", "updates"))
def scatter_nd(
    opset: int, data: torch.Tensor, indices: torch.Tensor, updates: torch.Tensor, mode: str = "add",
    validate_indices: bool = False,
) -> torch.Tensor:
    k = indices.shape[-1]
    lead = data.shape[:k]
    idx = _nd_indices("scatter_nd", indices, tuple(lead), validate_indices, opset).reshape(-1, k)
    linear = torch.zeros(idx.shape[0], dtype=torch.int64, device=data.device)
    outside = torch.zeros(idx.shape[0], dtype=torch.bool, device=data.device)
    for i in range(k):
        linear = linear * lead[i] + idx[:, i]
        outside |= (idx[:, i] < 0) | (idx[:, i] >= lead[i])
    linear = torch.where(outside, -1, linear)  # dropped by _scatter_rows
    out = data.reshape((-1,) + data.shape[k:]).clone()
    _scatter_rows(out, linear, updates.reshape((-1,) + data.shape[k:]).to(out.dtype), mode)
    return out.reshape(data.shape)


# -- construction --------------------------------------------------------------------


@kernel("fill")
def fill(ctx: Context, out_dtype: torch.dtype, shape: list[int], value: Any = 0.0) -> torch.Tensor:
    return torch.full(list(shape), value, dtype=out_dtype, device=ctx.device)


@kernel("fill_like", tensors=("ref_tensor",))
def fill_like(out_dtype: torch.dtype, ref_tensor: torch.Tensor, value: Any = 0.0) -> torch.Tensor:
    return torch.full(ref_tensor.shape, value, dtype=out_dtype, device=ref_tensor.device)


@kernel("range_1d")
def range_1d(ctx: Context, out_dtype: torch.dtype, start: Any, end: Any, step: Any) -> torch.Tensor:
    return torch.arange(start, end, step, dtype=out_dtype, device=ctx.device)


@kernel("one_hot", tensors=("indices",))
def one_hot(
    out_dtype: torch.dtype,
    indices: torch.Tensor,
    one_hot_vector_size: int,
    axis: int = -1,
    on_value: Any = 1,
    off_value: Any = 0,
) -> torch.Tensor:
    hot = F.one_hot(indices.to(torch.int64), int(one_hot_vector_size)).to(torch.bool)
    rank = hot.dim()
    hot = hot.movedim(-1, axis % rank)
    on = torch.tensor(on_value, dtype=out_dtype, device=indices.device)
    off = torch.tensor(off_value, dtype=out_dtype, device=indices.device)
    return torch.where(hot, on, off)


@kernel("band_part")
def band_part(x: torch.Tensor, lower: int = -1, upper: int = -1) -> torch.Tensor:
    m, n = x.shape[-2:]
    rows = torch.arange(m, device=x.device).reshape(m, 1)
    cols = torch.arange(n, device=x.device).reshape(1, n)
    keep = torch.ones(m, n, dtype=torch.bool, device=x.device)
    if lower >= 0:
        keep &= (rows - cols) <= lower
    if upper >= 0:
        keep &= (cols - rows) <= upper
    return torch.where(keep, x, torch.zeros_like(x))


@kernel("cumsum")
def cumsum(x: torch.Tensor, axis: int = 0, exclusive: bool = False, reverse: bool = False) -> torch.Tensor:
    if reverse:
        x = x.flip(axis)
    out = torch.cumsum(x, axis).to(x.dtype)
    if exclusive:
        out = out - x
    return out.flip(axis) if reverse else out


@kernel("non_zero")
def non_zero(x: torch.Tensor) -> torch.Tensor:
    return torch.nonzero(x).to(torch.int32)


@kernel("argsort")
def argsort(x: torch.Tensor, axis: int = -1, ascending: bool = False) -> torch.Tensor:
    return torch.argsort(x, dim=axis, descending=not ascending, stable=True).to(torch.int32)


@kernel("topk")
def topk(
    x: torch.Tensor,
    k: int = 1,
    axis: int = -1,
    ascending: bool = False,
    sort: bool = True,
    return_indices: bool = True,
    output_indices_dtype: str = "int32",  # iOS17: int32 or uint16; both run as int32
) -> Any:
    order = torch.argsort(x, dim=axis, descending=not ascending, stable=True).narrow(axis % x.dim(), 0, k)
    values = torch.gather(x, axis, order)
    if not return_indices:
        return values
    return values, order.to(torch.int32)


@kernel("non_maximum_suppression", tensors=("boxes", "scores"))
def non_maximum_suppression(
    boxes: torch.Tensor,
    scores: torch.Tensor,
    iou_threshold: float,
    max_boxes: int,
    score_threshold: float | None = None,
    per_class_suppression: bool = False,
) -> tuple[torch.Tensor, ...]:
    """Greedy NMS per batch over (x, y, w, h) center boxes, a box's score being its best class score.

    iOS15 form (with `score_threshold`): boxes [n, B, 4], scores [n, B, K] -> boxes [n, M, 4],
    scores [n, M, K], indices [n, M], counts [n]. iOS17 form: boxes [n, 4, B], scores [n, K, B]
    -> [n, 4, M], [n, K, M], [n, M]. Unused rows are zeros with index -1; at least one box is
    kept (the best) when every box falls below the score threshold.
    """
    ios15 = score_threshold is not None
    if not ios15:
        boxes, scores = boxes.transpose(1, 2), scores.transpose(1, 2)
    n, count, classes = scores.shape
    m = int(max_boxes)
    out_boxes = boxes.new_zeros((n, m, 4))
    out_scores = scores.new_zeros((n, m, classes))
    out_index = torch.full((n, m), -1, dtype=torch.int32, device=boxes.device)
    out_count = torch.zeros(n, dtype=torch.int32, device=boxes.device)
    threshold = float("-inf") if score_threshold is None else float(score_threshold)
    for b in range(n):
        best, label = scores[b].max(-1)
        keep = _nms_keep(boxes[b].double(), best.double(), label if per_class_suppression else None,
                         float(iou_threshold), threshold)
        if not keep:
            keep = [int(best.argmax())]
        keep = keep[:m]
        index = torch.tensor(keep, dtype=torch.int64, device=boxes.device)
        out_boxes[b, : len(keep)] = boxes[b].index_select(0, index)
        out_scores[b, : len(keep)] = scores[b].index_select(0, index)
        out_index[b, : len(keep)] = index.to(torch.int32)
        out_count[b] = len(keep)
    if ios15:
        return out_boxes, out_scores, out_index, out_count
    return out_boxes.transpose(1, 2), out_scores.transpose(1, 2), out_index


def _nms_keep(boxes: torch.Tensor, score: torch.Tensor, label: torch.Tensor | None, iou_threshold: float,
              score_threshold: float) -> list[int]:
    """Indices kept, best score first; a box is dropped when its IoU with a kept box exceeds the threshold
    (only boxes of the same class compete when `label` is given)."""
    cx, cy, w, h = boxes.unbind(-1)
    x0, x1, y0, y1 = cx - w / 2, cx + w / 2, cy - h / 2, cy + h / 2
    area = (x1 - x0).clamp(min=0) * (y1 - y0).clamp(min=0)
    order = sorted(range(len(score)), key=lambda i: (-float(score[i]), i))
    kept: list[int] = []
    for i in order:
        if not float(score[i]) > score_threshold:
            continue
        suppressed = False
        for j in kept:
            if label is not None and int(label[i]) != int(label[j]):
                continue
            iw = (torch.minimum(x1[i], x1[j]) - torch.maximum(x0[i], x0[j])).clamp(min=0)
            ih = (torch.minimum(y1[i], y1[j]) - torch.maximum(y0[i], y0[j])).clamp(min=0)
            inter = float(iw * ih)
            union = float(area[i] + area[j]) - inter
            if union > 0 and inter / union > iou_threshold:
                suppressed = True
                break
        if not suppressed:
            kept.append(i)
    return kept


# -- reductions ----------------------------------------------------------------------


def _dims(x: torch.Tensor, axes: list[int] | None) -> tuple[int, ...]:
    return tuple(range(x.dim())) if axes is None else tuple(axes)


def _reduction(fn: Any) -> Any:
    def run(x: torch.Tensor, axes: list[int] | None = None, keep_dims: bool = False) -> torch.Tensor:
        if x.dim() == 0:
            return fn(x.reshape(1), (0,), False)
        dims = _dims(x, axes)
        if not dims:
            return x
        return fn(x, dims, keep_dims)

    return run


def _mean(x: torch.Tensor, dims: tuple[int, ...], keep: bool) -> torch.Tensor:
    if x.is_floating_point():
        return torch.mean(x, dims, keep)
    return torch.mean(x.double(), dims, keep).trunc().to(x.dtype)


def _prod(x: torch.Tensor, dims: tuple[int, ...], keep: bool) -> torch.Tensor:
    for d in sorted((d % x.dim() for d in dims), reverse=True):
        x = torch.prod(x, d, keepdim=keep)
    return x


_REDUCTIONS = {
    "reduce_sum": lambda x, d, k: torch.sum(x, d, k, dtype=x.dtype),
    "reduce_mean": _mean,
    "reduce_max": lambda x, d, k: torch.amax(x, d, k),
    "reduce_min": lambda x, d, k: torch.amin(x, d, k),
    "reduce_prod": _prod,
    "reduce_l1_norm": lambda x, d, k: torch.sum(torch.abs(x), d, k, dtype=x.dtype),
    "reduce_l2_norm": lambda x, d, k: torch.sqrt(torch.sum(x * x, d, k)),
    "reduce_sum_square": lambda x, d, k: torch.sum(x * x, d, k, dtype=x.dtype),
    "reduce_log_sum": lambda x, d, k: torch.log(torch.sum(x, d, k)),
    "reduce_log_sum_exp": lambda x, d, k: torch.logsumexp(x, d, k),
}

for _name, _fn in _REDUCTIONS.items():
    kernel(_name)(_reduction(_fn))


def _arg_reduction(fn: Any) -> Any:
    def run(x: torch.Tensor, axis: int = -1, keep_dims: bool = False, output_dtype: str = "int32") -> torch.Tensor:
        return fn(x, dim=axis, keepdim=keep_dims).to(torch.int32)

    return run


kernel("reduce_argmax")(_arg_reduction(torch.argmax))
kernel("reduce_argmin")(_arg_reduction(torch.argmin))


# -- padding -------------------------------------------------------------------------


def _edge_index(n: int, before: int, after: int, mode: str) -> list[int]:
    out = []
    for i in range(-before, n + after):
        if mode == "replicate":
            out.append(min(max(i, 0), n - 1))
        else:  # reflect, without repeating the edge
            j = i
            period = 2 * (n - 1) if n > 1 else 1
            j = j % period if period else 0
            out.append(j if j < n else period - j)
    return out


@kernel("pad")
def pad(x: torch.Tensor, pad: list[int], mode: str = "constant", constant_val: float = 0.0) -> torch.Tensor:
    pairs = pad_pairs(pad)
    first = x.dim() - len(pairs)
    if mode == "constant":
        return F.pad(x, torch_pad(pairs), value=constant_val)
    out = x
    for j, (before, after) in enumerate(pairs):
        if before == 0 and after == 0:
            continue
        dim = first + j
        index = _edge_index(out.shape[dim], before, after, mode)
        out = out.index_select(dim, torch.tensor(index, device=x.device))
    return out
