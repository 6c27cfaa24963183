"""`coreml-hub run`: generate images with a Core ML Stable Diffusion model."""

from __future__ import annotations

from pathlib import Path

import click

from ..pipeline.images import FITS  # stdlib only (PIL loads in functions): fast --help
from ..pipeline.refiner import DEFAULT_REFINER_START  # no torch: fast --help
from ..pipeline.rng import DEFAULT_RNG, DEFAULT_SEED_MODE, RNGS, SEED_MODES  # numpy only: fast --help
from ..pipeline.schedulers import (  # stdlib only: fast --help
    DEFAULT_FLOW_SCHEDULER, DEFAULT_SCHEDULER, PREDICTION_TYPES, SCHEDULERS)
from .output import Output, stderr_is_tty

COMPUTE_UNIT_CHOICES = ("ALL", "CPU_AND_GPU", "CPU_ONLY", "CPU_AND_NE")


@click.command(
    "run",
    epilog="""\b
Examples:
  coreml-hub run apple/coreml-stable-diffusion-v1-5 "a photo of an astronaut riding a horse"
  coreml-hub run apple/coreml-stable-diffusion-2-1-base:split_einsum/compiled "a lighthouse" \\
      --steps 30 --scheduler dpmpp --seed 42 -o out/
  coreml-hub run apple/coreml-stable-diffusion-v1-5 "oil painting of a cat" \\
      --image cat.png --strength 0.6
  coreml-hub run ./converted "a red fox" --num-images 4 --json   # the -o folder of `convert`
  coreml-hub run argmaxinc/coreml-stable-diffusion-3-medium "a red fox" --guidance-scale 5 --steps 28
  coreml-hub run apple/coreml-stable-diffusion-xl-base-with-refiner "a red fox" --refiner-start 0.7
  coreml-hub run MODEL "a red fox" --seed 42 --rng numpy          # Mochi Diffusion's image for seed 42
  coreml-hub run MODEL "a red fox" --seed 42 --rng numpy --num-images 4 --seed-mode stream
                                                                  # the Swift CLI's --image-count 4

\b
MODEL is a repo id (pulled first when missing, unless --no-pull), REPO:VARIANT,
a pulled model, or a local folder holding one variant's bundles.
Backends: `auto` is Core ML on macOS and the portable PyTorch runtime elsewhere.
--rng draws the initial noise as each tool does: torch (diffusers' CPU
generator), numpy (Apple's Python pipeline, Swift NumPyRandomSource, Mochi
Diffusion) or nvidia (torch.randn on a CUDA device, computed on the CPU).
Image i of --num-images N uses seed SEED+i (--seed-mode increment), or the
i-th draw of one stream seeded with SEED (--seed-mode stream); the PNGs record
every setting (the `parameters` text chunk image tools read). Files are never
overwritten.""",
)
@click.argument("model")
@click.argument("prompt")
@click.option("--negative-prompt", default="", help="What the image should not show.")
@click.option("--steps", type=int, default=25, show_default=True, help="Denoising steps.")
@click.option("--guidance-scale", type=float, default=7.5, show_default=True,
              help="Classifier-free guidance; 1 or less turns it off.")
@click.option("--seed", type=click.IntRange(0, 2**63 - 1), default=None, help="Random seed (default: random).")
@click.option("--scheduler", type=click.Choice(list(SCHEDULERS)), default=None,
              help=f"Denoising scheduler [default: {DEFAULT_SCHEDULER}; SD3: {DEFAULT_FLOW_SCHEDULER}].")
@click.option("--prediction-type", type=click.Choice(PREDICTION_TYPES), default=None,
              help="What the Unet predicts, when the model's scheduler config is missing or wrong "
                   "(SD 2.x 768-px models: v_prediction). Default: the model's config, else epsilon.")
@click.option("--rng", type=click.Choice(RNGS), default=DEFAULT_RNG, show_default=True,
              help="How the initial noise is drawn: torch (diffusers), numpy (Apple, Mochi), nvidia (CUDA).")
@click.option("--seed-mode", type=click.Choice(SEED_MODES), default=DEFAULT_SEED_MODE, show_default=True,
              help="Multi-image runs: SEED+i per image (Mochi), or one stream for all (the Swift CLI).")
@click.option("--no-t5", is_flag=True, help="SD3: leave TextEncoderT5 out (zeros in its place, as Apple's "
              "pipeline runs without it).")
@click.option("--shift", type=float, default=None,
              help="SD3: the flow-matching schedule's shift [default: the model's scheduler config, else 3].")
@click.option("--refiner", "refiner_model", metavar="MODEL[:VARIANT]", default=None,
              help="SDXL: take the refiner from another pulled variant or folder (its UnetRefiner, or its Unet "
                   "when that is a refiner).")
@click.option("--no-refiner", is_flag=True, help="SDXL: do not use the variant's refiner.")
@click.option("--refiner-start", type=float, default=DEFAULT_REFINER_START, show_default=True,
              help="SDXL with a refiner: the fraction of the schedule the base Unet runs before the refiner.")
@click.option("--image", "init_image", type=click.Path(path_type=Path), default=None,
              help="Init image for image-to-image.")
@click.option("--strength", type=float, default=0.75, show_default=True,
              help="Image-to-image: how much of the init image is replaced (0-1].")
@click.option("--fit", type=click.Choice(FITS), default=None,
              help="Image-to-image: an init image of another aspect ratio is cropped to its middle, padded "
                   "with black bars, or stretched (default: refused).")
@click.option("--num-images", type=int, default=1, show_default=True)
@click.option("-o", "--output", "output_dir", type=click.Path(path_type=Path), default=None,
              help="Folder for the PNGs (default: ./coreml-hub-outputs or $COREML_HUB_OUTPUTS).")
@click.option("--backend", type=click.Choice(["auto", "torch", "coreml"]), default="auto", show_default=True)
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda", "mps"]), default="auto", show_default=True,
              help="torch backend: where to run (fp16 on GPUs).")
@click.option("--compute-unit", type=click.Choice(COMPUTE_UNIT_CHOICES, case_sensitive=False), default=None,
              help="coreml backend: which compute units Core ML may use (default: ALL); other backends ignore it.")
@click.option("--disable-safety", is_flag=True, help="Skip the model's safety checker.")
@click.option("--save-every", type=int, default=None, metavar="K", help="Also save a decode every K steps.")
@click.option("--no-pull", is_flag=True, help="Fail instead of pulling a model that is not pulled yet.")
@click.option("--chunked/--no-chunked", default=None,
              help="A pulled model's chunked / full Unet form (default: the full Unet when both are pulled).")
@click.option("--json", "json_mode", is_flag=True, help="Print paths, parameters and timings as JSON.")
@click.option("-q", "--quiet", is_flag=True, help="Print only the image paths.")
def run_cmd(model: str, prompt: str, negative_prompt: str, steps: int, guidance_scale: float, seed: int | None,
            scheduler: str | None, prediction_type: str | None, rng: str, seed_mode: str, no_t5: bool,
            shift: float | None, refiner_model: str | None, no_refiner: bool, refiner_start: float,
            init_image: Path | None, strength: float, fit: str | None,
            num_images: int, output_dir: Path | None, backend: str, device: str, compute_unit: str | None,
            disable_safety: bool, save_every: int | None, no_pull: bool, chunked: bool | None, json_mode: bool,
            quiet: bool) -> None:
    """Generate images from PROMPT with MODEL (text-to-image, or image-to-image with --image)."""
    from ..errors import UsageError
    from ..pipeline.generate import generate
    from . import STARTED

    if refiner_model and no_refiner:
        raise UsageError("--refiner and --no-refiner contradict each other.", hint="Pass one of them.")

    out = Output(json_mode=json_mode, quiet=quiet)

    def notify(message: str) -> None:
        if message.startswith("Warning: "):
            out.warn(message.removeprefix("Warning: "))  # shown even with --quiet
        else:
            out.info(message)

    result = generate(
        model, prompt, negative_prompt=negative_prompt, steps=steps, guidance_scale=guidance_scale, seed=seed,
        scheduler=scheduler, prediction_type=prediction_type, rng=rng, seed_mode=seed_mode, t5=not no_t5,
        shift=shift, refiner=refiner_model if refiner_model else not no_refiner, refiner_start=refiner_start,
        image=init_image, strength=strength, fit=fit,
        num_images=num_images, output_dir=output_dir,
        backend=backend, device=device, compute_unit=compute_unit.upper() if compute_unit else None,
        disable_safety=disable_safety, save_every=save_every, pull=not no_pull, chunked=chunked,
        progress=not quiet and not json_mode and stderr_is_tty(), on_message=notify, started=STARTED)
    if json_mode:
        out.json(result.to_dict())
        return
    for saved in result.images:
        for step_path in saved.intermediates:
            click.echo(str(step_path))
        click.echo(str(saved.path))
