"""Benchmark the whole `coreml-hub run` command (start-up and imports included) against `import torch`.

A run on the torch backend cannot start faster than `python -c "import torch"`: that is the
anchor. Each round times one of each, in turn (so both sides see the same machine load), as
fresh processes; the medians and their ratio are printed, then where one run's import time
goes (`python -X importtime`, cumulative seconds of the top-level packages).

    python bench/run_startup_bench.py                        # the tiny SD1 model, 7 rounds
    python bench/run_startup_bench.py --rounds 11 --model ./converted
    python bench/run_startup_bench.py --pythonpath /other/checkout   # another checkout's coreml_hub, same anchor

--pythonpath puts another checkout first on the path of both sides, to compare two versions
of coreml-hub on one machine (run it once per checkout, alternating, and compare the ratios).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PACKAGES = ("torch", "diffusers", "transformers", "coremltools", "numpy", "PIL", "huggingface_hub", "click",
            "tqdm", "safetensors", "coreml_hub")


def timed(cmd: list[str], env: dict[str, str]) -> float:
    start = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd[:4])}... failed:\n{proc.stderr[-2000:]}")
    return seconds


def import_breakdown(cmd: list[str], env: dict[str, str]) -> dict[str, float]:
    """Cumulative import seconds of each top-level package in one run (nested ones count in both)."""
    proc = subprocess.run([cmd[0], "-X", "importtime", *cmd[1:]], env=env, capture_output=True, text=True)
    found: dict[str, float] = {}
    for line in proc.stderr.splitlines():
        if not line.startswith("import time:"):
            continue
        _, cumulative, name = line.split("|")
        if name.strip() in PACKAGES:  # a package's first import, at whatever depth, includes all it pulls in
            found[name.strip()] = int(cumulative) / 1e6
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="a variant folder (default: the test suite's tiny SD1 model)")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--pythonpath", help="a checkout whose coreml_hub to run instead of the installed one")
    args = parser.parse_args()
    env = dict(os.environ)
    if args.pythonpath:
        env["PYTHONPATH"] = os.pathsep.join([args.pythonpath, env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    model = args.model
    if model is None:
        from coreml_hub.testing import factory

        model = str(factory.converted("sd1", "split_einsum"))
    out = tempfile.mkdtemp(prefix="coreml-hub-startup-bench-")
    run = [sys.executable, "-m", "coreml_hub", "run", model, "a photo of an astronaut riding a horse",
           "--steps", str(args.steps), "--seed", "1", "--disable-safety", "--backend", "torch", "--device", "cpu",
           "-q", "-o", out]
    anchor = [sys.executable, "-c", "import torch"]
    timed(run, env)  # once untimed: file caches warm for both sides
    runs, anchors = [], []
    for i in range(args.rounds):
        for name, cmd, into in (("run", run, runs), ("import torch", anchor, anchors)):
            into.append(timed(cmd, env))
            print(f"round {i + 1}: {name:<12} {into[-1]:.2f} s", file=sys.stderr, flush=True)
    run_median, anchor_median = statistics.median(runs), statistics.median(anchors)
    print(f"coreml-hub run ({args.steps} steps, whole command): median {run_median:.2f} s "
          f"(min {min(runs):.2f}, max {max(runs):.2f}) over {args.rounds} rounds")
    print(f"python -c 'import torch' (anchor):            median {anchor_median:.2f} s "
          f"(min {min(anchors):.2f}, max {max(anchors):.2f})")
    print(f"ratio run / import torch: {run_median / anchor_median:.2f}")
    print("import time of one run, cumulative seconds by top-level package:")
    for name, seconds in sorted(import_breakdown(run, env).items(), key=lambda kv: -kv[1]):
        print(f"  {name:<16} {seconds:6.2f}")
    print(f"model: {Path(model)}; cpu count {os.cpu_count()}; load average {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
