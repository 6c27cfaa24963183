"""`coreml-hub batch`: run a JSON Lines file of run/predict jobs, here or on a Ray cluster."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import click

from .output import Column, Output, plural, stderr_is_tty

if TYPE_CHECKING:
    from ..batch import BatchResult


@click.command(
    "batch",
    epilog="""\b
Examples:
  coreml-hub batch jobs.jsonl -o out/
  coreml-hub batch jobs.jsonl -o out/ --ray auto --workers 2
  coreml-hub batch jobs.jsonl -o out/ --ray 10.0.0.5:6379 --device cuda
  coreml-hub batch jobs.jsonl -o out/ --dry-run          # what would run

\b
JOBS holds one JSON object per line:
  {"model": "apple/coreml-stable-diffusion-v1-5", "prompt": "a red fox", "seed": 7, "steps": 20}
  {"id": "fox-2", "model": "./converted", "prompt": "a fox", "negative_prompt": "blurry",
   "scheduler": "dpmpp", "num_images": 2, "image": "init.png", "strength": 0.6}
  {"type": "predict", "model": "./Classifier.mlpackage", "inputs": {"image": "cat.jpg"}}
A run job takes the options of `coreml-hub run` (with underscores); a predict job takes
inputs, component, function and state_in. Relative paths are read from JOBS' folder.
Without "id", a job is named from its prompt (or model) and a hash of the line.

\b
Each job's files go to OUT/<id>/, and OUT/results.jsonl gets one line per job: status,
paths (relative to OUT), seconds (load, run, total), worker, attempts, error. Running
the same command again skips the jobs already done (and retries failed ones, unless
--skip-failed). A failed job is recorded and the others go on; the exit status is 1
when any failed.

\b
--ray runs the jobs on Ray actors that keep one model warm each (pip install
'coreml-hub[ray]' on every node): `auto` joins the cluster RAY_ADDRESS or `ray start`
names, else starts one here. HF_ENDPOINT, HF_HUB_OFFLINE and COREML_HUB_HOME are passed
to the workers, so they pull through the same mirror (`coreml-hub serve --upstream`).""",
)
@click.argument("jobs_file", metavar="JOBS", type=click.Path(dir_okay=False, path_type=Path))
@click.option("-o", "--output", "out", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Folder for the jobs' files and results.jsonl.")
@click.option("--ray", "ray_address", default=None, metavar="auto|ADDRESS",
              help="Run on a Ray cluster: auto, or the cluster's address.")
@click.option("--workers", type=click.IntRange(min=1), default=None,
              help="Ray workers (default: one per CPU of the cluster, or per GPU with --device cuda).")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda", "mps"]), default="auto", show_default=True,
              help="Where each worker runs its model (with --ray: cuda gives each worker one GPU).")
@click.option("--backend", type=click.Choice(["auto", "torch", "coreml"]), default="auto", show_default=True)
@click.option("--skip-failed", is_flag=True, help="Do not retry jobs that failed in an earlier run.")
@click.option("--dry-run", is_flag=True, help="List the jobs that would run, and run none.")
@click.option("--json", "json_mode", is_flag=True, help="Print the summary and every job's result as JSON.")
@click.option("-q", "--quiet", is_flag=True, help="Print only the ids of the jobs run.")
def batch_cmd(jobs_file: Path, out: Path, ray_address: str | None, workers: int | None, device: str, backend: str,
              skip_failed: bool, dry_run: bool, json_mode: bool, quiet: bool) -> None:
    """Run the run/predict jobs of JOBS (JSON Lines) and collect their files in OUT."""
    from ..batch import BatchFailed, run_batch

    output = Output(json_mode=json_mode, quiet=quiet)
    result = run_batch(jobs_file, out, ray=ray_address, workers=workers, device=device, backend=backend,
                       retry_failed=not skip_failed, dry_run=dry_run,
                       progress=not quiet and not json_mode and stderr_is_tty())
    if json_mode:
        output.json(result.to_dict())
    elif dry_run:
        rows = [{"id": j.id, "type": j.type, "model": j.model, "line": j.line} for j in result.planned]
        output.table(rows, [Column("id", "job"), Column("type", "type"), Column("model", "model"),
                            Column("line", "line")])
        output.info(f"Would run {plural(len(result.planned), 'job')}; {result.skipped} already done in {out}.")
        return
    else:
        _render(output, result)
    if result.failed:
        ids = [r.id for r in result.results if not r.ok]
        shown = ", ".join(ids[:5]) + (", ..." if len(ids) > 5 else "")
        raise BatchFailed(f"{result.failed} of {plural(len(result.results), 'job')} failed ({shown}).",
                          hint=f"Each error is in {out / 'results.jsonl'}; run the same command again to retry them.")


def _render(output: Output, result: BatchResult) -> None:
    if not result.results:
        failed = f" ({result.failed_before} failed before and --skip-failed skips them)" if result.failed_before else ""
        output.info(f"Nothing to run: {result.skipped - result.failed_before} of {plural(result.jobs, 'job')} are "
                    f"done in {result.out}{failed}.")
        return
    rows = [{"id": r.id, "status": r.status, "seconds": f"{r.seconds.get('total', 0):.1f} s",
             "what": ", ".join(r.paths) if r.ok else (r.error or {}).get("message", "")} for r in result.results]
    output.table(rows, [Column("id", "job"), Column("status", "status"), Column("seconds", "time"),
                        Column("what", "files / error")])
    where = f"{plural(result.workers, 'Ray worker')}" if result.engine == "ray" else "this machine"
    rate = f", {result.images_per_minute:.1f} images/min" if result.images else ""
    skipped = f"; {result.skipped} already done" if result.skipped else ""
    output.info(f"Ran {plural(len(result.results), 'job')} on {where} in {result.seconds:.1f} s: {result.done} done, "
                f"{result.failed} failed{rate}{skipped}. Results: {result.out / 'results.jsonl'}")
