"""Benchmark `coreml-hub run` with one ControlNet against diffusers' StableDiffusionControlNetPipeline on
the same weights and machine.

Two models, random weights (nothing is downloaded):
  tiny  the test suite's tiny SD1-style pipeline and tiny ControlNet (64x64 images)
  sd15  Stable Diffusion 1.5's architecture (860M-parameter Unet, CLIP ViT-L, the SD VAE) and a
        ControlNet of its shape (ControlNetModel.from_unet), at 256x256, converted to Core ML packages
        (fp16, original attention) by `convert --controlnet` and run by the portable runtime

For each: seconds per image (text encode + N steps of ControlNet + Unet + VAE decode) and steps per
second (one ControlNet call + one Unet call, batch 2), medians of --repeats runs, the two sides timed
in turn (a b a b ...) so both see the same machine load, then the ratio (goal: <= 1.0).

    python bench/controlnet_bench.py                       # both models, CPU
    python bench/controlnet_bench.py --model tiny --steps 10 --repeats 5
    python bench/controlnet_bench.py --device cuda         # torch backend fp16 vs diffusers fp16
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from run_bench import PROMPT, SD15_UNET, _cached, alternate, build_sd15, log  # the plain run benchmark's parts


def build_sd15_controlnet(folder: Path) -> None:
    """A ControlNet of SD 1.5's shape with seeded random weights (output convolutions included)."""
    import diffusers
    import torch

    torch.manual_seed(3)
    unet = diffusers.UNet2DConditionModel(**SD15_UNET)
    controlnet = diffusers.ControlNetModel.from_unet(unet, load_weights_from_unet=False)
    with torch.no_grad():
        for module in [*controlnet.controlnet_down_blocks, controlnet.controlnet_mid_block]:
            for param in module.parameters():
                param.copy_(0.02 * torch.randn_like(param))
    controlnet.save_pretrained(folder / "sd15-controlnet", safe_serialization=True)


def prepare(model: str, cache: Path) -> tuple[Path, Path, Path]:
    """(diffusers pipeline folder, ControlNet folder, Core ML variant folder with the ControlNet)."""
    from coreml_hub.convert import convert
    from coreml_hub.testing import factory

    cache.mkdir(parents=True, exist_ok=True)
    if model == "tiny":
        out = factory.converted("sd1", attention="original", precision="fp16", controlnets=("sd1",))
        return factory.pipeline_folder("sd1"), factory.controlnet_folder("sd1"), out
    source = _cached(cache, "sd15-diffusers", build_sd15)
    net = _cached(cache, "sd15-controlnet", build_sd15_controlnet) / "sd15-controlnet"

    def conv(tmp: Path) -> None:
        t0 = time.perf_counter()
        convert(source, tmp, attention="original", precision="fp16", latent_size=(32, 32),
                components=("text_encoder", "unet", "vae_decoder", "controlnet"), controlnets=[net],
                model_version="bench/sd15-random", progress=True)
        log(f"converted sd15 with its ControlNet in {time.perf_counter() - t0:.0f} s")

    return source, net, _cached(cache, "sd15-coreml-256-controlnet", conv)


def bench_model(model: str, args: argparse.Namespace) -> dict[str, Any]:
    import diffusers
    import numpy as np
    import torch
    from PIL import Image

    from coreml_hub.pipeline.controlnet import control_tensor, find_controlnets
    from coreml_hub.pipeline.generate import load_pipeline
    from coreml_hub.pipeline.resolve import resolve_local

    device = args.device
    sync = (lambda: torch.cuda.synchronize()) if device.startswith("cuda") else (lambda: None)
    source, net_folder, converted = prepare(model, Path(args.cache))
    variant = resolve_local(converted)
    (cn_path,) = find_controlnets(variant.path).values()

    t0 = time.perf_counter()
    loaded = load_pipeline(variant, backend="torch", device=device, safety=False, controlnets=(cn_path,))
    ours, component = loaded.pipeline, loaded.controlnets[0]
    ours_load = time.perf_counter() - t0
    g = ours.geometry
    picture = Image.fromarray(np.random.default_rng(0).integers(0, 256, (g.image_height, g.image_width, 3),
                                                                 dtype=np.uint8))
    control = [(component, control_tensor(picture, g.image_width, g.image_height), 1.0)]
    cond = ours.condition(PROMPT, "")
    latents = torch.randn(1, g.latent_channels, g.latent_height, g.latent_width)

    dtype = torch.float32 if device == "cpu" else torch.float16
    t0 = time.perf_counter()
    controlnet = diffusers.ControlNetModel.from_pretrained(str(net_folder), torch_dtype=dtype)
    pipe = diffusers.StableDiffusionControlNetPipeline.from_pretrained(str(source), controlnet=controlnet,
                                                                       torch_dtype=dtype, safety_checker=None)
    pipe = pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    ref_load = time.perf_counter() - t0
    sample = torch.randn(2, 4, g.latent_height, g.latent_width, device=device, dtype=dtype)
    hidden = torch.randn(2, g.text_length, g.hidden_size, device=device, dtype=dtype)
    image = torch.rand(2, 3, g.image_height, g.image_width, device=device, dtype=dtype)
    t = torch.tensor([500, 500], device=device)

    def ours_image() -> None:
        ours.generate(prompt=PROMPT, steps=args.steps, guidance_scale=7.5, seed=0, scheduler="pndm", control=control)

    def ref_image() -> None:
        pipe(PROMPT, image=picture, num_inference_steps=args.steps, guidance_scale=7.5, height=g.image_height,
             width=g.image_width, generator=torch.Generator().manual_seed(0), output_type="np")

    def ref_step() -> None:
        down, mid = pipe.controlnet(sample, t, hidden, image, return_dict=False)
        pipe.unet(sample, t, hidden, down_block_additional_residuals=down, mid_block_additional_residual=mid)

    with torch.inference_mode():
        ours_image()  # warm-up, both sides
        ref_image()
        image_s = alternate({"ours": ours_image, "ref": ref_image}, args.repeats, sync)
        step_s = alternate({"ours": lambda: ours.predict_noise(latents, 500, cond, (0, 1), control=control),
                            "ref": ref_step}, args.repeats, sync)
    del ours, pipe
    gc.collect()
    return {
        "model": model, "size": f"{g.image_width}x{g.image_height}", "steps": args.steps, "device": device,
        "coreml_hub": {"load_s": ours_load, "image_s": image_s["ours"], "steps_per_s": 1.0 / step_s["ours"]},
        "diffusers": {"load_s": ref_load, "image_s": image_s["ref"], "steps_per_s": 1.0 / step_s["ref"]},
        "ratio_image_time": image_s["ours"] / image_s["ref"],
        "ratio_step_time": step_s["ours"] / step_s["ref"],
    }


def report(rows: list[dict[str, Any]]) -> None:
    print(f"{'model':<6} {'size':<8} {'steps':>5} {'device':<6} {'':<11} {'s/image':>8} {'steps/s':>8}")
    for r in rows:
        for side in ("coreml_hub", "diffusers"):
            d = r[side]
            print(f"{r['model']:<6} {r['size']:<8} {r['steps']:>5} {r['device']:<6} {side:<11} "
                  f"{d['image_s']:>8.3f} {d['steps_per_s']:>8.2f}")
        print(f"  ratio coreml-hub/diffusers (time, goal <= 1.0): per image x{r['ratio_image_time']:.2f}, "
              f"per ControlNet + Unet step x{r['ratio_step_time']:.2f}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=["tiny", "sd15", "all"], default="all")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--cache", default=os.path.join(tempfile.gettempdir(), "coreml-hub-bench"))
    parser.add_argument("--json", action="store_true", help="print the results as JSON too")
    args = parser.parse_args(argv)
    rows = []
    for model in (["tiny", "sd15"] if args.model == "all" else [args.model]):
        log(f"benchmarking {model} ...")
        rows.append(bench_model(model, args))
    report(rows)
    if args.json:
        print(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
