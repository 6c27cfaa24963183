"""ControlNets on the Hub: `show` lists them, `pull --controlnet` fetches only the named one, `run` uses it.

One `coreml-hub serve` for the module, holding every ControlNet layout: Apple's compiled layout
(`controlnet/<Name>.mlmodelc` beside `ControlledUnet.mlmodelc`), packages (`ControlNet_*.mlpackage`
beside `..._control-unet.mlpackage`), a variant whose Unet takes no residuals, and coreml-community's
collection of zipped ControlNets under `CN/`. The server's request log proves what each pull fetched.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from coreml_hub import store
from coreml_hub.cli import run_cli
from coreml_hub.testing.hubserver import HubServer
from coreml_hub.testing.publish import publish_controlnet_collection, publish_controlnets

REPO = "test/sd-controlnet"
COLLECTION = "test/controlnet-collection"

pytestmark = [pytest.mark.slow]


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    root = tmp_path_factory.mktemp("hub")
    publish_controlnets(root, REPO)
    publish_controlnet_collection(root, COLLECTION, controlnets=(("sd1", "original"), ("sd2", "original")))
    hub = HubServer(root, tmp_path_factory.mktemp("log") / "requests.jsonl").start()
    yield hub
    hub.stop()


@pytest.fixture
def hub(server, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):  # type: ignore[no-untyped-def]
    monkeypatch.setenv("HF_ENDPOINT", server.url)
    monkeypatch.setenv("COREML_HUB_HOME", str(tmp_path / "store"))
    server.clear_log()
    return server


def cli(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    code = run_cli(list(args))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def fetched(server, repo: str) -> set[str]:  # type: ignore[no-untyped-def]
    return {r["file"] for r in server.requests()
            if r["method"] == "GET" and "/resolve/" in r["path"] and r["path"].strip("/").startswith(repo + "/")}


def files_under(server, repo: str, prefix: str) -> set[str]:  # type: ignore[no-untyped-def]
    base = Path(server.root) / repo
    return {p.relative_to(base).as_posix() for p in (base / prefix).rglob("*") if p.is_file()}


def test_show_lists_each_variants_controlnets(hub, capsys) -> None:  # type: ignore[no-untyped-def]
    code, out, err = cli(capsys, "show", REPO, "--json")
    assert code == 0, err
    doc = json.loads(out)
    variants = {v["id"]: v for v in doc["variants"]}
    compiled = variants["original/compiled"]
    assert compiled["controlnets"] == ["TinyControlnetSd1", "TinyControlnetSd1B"]
    assert "controlnet" in compiled["components"]
    assert not any("controlnet/" in f for f in compiled["files"])  # never fetched with the variant
    assert "original/compiled/ControlledUnet.mlmodelc/model.mil" in compiled["files"]
    assert variants["original/packages"]["controlnets"] == ["tiny-controlnet-sd1", "tiny-controlnet-sd1-b"]
    assert "controlnet" not in variants["split_einsum/compiled"]["components"]
    assert {c["name"] for c in doc["controlnets"]} == {"TinyControlnetSd1", "TinyControlnetSd1B",
                                                      "tiny-controlnet-sd1", "tiny-controlnet-sd1-b"}
    code, out, err = cli(capsys, "show", REPO)
    assert code == 0, err
    assert "CONTROLNET" in out and "TinyControlnetSd1B" in out and "--controlnet" in out

    code, out, err = cli(capsys, "show", COLLECTION)  # a repo of ControlNets only
    assert code == 0, err
    assert "TinySd2_original" in out and f"--controlnet {COLLECTION}:" in out


def test_pull_fetches_only_the_named_controlnet(hub, capsys) -> None:  # type: ignore[no-untyped-def]
    code, out, err = cli(capsys, "pull", REPO, "--variant", "original/compiled", "--json")
    assert code == 0, err
    entry = Path(json.loads(out)["path"])
    got = fetched(hub, REPO)
    assert got and not any("/controlnet/" in f for f in got)
    assert (entry / "ControlledUnet.mlmodelc").is_dir() and not (entry / "controlnet").exists()

    hub.clear_log()
    code, out, err = cli(capsys, "pull", REPO, "--variant", "original/compiled", "--controlnet", "tinycontrolnetsd1b",
                         "--json")
    assert code == 0, err
    record = json.loads(out)
    assert record["already_present"] and record["controlnets"][0]["name"] == "TinyControlnetSd1B"
    assert fetched(hub, REPO) == files_under(hub, REPO, "original/compiled/controlnet/TinyControlnetSd1B.mlmodelc")
    assert (entry / "controlnet" / "TinyControlnetSd1B.mlmodelc" / "model.mil").is_file()
    assert not (entry / "controlnet" / "TinyControlnetSd1.mlmodelc").exists()
    manifest = store.read_manifest(entry)
    assert [c["name"] for c in manifest["controlnets"]] == ["TinyControlnetSd1B"]
    assert any(f["path"].startswith("controlnet/TinyControlnetSd1B.mlmodelc/") for f in manifest["files"])

    hub.clear_log()
    code, out, err = cli(capsys, "pull", REPO, "--variant", "original/compiled", "--controlnet", "TinyControlnetSd1B")
    assert code == 0, err
    assert "already" in err and fetched(hub, REPO) == set()
    code, out, err = cli(capsys, "verify", str(entry), "--hashes", "--json")
    assert code == 0, out + err
    report = json.loads(out)
    assert report["ok"] and not report["problems"] and "controlnet/TinyControlnetSd1B.mlmodelc" in report["components"]


def test_pull_packages_variant_with_a_controlnet(hub, capsys) -> None:  # type: ignore[no-untyped-def]
    code, out, err = cli(capsys, "pull", REPO, "--variant", "original/packages", "--controlnet",
                         "tiny-controlnet-sd1", "--json")
    assert code == 0, err
    entry = Path(json.loads(out)["path"])
    got = fetched(hub, REPO)
    assert not any("ControlNet_tiny-controlnet-sd1-b" in f for f in got)
    assert files_under(hub, REPO, "original/packages/ControlNet_tiny-controlnet-sd1.mlpackage") <= got
    assert (entry / "ControlNet_tiny-controlnet-sd1.mlpackage" / "Manifest.json").is_file()


def test_pull_controlnet_from_the_collection(hub, capsys) -> None:  # type: ignore[no-untyped-def]
    """`REPO:NAME` from another repo; `TinySd1` finds `TinySd1_original` (attention and size words aside)."""
    code, out, err = cli(capsys, "pull", REPO, "--variant", "original/compiled", "--controlnet",
                         f"{COLLECTION}:TinySd1", "--json")
    assert code == 0, err
    entry = Path(json.loads(out)["path"])
    assert fetched(hub, COLLECTION) == {"CN/original/TinySd1_original.zip"}
    assert (entry / "controlnet" / "TinySd1_original.mlmodelc" / "metadata.json").is_file()
    pulled = store.load_entry(entry)
    assert pulled.status == store.STATUS_OK


def test_controlnet_for_another_base_is_refused(hub, capsys) -> None:  # type: ignore[no-untyped-def]
    code, out, err = cli(capsys, "pull", REPO, "--variant", "original/compiled", "--json")
    assert code == 0, err
    entry = Path(json.loads(out)["path"])
    before = store.read_manifest(entry)
    code, out, err = cli(capsys, "pull", REPO, "--variant", "original/compiled", "--controlnet",
                         f"{COLLECTION}:TinySd2")
    assert code == 1
    assert "another base model" in err and "64-wide" in err and "Error:" in err
    assert not (entry / "controlnet").exists() and store.read_manifest(entry) == before


def test_controlnet_asked_of_a_unet_without_residuals(hub, capsys) -> None:  # type: ignore[no-untyped-def]
    code, out, err = cli(capsys, "pull", REPO, "--variant", "split_einsum/compiled", "--controlnet",
                         "TinyControlnetSd1")
    assert code == 1
    assert "no Unet that takes ControlNet residuals" in err and "--variant original/compiled" in err
    assert fetched(hub, REPO) == set()  # refused before any download

    code, out, err = cli(capsys, "pull", REPO, "--variant", "original/compiled", "--controlnet", "NoSuchNet")
    assert code == 1 and "TinyControlnetSd1" in err  # the names it has
    assert fetched(hub, REPO) == set()


def test_run_with_a_controlnet_pulls_it_and_records_it(hub, capsys, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    from PIL import Image

    from coreml_hub.pipeline.controlnet import sha256_file

    picture = tmp_path / "edges.png"
    Image.fromarray(np.random.default_rng(1).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(picture)
    code, out, err = cli(capsys, "run", f"{REPO}:original/compiled", "a red fox", "--controlnet", "TinyControlnetSd1",
                         "--control-image", str(picture), "--control-scale", "0.7", "--steps", "2", "--seed", "3",
                         "--disable-safety", "-o", str(tmp_path / "out"), "--json")
    assert code == 0, err
    assert "pulling it" in err  # the variant, then the ControlNet, on demand
    record = json.loads(out)
    unit = record["images"][0]["parameters"]["controlnets"][0]
    assert unit == {"controlnet": "TinyControlnetSd1", "image": str(picture), "image_sha256": sha256_file(picture),
                    "scale": 0.7}
    png = Path(record["images"][0]["path"])
    with Image.open(png) as img:
        chunks = dict(img.text)
    assert json.loads(chunks["controlnets"])[0]["image_sha256"] == sha256_file(picture)
    assert "ControlNet 0: \"Model: TinyControlnetSd1, Weight: 0.7" in chunks["parameters"]

    code, out, err = cli(capsys, "run", f"{REPO}:original/compiled", "a red fox", "--controlnet", f"{COLLECTION}:TinySd1",
                         "--control-image", str(picture), "--steps", "2", "--disable-safety", "-o", str(tmp_path / "out"),
                         "--json")
    assert code == 0, err
    assert json.loads(out)["images"][0]["parameters"]["controlnets"][0]["controlnet"] == "TinySd1_original"
