"""Image sampling ops: crop, crop_resize (iOS15/16 `roi` and iOS17 `boxes` forms), resample, affine.

Coordinates follow the op definitions: `resample` and `affine` take (x, y) = (w, h) pairs;
out-of-image samples take the padding rule's value; bilinear samples weigh the four
neighbouring pixels, each of which may itself be padding.
"""

from __future__ import annotations

from typing import Any

import torch

from . import kernel


@kernel("crop")
def crop(x: torch.Tensor, crop_height: list[int], crop_width: list[int]) -> torch.Tensor:
    h, w = x.shape[-2], x.shape[-1]
    return x[..., crop_height[0] : h - crop_height[1], crop_width[0] : w - crop_width[1]]


# -- sampling ------------------------------------------------------------------------


def _reflect(coord: torch.Tensor, low: float, high: float) -> torch.Tensor:
    """Fold coordinates into [low, high] by reflecting at both ends (a triangle wave)."""
    span = high - low
    if span <= 0:
        return torch.full_like(coord, low)
    shifted = torch.remainder(coord - low, 2 * span)
    return low + torch.where(shifted > span, 2 * span - shifted, shifted)


def _pad_coordinates(coord: torch.Tensor, size: int, padding_mode: str) -> torch.Tensor:
    mode = padding_mode.lower()
    if mode == "border":
        return coord.clamp(0, size - 1)
    if mode == "reflection":  # mirror at the edge pixels' centres, edge not repeated
        return _reflect(coord, 0.0, size - 1.0).clamp(0, size - 1)
    if mode == "symmetric":  # mirror at the image's outer edges, edge repeated
        return _reflect(coord, -0.5, size - 0.5).clamp(0, size - 1)
    if mode == "constant":
        return coord
    raise ValueError(f"unknown padding_mode {padding_mode!r}")


def _gather_2d(x: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """x [B, C, H, W] sampled at integer (rows, cols) [B, H2, W2] (clamped into the image)."""
    b, c, h, w = x.shape
    rows = rows.clamp(0, h - 1)
    cols = cols.clamp(0, w - 1)
    flat = (rows * w + cols).reshape(b, 1, -1).expand(b, c, -1)
    return torch.gather(x.reshape(b, c, h * w), 2, flat).reshape((b, c) + tuple(rows.shape[1:]))


def sample(
    x: torch.Tensor,
    px: torch.Tensor,
    py: torch.Tensor,
    sampling_mode: str,
    padding_mode: str,
    padding_value: float,
) -> torch.Tensor:
    """x [B, C, H, W] at pixel coordinates px (width) and py (height), both [B, H2, W2]."""
    h, w = x.shape[-2], x.shape[-1]
    px = _pad_coordinates(px, w, padding_mode)
    py = _pad_coordinates(py, h, padding_mode)
    constant = padding_mode.lower() == "constant"

    def pick(rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
        values = _gather_2d(x, rows, cols)
        if not constant:
            return values
        outside = (rows < 0) | (rows > h - 1) | (cols < 0) | (cols > w - 1)
        return torch.where(outside.unsqueeze(1), torch.full_like(values, padding_value), values)

    if sampling_mode.lower() == "nearest":
        return pick(torch.round(py).long(), torch.round(px).long())
    if sampling_mode.lower() != "bilinear":
        raise ValueError(f"unknown sampling_mode {sampling_mode!r}")
    x0, y0 = torch.floor(px), torch.floor(py)
    fx, fy = (px - x0).unsqueeze(1).to(x.dtype), (py - y0).unsqueeze(1).to(x.dtype)
    x0, y0 = x0.long(), y0.long()
    top = pick(y0, x0) * (1 - fx) + pick(y0, x0 + 1) * fx
    bottom = pick(y0 + 1, x0) * (1 - fx) + pick(y0 + 1, x0 + 1) * fx
    return top * (1 - fy) + bottom * fy


def _to_pixels(coord: torch.Tensor, size: int, coordinates_mode: str, align_corners: bool) -> torch.Tensor:
    mode = coordinates_mode.lower()
    if mode == "unnormalized":
        return coord
    if mode == "normalized_minus_one_to_one":
        return (coord + 1) / 2 * (size - 1) if align_corners else ((coord + 1) * size - 1) / 2
    if mode == "normalized_zero_to_one":
        return coord * (size - 1) if align_corners else coord * size - 0.5
    raise ValueError(f"unknown coordinates_mode {coordinates_mode!r}")


@kernel("resample", tensors=("x", "coordinates"))
def resample(
    x: torch.Tensor,
    coordinates: torch.Tensor,
    sampling_mode: str = "bilinear",
    padding_mode: str = "constant",
    padding_value: float = 0.0,
    coordinates_mode: str = "unnormalized",
    align_corners: bool = False,
) -> torch.Tensor:
    coords = coordinates.to(torch.float32 if x.dtype != torch.float64 else x.dtype)
    h, w = x.shape[-2], x.shape[-1]
    px = _to_pixels(coords[..., 0], w, coordinates_mode, align_corners)
    py = _to_pixels(coords[..., 1], h, coordinates_mode, align_corners)
    return sample(x, px, py, sampling_mode, padding_mode, padding_value)


@kernel("affine", tensors=("x", "transform_matrix"))
def affine(
    x: torch.Tensor,
    transform_matrix: torch.Tensor,
    output_height: int,
    output_width: int,
    sampling_mode: str = "bilinear",
    padding_mode: str = "constant",
    padding_value: float = 0.0,
    coordinates_mode: str = "normalized_minus_one_to_one",
    align_corners: bool = True,
) -> torch.Tensor:
    """Each output pixel's normalized (x, y) mapped through [a0 a1 a2; b0 b1 b2], then resampled."""
    b = x.shape[0]
    dtype = torch.float32 if x.dtype != torch.float64 else x.dtype

    def grid(size: int) -> torch.Tensor:
        if align_corners:
            return torch.linspace(-1, 1, size, dtype=dtype, device=x.device) if size > 1 else \
                torch.zeros(1, dtype=dtype, device=x.device)
        return (torch.arange(size, dtype=dtype, device=x.device) * 2 + 1) / size - 1

    gy, gx = torch.meshgrid(grid(int(output_height)), grid(int(output_width)), indexing="ij")
    m = transform_matrix.to(dtype).reshape(-1, 6).expand(b, 6)
    xs = m[:, 0, None, None] * gx + m[:, 1, None, None] * gy + m[:, 2, None, None]
    ys = m[:, 3, None, None] * gx + m[:, 4, None, None] * gy + m[:, 5, None, None]
    h, w = x.shape[-2], x.shape[-1]
    px = _to_pixels(xs, w, coordinates_mode, align_corners)
    py = _to_pixels(ys, h, coordinates_mode, align_corners)
    return sample(x, px, py, sampling_mode, padding_mode, padding_value)


# -- crop_resize ---------------------------------------------------------------------


def _box_points(start: torch.Tensor, end: torch.Tensor, count: int, mode: str) -> torch.Tensor:
    """Sample positions [N, count] between each box's start and end, per MIL sampling mode."""
    i = torch.arange(count, dtype=start.dtype, device=start.device)
    length = (end - start).unsqueeze(1)
    start = start.unsqueeze(1)
    if mode in ("STRICT_ALIGN_CORNERS", "ALIGN_CORNERS"):
        if count == 1:
            return start + (length / 2 if mode == "ALIGN_CORNERS" else 0 * length)
        return start + i * length / (count - 1)
    if mode == "DEFAULT":
        return start + i * length / count
    if mode == "OFFSET_CORNERS":
        delta = length / count
        return start + 0.5 * delta + i * delta
    if mode == "UNALIGN_CORNERS":
        spacing = length / count
        return start + i * spacing + 0.5 * spacing - 0.5
    raise ValueError(f"unknown sampling_mode {mode!r}")


def _corners(boxes: torch.Tensor, mode: str) -> tuple[torch.Tensor, ...]:
    """Boxes [N, 4] in `box_coordinate_mode` as (h_start, w_start, h_end, w_end)."""
    a, b, c, d = boxes.unbind(-1)
    if mode == "CORNERS_HEIGHT_FIRST":
        return a, b, c, d
    if mode == "CORNERS_WIDTH_FIRST":
        return b, a, d, c
    if mode == "CENTER_SIZE_HEIGHT_FIRST":
        return a - c / 2, b - d / 2, a + c / 2, b + d / 2
    if mode == "CENTER_SIZE_WIDTH_FIRST":
        return b - d / 2, a - c / 2, b + d / 2, a + c / 2
    raise ValueError(f"unknown box_coordinate_mode {mode!r}")


def _crop_resize(
    x: torch.Tensor,
    boxes: torch.Tensor,
    indices: torch.Tensor,
    target_height: int,
    target_width: int,
    normalized_coordinates: bool,
    spatial_scale: float,
    box_coordinate_mode: str,
    sampling_mode: str,
    pad_value: float,
) -> torch.Tensor:
    """One crop per box, from image `indices[n]`: [N, C, target_height, target_width]."""
    h, w = x.shape[-2], x.shape[-1]
    boxes = boxes.to(torch.float32 if x.dtype != torch.float64 else x.dtype) * spatial_scale
    h0, w0, h1, w1 = _corners(boxes, box_coordinate_mode)
    if normalized_coordinates:
        h0, h1, w0, w1 = h0 * (h - 1), h1 * (h - 1), w0 * (w - 1), w1 * (w - 1)
    rows = _box_points(h0, h1, int(target_height), sampling_mode)  # [N, th]
    cols = _box_points(w0, w1, int(target_width), sampling_mode)  # [N, tw]
    py = rows.unsqueeze(2).expand(-1, -1, cols.shape[1])
    px = cols.unsqueeze(1).expand(-1, rows.shape[1], -1)
    images = x.index_select(0, indices.to(torch.int64).reshape(-1))
    # samples outside [0, size - 1] take pad_value; inside, bilinear between the pixels
    out = sample(images, px, py, "bilinear", "constant", pad_value)
    outside = (py < 0) | (py > h - 1) | (px < 0) | (px > w - 1)
    return torch.where(outside.unsqueeze(1), torch.full_like(out, pad_value), out)


@kernel("crop_resize", tensors=("x", "roi", "boxes", "box_indices"))
def crop_resize(
    x: torch.Tensor,
    roi: torch.Tensor | None = None,
    boxes: torch.Tensor | None = None,
    box_indices: torch.Tensor | None = None,
    target_height: int = 1,
    target_width: int = 1,
    normalized_coordinates: bool = False,
    spatial_scale: float = 1.0,
    box_coordinate_mode: str = "CORNERS_HEIGHT_FIRST",
    sampling_mode: str = "DEFAULT",
    pad_value: float = 0.0,
) -> torch.Tensor:
    options: dict[str, Any] = {
        "target_height": target_height, "target_width": target_width,
        "normalized_coordinates": normalized_coordinates, "spatial_scale": spatial_scale,
        "box_coordinate_mode": box_coordinate_mode, "sampling_mode": sampling_mode, "pad_value": pad_value,
    }
    if roi is None:  # iOS17: boxes [N, 4], box_indices [N] -> [N, C, th, tw]
        assert boxes is not None, "crop_resize needs roi or boxes"
        boxes = boxes.reshape(-1, 4)
        if box_indices is None:
            box_indices = torch.arange(boxes.shape[0], device=x.device)
        return _crop_resize(x, boxes, box_indices, **options)
    # iOS15/16: roi [N, 1, 4 or 5, 1, 1] -> [N, B, C, th, tw] (or [N, 1, C, th, tw] with indices)
    flat = roi.reshape(roi.shape[0], -1)
    n, batch = flat.shape[0], x.shape[0]
    if flat.shape[1] == 5:
        out = _crop_resize(x, flat[:, 1:], flat[:, 0].round().to(torch.int64), **options)
        return out.unsqueeze(1)
    per_image = flat.repeat_interleave(batch, 0)
    images = torch.arange(batch, device=x.device).repeat(n)
    out = _crop_resize(x, per_image, images, **options)
    return out.reshape((n, batch) + tuple(out.shape[1:]))

