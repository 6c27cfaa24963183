"""Benchmark SD3 and SDXL base+refiner end to end: coreml-hub's pipeline against diffusers, same weights.

The test suite's tiny pipelines (random weights, 64x64 images; nothing is downloaded), converted
to Core ML packages at fp32 by coreml-hub and run by the portable runtime (torch backend):

  sd3      StableDiffusion3Pipeline (two CLIP encoders, T5, MMDiT, flow-matching Euler)
  refiner  StableDiffusionXLPipeline with denoising_end=0.8, then the refiner's
           StableDiffusionXLImg2ImgPipeline with denoising_start=0.8 (the ensemble)

Seconds per image (text encoding, every denoising step, VAE decode), the median of --repeats runs,
coreml-hub and diffusers timed in turn (a b a b ...) so both see the same machine load, then the
ratio (above 1: coreml-hub takes longer).

    python bench/sd3_refiner_bench.py                 # both, CPU
    python bench/sd3_refiner_bench.py --model sd3 --steps 20 --repeats 7
    python bench/sd3_refiner_bench.py --device cuda   # on a GPU (both sides in float32)
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Callable

sys.path.insert(0, str(Path(__file__).resolve().parent))
from run_bench import alternate, log  # noqa: E402  (the same timing discipline as the SD benchmark)

PROMPT = "a photo of an astronaut riding a horse on mars"
NEGATIVE = "blurry, low quality"


def sd3_sides(steps: int, device: str) -> tuple[Callable[[], Any], Callable[[], Any], str]:
    import torch

    from coreml_hub.pipeline.generate import load_pipeline
    from coreml_hub.pipeline.resolve import resolve_local
    from coreml_hub.testing import factory

    ours = load_pipeline(resolve_local(factory.converted("sd3", "original", "fp32")), backend="torch",
                         device=device).pipeline
    pipe, _ = factory.tiny_pipeline("sd3")
    pipe = pipe.to(device)

    def coreml_hub() -> None:
        ours.generate(prompt=PROMPT, negative_prompt=NEGATIVE, steps=steps, guidance_scale=5.0, seed=0)

    def diffusers() -> None:
        pipe(PROMPT, negative_prompt=NEGATIVE, num_inference_steps=steps, guidance_scale=5.0,
             generator=torch.Generator().manual_seed(0), max_sequence_length=77, output_type="np")

    return coreml_hub, diffusers, f"{ours.geometry.size}, T5"


def refiner_sides(steps: int, device: str) -> tuple[Callable[[], Any], Callable[[], Any], str]:
    import torch

    from coreml_hub.pipeline.generate import load_pipeline
    from coreml_hub.pipeline.resolve import resolve_local
    from coreml_hub.pipeline.schedulers import make_scheduler
    from coreml_hub.testing import factory

    ours = load_pipeline(resolve_local(factory.converted("sdxl", "original", "fp32", refiner=True)),
                         backend="torch", device=device, safety=False).pipeline
    base, _ = factory.tiny_pipeline("sdxl")
    refiner, _ = factory.tiny_pipeline("sdxl-refiner")
    base, refiner = base.to(device), refiner.to(device)
    for pipe in (base, refiner):
        pipe.scheduler = make_scheduler("euler", ours.scheduler_config)

    def coreml_hub() -> None:
        ours.generate(prompt=PROMPT, negative_prompt=NEGATIVE, steps=steps, guidance_scale=6.0, seed=0,
                      scheduler="euler")

    def diffusers() -> None:
        latents = base(PROMPT, negative_prompt=NEGATIVE, num_inference_steps=steps, guidance_scale=6.0,
                       denoising_end=0.8, generator=torch.Generator().manual_seed(0), output_type="latent").images
        refiner(PROMPT, negative_prompt=NEGATIVE, image=latents, num_inference_steps=steps, guidance_scale=6.0,
                denoising_start=0.8, generator=torch.Generator().manual_seed(0), output_type="np")

    return coreml_hub, diffusers, f"{ours.geometry.size}, refiner from 0.8"


MODELS = {"sd3": sd3_sides, "refiner": refiner_sides}


def main(argv: list[str] | None = None) -> int:
    import torch

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=[*MODELS, "all"], default="all")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--json", action="store_true", help="print the results as JSON too")
    args = parser.parse_args(argv)
    sync = (lambda: torch.cuda.synchronize()) if args.device.startswith("cuda") else (lambda: None)
    rows = []
    for name in (list(MODELS) if args.model == "all" else [args.model]):
        log(f"benchmarking {name} ...")
        ours, ref, what = MODELS[name](args.steps, args.device)
        with torch.inference_mode():
            ours()  # warm-up, both sides
            ref()
            seconds = alternate({"coreml_hub": ours, "diffusers": ref}, args.repeats, sync)
        rows.append({"model": name, "what": what, "steps": args.steps, "device": args.device, **seconds,
                     "ratio": seconds["coreml_hub"] / seconds["diffusers"]})
    print(f"{'model':<8} {'':<26} {'steps':>5} {'device':<6} {'coreml-hub s':>12} {'diffusers s':>11} {'ratio':>6}")
    for r in rows:
        print(f"{r['model']:<8} {r['what']:<26} {r['steps']:>5} {r['device']:<6} {r['coreml_hub']:>12.3f} "
              f"{r['diffusers']:>11.3f} {r['ratio']:>6.2f}")
    if args.json:
        print(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
