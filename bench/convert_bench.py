"""Benchmark `coreml-hub convert` on a Stable Diffusion 1.5-architecture Unet: time and peak memory.

The Unet has SD 1.5's published config (860M parameters) with random weights built
from it; nothing is downloaded. It is saved once as a diffusers folder, then converted
to a Core ML package (fp16, 512x512, batch 2) by

  coreml-hub   `coreml_hub.convert.convert(folder, out, components=["unet"])`: the
               Unet alone is loaded, traced, converted, saved; the eager model and the
               traced graph are dropped as soon as they are no longer needed
  anchor       the plain coremltools route on the same weights and the same wrapper
               and attention: load, trace, `ct.convert`, save, with the eager model and
               the traced graph kept alive until the end (what a straightforward
               conversion script does)

each in a fresh subprocess, measuring wall time and peak resident memory (the
larger of `ru_maxrss` and /proc/self/status VmRSS sampled every 0.1 s). Prints the
medians of --repeats runs and the ratios coreml-hub / anchor.

--scale shrinks every channel count (multiples of 32 are kept for GroupNorm). The
default `auto` takes full width when the estimated peak fits in the memory available
now, else the widest that does.

    python bench/convert_bench.py                       # auto width, both sides, 1 run each
    python bench/convert_bench.py --scale 0.25 --repeats 3
    python bench/convert_bench.py --only coreml-hub --attention original
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

SD15_UNET: dict[str, Any] = {
    "sample_size": 64,
    "in_channels": 4,
    "out_channels": 4,
    "layers_per_block": 2,
    "block_out_channels": [320, 640, 1280, 1280],
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
    "cross_attention_dim": 768,
    "attention_head_dim": 8,
    "norm_num_groups": 32,
}
# Peak resident memory of a conversion beyond BASE_RSS, as a multiple of the fp32 weight
# bytes: 1.81 measured at full width (7.43 GB for 3.44 GB of weights), rounded up. Used
# only to pick --scale auto.
PEAK_PER_WEIGHT_BYTE = 2.2
BASE_RSS = 1.2e9  # torch + coremltools + diffusers imported


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def unet_config(scale: float) -> dict[str, Any]:
    cfg = json.loads(json.dumps(SD15_UNET))
    cfg["block_out_channels"] = [max(32, int(round(c * scale / 32)) * 32) for c in cfg["block_out_channels"]]
    cross = max(64, int(round(cfg["cross_attention_dim"] * scale / 64)) * 64)
    cfg["cross_attention_dim"] = cross
    return cfg


def param_count(cfg: dict[str, Any]) -> int:
    import torch
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        model = UNet2DConditionModel(**cfg)
    return sum(p.numel() for p in model.parameters())


def mem_available() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    return 0


def pick_scale(requested: str) -> tuple[float, int]:
    if requested != "auto":
        scale = float(requested)
        return scale, param_count(unet_config(scale))
    budget = mem_available() * 0.85
    for scale in (1.0, 0.875, 0.75, 0.625, 0.5, 0.375, 0.25):
        params = param_count(unet_config(scale))
        need = BASE_RSS + params * 4 * PEAK_PER_WEIGHT_BYTE
        if need <= budget:
            return scale, params
        log(f"scale {scale}: {params / 1e6:.0f}M parameters need ~{need / 1e9:.1f} GB, {budget / 1e9:.1f} GB available")
    scale = 0.25
    return scale, param_count(unet_config(scale))


# --- child processes ----------------------------------------------------------------------


class PeakRSS:
    """Peak resident set size of this process: sampled VmRSS and ru_maxrss, whichever is larger."""

    def __init__(self, interval: float = 0.1) -> None:
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(interval,), daemon=True)
        self._thread.start()

    @staticmethod
    def current() -> int:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        return 0

    def _run(self, interval: float) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.current())
            self._stop.wait(interval)

    def stop(self) -> int:
        self._stop.set()
        self._thread.join()
        maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
        return max(self.peak, maxrss)


def child_prepare(folder: Path, scale: float) -> dict[str, Any]:
    import torch
    from diffusers import UNet2DConditionModel

    from coreml_hub.testing.tiny import SD1_SCHEDULER

    torch.manual_seed(0)
    cfg = unet_config(scale)
    unet = UNet2DConditionModel(**cfg).eval()
    unet.save_pretrained(folder / "unet", safe_serialization=True)
    (folder / "scheduler").mkdir(parents=True, exist_ok=True)
    (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps(SD1_SCHEDULER))
    index = {
        "_class_name": "StableDiffusionPipeline",
        "_diffusers_version": "0.30.0",
        "unet": ["diffusers", "UNet2DConditionModel"],
        "scheduler": ["diffusers", "PNDMScheduler"],
    }
    (folder / "model_index.json").write_text(json.dumps(index))
    return {"params": sum(p.numel() for p in unet.parameters()), "config": cfg}


def child_coreml_hub(folder: Path, out: Path, attention: str) -> dict[str, Any]:
    meter = PeakRSS()
    t0 = time.perf_counter()
    from coreml_hub.convert import convert

    result = convert(folder, out, components=["unet"], attention=attention, precision="fp16", progress=False)
    seconds = time.perf_counter() - t0
    return {"seconds": seconds, "peak_rss": meter.stop(), "package_bytes": result.components[0].size_bytes}


def child_anchor(folder: Path, out: Path, attention: str) -> dict[str, Any]:
    meter = PeakRSS()
    t0 = time.perf_counter()
    import numpy as np
    import torch
    from diffusers import UNet2DConditionModel

    from coreml_hub.convert import attention as attn
    from coreml_hub.convert.components import import_coremltools
    from coreml_hub.convert.wrappers import Unet

    ct = import_coremltools()
    unet = UNet2DConditionModel.from_pretrained(str(folder), subfolder="unet", torch_dtype=torch.float32).eval()
    attn.install(unet, attention)
    cfg = unet.config
    h = w = cfg.sample_size
    example = (
        torch.rand(2, cfg.in_channels, h, w),
        torch.full((2,), 981.0),
        torch.rand(2, cfg.cross_attention_dim, 1, 77),
    )
    module = Unet(unet).eval()
    with torch.no_grad():
        traced = torch.jit.trace(module, example, check_trace=False)
    names = ("sample", "timestep", "encoder_hidden_states")
    mlmodel = ct.convert(
        traced,
        convert_to="mlprogram",
        minimum_deployment_target=ct.target.iOS16,
        inputs=[ct.TensorType(name=n, shape=tuple(x.shape), dtype=np.float16) for n, x in zip(names, example)],
        outputs=[ct.TensorType(name="noise_pred", dtype=np.float32)],
        compute_precision=ct.precision.FLOAT16,
        skip_model_load=True,
    )
    mlmodel.save(str(out / "anchor_unet.mlpackage"))
    seconds = time.perf_counter() - t0
    peak = meter.stop()
    del mlmodel, traced, module, unet  # only now, as the plain route does
    return {"seconds": seconds, "peak_rss": peak}


def run_child(mode: str, *args: str, timeout: float) -> dict[str, Any]:
    cmd = [sys.executable, __file__, "--child", mode, *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        tail = "\n".join((proc.stderr or "").splitlines()[-15:])
        raise RuntimeError(f"{mode} failed (exit {proc.returncode}):\n{tail}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scale", default="auto", help="channel scale of SD 1.5's Unet (1.0 = full), or auto")
    parser.add_argument("--attention", default="split_einsum", choices=("original", "split_einsum", "split_einsum_v2"))
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--only", choices=("coreml-hub", "anchor"), default=None)
    parser.add_argument("--workdir", default=None, help="keep the model and outputs here (default: a temp dir)")
    parser.add_argument("--timeout", type=float, default=3 * 3600, help="seconds per conversion")
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    parser.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.child:
        mode, *rest = args.child
        if mode == "prepare":
            res = child_prepare(Path(rest[0]), float(rest[1]))
        elif mode == "coreml-hub":
            res = child_coreml_hub(Path(rest[0]), Path(rest[1]), rest[2])
        else:
            res = child_anchor(Path(rest[0]), Path(rest[1]), rest[2])
        print(json.dumps(res))
        return

    scale, params = pick_scale(args.scale)
    work = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="coreml-hub-convert-bench-"))
    folder = work / "sd15-unet"
    log(f"Unet: SD 1.5 architecture at scale {scale} ({params / 1e6:.0f}M parameters, "
        f"{params * 4 / 1e9:.2f} GB fp32); {mem_available() / 1e9:.1f} GB available; {os.cpu_count()} CPUs")
    if not (folder / "unet" / "config.json").exists():
        t0 = time.perf_counter()
        info = run_child("prepare", str(folder), str(scale), timeout=args.timeout)
        log(f"built and saved the random-weight Unet in {time.perf_counter() - t0:.0f} s")
        params = info["params"]

    sides = [s for s in ("coreml-hub", "anchor") if args.only in (None, s)]
    results: dict[str, list[dict[str, Any]]] = {s: [] for s in sides}
    for r in range(args.repeats):
        for side in sides:
            out = work / f"out-{side}-{r}"
            shutil.rmtree(out, ignore_errors=True)
            out.mkdir(parents=True)
            log(f"[{r + 1}/{args.repeats}] {side}: converting...")
            res = run_child(side, str(folder), str(out), args.attention, timeout=args.timeout)
            log(f"[{r + 1}/{args.repeats}] {side}: {res['seconds']:.1f} s, peak RSS {res['peak_rss'] / 1e9:.2f} GB")
            results[side].append(res)
            shutil.rmtree(out, ignore_errors=True)

    summary: dict[str, Any] = {
        "scale": scale,
        "params": params,
        "attention": args.attention,
        "repeats": args.repeats,
        "cpus": os.cpu_count(),
    }
    for side, runs in results.items():
        summary[side] = {
            "seconds_median": statistics.median(r["seconds"] for r in runs),
            "peak_rss_gb_median": statistics.median(r["peak_rss"] for r in runs) / 1e9,
        }
    if len(results) == 2:
        ours, anchor = summary["coreml-hub"], summary["anchor"]
        summary["ratio_seconds"] = ours["seconds_median"] / anchor["seconds_median"]
        summary["ratio_peak_rss"] = ours["peak_rss_gb_median"] / anchor["peak_rss_gb_median"]
    if args.json:
        print(json.dumps(summary, indent=2))
        return
    print(f"SD 1.5-architecture Unet, scale {scale} ({params / 1e6:.0f}M params), {args.attention}, fp16, "
          f"512x512 batch 2, {args.repeats} run(s), medians")
    for side in results:
        s = summary[side]
        print(f"  {side:<11} {s['seconds_median']:8.1f} s   peak RSS {s['peak_rss_gb_median']:6.2f} GB")
    if len(results) == 2:
        print(f"  ratio coreml-hub/anchor: time {summary['ratio_seconds']:.2f}x, "
              f"peak memory {summary['ratio_peak_rss']:.2f}x")
    peak = summary[sides[0]]["peak_rss_gb_median"] * 1e9
    print(f"  peak per fp32 weight byte ({sides[0]}): {(peak - BASE_RSS) / (params * 4):.2f}")
    if not args.workdir:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
