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
# One intra-op thread per process (torch reads this at import; child processes inherit it). The
# tiny models gain nothing from more, and torch's default, a spinning worker thread per core in
# every process, oversubscribes the cores two pytest-xdist workers already fill: on a busy
# machine that made a tiny-model step take seconds instead of a tenth of one.
os.environ.setdefault("OMP_NUM_THREADS", "1")


# --- Tiers ---------------------------------------------------------------------------------------
# The default run is the quick tier (under 8 minutes on two busy cores). Tests marked `extended`
# (the second and later cases of a heavy matrix, whole-visit and cluster tests) run with
# `--all-tiers`, which `./scripts/test.sh --all` and CI pass. They are deselected, not skipped,
# and the run ends by saying how many were left out and how to run them.


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--all-tiers", action="store_true", default=False,
                     help="also run the tests marked `extended` (what CI runs)")


def _all_tiers(config: pytest.Config) -> bool:
    return bool(config.getoption("--all-tiers")) or os.environ.get("COREML_HUB_ALL_TIERS") == "1"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if _all_tiers(config):
        return
    left_out = [item for item in items if item.get_closest_marker("extended")]
    if left_out:
        config.hook.pytest_deselected(items=left_out)
        items[:] = [item for item in items if not item.get_closest_marker("extended")]
    config.stash[_LEFT_OUT] = len(left_out)
    if hasattr(config, "workeroutput"):  # a pytest-xdist worker: its controller prints the summary
        config.workeroutput["extended_left_out"] = len(left_out)


_LEFT_OUT = pytest.StashKey[int]()


@pytest.hookimpl(optionalhook=True)
def pytest_testnodedown(node, error) -> None:  # pytest-xdist, in the controller
    reported = getattr(node, "workeroutput", {}).get("extended_left_out", 0)
    node.config.stash[_LEFT_OUT] = max(node.config.stash.get(_LEFT_OUT, 0), reported)


def pytest_terminal_summary(terminalreporter, exitstatus: int, config: pytest.Config) -> None:
    left_out = config.stash.get(_LEFT_OUT, 0)
    if left_out:
        terminalreporter.write_line(
            f"{left_out} test(s) of the extended tier were not run: `./scripts/test.sh --all` "
            "(or pytest --all-tiers) runs them too.")


@pytest.fixture
def store_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty coreml-hub store for one test."""
    home = tmp_path / "store"
    monkeypatch.setenv("COREML_HUB_HOME", str(home))
    return home


# --- Hub mirror fixtures -------------------------------------------------------------------------
# `hub_root`: an empty ROOT for `coreml-hub serve`; fill it with
#   coreml_hub.testing.hubrepo.make_repo(hub_root, "org/name", {path: bytes | str | size}, meta={...}).
# `hub_server`: `python -m coreml_hub serve ROOT --port 0 --log-requests LOG` as a real subprocess,
#   with HF_ENDPOINT pointing at it for the test. `.root`, `.url`, `.requests()` (parsed log, after
#   every in-flight request is logged), `.clear_log()`, `.stop()`, `.start()` (same port and root).


@pytest.fixture
def hub_root(tmp_path: Path) -> Path:
    root = tmp_path / "hub"
    root.mkdir()
    return root


@pytest.fixture
def hub_server(hub_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    from coreml_hub.testing.hubserver import HubServer

    server = HubServer(hub_root, tmp_path / "hub-requests.jsonl").start()
    monkeypatch.setenv("HF_ENDPOINT", server.url)
    try:
        yield server
    finally:
        server.stop()
