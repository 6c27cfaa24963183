"""Benchmark the portable ML Program runtime on an SD-1.5-shaped Unet against diffusers.

The Unet has Stable Diffusion 1.5's config with narrower blocks (128, 256, 512, 512 by
default; `--full` for 320, 640, 1280, 1280). Its weights are generated deterministically
from their names (numpy PCG64 streams, scaled like the default initialization), so any
machine regenerates exactly the same weights without carrying them. It is converted to
an fp16 Core ML package with coreml-hub's converter (original attention, batch 2, 32x32
latents), and also laid out as a compiled `.mlmodelc` (model.mil + weight.bin).

  runtime   coreml_hub.mil.load_model(bundle, device): on the CPU the fp16 program runs in
            float32, on CUDA in float16; called through predict_torch (tensors in, tensors out)
  anchor    the diffusers UNet2DConditionModel on the same weights, eager: float32 on the
            CPU, float16 with SDPA attention on CUDA

Timing: both models live in one process, calls alternate A/B after warm-up, medians of
`--runs` calls each, same torch thread count. Peak memory: each side again in its own
subprocess (load, warm-up, a few calls), peak RSS (ru_maxrss), and on CUDA the peak of
allocated device memory. Prints the ratios runtime / anchor.

    python bench/runtime_bench.py                          # CPU, narrow Unet, converts once (cached)
    python bench/runtime_bench.py --full --runs 5          # full width where memory allows
    python bench/runtime_bench.py --prepare-only           # also writes the carry archive (no weights)
    python bench/runtime_bench.py --device cuda --bundle DIR/sd15-w128.mlmodelc   # on a GPU machine

A carry archive (`--prepare-only`) holds the `.mlmodelc` with every weight blob zeroed
(so it compresses to almost nothing) and `weights-map.json` naming the Unet parameter
each blob holds; `--bundle` on such a folder regenerates the blobs before loading and
checks each against the digest recorded when it was made.
"""

from __future__ import annotations

import argparse
import gc
import hashlib
import json
import shutil
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
import zlib
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

NARROW = (128, 256, 512, 512)
FULL = (320, 640, 1280, 1280)
LATENT = 32
BATCH = 2
SEED = 1234


def unet_config(widths: tuple[int, ...]) -> dict[str, Any]:
    """Stable Diffusion 1.5's Unet config with the given block widths."""
    return {
        "sample_size": LATENT,
        "in_channels": 4,
        "out_channels": 4,
        "center_input_sample": False,
        "flip_sin_to_cos": True,
        "freq_shift": 0,
        "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
        "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
        "block_out_channels": list(widths),
        "layers_per_block": 2,
        "downsample_padding": 1,
        "mid_block_scale_factor": 1,
        "act_fn": "silu",
        "norm_num_groups": 32,
        "norm_eps": 1e-5,
        "cross_attention_dim": 768,
        "attention_head_dim": 8,
    }


# -- deterministic weights -----------------------------------------------------------


def weight_for(name: str, shape: tuple[int, ...]) -> np.ndarray:
    """A parameter's values from its name alone (float32), scaled like a default init."""
    rng = np.random.default_rng([SEED, zlib.crc32(name.encode())])
    values = rng.standard_normal(shape, dtype=np.float32)
    if len(shape) == 1:
        if "norm" in name and name.endswith("weight"):
            return 1.0 + 0.05 * values
        return 0.02 * values
    fan_in = int(np.prod(shape[1:]))
    return values * np.float32(1.0 / np.sqrt(fan_in))


def build_unet(widths: tuple[int, ...], device: str = "cpu", dtype: Any = None) -> Any:
    import torch
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        unet = UNet2DConditionModel(**unet_config(widths))
    state = {name: torch.from_numpy(weight_for(name, tuple(t.shape))) for name, t in unet.state_dict().items()}
    unet.load_state_dict(state, assign=True)
    unet = unet.eval()
    if device != "cpu" or (dtype is not None and dtype != torch.float32):
        unet = unet.to(device=device, dtype=dtype)
    return unet


# -- preparing the Core ML bundle ----------------------------------------------------


def bundle_name(widths: tuple[int, ...], attention: str) -> str:
    return f"sd15-w{widths[0]}-{attention}"


def prepare(work: Path, widths: tuple[int, ...], attention: str) -> tuple[Path, Path]:
    """Convert once (cached in `work`): the fp16 package and its compiled-layout bundle."""
    name = bundle_name(widths, attention)
    package = work / f"{name}.mlpackage"
    bundle = work / f"{name}.mlmodelc"
    if package.is_dir() and bundle.is_dir():
        return package, bundle
    work.mkdir(parents=True, exist_ok=True)
    from coreml_hub.convert.components import Geometry, Job, convert_component
    from coreml_hub.testing.compiled import build_mlmodelc

    with tempfile.TemporaryDirectory(dir=work, prefix=".src-") as tmp:
        unet = build_unet(widths)
        unet.save_pretrained(Path(tmp) / "unet", safe_serialization=True)
        del unet
        gc.collect()
        job = Job(
            component="unet",
            folder=Path(tmp),
            variant=None,
            arch="sd",
            attention=attention,
            precision="fp16",
            geometry=Geometry(latent_h=LATENT, latent_w=LATENT, vae_scale=8, batch=BATCH),
            model_version=f"coreml-hub-bench/{name}",
            query_chunk_size=512,
        )
        print(f"converting {name} (fp16) ...", file=sys.stderr, flush=True)
        convert_component(job, package)
    if bundle.exists():
        shutil.rmtree(bundle)
    build_mlmodelc(package, bundle)
    return package, bundle


def _param_digests(widths: tuple[int, ...]) -> dict[str, str]:
    """sha1 of each parameter's float16 bytes (a weight blob of an fp16 conversion) -> parameter name."""
    from diffusers import UNet2DConditionModel
    import torch

    with torch.device("meta"):
        unet = UNet2DConditionModel(**unet_config(widths))
    out: dict[str, str] = {}
    for name, t in unet.state_dict().items():
        data = weight_for(name, tuple(t.shape)).astype(np.float16).tobytes()
        out[hashlib.sha1(data).hexdigest()] = name
    return out


def write_carry(bundle: Path, widths: tuple[int, ...], dest: Path) -> Path:
    """An archive of `bundle` with every parameter blob zeroed, plus the map to regenerate them."""
    from coreml_hub.mil.blob import BlobFile

    digests = _param_digests(widths)
    weights = bundle / "weights" / "weight.bin"
    blobs = BlobFile(weights)
    mapping = []
    for info in blobs:
        raw = bytes(blobs.raw(info.offset))
        digest = hashlib.sha1(raw).hexdigest()
        if info.dtype == "fp16" and digest in digests:
            mapping.append({"offset": info.offset, "param": digests[digest], "sha1": digest})
    blobs.close()
    with tempfile.TemporaryDirectory(prefix=".carry-") as tmp:
        copy = Path(tmp) / bundle.name
        shutil.copytree(bundle, copy)
        with open(copy / "weights" / "weight.bin", "r+b") as fh:
            reader = BlobFile(bundle / "weights" / "weight.bin")
            for entry in mapping:
                info = reader.info(entry["offset"])
                fh.seek(info.data_offset)
                fh.write(b"\0" * info.size)
            reader.close()
        (copy / "weights-map.json").write_text(
            json.dumps({"widths": list(widths), "seed": SEED, "blobs": mapping}, indent=1)
        )
        dest.parent.mkdir(parents=True, exist_ok=True)
        with tarfile.open(dest, "w:gz") as tar:
            tar.add(copy, arcname=bundle.name)
    return dest


def restore_weights(bundle: Path) -> tuple[int, ...] | None:
    """Regenerate the zeroed blobs of a carried bundle (idempotent); returns its widths."""
    map_file = bundle / "weights-map.json"
    if not map_file.is_file():
        return None
    from coreml_hub.mil.blob import BlobFile
    from diffusers import UNet2DConditionModel
    import torch

    spec = json.loads(map_file.read_text())
    widths = tuple(spec["widths"])
    marker = bundle / ".weights-restored"
    if marker.is_file():
        return widths
    with torch.device("meta"):
        shapes = {k: tuple(v.shape) for k, v in UNet2DConditionModel(**unet_config(widths)).state_dict().items()}
    reader = BlobFile(bundle / "weights" / "weight.bin")
    infos = {e["offset"]: reader.info(e["offset"]) for e in spec["blobs"]}
    reader.close()
    with open(bundle / "weights" / "weight.bin", "r+b") as fh:
        for entry in spec["blobs"]:
            data = weight_for(entry["param"], shapes[entry["param"]]).astype(np.float16).tobytes()
            if hashlib.sha1(data).hexdigest() != entry["sha1"]:
                raise SystemExit(f"regenerated weights of {entry['param']} differ from the recorded digest")
            info = infos[entry["offset"]]
            fh.seek(info.data_offset)
            fh.write(data)
    marker.write_text("ok\n")
    return widths


# -- measuring -----------------------------------------------------------------------


def make_inputs(device: str, dtype: Any) -> dict[str, Any]:
    import torch

    g = torch.Generator().manual_seed(0)
    return {
        "sample": torch.randn(BATCH, 4, LATENT, LATENT, generator=g).to(device, dtype),
        "timestep": torch.full((BATCH,), 981.0).to(device, dtype),
        "encoder_hidden_states": torch.randn(BATCH, 768, 1, 77, generator=g).to(device, dtype),
    }


def _sync(device: str) -> None:
    import torch

    if device == "cuda":
        torch.cuda.synchronize()


def load_runtime(bundle: Path, device: str) -> Any:
    from coreml_hub.mil import load_model

    return load_model(bundle, device=device)


def load_anchor(widths: tuple[int, ...], device: str) -> Any:
    import torch

    dtype = torch.float16 if device == "cuda" else torch.float32
    return build_unet(widths, device, dtype)


def call_runtime(model: Any, inputs: dict[str, Any]) -> Any:
    return model.predict_torch(inputs)["noise_pred"]


def call_anchor(unet: Any, inputs: dict[str, Any]) -> Any:
    import torch

    with torch.inference_mode():
        context = inputs["encoder_hidden_states"].squeeze(2).transpose(1, 2)
        return unet(inputs["sample"], inputs["timestep"], context, return_dict=False)[0]


def peak_rss_bytes() -> int:
    from coreml_hub.pipeline.memory import peak_rss_bytes as peak

    return peak() or 0


def measure_one(side: str, bundle: Path, widths: tuple[int, ...], device: str, calls: int) -> dict[str, Any]:
    """Child process: load one side, warm up, run `calls` calls; report peak memory and times."""
    import torch

    t0 = time.perf_counter()
    if side == "runtime":
        model = load_runtime(bundle, device)
        dtype = model.ctx.dtype("fp16")
        fn = call_runtime
    else:
        model = load_anchor(widths, device)
        dtype = next(model.parameters()).dtype
        fn = call_anchor
    _sync(device)
    load_s = time.perf_counter() - t0
    inputs = make_inputs(device, dtype)
    times = []
    for _ in range(calls + 1):
        t = time.perf_counter()
        fn(model, inputs)
        _sync(device)
        times.append(time.perf_counter() - t)
    result = {"side": side, "load_s": load_s, "median_s": statistics.median(times[1:]), "peak_rss": peak_rss_bytes()}
    if device == "cuda":
        result["peak_cuda"] = torch.cuda.max_memory_allocated()
    return result


def ab_timing(bundle: Path, widths: tuple[int, ...], device: str, runs: int, warmup: int) -> dict[str, Any]:
    import torch

    runtime = load_runtime(bundle, device)
    anchor = load_anchor(widths, device)
    rt_inputs = make_inputs(device, runtime.ctx.dtype("fp16"))
    an_inputs = make_inputs(device, next(anchor.parameters()).dtype)
    for _ in range(warmup):
        call_runtime(runtime, rt_inputs)
        call_anchor(anchor, an_inputs)
    _sync(device)
    a_times, b_times, a_cpu, b_cpu = [], [], [], []
    for _ in range(runs):
        t, c = time.perf_counter(), time.process_time()
        out_rt = call_runtime(runtime, rt_inputs)
        _sync(device)
        a_times.append(time.perf_counter() - t)
        a_cpu.append(time.process_time() - c)
        t, c = time.perf_counter(), time.process_time()
        out_an = call_anchor(anchor, an_inputs)
        _sync(device)
        b_times.append(time.perf_counter() - t)
        b_cpu.append(time.process_time() - c)
    ref = out_an.float().cpu()
    diff = float((out_rt.float().cpu() - ref).abs().max() / ref.abs().max())
    return {
        "runtime_s": statistics.median(a_times),
        "anchor_s": statistics.median(b_times),
        "runtime_min_s": min(a_times),
        "anchor_min_s": min(b_times),
        # CPU time of the process (all threads): the work done, less sensitive than wall time
        # to other processes on a shared machine
        "runtime_cpu_s": statistics.median(a_cpu),
        "anchor_cpu_s": statistics.median(b_cpu),
        "runtime_all_s": a_times,
        "anchor_all_s": b_times,
        "output_rel_diff": diff,
        "steps": runtime.stats.steps,
        "fused_attention": runtime.stats.attention_fused,
        "fused_group_norm": runtime.stats.group_norm_fused,
        "threads": torch.get_num_threads(),
    }


def _child(args: argparse.Namespace, side: str, bundle: Path, widths: tuple[int, ...]) -> dict[str, Any]:
    cmd = [sys.executable, __file__, "--measure", side, "--bundle", str(bundle), "--device", args.device,
           "--threads", str(args.threads), "--calls", str(args.calls), "--widths", ",".join(map(str, widths))]
    out = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise SystemExit(f"{side} measurement failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda", "mps"])
    parser.add_argument("--full", action="store_true", help="full SD 1.5 widths (320, 640, 1280, 1280)")
    parser.add_argument("--widths", default=None, help="comma-separated block widths (overrides --full)")
    parser.add_argument("--attention", default="original", choices=["original", "split_einsum"])
    parser.add_argument("--work", default=str(Path(tempfile.gettempdir()) / "coreml-hub-runtime-bench"))
    parser.add_argument("--bundle", default=None, help="a prepared .mlmodelc/.mlpackage (carried bundles are restored)")
    parser.add_argument("--runs", type=int, default=7)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--calls", type=int, default=3, help="calls per memory-measurement subprocess")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory subprocesses")
    parser.add_argument("--prepare-only", action="store_true", help="convert and write the carry archive, then stop")
    parser.add_argument("--carry", default=None, help="where --prepare-only writes the archive")
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    parser.add_argument("--measure", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    args.threads = torch.get_num_threads()
    widths = tuple(int(w) for w in args.widths.split(",")) if args.widths else (FULL if args.full else NARROW)

    if args.measure:
        bundle = Path(args.bundle)
        restore_weights(bundle)
        print(json.dumps(measure_one(args.measure, bundle, widths, args.device, args.calls)))
        return

    if args.bundle:
        bundle = Path(args.bundle)
        widths = restore_weights(bundle) or widths
    else:
        package, bundle = prepare(Path(args.work), widths, args.attention)
        if args.prepare_only:
            carry = Path(args.carry) if args.carry else Path(args.work) / f"{bundle.stem}.carry.tar.gz"
            write_carry(bundle, widths, carry)
            print(f"package {package} ({_size(package) / 1e6:.1f} MB)")
            print(f"bundle  {bundle} ({_size(bundle) / 1e6:.1f} MB)")
            print(f"carry   {carry} ({carry.stat().st_size / 1e6:.2f} MB)")
            return

    result: dict[str, Any] = {"device": args.device, "widths": list(widths), "bundle": str(bundle)}
    if not args.no_memory:
        # before this process loads anything: a child starts from a small parent
        rt = _child(args, "runtime", bundle, widths)
        an = _child(args, "anchor", bundle, widths)
        result["runtime_peak_rss"], result["anchor_peak_rss"] = rt["peak_rss"], an["peak_rss"]
        result["rss_ratio"] = rt["peak_rss"] / an["peak_rss"]
        result["runtime_load_s"], result["anchor_load_s"] = rt["load_s"], an["load_s"]
        if args.device == "cuda":
            result["runtime_peak_cuda"], result["anchor_peak_cuda"] = rt["peak_cuda"], an["peak_cuda"]
            result["cuda_memory_ratio"] = rt["peak_cuda"] / an["peak_cuda"]
    timing = ab_timing(bundle, widths, args.device, args.runs, args.warmup)
    result.update(timing)
    result["time_ratio"] = timing["runtime_s"] / timing["anchor_s"]
    if args.json:
        print(json.dumps(result, indent=1))
        return
    anchor_name = "diffusers fp16 SDPA" if args.device == "cuda" else "diffusers eager fp32"
    print(f"SD-1.5-shaped Unet, widths {list(widths)}, batch {BATCH}, {LATENT}x{LATENT} latents, "
          f"device {args.device}, {args.threads} threads")
    print(f"runtime: {result['steps']} steps/call, {result['fused_attention']} attention + "
          f"{result['fused_group_norm']} group-norm fusions; output vs anchor (rel. max) {result['output_rel_diff']:.2e}")
    print(f"time per call   runtime {timing['runtime_s'] * 1e3:8.1f} ms   {anchor_name} {timing['anchor_s'] * 1e3:8.1f} ms   "
          f"ratio {result['time_ratio']:.3f}  (medians of {args.runs})")
    print(f"  fastest call  runtime {timing['runtime_min_s'] * 1e3:8.1f} ms   {anchor_name} {timing['anchor_min_s'] * 1e3:8.1f} ms   "
          f"ratio {timing['runtime_min_s'] / timing['anchor_min_s']:.3f}")
    if args.device == "cpu":
        print(f"  CPU time      runtime {timing['runtime_cpu_s'] * 1e3:8.1f} ms   {anchor_name} {timing['anchor_cpu_s'] * 1e3:8.1f} ms   "
              f"ratio {timing['runtime_cpu_s'] / timing['anchor_cpu_s']:.3f}  (process CPU time, medians)")
    wall = sorted(timing["runtime_all_s"] + timing["anchor_all_s"])
    if wall[-1] > 2 * wall[0]:
        print("  note: call times vary more than 2x: the machine is busy; compare the CPU-time ratio")
    if "rss_ratio" in result:
        print(f"peak RSS        runtime {result['runtime_peak_rss'] / 2**20:8.0f} MiB  anchor {result['anchor_peak_rss'] / 2**20:8.0f} MiB  "
              f"ratio {result['rss_ratio']:.3f}")
        print(f"load time       runtime {result['runtime_load_s']:8.1f} s    anchor {result['anchor_load_s']:8.1f} s")
    if "cuda_memory_ratio" in result:
        print(f"peak CUDA mem   runtime {result['runtime_peak_cuda'] / 2**20:8.0f} MiB  anchor {result['anchor_peak_cuda'] / 2**20:8.0f} MiB  "
              f"ratio {result['cuda_memory_ratio']:.3f}")


def _size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


if __name__ == "__main__":
    main()
