"""`coreml-hub batch --ray` on a local Ray cluster this module starts (2 CPUs; Ray from PyPI, nothing downloaded).

One cluster for the module, one run that covers the contract: two models (a local folder, and a
repo the workers pull through HF_ENDPOINT), one actor killed mid-run, one job with a bad model;
then reruns.
"""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pytest

from coreml_hub.batch import JobResult, run_batch
from coreml_hub.cli import run_cli
from coreml_hub.testing import factory
from coreml_hub.testing.publish import publish

ray = pytest.importorskip("ray", reason="Ray is part of the test extra: pip install -e '.[test]'")

pytestmark = [pytest.mark.slow, pytest.mark.runtime, pytest.mark.extended]  # extended tier: starts a Ray cluster (about a minute)

REPO = "demo/coreml-tiny-sd"


@pytest.fixture(scope="module")
def cluster() -> Iterator[Any]:
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    try:
        yield ray
    finally:
        ray.shutdown()


def pixels(path: str | Path) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as img:
        return np.asarray(img.convert("RGB"))


def test_ray_batch_survives_a_dead_worker_and_matches_run(cluster: Any, hub_server: Any, store_home: Path,
                                                         tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    publish(hub_server.root, REPO, attentions=("original",), formats=("compiled",), chunks=False)
    local = factory.converted("sd1", attention="split_einsum", precision="fp16")
    jobs = [
        {"id": "fox", "model": str(local), "prompt": "a red fox", "seed": 1, "steps": 2},
        {"id": "bird", "model": REPO, "prompt": "a blue bird", "seed": 2, "steps": 2},
        {"id": "tree", "model": str(local), "prompt": "a tree", "seed": 3, "steps": 2, "scheduler": "euler"},
        {"id": "lamp", "model": REPO, "prompt": "a lamp", "seed": 4, "steps": 2, "negative_prompt": "dark"},
        {"id": "sea", "model": str(local), "prompt": "the sea", "seed": 5, "steps": 2},
        {"id": "bad", "model": "nobody/missing-model", "prompt": "x", "steps": 2},
    ]
    for job in jobs:
        job["disable_safety"] = True
    jobs_file = tmp_path / "jobs.jsonl"
    jobs_file.write_text("".join(json.dumps(j) + "\n" for j in jobs))
    out = tmp_path / "out"
    killed: list[int] = []

    def kill_one(record: JobResult) -> None:  # the actor that made the first result has its next job by now
        if record.ok and not killed:
            pid = int(record.worker.rsplit(":", 1)[1])
            os.kill(pid, signal.SIGKILL)
            killed.append(pid)

    result = run_batch(jobs_file, out, ray="auto", workers=2, on_result=kill_one)
    assert killed and result.engine == "ray" and result.workers == 2
    records = {r.id: r for r in result.results}
    assert set(records) == {j["id"] for j in jobs}
    assert all(records[j].ok for j in ("fox", "bird", "tree", "lamp", "sea")), records
    assert records["bad"].status == "failed" and records["bad"].error["type"] == "RepoNotFound"
    assert any(r.attempts == 2 for r in result.results), [(r.id, r.attempts) for r in result.results]
    assert len({r.worker for r in result.results if r.ok}) >= 2  # more than one actor did the work
    assert not any(str(killed[0]) == r.worker.rsplit(":", 1)[1] for r in result.results if r.attempts == 2)

    # the same images `coreml-hub run` makes (the repo was pulled by the workers, into the same store), with
    # the thread count of a worker that Ray gives one CPU (the float sums of 1 and 2 threads differ in the last bit)
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        compare_with_run(jobs[:5], records, out, tmp_path, capsys)
    finally:
        torch.set_num_threads(threads)

    # a rerun does nothing (failures retried only when asked)
    again = run_batch(jobs_file, out, ray="auto", workers=2, retry_failed=False)
    assert again.results == () and again.skipped == len(jobs)
    lines = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert [r["id"] for r in lines] == [j["id"] for j in jobs]


def compare_with_run(jobs: list[dict[str, Any]], records: dict[str, JobResult], out: Path, tmp_path: Path,
                     capsys: pytest.CaptureFixture[str]) -> None:
    for job in jobs:
        args = [job["model"], job["prompt"], "--seed", str(job["seed"]), "--steps", str(job["steps"]),
                "--disable-safety", "-o", str(tmp_path / "ref" / job["id"]), "-q", "--no-pull"]
        for option in ("scheduler", "negative_prompt"):
            if option in job:
                args += [f"--{option.replace('_', '-')}", job[option]]
        assert run_cli(["run", *args]) == 0
        made = [line for line in capsys.readouterr().out.splitlines() if line.endswith(".png")]  # (Ray's notices too)
        assert len(made) == 1 and len(records[job["id"]].paths) == 1
        assert np.array_equal(pixels(made[0]), pixels(out / records[job["id"]].paths[0])), job["id"]
