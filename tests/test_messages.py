"""Messages a new user met that pointed the wrong way: each now names the real cause and the next step."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterator

import pytest

from coreml_hub import plugins
from coreml_hub.cli import run_cli
from coreml_hub.testing.hubrepo import apple_sd_files, make_repo
from coreml_hub.testing.hubserver import HubServer

from _mil_fixtures import write_variant

BUILT_IN = ["apple", "archives", "coreml", "depth-estimation", "feature-extraction", "flat", "image-classification",
            "image-segmentation", "plain", "text-generation", "text-to-image", "torch"]


def lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.strip()]


@pytest.fixture
def fresh_plugins(monkeypatch: pytest.MonkeyPatch) -> Iterator[pytest.MonkeyPatch]:
    """Plugins loaded again under the environment a test sets (and once more after it)."""
    plugins._reset_for_tests()
    yield monkeypatch
    monkeypatch.delenv("COREML_HUB_PLUGINS", raising=False)
    plugins._reset_for_tests()


def test_a_backend_filtered_out_by_coreml_hub_plugins_is_not_called_missing(
        fresh_plugins: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    variant = write_variant(tmp_path / "variant")
    # `run` needs the task's plugin as well: without it, the task is the one said to be left out
    fresh_plugins.setenv("COREML_HUB_PLUGINS", "apple")
    assert run_cli(["run", str(variant), "a cat", "--steps", "1", "-o", str(tmp_path / "out")]) == 1
    error, hint = lines(capsys.readouterr().err)
    assert error == ("Error: No loaded task knows what to do with variant (COREML_HUB_PLUGINS=apple leaves out "
                     "archives, coreml, depth-estimation, feature-extraction, flat, image-classification, "
                     "image-segmentation, plain, text-generation, text-to-image, torch). It is a diffusion pipeline of "
                     "text_encoder, unet, vae_decoder, vae_encoder.")
    assert hint == "Hint: Add the task's plugin to COREML_HUB_PLUGINS=apple, or unset COREML_HUB_PLUGINS."
    plugins._reset_for_tests()
    fresh_plugins.setenv("COREML_HUB_PLUGINS", "apple,text-to-image")
    assert run_cli(["run", str(variant), "a cat", "--steps", "1", "-o", str(tmp_path / "out")]) == 1
    error, hint = lines(capsys.readouterr().err)
    assert error == ("Error: No backend can run here (torch: not loaded (COREML_HUB_PLUGINS=apple,text-to-image "
                     "leaves out archives, coreml, depth-estimation, feature-extraction, flat, image-classification, "
                     "image-segmentation, plain, text-generation, torch)).")
    assert hint == "Hint: Add the plugin to COREML_HUB_PLUGINS=apple,text-to-image, or unset COREML_HUB_PLUGINS."
    assert run_cli(["run", str(variant), "a cat", "--backend", "torch"]) == 1
    error, hint = lines(capsys.readouterr().err)
    assert "No backend named 'torch' is loaded" in error
    assert "COREML_HUB_PLUGINS=apple,text-to-image leaves out" in error
    assert "not installed" not in error and "COREML_HUB_PLUGINS" in hint


def test_coreml_hub_plugins_naming_no_plugin(fresh_plugins: pytest.MonkeyPatch,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    fresh_plugins.setenv("COREML_HUB_PLUGINS", "nonexistent")
    assert run_cli(["plugins"]) == 1
    error, hint = lines(capsys.readouterr().err)
    assert error == "Error: COREML_HUB_PLUGINS=nonexistent names 'nonexistent', which no installed plugin provides."
    assert hint == f"Hint: Installed plugins: {', '.join(BUILT_IN)}; fix or unset COREML_HUB_PLUGINS."
    # any other use warns once and goes on with the plugins that do exist
    fresh_plugins.setenv("COREML_HUB_PLUGINS", "apple,nonexistent")
    plugins._reset_for_tests()
    plugins.load_plugins()
    plugins.load_plugins()
    assert [p.name for p in plugins.list_plugins()] == ["apple"]
    assert lines(capsys.readouterr().err) == [
        "Warning: COREML_HUB_PLUGINS=apple,nonexistent names 'nonexistent', which no installed plugin provides "
        f"(installed: {', '.join(BUILT_IN)})."]


def test_hints_follow_how_the_model_was_named(hub_server: HubServer, store_home: Path,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    make_repo(hub_server.root, "org/coreml-sd", apple_sd_files(attentions=("original",)))
    make_repo(hub_server.root, "org/diffusers-sd", {"model_index.json": '{"_class_name": "StableDiffusionPipeline"}',
                                                    "unet/config.json": "{}", "README.md": "# a pipeline"})
    # REPO@REV names the revision with `@`: the hint says so, not "--revision"
    assert run_cli(["pull", "org/coreml-sd@nope"]) == 1
    error, hint = lines(capsys.readouterr().err)
    assert error == "Error: Revision 'nope' not found in org/coreml-sd."
    assert "@nope" in hint and "--revision" not in hint
    assert run_cli(["pull", "org/coreml-sd", "--revision", "nope"]) == 1
    assert "--revision" in capsys.readouterr().err
    # a diffusers pipeline has no Core ML variant: convert it
    for args in (["show", "org/diffusers-sd"], ["pull", "org/diffusers-sd"]):
        assert run_cli(args) == 1
        error, hint = lines(capsys.readouterr().err)
        assert error == ("Error: org/diffusers-sd is a diffusers pipeline (it has model_index.json), "
                         "not Core ML bundles.")
        assert hint == 'Hint: Convert it with `coreml-hub convert org/diffusers-sd -o OUT`, then run ' \
                       '`coreml-hub run OUT "PROMPT"`.'


def test_an_endpoint_with_a_wrong_scheme(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_ENDPOINT", "htp://x")
    for args in (["list"], ["show", "org/x"], ["pull", "org/x"]):
        assert run_cli(args) == 1
        error, hint = lines(capsys.readouterr().err)
        assert error == "Error: HF_ENDPOINT is 'htp://x': its scheme 'htp' is neither http nor https."
        assert hint.startswith("Hint: Set HF_ENDPOINT to e.g. https://huggingface.co")


def test_nothing_to_prune_and_ls_of_a_repo_not_pulled(store_home: Path, capsys: pytest.CaptureFixture[str]) -> None:
    for args in (["cache", "prune", "--dry-run"], ["cache", "prune"]):
        assert run_cli(args) == 0
        captured = capsys.readouterr()
        assert captured.out == ""
        assert lines(captured.err) == ["Nothing to prune: no interrupted downloads, stale refs or empty folders."]
    assert run_cli(["cache", "prune", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["items"] == []
    assert run_cli(["ls", "nobody/x"]) == 0
    assert lines(capsys.readouterr().err) == ["Nothing pulled yet. Pull a model with `coreml-hub pull ORG/NAME`."]
    entry = store_home / "models" / "org--pulled" / ("a" * 40) / "original--compiled"
    entry.mkdir(parents=True)
    (entry / "coreml-hub.json").write_text(json.dumps({"repo": "org/pulled", "commit": "a" * 40, "files": [],
                                                       "variant": {"id": "original/compiled"}}))
    assert run_cli(["ls", "nobody/x"]) == 0
    captured = capsys.readouterr()
    assert captured.out == ""
    assert lines(captured.err) == ["nobody/x is not pulled; 1 other model is (`coreml-hub ls` lists them). "
                                   "Pull it with `coreml-hub pull nobody/x`."]


@pytest.mark.slow
def test_compute_unit_with_the_torch_backend_says_it_is_ignored(tmp_path: Path,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    from coreml_hub.testing import factory

    args = ["run", str(factory.converted("sd1", "split_einsum")), "a cat", "--steps", "1", "--seed", "1",
            "--backend", "torch", "--device", "cpu", "--disable-safety", "-o", str(tmp_path)]
    assert run_cli([*args, "--compute-unit", "cpu_only"]) == 0
    warnings = [line for line in capsys.readouterr().err.splitlines() if line.startswith("Warning:")]
    assert warnings == ["Warning: --compute-unit CPU_ONLY is a Core ML setting; the torch backend ignores it."]
    assert run_cli(args) == 0
    assert "Warning" not in capsys.readouterr().err
