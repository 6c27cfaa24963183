"""Scale-out: `batch` locally vs on Ray, and a large file through the pull-through mirror.

1. batch: images per minute for a JOBS file of 16 text-to-image jobs on the tiny SD1 model
   (coreml_hub.testing), run in this process (`batch`) and on a local Ray cluster of 2 CPUs with
   2 workers (`batch --ray auto --workers 2`). Each run starts cold (Ray: the actors load the
   model), alternating, median of --rounds. Anchor: the local run (also shown with one torch
   thread, the thread count each one-CPU Ray worker runs with).
2. mirror: one file (default 1 GiB) fetched with `hf_hub_download` straight from an upstream
   `coreml-hub serve` (the anchor), through a pull-through `serve --upstream` with an empty
   ROOT (cold: the mirror fetches it while streaming it), and through the same mirror again
   (warm: from ROOT). Alternating, median of --rounds.

    python bench/scaleout_bench.py                       # both parts
    python bench/scaleout_bench.py --part mirror --size-mib 256
    python bench/scaleout_bench.py --part batch --jobs 16 --steps 10
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path


def bench_batch(scratch: Path, jobs: int, steps: int, rounds: int) -> None:
    import ray

    from coreml_hub.batch import run_batch
    from coreml_hub.testing import factory

    model = factory.converted("sd1", attention="original", precision="fp32")
    jobs_file = scratch / "jobs.jsonl"
    jobs_file.write_text("".join(json.dumps({"model": str(model), "prompt": f"a photo of thing {i}", "seed": i,
                                             "steps": steps, "disable_safety": True}) + "\n" for i in range(jobs)))
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    import torch

    threads = torch.get_num_threads()
    rates: dict[str, list[float]] = {"local": [], "local-1t": [], "ray": []}
    try:
        for r in range(rounds):
            for engine in rates:
                out = scratch / f"out-{engine}-{r}"
                # local-1t: one torch thread, as each Ray worker on one CPU has (a busy machine punishes threads
                # that wait on each other)
                torch.set_num_threads(1 if engine == "local-1t" else threads)
                result = run_batch(jobs_file, out, ray="auto" if engine == "ray" else None,
                                   workers=2 if engine == "ray" else None)
                torch.set_num_threads(threads)
                assert result.failed == 0 and result.images == jobs, result.to_dict()
                rates[engine].append(result.images_per_minute)
                print(f"  round {r + 1} {engine:5}: {result.images} images in {result.seconds:.1f} s "
                      f"= {result.images_per_minute:.1f} images/min", flush=True)
                shutil.rmtree(out)
    finally:
        ray.shutdown()
    local, single, on_ray = (statistics.median(rates[k]) for k in ("local", "local-1t", "ray"))
    print(f"batch: local {local:.1f} images/min ({threads} threads), local {single:.1f} images/min (1 thread), "
          f"Ray 2 workers {on_ray:.1f} images/min; ratio Ray/local {on_ray / local:.2f}, Ray/local-1-thread "
          f"{on_ray / single:.2f} (median of {rounds}, {jobs} jobs, {steps} steps, {os.cpu_count()} CPUs)")


def bench_mirror(scratch: Path, size: int, rounds: int) -> None:
    from huggingface_hub import hf_hub_download

    from coreml_hub.testing.hubrepo import make_repo
    from coreml_hub.testing.hubserver import HubServer

    repo, name = "bench/large-file", "weights/model.bin"
    up_root = scratch / "upstream"
    make_repo(up_root, repo, {name: size})
    upstream = HubServer(up_root, scratch / "upstream.jsonl").start()
    hf_hub_download(repo, name, endpoint=upstream.url, cache_dir=scratch / "warmup")  # hashes the file once
    shutil.rmtree(scratch / "warmup")
    times: dict[str, list[float]] = {"direct": [], "cold": [], "warm": []}
    try:
        for r in range(rounds):
            mirror_root = scratch / f"mirror-{r}"
            mirror = HubServer(mirror_root, scratch / f"mirror-{r}.jsonl",
                               extra_args=("--upstream", upstream.url)).start()
            try:
                for kind, url in (("direct", upstream.url), ("cold", mirror.url), ("warm", mirror.url)):
                    cache = scratch / f"client-{kind}-{r}"
                    start = time.perf_counter()
                    path = hf_hub_download(repo, name, endpoint=url, cache_dir=cache)
                    elapsed = time.perf_counter() - start
                    assert Path(path).stat().st_size == size
                    times[kind].append(elapsed)
                    print(f"  round {r + 1} {kind:6}: {size / elapsed / 1e6:.0f} MB/s ({elapsed:.2f} s)", flush=True)
                    shutil.rmtree(cache)
            finally:
                mirror.stop()
                shutil.rmtree(mirror_root)
    finally:
        upstream.stop()
    direct = statistics.median(times["direct"])
    line = [f"mirror ({size / 2**20:.0f} MiB, hf_hub_download, median of {rounds}): direct {size / direct / 1e6:.0f} MB/s"]
    for kind in ("cold", "warm"):
        t = statistics.median(times[kind])
        line.append(f"{kind} {size / t / 1e6:.0f} MB/s (ratio {direct / t:.2f})")
    print(", ".join(line))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--part", choices=("both", "batch", "mirror"), default="both")
    parser.add_argument("--jobs", type=int, default=16)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--size-mib", type=int, default=1024)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--dir", type=Path, default=None, help="Scratch folder (the mirror part needs 3x the size).")
    args = parser.parse_args()
    scratch = Path(tempfile.mkdtemp(prefix="scaleout-bench-", dir=args.dir))
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ["COREML_HUB_HOME"] = str(scratch / "store")
    try:
        if args.part in ("both", "mirror"):
            bench_mirror(scratch, args.size_mib << 20, args.rounds)
        if args.part in ("both", "batch"):
            bench_batch(scratch, args.jobs, args.steps, args.rounds)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    print(f"(machine: {os.cpu_count()} CPUs, shared; load average {os.getloadavg()[0]:.1f})", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
