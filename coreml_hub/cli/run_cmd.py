"""`coreml-hub run`: run a model with the task it is for (text-to-image, classification, depth, ...)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click
from click.core import ParameterSource

from ..pipeline.images import FITS  # stdlib only (PIL loads in functions): fast --help
from ..pipeline.refiner import DEFAULT_REFINER_START  # no torch: fast --help
from ..pipeline.rng import DEFAULT_RNG, DEFAULT_SEED_MODE, RNGS, SEED_MODES  # numpy only: fast --help
from ..pipeline.schedulers import (  # stdlib only: fast --help
    DEFAULT_FLOW_SCHEDULER, DEFAULT_SCHEDULER, PREDICTION_TYPES, SCHEDULERS)
from .output import Column, Output, format_table, stderr_is_tty

COMPUTE_UNIT_CHOICES = ("ALL", "CPU_AND_GPU", "CPU_ONLY", "CPU_AND_NE")

# Parameters `run` itself handles; every other one is an option of the task that runs.
GENERIC = {"model", "inputs", "task", "images", "texts", "extra", "output_dir", "backend", "device", "no_pull",
           "json_mode", "quiet"}


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
  coreml-hub run argmaxinc/coreml-stable-diffusion-3-medium "a red fox" --guidance-scale 5 --steps 28
  coreml-hub run apple/coreml-stable-diffusion-xl-base-with-refiner "a red fox" --refiner-start 0.7
  coreml-hub run MODEL "a red fox" --seed 42 --rng numpy          # Mochi Diffusion's image for seed 42
  coreml-hub run MODEL "a red fox" --reduce-memory --json         # one model in memory at a time
  coreml-hub run MODEL "a red fox" --dtype bf16                   # CPUs with bf16 instructions: ~2x
  coreml-hub run MODEL "a red fox" --seed 42 --rng numpy --num-images 4 --seed-mode stream
                                                                  # the Swift CLI's --image-count 4
  coreml-hub run apple/coreml-FastViT-T8 photo.jpg --top-k 3
  coreml-hub run apple/coreml-depth-anything-v2-small photo.jpg -o depth/
  coreml-hub run apple/coreml-detr-semantic-segmentation street.jpg
  coreml-hub run apple/coreml-mobileclip --image a.jpg --text "a dog" --text "a cat"
  coreml-hub run apple/mistral-coreml "What is Core ML?" --max-new-tokens 64
  coreml-hub run coreml-projects/Llama-2-7b-chat-coreml "Hello" --temperature 0.7 --top-p 0.9 --seed 1

\b
MODEL is a repo id (pulled first when missing, unless --no-pull), REPO:VARIANT,
a pulled model, a local folder holding one variant's bundles, or one bundle.
The task comes from the model (its inputs, outputs and metadata, and the repo's
pipeline_tag); --task names one. `coreml-hub plugins` lists the installed tasks.
  text-to-image         PROMPT; --image for image-to-image. PNGs recording every
                        setting. --rng draws the initial noise as each tool does:
                        torch (diffusers' CPU generator), numpy (Apple's Python
                        pipeline, Swift NumPyRandomSource, Mochi Diffusion) or
                        nvidia (torch.randn on a CUDA device, computed on the CPU).
                        Image i of --num-images N uses seed SEED+i (--seed-mode
                        increment), or the i-th draw of one stream seeded with
                        SEED (--seed-mode stream).
  image-classification  IMAGE...; the --top-k labels with their probabilities.
  depth-estimation      IMAGE...; a 16-bit PNG depth map and a colorized PNG at
                        each image's size.
  image-segmentation    IMAGE...; a class map PNG and a colored overlay with a
                        legend of the classes present.
  feature-extraction    --image and --text (CLIP-style image and text encoders):
                        cosine similarities; embeddings saved as .npy.
  text-generation       PROMPT; streamed to stdout (greedy, or sampled with
                        --temperature/--top-p/--seed); tokens/s on stderr.
Backends: `auto` is Core ML on macOS and the portable PyTorch runtime elsewhere
(tasks other than text-to-image run on the portable runtime). Files are never
overwritten.

\b
text-to-image ControlNets: --controlnet NAME_OR_PATH, --control-image IMG and
--control-scale S pair in order (repeat them for several ControlNets; their
residuals add up). NAME is one of the variant's ControlNets, REPO:NAME one of
another repo's (pulled into the variant when missing, as `pull --controlnet`
does), or a bundle path. The variant needs a Unet that takes ControlNet
residuals (ControlledUnet).
Inpainting: --image IMG --mask MASK (white or transparent = repaint), with an
inpainting model (9-channel Unet), any model, or an inpaint ControlNet (no
--control-image: the init image with the masked pixels punched out). A refiner
does not run with ControlNets or a mask.""",
)
@click.argument("model")
@click.argument("inputs", nargs=-1, metavar="[PROMPT | IMAGE...]")
@click.option("--task", default=None, metavar="NAME", help="Run this task instead of the one the model is for.")
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
@click.option("--image", "images", type=click.Path(path_type=Path), multiple=True,
              help="An input image (repeatable); text-to-image: the init image for image-to-image.")
@click.option("--strength", type=float, default=None,
              help="Image-to-image: how much of the init image is replaced (0-1]; default 0.75, and 1 with --mask.")
@click.option("--fit", type=click.Choice(FITS), default=None,
              help="An image of another aspect ratio than the model's is cropped to its middle, padded with "
                   "black bars, or stretched. Image-to-image: default refused (the mask is fitted alike); "
                   "image-classification and feature-extraction: default crop.")
@click.option("--mask", "mask", type=click.Path(path_type=Path), default=None,
              help="text-to-image: inpainting mask for --image: white (or transparent) pixels are repainted.")
@click.option("--controlnet", "controlnets", multiple=True, metavar="NAME_OR_PATH",
              help="text-to-image: a ControlNet of the variant (or a bundle path); repeatable.")
@click.option("--control-image", "control_images", multiple=True, type=click.Path(path_type=Path),
              metavar="IMG", help="text-to-image: the image of the --controlnet at the same position.")
@click.option("--control-scale", "control_scales", multiple=True, type=float, metavar="S",
              help="text-to-image: the weight of the --controlnet at the same position (default 1).")
@click.option("--num-images", type=int, default=1, show_default=True)
@click.option("-o", "--output", "output_dir", type=click.Path(path_type=Path), default=None,
              help="Folder for the files a task writes (default: ./coreml-hub-outputs or $COREML_HUB_OUTPUTS).")
@click.option("--backend", type=click.Choice(["auto", "torch", "coreml"]), default="auto", show_default=True)
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda", "mps"]), default="auto", show_default=True,
              help="torch backend: where to run (fp16 on GPUs).")
@click.option("--compute-unit", type=click.Choice(COMPUTE_UNIT_CHOICES, case_sensitive=False), default=None,
              help="coreml backend: which compute units Core ML may use (default: ALL); other backends ignore it.")
@click.option("--disable-safety", is_flag=True, help="Skip the model's safety checker.")
@click.option("--save-every", type=int, default=None, metavar="K", help="Also save a decode every K steps.")
@click.option("--text", "texts", multiple=True, metavar="TEXT", help="feature-extraction: a text (repeatable).")
@click.option("--top-k", type=click.IntRange(min=1), default=None, help="image-classification: labels shown [5].")
@click.option("--max-new-tokens", type=click.IntRange(min=1), default=None,
              help="text-generation: most tokens to generate [128].")
@click.option("--temperature", type=click.FloatRange(min=0), default=None,
              help="text-generation: 0 is greedy [0]; above 0 samples.")
@click.option("--top-p", type=click.FloatRange(0, 1, min_open=True), default=None,
              help="text-generation: sample from the smallest set of tokens this probable [1].")
@click.option("--system", default=None, metavar="TEXT", help="text-generation: a system message for the chat template.")
@click.option("--no-chat", is_flag=True, help="text-generation: the prompt as is, no chat template.")
@click.option("--tokenizer", default=None, metavar="REPO|PATH",
              help="text-generation, feature-extraction: where the tokenizer comes from (default: the model's "
                   "folder, else the repo its metadata names).")
@click.option("--option", "extra", multiple=True, metavar="KEY=VALUE",
              help="An option of a plugin's task (repeatable; VALUE is read as JSON when it parses).")
@click.option("--no-pull", is_flag=True, help="Fail instead of pulling a model that is not pulled yet.")
@click.option("--chunked/--no-chunked", default=None,
              help="text-to-image: a pulled model's chunked / full Unet form (default: the full Unet when both are "
                   "pulled).")
@click.option("--dtype", type=click.Choice(["fp32", "fp16", "bf16"]), default=None,
              help="text-to-image, torch backend: the float type the Unet and VAE compute in [default: fp32 on the "
                   "CPU, the model's own on GPUs]. bf16 is about twice as fast on CPUs with bf16 instructions.")
@click.option("--reduce-memory", is_flag=True,
              help="text-to-image: load each model when it is needed and release it after (as the Swift CLI's "
                   "flag): peak memory is the largest model's instead of the sum; each image takes longer.")
@click.option("--json", "json_mode", is_flag=True, help="Print the result (paths, values, timings) as JSON.")
@click.option("-q", "--quiet", is_flag=True, help="Print only the essentials (file paths, top labels).")
@click.pass_context
def run_cmd(ctx: click.Context, **params: Any) -> None:
    """Run MODEL with its task: make images from a PROMPT, label, measure or segment IMAGEs, compare
    images with texts, or continue a PROMPT."""
    from ..tasks import run
    from . import STARTED

    json_mode, quiet = params["json_mode"], params["quiet"]
    out = Output(json_mode=json_mode, quiet=quiet)
    options = {k: v for k, v in params.items() if k not in GENERIC}
    given = [k for k in options if ctx.get_parameter_source(k) not in (ParameterSource.DEFAULT, None)]
    for key, value in _parse_extra(params["extra"]).items():
        options[key] = value
        given.append(key)
    flags = {p.name: next((o for o in p.opts if o.startswith("--")), p.opts[0])
             for p in ctx.command.params if isinstance(p, click.Option) and p.name}
    streamed: list[bool] = []

    def notify(message: str) -> None:
        if message.startswith("Warning: "):
            out.warn(message.removeprefix("Warning: "))  # shown even with --quiet
        else:
            out.info(message)

    def stream(text: str) -> None:
        streamed.append(True)
        click.echo(text, nl=False)

    result = run(params["model"], params["inputs"], task=params["task"], images=params["images"],
                 texts=params["texts"], options=options, given=given, flags=flags, output_dir=params["output_dir"],
                 backend=params["backend"], device=params["device"], pull=not params["no_pull"],
                 progress=not quiet and not json_mode and stderr_is_tty(), on_message=notify,
                 on_text=None if json_mode else stream, started=STARTED)
    if streamed:
        click.echo("")
    if json_mode:
        out.json(result.to_dict())
        return
    shown = result.render()
    if quiet:
        for line in shown.quiet:
            click.echo(line)
        return
    if shown.rows:
        click.echo(format_table(shown.rows, [Column(key, header) for key, header in shown.columns]))
    for line in shown.lines:
        click.echo(line)


def _parse_extra(items: tuple[str, ...]) -> dict[str, Any]:
    parsed: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        key = key.strip().replace("-", "_")
        if not sep or not key:
            raise click.BadParameter(f"{item!r} is not KEY=VALUE.", param_hint="--option")
        try:
            parsed[key] = json.loads(value)
        except ValueError:
            parsed[key] = value
    return parsed
