"""Network ops: convolution, linear algebra, normalization, pooling, resizing, attention."""

from __future__ import annotations

import math
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from . import along_axis, kernel, pad_pairs, torch_pad

# -- padding -------------------------------------------------------------------------


def spatial_pads(
    pad_type: str,
    pad: Sequence[int] | None,
    sizes: Sequence[int],
    kernel_sizes: Sequence[int],
    strides: Sequence[int],
    dilations: Sequence[int],
) -> list[tuple[int, int]]:
    """(before, after) padding per spatial dimension for MIL's pad types."""
    n = len(kernel_sizes)
    pad_type = pad_type.lower()
    if pad_type == "valid":
        return [(0, 0)] * n
    if pad_type == "custom":
        return pad_pairs(pad)[:n] if pad is not None else [(0, 0)] * n
    if pad_type in ("same", "same_lower"):
        pads = []
        for size, k, s, d in zip(sizes, kernel_sizes, strides, dilations):
            effective = (k - 1) * d + 1
            total = max(0, (math.ceil(size / s) - 1) * s + effective - size)
            small, large = total // 2, total - total // 2
            pads.append((small, large) if pad_type == "same" else (large, small))
        return pads
    raise ValueError(f"unknown pad_type {pad_type!r}")


# -- convolution ---------------------------------------------------------------------

_CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}
_CONV_T = {1: F.conv_transpose1d, 2: F.conv_transpose2d, 3: F.conv_transpose3d}


@kernel("conv", tensors=("x", "weight", "bias"))
def conv(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    strides: list[int] | None = None,
    pad_type: str = "valid",
    pad: list[int] | None = None,
    dilations: list[int] | None = None,
    groups: int = 1,
) -> torch.Tensor:
    nd = x.dim() - 2
    if not x.is_contiguous():
        # a permuted activation (e.g. tokens transposed back to NCHW) would make torch pick the
        # channels-last path and re-lay the weight out on every call: one activation copy is cheaper
        x = x.contiguous()
    strides = strides or [1] * nd
    dilations = dilations or [1] * nd
    pads = spatial_pads(pad_type, pad, x.shape[2:], weight.shape[2:], strides, dilations)
    if all(b == a for b, a in pads):
        padding: Any = [b for b, _ in pads]
    else:
        x = F.pad(x, torch_pad(pads))
        padding = 0
    return _CONV[nd](x, weight, bias, strides, padding, dilations, groups)


@kernel("conv_quantized", tensors=("x", "weight", "bias", "quant_scale", "quant_bias"))
def conv_quantized(
    x: torch.Tensor,
    weight: torch.Tensor,
    quantization_type: str,
    quant_scale: torch.Tensor,
    quant_bias: torch.Tensor,
    bias: torch.Tensor | None = None,
    nbits: int = 8,
    strides: list[int] | None = None,
    pad_type: str = "valid",
    pad: list[int] | None = None,
    dilations: list[int] | None = None,
    groups: int = 1,
) -> torch.Tensor:
    """conv with uint8 weights: linear (W * scale + bias, per output channel or scalar) or a LUT."""
    if quantization_type == "linear":
        rank = weight.dim()
        scale = along_axis(quant_scale.reshape(-1) if quant_scale.numel() > 1 else quant_scale.reshape(()), 0, rank)
        shift = along_axis(quant_bias.reshape(-1) if quant_bias.numel() > 1 else quant_bias.reshape(()), 0, rank)
        w = weight.to(x.dtype) * scale.to(x.dtype) + shift.to(x.dtype)
    elif quantization_type == "lut":
        w = quant_scale.reshape(-1).to(x.dtype)[weight.to(torch.int64)]
    else:
        raise ValueError(f"conv_quantized: unknown quantization_type {quantization_type!r}")
    if bias is not None:
        bias = bias.to(x.dtype)
    return conv(x, w, bias, strides, pad_type, pad, dilations, groups)


@kernel("conv_transpose", tensors=("x", "weight", "bias"))
def conv_transpose(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    pad: list[int] | None = None,
    output_shape: list[int] | None = None,
    pad_type: str = "valid",
    strides: list[int] | None = None,
    dilations: list[int] | None = None,
    groups: int = 1,
) -> torch.Tensor:
    nd = x.dim() - 2
    strides = strides or [1] * nd
    dilations = dilations or [1] * nd
    # The full transposed convolution, then crop (or zero-extend) to the requested size:
    # positions past the full extent receive no contributions.
    full = _CONV_T[nd](x, weight, None, strides, 0, 0, groups, dilations)
    sizes_in = x.shape[2:]
    custom = pad_pairs(pad) if pad else [(0, 0)] * nd
    out = full
    for i in range(nd):
        length = full.shape[2 + i]
        if pad_type == "custom":
            before, after = custom[i]
            target = length - before - after
        elif pad_type in ("same", "same_lower"):
            target = sizes_in[i] * strides[i]
            total = length - target
            before = total // 2 if pad_type == "same" else total - total // 2
        else:
            before, target = 0, length
        if output_shape is not None:
            target = int(output_shape[2 + i])
        dim = 2 + i
        if before > 0:
            out = out.narrow(dim, before, out.shape[dim] - before)
        if out.shape[dim] > target:
            out = out.narrow(dim, 0, target)
        elif out.shape[dim] < target:
            extra = list(out.shape)
            extra[dim] = target - out.shape[dim]
            out = torch.cat([out, out.new_zeros(extra)], dim=dim)
    if bias is not None:
        out = out + along_axis(bias, 1, out.dim())
    return out


# -- linear algebra ------------------------------------------------------------------


@kernel("linear", tensors=("x", "weight", "bias"))
def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    if x.dim() > 2 and not x.is_contiguous():
        # a transposed activation would send F.linear down a batched-matmul path, far slower
        # than one copy followed by a single GEMM
        x = x.contiguous()
    return F.linear(x, weight, bias)


@kernel("matmul", tensors=("x", "y"))
def matmul(x: torch.Tensor, y: torch.Tensor, transpose_x: bool = False, transpose_y: bool = False) -> torch.Tensor:
    if transpose_x and x.dim() > 1:
        x = x.transpose(-1, -2)
    if transpose_y and y.dim() > 1:
        y = y.transpose(-1, -2)
    return torch.matmul(x, y)


def parse_equation(equation: str) -> tuple[list[str], str]:
    lhs, out = equation.replace(" ", "").split("->")
    return lhs.split(","), out


@kernel("einsum", tensors=("values",))
def einsum(values: tuple[torch.Tensor, ...], equation: str) -> torch.Tensor:
    inputs, _ = parse_equation(equation)
    sizes: dict[str, int] = {}
    for labels, t in zip(inputs, values):
        for label, size in zip(labels, t.shape):
            sizes[label] = max(sizes.get(label, 1), int(size))
    expanded = [
        t.expand([sizes[label] for label in labels]) if any(t.shape[i] != sizes[c] for i, c in enumerate(labels)) else t
        for labels, t in zip(inputs, values)
    ]
    return torch.einsum(equation, *expanded)


# -- normalization -------------------------------------------------------------------


@kernel("layer_norm", tensors=("x", "gamma", "beta"))
def layer_norm(
    x: torch.Tensor,
    gamma: torch.Tensor | None = None,
    beta: torch.Tensor | None = None,
    axes: list[int] | None = None,
    epsilon: float = 1e-5,
) -> torch.Tensor:
    rank = x.dim()
    norm_axes = sorted(range(rank) if axes is None else [a % rank for a in axes])
    k = len(norm_axes)
    shape = tuple(x.shape[a] for a in norm_axes)
    if gamma is not None:
        gamma = gamma.reshape(shape)
    if beta is not None:
        beta = beta.reshape(shape)
    if norm_axes == list(range(rank - k, rank)):
        return F.layer_norm(x, shape, gamma, beta, epsilon)
    rest = [a for a in range(rank) if a not in norm_axes]
    perm = rest + norm_axes
    inverse = [perm.index(i) for i in range(rank)]
    return F.layer_norm(x.permute(perm), shape, gamma, beta, epsilon).permute(inverse)


@kernel("batch_norm", tensors=("x", "mean", "variance", "gamma", "beta"))
def batch_norm(
    x: torch.Tensor,
    mean: torch.Tensor,
    variance: torch.Tensor,
    gamma: torch.Tensor | None = None,
    beta: torch.Tensor | None = None,
    epsilon: float = 1e-5,
) -> torch.Tensor:
    return F.batch_norm(x, mean.reshape(-1), variance.reshape(-1), _flat(gamma), _flat(beta), False, 0.0, epsilon)


def _flat(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t.reshape(-1)


@kernel("instance_norm", tensors=("x", "gamma", "beta"))
def instance_norm(
    x: torch.Tensor, gamma: torch.Tensor | None = None, beta: torch.Tensor | None = None, epsilon: float = 1e-5
) -> torch.Tensor:
    return F.instance_norm(x, weight=_flat(gamma), bias=_flat(beta), eps=epsilon)


@kernel("l2_norm")
def l2_norm(x: torch.Tensor, epsilon: float = 1e-6) -> torch.Tensor:
    batch = x.shape[: x.dim() - 3]
    flat = x.reshape(batch + (-1,)) if batch else x.reshape(1, -1)
    norm = torch.sqrt(torch.sum(flat * flat, dim=-1, keepdim=True) + epsilon)
    return (flat / norm).reshape(x.shape)


@kernel("local_response_norm")
def local_response_norm(
    x: torch.Tensor, size: int, alpha: float = 1e-4, beta: float = 0.75, k: float = 1.0
) -> torch.Tensor:
    return F.local_response_norm(x, size, alpha, beta, k)


@kernel("coreml_hub.group_norm", tensors=("x", "gamma", "beta"))
def group_norm(
    x: torch.Tensor,
    num_groups: int,
    epsilon: float,
    gamma: torch.Tensor | None = None,
    beta: torch.Tensor | None = None,
) -> torch.Tensor:
    """Fused form of the decomposed group normalization the converter emits."""
    gamma, beta = _flat(gamma), _flat(beta)
    if gamma is not None and gamma.dtype != x.dtype:  # scales folded from a batch_norm are float32
        gamma = gamma.to(x.dtype)
    if beta is not None and beta.dtype != x.dtype:
        beta = beta.to(x.dtype)
    return F.group_norm(x, num_groups, gamma, beta, epsilon)


# -- pooling -------------------------------------------------------------------------

_AVG = {1: F.avg_pool1d, 2: F.avg_pool2d, 3: F.avg_pool3d}
_MAX = {1: F.max_pool1d, 2: F.max_pool2d, 3: F.max_pool3d}


def _pool_setup(
    x: torch.Tensor, kernel_sizes: list[int], strides: list[int] | None, pad_type: str, pad: list[int] | None
) -> tuple[int, list[int], list[tuple[int, int]], bool]:
    nd = len(kernel_sizes)
    strides = strides or [1] * nd
    pads = spatial_pads(pad_type, pad, x.shape[2:], kernel_sizes, strides, [1] * nd)
    # torch pools pad implicitly only when symmetric and at most half the kernel
    implicit = all(b == a and 2 * b <= k for (b, a), k in zip(pads, kernel_sizes))
    return nd, strides, pads, implicit


@kernel("avg_pool")
def avg_pool(
    x: torch.Tensor,
    kernel_sizes: list[int],
    strides: list[int] | None = None,
    pad_type: str = "valid",
    pad: list[int] | None = None,
    exclude_padding_from_average: bool = False,
    ceil_mode: bool = False,
) -> torch.Tensor:
    nd, strides, pads, implicit = _pool_setup(x, kernel_sizes, strides, pad_type, pad)
    if implicit:
        kwargs: dict[str, Any] = {"count_include_pad": not exclude_padding_from_average}
        return _AVG[nd](x, kernel_sizes, strides, [b for b, _ in pads], ceil_mode, **kwargs)
    padded = F.pad(x, torch_pad(pads))
    total = _AVG[nd](padded, kernel_sizes, strides, 0, ceil_mode)
    if not exclude_padding_from_average:
        return total
    ones = F.pad(torch.ones_like(x[:1, :1]), torch_pad(pads))
    share = _AVG[nd](ones, kernel_sizes, strides, 0, ceil_mode)
    return total / share


@kernel("max_pool")
def max_pool(
    x: torch.Tensor,
    kernel_sizes: list[int],
    strides: list[int] | None = None,
    pad_type: str = "valid",
    pad: list[int] | None = None,
    ceil_mode: bool = False,
) -> torch.Tensor:
    nd, strides, pads, implicit = _pool_setup(x, kernel_sizes, strides, pad_type, pad)
    if implicit:
        return _MAX[nd](x, kernel_sizes, strides, [b for b, _ in pads], 1, ceil_mode)
    padded = F.pad(x, torch_pad(pads), value=float("-inf"))
    return _MAX[nd](padded, kernel_sizes, strides, 0, 1, ceil_mode)


@kernel("l2_pool")
def l2_pool(
    x: torch.Tensor,
    kernel_sizes: list[int],
    strides: list[int] | None = None,
    pad_type: str = "valid",
    pad: list[int] | None = None,
    ceil_mode: bool = False,
) -> torch.Tensor:
    nd, strides, pads, _ = _pool_setup(x, kernel_sizes, strides, pad_type, pad)
    padded = F.pad(x * x, torch_pad(pads))
    mean = _AVG[nd](padded, kernel_sizes, strides, 0, ceil_mode)
    return torch.sqrt(mean * float(np.prod(kernel_sizes)))


# -- resizing ------------------------------------------------------------------------


def sample_points(size_in: int, size_out: int, mode: str) -> np.ndarray:
    """Source coordinates of each output sample along one axis, per MIL sampling mode."""
    i = np.arange(size_out, dtype=np.float64)
    if mode in ("STRICT_ALIGN_CORNERS", "ALIGN_CORNERS"):
        if size_out == 1:
            points = np.full(1, (size_in - 1) / 2.0 if mode == "ALIGN_CORNERS" else 0.0)
        else:
            points = i * (size_in - 1) / (size_out - 1)
    elif mode == "DEFAULT":
        points = i * size_in / size_out
    elif mode == "OFFSET_CORNERS":
        delta = max(1, size_in - 1) / size_out
        points = 0.5 * delta + i * delta
    elif mode == "UNALIGN_CORNERS":
        spacing = size_in / size_out
        points = i * spacing + 0.5 * spacing - 0.5
    else:
        raise ValueError(f"unknown sampling_mode {mode!r}")
    return np.clip(points, 0, size_in - 1)


def _linear_along(x: torch.Tensor, dim: int, size_out: int, mode: str) -> torch.Tensor:
    size_in = x.shape[dim]
    points = sample_points(size_in, size_out, mode)
    low = np.floor(points).astype(np.int64)
    high = np.minimum(low + 1, size_in - 1)
    frac = points - low
    lo = x.index_select(dim, torch.from_numpy(low).to(x.device))
    hi = x.index_select(dim, torch.from_numpy(high).to(x.device))
    shape = [1] * x.dim()
    shape[dim] = size_out
    w = torch.from_numpy(frac).to(device=x.device, dtype=x.dtype).reshape(shape)
    return lo + (hi - lo) * w


def _nearest_along(x: torch.Tensor, dim: int, size_out: int, scale: float | None = None) -> torch.Tensor:
    size_in = x.shape[dim]
    step = (1.0 / scale) if scale else size_in / size_out
    index = np.minimum(np.floor(np.arange(size_out) * step).astype(np.int64), size_in - 1)
    return x.index_select(dim, torch.from_numpy(index).to(x.device))


def _nearest(x: torch.Tensor, h: int, w: int, scale_h: float | None = None, scale_w: float | None = None) -> torch.Tensor:
    in_h, in_w = x.shape[-2], x.shape[-1]
    if h % in_h == 0 and w % in_w == 0 and scale_h in (None, h // in_h) and scale_w in (None, w // in_w):
        # integer factors (the Unet/VAE upsampling): every source pixel repeats, written with
        # one broadcast copy, several times faster than interpolate's NCHW nearest kernel
        fh, fw = h // in_h, w // in_w
        lead = tuple(x.shape[:-2])
        grid = x.reshape(lead + (in_h, 1, in_w, 1)).expand(lead + (in_h, fh, in_w, fw))
        return grid.reshape(lead + (h, w))
    return _nearest_along(_nearest_along(x, x.dim() - 2, h, scale_h), x.dim() - 1, w, scale_w)


@kernel("upsample_nearest_neighbor")
def upsample_nearest_neighbor(
    x: torch.Tensor, scale_factor_height: float = 1, scale_factor_width: float = 1
) -> torch.Tensor:
    h = int(math.floor(x.shape[-2] * scale_factor_height))
    w = int(math.floor(x.shape[-1] * scale_factor_width))
    # the source pixel is floor(i * in / out), not floor(i / scale): with a fractional scale
    # the two differ (3 pixels at scale 1.12 map to 0, 1, 2), and Core ML uses the sizes
    return _nearest(x, h, w)


@kernel("resize_nearest_neighbor")
def resize_nearest_neighbor(x: torch.Tensor, target_size_height: int, target_size_width: int) -> torch.Tensor:
    return _nearest(x, int(target_size_height), int(target_size_width))


@kernel("upsample_bilinear")
def upsample_bilinear(
    x: torch.Tensor,
    scale_factor_height: float = 1,
    scale_factor_width: float = 1,
    align_corners: bool = True,
    half_pixel_centers: bool | None = None,
) -> torch.Tensor:
    h = int(math.floor(x.shape[-2] * scale_factor_height))
    w = int(math.floor(x.shape[-1] * scale_factor_width))
    if half_pixel_centers is None:
        half_pixel_centers = not align_corners
    if align_corners:
        mode = "STRICT_ALIGN_CORNERS"
    else:
        mode = "UNALIGN_CORNERS" if half_pixel_centers else "DEFAULT"
    return _linear_along(_linear_along(x, x.dim() - 2, h, mode), x.dim() - 1, w, mode)


@kernel("resize_bilinear")
def resize_bilinear(
    x: torch.Tensor, target_size_height: int = 1, target_size_width: int = 1, sampling_mode: str = "DEFAULT"
) -> torch.Tensor:
    out = _linear_along(x, x.dim() - 2, int(target_size_height), sampling_mode)
    return _linear_along(out, x.dim() - 1, int(target_size_width), sampling_mode)


@kernel("resize")
def resize(
    x: torch.Tensor,
    shape: list[int],
    resized_dims: int,
    interpolation_mode: str = "LINEAR",
    sampling_mode: str = "DEFAULT",
) -> torch.Tensor:
    rank = x.dim()
    out = x
    for j in range(int(resized_dims)):
        dim = rank - int(resized_dims) + j
        size = int(shape[len(shape) - int(resized_dims) + j])
        if size == 0:
            continue
        if interpolation_mode == "NEAREST_NEIGHBOR":
            out = _nearest_along(out, dim, size)
        else:
            out = _linear_along(out, dim, size, sampling_mode)
    return out


# -- attention -----------------------------------------------------------------------


@kernel("scaled_dot_product_attention", tensors=("query", "key", "value", "attn_mask"))
def scaled_dot_product_attention(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, attn_mask: torch.Tensor | None = None
) -> torch.Tensor:
    return F.scaled_dot_product_attention(query, key, value, attn_mask=attn_mask)


def _permuted(t: torch.Tensor, perm: list[int] | None) -> torch.Tensor:
    return t if perm is None else t.permute(perm)


@kernel("coreml_hub.attention", tensors=("query", "key", "value", "mask"))
def fused_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    scale: float,
    mask: torch.Tensor | None = None,
    query_perm: list[int] | None = None,
    key_perm: list[int] | None = None,
    value_perm: list[int] | None = None,
    mask_perm: list[int] | None = None,
    out_perm: list[int] | None = None,
    heads: list[int] | None = None,
) -> torch.Tensor:
    """softmax(Q Kᵀ · scale + mask) V from a matmul or einsum pattern, in the pattern's layouts.

    The permutations bring each operand to [batch..., sequence, channels] (the mask to
    [batch..., query, key]) and the result back to the layout the pattern produced.
    `heads` = [H, query axis, key axis, value axis, output axis] (passes.merge_heads): the
    operands hold H heads side by side on those channel axes; each is split into (H, channels)
    as a view, the heads run as one more batch dimension, and the output joins them again.
    """
    if heads is not None:
        return _attention_heads(query, key, value, scale, query_perm, key_perm, value_perm, out_perm, heads)
    q = _permuted(query, query_perm)
    k = _permuted(key, key_perm)
    v = _permuted(value, value_perm)
    m = mask
    if m is not None and mask_perm is not None:
        if m.dim() < len(mask_perm):  # broadcasting from the right, as the add did
            m = m.reshape((1,) * (len(mask_perm) - m.dim()) + tuple(m.shape))
        m = m.permute(mask_perm)
    if m is not None and m.dtype != torch.bool and m.dtype != q.dtype:
        m = m.to(q.dtype)  # a mask constant of another float type (SDPA wants the query's)
    q, k, v, _ = _common_batch(q, k, v)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=m, scale=scale)
    return _permuted(out, out_perm)


def _common_batch(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Size]:
    """K and V in the query's type, all three expanded to their common batch dimensions."""
    if k.dtype != q.dtype or v.dtype != q.dtype:
        k, v = k.to(q.dtype), v.to(q.dtype)
    batch = torch.broadcast_shapes(q.shape[:-2], k.shape[:-2], v.shape[:-2])
    return q.expand(batch + q.shape[-2:]), k.expand(batch + k.shape[-2:]), v.expand(batch + v.shape[-2:]), batch


def _split_axis(t: torch.Tensor, axis: int, heads: int) -> torch.Tensor:
    shape = list(t.shape)
    return t.reshape(shape[:axis] + [heads, shape[axis] // heads] + shape[axis + 1:])


def _head_perm(perm: list[int] | None, rank: int, axis: int) -> list[int]:
    """The permutation of an operand whose `axis` was split in two: the head axis first, as a batch axis."""
    old = perm if perm is not None else list(range(rank))
    return [axis] + [j if j < axis else j + 1 for j in old]


def _attention_heads(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scale: float,
    query_perm: list[int] | None, key_perm: list[int] | None, value_perm: list[int] | None,
    out_perm: list[int] | None, heads: list[int],
) -> torch.Tensor:
    count, q_axis, k_axis, v_axis, out_axis = heads
    rank = query.dim()
    q = _split_axis(query, q_axis, count).permute(_head_perm(query_perm, rank, q_axis))
    k = _split_axis(key, k_axis, count).permute(_head_perm(key_perm, rank, k_axis))
    v = _split_axis(value, v_axis, count).permute(_head_perm(value_perm, rank, v_axis))
    q, k, v, batch = _common_batch(q, k, v)
    # [1, heads x batch, sequence, channels]: the 4-D form the fused SDPA kernels take
    out = F.scaled_dot_product_attention(q.flatten(0, -3).unsqueeze(0), k.flatten(0, -3).unsqueeze(0),
                                         v.flatten(0, -3).unsqueeze(0), scale=scale)
    out = out.reshape(batch + out.shape[-2:])  # [heads, batch..., sequence, channels]
    canonical = out_perm if out_perm is not None else list(range(rank))
    order = [j + 1 for j in canonical[:out_axis]] + [0] + [j + 1 for j in canonical[out_axis:]]
    out = out.permute(order)
    shape = list(out.shape)
    return out.reshape(shape[:out_axis] + [shape[out_axis] * shape[out_axis + 1]] + shape[out_axis + 2:])


# -- quantization --------------------------------------------------------------------


@kernel("dequantize", tensors=("input", "scale", "zero_point"))
def dequantize(
    out_dtype: torch.dtype,
    input: torch.Tensor,
    scale: torch.Tensor,
    zero_point: torch.Tensor | None = None,
    axis: int | None = None,
) -> torch.Tensor:
    x = input.to(out_dtype)
    rank = input.dim()
    if zero_point is not None:
        x = x - along_axis(zero_point.to(out_dtype), axis, rank)
    return x * along_axis(scale, axis, rank)


@kernel("quantize", tensors=("input", "scale", "zero_point"))
def quantize(
    input: torch.Tensor,
    scale: torch.Tensor,
    output_dtype: str,
    zero_point: torch.Tensor | None = None,
    axis: int | None = None,
) -> torch.Tensor:
    rank = input.dim()
    q = torch.round(input / along_axis(scale, axis, rank))
    if zero_point is not None:
        q = q + along_axis(zero_point.to(q.dtype), axis, rank)
    low, high, dtype = (0, 255, torch.uint8) if output_dtype == "uint8" else (-128, 127, torch.int8)
    return torch.clamp(q, low, high).to(dtype)


# -- recurrent -----------------------------------------------------------------------

# Recurrent-layer activations, with their default parameters (the ops give no alpha or beta):
# scaled_tanh is alpha * tanh(beta * x) with alpha = beta = 1, hard sigmoid clamps 0.2 x + 0.5.
_GATE_ACTIVATIONS = {
    "sigmoid": torch.sigmoid,
    "tanh": torch.tanh,
    "relu": torch.relu,
    "linear": lambda t: t,
    "scaled_tanh": torch.tanh,
    "hard_sigmoid": lambda t: torch.clamp(0.2 * t + 0.5, 0.0, 1.0),
    "sigmoid_hard": lambda t: torch.clamp(0.2 * t + 0.5, 0.0, 1.0),
}


def _gate(name: str) -> Any:
    if name not in _GATE_ACTIVATIONS:
        raise ValueError(f"recurrent activation {name!r} is not supported")
    return _GATE_ACTIVATIONS[name]


def _lstm_direction(
    x: torch.Tensor,
    h: torch.Tensor,
    c: torch.Tensor,
    w_ih: torch.Tensor,
    w_hh: torch.Tensor,
    bias: torch.Tensor | None,
    peephole: torch.Tensor | None,
    acts: tuple[Any, Any, Any],
    clip: float | None,
    reverse: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    recurrent, cell, output = acts
    hidden = w_hh.shape[1]
    projected = F.linear(x, w_ih, bias)  # [s, b, 4H], gates in i, f, o, z order
    steps = range(x.shape[0] - 1, -1, -1) if reverse else range(x.shape[0])
    outputs: list[torch.Tensor] = [None] * x.shape[0]  # type: ignore[list-item]
    for t in steps:
        gates = projected[t] + F.linear(h, w_hh)
        i, f, o, z = gates.split(hidden, dim=-1)
        if peephole is not None:
            i = i + peephole[:hidden] * c
            f = f + peephole[hidden : 2 * hidden] * c
        c = recurrent(f) * c + recurrent(i) * cell(z)
        if clip is not None:
            c = torch.clamp(c, -clip, clip)
        if peephole is not None:
            o = o + peephole[2 * hidden :] * c
        h = recurrent(o) * output(c)
        outputs[t] = h
    return torch.stack(outputs, 0), h, c


@kernel(
    "lstm",
    tensors=("x", "initial_h", "initial_c", "weight_ih", "weight_hh", "bias", "peephole",
             "weight_ih_back", "weight_hh_back", "bias_back", "peephole_back"),
)
def lstm(
    x: torch.Tensor,
    initial_h: torch.Tensor,
    initial_c: torch.Tensor,
    weight_ih: torch.Tensor,
    weight_hh: torch.Tensor,
    bias: torch.Tensor | None = None,
    peephole: torch.Tensor | None = None,
    weight_ih_back: torch.Tensor | None = None,
    weight_hh_back: torch.Tensor | None = None,
    bias_back: torch.Tensor | None = None,
    peephole_back: torch.Tensor | None = None,
    direction: str = "forward",
    output_sequence: bool = False,
    recurrent_activation: str = "sigmoid",
    cell_activation: str = "tanh",
    activation: str = "tanh",
    clip: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One LSTM layer over [seq, batch, input]; returns (outputs, last h, last c)."""
    acts = (_gate(recurrent_activation), _gate(cell_activation), _gate(activation))
    hidden = weight_hh.shape[1]
    if direction == "bidirectional":
        if weight_ih_back is None or weight_hh_back is None:
            raise ValueError("lstm: a bidirectional LSTM needs weight_ih_back and weight_hh_back")
        fwd = _lstm_direction(x, initial_h[:, :hidden], initial_c[:, :hidden], weight_ih, weight_hh, bias, peephole,
                              acts, clip, False)
        bwd = _lstm_direction(x, initial_h[:, hidden:], initial_c[:, hidden:], weight_ih_back, weight_hh_back,
                              bias_back, peephole_back, acts, clip, True)
        seq = torch.cat([fwd[0], bwd[0]], dim=-1)
        h, c = torch.cat([fwd[1], bwd[1]], dim=-1), torch.cat([fwd[2], bwd[2]], dim=-1)
        last = torch.cat([fwd[0][-1:], bwd[0][:1]], dim=-1)
    else:
        seq, h, c = _lstm_direction(x, initial_h, initial_c, weight_ih, weight_hh, bias, peephole, acts, clip,
                                    direction == "reverse")
        if direction == "reverse":
            seq = seq.flip(0)  # a single reverse direction returns its steps in the order it ran them
        last = h.unsqueeze(0)
    return (seq if output_sequence else last), h, c


def _steps(x: torch.Tensor, direction: str) -> range:
    if direction not in ("forward", "reverse"):
        raise ValueError(f"direction {direction!r} is not supported (forward or reverse)")
    return range(x.shape[0] - 1, -1, -1) if direction == "reverse" else range(x.shape[0])


def _sequence(outputs: list[torch.Tensor], h: torch.Tensor, output_sequence: bool) -> torch.Tensor:
    """Every step's hidden state in the order the steps ran, or the last one only."""
    return torch.stack(outputs, 0) if output_sequence else h.unsqueeze(0)


@kernel("rnn", tensors=("x", "initial_h", "weight_ih", "weight_hh", "bias"))
def rnn(
    x: torch.Tensor,
    initial_h: torch.Tensor,
    weight_ih: torch.Tensor,
    weight_hh: torch.Tensor,
    bias: torch.Tensor | None = None,
    direction: str = "forward",
    output_sequence: bool = False,
    activation: str = "tanh",
) -> tuple[torch.Tensor, torch.Tensor]:
    """h_t = activation(W_ih x_t + W_hh h_{t-1} + b) over [seq, batch, input]."""
    act = _gate(activation)
    projected = F.linear(x, weight_ih, bias)
    h, outputs = initial_h, []
    for t in _steps(x, direction):
        h = act(projected[t] + F.linear(h, weight_hh))
        outputs.append(h)
    return _sequence(outputs, h, output_sequence), h


@kernel("gru", tensors=("x", "initial_h", "weight_ih", "weight_hh", "bias", "input_bias"))
def gru(
    x: torch.Tensor,
    initial_h: torch.Tensor,
    weight_ih: torch.Tensor,
    weight_hh: torch.Tensor,
    bias: torch.Tensor | None = None,
    direction: str = "forward",
    output_sequence: bool = False,
    recurrent_activation: str = "sigmoid",
    activation: str = "tanh",
    reset_after: bool = False,
    input_bias: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """GRU with gates in r, o, z order; `bias` is the recurrent side's bias when `input_bias` is given.

    r and z = recurrent_activation(W x + b_i + R h + b_h); o = activation(W_o x + b_io + R_o (r * h) + b_ho),
    or with `reset_after`, activation(W_o x + b_io + r * (R_o h + b_ho)); h = (1 - z) * o + z * h.
    """
    inner, outer = _gate(recurrent_activation), _gate(activation)
    hidden = weight_hh.shape[1]
    projected = F.linear(x, weight_ih, input_bias)  # [s, b, 3H]
    w_r, w_o, w_z = weight_hh.split(hidden, 0)
    b_r, b_o, b_z = bias.split(hidden, 0) if bias is not None else (None, None, None)
    h, outputs = initial_h, []
    for t in _steps(x, direction):
        x_r, x_o, x_z = projected[t].split(hidden, -1)
        r = inner(x_r + F.linear(h, w_r, b_r))
        z = inner(x_z + F.linear(h, w_z, b_z))
        if reset_after:
            o = outer(x_o + r * F.linear(h, w_o, b_o))
        else:
            o = outer(x_o + F.linear(r * h, w_o, b_o))
        h = (1 - z) * o + z * h
        outputs.append(h)
    return _sequence(outputs, h, output_sequence), h
