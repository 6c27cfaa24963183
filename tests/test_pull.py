"""`coreml-hub pull`, `ls`, `rm`, `cache` against a real `coreml-hub serve` (the `hub_server` fixture).

Repos carry Apple's real file names. The server's request log proves which files each pull fetched.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import threading
import time
import zipfile
from pathlib import Path

import pytest

from coreml_hub import paths, store
from coreml_hub.cli import run_cli
from coreml_hub.errors import (DownloadError, NotEnoughDiskSpace, OfflineError, UnsafeArchive,
                               VariantNotFound)
from coreml_hub.pulling import check_disk_space, plan_pull, pull
from coreml_hub.testing import model_version
from coreml_hub.download import present_bytes
from coreml_hub.testing.hubrepo import filler
from coreml_hub.testing.publish import publish, publish_source

SD15 = "apple/coreml-stable-diffusion-v1-5"
SDXL = "apple/coreml-stable-diffusion-xl-base"
SOURCE_SD1 = model_version("sd1")  # the tiny diffusers repo the sd1 packages name
SOURCE_SDXL = model_version("sdxl")
SOURCE_FILES = {"model_index.json", "scheduler/scheduler_config.json", "tokenizer/vocab.json", "tokenizer/merges.txt",
                "tokenizer/tokenizer_config.json", "tokenizer/special_tokens_map.json"}


# ---------------------------------------------------------------------------
# Helpers


def files_under(repo_dir: Path, prefix: str = "", *, chunks: bool = False, unet: bool = True) -> set[str]:
    """Repo paths under `prefix` as published (what a variant rooted there needs), one Unet form only."""
    out = set()
    base = repo_dir / prefix if prefix else repo_dir
    for p in base.rglob("*"):
        rel = p.relative_to(repo_dir).as_posix()
        if not p.is_file() or any(part.startswith(".") for part in rel.split("/")) or rel == "README.md":
            continue
        is_chunk = "UnetChunk" in rel or "_unet_chunk" in rel
        is_full = "Unet.mlmodelc" in rel or rel.split("/")[-1].endswith("_unet.mlpackage") or "_unet.mlpackage/" in rel
        if (is_chunk and not chunks) or (is_full and not unet):
            continue
        out.add(rel)
    return out


def sd15_repo(root: Path) -> Path:
    """Apple's SD 1.x layout: {original,split_einsum}/{packages,compiled}/ with the Unet and its chunks."""
    return publish(root, SD15, style="sd1", layout="apple", attentions=("original", "split_einsum"))


def fetched(server) -> dict[str, list[dict]]:
    """repo id -> file GETs of that repo."""
    out: dict[str, list[dict]] = {}
    for r in server.requests():
        if r["method"] == "GET" and "/resolve/" in r["path"]:
            repo = "/".join(r["path"].strip("/").split("/")[:2])
            out.setdefault(repo, []).append(r)
    return out


def fetched_paths(server, repo: str) -> set[str]:
    return {r["file"] for r in fetched(server).get(repo, [])}


def cli(capsys, *args: str) -> tuple[int, str, str]:
    capsys.readouterr()
    code = run_cli(list(args))
    out, err = capsys.readouterr()
    return code, out, err


def assert_manifest_matches(entry: Path) -> dict:
    manifest = json.loads((entry / store.MANIFEST_NAME).read_text())
    listed = {f["path"]: f for f in manifest["files"]}
    on_disk = {p.relative_to(entry).as_posix() for p in entry.rglob("*") if p.is_file()} - {store.MANIFEST_NAME}
    assert set(listed) == on_disk
    for rel, item in listed.items():
        data = (entry / rel).read_bytes()
        assert item["size"] == len(data) and item["sha256"] == hashlib.sha256(data).hexdigest()
        assert not (entry / rel).is_symlink()
    assert manifest["validation"]["status"] == "ok", manifest["validation"]
    return manifest


# ---------------------------------------------------------------------------
# Each layout: only the variant's files


def test_apple_compiled_fetches_only_the_variant_with_the_full_unet(hub_server, hub_root, store_home):
    repo_dir = sd15_repo(hub_root)
    result = pull(SD15, variant="split_einsum/compiled")
    assert fetched_paths(hub_server, SD15) == files_under(repo_dir, "split_einsum/compiled")
    assert SOURCE_SD1 not in fetched(hub_server)  # compiled variants carry their own tokenizer
    entry = result.path
    assert entry == store.EntryKey(SD15, result.commit, "split_einsum/compiled", "full").path()
    assert (entry / "Unet.mlmodelc" / "weights" / "weight.bin").is_file() and (entry / "vocab.json").is_file()
    assert not (entry / "UnetChunk1.mlmodelc").exists()
    manifest = assert_manifest_matches(entry)
    assert manifest["repo"] == SD15 and manifest["commit"] == result.commit and manifest["layout"] == "apple"
    assert manifest["endpoint"] == hub_server.url and manifest["variant"]["id"] == "split_einsum/compiled"
    assert manifest["revision"] == "main" and manifest["pulled_at"]
    assert result.bytes_downloaded == sum(f["size"] for f in manifest["files"])
    assert result.validation == "ok"
    assert not any(paths.staging_dir().iterdir())  # staging cleaned up
    pulled = store.find_pulled(f"{SD15}:split_einsum/compiled")
    assert pulled.status == "ok" and pulled.path == entry and pulled.tokenizer_path == entry


def test_chunked_flag_takes_the_two_chunks_instead(hub_server, hub_root, store_home, capsys):
    repo_dir = sd15_repo(hub_root)
    code, out, err = cli(capsys, "pull", f"{SD15}:original/compiled", "--chunked", "--quiet")
    assert code == 0, err
    assert fetched_paths(hub_server, SD15) == files_under(repo_dir, "original/compiled", chunks=True, unet=False)
    entry = Path(out.strip())
    assert (entry / "UnetChunk2.mlmodelc").is_dir() and not (entry / "Unet.mlmodelc").exists()
    assert entry.name == "original--compiled~chunked"
    assert store.find_pulled(f"{SD15}:original/compiled").unet_form == "chunked"


def test_both_unet_forms_are_told_apart_in_ls_rm_verify_and_run(hub_server, hub_root, store_home, capsys, tmp_path):
    sd15_repo(hub_root)
    ref = f"{SD15}:original/compiled"
    assert cli(capsys, "pull", ref, "-q")[0] == 0 and cli(capsys, "pull", ref, "--chunked", "-q")[0] == 0
    code, out, err = cli(capsys, "ls")
    rows = [line.split() for line in out.splitlines()]
    assert rows[0][:3] == ["MODEL", "VARIANT", "UNET"]
    assert [r[1:3] for r in rows[1:]] == [["original/compiled", "full"], ["original/compiled", "chunked"]]
    code, out, err = cli(capsys, "ls", "--json")
    assert sorted(p["unet_form"] for p in json.loads(out)) == ["chunked", "full"]
    # verify and run take the form by flag; without one they take the full Unet
    for flag, folder in (("--chunked", "original--compiled~chunked"), ("--no-chunked", "original--compiled"),
                         (None, "original--compiled")):
        code, out, err = cli(capsys, "verify", ref, "--json", *([flag] if flag else []))
        assert code == 0 and Path(json.loads(out)["path"]).name == folder, err
    code, out, err = cli(capsys, "run", ref, "a cat", "--chunked", "--steps", "1", "--seed", "1", "--no-pull",
                         "--disable-safety", "--backend", "torch", "--device", "cpu", "-o", str(tmp_path), "--json")
    assert code == 0, err
    assert Path(json.loads(out)["model"]["path"]).name == "original--compiled~chunked"
    # rm takes one form; the other stays
    code, out, err = cli(capsys, "rm", ref, "--chunked", "--dry-run")
    assert code == 0 and "chunked" in out.splitlines()[1] and "Would remove 1 variant(s)" in out
    assert cli(capsys, "rm", ref, "--chunked", "-y")[0] == 0
    assert [(p.variant, p.unet_form) for p in store.list_pulled()] == [("original/compiled", "full")]
    code, out, err = cli(capsys, "verify", ref, "--chunked")
    assert code == 1 and f"{ref} --chunked is not pulled" in err and "original/compiled." in err
    assert cli(capsys, "rm", ref, "--chunked", "-y")[0] == 1


def test_list_marks_pulled_repos_du_totals_and_inspect_by_name(hub_server, hub_root, store_home, capsys):
    from coreml_hub.testing.hubrepo import apple_sd_files, make_repo

    sd15_repo(hub_root)
    make_repo(hub_root, "org/not-pulled", apple_sd_files(attentions=("original",)), meta={"library_name": "coreml"})
    ref = f"{SD15}:original/compiled"
    assert cli(capsys, "pull", ref, "-q")[0] == 0 and cli(capsys, "pull", ref, "--chunked", "-q")[0] == 0
    # list marks what is pulled (table and JSON)
    code, out, err = cli(capsys, "list", "--json")
    pulled = {r["repo_id"]: r["pulled"] for r in json.loads(out)}
    assert pulled == {SD15: ["original/compiled", "original/compiled --chunked"], "org/not-pulled": []}
    code, out, err = cli(capsys, "list")
    header, *rows = out.splitlines()
    assert header.split()[:3] == ["REPO", "VARIANTS", "PULLED"]
    row = {line.split()[0]: line for line in rows}
    assert "original/compiled, original/compiled --chunked" in row[SD15] and " - " in row["org/not-pulled"]
    # list --local shows sizes
    code, out, err = cli(capsys, "list", "--local")
    assert out.splitlines()[0].split()[:4] == ["MODEL", "VARIANT", "UNET", "SIZE"]
    sizes = {p.unet_form: p.size for p in store.list_pulled()}
    assert all(size > 0 for size in sizes.values())
    # du: bytes on disk by model, and what prune would free (an interrupted download of this repo)
    entries = store.list_pulled()
    leftover = paths.staging_dir() / f"{store.repo_folder(SD15)}--{'b' * 40}--original--packages"
    (leftover / "files").mkdir(parents=True)
    (leftover / "files" / "part").write_bytes(b"x" * 1500)
    code, out, err = cli(capsys, "du", "--json")
    usage = json.loads(out)
    (repo,) = usage["repos"]
    assert repo == {"repo": SD15, "variants": 2, "commits": 1,
                    "size_bytes": sum(store.tree_size(p.path) for p in entries), "prunable_bytes": 1500}
    assert usage["prunable_bytes"] == 1500 and usage["size_bytes"] == repo["size_bytes"]
    code, out, err = cli(capsys, "du")
    assert out.splitlines()[0].split() == ["MODEL", "VARIANTS", "SIZE", "PRUNABLE"]
    assert out.splitlines()[1].split()[:2] == [SD15, "2"] and out.splitlines()[1].endswith("1.5 KB")
    assert "in 1 pulled model" in err and "`coreml-hub cache prune` would free 1.5 KB more" in err
    # inspect a pulled model's bundle by name
    code, out, err = cli(capsys, "inspect", ref, "--component", "unet", "--json")
    assert code == 0 and json.loads(out)["path"] == str(store.find_pulled(ref, chunked=False).path / "Unet.mlmodelc")
    code, out, err = cli(capsys, "inspect", ref, "--chunked", "--component", "UnetChunk2.mlmodelc")
    assert code == 0 and "noise_pred" in out
    code, out, err = cli(capsys, "inspect", ref)
    assert code == 2 and "--component" in err and "text_encoder" in err


def test_apple_packages_fetch_tokenizer_and_scheduler_but_no_weights(hub_server, hub_root, store_home):
    repo_dir = sd15_repo(hub_root)
    result = pull(SD15, variant="original/packages")
    assert fetched_paths(hub_server, SD15) == files_under(repo_dir, "original/packages")
    assert fetched_paths(hub_server, SOURCE_SD1) == SOURCE_FILES
    entry = result.path
    assert (entry / "tokenizer" / "vocab.json").read_bytes() == \
        (hub_root / SOURCE_SD1 / "tokenizer" / "vocab.json").read_bytes()
    assert (entry / "scheduler" / "scheduler_config.json").is_file() and (entry / "model_index.json").is_file()
    manifest = assert_manifest_matches(entry)
    assert manifest["source_model"]["repo"] == SOURCE_SD1 and manifest["source_model"]["error"] is None
    assert store.find_pulled(f"{SD15}:original/packages").tokenizer_path == entry / "tokenizer"


def test_packages_with_unreachable_source_model_warn_and_record_it(hub_server, hub_root, store_home, capsys):
    publish(hub_root, SD15, layout="apple", attentions=("original",), formats=("packages",), with_source=False)
    code, out, err = cli(capsys, "pull", SD15, "--json")
    assert code == 0, err
    assert "Warning:" in err and SOURCE_SD1 in err and "tokenizer" in err
    record = json.loads(out)
    manifest = json.loads((Path(record["path"]) / store.MANIFEST_NAME).read_text())
    assert manifest["source_model"]["repo"] == SOURCE_SD1 and "not found" in manifest["source_model"]["error"]
    # --model-version names a reachable copy of the source model
    publish_source(hub_root, "sd1", repo_id="mirror/tiny-sd1")
    code, out, err = cli(capsys, "pull", SD15, "--json", "--force", "--model-version", "mirror/tiny-sd1")
    assert code == 0, err
    assert (Path(json.loads(out)["path"]) / "tokenizer" / "merges.txt").is_file()
    assert fetched_paths(hub_server, "mirror/tiny-sd1") == SOURCE_FILES  # never the weights


def test_packages_naming_a_model_that_left_the_hub_use_its_new_home(hub_server, hub_root, store_home, capsys):
    repo_dir = publish(hub_root, SD15, layout="apple", attentions=("original",), formats=("packages",),
                       with_source=False)
    for pkg in (repo_dir / "original" / "packages").iterdir():  # named like Apple's: runwayml_stable-diffusion-v1-5
        pkg.rename(pkg.with_name(pkg.name.replace("coreml-hub-test_tiny-sd1", "runwayml_stable-diffusion-v1-5")))
    publish_source(hub_root, "sd1", repo_id="stable-diffusion-v1-5/stable-diffusion-v1-5")
    code, out, err = cli(capsys, "pull", SD15, "--json")
    assert code == 0, err
    assert "runwayml/stable-diffusion-v1-5 is gone" in err
    record = json.loads(out)
    assert record["source_model"] == "stable-diffusion-v1-5/stable-diffusion-v1-5"
    assert (Path(record["path"]) / "tokenizer" / "vocab.json").is_file()
    assert fetched_paths(hub_server, "stable-diffusion-v1-5/stable-diffusion-v1-5") == SOURCE_FILES


def test_sdxl_packages_take_both_tokenizers(hub_server, hub_root, store_home):
    repo_dir = publish(hub_root, SDXL, style="sdxl", layout="apple-sdxl", attentions=("original",))
    plan = plan_pull(SDXL, variant="original/packages")
    assert plan.variant.id == "original/packages"
    result = plan.execute()
    assert fetched_paths(hub_server, SDXL) == files_under(repo_dir, "packages")
    assert fetched_paths(hub_server, SOURCE_SDXL) == SOURCE_FILES | {
        p.replace("tokenizer/", "tokenizer_2/") for p in SOURCE_FILES if p.startswith("tokenizer/")}
    assert (result.path / "tokenizer_2" / "merges.txt").is_file()
    assert_manifest_matches(result.path)

    hub_server.clear_log()
    compiled = pull(SDXL, variant="compiled")  # the variant's folder, exactly as in the repo
    assert compiled.variant == "original/compiled"
    assert fetched_paths(hub_server, SDXL) == files_under(repo_dir, "compiled")
    assert (compiled.path / "TextEncoder2.mlmodelc").is_dir()


def test_zip_mirror_archive_is_extracted_and_deleted(hub_server, hub_root, store_home):
    repo = "pcuenq/coreml-stable-diffusion-v1-5"
    publish(hub_root, repo, layout="root-zip", attentions=("original", "split_einsum"))
    name = "coreml-stable-diffusion-v1-5_split_einsum_compiled.zip"
    result = pull(repo, variant=name)  # the archive's path, exactly as in the repo
    assert result.variant == "split_einsum/compiled"
    assert fetched_paths(hub_server, repo) == {name}
    assert (result.path / "Unet.mlmodelc" / "weights" / "weight.bin").is_file()
    assert (result.path / "merges.txt").is_file()
    assert not list(result.path.rglob("*.zip"))  # deleted after extraction
    assert_manifest_matches(result.path)

    hub_server.clear_log()
    kept = pull(repo, variant="original/compiled", keep_archive=True)
    assert fetched_paths(hub_server, repo) == {"coreml-stable-diffusion-v1-5_original_compiled.zip"}
    assert (kept.path / "coreml-stable-diffusion-v1-5_original_compiled.zip").is_file()
    assert_manifest_matches(kept.path)


def test_palettized_archive_with_v2_attention(hub_server, hub_root, store_home):
    repo = "apple/coreml-stable-diffusion-v1-5-palettized"
    publish(hub_root, repo, layout="root-zip", attentions=("split_einsum_v2", "original"))
    result = pull(repo, variant="split_einsum_v2/compiled+palettized")
    assert fetched_paths(hub_server, repo) == {"coreml-stable-diffusion-v1-5-palettized_split_einsum_v2_compiled.zip"}
    assert (result.path / "Unet.mlmodelc").is_dir()
    assert_manifest_matches(result.path)


def test_mixed_bit_repo_pulls_the_pipeline_not_the_lone_unet(hub_server, hub_root, store_home, capsys):
    repo = "apple/coreml-stable-diffusion-mixed-bit-palettization"
    repo_dir = publish(hub_root, repo, style="sdxl", layout="apple-sdxl", attentions=("original",))
    prefix = repo_dir / "coreml-stable-diffusion-xl-base_mbp_4_50_palettized"
    prefix.mkdir()
    for fmt in ("compiled", "packages"):
        (repo_dir / fmt).rename(prefix / fmt)
    for stray in repo_dir.glob("*.zip"):
        stray.unlink()
    lone = repo_dir / "unet-mbp-sdxl-1-base" / "recipe_4_50_bit_mixedpalette"
    lone.mkdir(parents=True)
    shutil.copytree(prefix / "compiled" / "Unet.mlmodelc", lone / "Unet.mlmodelc")
    (repo_dir / "recipes").mkdir()
    (repo_dir / "recipes" / "stabilityai-stable-diffusion-xl-base-1.0_palettization_recipe.json").write_text("{}")
    code, out, err = cli(capsys, "pull", repo, "--variant", "coreml-stable-diffusion-xl-base_mbp_4_50_palettized/compiled",
                         "--json")
    assert code == 0, err
    record = json.loads(out)
    assert "mbp" in record["variant"] and record["variant"].startswith("original/compiled")
    assert fetched_paths(hub_server, repo) == files_under(repo_dir, prefix.name + "/compiled")
    hub_server.clear_log()
    code, out, err = cli(capsys, "pull", repo, "--dry-run", "--json")  # the default is a whole pipeline
    assert code == 0, err
    assert not json.loads(out)["variant"]["partial"]


def test_community_archives_with_odd_names(hub_server, hub_root, store_home, capsys):
    repo = "coreml-community/coreml-meinamix"
    publish(hub_root, repo, layout="community", attentions=("original", "split_einsum"), tags=("cn",),
            spaces=True, hyphen_folders=True)
    zips = sorted(p.relative_to(hub_root / repo).as_posix() for p in (hub_root / repo).rglob("*.zip"))
    spaced = next(z for z in zips if z.startswith("split-einsum/"))
    assert " " in spaced
    code, out, err = cli(capsys, "pull", repo, "--variant", spaced, "--json")
    assert code == 0, err
    record = json.loads(out)
    assert record["variant"].startswith("split_einsum/compiled")
    assert fetched_paths(hub_server, repo) == {spaced}
    assert (Path(record["path"]) / "Unet.mlmodelc").is_dir()
    assert_manifest_matches(Path(record["path"]))


def test_flat_repo_with_one_variant_needs_no_choice(hub_server, hub_root, store_home, capsys):
    repo = "someone/flat-model"
    repo_dir = publish(hub_root, repo, layout="flat", attentions=("original",), formats=("compiled",),
                       folder="mlpackages")  # a folder named for packages that holds compiled bundles
    code, out, err = cli(capsys, "pull", repo)
    assert code == 0, err
    assert "Chose" not in err
    assert fetched_paths(hub_server, repo) == files_under(repo_dir, "mlpackages")
    assert (Path(out.strip()) / "Unet.mlmodelc" / "model.mil").is_file()


# ---------------------------------------------------------------------------
# Choosing, planning, errors


def test_default_choice_is_explained(hub_server, hub_root, store_home, capsys):
    sd15_repo(hub_root)
    code, out, err = cli(capsys, "pull", SD15, "--dry-run")
    assert code == 0, err
    assert "Chose original/compiled" in err
    assert "split_einsum/compiled" in err and f"coreml-hub pull {SD15} --variant ID" in err
    assert fetched(hub_server) == {}


def test_default_rule_off_macos_prefers_original_compiled_untagged_and_complete():
    from coreml_hub.layouts import RepoFile, Variant
    from coreml_hub.pulling import choose_variant

    def v(vid: str, size: int = 100, partial: bool = False, tags: tuple = (), resolution=None) -> Variant:
        attention, fmt = vid.split("@")[0].split("+")[0].split("/")
        return Variant(id=vid, attention=attention, format=fmt, layout="test", root=vid, tags=tags,
                       resolution=resolution, partial=partial, common_files=(RepoFile(vid + "/x", size),))

    assert sys.platform != "darwin"  # the portable runtime's rule; macOS has its own
    pick = lambda *vs: choose_variant(list(vs)).id  # noqa: E731
    assert pick(v("split_einsum/compiled"), v("original/packages"), v("original/compiled")) == "original/compiled"
    assert pick(v("split_einsum/compiled"), v("original/packages")) == "original/packages"
    assert pick(v("split_einsum_v2/compiled"), v("split_einsum/compiled")) == "split_einsum/compiled"
    assert pick(v("original/compiled+6bit", tags=("6bit",), size=10), v("original/compiled@512x768",
                resolution="512x768")) == "original/compiled@512x768"
    assert pick(v("original/compiled", partial=True), v("split_einsum/packages")) == "split_einsum/packages"
    assert pick(v("original/compiled@768x768", resolution="768x768", size=5),
                v("original/compiled@512x768", resolution="512x768", size=3)) == "original/compiled@512x768"


def test_default_rule_with_native_core_ml_prefers_split_einsum(monkeypatch):
    """The macOS branch of the rule, decided here by what _backends_here reports (Core ML cannot run on Linux)."""
    from coreml_hub import pulling
    from coreml_hub.layouts import RepoFile, Variant

    def v(vid: str) -> Variant:
        attention, fmt = vid.split("/")
        return Variant(id=vid, attention=attention, format=fmt, layout="test", root=vid,
                       common_files=(RepoFile(vid + "/x", 100),))

    pick = lambda *vs: pulling.choose_variant(list(vs)).id  # noqa: E731
    both = (v("original/compiled"), v("split_einsum/compiled"), v("split_einsum/packages"))
    assert pick(*both) == "original/compiled"  # the portable rule, as installed here
    monkeypatch.setattr(pulling, "_backends_here", lambda: (True, frozenset({"packages", "compiled"})))
    assert pick(*both) == "split_einsum/compiled"
    assert pick(v("original/compiled"), v("split_einsum_v2/packages")) == "split_einsum_v2/packages"
    assert pick(v("original/packages"), v("original/compiled")) == "original/compiled"
    assert "native Core ML" in pulling.default_rule_text()
    # a backend set that runs only packages puts compiled variants last
    monkeypatch.setattr(pulling, "_backends_here", lambda: (True, frozenset({"packages"})))
    assert pick(v("split_einsum/compiled"), v("original/packages")) == "original/packages"


def test_dry_run_plan_lists_files_and_bytes_and_fetches_nothing(hub_server, hub_root, store_home, capsys):
    repo_dir = sd15_repo(hub_root)
    code, out, err = cli(capsys, "pull", f"{SD15}:original/packages", "--dry-run", "--json")
    assert code == 0, err
    plan = json.loads(out)
    listed = {f["path"] for f in plan["files"]}
    assert listed == files_under(repo_dir, "original/packages")
    assert set(plan["source_model"]["files"]) == SOURCE_FILES
    sizes = {f["path"]: f["size"] for f in plan["files"]}
    assert plan["total_bytes"] == plan["download_bytes"] > sum(sizes.values())  # + tokenizer files
    assert plan["up_to_date"] is False and fetched(hub_server) == {}
    assert not paths.models_dir().exists() or not any(paths.models_dir().iterdir())

    code, out, err = cli(capsys, "pull", f"{SD15}:original/packages", "--dry-run")
    assert code == 0 and "Would download" in out and "unet.mlpackage/Manifest.json" in out


def test_unknown_variant_lists_the_repo_variants(hub_server, hub_root, store_home, capsys):
    sd15_repo(hub_root)
    with pytest.raises(VariantNotFound) as info:
        plan_pull(SD15, variant="split_einsum_v2/compiled")
    for vid in ("original/compiled", "original/packages", "split_einsum/compiled", "split_einsum/packages"):
        assert vid in info.value.message
    code, out, err = cli(capsys, "pull", f"{SD15}:nope/compiled")
    assert code == 1 and "Error:" in err and "split_einsum/packages" in err and "Hint:" in err


def test_second_pull_transfers_no_file_and_force_does(hub_server, hub_root, store_home, capsys):
    repo_dir = sd15_repo(hub_root)
    first = pull(SD15, variant="original/compiled")
    hub_server.clear_log()
    code, out, err = cli(capsys, "pull", SD15, "--variant", "original/compiled", "--json")
    assert code == 0, err
    record = json.loads(out)
    assert record["already_present"] is True and record["bytes_downloaded"] == 0
    requests = hub_server.requests()
    assert [r for r in requests if "/resolve/" in r["path"]] == []
    assert len(requests) == 1 and requests[0]["path"].startswith(f"/api/models/{SD15}")
    hub_server.clear_log()
    again = pull(SD15, variant="original/compiled", force=True)
    assert again.bytes_downloaded == first.bytes_downloaded and again.path == first.path
    assert fetched_paths(hub_server, SD15) == files_under(repo_dir, "original/compiled")


def test_two_revisions_coexist(hub_server, hub_root, store_home, capsys):
    sd15_repo(hub_root)
    old = pull(SD15, variant="original/compiled")
    with open(hub_root / SD15 / "README.md", "a") as card:
        card.write("A new commit.\n")
    new = pull(SD15, variant="original/compiled")
    assert new.commit != old.commit and old.path.is_dir() and new.path.is_dir()
    assert store.resolve_ref(SD15, "main") == new.commit
    assert store.find_pulled(f"{SD15}:original/compiled").commit == new.commit
    assert store.find_pulled(f"{SD15}@{old.commit[:10]}:original/compiled").commit == old.commit
    code, out, err = cli(capsys, "ls")
    assert f"{SD15}@{old.commit[:7]}" in out and f"{SD15}@{new.commit[:7]}" in out


def test_not_enough_disk_space_is_refused_before_downloading(tmp_path):
    import shutil

    free = shutil.disk_usage(tmp_path).free
    check_disk_space(tmp_path, 1024)
    with pytest.raises(NotEnoughDiskSpace, match="free"):
        check_disk_space(tmp_path / "not" / "yet", free + 1)


def test_gated_repo_needs_the_token_which_is_never_shown(hub_server, hub_root, store_home, capsys, monkeypatch):
    repo = "someone/gated-model"
    repo_dir = publish(hub_root, repo, layout="flat", attentions=("original",), formats=("compiled",))
    meta = json.loads((repo_dir / ".hub.json").read_text())
    (repo_dir / ".hub.json").write_text(json.dumps({**meta, "gated": "manual"}))
    (hub_root / ".tokens").write_text("hf_granted_secret\n")
    code, out, err = cli(capsys, "pull", repo)
    assert code == 1 and "Error:" in err and "HF_TOKEN" in err  # the hint says how to authenticate
    assert store.list_pulled() == []
    monkeypatch.setenv("HF_TOKEN", "hf_granted_secret")
    code, out, err = cli(capsys, "pull", repo, "--json")
    assert code == 0, err
    entry = Path(json.loads(out)["path"])
    assert "hf_granted_secret" not in out + err
    assert "hf_granted_secret" not in (entry / store.MANIFEST_NAME).read_text()


# ---------------------------------------------------------------------------
# Offline


def test_offline_answers_from_the_store_or_fails_clearly(hub_server, hub_root, store_home, capsys, monkeypatch):
    sd15_repo(hub_root)
    pulled = pull(SD15, variant="split_einsum/compiled")
    hub_server.clear_log()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    code, out, err = cli(capsys, "pull", SD15, "--json")
    assert code == 0, err
    assert json.loads(out)["path"] == str(pulled.path)
    code, out, err = cli(capsys, "pull", f"{SD15}:split_einsum/compiled", "--quiet")
    assert code == 0 and out.strip() == str(pulled.path)
    with pytest.raises(OfflineError):
        plan_pull(SD15, variant="original/compiled")
    with pytest.raises(OfflineError, match="--force"):
        plan_pull(SD15, variant="split_einsum/compiled", force=True)
    code, out, err = cli(capsys, "pull", "org/never-pulled")
    assert code == 1 and "HF_HUB_OFFLINE" in err and "Hint:" in err
    assert hub_server.requests() == []


# ---------------------------------------------------------------------------
# Unsafe archives


@pytest.mark.parametrize("kind", ["dotdot", "symlink", "absolute", "bomb"])
def test_unsafe_zip_is_rejected_with_nothing_written_outside(hub_server, hub_root, store_home, tmp_path, kind):
    repo = "coreml-community/coreml-evil"
    repo_dir = publish(hub_root, repo, layout="community", attentions=("original",))
    [good] = list(repo_dir.rglob("*.zip"))
    bad = good.with_name("evil_original_compiled.zip")
    with zipfile.ZipFile(good) as src, zipfile.ZipFile(bad, "w") as zf:
        for info in src.infolist():  # the real bundles, then one hostile entry
            zf.writestr(info, src.read(info))
        if kind == "dotdot":
            zf.writestr("evil_original_compiled/../../../../escaped.txt", "owned")
        elif kind == "symlink":
            link = zipfile.ZipInfo("evil_original_compiled/escaped.txt")
            link.external_attr = (stat.S_IFLNK | 0o777) << 16
            zf.writestr(link, str(tmp_path / "target.txt"))
        elif kind == "absolute":
            zf.writestr(str(tmp_path / "escaped.txt"), "owned")
        else:  # expands to far more than any model archive of its size would
            zf.writestr(zipfile.ZipInfo("evil_original_compiled/escaped.txt"), b"\0" * 200_000_000,
                        compress_type=zipfile.ZIP_DEFLATED)
    good.unlink()
    outside_before = {p for p in tmp_path.rglob("*") if p.relative_to(tmp_path).parts[0] != "store"}
    with pytest.raises(UnsafeArchive):
        pull(repo, variant=bad.relative_to(repo_dir).as_posix())
    outside_after = {p for p in tmp_path.rglob("*") if p.relative_to(tmp_path).parts[0] != "store"}
    server_files = ("hub-requests", ".coreml-hub-")  # the mirror's own log and digest cache
    assert {p for p in outside_after - outside_before if not p.name.startswith(server_files)} == set()
    assert not list(store_home.rglob("escaped.txt")) and not list(store_home.rglob("target.txt"))
    assert not Path("/escaped.txt").exists()
    assert store.list_pulled() == []


# ---------------------------------------------------------------------------
# Big files: resume after SIGKILL, server stopping, concurrent pulls

BIG = 200_000_000
UNET_WEIGHTS = "Unet.mlmodelc/weights/weight.bin"


def big_repo(root: Path, repo: str = "org/big-model") -> tuple[str, str]:
    """A flat compiled variant whose Unet weight file is padded with generated bytes to 200 MB."""
    repo_dir = publish(root, repo, layout="flat", attentions=("original",), formats=("compiled",), chunks=False)
    weights = repo_dir / UNET_WEIGHTS
    extra = BIG - weights.stat().st_size
    with open(weights, "ab") as f:
        f.write(filler(extra, "padding"))
    return repo, UNET_WEIGHTS


def _pull_proc(args: list[str], env_extra: dict[str, str] | None = None) -> subprocess.Popen:
    env = dict(os.environ, **(env_extra or {}))
    return subprocess.Popen([sys.executable, "-m", "coreml_hub", "pull", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)


def _on_disk() -> int:
    """Resumable bytes of the Unet weights in staging, as the downloader's sidecar records them."""
    for sidecar in paths.staging_dir().rglob("weight.bin.part.json"):
        dest = sidecar.with_name("weight.bin")
        if dest.parent.parent.name == "Unet.mlmodelc":
            return present_bytes(dest, BIG)
    return 0


def _wait_until_on_disk(at_least: int, proc: subprocess.Popen | None = None, timeout: float = 120) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = _on_disk()
        if got >= at_least:
            return got
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"pull ended early: {proc.communicate()}")
        time.sleep(0.005)
    raise AssertionError("the download never got that far")


def test_sigkill_mid_file_then_repull_resumes(hub_server, hub_root, store_home, capsys):
    repo, weight = big_repo(hub_root)
    proc = _pull_proc([repo, "--quiet"])
    try:
        _wait_until_on_disk(BIG // 2, proc)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait(timeout=30)
    on_disk = _on_disk()
    assert BIG * 0.4 <= on_disk < BIG, on_disk
    assert store.list_pulled() == []  # nothing looks complete
    hub_server.clear_log()
    code, out, err = cli(capsys, "pull", repo, "--json")
    assert code == 0, err
    gets = [r for r in fetched(hub_server)[repo] if r["file"] == weight]
    sent = sum(r["bytes"] for r in gets)
    assert sent == BIG - on_disk and sent <= 0.6 * BIG
    assert all(r["range"] and r["status"] == 206 for r in gets)
    record = json.loads(out)
    assert hashlib.sha256((Path(record["path"]) / weight).read_bytes()).hexdigest() == \
        hashlib.sha256((hub_root / repo / weight).read_bytes()).hexdigest()
    assert_manifest_matches(Path(record["path"]))


def test_concurrent_pulls_of_one_variant_fetch_bytes_once(hub_server, hub_root, store_home):
    repo, weight = big_repo(hub_root)
    procs = [_pull_proc([repo, "--json"]) for _ in range(2)]
    results = []
    for proc in procs:
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err
        results.append(json.loads(out))
    assert results[0]["path"] == results[1]["path"]
    assert sorted(r["bytes_downloaded"] > 0 for r in results) == [False, True]
    gets = fetched(hub_server)[repo]
    per_file: dict[str, int] = {}
    for r in gets:
        per_file[r["file"]] = per_file.get(r["file"], 0) + r["bytes"]
    sizes = {p: (hub_root / repo / p).stat().st_size for p in per_file}
    assert per_file == sizes  # every byte fetched exactly once


def test_different_models_pull_in_parallel(hub_server, hub_root, store_home):
    sd15_repo(hub_root)
    repo, _ = big_repo(hub_root)
    results: dict[str, object] = {}

    def run(ref: str) -> None:
        results[ref] = pull(ref)

    threads = [threading.Thread(target=run, args=(ref,)) for ref in (repo, f"{SD15}:original/compiled")]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert len(results) == 2 and {p.repo for p in store.list_pulled()} == {repo, SD15}


def test_server_stopping_mid_download_is_reported_then_resumed(hub_server, hub_root, store_home, capsys,
                                                               monkeypatch):
    repo, weight = big_repo(hub_root)
    monkeypatch.setenv("COREML_HUB_DOWNLOAD_RETRIES", "2")
    monkeypatch.setenv("COREML_HUB_RETRY_WAIT", "0.05")
    errors: list[BaseException] = []

    def run() -> None:
        try:
            pull(repo)
        except BaseException as exc:  # noqa: BLE001 - the test inspects it
            errors.append(exc)

    thread = threading.Thread(target=run)
    thread.start()
    _wait_until_on_disk(BIG // 4)
    hub_server.stop()
    thread.join(timeout=120)
    assert len(errors) == 1 and isinstance(errors[0], DownloadError)
    named = errors[0].message.split("Downloading ", 1)[1].split(" failed", 1)[0]
    assert (hub_root / repo / named).is_file() and "retries" in errors[0].message  # names the file
    assert errors[0].hint and "resumes" in errors[0].hint
    assert store.list_pulled() == []

    hub_server.start()
    hub_server.clear_log()
    result = pull(repo)
    gets = [r for r in fetched(hub_server)[repo] if r["file"] == weight]
    assert gets and all(r["range"] and r["status"] == 206 for r in gets)
    assert sum(r["bytes"] for r in gets) <= 0.8 * BIG
    assert (result.path / weight).stat().st_size == BIG
    assert_manifest_matches(result.path)


def test_progress_bar_only_on_a_terminal(hub_server, hub_root, store_home, tmp_path):
    import pty

    sd15_repo(hub_root)
    piped = _pull_proc([f"{SD15}:original/compiled"])
    out, err = piped.communicate(timeout=120)
    assert piped.returncode == 0, err
    assert "%|" not in err and "Verifying" not in err and "Pulled " in err  # no bar, no phase lines

    master, slave = pty.openpty()
    env = dict(os.environ, COLUMNS="100")
    proc = subprocess.Popen([sys.executable, "-m", "coreml_hub", "pull", f"{SD15}:split_einsum/compiled"],
                            stdout=subprocess.PIPE, stderr=slave, env=env)
    os.close(slave)
    chunks = []
    while True:
        try:
            data = os.read(master, 65536)
        except OSError:  # the child closed the terminal
            break
        if not data:
            break
        chunks.append(data)
    proc.wait(timeout=120)
    os.close(master)
    shown = b"".join(chunks).decode(errors="replace")
    assert proc.returncode == 0, shown
    assert "100%|" in shown and "B/s" in shown and "Verifying split_einsum/compiled" in shown
    bars = [line for line in shown.replace("\r", "\n").splitlines() if "%|" in line]
    assert bars and all(line.startswith("split_einsum/compiled:") for line in bars)  # one bar for all files


# ---------------------------------------------------------------------------
# ls, rm, cache


def _rm_on_a_terminal(ref: str, answer: bytes) -> tuple[int, str]:
    """`coreml-hub rm REF` with a terminal on stdin, answering its question."""
    import pty

    master, slave = pty.openpty()
    proc = subprocess.Popen([sys.executable, "-m", "coreml_hub", "rm", ref], stdin=slave, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT)
    os.close(slave)
    os.write(master, answer)
    out, _ = proc.communicate(timeout=120)
    os.close(master)
    return proc.returncode, out.decode()


def test_rm_asks_on_a_terminal(hub_server, hub_root, store_home):
    sd15_repo(hub_root)
    pulled = pull(SD15, variant="original/compiled")
    code, out = _rm_on_a_terminal(f"{SD15}:original/compiled", b"n\n")
    assert code == 1 and "Remove 1 variant(s), freeing" in out and "Aborted." in out and pulled.path.is_dir()
    code, out = _rm_on_a_terminal(f"{SD15}:original/compiled", b"y\n")
    assert code == 0 and "Removed 1 variant(s)" in out and not pulled.path.exists()


def test_ls_rm_and_prune(hub_server, hub_root, store_home, capsys, monkeypatch):
    sd15_repo(hub_root)
    pull(SD15, variant="original/compiled")
    pull(SD15, variant="split_einsum/packages")
    code, out, err = cli(capsys, "ls")
    assert code == 0
    lines = out.strip().splitlines()
    assert lines[0].split() == ["MODEL", "VARIANT", "UNET", "SIZE", "PULLED", "STATUS"]
    assert any("original/compiled" in line and line.rstrip().endswith("ok") and "just now" in line for line in lines)
    code, out, err = cli(capsys, "ls", "--json")
    rows = json.loads(out)
    assert {r["variant"] for r in rows} == {"original/compiled", "split_einsum/packages"}
    assert all(r["status"] == "ok" and r["size_bytes"] > 0 for r in rows)

    size = next(r["size_bytes"] for r in rows if r["variant"] == "original/compiled")
    monkeypatch.setattr(sys.stdin, "isatty", lambda: False)
    code, out, err = cli(capsys, "rm", f"{SD15}:original/compiled")
    assert code == 2 and "-y" in err  # no terminal to ask on
    code, out, err = cli(capsys, "rm", f"{SD15}:original/compiled", "--dry-run")
    assert code == 0 and "Would remove 1 variant(s)" in out
    assert len(store.list_pulled()) == 2
    code, out, err = cli(capsys, "rm", f"{SD15}:original/compiled", "-y", "--json")
    assert code == 0
    removed = json.loads(out)
    assert [r["variant"] for r in removed["removed"]] == ["original/compiled"]
    assert removed["bytes_freed"] >= size
    assert [p.variant for p in store.list_pulled()] == ["split_einsum/packages"]

    # an interrupted pull leaves staging behind; prune removes it once no process holds it
    monkeypatch.setenv("COREML_HUB_DOWNLOAD_RETRIES", "0")
    (hub_root / SD15 / "original/compiled/Unet.mlmodelc/weights/weight.bin").unlink()
    with pytest.raises(Exception):
        pull(SD15, variant="original/compiled")  # the mirror lists a file and then cannot find it
    leftovers = list(paths.staging_dir().iterdir())
    code, out, err = cli(capsys, "cache", "prune", "--dry-run")
    assert code == 0 and "Would free" in out
    assert list(paths.staging_dir().iterdir()) == leftovers
    code, out, err = cli(capsys, "cache", "prune")
    assert code == 0 and not any(p for p in paths.staging_dir().iterdir())
    code, out, err = cli(capsys, "cache", "path")
    assert out.strip() == str(store_home)
    code, out, err = cli(capsys, "rm", SD15, "-y")
    assert code == 0 and store.list_pulled() == []
    assert not (paths.models_dir() / store.repo_folder(SD15)).exists()
