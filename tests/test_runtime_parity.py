"""The runtime against the torch modules the tiny models were converted from.

Every component of every tiny style (SD1, SD2, SDXL), every attention implementation
(original, split_einsum, split_einsum_v2, and the Unet cut into two chained chunks),
fp32 and fp16 conversions, as `.mlpackage` and as compiled `.mlmodelc` fixtures.
Tolerance: max abs error <= 1e-4 of the output's scale (max abs of the reference) for
fp32 programs, <= 1e-2 for fp16 programs (which run in float32 on the CPU; the error is
the float16 rounding of the weights and of intermediate values at conversion).
The reference modules are Apple's contract wrappers (`coreml_hub.convert.wrappers`)
around the very diffusers/transformers modules whose weights were converted.
"""

from __future__ import annotations

import os
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from coreml_hub.mil import load_model
from coreml_hub.mil.model import Model

try:
    import coremltools  # noqa: F401

    from coreml_hub.testing import factory
except ImportError:  # a GPU machine may carry fixtures instead of converting them
    factory = None  # type: ignore[assignment]

pytestmark = [pytest.mark.slow, pytest.mark.runtime]
NEEDS_FACTORY = pytest.mark.skipif(factory is None, reason="coremltools is not installed: the tiny models cannot be converted")
CARRIED = os.environ.get("COREML_HUB_CUDA_FIXTURES", "")

STYLES = ("sd1", "sd2", "sdxl")
ATTENTIONS = ("original", "split_einsum", "split_einsum_v2")
PRECISIONS = ("fp32", "fp16")
TOLERANCE = {"fp32": 1e-4, "fp16": 1e-2}
CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (torch sees none here)")


@lru_cache(maxsize=3)
def _pipeline(style: str) -> Any:
    pipe, _ = factory.tiny_pipeline(style)
    return pipe


def reference_module(style: str, component: str) -> torch.nn.Module:
    from coreml_hub.convert import wrappers

    pipe = _pipeline(style)
    if component == "text_encoder":
        return wrappers.TextEncoder(pipe.text_encoder, penultimate=style == "sdxl").eval()
    if component == "text_encoder_2":
        return wrappers.TextEncoder(pipe.text_encoder_2, penultimate=True).eval()
    if component == "unet":
        return (wrappers.UnetXL if style == "sdxl" else wrappers.Unet)(pipe.unet).eval()
    if component == "vae_decoder":
        return wrappers.VAEDecoder(pipe.vae).eval()
    if component == "vae_encoder":
        return wrappers.VAEEncoder(pipe.vae).eval()
    if component == "safety_checker":
        return wrappers.SafetyChecker(pipe.safety_checker).eval()
    raise ValueError(component)


def make_inputs(model: Model, seed: int = 0) -> dict[str, np.ndarray]:
    """Inputs in the model's declared types (fp16 inputs rounded, as a caller would pass them)."""
    rng = np.random.default_rng(seed)
    out: dict[str, np.ndarray] = {}
    for d in model.input_description:
        assert d.shape is not None
        if d.name == "input_ids":
            ids = rng.integers(0, 998, d.shape)
            ids[:, 0], ids[:, d.shape[1] // 2 :] = 998, 999  # start token ... end token, padding
            value = ids.astype(np.float64)
        elif d.name == "timestep":
            value = rng.uniform(0, 999, d.shape).round()
        elif d.name == "time_ids":
            value = np.tile([64.0, 64.0, 0.0, 0.0, 64.0, 64.0], (d.shape[0], 1))
        elif d.name in ("x", "images"):
            value = rng.uniform(-1 if d.name == "x" else 0, 1, d.shape)
        elif d.name == "adjustment":
            value = np.zeros(d.shape)
        else:
            value = rng.standard_normal(d.shape)
        out[d.name] = value.astype(d.numpy_dtype)
    return out


def run_reference(style: str, component: str, inputs: dict[str, np.ndarray], names: list[str]) -> dict[str, np.ndarray]:
    module = reference_module(style, component)
    args = [torch.from_numpy(inputs[n].astype(np.float32)) for n in inputs]
    with torch.no_grad():
        result = module(*args)
    results = result if isinstance(result, tuple) else (result,)
    return {name: r.float().numpy() for name, r in zip(names, results)}


def assert_parity(actual: dict[str, np.ndarray], expected: dict[str, np.ndarray], tol: float, what: str) -> None:
    for name, ref in expected.items():
        got = actual[name].astype(np.float64)
        scale = float(np.abs(ref).max())
        err = float(np.abs(got - ref).max())
        assert got.shape == ref.shape, f"{what} {name}: shape {got.shape} != {ref.shape}"
        assert err <= tol * max(scale, 1e-6), f"{what} {name}: max abs error {err:.3g} > {tol} x scale {scale:.3g}"


def check_component(package: Path, style: str, component: str, precision: str, device: str = "cpu") -> dict[str, np.ndarray]:
    model = load_model(package, device=device)
    inputs = make_inputs(model)
    names = [d.name for d in model.output_description]
    expected = run_reference(style, component, inputs, names)
    actual = model.predict(inputs)
    # by the program, not the request: SDXL's VAE is converted in fp32 either way (it overflows in fp16)
    tol = TOLERANCE["fp16" if model.fp16_program else "fp32"]
    if component == "safety_checker":
        # the decisions are thresholds of the scores: compare them where the scores are clear of the threshold
        assert_parity({"concept_scores": actual["concept_scores"]}, {"concept_scores": expected["concept_scores"]}, tol, component)
        margin = np.abs(expected["concept_scores"]).min()
        if margin > 4 * tol * np.abs(expected["concept_scores"]).max():
            np.testing.assert_array_equal(actual["has_nsfw_concepts"], expected["has_nsfw_concepts"])
            assert_parity({"filtered_images": actual["filtered_images"]}, {"filtered_images": expected["filtered_images"]}, tol, component)
    else:
        assert_parity(actual, expected, tol, f"{style}/{component}/{precision}")
    return actual


@NEEDS_FACTORY
@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("attention", ATTENTIONS)
@pytest.mark.parametrize("style", STYLES)
def test_unet(style: str, attention: str, precision: str) -> None:
    out = factory.converted(style, attention, precision)
    package = factory.package(out, "unet")
    check_component(package, style, "unet", precision)
    # the fusions fired: attention became SDPA, the decomposed group norms F.group_norm
    stats = load_model(package).stats
    assert stats.attention_fused > 0 and stats.group_norm_fused > 0


def _other_components(style: str) -> list[str]:
    return [c for c in factory.components_of(style) if c != "unet"]


@NEEDS_FACTORY
@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("style", STYLES)
def test_other_components(style: str, precision: str) -> None:
    # text encoders, VAE and safety checker are converted once per style and precision
    out = factory.converted(style, "original", precision)
    for component in _other_components(style):
        check_component(factory.package(out, component), style, component, precision)


@NEEDS_FACTORY
@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("style", STYLES)
def test_chunked_unet(style: str, precision: str) -> None:
    out = factory.converted(style, "split_einsum", precision, chunk=True)
    first = load_model(factory.package(out, "unet_chunk1"))
    second = load_model(factory.package(out, "unet_chunk2"))
    whole = load_model(factory.package(factory.converted(style, "split_einsum", precision), "unet"))
    inputs = make_inputs(whole, seed=3)
    mid = first.predict({d.name: inputs[d.name] for d in first.input_description})
    pool = {**inputs, **mid}
    result = second.predict({d.name: pool[d.name] for d in second.input_description})
    expected = run_reference(style, "unet", inputs, ["noise_pred"])
    assert_parity(result, expected, TOLERANCE[precision], f"{style} chunked unet")


@NEEDS_FACTORY
@pytest.mark.parametrize("attention", ATTENTIONS)
def test_fusions_preserve_results(attention: str) -> None:
    """The attention and group-norm fusions change nothing beyond float32 rounding."""
    out = factory.converted("sd1", attention, "fp32")
    for component in ("unet", "vae_decoder"):
        package = factory.package(out, component)
        fused, plain = load_model(package), load_model(package, fuse=False)
        assert fused.stats.group_norm_fused > 0 and plain.stats.group_norm_fused == 0
        inputs = make_inputs(fused, seed=7)
        a, b = fused.predict(inputs), plain.predict(inputs)
        assert_parity(a, {k: v.astype(np.float64) for k, v in b.items()}, 1e-5, f"{attention} {component} fused")


@NEEDS_FACTORY
@pytest.mark.parametrize("style", ["sd1", "sdxl"])
def test_split_einsum_heads_merge_into_one_attention(style: str) -> None:
    """split_einsum's per-head attentions run as one call over all heads (and the results hold:
    test_fusions_preserve_results and test_unet run the merged form)."""
    from coreml_hub.mil import passes
    from coreml_hub.mil.model import read_program

    package = factory.package(factory.converted(style, "split_einsum", "fp32"), "unet")
    graph = passes.Graph.from_function(read_program(package).functions["main"])
    passes.optimize(graph, same_float=lambda a, b: True)
    attentions = [op for op in graph.ops if op.type == passes.ATTENTION]
    assert attentions and all("heads" in op.inputs for op in attentions)
    assert not any(op.type == "slice_by_index" and any(a.inputs.get(k) == op.outputs[0].name
                                                        for a in attentions for k in ("query", "key", "value"))
                   for op in graph.ops)


@NEEDS_FACTORY
@pytest.mark.parametrize("attention", ["original", "split_einsum"])
@pytest.mark.parametrize("style", STYLES)
def test_compiled_bundles(style: str, attention: str, tmp_path: Path) -> None:
    """`.mlmodelc` (model.mil + rewritten weights) runs exactly like its `.mlpackage`."""
    from coreml_hub.testing.compiled import build_mlmodelc

    out = factory.converted(style, attention, "fp16")
    for component in factory.components_of(style):
        package = factory.package(out, component)
        bundle = build_mlmodelc(package, tmp_path / f"{component}.mlmodelc")
        a, b = load_model(package), load_model(bundle)
        inputs = make_inputs(a, seed=5)
        pa, pb = a.predict(inputs), b.predict(inputs)
        for name in pa:
            np.testing.assert_array_equal(pa[name], pb[name], err_msg=f"{style}/{component}/{name}")
        if component == "unet":
            expected = run_reference(style, component, inputs, ["noise_pred"])
            assert_parity(pb, expected, TOLERANCE["fp16"], f"{style} compiled unet")


@NEEDS_FACTORY
def test_palettized_unet_matches_its_dequantized_weights(tmp_path: Path) -> None:
    """4-bit palettized weights, decompressed by the runtime at load, equal coremltools' own decompression."""
    import coremltools as ct
    import coremltools.optimize.coreml as cto

    out = factory.converted("sd1", "split_einsum", "fp16", quantize=4)
    package = factory.package(out, "unet")
    palettized = load_model(package)
    assert palettized.program.op_histogram()["constexpr_lut_to_dense"] > 0
    dense_path = tmp_path / "dense.mlpackage"
    cto.decompress_weights(ct.models.MLModel(str(package), skip_model_load=True)).save(str(dense_path))
    dense = load_model(dense_path)
    assert "constexpr_lut_to_dense" not in dense.program.op_histogram()
    inputs = make_inputs(palettized, seed=9)
    a, b = palettized.predict(inputs), dense.predict(inputs)
    assert_parity(a, {k: v.astype(np.float64) for k, v in b.items()}, 1e-5, "palettized vs decompressed")
    # and the palettized model is still the same network, within what 4-bit weights allow
    expected = run_reference("sd1", "unet", inputs, ["noise_pred"])
    assert_parity(a, expected, 0.5, "palettized vs source")


@NEEDS_FACTORY
@CUDA
@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("attention", ["original", "split_einsum"])
def test_cuda_parity(attention: str, precision: str) -> None:
    out = factory.converted("sd1", attention, precision)
    for component in ("text_encoder", "unet", "vae_decoder", "vae_encoder"):
        package = factory.package(out, component)
        model = load_model(package, device="cuda")
        assert model.dtype == (torch.float16 if precision == "fp16" else torch.float32)
        check_component(package, "sd1", component, precision, device="cuda")


@CUDA
@pytest.mark.skipif(not CARRIED, reason="COREML_HUB_CUDA_FIXTURES is not set (fixtures carried to a GPU machine)")
def test_cuda_carried_fixtures() -> None:
    """Compiled tiny bundles with inputs and source-module outputs computed elsewhere (bench/runtime_cuda_prepare.py)."""
    cases = sorted(Path(CARRIED).glob("*.npz"))
    assert cases, f"no fixtures in {CARRIED}"
    for case in cases:
        data = np.load(case)
        bundle = case.with_suffix(".mlmodelc")
        model = load_model(bundle, device="cuda")
        assert model.device.type == "cuda"
        assert model.dtype == (torch.float16 if model.fp16_program else torch.float32)
        inputs = {k[3:]: data[k] for k in data.files if k.startswith("in_")}
        expected = {k[4:]: data[k] for k in data.files if k.startswith("out_")}
        tensors = {k: torch.from_numpy(v).cuda() for k, v in inputs.items()}
        actual = {k: v.float().cpu().numpy() for k, v in model.predict_torch(tensors).items()}
        assert_parity(actual, expected, TOLERANCE["fp16" if model.fp16_program else "fp32"], case.stem)
