"""The plain layout (one variant per Core ML bundle): real file lists, then list/show/pull/ls/verify/inspect
end to end on tiny coremltools models published by `coreml-hub serve` in the real repos' layouts."""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import pytest

from coreml_hub import pulling, store
from coreml_hub.layouts import RepoFile, Variant, find_variants
from coreml_hub_plugins.plain import find_plain_variants, is_companion, name_tags

from _cli_helpers import cli, fetched, repo_files

DATA = Path(__file__).parent / "data" / "layouts"
PLAIN_LISTS = ("apple__coreml-depth-anything-v2-small", "apple__coreml-depth-anything-small",
               "apple__coreml-FastViT-T8", "apple__coreml-FastViT-MA36", "apple__coreml-detr-semantic-segmentation",
               "apple__coreml-mobileclip", "apple__mistral-coreml", "coreml-projects__Llama-2-7b-chat-coreml",
               "apple__coreml-sam2.1-tiny")
DEPTH = "apple/coreml-depth-anything-v2-small"
LLAMA = "coreml-projects/Llama-2-7b-chat-coreml"
ZIPPED = "test/zipped-depth"


def load(name: str) -> list[RepoFile]:
    rows = (line.split("\t") for line in (DATA / f"{name}.txt").read_text().splitlines())
    return [RepoFile(path, int(size)) for path, size in rows]


def ids(files: list[RepoFile]) -> dict[str, Variant]:
    return {v.id: v for v in find_variants(files)}


# ---------------------------------------------------------------- file lists -> variants


@pytest.mark.parametrize("name", PLAIN_LISTS)
def test_every_bundle_of_a_plain_repo_is_a_model_variant(name: str) -> None:
    files = load(name)
    variants = find_variants(files)
    bundles = {p.split(".mlpackage/")[0] for p in (f.path for f in files) if ".mlpackage/" in p}
    assert {v.id for v in variants} == bundles
    for v in variants:
        assert (v.layout, v.kind, v.attention, v.format, v.archive) == ("plain", "model", "", "packages", False)
        assert v.root == f"{v.id}.mlpackage" and v.components == (f"{v.id}.mlpackage",)
        assert not any(p in v.files for p in (".gitattributes", "README.md", "LICENSE"))
        assert v.to_dict()["kind"] == "model"


def test_precision_and_compression_tags_come_from_the_names() -> None:
    depth = ids(load("apple__coreml-depth-anything-v2-small"))
    assert {k: v.tags for k, v in depth.items()} == {
        "DepthAnythingV2SmallF32": ("fp32",),
        "DepthAnythingV2SmallF16": ("fp16",),
        "DepthAnythingV2SmallF16INT8": ("fp16", "int8"),
        "DepthAnythingV2SmallF16P6": ("fp16", "6bit", "palettized"),
        "DepthAnythingV2SmallF16P8": ("fp16", "8bit", "palettized"),
    }
    assert ids(load("apple__mistral-coreml"))["StatefulMistral7BInstructInt4"].tags == ("int4",)
    assert ids(load("apple__coreml-FastViT-MA36"))["FastViTMA36F16"].tags == ("fp16",)
    assert ids(load("apple__coreml-sam2.1-tiny"))["SAM2_1TinyImageEncoderFLOAT16"].tags == ("fp16",)
    assert ids(load("apple__coreml-mobileclip"))["mobileclip_s0_image"].tags == ()


@pytest.mark.parametrize(("name", "tags"), [
    ("model_fp16", ["fp16"]), ("model-FP32", ["fp32"]), ("ModelBF16", ["bf16"]), ("ResNet50F16", ["fp16"]),
    ("MobileNetV2Int8LUT", ["int8", "palettized"]), ("unet_6bit", ["6bit"]), ("enc_p4", ["4bit", "palettized"]),
    ("Llama-3.1-8B-W8", ["int8"]), ("SAMP2Encoder", []), ("point4", []), ("llama-2-7b-chat", []),
    ("F160Model", []), ("DepthF32P8", ["fp32", "8bit", "palettized"]),
])
def test_name_tags(name: str, tags: list[str]) -> None:
    assert name_tags(name) == tags


def test_companions_travel_with_every_variant_and_the_nearest_wins() -> None:
    (llama,) = find_variants(load("coreml-projects__Llama-2-7b-chat-coreml"))
    assert llama.extra["companions"] == ("config.json", "tokenizer.json", "tokenizer_config.json")
    assert {"config.json", "tokenizer.json", "tokenizer_config.json"} <= set(llama.files)
    assert llama.tokenizer_files == ("tokenizer.json", "tokenizer_config.json")

    files = [RepoFile(p, 10) for p in (
        "config.json", "labels.txt", "README.md", "LICENSE", "sample.png", "notes/config.json",
        "tokenizer/tokenizer.json", "image/Enc.mlpackage/Manifest.json", "image/config.json",
        "text/Enc.mlpackage/Manifest.json", "text/vocab.json", "text/merges.txt", "other/labels.txt",
    )]
    variants = ids(files)
    assert set(variants) == {"image/Enc", "text/Enc"}
    image, text = variants["image/Enc"], variants["text/Enc"]
    # the bundle's own folder first, then the folders above it; siblings' files stay out
    assert image.extra["paths"]["image/config.json"] == "config.json"
    assert "config.json" not in image.files and "notes/config.json" not in image.files
    assert "other/labels.txt" not in image.files
    assert image.extra["companions"] == ("config.json", "labels.txt", "tokenizer/tokenizer.json")
    assert text.extra["companions"] == ("config.json", "labels.txt", "merges.txt", "tokenizer/tokenizer.json",
                                        "vocab.json")
    assert text.extra["paths"]["config.json"] == "config.json"
    assert text.extra["paths"]["text/Enc.mlpackage/Manifest.json"] == "Enc.mlpackage/Manifest.json"
    assert not any(is_companion(p) for p in ("README.md", "LICENSE", "sample.png", "model.safetensors"))


def test_zipped_bundles_and_clashing_names() -> None:
    files = [RepoFile(p, 10) for p in (
        "X.mlpackage/Manifest.json", "X.mlmodelc/model.mil", "X.mlmodelc/coremldata.bin", "X.mlpackage.zip",
        "Y.mlmodelc.zip", "Z/weird.mlpackage/Manifest.json",
    )]
    variants = ids(files)
    assert set(variants) == {"X+packages", "X+compiled", "X+packages+zip", "Y", "Z/weird"}
    zipped = variants["X+packages+zip"]
    assert zipped.archive and zipped.root == "X.mlpackage.zip" and zipped.files == ("X.mlpackage.zip",)
    assert variants["Y"].format == "compiled" and variants["Y"].archive
    assert variants["X+compiled"].tags == ("compiled",)
    # `--variant` takes the bundle's path in the repo as well
    assert pulling.select_variant(list(variants.values()), "X.mlmodelc", "r").id == "X+compiled"
    assert pulling.select_variant(list(variants.values()), "Y", "r").id == "Y"


DIFFUSION_LISTS = sorted(p.stem for p in DATA.glob("*.txt")
                         if p.stem not in PLAIN_LISTS and p.stem != "apple__coreml-resnet-50")


@pytest.mark.parametrize("name", DIFFUSION_LISTS)
def test_diffusion_repos_are_left_to_their_layouts(name: str) -> None:
    assert find_plain_variants(load(name)) == []


@pytest.mark.parametrize("paths", [
    ["Unet.mlmodelc.zip"],  # a zipped pipeline component
    ["weights/TextEncoder.mlmodelc/model.mil"],  # a lone component is a partial pipeline for the flat layout
    ["Stable_Diffusion_version_org_m_unet.mlpackage/Manifest.json", "extra/Model.mlpackage/Manifest.json"],
])
def test_a_diffusion_component_keeps_the_repo_out_of_the_plain_layout(paths: list[str]) -> None:
    assert find_plain_variants([RepoFile(p, 5) for p in paths]) == []


def test_neural_network_mlmodel_files_are_no_variants() -> None:
    assert find_variants(load("apple__coreml-resnet-50")) == []


def test_default_variant_is_full_precision_on_a_cpu_and_fp16_on_a_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    variants = find_variants(load("apple__coreml-depth-anything-v2-small"))
    monkeypatch.setattr(pulling, "_accelerator_here", lambda: None)
    assert pulling.choose_variant(variants).id == "DepthAnythingV2SmallF32"
    assert pulling.default_rule_text("model") == "portable torch runtime on the CPU here: full precision (fp32) first"
    assert pulling.choose_variant([v for v in variants if "fp32" not in v.tags]).id == "DepthAnythingV2SmallF16"
    quantized = [v for v in variants if {"int8", "palettized"} & set(v.tags)]
    assert pulling.choose_variant(quantized).id in ("DepthAnythingV2SmallF16INT8", "DepthAnythingV2SmallF16P8")
    assert pulling.choose_variant([v for v in quantized if v.id.endswith(("P6", "P8"))]).id.endswith("P8")
    monkeypatch.setattr(pulling, "_accelerator_here", lambda: "cuda")
    assert pulling.choose_variant(variants).id == "DepthAnythingV2SmallF16"
    assert pulling.default_rule_text("model") == "a CUDA GPU here: fp16 first"
    mistral = find_variants(load("apple__mistral-coreml"))
    assert pulling.choose_variant(mistral).id == "StatefulMistral7BInstructFP16"


def test_accelerator_probe_imports_nothing_heavy() -> None:
    import subprocess
    import sys

    probe = ("import sys; from coreml_hub import pulling; found = pulling._accelerator_here(); "
             "print(found, 'torch' in sys.modules)")
    found, imported = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                                     check=True).stdout.split()
    assert imported == "False"
    assert found in ("None", "cuda", "mps", "coreml")
    if sys.platform != "darwin" and not Path("/dev/nvidia0").exists():
        assert found == "None"


# ---------------------------------------------------------------- end to end through `coreml-hub serve`


@pytest.fixture(scope="module")
def mirror(tmp_path_factory: pytest.TempPathFactory):
    """Three repos in real layouts, served once for the module: the depth repo, the Llama-2 repo
    (companion files), and a repo of a zipped bundle (Apple's gallery names)."""
    from coreml_hub.testing import models
    from coreml_hub.testing.hubrepo import make_repo
    from coreml_hub.testing.hubserver import HubServer

    root = tmp_path_factory.mktemp("plain-hub")
    meta = {"library_name": "coreml", "pipeline_tag": "depth-estimation", "tags": ["depth-estimation", "coreml"]}
    f16, f32 = models.depth("fp16"), models.depth("fp32")
    make_repo(root, DEPTH, {".gitattributes": "*.bin filter=lfs diff=lfs merge=lfs -text\n",
                            "README.md": "---\nlibrary_name: coreml\n---\n# Depth Anything V2 Core ML Models\n",
                            **models.bundle_files(f16, "DepthAnythingV2SmallF16.mlpackage"),
                            **models.bundle_files(f32, "DepthAnythingV2SmallF32.mlpackage")}, meta=meta)
    lm = models.text_lm()
    make_repo(root, LLAMA, {"README.md": "# Llama 2 7B chat, Core ML\n",
                            "config.json": json.dumps({"model_type": "llama", "vocab_size": models.VOCAB}),
                            "tokenizer.json": json.dumps({"version": "1.0", "model": {"type": "BPE"}}),
                            "tokenizer_config.json": json.dumps({"bos_token": "<s>"}),
                            **models.bundle_files(lm, "llama-2-7b-chat.mlpackage")},
              meta={"library_name": "coreml", "pipeline_tag": "text-generation"})
    archive = root / "zip-src.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for rel, data in models.bundle_files(f16, "DepthAnythingV2SmallF16.mlpackage").items():
            zf.writestr(zipfile.ZipInfo(rel, (2024, 6, 1, 0, 0, 0)), data)
    make_repo(root, ZIPPED, {"DepthAnythingV2SmallF16.mlpackage.zip": archive.read_bytes()},
              meta={"library_name": "coreml"})
    archive.unlink()
    server = HubServer(root, tmp_path_factory.mktemp("plain-log") / "requests.jsonl").start()
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_ENDPOINT", server.url)
        mp.setenv("COREML_HUB_HOME", str(tmp_path_factory.mktemp("plain-store")))
        mp.setattr(pulling, "_accelerator_here", lambda: None)  # the CPU rule, whatever this machine has
        try:
            yield server
        finally:
            server.stop()


@pytest.mark.slow
def test_list_and_show(mirror, capsys) -> None:
    code, out, err = cli(capsys, "list", "--json")
    assert code == 0, err
    found = {r["repo_id"]: r["variants"] for r in json.loads(out)}
    assert found[DEPTH] == ["DepthAnythingV2SmallF16", "DepthAnythingV2SmallF32"]
    assert found[LLAMA] == ["llama-2-7b-chat"] and found[ZIPPED] == ["DepthAnythingV2SmallF16"]
    code, out, err = cli(capsys, "show", LLAMA)
    assert code == 0, err
    header = next(line for line in out.splitlines() if line.startswith("VARIANT"))
    assert header.split() == ["VARIANT", "SIZE", "FORMAT", "TAGS", "BUNDLE", "WITH"]
    row = next(line for line in out.splitlines() if line.startswith("llama-2-7b-chat "))
    assert "llama-2-7b-chat.mlpackage" in row and "config.json, tokenizer.json, tokenizer_config.json" in row
    assert f"coreml-hub pull {LLAMA} --variant llama-2-7b-chat" in out
    code, out, err = cli(capsys, "show", DEPTH, "--json")
    variants = {v["id"]: v for v in json.loads(out)["variants"]}
    assert variants["DepthAnythingV2SmallF16"]["kind"] == "model" and variants["DepthAnythingV2SmallF16"]["tags"] == [
        "fp16"]
    assert variants["DepthAnythingV2SmallF32"]["files"] == repo_files(mirror, DEPTH, "DepthAnythingV2SmallF32")


@pytest.mark.slow
def test_pull_takes_only_the_variant_and_full_precision_on_the_cpu(mirror, capsys) -> None:
    mirror.clear_log()
    code, out, err = cli(capsys, "pull", DEPTH)
    assert code == 0, err
    assert ("Chose DepthAnythingV2SmallF32 (portable torch runtime on the CPU here: full precision (fp32) first); "
            "other variants: DepthAnythingV2SmallF16") in err
    assert fetched(mirror, DEPTH) == repo_files(mirror, DEPTH, "DepthAnythingV2SmallF32.mlpackage/")
    entry = Path(out.strip().splitlines()[-1])
    assert sorted(p.relative_to(entry).as_posix() for p in entry.rglob("*") if p.is_file()) == sorted(
        [store.MANIFEST_NAME] + repo_files(mirror, DEPTH, "DepthAnythingV2SmallF32.mlpackage/"))
    manifest = json.loads((entry / store.MANIFEST_NAME).read_text())
    assert manifest["validation"] == {**manifest["validation"], "status": "ok", "problems": []}
    assert manifest["variant"]["kind"] == "model" and manifest["source_model"] is None

    mirror.clear_log()  # the bundle's repo path selects a variant too
    code, out, err = cli(capsys, "pull", DEPTH, "--variant", "DepthAnythingV2SmallF16.mlpackage", "--json")
    assert code == 0, err
    assert json.loads(out)["variant"] == "DepthAnythingV2SmallF16"
    assert fetched(mirror, DEPTH) == repo_files(mirror, DEPTH, "DepthAnythingV2SmallF16.mlpackage/")

    code, out, err = cli(capsys, "ls", "--json")
    pulled = {(r["repo"], r["variant"]): r["status"] for r in json.loads(out)}
    assert pulled[(DEPTH, "DepthAnythingV2SmallF16")] == pulled[(DEPTH, "DepthAnythingV2SmallF32")] == "ok"


@pytest.mark.slow
def test_verify_and_inspect_a_pulled_model(mirror, capsys) -> None:
    ref = f"{DEPTH}:DepthAnythingV2SmallF16"
    assert cli(capsys, "pull", ref, "-q")[0] == 0
    code, out, err = cli(capsys, "verify", ref, "--hashes", "--json")
    assert code == 0, out + err
    report = json.loads(out)
    assert report["ok"] and report["problems"] == [] and report["components"] == ["DepthAnythingV2SmallF16.mlpackage"]
    code, out, err = cli(capsys, "verify", ref)
    assert code == 0 and "Valid:" in err and "Stable Diffusion" not in out + err
    code, out, err = cli(capsys, "inspect", ref, "--json")
    assert code == 0, err
    info = json.loads(out)
    assert info["inputs"] == [{"name": "image", "dtype": "fp32", "shape": [1, 3, 28, 42]}]
    assert info["outputs"] == [{"name": "depth", "dtype": "fp16", "shape": [1, 1, 28, 42]}]
    # a damaged weight file is still caught: the bundle's own checks run
    entry = Path(cli(capsys, "pull", ref, "-q")[1].strip())
    weight = entry / "DepthAnythingV2SmallF16.mlpackage/Data/com.apple.CoreML/weights/weight.bin"
    weight.chmod(0o644)
    data = weight.read_bytes()
    weight.write_bytes(data[: len(data) // 2])
    code, out, err = cli(capsys, "verify", ref)
    assert code == 1 and "weight" in out
    assert cli(capsys, "pull", ref, "--force", "-q")[0] == 0


@pytest.mark.slow
def test_companion_files_come_with_the_model(mirror, capsys) -> None:
    mirror.clear_log()
    code, out, err = cli(capsys, "pull", LLAMA)
    assert code == 0, err
    assert "Chose" not in err  # one variant: no choice to explain
    bundle = repo_files(mirror, LLAMA, "llama-2-7b-chat.mlpackage/")
    assert fetched(mirror, LLAMA) == sorted(bundle + ["config.json", "tokenizer.json", "tokenizer_config.json"])
    entry = Path(out.strip())
    assert sorted(p.name for p in entry.iterdir()) == sorted(
        [store.MANIFEST_NAME, "config.json", "llama-2-7b-chat.mlpackage", "tokenizer.json", "tokenizer_config.json"])
    code, out, err = cli(capsys, "inspect", str(entry), "--json")  # the variant folder names its one bundle
    assert code == 0, err
    assert [p["name"] for p in json.loads(out)["inputs"]] == ["input_ids", "attention_mask"]


@pytest.mark.slow
def test_a_zipped_bundle_is_extracted(mirror, capsys) -> None:
    mirror.clear_log()
    code, out, err = cli(capsys, "pull", ZIPPED, "--json")
    assert code == 0, err
    result = json.loads(out)
    assert fetched(mirror, ZIPPED) == ["DepthAnythingV2SmallF16.mlpackage.zip"]
    entry = Path(result["path"])
    assert sorted(p.name for p in entry.iterdir()) == sorted([store.MANIFEST_NAME, "DepthAnythingV2SmallF16.mlpackage"])
    assert result["validation"] == "ok"
    assert cli(capsys, "verify", f"{ZIPPED}:DepthAnythingV2SmallF16")[0] == 0
