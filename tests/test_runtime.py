"""The runtime's public API on models converted here with coremltools: load, describe, check, predict.

Fusion passes are checked by running each model with and without them; numbers are
compared with the torch modules the models were converted from.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

from coreml_hub.errors import InvalidBundle, ModelInputError, UnsupportedOperation
from coreml_hub.mil import load_model
from _mil_fixtures import SAMPLES, SAMPLES_MISSING

ct = pytest.importorskip("coremltools", reason="coremltools converts the test models")

CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (torch sees none here)")


class Block(nn.Module):
    """Conv -> GroupNorm (non-trivial affine) -> attention (matmul form, causal mask) -> einsum attention."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(4, 16, 3, padding=1)
        self.norm = nn.GroupNorm(4, 16)
        self.q, self.k, self.v = nn.Linear(16, 16), nn.Linear(16, 16), nn.Linear(16, 16)
        self.out = nn.Linear(16, 8)
        with torch.no_grad():
            self.norm.weight.copy_(torch.rand(16) + 0.5)
            self.norm.bias.copy_(torch.randn(16))

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.norm(self.conv(x))  # [B, 16, 4, 4]
        b, c, hh, ww = h.shape
        tokens = h.reshape(b, c, hh * ww).transpose(1, 2)  # [B, 16 tokens, 16]
        heads, d = 2, 8
        q = self.q(tokens).reshape(b, -1, heads, d).transpose(1, 2)
        k = self.k(context).reshape(b, -1, heads, d).transpose(1, 2)
        v = self.v(context).reshape(b, -1, heads, d).transpose(1, 2)
        mask = torch.triu(torch.full((16, context.shape[1]), -1e4), diagonal=1)
        scores = torch.matmul(q, k.transpose(-1, -2)) * (1 / math.sqrt(d)) + mask
        attn = torch.matmul(scores.softmax(dim=-1), v).transpose(1, 2).reshape(b, -1, heads * d)
        # the split-einsum layout: [B, C, 1, S] with the softmax over the key axis (dim 1)
        q4 = self.q(attn).transpose(1, 2).unsqueeze(2)  # [B, C, 1, Sq]
        k4 = self.k(context).transpose(1, 2).unsqueeze(2)  # [B, C, 1, Sk]
        v4 = self.v(context).transpose(1, 2).unsqueeze(2)
        w = torch.einsum("bchq,bkhc->bkhq", q4, k4.transpose(1, 3)) * 0.25
        o = torch.einsum("bkhq,bchk->bchq", w.softmax(dim=1), v4)
        return self.out(attn), o.squeeze(2).transpose(1, 2)


def _convert(module: nn.Module, inputs: dict[str, torch.Tensor], outputs: list[str], path: Path, precision: str) -> Path:
    traced = torch.jit.trace(module.eval(), tuple(inputs.values()))
    model = ct.convert(
        traced,
        inputs=[ct.TensorType(name=k, shape=v.shape) for k, v in inputs.items()],
        outputs=[ct.TensorType(name=n) for n in outputs],
        convert_to="mlprogram",
        compute_precision=ct.precision.FLOAT16 if precision == "fp16" else ct.precision.FLOAT32,
        minimum_deployment_target=ct.target.iOS16,
    )
    model.save(str(path))
    return path


@pytest.fixture(scope="module")
def block() -> tuple[nn.Module, dict[str, np.ndarray], dict[str, np.ndarray]]:
    torch.manual_seed(0)
    module = Block().eval()
    inputs = {"x": torch.randn(2, 4, 4, 4), "context": torch.randn(2, 6, 16)}
    with torch.no_grad():
        a, b = module(*inputs.values())
    return module, {k: v.numpy() for k, v in inputs.items()}, {"y": a.numpy(), "z": b.numpy()}


@pytest.fixture(scope="module")
def packages(tmp_path_factory: pytest.TempPathFactory, block: Any) -> dict[str, Path]:
    module, inputs, _ = block
    root = tmp_path_factory.mktemp("runtime")
    tensors = {k: torch.from_numpy(v) for k, v in inputs.items()}
    return {p: _convert(module, tensors, ["y", "z"], root / f"block_{p}.mlpackage", p) for p in ("fp32", "fp16")}


def rel_error(actual: np.ndarray, expected: np.ndarray) -> float:
    return float(np.abs(actual.astype(np.float64) - expected).max() / np.abs(expected).max())


@pytest.mark.slow
def test_fp32_matches_source_and_fusions_apply(packages: dict[str, Path], block: Any) -> None:
    _, inputs, expected = block
    model = load_model(packages["fp32"])
    assert model.stats.attention_fused == 2
    assert model.stats.group_norm_fused == 1
    out = model.predict(inputs)
    for name in ("y", "z"):
        assert rel_error(out[name], expected[name]) <= 1e-5
    plain = load_model(packages["fp32"], fuse=False)
    assert plain.stats.attention_fused == 0 and plain.stats.steps > model.stats.steps
    unfused = plain.predict(inputs)
    for name in ("y", "z"):
        assert rel_error(out[name], unfused[name]) <= 1e-5


@pytest.mark.slow
def test_fp16_program_runs_in_fp32_on_cpu(packages: dict[str, Path], block: Any) -> None:
    _, inputs, expected = block
    model = load_model(packages["fp16"])
    assert model.fp16_program and model.dtype == torch.float32
    out = model.predict(inputs)
    declared = {d.name: d.numpy_dtype for d in model.output_description}
    for name in ("y", "z"):
        assert out[name].dtype == declared[name] == np.float16  # outputs come in the declared type
        assert rel_error(out[name], expected[name]) <= 1e-2
    # the same program forced to float16 arithmetic still agrees within fp16 tolerance
    half = load_model(packages["fp16"], dtype="fp16")
    assert half.dtype == torch.float16
    out16 = half.predict(inputs)
    for name in ("y", "z"):
        assert rel_error(out16[name], expected[name]) <= 2e-2


@pytest.mark.slow
def test_descriptions(packages: dict[str, Path]) -> None:
    model = load_model(packages["fp16"])
    names = [(d.name, d.shape, d.dtype) for d in model.input_description]
    assert names == [("x", (2, 4, 4, 4), "fp16"), ("context", (2, 6, 16), "fp16")]
    assert [(d.name, d.shape) for d in model.output_description] == [("y", (2, 16, 8)), ("z", (2, 16, 16))]
    assert "block_fp16.mlpackage" in repr(model)


@pytest.mark.slow
def test_predict_torch_keeps_tensors(packages: dict[str, Path], block: Any) -> None:
    _, inputs, expected = block
    model = load_model(packages["fp32"])
    out = model.predict_torch({k: torch.from_numpy(v) for k, v in inputs.items()})
    assert isinstance(out["y"], torch.Tensor) and out["y"].device.type == "cpu"
    assert rel_error(out["y"].numpy(), expected["y"]) <= 1e-5


@pytest.mark.slow
def test_inputs_are_checked(packages: dict[str, Path], block: Any) -> None:
    _, inputs, _ = block
    model = load_model(packages["fp32"])
    with pytest.raises(ModelInputError, match="missing input.*context"):
        model.predict({"x": inputs["x"]})
    with pytest.raises(ModelInputError, match="unknown input.*extra"):
        model.predict({**inputs, "extra": np.zeros(1)})
    with pytest.raises(ModelInputError, match=r"'x' has shape \[2, 4, 4, 5\], the model takes \[2, 4, 4, 4\]"):
        model.predict({**inputs, "x": np.zeros((2, 4, 4, 5), np.float32)})
    with pytest.raises(ModelInputError, match="'x' has a string type"):
        model.predict({**inputs, "x": np.full((2, 4, 4, 4), "a")})
    with pytest.raises(ModelInputError) as info:
        model.predict_torch({"x": torch.zeros(1)})
    assert info.value.hint and "context fp32[2, 6, 16]" in info.value.hint
    # castable types are accepted: float64 and integer arrays into float inputs
    out = model.predict({"x": inputs["x"].astype(np.float64), "context": inputs["context"].astype(np.int32)})
    assert np.isfinite(out["y"]).all()


@pytest.mark.slow
def test_weights_materialized_once(packages: dict[str, Path]) -> None:
    model = load_model(packages["fp32"])
    # q, k and v are each read by two attention patterns: one device tensor per weight
    pointers = [t.data_ptr() for name, t in model._fn._eager.__globals__.items() if name.startswith("c")]
    assert len(pointers) == len(set(pointers))
    weights = sum(p.numel() * 4 for p in Block().parameters())
    assert model.stats.constant_bytes <= weights * 1.05 + 4096


def test_unsupported_ops_fail_at_load(tmp_path: Path) -> None:
    from coreml_hub.mil.program import Block as MilBlock
    from coreml_hub.mil.program import Function, Operation, Program, TensorType, Var

    # every op of coremltools' MIL opsets runs; these stand for ops of a newer opset
    x = Var("x", TensorType("fp32", (2, 3)))
    ops = [
        Operation("ios99_rotate", {"x": "x"}, (Var("a", TensorType("fp32", (2, 3))),)),
        Operation("ios99_rotate", {"x": "a"}, (Var("b", TensorType("fp32", (2, 3))),)),
        Operation("ios99_swirl", {"x": "b"}, (Var("c", TensorType("fp32", (2, 3))),)),
    ]
    program = Program("1.0", {"main": Function("main", "ios16", (x,), MilBlock(ops, ("c",)))})
    from coreml_hub.mil import text

    bundle = tmp_path / "Broken.mlmodelc"
    bundle.mkdir()
    (bundle / "model.mil").write_text(text.dumps(program))
    with pytest.raises(UnsupportedOperation) as info:
        load_model(bundle)
    message = str(info.value)
    assert "Broken.mlmodelc" in message and "3 op(s) of 2 type(s)" in message
    assert "ios99_rotate (2)" in message and "ios99_swirl (1)" in message


def test_not_a_model(tmp_path: Path) -> None:
    with pytest.raises(InvalidBundle):
        load_model(tmp_path / "nothing.mlpackage")
    folder = tmp_path / "Empty.mlmodelc"
    folder.mkdir()
    with pytest.raises(InvalidBundle, match="no model.mil"):
        load_model(folder)


@pytest.mark.slow
def test_compiled_bundle_runs_like_the_package(packages: dict[str, Path], block: Any, tmp_path: Path) -> None:
    from coreml_hub.testing.compiled import build_mlmodelc

    _, inputs, _ = block
    bundle = build_mlmodelc(packages["fp16"], tmp_path / "Block.mlmodelc")
    a = load_model(packages["fp16"]).predict(inputs)
    b = load_model(bundle).predict(inputs)
    for name in ("y", "z"):
        np.testing.assert_array_equal(a[name], b[name])


@pytest.mark.slow
def test_torch_compile_option(packages: dict[str, Path], block: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    _, inputs, expected = block
    compiled = load_model(packages["fp32"], compile=True)
    out = compiled.predict(inputs)
    assert rel_error(out["y"], expected["y"]) <= 1e-4
    monkeypatch.setenv("COREML_HUB_COMPILE", "1")
    assert load_model(packages["fp32"])._fn._run is not load_model(packages["fp32"], compile=False)._fn._run


@pytest.mark.slow
def test_device_auto_picks_an_available_device(packages: dict[str, Path]) -> None:
    model = load_model(packages["fp32"], device="auto")
    assert model.device.type == ("cuda" if torch.cuda.is_available() else model.device.type)
    with pytest.raises(ValueError, match="unknown device"):
        load_model(packages["fp32"], device="tpu")


@CUDA
@pytest.mark.slow
@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_cuda_block(packages: dict[str, Path], block: Any, precision: str) -> None:
    _, inputs, expected = block
    model = load_model(packages[precision], device="cuda")
    assert model.device.type == "cuda"
    assert model.dtype == (torch.float16 if precision == "fp16" else torch.float32)
    out = model.predict_torch({k: torch.from_numpy(v).cuda() for k, v in inputs.items()})
    assert out["y"].device.type == "cuda"
    tol = 1e-2 if precision == "fp16" else 1e-4
    for name in ("y", "z"):
        assert rel_error(out[name].float().cpu().numpy(), expected[name]) <= tol


# -- models compiled by Apple's coremlc (public, third-party; see tests/data/mil/README.md) --

NEEDS_SAMPLES = pytest.mark.skipif(
    not (SAMPLES / "bundles").is_dir(),
    reason=SAMPLES_MISSING,
)


def _vad_inputs() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {"audio_input": (rng.standard_normal((1, 576)) * 0.1).astype(np.float32),
            "hidden_state": (rng.standard_normal((1, 128)) * 0.1).astype(np.float32),
            "cell_state": (rng.standard_normal((1, 128)) * 0.1).astype(np.float32)}


@NEEDS_SAMPLES
@pytest.mark.parametrize("name", ["unified_int8", "unified_palette_4bit"])
def test_apple_compiled_bundle_matches_its_package(name: str) -> None:
    """Apple-compiled `.mlmodelc` (model.mil + coremlc's weight file) runs exactly like the package it came from."""
    compiled = load_model(SAMPLES / "bundles" / f"{name}.mlmodelc")
    package = load_model(SAMPLES / "bundles" / f"{name}.mlpackage")
    assert compiled.stats.folded == package.stats.folded == 7  # the seven quantized weights, decompressed at load
    a, b = compiled.predict(_vad_inputs()), package.predict(_vad_inputs())
    assert set(a) == {"vad_output", "new_hidden_state", "new_cell_state"}
    for key in a:
        np.testing.assert_array_equal(a[key], b[key])


@NEEDS_SAMPLES
@pytest.mark.parametrize("name", ["unified_int8", "unified_palette_4bit"])
def test_apple_quantized_weights_match_coremltools_decompression(name: str, tmp_path: Path) -> None:
    import coremltools.optimize.coreml as cto

    dense = tmp_path / "dense.mlpackage"
    source = SAMPLES / "bundles" / f"{name}.mlpackage"
    cto.decompress_weights(ct.models.MLModel(str(source), skip_model_load=True)).save(str(dense))
    a = load_model(source).predict(_vad_inputs())
    b = load_model(dense).predict(_vad_inputs())
    for key in a:
        np.testing.assert_array_equal(a[key], b[key])


@NEEDS_SAMPLES
def test_apple_bundles_quantization_error_shrinks_with_bits() -> None:
    """The float model and its 2/4/6-bit palettizations: fewer bits, further from the float outputs."""
    bundles = SAMPLES / "bundles"
    reference = load_model(bundles / "silero-vad-unified-v6.0.0.mlmodelc").predict(_vad_inputs())
    errors = []
    for bits in (2, 4, 6):
        out = load_model(bundles / f"unified_palette_{bits}bit.mlmodelc").predict(_vad_inputs())
        errors.append(max(float(np.abs(out[k] - reference[k]).max()) for k in reference))
    assert errors[0] > errors[1] > errors[2]
    assert 0 < errors[2] < 0.5


@NEEDS_SAMPLES
def test_every_public_model_mil_uses_only_supported_ops() -> None:
    from coreml_hub.mil import text
    from coreml_hub.mil.executor import unsupported_ops

    files = sorted(SAMPLES.glob("*.mil")) + sorted((SAMPLES / "bundles").glob("*.mlmodelc/model.mil"))
    assert files
    for file in files:
        program = text.load(file)
        assert unsupported_ops(list(program.functions.values())) == {}, file.name
