"""A task plugin packaged on its own: the README's example, installed as a distribution and used by `run`."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest

from test_plugins import cli, write_distribution

pytestmark = pytest.mark.extended  # extended tier: builds and installs a plugin distribution

README = Path(__file__).resolve().parent.parent / "README.md"


def readme_plugin() -> str:
    """The plugin module exactly as the README shows it."""
    text = README.read_text()
    section = text[text.index("### Writing a task plugin"):]
    match = re.search(r"```python\n(# coreml_hub_arrays\.py.*?)```", section, re.S)
    assert match, "the README's task plugin example is missing"
    return match.group(1)


@pytest.fixture
def plugin_site(tmp_path: Path) -> Path:
    site = tmp_path / "site"
    write_distribution(site, "coreml-hub-arrays", "0.2", {"array-map": "coreml_hub_arrays"},
                       {"coreml_hub_arrays": readme_plugin()})
    return site


@pytest.mark.slow
def test_readme_task_plugin_is_installed_and_runs(plugin_site: Path, tmp_path: Path) -> None:
    import torch

    from coreml_hub.testing import feature_models

    model = feature_models.package("range_dim")  # x [1, 1..16, 8] -> y: no built-in task takes it
    x = np.random.default_rng(0).standard_normal((1, 3, 8)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)

    without = cli(["run", str(model), str(tmp_path / "x.npy")], None)
    assert without.returncode == 1 and "No task knows what to do with" in without.stderr
    assert "coreml-hub predict" in without.stderr

    listed = {r["name"]: r for r in json.loads(cli(["plugins", "--json"], plugin_site).stdout)}
    plugin = listed["array-map"]
    assert (plugin["distribution"], plugin["version"], plugin["hooks"], plugin["tasks"]) == (
        "coreml-hub-arrays", "0.2", ["register_tasks"], ["array-map"])
    assert "task array-map" in cli(["plugins"], plugin_site).stdout

    result = cli(["run", str(model), str(tmp_path / "x.npy"), "--option", "scale=2", "--json"], plugin_site)
    assert result.returncode == 0, result.stderr
    assert "Input x: [1, 3, 8]" in result.stderr
    with torch.no_grad():
        expected = feature_models.reference("range_dim")(torch.from_numpy(x * 2)).numpy()
    data = json.loads(result.stdout)
    assert data["task"] == "array-map"
    np.testing.assert_allclose(np.array(data["outputs"]["y"]), expected, atol=1e-5)

    table = cli(["run", str(model), str(tmp_path / "x.npy")], plugin_site)
    assert table.returncode == 0 and table.stdout.splitlines()[0].split() == ["OUTPUT", "SHAPE", "MEAN"]
    refused = cli(["run", str(model), str(tmp_path / "x.npy"), "--top-k", "2"], plugin_site)
    assert refused.returncode == 2 and "--top-k is not used by the array-map task" in refused.stderr
    assert "Options of array-map: --option scale=VALUE" in refused.stderr
