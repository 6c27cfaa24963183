"""coremltools' own MIL op tests, with every prediction run by coreml-hub's portable runtime.

The coremltools wheel ships its op tests (`coremltools/converters/mil/mil/ops/tests/iOS14 ...
iOS18`, driven by `run_compare_builder`). On Linux they convert each case and skip the
prediction; with `coreml_hub.pytest_plugin` the prediction runs on the portable runtime and
is compared with the test's expected values. Only the ML Program cases run
(PYMIL_TEST_TARGETS=mlprogram): the NeuralNetwork backend is out of scope.

    python bench/coremltools_optests.py                  # the full run (long: ~10,000 cases)
    python bench/coremltools_optests.py --sample 100     # every 100th case (the CI tier's sample)
    python bench/coremltools_optests.py -k TestConv --files iOS17/test_conv.py -n 2

Prints pass / fail / skip counts per file and the overall pass rate (passed over passed plus
failed, excluded cases apart), and writes a JSON and a Markdown report. Cases that test
behaviour specific to Apple's engine are listed, each with its reason, in
tests/data/coremltools_optests_exclusions.txt.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
EXCLUSIONS = REPO / "tests" / "data" / "coremltools_optests_exclusions.txt"
FOLDERS = ("iOS14", "iOS15", "iOS16", "iOS17", "iOS18", "coreml_dialect")
OUTCOMES = ("passed", "failed", "excluded", "skipped", "xfailed", "xpassed", "error")
LAST_WALL_SECONDS = [0.0]


def tests_root() -> Path:
    """The op-test folder inside the installed coremltools."""
    import importlib.util

    spec = importlib.util.find_spec("coremltools")
    if spec is None or spec.origin is None:
        raise SystemExit("coremltools is not installed: pip install coremltools")
    root = Path(spec.origin).parent / "converters" / "mil" / "mil" / "ops" / "tests"
    if not root.is_dir():
        raise SystemExit(f"this coremltools has no op tests at {root}")
    return root


def run(
    *,
    sample: int = 1,
    offset: int = 0,
    files: list[str] | None = None,
    keyword: str | None = None,
    workers: int = 0,
    exclusions: Path | None = EXCLUSIONS,
    fp32: bool = False,
    timeout: float | None = None,
) -> tuple[list[dict[str, Any]], int, float]:
    """Run the op tests in a subprocess; returns (per-case records, pytest's exit code, seconds).

    The seconds are CPU seconds of pytest and its workers (wall time on a shared machine says
    little); `LAST_WALL_SECONDS` keeps the wall time.
    """
    root = tests_root()
    targets = [str(root / f) for f in files] if files else [str(root / f) for f in FOLDERS if (root / f).exists()]
    with tempfile.TemporaryDirectory(prefix="coreml-hub-optests-") as tmp:
        report = Path(tmp) / "cases.jsonl"
        command = [
            sys.executable, "-m", "pytest", *targets, "-q", "-p", "no:cacheprovider", "-p", "no:randomly",
            "-p", "coreml_hub.pytest_plugin", "-W", "ignore", "--tb=line", "-o", "addopts=",
            f"--rootdir={root}", f"--coreml-hub-report={report}", f"--coreml-hub-sample={sample}", f"--coreml-hub-sample-offset={offset}",
        ]
        if exclusions is not None:
            command.append(f"--coreml-hub-exclusions={exclusions}")
        if keyword:
            command += ["-k", keyword]
        if workers:
            command += ["-n", str(workers)]
        env = dict(os.environ, PYMIL_TEST_TARGETS="mlprogram")
        if fp32:
            env["INCLUDE_MIL_FP32_UNIT_TESTS"] = "1"
        started = time.perf_counter()
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        proc = subprocess.run(command, cwd=tmp, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True, timeout=timeout)
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        LAST_WALL_SECONDS[0] = time.perf_counter() - started
        elapsed = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
        records = [json.loads(line) for line in report.read_text().splitlines()] if report.exists() else []
        if not records:
            sys.stderr.write(proc.stdout[-4000:])
        return records, proc.returncode, elapsed


def file_of(node: str) -> str:
    path = node.split("::", 1)[0]
    marker = "/ops/tests/"
    return path.split(marker, 1)[1] if marker in path else path


def summarize(records: list[dict[str, Any]]) -> dict[str, Any]:
    per_file: dict[str, collections.Counter[str]] = collections.defaultdict(collections.Counter)
    predicted = 0
    for record in records:
        per_file[file_of(record["id"])][record["outcome"]] += 1
        if record["outcome"] == "passed" and record["predicted"]:
            predicted += 1
    totals: collections.Counter[str] = collections.Counter()
    per_opset: dict[str, collections.Counter[str]] = collections.defaultdict(collections.Counter)
    for name, counts in per_file.items():
        totals.update(counts)
        per_opset[name.split("/", 1)[0]].update(counts)
    ran = totals["passed"] + totals["failed"] + totals["error"]
    failures = collections.Counter(_category(r["reason"]) for r in records if r["outcome"] in ("failed", "error"))
    return {
        "cases": len(records),
        "totals": {k: totals[k] for k in OUTCOMES},
        "passed_with_prediction": predicted,
        "pass_rate": (totals["passed"] / ran) if ran else None,
        "per_opset": {name: {k: counts[k] for k in OUTCOMES} for name, counts in sorted(per_opset.items())},
        "per_file": {name: {k: counts[k] for k in OUTCOMES} for name, counts in sorted(per_file.items())},
        "failure_categories": failures.most_common(),
        "failures": [{"id": r["id"], "reason": r["reason"]} for r in records if r["outcome"] in ("failed", "error")],
        "excluded": sorted({r["reason"] for r in records if r["outcome"] == "excluded"}),
    }


def _category(reason: str) -> str:
    """A failure's kind: the exception type and the first words of its message."""
    text = reason.strip()
    if ":" in text:
        kind, _, message = text.partition(":")
        words = " ".join(message.split()[:6])
        return f"{kind.strip()[-60:]}: {words}"
    return text[:80]


def markdown(summary: dict[str, Any], elapsed: float, sample: int) -> str:
    totals = summary["totals"]
    rate = summary["pass_rate"]
    lines = [
        "# coremltools op tests on coreml-hub",
        "",
        f"Cases: {summary['cases']} (every {sample}th)" if sample > 1 else f"Cases: {summary['cases']}",
        f"Pass rate: {rate:.2%} ({totals['passed']} passed, {totals['failed'] + totals['error']} failed)"
        if rate is not None else "Pass rate: n/a",
        f"Passed with a prediction through coreml-hub: {summary['passed_with_prediction']}",
        f"Excluded (Apple-engine behaviour): {totals['excluded']}; skipped by the tests: {totals['skipped']}; "
        f"xfailed: {totals['xfailed']}; xpassed: {totals['xpassed']}",
        f"Time: {elapsed:.0f} CPU seconds ({LAST_WALL_SECONDS[0]:.0f} s wall)",
        "",
        "| opset | pass rate | passed | failed | excluded | skipped | xfailed | xpassed |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, counts in summary["per_opset"].items():
        ran = counts["passed"] + counts["failed"] + counts["error"]
        share = f"{counts['passed'] / ran:.2%}" if ran else "n/a"
        lines.append(f"| {name} | {share} | {counts['passed']} | {counts['failed'] + counts['error']} | "
                     f"{counts['excluded']} | {counts['skipped']} | {counts['xfailed']} | {counts['xpassed']} |")
    lines += [
        "",
        "| file | passed | failed | excluded | skipped | xfailed | xpassed |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, counts in summary["per_file"].items():
        lines.append(f"| {name} | {counts['passed']} | {counts['failed'] + counts['error']} | {counts['excluded']} | "
                     f"{counts['skipped']} | {counts['xfailed']} | {counts['xpassed']} |")
    if summary["failure_categories"]:
        lines += ["", "## Failures by kind", "", "| count | kind |", "|---|---|"]
        lines += [f"| {count} | `{kind}` |" for kind, count in summary["failure_categories"]]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sample", type=int, default=int(os.environ.get("COREML_HUB_OPTESTS_SAMPLE", "1")),
                        help="run every Nth case by sorted node id (default: all)")
    parser.add_argument("--offset", type=int, default=0, help="with --sample: start from the Kth case")
    parser.add_argument("--files", nargs="*", help="test files or folders relative to the op-test root")
    parser.add_argument("-k", dest="keyword", help="pytest -k expression")
    parser.add_argument("-n", dest="workers", type=int, default=0, help="pytest-xdist workers (default: none)")
    parser.add_argument("--no-exclusions", action="store_true", help="run the excluded cases too")
    parser.add_argument("--fp32", action="store_true", help="also run the fp32 precision cases")
    parser.add_argument("--report", default="optests-report", help="report path prefix (.json and .md)")
    args = parser.parse_args(argv)
    records, code, elapsed = run(
        sample=args.sample, offset=args.offset, files=args.files, keyword=args.keyword, workers=args.workers,
        exclusions=None if args.no_exclusions else EXCLUSIONS, fp32=args.fp32,
    )
    if not records:
        print(f"pytest collected nothing (exit {code})", file=sys.stderr)
        return 2
    summary = summarize(records)
    text = markdown(summary, elapsed, args.sample)
    print(text)
    Path(f"{args.report}.json").write_text(json.dumps(
        dict(summary, cpu_seconds=elapsed, wall_seconds=LAST_WALL_SECONDS[0], sample=args.sample), indent=1))
    Path(f"{args.report}.md").write_text(text)
    print(f"report: {args.report}.json, {args.report}.md", file=sys.stderr)
    return 0 if summary["totals"]["failed"] + summary["totals"]["error"] == 0 else 1


if __name__ == "__main__":
    raise SystemExit(main())
