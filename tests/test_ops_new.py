"""The ops added for coremltools' full MIL opsets, one op per program, against torch or numpy references
written from the op definitions (coremltools' `mil/ops/defs`) and their documented examples."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from test_ops import close, randn, run_op


# -- recurrent -----------------------------------------------------------------------


def _torch_gru(hidden: int, inputs: int) -> torch.nn.GRU:
    torch.manual_seed(4)
    return torch.nn.GRU(inputs, hidden).eval()


@pytest.mark.parametrize("direction", ["forward", "reverse"])
def test_gru_reset_after_matches_torch(direction: str) -> None:
    """iOS18 gru with reset_after and input_bias is torch's GRU (gates reordered r, z, n -> r, o, z)."""
    s, b, i, h = 5, 2, 3, 4
    gru = _torch_gru(h, i)
    sd = {k: v.detach().numpy() for k, v in gru.state_dict().items()}

    def reorder(w: np.ndarray) -> np.ndarray:
        r, z, n = np.split(w, 3)
        return np.concatenate([r, n, z])

    x, h0 = randn(s, b, i), randn(b, h)
    seq, last = run_op("gru", {"x": x, "initial_h": h0}, {
        "weight_ih": reorder(sd["weight_ih_l0"]), "weight_hh": reorder(sd["weight_hh_l0"]),
        "input_bias": reorder(sd["bias_ih_l0"]), "bias": reorder(sd["bias_hh_l0"]),
        "reset_after": True, "output_sequence": True, "direction": direction}, outputs=2)
    xt = torch.from_numpy(x.copy())
    with torch.no_grad():
        expected, hn = gru(xt.flip(0) if direction == "reverse" else xt, torch.from_numpy(h0)[None])
    close(seq, expected.numpy(), 1e-5)  # steps in the order they ran
    close(last, hn[0].numpy(), 1e-5)


def test_gru_reset_before_matches_the_definition() -> None:
    """o = tanh(W_o x + R_o (r * h) + b_o), the form of the iOS15 definition and coremltools' test."""
    s, b, i, h = 4, 1, 2, 3
    w, r, bias = randn(3 * h, i), randn(3 * h, h), randn(3 * h)
    x, h0 = randn(s, b, i), randn(b, h)
    sig = lambda v: 1 / (1 + np.exp(-v))  # noqa: E731
    hh = h0.astype(np.float64)
    for t in range(s):
        xr, xo, xz = np.split(x[t] @ w.T, 3, -1)
        rr, ro, rz = np.split(r, 3)
        br, bo, bz = np.split(bias, 3)
        rg = sig(xr + hh @ rr.T + br)
        z = sig(xz + hh @ rz.T + bz)
        o = np.tanh(xo + (rg * hh) @ ro.T + bo)
        hh = (1 - z) * o + z * hh
    out, last = run_op("gru", {"x": x, "initial_h": h0}, {"weight_ih": w, "weight_hh": r, "bias": bias}, outputs=2)
    close(out, hh[None], 1e-5)
    close(last, hh, 1e-5)


@pytest.mark.parametrize("activation", ["tanh", "relu"])
def test_rnn_matches_torch(activation: str) -> None:
    torch.manual_seed(5)
    rnn = torch.nn.RNN(3, 4, nonlinearity=activation).eval()
    sd = {k: v.detach().numpy() for k, v in rnn.state_dict().items()}
    x, h0 = randn(6, 2, 3), randn(2, 4)
    seq, last = run_op("rnn", {"x": x, "initial_h": h0}, {
        "weight_ih": sd["weight_ih_l0"], "weight_hh": sd["weight_hh_l0"], "bias": sd["bias_ih_l0"] + sd["bias_hh_l0"],
        "activation": activation, "output_sequence": True}, outputs=2)
    with torch.no_grad():
        expected, hn = rnn(torch.from_numpy(x), torch.from_numpy(h0)[None])
    close(seq, expected.numpy(), 1e-5)
    close(last, hn[0].numpy(), 1e-5)


# -- image sampling --------------------------------------------------------------------


@pytest.mark.parametrize("align", [True, False])
@pytest.mark.parametrize("padding", ["constant", "border"])
@pytest.mark.parametrize("mode", ["bilinear", "nearest"])
def test_resample_matches_grid_sample(align: bool, padding: str, mode: str) -> None:
    x = randn(2, 3, 5, 6)
    grid = (np.random.default_rng(1).uniform(-1.3, 1.3, (2, 4, 7, 2))).astype(np.float32)
    out = run_op("resample", {"x": x, "coordinates": grid}, {
        "sampling_mode": mode, "padding_mode": padding, "padding_value": np.float32(0.0),
        "coordinates_mode": "normalized_minus_one_to_one", "align_corners": align})
    expected = F.grid_sample(torch.from_numpy(x), torch.from_numpy(grid), mode=mode,
                             padding_mode="zeros" if padding == "constant" else "border", align_corners=align)
    close(out, expected.numpy(), 1e-5)


def test_resample_documented_padding_modes() -> None:
    """coremltools' own expectations: constant padding with a value, reflection, symmetric."""
    x = np.array([11.0, 22.0, 33.0, 44.0], np.float32).reshape(1, 1, 2, 2)
    coords = np.array([-1.0, -2.0, -3.7, -1.0, 0.0, 0.0, 3.5, 1.2], np.float32).reshape(1, 2, 2, 2)
    cases = [
        ("bilinear", "constant", 6.17, "normalized_minus_one_to_one", True, [8.585, 6.17, 27.5, 6.17]),
        ("nearest", "border", -1.0, "unnormalized", False, [11.0, 11.0, 11.0, 44.0]),
        ("bilinear", "reflection", -1.0, "normalized_zero_to_one", True, [22.0, 36.3, 11.0, 34.1]),
        ("nearest", "symmetric", -1.0, "normalized_zero_to_one", False, [22.0, 33.0, 11.0, 33.0]),
    ]
    for mode, padding, value, coordinates, align, expected in cases:
        out = run_op("resample", {"x": x, "coordinates": coords}, {
            "sampling_mode": mode, "padding_mode": padding, "padding_value": np.float32(value),
            "coordinates_mode": coordinates, "align_corners": align})
        close(out, np.array(expected, np.float32).reshape(1, 1, 2, 2), 1e-4)


def test_affine_matches_affine_grid() -> None:
    x = randn(2, 3, 6, 5)
    theta = np.array([[0.9, -0.3, 0.1, 0.2, 1.1, -0.2], [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]], np.float32)
    out = run_op("affine", {"x": x, "transform_matrix": theta}, {
        "output_height": np.int32(4), "output_width": np.int32(7), "sampling_mode": "bilinear",
        "padding_mode": "constant", "padding_value": np.float32(0.0),
        "coordinates_mode": "normalized_minus_one_to_one", "align_corners": True})
    grid = F.affine_grid(torch.from_numpy(theta).reshape(2, 2, 3), [2, 3, 4, 7], align_corners=True)
    expected = F.grid_sample(torch.from_numpy(x), grid, align_corners=True)
    close(out, expected.numpy(), 1e-5)


def test_crop_and_crop_resize() -> None:
    x = np.arange(1, 17, dtype=np.float32).reshape(1, 1, 4, 4)
    close(run_op("crop", {"x": x}, {"crop_height": [1, 0], "crop_width": [0, 2]}), x[:, :, 1:, :2])
    # iOS15 roi [N, 1, 4, 1, 1] on every image: the documented ALIGN_CORNERS results
    roi = np.array([1, 1, 2, 2], np.float32).reshape(1, 1, 4, 1, 1)
    out = run_op("crop_resize", {"x": x, "roi": roi}, {"target_height": np.int32(4), "target_width": np.int32(4),
                                                        "sampling_mode": "ALIGN_CORNERS"})
    expected = np.array([[6, 6 + 1 / 3, 6 + 2 / 3, 7], [7 + 1 / 3, 7 + 2 / 3, 8, 8 + 1 / 3],
                         [8 + 2 / 3, 9, 9 + 1 / 3, 9 + 2 / 3], [10, 10 + 1 / 3, 10 + 2 / 3, 11]], np.float32)
    close(out, expected.reshape(1, 1, 1, 4, 4), 1e-5)
    one = run_op("crop_resize", {"x": x, "roi": roi}, {"sampling_mode": "ALIGN_CORNERS"})
    close(one, np.full((1, 1, 1, 1, 1), 8.5, np.float32))
    # iOS17 boxes [N, 4] with box indices, normalized, out-of-image samples padded
    images = np.stack([x[0], x[0] * 10])
    boxes = np.array([[0.1, 0.3, 1.3, 1.0], [0.0, 0.0, 1.0, 1.0]], np.float32)
    out = run_op("crop_resize", {"x": images, "boxes": boxes}, {
        "box_indices": np.array([0, 1], np.int32), "target_height": np.int32(2), "target_width": np.int32(2),
        "normalized_coordinates": True, "sampling_mode": "ALIGN_CORNERS", "pad_value": np.float32(-1.0)})
    close(out, np.array([[[[3.1, 5.2], [-1, -1]]], [[[10, 40], [130, 160]]]], np.float32), 1e-5)


# -- tensor ops ----------------------------------------------------------------------


def test_space_to_batch_and_back() -> None:
    x = randn(2, 3, 4, 6)
    paddings = [[1, 1], [0, 2]]
    out = run_op("space_to_batch", {"x": x}, {"block_shape": [2, 4], "paddings": np.array(paddings, np.int32)})
    padded = np.pad(x, [(0, 0), (0, 0), (1, 1), (0, 2)])
    # TF's space_to_batch_nd on NHWC, written out: batch index = (row offset, column offset, image)
    expected = np.zeros((16, 3, 3, 2), np.float32)
    for a in range(2):
        for b in range(4):
            for n in range(2):
                expected[(a * 4 + b) * 2 + n] = padded[n, :, a::2, b::4]
    close(out, expected)
    back = run_op("batch_to_space", {"x": out}, {"block_shape": [2, 4], "crops": np.array(paddings, np.int32)})
    close(back, x)


def _ref_nms(boxes: np.ndarray, scores: np.ndarray, iou: float, threshold: float) -> list[int]:
    best = scores.max(-1)
    x0, y0 = boxes[:, 0] - boxes[:, 2] / 2, boxes[:, 1] - boxes[:, 3] / 2
    x1, y1 = boxes[:, 0] + boxes[:, 2] / 2, boxes[:, 1] + boxes[:, 3] / 2
    kept: list[int] = []
    for i in np.argsort(-best, kind="stable"):
        if best[i] <= threshold:
            continue
        overlaps = []
        for j in kept:
            inter = max(0, min(x1[i], x1[j]) - max(x0[i], x0[j])) * max(0, min(y1[i], y1[j]) - max(y0[i], y0[j]))
            union = boxes[i, 2] * boxes[i, 3] + boxes[j, 2] * boxes[j, 3] - inter
            overlaps.append(inter / union)
        if all(o <= iou for o in overlaps):
            kept.append(int(i))
    return kept


def test_non_maximum_suppression_both_forms() -> None:
    rng = np.random.default_rng(8)
    boxes = np.concatenate([rng.uniform(0, 10, (1, 12, 2)), rng.uniform(1, 4, (1, 12, 2))], -1).astype(np.float32)
    scores = rng.uniform(0, 1, (1, 12, 3)).astype(np.float32)
    kept = _ref_nms(boxes[0], scores[0], 0.3, 0.4)[:5]
    out_boxes, out_scores, index, count = run_op(
        "non_maximum_suppression", {"boxes": boxes, "scores": scores},
        {"iou_threshold": np.float32(0.3), "score_threshold": np.float32(0.4), "max_boxes": np.int32(5)}, outputs=4)
    assert int(count[0]) == len(kept)
    close(index[0, : len(kept)], np.array(kept, np.int32))
    assert (index[0, len(kept):] == -1).all() and not out_boxes[0, len(kept):].any()
    close(out_boxes[0, : len(kept)], boxes[0, kept])
    close(out_scores[0, : len(kept)], scores[0, kept])
    # iOS17: boxes [n, 4, B], scores [n, K, B], no score threshold, no count
    kept17 = _ref_nms(boxes[0], scores[0], 0.3, -np.inf)[:5]
    b17, s17, i17 = run_op("non_maximum_suppression",
                           {"boxes": boxes.transpose(0, 2, 1).copy(), "scores": scores.transpose(0, 2, 1).copy()},
                           {"iou_threshold": np.float32(0.3), "max_boxes": np.int32(5)}, outputs=3)
    close(i17[0, : len(kept17)], np.array(kept17, np.int32))
    close(b17[0, :, : len(kept17)], boxes[0, kept17].T)


def test_conv_quantized_linear_weights() -> None:
    x = randn(1, 2, 5, 5)
    q = np.random.default_rng(2).integers(0, 255, (3, 2, 3, 3)).astype(np.uint8)
    scale, shift = np.array([0.01, 0.02, 0.03], np.float32), np.array([-1.0, 0.0, 0.5], np.float32)
    out = run_op("conv_quantized", {"x": x}, {"weight": q, "quantization_type": "linear",
                                              "quant_scale": scale, "quant_bias": shift}, typed={"weight": "uint8"})
    w = q.astype(np.float32) * scale[:, None, None, None] + shift[:, None, None, None]
    close(out, F.conv2d(torch.from_numpy(x), torch.from_numpy(w)).numpy(), 1e-5)


# -- random --------------------------------------------------------------------------


def _random(op: str, params: dict[str, Any]) -> np.ndarray:
    return run_op(op, {}, {"shape": np.array([20000], np.int32), **params})


def test_random_ops_statistics_and_seeds() -> None:
    normal = _random("random_normal", {"mean": np.float32(2.0), "stddev": np.float32(0.5)})
    assert normal.shape == (20000,) and abs(normal.mean() - 2.0) < 0.02 and abs(normal.std() - 0.5) < 0.02
    uniform = _random("random_uniform", {"low": np.float32(-1.0), "high": np.float32(3.0)})
    assert uniform.min() >= -1.0 and uniform.max() < 3.0 and abs(uniform.mean() - 1.0) < 0.05
    bern = _random("random_bernoulli", {"prob": np.float32(0.25)})
    assert set(np.unique(bern)) <= {0.0, 1.0} and abs(bern.mean() - 0.25) < 0.02
    seeded = [_random("random_normal", {"seed": np.int32(7)}) for _ in range(2)]
    np.testing.assert_array_equal(seeded[0], seeded[1])  # a seed repeats the draws on every call
    assert not np.array_equal(_random("random_normal", {}), _random("random_normal", {}))
    logits = np.log(np.array([[0.1, 0.6, 0.3]], np.float32))
    drawn = run_op("random_categorical", {"x": logits}, {"size": np.int32(20000), "seed": np.int32(1)})
    assert drawn.shape == (1, 20000)
    np.testing.assert_allclose(np.bincount(drawn[0].astype(int), minlength=3) / 20000, [0.1, 0.6, 0.3], atol=0.02)
