"""coremltools' own MIL op tests, predictions on the portable runtime: a fixed sample in the default suite.

Every 150th case (by sorted node id) of the ML Program op tests shipped in the coremltools
wheel runs here, with coreml_hub.pytest_plugin routing each prediction through the runtime
(bench/coremltools_optests.py runs them all and reports the pass rate). The sample must pass
entirely, apart from the exclusions file's cases (behaviour specific to Apple's engine).

COREML_HUB_OPTESTS=full runs every case instead (hours on two cores), =off skips this tier,
and a number N runs every Nth case.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from types import ModuleType

import pytest

pytestmark = pytest.mark.extended  # extended tier: a sample of coremltools' op tests in a subprocess

pytest.importorskip("coremltools", reason="the op tests ship in the coremltools wheel")
pytest.importorskip("scipy", reason="coremltools' op tests import scipy (pip install -e '.[test]')")

BENCH = Path(__file__).resolve().parents[1] / "bench" / "coremltools_optests.py"
DEFAULT_SAMPLE = 150


def _runner() -> ModuleType:
    spec = importlib.util.spec_from_file_location("coremltools_optests", BENCH)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _sample() -> int:
    setting = os.environ.get("COREML_HUB_OPTESTS", "").strip().lower()
    if setting in ("off", "0", "no"):
        pytest.skip("COREML_HUB_OPTESTS=off")
    if setting == "full":
        return 1
    return int(setting) if setting.isdigit() else DEFAULT_SAMPLE


@pytest.mark.slow
def test_coremltools_op_tests_sample() -> None:
    runner = _runner()
    sample = _sample()
    records, code, _ = runner.run(sample=sample, timeout=None if sample == 1 else 1800)
    summary = runner.summarize(records)
    assert summary["cases"] > 0, f"pytest collected no op tests (exit {code})"
    failures = "\n".join(f"{f['id']}: {f['reason']}" for f in summary["failures"])
    assert summary["totals"]["failed"] + summary["totals"]["error"] == 0, failures
    # the sample must really predict: most passing cases compare a prediction made by the runtime
    assert summary["passed_with_prediction"] >= 0.6 * summary["totals"]["passed"], summary["totals"]
