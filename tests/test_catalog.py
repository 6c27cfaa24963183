"""`coreml-hub list` and `show` against `serve`, on repos laid out with the Hub's real file names."""

from __future__ import annotations

import json
import re
from datetime import datetime
from pathlib import Path

import pytest

from coreml_hub import hub
from coreml_hub.cli import run_cli
from coreml_hub.testing.hubrepo import apple_sd_files, apple_sdxl_files, compiled_bundle, make_repo
from coreml_hub.testing.hubserver import HubServer

V15 = "apple/coreml-stable-diffusion-v1-5"
CORE_ML = {"library_name": "coreml", "pipeline_tag": "text-to-image"}


def lay_out_catalog(root: Path) -> None:
    """One repo per known layout (ARCHITECTURE.md, "Hub layouts"), plus one that is not Core ML."""
    make_repo(root, V15, apple_sd_files(), meta={
        **CORE_ML, "likes": 520, "downloads": 9_100, "tags": ["stable-diffusion"],
        "lastModified": "2024-03-01T10:00:00.000Z"})
    make_repo(root, "apple/coreml-stable-diffusion-2-1-base",
              apple_sd_files("stabilityai/stable-diffusion-2-1-base", safety_checker=False), meta={
                  **CORE_ML, "likes": 300, "downloads": 1_500, "lastModified": "2023-06-01T00:00:00.000Z"})
    make_repo(root, "apple/coreml-stable-diffusion-xl-base", apple_sdxl_files(), meta={
        **CORE_ML, "likes": 900, "downloads": 2_000, "tags": ["stable-diffusion-xl"],
        "lastModified": "2023-08-01T00:00:00.000Z"})
    make_repo(root, "apple/coreml-stable-diffusion-v1-5-palettized", {
        "README.md": "x",
        "coreml-stable-diffusion-v1-5-palettized_original_compiled.zip": 3_000,
        "coreml-stable-diffusion-v1-5-palettized_split_einsum_compiled.zip": 3_100,
        "coreml-stable-diffusion-v1-5-palettized_split_einsum_v2_compiled.zip": 3_200,
    }, meta={**CORE_ML, "likes": 40, "downloads": 700})
    mbp = {"recipes/sdxl_recipe.json": "{}", "README.md": "x",
           "coreml-stable-diffusion-xl-base_mbp_4_50_palettized.zip": 5_000}
    for component in ("text_encoder", "text_encoder_2", "unet", "vae_decoder", "vae_encoder"):
        mbp.update(compiled_bundle("coreml-stable-diffusion-xl-base_mbp_4_50_palettized/compiled", component))
    mbp.update({"coreml-stable-diffusion-xl-base_mbp_4_50_palettized/compiled/merges.txt": "#",
                "coreml-stable-diffusion-xl-base_mbp_4_50_palettized/compiled/vocab.json": "{}"})
    mbp.update({f"unet-mbp-sdxl-1-base/recipe_4_50_bit_mixedpalette/Unet.mlmodelc/{k.split('Unet.mlmodelc/')[1]}": v
                for k, v in compiled_bundle("", "unet").items()})
    make_repo(root, "apple/coreml-stable-diffusion-mixed-bit-palettization", mbp, meta={**CORE_ML, "likes": 60})
    make_repo(root, "pcuenq/coreml-stable-diffusion-v1-5", {
        "coreml-stable-diffusion-v1-5_original_compiled.zip": 4_000,
        "coreml-stable-diffusion-v1-5_split_einsum_compiled.zip": 4_100,
    }, meta={**CORE_ML, "likes": 3, "downloads": 50})
    make_repo(root, "coreml-community/coreml-stable-diffusion-v1-5", {
        "README.md": "x",
        "split_einsum/stable-diffusion-v1-5_split-einsum_compiled.zip": 2_000,
        "original/512x768/stable-diffusion-v1-5_original_512x768.zip": 2_100,
    }, meta={**CORE_ML, "likes": 15, "downloads": 300})
    make_repo(root, "coreml-community/coreml-AnythingXL", {
        "split-einsum/1024x1024/AnythingX_split-einsum_6bit_1024x1024.zip": 2_200,
    }, meta={**CORE_ML, "likes": 12, "downloads": 250})
    make_repo(root, "coreml-community/coreml-MeinaMix", {
        "original/512x512/MeinaMix v9.0 Original 512x512 For ControlNet.zip": 2_300,
        "split_einsum/MeinaMix-v9_split-einsum_cn.zip": 2_400,
        "original/MeinaMix-v9_original_no-i2i.zip": 2_500,
    }, meta={**CORE_ML, "likes": 11, "downloads": 200})
    flat = {"README.md": "x", "merges.txt": "#", "vocab.json": "{}"}
    for component in ("text_encoder", "unet", "vae_decoder"):
        flat.update(compiled_bundle("", component))
    make_repo(root, "someone/flat-sd", flat, meta={**CORE_ML, "likes": 2, "downloads": 10})
    misnamed = {"mlpackages/merges.txt": "#", "mlpackages/vocab.json": "{}"}
    for component in ("text_encoder", "unet", "vae_decoder", "vae_encoder"):
        misnamed.update(compiled_bundle("mlpackages", component))
    make_repo(root, "someone/misnamed-folder", misnamed, meta={**CORE_ML, "likes": 1, "downloads": 5})
    make_repo(root, "someone/pytorch-only", {"unet/diffusion_pytorch_model.safetensors": 3_000},
              meta={"library_name": "diffusers", "likes": 9_999, "downloads": 99_999})


@pytest.fixture
def catalog(hub_server: HubServer) -> HubServer:
    lay_out_catalog(hub_server.root)
    return hub_server


def show_json(repo: str, capsys: pytest.CaptureFixture[str], *extra: str) -> dict:
    assert run_cli(["show", repo, "--json", *extra]) == 0, capsys.readouterr().err
    return json.loads(capsys.readouterr().out)


def sizes_in(root: Path, repo: str) -> dict[str, int]:
    folder = root / repo
    return {p.relative_to(folder).as_posix(): p.stat().st_size for p in folder.rglob("*")
            if p.is_file() and not p.name.startswith(".")}


# --- show ------------------------------------------------------------------------------------------


def test_show_apple_sd15(catalog: HubServer, capsys: pytest.CaptureFixture[str]) -> None:
    doc = show_json(V15, capsys)
    variants = {v["id"]: v for v in doc["variants"]}
    assert set(variants) == {"original/compiled", "original/packages", "split_einsum/compiled",
                             "split_einsum/packages"}
    sizes = sizes_in(catalog.root, V15)
    for v in variants.values():
        assert v["size_bytes"] == sum(sizes[f] for f in v["files"])  # SIZE is what the pull fetches
        full = any("/Unet.mlmodelc/" in f or "_unet.mlpackage/" in f for f in v["files"])
        chunked = any("UnetChunk1" in f or "_unet_chunk1.mlpackage/" in f for f in v["files"])
        assert full != chunked, "a variant fetches one Unet form, never both"
        assert set(v["unet_form_sizes"]) == {"full", "chunked"}
        assert v["pull_command"] == f"coreml-hub pull {V15} --variant {v['id']}"
    compiled = variants["split_einsum/compiled"]
    assert {"text_encoder", "vae_decoder", "vae_encoder", "safety_checker"} <= set(compiled["components"])
    assert "split_einsum/compiled/vocab.json" in compiled["files"]
    assert compiled["attention"] == "split_einsum" and compiled["format"] == "compiled"
    assert doc["sha"] == hub.repo_files(V15).sha and doc["likes"] == 520


def test_show_table_has_pull_commands(catalog: HubServer, capsys: pytest.CaptureFixture[str]) -> None:
    assert run_cli(["show", V15]) == 0
    out = capsys.readouterr().out
    header = next(line for line in out.splitlines() if line.startswith("VARIANT"))
    assert re.split(r"\s{2,}", header) == ["VARIANT", "SIZE", "ATTENTION", "FORMAT", "RESOLUTION", "TAGS", "UNET",
                                           "COMPONENTS"]
    assert f"coreml-hub pull {V15} --variant split_einsum/compiled" in out
    assert re.search(r"^original/packages\s+\d+\.\d KB\s+original\s+packages", out, re.M)


def test_show_sd21_has_no_safety_checker(catalog: HubServer, capsys: pytest.CaptureFixture[str]) -> None:
    doc = show_json("apple/coreml-stable-diffusion-2-1-base", capsys)
    assert len(doc["variants"]) == 4
    assert all("safety_checker" not in v["components"] for v in doc["variants"])


def test_show_sdxl(catalog: HubServer, capsys: pytest.CaptureFixture[str]) -> None:
    doc = show_json("apple/coreml-stable-diffusion-xl-base", capsys)
    variants = {v["id"]: v for v in doc["variants"]}
    assert {"original/compiled", "original/packages"} <= set(variants)
    assert "text_encoder_2" in variants["original/packages"]["components"]


def test_show_zip_mirrors_and_palettized(catalog: HubServer, capsys: pytest.CaptureFixture[str]) -> None:
    doc = show_json("pcuenq/coreml-stable-diffusion-v1-5", capsys)
    assert {v["id"] for v in doc["variants"]} == {"original/compiled", "split_einsum/compiled"}
    assert all(v["archive"] and len(v["files"]) == 1 for v in doc["variants"])
    doc = show_json("apple/coreml-stable-diffusion-v1-5-palettized", capsys)
    assert any(v["attention"] == "split_einsum_v2" and v["format"] == "compiled" for v in doc["variants"])
    doc = show_json("apple/coreml-stable-diffusion-mixed-bit-palettization", capsys)
    assert any(t.startswith("mbp") for v in doc["variants"] for t in v["tags"])


def test_show_community_zips(catalog: HubServer, capsys: pytest.CaptureFixture[str]) -> None:
    ids = {v["id"] for v in show_json("coreml-community/coreml-stable-diffusion-v1-5", capsys)["variants"]}
    assert {"split_einsum/compiled", "original/compiled@512x768"} <= ids
    ids = {v["id"] for v in show_json("coreml-community/coreml-AnythingXL", capsys)["variants"]}
    assert ids == {"split_einsum/compiled@1024x1024+6bit"}
    meina = show_json("coreml-community/coreml-MeinaMix", capsys)["variants"]
    assert any("cn" in v["tags"] for v in meina) and any("no-i2i" in v["tags"] for v in meina)
    spaced = [v for v in meina if any(" " in f for f in v["files"])]
    assert spaced and spaced[0]["resolution"] == "512x512"


def test_show_flat_layouts(catalog: HubServer, capsys: pytest.CaptureFixture[str]) -> None:
    for repo in ("someone/flat-sd", "someone/misnamed-folder"):
        (variant,) = show_json(repo, capsys)["variants"]
        assert variant["format"] == "compiled", repo  # detected by content, not by the folder's name
        assert {"text_encoder", "unet", "vae_decoder"} <= set(variant["components"])


def test_show_revision_by_sha(catalog: HubServer, capsys: pytest.CaptureFixture[str]) -> None:
    sha = hub.repo_files(V15).sha
    doc = show_json(V15, capsys, "--revision", sha)
    assert doc["sha"] == sha and doc["revision"] == sha
    assert all(v["pull_command"].endswith(f"--revision {sha}") for v in doc["variants"])


def test_show_without_variants_names_the_repo(catalog: HubServer, capsys: pytest.CaptureFixture[str]) -> None:
    assert run_cli(["show", "someone/pytorch-only"]) == 1
    err = capsys.readouterr().err.splitlines()
    assert err[0].startswith("Error: someone/pytorch-only has no Core ML variant")
    assert err[1].startswith("Hint: ") and len(err) == 2


def test_show_gated_repo_says_a_token_is_needed(hub_server: HubServer, capsys: pytest.CaptureFixture[str]) -> None:
    make_repo(hub_server.root, "org/gated-sd", apple_sd_files(attentions=("original",)),
              meta={"gated": True, **CORE_ML})
    assert run_cli(["show", "org/gated-sd"]) == 0
    captured = capsys.readouterr()
    assert "original/compiled" in captured.out and "gated" in captured.err and "HF_TOKEN" in captured.err


# --- list ------------------------------------------------------------------------------------------


def test_list_defaults_to_core_ml_in_one_request(catalog: HubServer, store_home: Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    catalog.clear_log()
    assert run_cli(["list"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert re.split(r"\s{2,}", lines[0]) == ["REPO", "VARIANTS", "PULLED", "LIKES", "DOWNLOADS", "UPDATED"]
    repos = [line.split()[0] for line in lines[1:]]
    assert repos[0] == V15 and "someone/pytorch-only" not in repos  # sorted by downloads, Core ML only
    assert len(repos) == 11
    row = lines[1].split(None, 1)[1]
    assert re.match(r"4\s+-\s+520\s+9\.1K\s+\d+ (year|month|week|day)s? ago$", row), row  # nothing pulled
    (request,) = catalog.requests()  # variants came from the file names in the search answer itself
    assert request["path"] == "/api/models" and "filter=coreml" in request["query"] and "siblings" in request["query"]


def test_list_json_records(catalog: HubServer, capsys: pytest.CaptureFixture[str]) -> None:
    assert run_cli(["list", "--json", "--author", "apple", "--sort", "likes"]) == 0
    records = json.loads(capsys.readouterr().out)
    assert [r["repo_id"] for r in records][:2] == ["apple/coreml-stable-diffusion-xl-base", V15]
    first = next(r for r in records if r["repo_id"] == V15)
    assert first["likes"] == 520 and first["downloads"] == 9_100
    assert datetime.fromisoformat(first["last_modified"].replace("Z", "+00:00")).year == 2024
    assert sorted(first["variants"]) == ["original/compiled", "original/packages", "split_einsum/compiled",
                                         "split_einsum/packages"]


def test_list_filters_search_limit_quiet(catalog: HubServer, capsys: pytest.CaptureFixture[str]) -> None:
    def ids(*args: str) -> list[str]:
        assert run_cli(["list", "--quiet", *args]) == 0
        return capsys.readouterr().out.split()

    assert ids("--filter", "library=diffusers") == ["someone/pytorch-only"]
    assert ids("--filter", "tag=stable-diffusion-xl") == ["apple/coreml-stable-diffusion-xl-base"]
    assert ids("--filter", "author=coreml-community", "--sort", "likes") == [
        "coreml-community/coreml-stable-diffusion-v1-5", "coreml-community/coreml-AnythingXL",
        "coreml-community/coreml-MeinaMix"]
    assert ids("--search", "pytorch") == ["someone/pytorch-only"]  # explicit search: no implied library
    assert ids("--filter", "library=coreml", "--filter", "pipeline_tag=text-to-image", "--search", "xl") == [
        "apple/coreml-stable-diffusion-xl-base", "coreml-community/coreml-AnythingXL"]
    assert len(ids("--limit", "3")) == 3
    assert ids("--filter", "tag=nothing-has-this") == []


def test_list_sort_updated(catalog: HubServer, capsys: pytest.CaptureFixture[str]) -> None:
    assert run_cli(["list", "--json", "--author", "apple", "--sort", "updated", "--limit", "3"]) == 0
    dates = [r["last_modified"] for r in json.loads(capsys.readouterr().out)]
    assert dates == sorted(dates, reverse=True) and len(dates) == 3


def test_list_local_defers_to_the_store(store_home: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert run_cli(["list", "--local", "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == []
    assert run_cli(["list", "--local", "--search", "x"]) == 2


def test_search_models_library_api(catalog: HubServer) -> None:
    found = hub.search_models(filter="coreml", author="pcuenq")
    (summary,) = found
    assert summary.repo_id == "pcuenq/coreml-stable-diffusion-v1-5" and summary.likes == 3
    assert sorted(v.id for v in summary.variants) == ["original/compiled", "split_einsum/compiled"]
    snapshot, variants = hub.repo_variants(summary.repo_id)
    assert {f.path for f in snapshot.files} == set(summary.files)
    assert all(f.sha256 for f in snapshot.files)  # zips are LFS files: sha256 known before download
