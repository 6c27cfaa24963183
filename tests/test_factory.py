"""The tiny-model factory: tokenizer, deterministic pipelines, the conversion cache, compiled
fixtures and the Hub layouts it publishes."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import numpy as np
import pytest

from coreml_hub.testing import factory, tiny
from coreml_hub.testing.compiled import FIXTURE_MARKER, build_mlmodelc, histogram_key, is_fixture
from coreml_hub.testing.tokenizer import (
    BOS,
    EOS,
    build_vocab,
    bytes_to_unicode,
    learn_merges,
    load_clip_tokenizer,
    write_tokenizer_files,
)

pytestmark = pytest.mark.slow


# --- tokenizer ------------------------------------------------------------------------------


def test_vocab_has_clip_layout_and_exact_size(tmp_path: Path) -> None:
    vocab, merges = build_vocab(tiny.VOCAB_SIZE)
    assert len(vocab) == tiny.VOCAB_SIZE
    by_id = {i: t for t, i in vocab.items()}
    symbols = list(bytes_to_unicode().values())
    assert [by_id[i] for i in range(256)] == symbols
    assert [by_id[256 + i] for i in range(256)] == [s + "</w>" for s in symbols]
    assert by_id[512] == "".join(merges[0])
    assert vocab[BOS] == tiny.VOCAB_SIZE - 2 and vocab[EOS] == tiny.VOCAB_SIZE - 1
    vocab_path, merges_path = write_tokenizer_files(tmp_path, tiny.VOCAB_SIZE)
    lines = merges_path.read_text().splitlines()
    assert lines[0].startswith("#version") and len(lines) == len(merges) + 1
    assert json.loads(vocab_path.read_text()) == vocab


def test_merges_are_deterministic_and_greedy() -> None:
    assert learn_merges(50) == learn_merges(50)
    first = learn_merges(1, ["aa", "aa", "ab"])
    assert first == [("a", "a</w>")]  # the most frequent pair wins
    with pytest.raises(ValueError):
        build_vocab(10_000)  # the word list cannot support that many merges


def test_clip_tokenizer_reads_the_files(tmp_path: Path) -> None:
    write_tokenizer_files(tmp_path, tiny.VOCAB_SIZE)
    tok = load_clip_tokenizer(tmp_path)
    assert len(tok) == tiny.VOCAB_SIZE
    ids = tok("a photo of a cat").input_ids
    assert ids[0] == tiny.VOCAB_SIZE - 2 and ids[-1] == tiny.VOCAB_SIZE - 1
    assert all(0 <= i < tiny.VOCAB_SIZE for i in ids)
    assert "cat</w>" in tok.convert_ids_to_tokens(ids)  # a learned whole-word token
    assert tok.decode(ids, skip_special_tokens=True) == "a photo of a cat"
    padded = tok("a cat", padding="max_length", max_length=77).input_ids
    assert len(padded) == 77 and padded[-1] == tiny.VOCAB_SIZE - 1
    bang = load_clip_tokenizer(tmp_path, pad_token="!")("a cat", padding="max_length", max_length=10).input_ids
    assert bang[-1] == tok.convert_tokens_to_ids("!")


# --- pipelines ------------------------------------------------------------------------------


def _state_digest(module) -> str:  # type: ignore[no-untyped-def]
    import hashlib

    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().numpy().tobytes())
    return digest.hexdigest()


def test_pipelines_are_deterministic(tmp_path: Path) -> None:
    a = tiny.build_pipeline("sd1", tokenizer_dir=tmp_path / "a")
    b = tiny.build_pipeline("sd1", tokenizer_dir=tmp_path / "b")
    for name in ("unet", "vae", "text_encoder", "safety_checker"):
        assert _state_digest(getattr(a, name)) == _state_digest(getattr(b, name)), name


@pytest.mark.parametrize("style", tiny.UNET_STYLES)
def test_styles_are_structurally_faithful(style: str) -> None:
    pipe, folder = factory.tiny_pipeline(style)
    index = json.loads((folder / "model_index.json").read_text())
    assert (folder / "tokenizer" / "vocab.json").is_file() and (folder / "tokenizer" / "merges.txt").is_file()
    assert pipe.vae_scale_factor == 8 and len(pipe.vae.config.block_out_channels) == 4
    assert pipe.text_encoder.config.vocab_size == tiny.VOCAB_SIZE == len(pipe.tokenizer)
    for block in pipe.vae.config.block_out_channels + pipe.unet.config.block_out_channels:
        assert block % pipe.vae.config.norm_num_groups == 0
    if style == "sd1":
        assert index["_class_name"] == "StableDiffusionPipeline" and pipe.safety_checker is not None
        assert pipe.scheduler.config.prediction_type == "epsilon"
        assert pipe.tokenizer.pad_token == EOS
    elif style == "sd2":
        assert pipe.scheduler.config.prediction_type == "v_prediction"
        assert pipe.unet.config.use_linear_projection
        assert pipe.unet.config.cross_attention_dim > factory.tiny.style_config("sd1")["unet"]["cross_attention_dim"]
        assert pipe.tokenizer.pad_token == "!"
        assert pipe.safety_checker is None
    else:
        assert index["_class_name"] == "StableDiffusionXLPipeline"
        assert pipe.unet.config.addition_embed_type == "text_time"
        assert pipe.text_encoder_2.config.projection_dim is not None
        assert pipe.tokenizer_2.pad_token == "!"
        assert pipe.vae.config.scaling_factor == 0.13025


def test_sd3_and_refiner_styles_are_structurally_faithful() -> None:
    import torch

    sd3, folder = factory.tiny_pipeline("sd3")
    assert json.loads((folder / "model_index.json").read_text())["_class_name"] == "StableDiffusion3Pipeline"
    assert (folder / "tokenizer_3" / "tokenizer.json").is_file() and (folder / "tokenizer_2" / "merges.txt").is_file()
    assert sd3.transformer.config.in_channels == sd3.vae.config.latent_channels == 16
    assert (sd3.vae.config.scaling_factor, sd3.vae.config.shift_factor) == (1.5305, 0.0609)
    assert sd3.scheduler.config.shift == 3.0 and sd3.tokenizer_2.pad_token == "!"
    clip = sd3.text_encoder.config.hidden_size + sd3.text_encoder_2.config.hidden_size
    assert clip <= sd3.transformer.config.joint_attention_dim == sd3.text_encoder_3.config.d_model
    assert sd3.tokenizer_3("a cat").input_ids[-1] == 1  # T5's end token closes every text

    refiner, folder = factory.tiny_pipeline("sdxl-refiner")
    base, _ = factory.tiny_pipeline("sdxl")
    assert json.loads((folder / "model_index.json").read_text())["_class_name"] == "StableDiffusionXLImg2ImgPipeline"
    assert refiner.text_encoder is None and refiner.config.requires_aesthetics_score
    assert not refiner.config.force_zeros_for_empty_prompt
    unet = refiner.unet.config
    assert unet.cross_attention_dim == base.text_encoder_2.config.hidden_size
    assert unet.projection_class_embeddings_input_dim == (base.text_encoder_2.config.projection_dim
                                                          + 5 * unet.addition_time_embed_dim)
    for shared in ("vae", "text_encoder_2"):  # the real pair shares them; so does the tiny one
        ours, theirs = getattr(refiner, shared).state_dict(), getattr(base, shared).state_dict()
        assert all(torch.equal(ours[k], theirs[k]) for k in theirs), shared


def test_tiny_pipeline_runs_in_diffusers() -> None:
    pipe, _ = factory.tiny_pipeline("sd2")
    image = pipe("a photo of a cat", num_inference_steps=2, output_type="np").images
    assert image.shape == (1, 64, 64, 3) and np.isfinite(image).all()


# --- the cache ------------------------------------------------------------------------------


def test_cache_builds_once_across_processes(tmp_path: Path) -> None:
    """Two processes asking for one entry at once: the build runs once, both get the same folder."""
    env_cache = tmp_path / "cache"
    log = tmp_path / "builds.log"
    script = textwrap.dedent(f"""
        import os, time
        os.environ["COREML_HUB_TEST_CACHE"] = {str(env_cache)!r}
        from coreml_hub.testing import factory
        def build(tmp):
            with open({str(log)!r}, "a") as f:
                f.write("built\\n")
            time.sleep(1.5)
            (tmp / "payload").write_text("x")
        print(factory.cached("selftest", build, key=1))
    """)
    procs = [subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True) for _ in range(2)]
    outs = [p.communicate(timeout=120)[0].strip() for p in procs]
    assert all(p.returncode == 0 for p in procs)
    assert outs[0] == outs[1] and (Path(outs[0]) / "payload").read_text() == "x"
    assert log.read_text().count("built") == 1


def test_cache_keys_follow_options(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COREML_HUB_TEST_CACHE", str(tmp_path))
    assert factory.cache_dir() == tmp_path
    made = []
    a = factory.cached("k", lambda d: made.append(1), x=1)
    assert factory.cached("k", lambda d: made.append(2), x=1) == a and made == [1]
    assert factory.cached("k", lambda d: made.append(3), x=2) != a and made == [1, 3]


def test_failed_build_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COREML_HUB_TEST_CACHE", str(tmp_path))

    def broken(d: Path) -> None:
        (d / "half").write_text("x")
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError):
        factory.cached("k", broken, x=1)
    assert not any((tmp_path / "k").iterdir())


def test_converted_is_cached_and_complete() -> None:
    out = factory.converted("sd1", "split_einsum", "fp16")
    assert factory.converted("sd1", "split_einsum", "fp16") == out
    names = sorted(p.name for p in (out / "split_einsum" / "packages").iterdir())
    assert names == sorted(
        f"Stable_Diffusion_version_coreml-hub-test_tiny-sd1_{c}.mlpackage" for c in factory.components_of("sd1")
    )
    assert (out / "tokenizer" / "vocab.json").is_file() and (out / "scheduler" / "scheduler_config.json").is_file()
    assert json.loads((out / ".hub.json").read_text())["library_name"] == "coreml"


# --- compiled fixtures ----------------------------------------------------------------------


def test_histogram_keys_follow_the_compiler() -> None:
    assert histogram_key("einsum", "ios16") == "Ios16.einsum"
    assert histogram_key("constexpr_lut_to_dense", "ios16") == "Ios16.constexprLutToDense"
    assert histogram_key("layer_norm", "ios16") == "Ios16.layerNorm"
    assert histogram_key("slice_by_index", "ios16") == "SliceByIndex"
    assert histogram_key("conv", "ios15") == "Conv"


@pytest.mark.parametrize("attention", ["original", "split_einsum"])
def test_compiled_fixture_matches_the_package(attention: str, tmp_path: Path) -> None:
    from coreml_hub.mil import text
    from coreml_hub.mil.blob import open_blob_file
    from coreml_hub.mil.proto import load_program, load_spec

    pkg = factory.package(factory.converted("sd1", attention, "fp16"), "unet")
    bundle = build_mlmodelc(pkg, tmp_path / "Unet.mlmodelc")
    for rel in ("model.mil", "weights/weight.bin", "metadata.json", "coremldata.bin", "analytics/coremldata.bin"):
        assert (bundle / rel).is_file(), rel
    assert (bundle / "coremldata.bin").read_bytes() == FIXTURE_MARKER and is_fixture(bundle)

    meta = json.loads((bundle / "metadata.json").read_text())
    assert isinstance(meta, list) and len(meta) == 1
    meta = meta[0]
    spec = load_spec(pkg)
    schema = {row["name"]: row for row in meta["inputSchema"]}
    for feature in spec.description.input:
        row = schema[feature.name]
        assert row["shape"] == str(list(feature.type.multiArrayType.shape))
        assert row["dataType"] == "Float16" and row["type"] == "MultiArray"
        assert row["formattedType"].startswith("MultiArray (Float16 ")
    assert [r["name"] for r in meta["outputSchema"]] == ["noise_pred"]
    assert meta["specificationVersion"] == spec.specificationVersion == 7
    assert meta["modelType"] == {"name": "MLModelType_mlProgram"}
    hist = meta["mlProgramOperationTypeHistogram"]
    assert ("Ios16.einsum" in hist) == (attention == "split_einsum")
    program = load_program(pkg)
    counts = program.op_histogram()
    assert hist.get("Ios16.conv") == counts["conv"] and "Const" not in hist and "Ios16.const" not in hist

    parsed = text.load(bundle / "model.mil")
    assert parsed.op_histogram() == counts
    assert "coreml-hub-test-fixture" in (bundle / "model.mil").read_text().splitlines()[1]
    blobs = open_blob_file(bundle / "weights" / "weight.bin")
    for _op, _key, value in parsed.blob_values():
        ref = value.data
        blobs.info(ref.offset)  # every reference lands on a blob header
    original = {op.name: v.array() for op, _k, v in program.blob_values()}
    rebuilt = {op.name: v.array() for op, _k, v in parsed.blob_values()}
    assert original.keys() == rebuilt.keys()
    for name in original:
        assert np.array_equal(original[name], rebuilt[name]), name


def test_converted_with_compiled_has_apple_names() -> None:
    out = factory.converted("sd1", "original", "fp16", chunk=True, compiled=True)
    names = sorted(p.name for p in (out / "original" / "compiled").iterdir())
    assert names == sorted([
        "SafetyChecker.mlmodelc", "TextEncoder.mlmodelc", "Unet.mlmodelc", "UnetChunk1.mlmodelc",
        "UnetChunk2.mlmodelc", "VAEDecoder.mlmodelc", "VAEEncoder.mlmodelc", "merges.txt", "vocab.json",
    ])


# --- published layouts ----------------------------------------------------------------------


def _files(repo: Path) -> set[str]:
    from coreml_hub.testing.hubrepo import repo_file_sizes

    return set(repo_file_sizes(repo))


def _variant_ids(repo: Path) -> set[str]:
    from coreml_hub.layouts import RepoFile, find_variants
    from coreml_hub.testing.hubrepo import repo_file_sizes

    files = [RepoFile(p, s) for p, s in repo_file_sizes(repo).items()]
    return {v.id for v in find_variants(files)}


def test_publish_apple_layout(tmp_path: Path) -> None:
    from coreml_hub.testing.publish import publish

    repo = publish(tmp_path, "demo/coreml-tiny-apple", style="sd1", layout="apple")
    files = _files(repo)
    for attention in ("original", "split_einsum"):
        for comp in ("text_encoder", "unet", "unet_chunk1", "unet_chunk2", "vae_decoder", "vae_encoder",
                     "safety_checker"):
            assert (f"{attention}/packages/Stable_Diffusion_version_coreml-hub-test_tiny-sd1_{comp}.mlpackage/"
                    "Manifest.json") in files
        for bundle in ("TextEncoder", "Unet", "UnetChunk1", "UnetChunk2", "VAEDecoder", "VAEEncoder",
                       "SafetyChecker"):
            assert f"{attention}/compiled/{bundle}.mlmodelc/model.mil" in files
        assert {f"{attention}/compiled/vocab.json", f"{attention}/compiled/merges.txt"} <= files
    assert "README.md" in files and ".gitattributes" not in files  # dotfiles are not listed
    assert {"original/compiled", "original/packages", "split_einsum/compiled", "split_einsum/packages"} <= _variant_ids(repo)
    source = tmp_path / "coreml-hub-test" / "tiny-sd1"
    assert (source / "tokenizer" / "vocab.json").is_file() and (source / "model_index.json").is_file()


def test_publish_sdxl_root_zip_and_flat(tmp_path: Path) -> None:
    from coreml_hub.testing.publish import publish

    xl = publish(tmp_path, "demo/coreml-tiny-sdxl", style="sdxl", layout="apple-sdxl", chunks=False)
    files = _files(xl)
    assert "compiled/TextEncoder2.mlmodelc/model.mil" in files and "compiled/vocab.json" in files
    assert "packages/Stable_Diffusion_version_coreml-hub-test_tiny-sdxl_text_encoder_2.mlpackage/Manifest.json" in files
    with zipfile.ZipFile(xl / "coreml-tiny-sdxl_original_compiled.zip") as zf:
        assert "coreml-tiny-sdxl_original_compiled/Unet.mlmodelc/model.mil" in zf.namelist()

    mirror = publish(tmp_path, "demo/coreml-tiny-mirror", layout="root-zip", attentions=("original", "split_einsum"))
    assert _files(mirror) >= {"coreml-tiny-mirror_original_compiled.zip", "coreml-tiny-mirror_split_einsum_compiled.zip"}

    flat = publish(tmp_path, "demo/flat-compiled", layout="flat", formats=("compiled",), chunks=False)
    assert {"Unet.mlmodelc/model.mil", "vocab.json", "merges.txt"} <= _files(flat)
    odd = publish(tmp_path, "demo/flat-odd", layout="flat", formats=("compiled",), folder="mlpackages", chunks=False)
    assert "mlpackages/Unet.mlmodelc/model.mil" in _files(odd)
    assert _variant_ids(odd), "a folder named mlpackages holding compiled bundles is still a variant"


def test_publish_community_zips(tmp_path: Path) -> None:
    from coreml_hub.testing.publish import publish

    repo = publish(tmp_path, "coreml-community/coreml-tiny-sd", layout="community",
                   attentions=("original", "split_einsum"), resolutions=[(128, 192)], tags=("no-i2i",))
    files = _files(repo)
    assert files >= {
        "original/tiny-sd_no-i2i_original.zip",
        "original/128x192/tiny-sd_no-i2i_original_128x192.zip",
        "split_einsum/tiny-sd_no-i2i_split-einsum.zip",
        "split_einsum/128x192/tiny-sd_no-i2i_split-einsum_128x192.zip",
    }
    with zipfile.ZipFile(repo / "original/128x192/tiny-sd_no-i2i_original_128x192.zip") as zf:
        names = zf.namelist()
        assert not any("VAEEncoder" in n for n in names)
        meta = json.loads(zf.read("tiny-sd_no-i2i_original_128x192/VAEDecoder.mlmodelc/metadata.json"))
        assert meta[0]["outputSchema"][0]["shape"] == "[1, 3, 192, 128]"  # W x H = 128 x 192
    ids = _variant_ids(repo)
    assert "original/compiled@128x192+no-i2i" in ids and "split_einsum/compiled+no-i2i" in ids

    spaced = publish(tmp_path, "coreml-community/coreml-MeinaTiny", layout="community", attentions=("original",),
                     resolutions=(), tags=("cn",), spaces=True, hyphen_folders=True)
    assert "original/MeinaTiny Original For ControlNet.zip" in _files(spaced)
    hyphen = publish(tmp_path, "coreml-community/coreml-tiny-6", layout="community",
                     attentions=("split_einsum",), tags=("6bit",), quantize=6, hyphen_folders=True)
    assert "split-einsum/tiny-6_split-einsum_6bit.zip" in _files(hyphen)
    assert any(i.startswith("split_einsum/compiled") and "6bit" in i for i in _variant_ids(hyphen))


def test_zips_are_reproducible(tmp_path: Path) -> None:
    from coreml_hub.testing.publish import publish

    a = publish(tmp_path / "a", "demo/m", layout="root-zip", attentions=("original",))
    b = publish(tmp_path / "b", "demo/m", layout="root-zip", attentions=("original",))
    name = "m_original_compiled.zip"
    assert (a / name).read_bytes() == (b / name).read_bytes()


def test_demo_repos_serve_and_download(tmp_path: Path, hub_server) -> None:  # type: ignore[no-untyped-def]
    from huggingface_hub import snapshot_download

    from coreml_hub.testing.publish import demo_repos

    repos = demo_repos(hub_server.root)
    assert repos == ["demo/coreml-tiny-sd", "coreml-hub-test/tiny-sd1"]
    local = snapshot_download(repos[0], allow_patterns=["split_einsum/compiled/*"], endpoint=hub_server.url,
                              cache_dir=str(tmp_path / "hf"))
    bundle = Path(local) / "split_einsum" / "compiled" / "Unet.mlmodelc"
    assert json.loads((bundle / "metadata.json").read_text())[0]["mlProgramOperationTypeHistogram"]["Ios16.einsum"] > 0
