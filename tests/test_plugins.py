"""Plugins: a separately packaged distribution is found through its entry point, listed and used."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any, Iterator

import pytest

from coreml_hub import plugins
from coreml_hub.cli import run_cli
from coreml_hub.hookspecs import hookimpl
from coreml_hub.layouts import RepoFile, Variant, variant_id
from coreml_hub.testing.hubrepo import make_repo
from coreml_hub.testing.hubserver import HubServer

PLUGIN_SOURCE = '''
"""A third-party layout for repos that keep one `.xyzmodel` file per component."""
import click

from coreml_hub.hookspecs import hookimpl
from coreml_hub.layouts import RepoFile, Variant, variant_id


class XyzLayout:
    name = "xyz"

    def variants(self, files):
        models = [f for f in files if f.path.startswith("bundle/") and f.path.endswith(".xyzmodel")]
        if not models:
            return []
        comps = tuple(sorted(f.path[len("bundle/"):-len(".xyzmodel")] for f in models))
        return [Variant(id=variant_id("original", "compiled", tags=["xyz"]), attention="original",
                        format="compiled", layout=self.name, root="bundle", tags=("xyz",), components=comps,
                        common_files=tuple(models))]

    def allow_patterns(self, variant):
        return list(variant.files)

    def materialize(self, downloaded_dir, variant, dest):
        raise NotImplementedError


@hookimpl
def register_layouts(register):
    register(XyzLayout())


@hookimpl
def register_commands(cli):
    @click.command("xyz-hello", help="Say hello from the xyz plugin.")
    def hello():
        click.echo("hello from xyz")

    cli.add_command(hello)
'''


def write_distribution(site: Path, dist: str, version: str, entry_points: dict[str, str],
                       modules: dict[str, str]) -> None:
    """What `pip install` leaves behind: the modules plus a dist-info with METADATA and entry_points.txt."""
    info = site / f"{dist.replace('-', '_')}-{version}.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: {version}\n")
    lines = "\n".join(f"{name} = {target}" for name, target in entry_points.items())
    (info / "entry_points.txt").write_text(f"[coreml_hub]\n{lines}\n")
    for name, source in modules.items():
        (site / f"{name}.py").write_text(textwrap.dedent(source))


@pytest.fixture
def plugin_site(tmp_path: Path) -> Path:
    site = tmp_path / "site"
    write_distribution(site, "xyz-layouts", "0.1", {"xyz": "xyz_layouts"}, {"xyz_layouts": PLUGIN_SOURCE})
    return site


def cli(args: list[str], site: Path | None, **env: str) -> subprocess.CompletedProcess[str]:
    full_env = {**os.environ, **env}
    if site is not None:
        full_env["PYTHONPATH"] = os.pathsep.join([str(site), full_env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    return subprocess.run([sys.executable, "-m", "coreml_hub", *args], capture_output=True, text=True,
                          env=full_env, timeout=120)


def xyz_repo(root: Path) -> None:
    make_repo(root, "org/xyz-model", {"bundle/unet.xyzmodel": 500, "bundle/text_encoder.xyzmodel": 300,
                                      "README.md": "x"})


def test_packaged_plugin_is_listed(plugin_site: Path) -> None:
    result = cli(["plugins", "--json"], plugin_site)
    assert result.returncode == 0, result.stderr
    records = {r["name"]: r for r in json.loads(result.stdout)}
    xyz = records["xyz"]
    assert (xyz["version"], xyz["distribution"], xyz["status"]) == ("0.1", "xyz-layouts", "loaded")
    assert xyz["hooks"] == ["register_commands", "register_layouts"] and xyz["module"] == "xyz_layouts"
    builtin = [r for r in records.values() if r["distribution"] == "coreml-hub"]
    assert builtin, "built-in plugins register through the same entry-point group"
    table = cli(["plugins"], plugin_site).stdout
    assert table.splitlines()[0].split() == ["NAME", "VERSION", "DISTRIBUTION", "STATUS", "HOOKS", "PROVIDES"]
    assert any(line.split()[:4] == ["xyz", "0.1", "xyz-layouts", "loaded"] for line in table.splitlines())
    assert xyz["layouts"] == ["xyz"] and xyz["backends"] == []


def test_plugins_say_which_backends_can_run_here() -> None:
    result = cli(["plugins", "--json"], None)
    assert result.returncode == 0, result.stderr
    backends = {b["name"]: b for r in json.loads(result.stdout) for b in r["backends"]}
    assert backends["torch"]["available"] is True
    if sys.platform != "darwin":
        assert backends["coreml"]["available"] is False and "macOS" in backends["coreml"]["reason"]
    table = cli(["plugins"], None).stdout
    assert "backend torch (available)" in table


def test_packaged_plugin_layout_is_used_by_show(plugin_site: Path, hub_server: HubServer) -> None:
    xyz_repo(hub_server.root)
    without = cli(["show", "org/xyz-model"], None)
    assert without.returncode == 1 and "has no Core ML variant" in without.stderr
    result = cli(["show", "org/xyz-model", "--json"], plugin_site)
    assert result.returncode == 0, result.stderr
    (variant,) = json.loads(result.stdout)["variants"]
    assert variant["id"] == "original/compiled+xyz" and variant["layout"] == "xyz"
    assert variant["components"] == ["text_encoder", "unet"] and variant["size_bytes"] == 800
    assert variant["pull_command"] == "coreml-hub pull org/xyz-model --variant original/compiled+xyz"


def test_packaged_plugin_command(plugin_site: Path) -> None:
    result = cli(["xyz-hello"], plugin_site)
    assert (result.returncode, result.stdout) == (0, "hello from xyz\n")
    assert "xyz-hello" in cli(["--help"], plugin_site).stdout
    assert cli(["xyz-hello"], None).returncode == 2  # unknown command without the plugin


def test_broken_plugin_warns_once_and_is_skipped(plugin_site: Path, hub_server: HubServer) -> None:
    write_distribution(plugin_site, "broken-plugin", "2.0", {"broken": "broken_plugin"},
                       {"broken_plugin": "raise ImportError('needs a library that is not installed')\n"})
    xyz_repo(hub_server.root)
    result = cli(["show", "org/xyz-model"], plugin_site)
    assert result.returncode == 0  # the working plugin still does its job
    warnings = [line for line in result.stderr.splitlines() if "broken" in line]
    assert warnings == ["Warning: plugin 'broken' failed to load (ImportError: needs a library that is not "
                        "installed); skipped."]
    listed = {r["name"]: r for r in json.loads(cli(["plugins", "--json"], plugin_site).stdout)}
    assert listed["broken"]["status"] == "failed" and "not installed" in listed["broken"]["error"]
    assert listed["xyz"]["status"] == "loaded"


def test_coreml_hub_plugins_restricts_loading(plugin_site: Path, hub_server: HubServer) -> None:
    result = cli(["plugins", "--json"], plugin_site, COREML_HUB_PLUGINS="xyz")
    assert [r["name"] for r in json.loads(result.stdout)] == ["xyz"]
    result = cli(["plugins", "--json"], plugin_site, COREML_HUB_PLUGINS="apple, flat")
    assert sorted(r["name"] for r in json.loads(result.stdout)) == ["apple", "flat"]
    xyz_repo(hub_server.root)
    assert cli(["show", "org/xyz-model"], plugin_site, COREML_HUB_PLUGINS="apple").returncode == 1


# --- in-process -------------------------------------------------------------------------------------


class _OneFileLayout:
    """Finds a variant in repos holding `weights.onefile`."""

    name = "onefile"

    def variants(self, files: list[RepoFile]) -> list[Variant]:
        hits = [f for f in files if f.path == "weights.onefile"]
        return [Variant(id=variant_id("original", "packages"), attention="original", format="packages",
                        layout=self.name, root="", components=("unet",), common_files=tuple(hits))] if hits else []

    def allow_patterns(self, variant: Variant) -> list[str]:
        return list(variant.files)

    def materialize(self, downloaded_dir: Path, variant: Variant, dest: Path) -> None:
        raise NotImplementedError


class _OneFilePlugin:
    @hookimpl
    def register_layouts(self, register: Any) -> None:
        register(_OneFileLayout())


@pytest.fixture
def onefile_plugin() -> Iterator[object]:
    """Registered straight with the plugin manager for one test, then removed."""
    plugins.load_plugins()
    plugin = _OneFilePlugin()
    plugins.pm.register(plugin, name="onefile-test")
    try:
        yield plugin
    finally:
        plugins.pm.unregister(plugin)


def test_registered_layout_in_process(onefile_plugin: object, hub_server: HubServer,
                                      capsys: pytest.CaptureFixture[str]) -> None:
    make_repo(hub_server.root, "org/onefile", {"weights.onefile": 64})
    assert run_cli(["show", "org/onefile", "--json"]) == 0
    (variant,) = json.loads(capsys.readouterr().out)["variants"]
    assert variant["layout"] == "onefile" and variant["files"] == ["weights.onefile"]


def test_reset_rediscovers_entry_points(plugin_site: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.syspath_prepend(str(plugin_site))
    plugins._reset_for_tests()
    try:
        names = {p.name for p in plugins.list_plugins()}
        assert "xyz" in names
        assert any(layout.name == "xyz" for layout in plugins.get_layouts())
    finally:
        monkeypatch.undo()
        plugins._reset_for_tests()
        sys.modules.pop("xyz_layouts", None)
    assert "xyz" not in {p.name for p in plugins.list_plugins()}


class _PlainBoolBackend:
    """A third-party backend whose `available()` answers a bare bool instead of (bool, reason)."""

    name = "plainbool"
    formats = ("packages",)

    def available(self) -> bool:
        return False


class _PlainBoolPlugin:
    @hookimpl
    def register_backends(self, register: Any) -> None:
        register(_PlainBoolBackend())


def test_plugins_lists_a_backend_answering_a_bare_bool(capsys: pytest.CaptureFixture[str]) -> None:
    plugins.load_plugins()
    plugin = _PlainBoolPlugin()
    plugins.pm.register(plugin, name="plainbool-test")
    try:
        assert run_cli(["plugins", "--json"]) == 0
    finally:
        plugins.pm.unregister(plugin)
    records = {r["name"]: r for r in json.loads(capsys.readouterr().out)}
    assert records["plainbool-test"]["backends"] == [
        {"name": "plainbool", "formats": ["packages"], "available": False, "reason": ""}]
