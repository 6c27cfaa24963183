"""pytest plugin: `coremltools.models.MLModel(...).predict` on Linux in a test suite.

    pytest -p coreml_hub.pytest_plugin          # install for this run
    COREML_HUB_COREMLTOOLS=1 pytest             # the same, without the flag

With `-p` (or the variable) it installs `coreml_hub.coremltools_compat` when pytest starts,
before any test module is imported, so that test modules which decide at import time whether
Core ML can predict (skip markers on `_macos_version()`) see the portable runtime, and
`MLModel.predict` in the tests runs on it. The plugin is also registered for every pytest run
(entry point `pytest11`), where without the variable it does nothing: importing this module
imports neither coremltools nor torch.

Options for measuring a suite (coremltools' own op tests: `bench/coremltools_optests.py`):

    --coreml-hub-exclusions FILE   skip the test ids matching the file's patterns, with its reasons
    --coreml-hub-sample N          run every Nth collected case (sorted by node id), deterministic
    --coreml-hub-sample-offset K   ... starting from the Kth (default 0)
    --coreml-hub-report FILE       write each case's outcome as JSON lines (predicted: whether
                                   the case ran a prediction through coreml-hub)
"""

from __future__ import annotations

import fnmatch
import json
import sys
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

ENTRY_POINT_NAME = "coreml_hub.pytest_plugin"
PREDICTIONS_KEY = "coreml_hub_predictions"
NEURAL_NETWORK_SKIP = "a NeuralNetwork model: the portable runtime runs ML Programs only"
EXCLUDED_PREFIX = "excluded: "


@dataclass(frozen=True)
class Exclusion:
    pattern: str  # fnmatch pattern over the node id relative to the test root
    reason: str


def read_exclusions(path: str | Path) -> list[Exclusion]:
    """Lines `PATTERN  # REASON`; a pattern without a reason is an error (every exclusion says why)."""
    exclusions = []
    for number, raw in enumerate(Path(path).read_text().splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        pattern, _, reason = line.partition("#")
        if not reason.strip():
            raise pytest.UsageError(f"{path}:{number}: exclusion {pattern.strip()!r} gives no reason ('# why')")
        exclusions.append(Exclusion(pattern.strip(), reason.strip()))
    return exclusions


def pytest_addoption(parser: Any) -> None:
    group = parser.getgroup("coreml-hub")
    group.addoption("--coreml-hub-exclusions", default=None, help="file of excluded test-id patterns with reasons")
    group.addoption("--coreml-hub-sample", type=int, default=1, help="run every Nth collected case")
    group.addoption("--coreml-hub-sample-offset", type=int, default=0, help="first case of the sample")
    group.addoption("--coreml-hub-report", default=None, help="write per-case outcomes as JSON lines here")


def _asked_for_explicitly(config: Any) -> bool:
    """Whether `-p coreml_hub.pytest_plugin` was given (rather than only the entry point loading it)."""
    args = list(getattr(getattr(config, "invocation_params", None), "args", ()) or ())
    args += list(getattr(config.option, "plugins", None) or ())
    return any(str(a).removeprefix("-p").strip() == ENTRY_POINT_NAME for a in args)


def _active() -> bool:
    """Whether the drop-in is on in this process (installed, or waiting for coremltools' import)."""
    compat = sys.modules.get("coreml_hub.coremltools_compat")
    return compat is not None and (compat.installed() or compat.armed())


def pytest_configure(config: Any) -> None:
    from .coremltools_compat import enabled_by_environment, install_when_imported

    if enabled_by_environment() or _asked_for_explicitly(config):
        config.coreml_hub_switched_on = True  # by the run's command line or environment, not by a test
        install_when_imported()
    path = config.getoption("--coreml-hub-report", None)
    if path and not hasattr(config, "workerinput"):  # only the controller writes the report
        config.pluginmanager.register(_Report(Path(path)), "coreml-hub-report")


def pytest_report_header(config: Any) -> str | None:
    if _active():
        return "coreml-hub: coremltools' MLModel.predict runs on the portable ML Program runtime"
    return None


def _relative_id(item: Any) -> str:
    """The node id from the test root's folder (iOS17/test_conv.py::TestConv::test_x[...])."""
    node = item.nodeid
    marker = "/ops/tests/"
    return node.split(marker, 1)[1] if marker in node else node


def pytest_collection_modifyitems(session: Any, config: Any, items: list[Any]) -> None:
    every = max(1, int(config.getoption("--coreml-hub-sample", 1) or 1))
    offset = int(config.getoption("--coreml-hub-sample-offset", 0) or 0) % every
    if every > 1:
        ordered = sorted(items, key=lambda item: item.nodeid)
        keep = {id(item) for index, item in enumerate(ordered) if index % every == offset}
        deselected = [item for item in items if id(item) not in keep]
        items[:] = [item for item in items if id(item) in keep]
        config.hook.pytest_deselected(items=deselected)
    path = config.getoption("--coreml-hub-exclusions", None)
    if path:
        exclusions = read_exclusions(path)
        for item in items:
            node = _relative_id(item)
            for exclusion in exclusions:
                if fnmatch.fnmatchcase(node, exclusion.pattern):
                    item.add_marker(pytest.mark.skip(reason=EXCLUDED_PREFIX + exclusion.reason))
                    break


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_call(item: Any) -> Any:
    if not _active():
        yield
        return
    from . import coremltools_compat

    before = coremltools_compat.prediction_count()
    yield
    item.user_properties.append((PREDICTIONS_KEY, coremltools_compat.prediction_count() - before))


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: Any, call: Any) -> Any:
    """A case whose model is not an ML Program (coremltools' NeuralNetwork backend) is skipped, saying why."""
    outcome = yield
    report = outcome.get_result()
    if call.excinfo is None or report.outcome != "failed" or not getattr(item.config, "coreml_hub_switched_on", False):
        return
    from .errors import UnsupportedModel

    error = call.excinfo.value
    if isinstance(error, UnsupportedModel):
        report.outcome = "skipped"
        report.longrepr = (str(item.path), item.location[1] or 0, f"Skipped: {NEURAL_NETWORK_SKIP} ({error})")


class _Report:
    """Collects one record per case on the controller (works with pytest-xdist)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.records: dict[str, dict[str, Any]] = {}
        self.lock = threading.Lock()

    def pytest_runtest_logreport(self, report: Any) -> None:
        node = report.nodeid
        with self.lock:
            record = self.records.setdefault(node, {"id": node, "outcome": None, "predicted": 0, "reason": ""})
            for key, value in report.user_properties:
                if key == PREDICTIONS_KEY:
                    record["predicted"] += int(value)
            if report.when == "call" or report.outcome != "passed":
                outcome = report.outcome
                if hasattr(report, "wasxfail"):
                    outcome = "xpassed" if report.outcome == "passed" else "xfailed"
                    record["reason"] = str(report.wasxfail)
                elif report.outcome == "skipped":
                    reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
                    record["reason"] = str(reason).removeprefix("Skipped: ")
                    if record["reason"].startswith(EXCLUDED_PREFIX):
                        outcome = "excluded"
                        record["reason"] = record["reason"][len(EXCLUDED_PREFIX):]
                elif report.outcome == "failed":
                    record["reason"] = _failure_line(report)
                if record["outcome"] in (None, "passed") or outcome == "failed":
                    record["outcome"] = outcome

    def pytest_sessionfinish(self, session: Any) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("w") as out:
            for record in sorted(self.records.values(), key=lambda r: r["id"]):
                out.write(json.dumps(record) + "\n")


def _failure_line(report: Any) -> str:
    """The exception line of a failure (`E   TypeError: ...`), for grouping failures by cause."""
    text = str(report.longrepr)
    errors = [line[1:].strip() for line in text.splitlines() if line.startswith("E ")]
    return (errors[0] if errors else text.strip().splitlines()[-1] if text.strip() else "")[:300]
