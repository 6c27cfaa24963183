"""Shared fixtures. Every Hub interaction in the suite goes to `coreml-hub serve` on 127.0.0.1."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest

# Nothing in the suite may reach the real Hub, even by accident.
os.environ["HF_ENDPOINT"] = "http://127.0.0.1:9"
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.pop("HF_TOKEN", None)
os.environ.setdefault("HF_HOME", tempfile.mkdtemp(prefix="coreml-hub-test-hf-"))


@pytest.fixture
def store_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty coreml-hub store for one test."""
    home = tmp_path / "store"
    monkeypatch.setenv("COREML_HUB_HOME", str(home))
    return home
