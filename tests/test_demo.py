"""The README's first quick-start command ends in `coreml-hub demo`: it must make an image offline."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image


def test_demo_serves_pulls_and_runs_the_tiny_model(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k not in ("COREML_HUB_HOME", "HF_HUB_OFFLINE")}
    out = tmp_path / "images"
    proc = subprocess.run(
        [sys.executable, "-m", "coreml_hub", "demo", "--root", str(tmp_path / "demo"), "--steps", "3", "-o", str(out)],
        capture_output=True, text=True, env=env, timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    # list, show and pull print their data on stdout; run prints the PNG's path last
    assert "demo/coreml-tiny-sd" in proc.stdout
    assert "coreml-hub pull demo/coreml-tiny-sd --variant original/compiled" in proc.stdout
    png = Path(proc.stdout.strip().splitlines()[-1])
    assert png.parent == out and png.suffix == ".png"
    with Image.open(png) as image:
        assert image.size == (64, 64)
        assert "a photo of an astronaut riding a horse" in image.text["parameters"]
    # the pull went through the local mirror only: its request log names the demo repo
    log = [json.loads(line) for line in (tmp_path / "demo" / "requests.jsonl").read_text().splitlines()]
    assert any("/demo/coreml-tiny-sd/resolve/" in entry["path"] for entry in log)
    assert (tmp_path / "demo" / "store" / "models").is_dir()


def test_the_demo_image_folder_is_not_left_for_git_to_add() -> None:
    """`./scripts/demo.sh` in a checkout writes coreml-hub-outputs/ there; git must ignore it."""
    import shutil

    root = Path(__file__).resolve().parent.parent
    if shutil.which("git") is None:
        pytest.skip("git is not installed, so there is no .gitignore to check")
    inside = subprocess.run(["git", "-C", str(root), "rev-parse", "--is-inside-work-tree"], capture_output=True,
                            text=True)
    if inside.returncode != 0:
        pytest.skip("the tests run outside a git checkout (e.g. an unpacked archive)")
    for path in ("coreml-hub-outputs/a-photo-of-an-astronaut-riding-a-horse-42.png",
                 "tests/coreml-hub-outputs/x.png"):
        assert subprocess.run(["git", "-C", str(root), "check-ignore", "-q", path]).returncode == 0, path
