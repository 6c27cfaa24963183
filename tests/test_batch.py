"""`coreml-hub batch` in this process: jobs files, results.jsonl, resuming, failures; Ray stays unimported."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from coreml_hub.batch import read_jobs, run_batch
from coreml_hub.cli import run_cli
from coreml_hub.errors import UsageError
from coreml_hub.testing import factory


def write_jobs(path: Path, jobs: list[dict]) -> Path:
    path.write_text("".join(json.dumps(j) + "\n" for j in jobs))
    return path


def pixels(path: str | Path) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as img:
        return np.asarray(img.convert("RGB"))


# ---- the jobs file ----------------------------------------------------------------------------


@pytest.mark.parametrize("line, message", [
    ("not json", "line 2 is not JSON"),
    ('["a list"]', "line 2 is not a JSON object"),
    ('{"prompt": "no model"}', 'line 2 has no "model"'),
    ('{"model": "m", "steps": 3}', 'a run job needs a "prompt"'),
    ('{"model": "m", "prompt": "p", "stpes": 3}', "unknown option(s) for a run job: stpes"),
    ('{"model": "m", "prompt": "p", "output_dir": "/tmp"}', "unknown option(s) for a run job: output_dir"),
    ('{"type": "predict", "model": "m"}', 'a predict job needs "inputs"'),
    ('{"type": "train", "model": "m"}', "unknown type 'train'"),
    ('{"id": "../x", "model": "m", "prompt": "p"}', "cannot name a folder"),
    ('{"id": "one", "model": "m", "prompt": "q"}', "id 'one' is also on line 1"),
])
def test_bad_lines_are_named_before_anything_runs(tmp_path: Path, line: str, message: str) -> None:
    jobs = tmp_path / "jobs.jsonl"
    jobs.write_text('{"id": "one", "model": "m", "prompt": "p"}\n' + line + "\n")
    with pytest.raises(UsageError) as info:
        read_jobs(jobs)
    assert message in info.value.message and "jobs.jsonl" in info.value.message


def test_ids_paths_and_options(tmp_path: Path) -> None:
    (tmp_path / "init.png").write_bytes(b"png")
    jobs = write_jobs(tmp_path / "jobs.jsonl", [
        {"model": "org/name", "prompt": "A Red Fox!", "seed": 1, "image": "init.png", "negative-prompt": "blur"},
        {"model": "org/name", "prompt": "A Red Fox!", "seed": 1, "image": "init.png", "negative-prompt": "blur"},
        {"type": "predict", "model": "./m.mlpackage", "inputs": {"x": "[1, 2]", "img": "init.png"}},
    ])
    a, b, c = read_jobs(jobs)
    assert a.id.startswith("a-red-fox-") and b.id == a.id + "-2" and a.digest == b.digest
    assert a.options["image"] == str(tmp_path / "init.png") and a.options["negative_prompt"] == "blur"
    assert c.type == "predict" and c.options["inputs"] == {"x": "[1, 2]", "img": str(tmp_path / "init.png")}


def test_workers_need_ray(tmp_path: Path) -> None:
    jobs = write_jobs(tmp_path / "jobs.jsonl", [{"model": "m", "prompt": "p"}])
    with pytest.raises(UsageError, match="--workers is for Ray"):
        run_batch(jobs, tmp_path / "out", workers=2)


# ---- running ------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.runtime
def test_local_batch_matches_run_resumes_and_records_failures(tmp_path: Path, store_home: Path,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    one = factory.converted("sd1", attention="split_einsum", precision="fp16")
    two = factory.converted("sd1", attention="original", precision="fp32")
    jobs = write_jobs(tmp_path / "jobs.jsonl", [
        {"id": "fox", "model": str(one), "prompt": "a red fox", "seed": 3, "steps": 3, "disable_safety": True},
        {"id": "bird", "model": str(two), "prompt": "a blue bird", "seed": 4, "steps": 3, "scheduler": "euler",
         "disable_safety": True},
        {"id": "pair", "model": str(one), "prompt": "a tree", "seed": 5, "steps": 2, "num_images": 2,
         "negative_prompt": "dark", "disable_safety": True},
        {"id": "bad", "model": str(tmp_path / "no-such-model"), "prompt": "x", "steps": 2},
    ])
    out = tmp_path / "out"
    code = run_cli(["batch", str(jobs), "-o", str(out), "--json"])
    summary = json.loads(capsys.readouterr().out)
    assert code == 1  # one job failed: recorded, the others done
    assert (summary["done"], summary["failed"], summary["images"]) == (3, 1, 4)
    lines = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert [r["id"] for r in lines] == ["fox", "bird", "pair", "bad"]
    by_id = {r["id"]: r for r in lines}
    assert by_id["bad"]["status"] == "failed" and "no-such-model" in by_id["bad"]["error"]["message"]
    assert by_id["pair"]["details"]["seeds"] == [5, 6] and len(by_id["pair"]["paths"]) == 2
    assert by_id["fox"]["seconds"]["load"] > 0 and by_id["pair"]["seconds"]["load"] == 0  # one warm model

    # every image is the one `coreml-hub run` makes with the same settings
    settings = {"fox": [str(one), "a red fox", "--seed", "3", "--steps", "3"],
                "bird": [str(two), "a blue bird", "--seed", "4", "--steps", "3", "--scheduler", "euler"],
                "pair": [str(one), "a tree", "--seed", "5", "--steps", "2", "--num-images", "2",
                         "--negative-prompt", "dark"]}
    for job_id, args in settings.items():
        ref = tmp_path / f"ref-{job_id}"
        assert run_cli(["run", *args, "--disable-safety", "-o", str(ref), "-q"]) == 0
        made = sorted(capsys.readouterr().out.split())
        got = sorted(out / p for p in by_id[job_id]["paths"])
        assert [Path(p).name for p in made] == [p.name for p in got]
        for a, b in zip(made, got):
            assert np.array_equal(pixels(a), pixels(b)), job_id

    # a rerun skips what is done and retries only the failure
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*.png")}
    result = run_batch(jobs, out)
    assert [r.id for r in result.results] == ["bad"] and result.skipped == 3
    assert run_batch(jobs, out, retry_failed=False).results == ()
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*.png")} == before
    assert len((out / "results.jsonl").read_text().splitlines()) == 4
    # an edited job runs again
    lines_text = jobs.read_text().replace('"seed": 3', '"seed": 9')
    jobs.write_text(lines_text)
    again = run_batch(jobs, out, retry_failed=False)
    assert [r.id for r in again.results] == ["fox"] and again.results[0].details["seeds"] == [9]
    assert [p.name for p in (out / "fox").iterdir()] == ["a-red-fox-9.png"]


def test_local_batch_and_help_never_import_ray(tmp_path: Path) -> None:
    jobs = write_jobs(tmp_path / "jobs.jsonl", [{"model": str(tmp_path / "missing"), "prompt": "p"}])
    code = ("import sys; from coreml_hub.cli import run_cli; "
            "codes = [run_cli(['batch', '--help']), run_cli(['--help']), run_cli(sys.argv[1:])]; "
            "print('RAY' if 'ray' in sys.modules else 'NO-RAY', codes)")
    result = subprocess.run([sys.executable, "-c", code, "batch", str(jobs), "-o", str(tmp_path / "out")],
                            capture_output=True, text=True, timeout=300, env={**os.environ})
    assert "NO-RAY [0, 0, 1]" in result.stdout, result.stdout + result.stderr[-2000:]


@pytest.mark.slow
def test_predict_jobs_keep_the_model_warm(tmp_path: Path) -> None:
    pytest.importorskip("coremltools", reason="coremltools converts the test models")
    import torch

    from coreml_hub.testing import feature_models as fm

    rng = np.random.default_rng(5)
    a, b = rng.standard_normal((1, 5, 8)).astype(np.float32), rng.standard_normal((1, 3, 8)).astype(np.float32)
    np.save(tmp_path / "a.npy", a)
    np.save(tmp_path / "b.npy", b)
    features = rng.standard_normal(10).astype(np.float32)
    rows = str(fm.package("range_dim"))
    jobs = write_jobs(tmp_path / "jobs.jsonl", [
        {"id": "rows-a", "type": "predict", "model": rows, "inputs": {"x": "a.npy"}},
        {"id": "rows-b", "type": "predict", "model": rows, "inputs": {"x": "b.npy"}},
        {"id": "label", "model": str(fm.package("classifier")), "inputs": {"features": json.dumps(features.tolist())}},
        {"id": "wrong", "model": rows, "inputs": {"nope": "a.npy"}},
    ])
    result = run_batch(jobs, tmp_path / "out")
    records = {r.id: r for r in result.results}
    assert [records[i].ok for i in ("rows-a", "rows-b", "label", "wrong")] == [True, True, True, False]
    assert records["rows-b"].seconds["load"] == 0  # the same model, still loaded
    with torch.no_grad():
        for job_id, x in (("rows-a", a), ("rows-b", b)):
            want = fm.reference("range_dim")(torch.as_tensor(x)).numpy()
            np.testing.assert_allclose(np.load(tmp_path / "out" / job_id / "y.npy"), want, atol=1e-5)
        probs = fm.reference("classifier")(torch.as_tensor(features[None])).numpy()[0]
    outputs = {o["name"]: o for o in records["label"].details["outputs"]}
    assert outputs["classLabel"]["summary"] == fm.CLASS_LABELS[int(np.argmax(probs))]
    assert records["wrong"].error["type"] == "ModelInputError" and "nope" in records["wrong"].error["message"]
