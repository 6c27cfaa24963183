"""`coreml-hub convert`: real tiny diffusers pipelines converted by real coremltools, checked
against Apple's I/O contract, the op histogram, and (through the portable runtime) the
PyTorch modules they came from."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from _cli_helpers import default_sigint
from coreml_hub.errors import ConversionError, UnsupportedArchitecture, UsageError
from coreml_hub.testing import factory, tiny

pytestmark = pytest.mark.slow

ATTENTIONS = ("original", "split_einsum", "split_einsum_v2")


# --- helpers --------------------------------------------------------------------------------


def spec_of(path: Path) -> Any:
    from coreml_hub.convert.components import import_coremltools

    ct = import_coremltools()
    return ct.models.MLModel(str(path), skip_model_load=True).get_spec()


def io(spec: Any) -> tuple[dict[str, tuple[list[int], str]], dict[str, tuple[list[int], str]]]:
    from coremltools.proto import FeatureTypes_pb2

    name = FeatureTypes_pb2.ArrayFeatureType.ArrayDataType.Name

    def table(features: Any) -> dict[str, tuple[list[int], str]]:
        return {f.name: (list(f.type.multiArrayType.shape), name(f.type.multiArrayType.dataType)) for f in features}

    return table(spec.description.input), table(spec.description.output)


def ops(spec: Any) -> Counter[str]:
    fn = spec.mlProgram.functions["main"]
    return Counter(op.type for op in fn.block_specializations[fn.opset].operations)


def weight_bytes(package: Path) -> int:
    return (package / "Data" / "com.apple.CoreML" / "weights" / "weight.bin").stat().st_size


def contract(style: str, precision: str = "fp16", batch: int = 2, latent: tuple[int, int] = (8, 8)) -> dict[str, Any]:
    """The expected (inputs, outputs) of every component of a tiny style: ARCHITECTURE.md's table."""
    cfg = tiny.style_config(style)
    f = "FLOAT16" if precision == "fp16" else "FLOAT32"
    h, w = latent
    vae_f = "FLOAT32" if style == "sdxl" else f  # SDXL's VAE is converted in float32, as Apple does
    te = cfg["text_encoder"]["hidden_size"]
    first = "hidden_embeds" if style == "sdxl" else "last_hidden_state"
    table: dict[str, Any] = {
        "text_encoder": (
            {"input_ids": ([1, 77], "FLOAT32")},
            {first: ([1, 77, te], "FLOAT32"), "pooled_outputs": ([1, te], "FLOAT32")},
        ),
        "vae_decoder": ({"z": ([1, 4, h, w], vae_f)}, {"image": ([1, 3, h * 8, w * 8], "FLOAT32")}),
        "vae_encoder": ({"x": ([1, 3, h * 8, w * 8], vae_f)}, {"latent": ([1, 8, h, w], "FLOAT32")}),
    }
    context = cfg["unet"]["cross_attention_dim"]
    unet_in = {
        "sample": ([batch, 4, h, w], f),
        "timestep": ([batch], f),
        "encoder_hidden_states": ([batch, context, 1, 77], f),
    }
    if style == "sdxl":
        te2 = cfg["text_encoder_2"]
        table["text_encoder_2"] = (
            {"input_ids": ([1, 77], "FLOAT32")},
            {"hidden_embeds": ([1, 77, te2["hidden_size"]], "FLOAT32"),
             "pooled_outputs": ([1, te2["projection_dim"]], "FLOAT32")},
        )
        unet_in["time_ids"] = ([batch, 6], f)
        unet_in["text_embeds"] = ([batch, te2["projection_dim"]], f)
    table["unet"] = (unet_in, {"noise_pred": ([batch, 4, h, w], "FLOAT32")})
    if cfg["safety_checker"]:
        table["safety_checker"] = (
            {"clip_input": ([1, 3, 224, 224], f), "images": ([1, h * 8, w * 8, 3], f), "adjustment": ([1], f)},
            {"filtered_images": ([1, h * 8, w * 8, 3], "FLOAT32"), "has_nsfw_concepts": ([1, 1, 1, 1], "FLOAT32"),
             "concept_scores": ([1, 17], "FLOAT32")},
        )
    return table


def runtime() -> Any:
    """The portable ML Program runtime (coreml_hub.mil.model); skips with the reason when it is absent."""
    try:
        from coreml_hub.mil import model
    except ImportError as exc:  # pragma: no cover - present once the runtime lands
        pytest.skip(f"needs the portable runtime (coreml_hub.mil.model), which is not importable: {exc}")
    return model


def assert_close(got: np.ndarray, want: np.ndarray, rel: float, what: str) -> None:
    assert got.shape == want.shape, f"{what}: shape {got.shape} != {want.shape}"
    scale = max(float(np.abs(want).max()), 1e-6)
    err = float(np.abs(got.astype(np.float64) - want.astype(np.float64)).max())
    assert err <= rel * scale, f"{what}: max abs error {err:.3g} > {rel:g} x scale {scale:.3g}"


# --- contract and histogram -----------------------------------------------------------------


@pytest.mark.parametrize(
    "style,attention",
    [("sd1", a) for a in ATTENTIONS] + [("sd2", a) for a in ATTENTIONS] + [("sdxl", a) for a in ATTENTIONS],
)
def test_every_component_meets_the_contract(style: str, attention: str) -> None:
    out = factory.converted(style, attention, "fp16")
    expected = contract(style)
    packages = sorted((out / attention / "packages").glob("*.mlpackage"))
    assert sorted(p.name for p in packages) == sorted(
        f"Stable_Diffusion_version_{factory.model_version(style).replace('/', '_')}_{c}.mlpackage" for c in expected
    )
    for component, (inputs, outputs) in expected.items():
        spec = spec_of(factory.package(out, component))
        assert spec.specificationVersion >= 7 and spec.WhichOneof("Type") == "mlProgram"
        got_in, got_out = io(spec)
        assert got_in == inputs, component
        assert got_out == outputs, component
        assert list(got_in) == list(inputs), f"{component}: input order"
    unet_ops = ops(spec_of(factory.package(out, "unet")))
    if attention == "original":
        assert unet_ops["einsum"] == 0 and unet_ops["matmul"] > 0
    else:
        assert unet_ops["einsum"] > 0
        assert unet_ops["einsum"] == 2 * unet_ops["softmax"]  # scores and values, per head (and chunk)


def test_v2_chunks_queries() -> None:
    """split_einsum_v2 cuts long query sequences into chunks: more einsum ops than split_einsum."""
    v1 = ops(spec_of(factory.package(factory.converted("sd1", "split_einsum", "fp16"), "unet")))
    v2 = ops(spec_of(factory.package(factory.converted("sd1", "split_einsum_v2", "fp16"), "unet")))
    assert v2["einsum"] > v1["einsum"] > 0


def test_fp32_batch_one_and_latent_size() -> None:
    out = factory.converted("sd1", "original", "fp32")
    for component, (inputs, outputs) in contract("sd1", "fp32").items():
        assert io(spec_of(factory.package(out, component))) == (inputs, outputs), component
    one = factory.converted("sd1", "original", "fp32", batch_one=True)
    assert io(spec_of(factory.package(one, "unet"))) == contract("sd1", "fp32", batch=1)["unet"]
    wide = factory.converted("sd1", "split_einsum", "fp16", latent_size=(8, 12))
    for component, expected in contract("sd1", latent=(8, 12)).items():
        assert io(spec_of(factory.package(wide, component))) == expected, component


def test_metadata_names_the_model() -> None:
    spec = spec_of(factory.package(factory.converted("sd1", "split_einsum", "fp16"), "unet"))
    meta = spec.description.metadata
    assert meta.versionString == factory.model_version("sd1")
    assert "huggingface.co/coreml-hub-test/tiny-sd1" in meta.author
    assert meta.userDefined["com.github.coreml-hub.attention"] == "split_einsum"
    assert {f.name: f.shortDescription != "" for f in spec.description.input} == {
        "sample": True, "timestep": True, "encoder_hidden_states": True}


def test_quantized_packages_carry_lookup_tables() -> None:
    plain = factory.converted("sd1", "split_einsum", "fp16")
    out = factory.converted("sd1", "split_einsum", "fp16", quantize=6)
    for component in ("unet", "text_encoder"):
        counts = ops(spec_of(factory.package(out, component)))
        assert counts["constexpr_lut_to_dense"] > 0, component
        assert weight_bytes(factory.package(out, component)) < weight_bytes(factory.package(plain, component))
    assert ops(spec_of(factory.package(out, "vae_decoder")))["constexpr_lut_to_dense"] == 0
    assert io(spec_of(factory.package(out, "unet"))) == contract("sd1")["unet"]
    assert "6bit" in json.loads((out / ".hub.json").read_text())["tags"]


@pytest.mark.parametrize("quantize", [None, 6])
def test_chunks_chain_by_name_and_split_weights(quantize: int | None) -> None:
    out = factory.converted("sd1", "split_einsum", "fp16", chunk=True, quantize=quantize)
    unet = io(spec_of(factory.package(out, "unet")))
    one = io(spec_of(factory.package(out, "unet_chunk1")))
    two = io(spec_of(factory.package(out, "unet_chunk2")))
    assert one[0] == unet[0]  # chunk 1 takes the Unet inputs
    assert two[1] == unet[1]  # chunk 2 gives noise_pred
    from_chunk1 = {k: v for k, v in two[0].items() if k in one[1]}
    assert from_chunk1 == one[1] and from_chunk1  # every chunk-1 output feeds chunk 2, by name
    assert set(two[0]) - set(one[1]) <= set(unet[0])  # the rest are Unet inputs
    sizes = [weight_bytes(factory.package(out, c)) for c in ("unet_chunk1", "unet_chunk2")]
    total = weight_bytes(factory.package(out, "unet"))
    assert all(0.25 * total < s < 0.75 * total for s in sizes), (sizes, total)
    if quantize:
        assert all(ops(spec_of(factory.package(out, c)))["constexpr_lut_to_dense"] > 0
                   for c in ("unet_chunk1", "unet_chunk2"))


# --- numbers: Core ML (portable runtime) vs PyTorch ----------------------------------------


def _torch_reference(pipe: Any, component: str, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """What diffusers/transformers compute for the component's inputs (the Core ML contract undone)."""
    import torch
    from diffusers.models.attention_processor import AttnProcessor

    from coreml_hub.convert import wrappers

    t = {k: torch.from_numpy(np.asarray(v, dtype=np.float32)) for k, v in inputs.items()}
    xl = pipe.unet.config.addition_embed_type == "text_time"
    with torch.no_grad():
        if component in ("text_encoder", "text_encoder_2"):
            out = getattr(pipe, component)(t["input_ids"].long(), output_hidden_states=True)
            if not xl:
                return {"last_hidden_state": out.last_hidden_state.numpy(), "pooled_outputs": out.pooler_output.numpy()}
            pooled = out.text_embeds if component == "text_encoder_2" else out.pooler_output
            return {"hidden_embeds": out.hidden_states[-2].numpy(), "pooled_outputs": pooled.numpy()}
        if component == "unet":
            pipe.unet.set_attn_processor(AttnProcessor())  # diffusers' own attention as the reference
            context = t["encoder_hidden_states"].squeeze(2).transpose(1, 2)
            kw = {}
            if xl:
                kw["added_cond_kwargs"] = {"time_ids": t["time_ids"], "text_embeds": t["text_embeds"]}
            return {"noise_pred": pipe.unet(t["sample"], t["timestep"], context, **kw).sample.numpy()}
        if component == "vae_decoder":
            return {"image": pipe.vae.decode(t["z"]).sample.numpy()}
        if component == "vae_encoder":
            return {"latent": pipe.vae.quant_conv(pipe.vae.encoder(t["x"])).numpy()}
        if component == "safety_checker":
            module = wrappers.SafetyChecker(pipe.safety_checker)
            a, b, c = module(t["clip_input"], t["images"], t["adjustment"])
            return {"filtered_images": a.numpy(), "has_nsfw_concepts": b.numpy(), "concept_scores": c.numpy()}
    raise AssertionError(component)


def test_safety_wrapper_decides_like_diffusers() -> None:
    """Our traceable safety checker against diffusers' own vectorized checker (adjustment 0)."""
    import torch

    from coreml_hub.convert.wrappers import SafetyChecker

    pipe, _ = factory.tiny_pipeline("sd1")
    rng = np.random.default_rng(2)
    for scale in (0.0, 3.0):
        checker = pipe.safety_checker
        with torch.no_grad():
            clip_input = torch.from_numpy(rng.standard_normal((3, 3, 224, 224)).astype(np.float32)) * (1 + scale)
            images = torch.from_numpy(rng.uniform(0, 1, (3, 64, 64, 3)).astype(np.float32))
            want_images, want_flags = checker.forward_onnx(clip_input, images.clone())
            got_images, got_flags, scores = SafetyChecker(checker)(clip_input, images.clone(), torch.zeros(1))
        assert got_flags.shape == (3, 1, 1, 1) and scores.shape == (3, 17)
        assert torch.equal(got_flags.view(-1).bool(), want_flags.view(-1).bool())
        assert torch.allclose(got_images, want_images)


def _inputs(component: str, style: str, rng: np.random.Generator, batch: int = 2) -> dict[str, np.ndarray]:
    cfg = tiny.style_config(style)
    if component.startswith("text_encoder"):
        ids = np.full((1, 77), tiny.VOCAB_SIZE - 1, dtype=np.float32)
        ids[0, :6] = [tiny.VOCAB_SIZE - 2, 320, 1125, 539, 320, tiny.VOCAB_SIZE - 1]
        ids[0, 1:5] = rng.integers(0, tiny.VOCAB_SIZE - 2, 4)
        return {"input_ids": ids}
    if component == "unet":
        out = {
            "sample": rng.standard_normal((batch, 4, 8, 8)).astype(np.float32),
            "timestep": np.array([801.0] * batch, dtype=np.float32),
            "encoder_hidden_states": rng.standard_normal((batch, cfg["unet"]["cross_attention_dim"], 1, 77)).astype(
                np.float32),
        }
        if style == "sdxl":
            out["time_ids"] = np.array([[64, 64, 0, 0, 64, 64]] * batch, dtype=np.float32)
            out["text_embeds"] = rng.standard_normal((batch, cfg["text_encoder_2"]["projection_dim"])).astype(np.float32)
        return out
    if component == "vae_decoder":
        return {"z": rng.standard_normal((1, 4, 8, 8)).astype(np.float32)}
    if component == "vae_encoder":
        return {"x": rng.uniform(-1, 1, (1, 3, 64, 64)).astype(np.float32)}
    return {
        "clip_input": rng.standard_normal((1, 3, 224, 224)).astype(np.float32),
        "images": rng.uniform(0, 1, (1, 64, 64, 3)).astype(np.float32),
        "adjustment": np.zeros((1,), dtype=np.float32),
    }


@pytest.mark.runtime
@pytest.mark.parametrize("style", tiny.UNET_STYLES)
def test_fp32_components_match_torch(style: str) -> None:
    """fp32 conversions through the portable runtime vs the PyTorch modules: max error <= 1e-4 of scale.

    SD3's components and the SDXL refiner are checked the same way in test_sd3.py and test_refiner.py.
    """
    model = runtime()
    pipe, _ = factory.tiny_pipeline(style)
    out = factory.converted(style, "original", "fp32")
    rng = np.random.default_rng(7)
    for component in factory.components_of(style):
        inputs = _inputs(component, style, rng)
        got = model.load_model(factory.package(out, component), dtype="fp32").predict(inputs)
        want = _torch_reference(pipe, component, inputs)
        assert set(got) == set(want), component
        for name in want:
            assert_close(np.asarray(got[name]), want[name], 1e-4, f"{style} {component}.{name}")


@pytest.mark.runtime
@pytest.mark.parametrize("attention", ["split_einsum", "split_einsum_v2"])
def test_fp32_unet_attention_forms_match_torch(attention: str) -> None:
    model = runtime()
    pipe, _ = factory.tiny_pipeline("sd1")
    out = factory.converted("sd1", attention, "fp32")
    inputs = _inputs("unet", "sd1", np.random.default_rng(3))
    got = model.load_model(factory.package(out, "unet"), dtype="fp32").predict(inputs)["noise_pred"]
    assert_close(np.asarray(got), _torch_reference(pipe, "unet", inputs)["noise_pred"], 1e-4, attention)


@pytest.mark.runtime
def test_safety_checker_flags_with_adjustment() -> None:
    model = runtime()
    pipe, _ = factory.tiny_pipeline("sd1")
    checker = model.load_model(factory.package(factory.converted("sd1", "original", "fp32"), "safety_checker"),
                               dtype="fp32")
    inputs = _inputs("safety_checker", "sd1", np.random.default_rng(1))
    calm = checker.predict(inputs)
    hot = checker.predict({**inputs, "adjustment": np.array([5.0], dtype=np.float32)})
    assert calm["has_nsfw_concepts"].shape == (1, 1, 1, 1)
    flagged = float(hot["has_nsfw_concepts"].ravel()[0])
    assert flagged in (0.0, 1.0)
    if flagged:
        assert not hot["filtered_images"].any()
    want = _torch_reference(pipe, "safety_checker", {**inputs, "adjustment": np.array([5.0], np.float32)})
    assert float(want["has_nsfw_concepts"].ravel()[0]) == flagged


@pytest.mark.runtime
def test_chunks_compute_the_unet() -> None:
    model = runtime()
    out = factory.converted("sd1", "split_einsum", "fp16", chunk=True)
    rng = np.random.default_rng(5)
    inputs = {k: v.astype(np.float16) for k, v in _inputs("unet", "sd1", rng).items()}
    full = model.load_model(factory.package(out, "unet")).predict(inputs)["noise_pred"]
    first = model.load_model(factory.package(out, "unet_chunk1")).predict(inputs)
    second = model.load_model(factory.package(out, "unet_chunk2"))
    feed = {d.name: (first[d.name] if d.name in first else inputs[d.name]) for d in second.input_description}
    chained = second.predict(feed)["noise_pred"]
    assert_close(np.asarray(chained), np.asarray(full), 1e-3, "chunk1 -> chunk2 vs unet")


@pytest.mark.runtime
def test_fp16_unet_is_close_to_torch() -> None:
    model = runtime()
    pipe, _ = factory.tiny_pipeline("sd1")
    out = factory.converted("sd1", "split_einsum", "fp16")
    inputs = _inputs("unet", "sd1", np.random.default_rng(9))
    got = model.load_model(factory.package(out, "unet")).predict({k: v.astype(np.float16) for k, v in inputs.items()})
    assert_close(np.asarray(got["noise_pred"], dtype=np.float32),
                 _torch_reference(pipe, "unet", inputs)["noise_pred"], 3e-2, "fp16 unet")


# --- attention processors (pure PyTorch) ---------------------------------------------------


@pytest.mark.parametrize("implementation", ATTENTIONS)
@pytest.mark.parametrize("cross", [False, True])
def test_processors_compute_diffusers_attention(implementation: str, cross: bool) -> None:
    import torch
    from diffusers.models.attention_processor import Attention, AttnProcessor

    from coreml_hub.convert.attention import make_processor

    torch.manual_seed(0)
    attn = Attention(query_dim=32, cross_attention_dim=24 if cross else None, heads=4, dim_head=8, bias=True).eval()
    x = torch.randn(2, 50, 32)
    context = torch.randn(2, 7, 24) if cross else None
    with torch.no_grad():
        attn.set_processor(AttnProcessor())
        want = attn(x, encoder_hidden_states=context)
        attn.set_processor(make_processor(implementation, query_chunk_size=16))  # 50 = 16 + 16 + 16 + 2
        got = attn(x, encoder_hidden_states=context)
    assert torch.allclose(got, want, atol=1e-5), float((got - want).abs().max())


def test_processor_handles_vae_style_attention() -> None:
    """4-D input, group norm, residual connection and output rescale (the VAE's mid-block attention)."""
    import torch
    from diffusers.models.attention_processor import Attention, AttnProcessor

    from coreml_hub.convert.attention import make_processor

    torch.manual_seed(1)
    attn = Attention(query_dim=16, heads=1, dim_head=16, norm_num_groups=8, residual_connection=True,
                     rescale_output_factor=2.0, bias=True, upcast_softmax=True, _from_deprecated_attn_block=True).eval()
    x = torch.randn(1, 16, 6, 5)
    with torch.no_grad():
        attn.set_processor(AttnProcessor())
        want = attn(x)
        for implementation in ATTENTIONS:
            attn.set_processor(make_processor(implementation, query_chunk_size=7))
            assert torch.allclose(attn(x), want, atol=1e-5), implementation


# --- outputs beside the packages ------------------------------------------------------------


def test_output_is_a_repo_with_tokenizer_and_scheduler() -> None:
    from coreml_hub.testing.tokenizer import load_clip_tokenizer

    out = factory.converted("sdxl", "split_einsum", "fp16")
    _, folder = factory.tiny_pipeline("sdxl")
    for name in ("tokenizer", "tokenizer_2"):
        ours = load_clip_tokenizer(out / name, pad_token="!" if name == "tokenizer_2" else "<|endoftext|>")
        src = load_clip_tokenizer(folder / name)
        assert ours("a photo of a cat").input_ids == src("a photo of a cat").input_ids
    assert json.loads((out / "scheduler" / "scheduler_config.json").read_text()) == json.loads(
        (folder / "scheduler" / "scheduler_config.json").read_text())
    card = (out / "README.md").read_text()
    assert card.startswith("---\nlibrary_name: coreml\npipeline_tag: text-to-image\n")
    meta = json.loads((out / ".hub.json").read_text())
    assert meta["library_name"] == "coreml" and meta["pipeline_tag"] == "text-to-image"
    assert "stable-diffusion-xl" in meta["tags"]


def test_tokenizer_json_only_source_gets_vocab_and_merges(tmp_path: Path) -> None:
    """transformers 5 saves tokenizers as tokenizer.json only: the output still has vocab.json + merges.txt."""
    from coreml_hub.convert import convert
    from coreml_hub.testing.tokenizer import load_clip_tokenizer

    src = tmp_path / "pipe"
    shutil.copytree(factory.pipeline_folder("sd1"), src)
    (src / "tokenizer" / "vocab.json").unlink()
    (src / "tokenizer" / "merges.txt").unlink()
    result = convert(src, tmp_path / "out", components="vae_decoder", attention="original", progress=False)
    assert result.model_version == "pipe"
    ours = load_clip_tokenizer(result.out / "tokenizer")
    ref = load_clip_tokenizer(factory.pipeline_folder("sd1") / "tokenizer")
    prompt = "a high quality photo of an astronaut riding a horse in space"
    assert ours(prompt).input_ids == ref(prompt).input_ids


# --- failures -------------------------------------------------------------------------------


def _copy_pipeline(tmp_path: Path, style: str = "sd1") -> Path:
    dest = tmp_path / "pipe"
    shutil.copytree(factory.pipeline_folder(style), dest)
    return dest


def test_unsupported_architecture(tmp_path: Path) -> None:
    from coreml_hub.convert import convert

    src = _copy_pipeline(tmp_path)
    index = json.loads((src / "model_index.json").read_text())
    index["_class_name"] = "FluxPipeline"
    (src / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(UnsupportedArchitecture, match="FluxPipeline"):
        convert(src, tmp_path / "out", progress=False)


def test_missing_files_are_named(tmp_path: Path) -> None:
    from coreml_hub.convert import convert

    src = _copy_pipeline(tmp_path)
    (src / "unet" / "diffusion_pytorch_model.safetensors").unlink()
    with pytest.raises(ConversionError, match="unet/"):
        convert(src, tmp_path / "out", progress=False)
    with pytest.raises(ConversionError, match="model_index.json"):
        convert(src / "unet", tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").rglob("*.mlpackage"))


def test_bad_options(tmp_path: Path) -> None:
    from coreml_hub.convert import convert

    folder = factory.pipeline_folder("sd2")
    with pytest.raises(UsageError):
        convert(folder, tmp_path / "o", components="unet,refiner", progress=False)
    with pytest.raises(UsageError):
        convert(folder, tmp_path / "o", quantize_nbits=3, progress=False)
    with pytest.raises(UsageError):
        convert(folder, tmp_path / "o", attention="flash", progress=False)
    with pytest.raises(ConversionError, match="safety_checker"):
        convert(folder, tmp_path / "o", components="safety_checker", progress=False)


def test_converter_failure_names_the_component(tmp_path: Path) -> None:
    """A Unet whose forward needs class labels (class_embed_type) cannot be traced with the SD inputs."""
    from coreml_hub.convert import convert

    src = _copy_pipeline(tmp_path)
    config = json.loads((src / "unet" / "config.json").read_text())
    config["class_embed_type"] = "timestep"
    (src / "unet" / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConversionError, match="unet"):
        convert(src, tmp_path / "out", components="unet", progress=False)
    leftovers = [p for p in (tmp_path / "out").rglob("*") if p.name.endswith(".mlpackage")]
    assert leftovers == []


def test_unsupported_unet_conditioning(tmp_path: Path) -> None:
    from coreml_hub.convert import convert

    src = _copy_pipeline(tmp_path, "sd2")
    config = json.loads((src / "unet" / "config.json").read_text())
    config.update(addition_embed_type="text", encoder_hid_dim=None)
    (src / "unet" / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConversionError, match="unet"):
        convert(src, tmp_path / "out", components="unet", progress=False)


# --- compiled format ------------------------------------------------------------------------


def test_compiler_command_and_availability() -> None:
    from coreml_hub.convert.compile import compiler_available, compiler_command

    cmd = compiler_command(Path("/x/Stable_Diffusion_version_a_b_unet.mlpackage"), Path("/y/compiled"))
    assert cmd == ["xcrun", "coremlcompiler", "compile", "/x/Stable_Diffusion_version_a_b_unet.mlpackage",
                   "/y/compiled"]
    ok, reason = compiler_available()
    if sys.platform != "darwin":
        assert not ok and "macOS" in reason


@pytest.mark.skipif(sys.platform == "darwin", reason="on macOS the real compiler runs (next test)")
def test_compiled_format_off_macos_is_a_clear_error(tmp_path: Path) -> None:
    from coreml_hub.convert import convert

    with pytest.raises(ConversionError, match="coremlcompiler") as info:
        convert(factory.pipeline_folder("sd1"), tmp_path / "out", format="compiled", progress=False)
    assert info.value.hint and "packages" in info.value.hint
    assert not (tmp_path / "out").exists()


@pytest.mark.skipif(sys.platform != "darwin", reason="Apple's coremlcompiler exists only on macOS with Xcode")
def test_compiled_format_on_macos(tmp_path: Path) -> None:  # pragma: no cover - macOS only
    from coreml_hub.convert import convert
    from coreml_hub.convert.compile import compiler_available

    ok, reason = compiler_available()
    if not ok:
        pytest.skip(reason)
    result = convert(factory.pipeline_folder("sd1"), tmp_path / "out", components="vae_decoder", format="compiled",
                     progress=False)
    bundle = result.out / "split_einsum" / "compiled" / "VAEDecoder.mlmodelc"
    assert (bundle / "coremldata.bin").is_file() and (bundle / "model.mil").is_file()


# --- from the Hub, and the CLI --------------------------------------------------------------


def test_convert_from_hub_fetches_only_what_it_needs(tmp_path: Path, hub_server) -> None:  # type: ignore[no-untyped-def]
    from coreml_hub.convert import convert
    from coreml_hub.testing.publish import publish_source

    repo = "coreml-hub-test/tiny-sd1"
    publish_source(hub_server.root, "sd1")
    hub_server.clear_log()
    result = convert(repo, tmp_path / "out", components=["text_encoder"], attention="original", progress=False)
    assert result.model_version == repo
    assert result.packages["text_encoder"].name == "Stable_Diffusion_version_coreml-hub-test_tiny-sd1_text_encoder.mlpackage"
    fetched = {r["path"] for r in hub_server.requests() if "/resolve/" in r["path"]}
    names = {p.split("/resolve/", 1)[1].split("/", 1)[1] for p in fetched}
    assert "text_encoder/model.safetensors" in names and "tokenizer/vocab.json" in names
    assert not any(n.startswith(("unet/", "vae/", "safety_checker/")) and n.endswith(".safetensors") for n in names)
    assert (result.out / "tokenizer" / "merges.txt").is_file()


def test_convert_from_missing_hub_repo(tmp_path: Path, hub_server) -> None:  # type: ignore[no-untyped-def]
    from coreml_hub.cli import run_cli
    from coreml_hub.errors import RepoNotFound
    from coreml_hub.convert import convert

    with pytest.raises(RepoNotFound):
        convert("nobody/nothing", tmp_path / "out", progress=False)
    assert run_cli(["convert", "nobody/nothing", "-o", str(tmp_path / "out")]) == 1


@pytest.mark.extended  # extended tier: a whole conversion in a subprocess
def test_cli_end_to_end(tmp_path: Path) -> None:
    out = tmp_path / "out"
    env = {**os.environ, "COREML_HUB_TEST_CACHE": str(factory.cache_dir())}
    proc = subprocess.run(
        [sys.executable, "-m", "coreml_hub", "convert", str(factory.pipeline_folder("sd1")), "-o", str(out),
         "--attention", "original", "--components", "text_encoder,vae_decoder", "--model-version", "acme/tiny",
         "--json"],
        capture_output=True, text=True, timeout=600, env=env,
    )
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout)
    assert [c["name"] for c in data["components"]] == ["text_encoder", "vae_decoder"]
    assert (out / "original" / "packages" / "Stable_Diffusion_version_acme_tiny_vae_decoder.mlpackage").is_dir()
    assert data["model_version"] == "acme/tiny" and data["image_size"] == [64, 64]


def _convert_cli(args: list[str]) -> tuple[list[str], dict[str, str]]:
    env = {k: v for k, v in os.environ.items() if k != "HF_HUB_DISABLE_PROGRESS_BARS"}  # bars as a user has them
    env["COREML_HUB_TEST_CACHE"] = str(factory.cache_dir())
    return [sys.executable, "-m", "coreml_hub", "convert", *args], env


@pytest.mark.extended  # extended tier: a whole conversion in a subprocess
def test_cli_quiet_prints_only_out_even_while_downloading(tmp_path: Path, hub_server) -> None:  # type: ignore[no-untyped-def]
    from coreml_hub.testing.publish import publish_source

    publish_source(hub_server.root, "sd1")
    out = tmp_path / "quiet"
    cmd, env = _convert_cli(["coreml-hub-test/tiny-sd1", "--attention", "original", "--components", "vae_decoder",
                             "-o", str(out), "-q"])
    env["HF_HOME"] = str(tmp_path / "hf")  # a cold download, as on a new machine: huggingface_hub has bars to show
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == "" and proc.stdout.strip() == str(out)
    assert (out / "original" / "packages").is_dir()


def _interrupt_when_a_package_appears(out: Path) -> tuple[int, str]:
    """`convert` of the tiny SD1 pipeline into `out`, sent SIGINT once its first package exists."""
    import signal
    import time

    cmd, env = _convert_cli([str(factory.pipeline_folder("sd1")), "-o", str(out), "--attention", "original"])
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            preexec_fn=default_sigint)
    try:
        deadline = time.monotonic() + 600
        while not any(out.rglob("*.mlpackage")) and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert proc.poll() is None, "the conversion ended before a package was written"
        proc.send_signal(signal.SIGINT)
        _out, err = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    return proc.returncode, err


@pytest.mark.extended  # extended tier: conversions in a subprocess
def test_ctrl_c_leaves_nothing_that_looks_like_a_conversion(tmp_path: Path) -> None:
    import signal

    from coreml_hub.convert import convert

    out = tmp_path / "out"
    out.mkdir()
    (out / "mine.txt").write_text("kept")
    code, err = _interrupt_when_a_package_appears(out)
    assert code in (-signal.SIGINT, 130) and "Interrupted." in err, err
    assert sorted(p.name for p in out.iterdir()) == ["mine.txt"]  # no package, no half-written folder, mine kept

    def interrupt(line: str) -> None:  # Ctrl-C as the first component is done
        raise KeyboardInterrupt

    fresh = tmp_path / "fresh"
    with pytest.raises(KeyboardInterrupt):
        convert(factory.pipeline_folder("sd1"), fresh, attention="original", components=["vae_decoder", "vae_encoder"],
                progress=False, on_message=interrupt)
    assert not fresh.exists()  # a folder the conversion made is not left behind


def test_cli_progress_and_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from coreml_hub.cli import run_cli

    code = run_cli(["convert", str(factory.pipeline_folder("sd2")), "-o", str(tmp_path / "o"),
                    "--components", "vae_encoder", "--attention", "original"])
    captured = capsys.readouterr()
    assert code == 0
    assert "vae_encoder" in captured.err and "Converted" in captured.err
    assert "vae_encoder" in captured.out  # the table of what was written
    # no terminal (a log): one plain line per component, no bar redrawn with carriage returns
    assert "\r" not in captured.err
    lines = captured.err.splitlines()
    assert lines[0].startswith("vae_encoder: ") and " KB in " in lines[0], captured.err
    assert lines[-1].startswith("Converted ") and "(original, fp16, 64x64)" in lines[-1]
    assert run_cli(["convert", str(tmp_path / "nowhere"), "-o", str(tmp_path / "o")]) == 1
    assert "Error:" in capsys.readouterr().err
    assert run_cli(["convert", str(factory.pipeline_folder("sd2")), "-o", str(tmp_path / "o"),
                    "--quantize-nbits", "3"]) == 2


def test_a_later_conversion_removes_what_a_killed_one_left(tmp_path: Path) -> None:
    """A conversion killed outright (SIGKILL: no chance to clean up) leaves its hidden staging folder;
    the next conversion into OUT removes it, and leaves those of live conversions and other hosts."""
    import socket

    from coreml_hub.convert.api import PARTIAL_PREFIX, _partial_name, remove_stale_partials

    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()  # a pid whose process has ended
    host = socket.gethostname()
    out = tmp_path / "out"
    dead = out / f"{PARTIAL_PREFIX}{host}-{gone.pid}-0123456789ab"
    live = out / _partial_name()  # this process: still converting
    other_host = out / f"{PARTIAL_PREFIX}another-host-{gone.pid}-0123456789ab"
    for folder in (dead, live, other_host):
        (folder / "original" / "packages").mkdir(parents=True)
    assert remove_stale_partials(out) == [dead]
    assert not dead.exists() and live.is_dir() and other_host.is_dir()
    assert remove_stale_partials(tmp_path / "missing") == []
