"""Benchmark `coreml-hub run`'s pipeline against diffusers on the same weights and machine.

Two models, both with random weights (nothing is downloaded):
  tiny  the test suite's tiny SD1-style pipeline (64x64 images)
  sd15  the Stable Diffusion 1.5 architecture (860M-parameter Unet, CLIP ViT-L text
        encoder, the SD VAE) at 256x256, converted to Core ML packages (fp16, original
        attention) by coreml-hub's converter and run by the portable runtime

For each: seconds per image (text encode + N denoising steps + VAE decode) and Unet
steps per second (one batch-2 Unet call = one step), each the median of --repeats runs,
coreml-hub (torch backend) next to diffusers (StableDiffusionPipeline) on the same device,
timed in turn so both sides see the same machine load, then the ratios. Conversions are cached under --cache (default: <tmp>/coreml-hub-bench).

    python bench/run_bench.py                      # both models, CPU
    python bench/run_bench.py --model tiny --steps 10 --repeats 5
    python bench/run_bench.py --device cuda        # torch backend in fp16 vs diffusers fp16
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

PROMPT = "a photo of an astronaut riding a horse on mars"

# Stable Diffusion 1.5's architecture (its published configs), random weights.
SD15_UNET = {
    "sample_size": 64, "in_channels": 4, "out_channels": 4, "layers_per_block": 2,
    "block_out_channels": [320, 640, 1280, 1280],
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
    "cross_attention_dim": 768, "attention_head_dim": 8, "norm_num_groups": 32,
}
SD15_VAE = {
    "in_channels": 3, "out_channels": 3, "latent_channels": 4,
    "down_block_types": ["DownEncoderBlock2D"] * 4, "up_block_types": ["UpDecoderBlock2D"] * 4,
    "block_out_channels": [128, 256, 512, 512], "layers_per_block": 2, "norm_num_groups": 32,
    "sample_size": 512, "scaling_factor": 0.18215,
}
SD15_TEXT = {
    "vocab_size": 49408, "hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12,
    "num_attention_heads": 12, "max_position_embeddings": 77, "hidden_act": "quick_gelu",
    "projection_dim": 768,
}
SD15_SCHEDULER = {
    "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear", "num_train_timesteps": 1000,
    "set_alpha_to_one": False, "skip_prk_steps": True, "steps_offset": 1, "prediction_type": "epsilon",
}


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def build_sd15(folder: Path) -> None:
    """Save an SD-1.5-architecture diffusers pipeline with seeded random weights to `folder`."""
    import diffusers
    import torch
    from transformers import CLIPTextConfig, CLIPTextModel

    from coreml_hub.testing.tokenizer import load_clip_tokenizer, write_tokenizer_config, write_tokenizer_files

    tok_dir = folder / "tokenizer"
    write_tokenizer_files(tok_dir, 1000)
    tokenizer = load_clip_tokenizer(tok_dir)
    torch.manual_seed(0)
    unet = diffusers.UNet2DConditionModel(**SD15_UNET).eval()
    torch.manual_seed(1)
    vae = diffusers.AutoencoderKL(**SD15_VAE).eval()
    torch.manual_seed(2)
    text = CLIPTextModel(CLIPTextConfig(**SD15_TEXT, bos_token_id=tokenizer.bos_token_id,
                                        eos_token_id=tokenizer.eos_token_id, pad_token_id=1)).eval()
    scheduler = diffusers.PNDMScheduler.from_config(SD15_SCHEDULER)
    pipe = diffusers.StableDiffusionPipeline(vae=vae, text_encoder=text, tokenizer=tokenizer, unet=unet,
                                             scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                             requires_safety_checker=False)
    pipe.save_pretrained(folder, safe_serialization=True)
    write_tokenizer_files(tok_dir, 1000)
    write_tokenizer_config(tok_dir)


def _cached(root: Path, name: str, build: Callable[[Path], None]) -> Path:
    final = root / name
    if final.is_dir():
        return final
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=root))
    build(tmp)
    tmp.rename(final)
    return final


def prepare(model: str, cache: Path, given: tuple[str | None, str | None] = (None, None)) -> tuple[Path, Path]:
    """(diffusers pipeline folder, Core ML conversion folder) for `model`; `given` overrides both."""
    if given[0] and given[1]:
        return Path(given[0]), Path(given[1])
    from coreml_hub.convert import convert
    from coreml_hub.testing import factory

    cache.mkdir(parents=True, exist_ok=True)
    if model == "tiny":
        return factory.pipeline_folder("sd1"), factory.converted("sd1", attention="original", precision="fp16")
    source = _cached(cache, "sd15-diffusers", build_sd15)

    def conv(tmp: Path) -> None:
        t0 = time.perf_counter()
        convert(source, tmp, attention="original", precision="fp16", latent_size=(32, 32),
                components=("text_encoder", "unet", "vae_decoder"), model_version="bench/sd15-random",
                progress=True)
        log(f"converted sd15 in {time.perf_counter() - t0:.0f} s")

    return source, _cached(cache, "sd15-coreml-256", conv)


def alternate(fns: dict[str, Callable[[], Any]], repeats: int, sync: Callable[[], None]) -> dict[str, float]:
    """Median seconds of each function, timed in turn (a b a b ...) so both see the same machine load."""
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            sync()
            t0 = time.perf_counter()
            fn()
            sync()
            times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(values) for name, values in times.items()}


def bench_model(model: str, args: argparse.Namespace) -> dict[str, Any]:
    import diffusers
    import torch

    from coreml_hub.pipeline.generate import load_pipeline
    from coreml_hub.pipeline.resolve import resolve_local

    device = args.device
    sync = (lambda: torch.cuda.synchronize()) if device.startswith("cuda") else (lambda: None)
    source, converted = prepare(model, Path(args.cache), (args.pipeline_folder, args.coreml_folder))

    # coreml-hub: the torch backend over the Core ML files
    t0 = time.perf_counter()
    ours = load_pipeline(resolve_local(converted), backend="torch", device=device, safety=False).pipeline
    ours_load = time.perf_counter() - t0
    g = ours.geometry
    cond = ours.condition(PROMPT, "")
    latents = torch.randn(1, g.latent_channels, g.latent_height, g.latent_width)

    # diffusers on the PyTorch weights the files were converted from
    dtype = torch.float32 if device == "cpu" else torch.float16
    t0 = time.perf_counter()
    pipe = diffusers.StableDiffusionPipeline.from_pretrained(str(source), torch_dtype=dtype)
    pipe.safety_checker = None
    pipe = pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    ref_load = time.perf_counter() - t0
    sample = torch.randn(2, 4, g.latent_height, g.latent_width, device=device, dtype=dtype)
    hidden = torch.randn(2, g.text_length, g.hidden_size, device=device, dtype=dtype)
    t = torch.tensor([500, 500], device=device)

    def ours_image() -> None:
        ours.generate(prompt=PROMPT, steps=args.steps, guidance_scale=7.5, seed=0, scheduler="pndm")

    def ref_image() -> None:
        pipe(PROMPT, num_inference_steps=args.steps, guidance_scale=7.5, height=g.image_height,
             width=g.image_width, generator=torch.Generator().manual_seed(0), output_type="np")

    with torch.inference_mode():
        ours_image()  # warm-up, both sides
        ref_image()
        image_s = alternate({"ours": ours_image, "ref": ref_image}, args.repeats, sync)
        step_s = alternate({"ours": lambda: ours.predict_noise(latents, 500, cond, (0, 1)),
                            "ref": lambda: pipe.unet(sample, t, hidden)}, args.repeats, sync)
    del ours, pipe
    gc.collect()
    return {
        "model": model, "size": f"{g.image_width}x{g.image_height}", "steps": args.steps, "device": device,
        "coreml_hub": {"load_s": ours_load, "image_s": image_s["ours"], "unet_steps_per_s": 1.0 / step_s["ours"]},
        "diffusers": {"load_s": ref_load, "image_s": image_s["ref"], "unet_steps_per_s": 1.0 / step_s["ref"]},
        "ratio_image_time": image_s["ours"] / image_s["ref"],
        "ratio_unet_speed": step_s["ref"] / step_s["ours"],
    }


def report(rows: list[dict[str, Any]]) -> None:
    head = f"{'model':<6} {'size':<8} {'steps':>5} {'device':<6} {'':<11} {'s/image':>8} {'unet it/s':>10}"
    print(head)
    for r in rows:
        for side in ("coreml_hub", "diffusers"):
            d = r[side]
            print(f"{r['model']:<6} {r['size']:<8} {r['steps']:>5} {r['device']:<6} {side:<11} "
                  f"{d['image_s']:>8.3f} {d['unet_steps_per_s']:>10.2f}")
        print(f"  ratio coreml-hub/diffusers: time per image x{r['ratio_image_time']:.2f}, "
              f"Unet speed x{r['ratio_unet_speed']:.2f} (above 1 = coreml-hub faster)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=["tiny", "sd15", "all"], default="all")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--cache", default=os.path.join(tempfile.gettempdir(), "coreml-hub-bench"))
    parser.add_argument("--json", action="store_true", help="print the results as JSON too")
    parser.add_argument("--pipeline-folder", help="use this saved diffusers pipeline (with --coreml-folder)")
    parser.add_argument("--coreml-folder", help="use this Core ML variant folder instead of converting")
    args = parser.parse_args(argv)
    models = ["tiny", "sd15"] if args.model == "all" else [args.model]
    rows = []
    for model in models:
        log(f"benchmarking {model} ...")
        rows.append(bench_model(model, args))
    report(rows)
    if args.json:
        print(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
