"""Benchmark the warm app against `coreml-hub run`: time to the first image of the same request.

The app keeps the model loaded, so a request after the first pays only for the denoising; each
`coreml-hub run` pays for starting Python, the imports and the model load too. Both make the very
same image (same model, prompt, seed and settings; the script checks the pixels), timed in turn so
both see the same machine load:

  app  POST /v1/images/generations (b64_json) to a running `coreml-hub app` that has already
       answered one request, until the whole answer has arrived
  run  `coreml-hub run MODEL PROMPT ...` as a new process, until it exits

Prints the median of each and the ratio run/app. By default the model is the demo's tiny
random-weight SD model, served from a local `coreml-hub serve` mirror and pulled into a
temporary store (nothing leaves the machine). `--model REF --store DIR` times a model already
pulled into DIR instead (e.g. a real Stable Diffusion model).

    python bench/app_bench.py
    python bench/app_bench.py --repeats 7 --steps 20
    python bench/app_bench.py --model apple/coreml-stable-diffusion-v1-5 --store ~/.cache/coreml-hub --steps 20
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import hashlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Iterator

PROMPT = "a photo of an astronaut riding a horse"


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


@contextlib.contextmanager
def demo_store(root: Path) -> Iterator[tuple[str, Path, str]]:
    """The demo repo on a local mirror, pulled into a store under `root`: (model, store, mirror url)."""
    from coreml_hub.testing.hubserver import HubServer
    from coreml_hub.testing.publish import demo_repos

    hub_dir, store = root / "hub", root / "store"
    hub_dir.mkdir(parents=True)
    repo = demo_repos(hub_dir)[0]
    with HubServer(hub_dir, root / "hub-requests.jsonl") as hub:
        env = {**os.environ, "COREML_HUB_HOME": str(store), "HF_ENDPOINT": hub.url}
        env.pop("HF_HUB_OFFLINE", None)
        subprocess.run([sys.executable, "-m", "coreml_hub", "pull", repo, "-q"], check=True, env=env,
                       stdout=subprocess.DEVNULL)
        yield repo, store, hub.url


def run_once(model: str, store: Path, out: Path, args: argparse.Namespace, seed: int) -> tuple[float, bytes]:
    env = {**os.environ, "COREML_HUB_HOME": str(store)}
    out.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "coreml_hub", "run", model, PROMPT, "--seed", str(seed), "--steps", str(args.steps),
           "--guidance-scale", str(args.guidance_scale), "--scheduler", args.scheduler, "--no-pull", "-q",
           "-o", str(out), "--device", args.device]
    if args.disable_safety:
        cmd.append("--disable-safety")
    started = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True, env=env)
    elapsed = time.perf_counter() - started
    if done.returncode != 0:
        raise SystemExit(f"coreml-hub run failed:\n{done.stderr[-3000:]}")
    return elapsed, Path(done.stdout.strip().splitlines()[-1]).read_bytes()


def app_once(app: Any, model: str, args: argparse.Namespace, seed: int) -> tuple[float, bytes]:
    body = {"model": model, "prompt": PROMPT, "n": 1, "response_format": "b64_json", "seed": seed,
            "steps": args.steps, "guidance_scale": args.guidance_scale, "scheduler": args.scheduler,
            "disable_safety": args.disable_safety, "preview_every": 0, "device": args.device}
    started = time.perf_counter()
    reply = app.call("POST", "/v1/images/generations", json_body=body, timeout=3600)
    elapsed = time.perf_counter() - started
    if reply.status != 200:
        raise SystemExit(f"the app answered {reply.status}: {reply.body[:2000]!r}")
    return elapsed, base64.b64decode(reply.json()["data"][0]["b64_json"])


def pixels_digest(png: bytes) -> str:
    import io

    from PIL import Image

    with Image.open(io.BytesIO(png)) as img:
        return hashlib.sha256(img.convert("RGB").tobytes()).hexdigest()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="a model pulled into --store (default: the demo's tiny model)")
    parser.add_argument("--store", type=Path, default=None, help="the store --model is pulled into")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--guidance-scale", type=float, default=7.5)
    parser.add_argument("--scheduler", default="pndm")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--keep-safety", dest="disable_safety", action="store_false",
                        help="run the model's safety checker too (the tiny model's has random weights)")
    parser.add_argument("--json", action="store_true", help="print the numbers as JSON on stdout")
    args = parser.parse_args()
    if (args.model is None) != (args.store is None):
        parser.error("--model and --store go together")

    from coreml_hub.testing.appserver import AppServer

    with tempfile.TemporaryDirectory(prefix="coreml-hub-app-bench-") as tmp:
        root = Path(tmp)
        with contextlib.ExitStack() as stack:
            if args.model is None:
                log("Serving and pulling the demo model (tiny, random weights)...")
                model, store, hub_url = stack.enter_context(demo_store(root))
            else:
                model, store, hub_url = args.model, args.store.expanduser(), os.environ.get("HF_ENDPOINT", "")
            app = stack.enter_context(AppServer(store=store, outputs=root / "app-outputs", hub_url=hub_url,
                                                log_dir=root / "logs"))
            log(f"App at {app.url}; the first request loads the model...")
            first, _ = app_once(app, model, args, seed=0)
            log(f"first request (with the load): {first:.2f} s")
            app_times, run_times = [], []
            for i in range(args.repeats):
                seed = 100 + i
                # alternate which side goes first, so neither always follows the other
                order = ("app", "run") if i % 2 == 0 else ("run", "app")
                made: dict[str, bytes] = {}
                for side in order:
                    if side == "app":
                        seconds, made["app"] = app_once(app, model, args, seed)
                        app_times.append(seconds)
                    else:
                        seconds, made["run"] = run_once(model, store, root / "run-outputs", args, seed)
                        run_times.append(seconds)
                if pixels_digest(made["app"]) != pixels_digest(made["run"]):
                    raise SystemExit(f"seed {seed}: the app and `coreml-hub run` made different images")
                log(f"  {i + 1}/{args.repeats}: app {app_times[-1]:.2f} s, run {run_times[-1]:.2f} s (same pixels)")
    app_s, run_s = statistics.median(app_times), statistics.median(run_times)
    result = {"model": model, "steps": args.steps, "scheduler": args.scheduler, "repeats": args.repeats,
              "first_app_request_s": round(first, 3), "app_s": round(app_s, 3), "run_s": round(run_s, 3),
              "ratio_run_over_app": round(run_s / app_s, 2)}
    if args.json:
        print(json.dumps(result))
    else:
        print(f"model {model}, {args.steps} steps ({args.scheduler}), median of {args.repeats}, both sides alternating")
        print(f"  warm app, second and later requests: {app_s:7.2f} s to the image")
        print(f"  coreml-hub run (a new process):      {run_s:7.2f} s to the image")
        print(f"  ratio run / app: {run_s / app_s:.2f}x  (the app's first request, with the load: {first:.2f} s)")


if __name__ == "__main__":
    main()
