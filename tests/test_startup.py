"""Fast start: the CLI frame, `--help`, `list`, `show` and `serve` never import the heavy ML stack."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from coreml_hub.testing.hubrepo import apple_sd_files, make_repo
from coreml_hub.testing.hubserver import HubServer

HEAVY = ("torch", "diffusers", "transformers", "coremltools")

# Runs the CLI in-process, then reports which heavy packages ended up imported.
WRAPPER = """
import sys
from coreml_hub.cli import run_cli
code = run_cli(sys.argv[1:])
heavy = sorted({name.split(".")[0] for name in sys.modules} & set(%r))
print("HEAVY-MODULES:" + ",".join(heavy), file=sys.stderr)
sys.exit(code)
""" % (HEAVY,)


def imported_by_importtime(stderr: str) -> set[str]:
    """Top-level package names from `-X importtime` lines (`import time: self | cumulative | name`)."""
    names = set()
    for line in stderr.splitlines():
        if line.startswith("import time:") and "|" in line:
            name = line.rsplit("|", 1)[1].strip()
            if name and name != "imported package":
                names.add(name.split(".")[0])
    return names


def heavy_after(args: list[str], env: dict[str, str] | None = None) -> tuple[subprocess.CompletedProcess[str], list[str]]:
    result = subprocess.run([sys.executable, "-c", WRAPPER, *args], capture_output=True, text=True,
                            env={**os.environ, **(env or {})}, timeout=120)
    marker = next(line for line in result.stderr.splitlines() if line.startswith("HEAVY-MODULES:"))
    found = [m for m in marker.split(":", 1)[1].split(",") if m]
    return result, found


def test_import_cli_with_importtime() -> None:
    result = subprocess.run([sys.executable, "-X", "importtime", "-c", "import coreml_hub.cli"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    names = imported_by_importtime(result.stderr)
    assert "coreml_hub" in names and "click" in names  # the parse sees real imports
    assert not names & set(HEAVY), sorted(names & set(HEAVY))


@pytest.mark.skipif(shutil.which("coreml-hub") is None, reason="the console script is not on PATH")
def test_console_script_help_with_importtime() -> None:
    result = subprocess.run(["coreml-hub", "--help"], capture_output=True, text=True, timeout=120,
                            env={**os.environ, "PYTHONPROFILEIMPORTTIME": "1"})
    assert result.returncode == 0 and "Commands:" in result.stdout
    names = imported_by_importtime(result.stderr)
    assert "pluggy" in names  # --help lists plugin commands, so every plugin module was imported
    assert not names & set(HEAVY), sorted(names & set(HEAVY))


@pytest.mark.parametrize("args", [["--help"], ["list", "--help"], ["plugins"], ["serve", "--help"], ["app", "--help"]])
def test_commands_without_network_stay_light(args: list[str]) -> None:
    result, heavy = heavy_after(args)
    assert result.returncode == 0, result.stderr[-2000:]
    assert heavy == [], f"`coreml-hub {' '.join(args)}` imported {heavy}"


def test_list_and_show_against_serve_stay_light(hub_server: HubServer) -> None:
    make_repo(hub_server.root, "apple/coreml-stable-diffusion-v1-5", apple_sd_files(attentions=("split_einsum",)),
              meta={"library_name": "coreml"})
    for args in (["list"], ["list", "--json"], ["show", "apple/coreml-stable-diffusion-v1-5"]):
        result, heavy = heavy_after(args, {"HF_ENDPOINT": hub_server.url})
        assert result.returncode == 0, result.stderr[-2000:]
        assert "apple/coreml-stable-diffusion-v1-5" in result.stdout
        assert heavy == [], f"`coreml-hub {' '.join(args)}` imported {heavy}"


def test_server_module_stays_light(tmp_path: Path) -> None:
    code = ("import sys; from coreml_hub.server import make_server; s = make_server(sys.argv[1]); s.server_close(); "
            f"print(sorted({{n.split('.')[0] for n in sys.modules}} & set({HEAVY!r})))")
    result = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True, timeout=60)
    assert result.stdout.strip() == "[]", result.stdout + result.stderr[-2000:]


def test_app_module_stays_light() -> None:
    code = ("import sys; from coreml_hub.app.web import AppConfig, make_app; import pathlib; "
            "make_app(AppConfig(outputs=pathlib.Path('.'))).state.coreml_hub.close(); "
            f"print(sorted({{n.split('.')[0] for n in sys.modules}} & set({HEAVY!r})))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.stdout.strip() == "[]", result.stdout + result.stderr[-2000:]
