"""`coreml-hub run`: generate images with a Core ML Stable Diffusion model."""

from __future__ import annotations

from pathlib import Path

import click

from ..pipeline.schedulers import DEFAULT_SCHEDULER, PREDICTION_TYPES, SCHEDULERS  # stdlib only: fast --help
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
  coreml-hub run coreml-community/coreml-stable-diffusion-v1-5_cn:split_einsum/compiled+cn \\
      "a house by a lake" --controlnet coreml-community/ControlNet-Models-For-Core-ML:Canny \\
      --control-image edges.png --control-scale 0.8
  coreml-hub run ./sd15-inpainting "a red sofa" --image room.png --mask sofa-mask.png

\b
MODEL is a repo id (pulled first when missing, unless --no-pull), REPO:VARIANT,
a pulled model, or a local folder holding one variant's bundles.
Backends: `auto` is Core ML on macOS and the portable PyTorch runtime elsewhere.
Image i of --num-images N uses seed SEED+i; the PNGs record every setting
(the `parameters` text chunk image tools read). Files are never overwritten.

\b
ControlNets: --controlnet NAME_OR_PATH, --control-image IMG and --control-scale S
pair in order (repeat them for several ControlNets; their residuals add up). NAME is
one of the variant's ControlNets, REPO:NAME one of another repo's (pulled into the
variant when missing, as `pull --controlnet` does), or a bundle path.
The variant needs a Unet that takes ControlNet residuals (ControlledUnet).
Inpainting: --image IMG --mask MASK (white or transparent = repaint), with an
inpainting model (9-channel Unet), any model, or an inpaint ControlNet (no
--control-image: the init image with the masked pixels punched out).""",
)
@click.argument("model")
@click.argument("prompt")
@click.option("--negative-prompt", default="", help="What the image should not show.")
@click.option("--steps", type=int, default=25, show_default=True, help="Denoising steps.")
@click.option("--guidance-scale", type=float, default=7.5, show_default=True,
              help="Classifier-free guidance; 1 or less turns it off.")
@click.option("--seed", type=click.IntRange(0, 2**63 - 1), default=None, help="Random seed (default: random).")
@click.option("--scheduler", type=click.Choice(list(SCHEDULERS)), default=DEFAULT_SCHEDULER, show_default=True)
@click.option("--prediction-type", type=click.Choice(PREDICTION_TYPES), default=None,
              help="What the Unet predicts, when the model's scheduler config is missing or wrong "
                   "(SD 2.x 768-px models: v_prediction). Default: the model's config, else epsilon.")
@click.option("--image", "init_image", type=click.Path(path_type=Path), default=None,
              help="Init image for image-to-image.")
@click.option("--strength", type=float, default=None,
              help="How much of the init image is replaced (0-1]; default 0.75, and 1 with --mask.")
@click.option("--mask", "mask", type=click.Path(path_type=Path), default=None,
              help="Inpainting mask for --image: white (or transparent) pixels are repainted.")
@click.option("--controlnet", "controlnets", multiple=True, metavar="NAME_OR_PATH",
              help="A ControlNet of the variant (or a bundle path); repeatable.")
@click.option("--control-image", "control_images", multiple=True, type=click.Path(path_type=Path),
              metavar="IMG", help="The image of the --controlnet at the same position.")
@click.option("--control-scale", "control_scales", multiple=True, type=float, metavar="S",
              help="The weight of the --controlnet at the same position (default 1).")
@click.option("--num-images", type=int, default=1, show_default=True)
@click.option("-o", "--output", "output_dir", type=click.Path(path_type=Path), default=None,
              help="Folder for the PNGs (default: ./coreml-hub-outputs or $COREML_HUB_OUTPUTS).")
@click.option("--backend", type=click.Choice(["auto", "torch", "coreml"]), default="auto", show_default=True)
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda", "mps"]), default="auto", show_default=True,
              help="torch backend: where to run (fp16 on GPUs).")
@click.option("--compute-unit", type=click.Choice(COMPUTE_UNIT_CHOICES, case_sensitive=False), default="ALL",
              show_default=True, help="coreml backend: which compute units Core ML may use.")
@click.option("--disable-safety", is_flag=True, help="Skip the model's safety checker.")
@click.option("--save-every", type=int, default=None, metavar="K", help="Also save a decode every K steps.")
@click.option("--no-pull", is_flag=True, help="Fail instead of pulling a model that is not pulled yet.")
@click.option("--json", "json_mode", is_flag=True, help="Print paths, parameters and timings as JSON.")
@click.option("-q", "--quiet", is_flag=True, help="Print only the image paths.")
def run_cmd(model: str, prompt: str, negative_prompt: str, steps: int, guidance_scale: float, seed: int | None,
            scheduler: str, prediction_type: str | None, init_image: Path | None, strength: float | None,
            num_images: int, output_dir: Path | None, backend: str, device: str, compute_unit: str,
            disable_safety: bool, save_every: int | None, no_pull: bool, json_mode: bool, quiet: bool,
            mask: Path | None = None, controlnets: tuple[str, ...] = (), control_images: tuple[Path, ...] = (),
            control_scales: tuple[float, ...] = ()) -> None:
    """Generate images from PROMPT with MODEL (text-to-image, or image-to-image with --image)."""
    from ..pipeline.generate import generate

    out = Output(json_mode=json_mode, quiet=quiet)

    def notify(message: str) -> None:
        if message.startswith("Warning: "):
            out.warn(message.removeprefix("Warning: "))  # shown even with --quiet
        else:
            out.info(message)

    result = generate(
        model, prompt, negative_prompt=negative_prompt, steps=steps, guidance_scale=guidance_scale, seed=seed,
        scheduler=scheduler, prediction_type=prediction_type, image=init_image, strength=strength,
        num_images=num_images, output_dir=output_dir,
        backend=backend, device=device, compute_unit=compute_unit.upper(), disable_safety=disable_safety,
        save_every=save_every, pull=not no_pull, progress=not quiet and not json_mode and stderr_is_tty(),
        on_message=notify, mask=mask, controlnets=controlnets, control_images=control_images,
        control_scales=control_scales)
    if json_mode:
        out.json(result.to_dict())
        return
    for saved in result.images:
        for step_path in saved.intermediates:
            click.echo(str(step_path))
        click.echo(str(saved.path))
