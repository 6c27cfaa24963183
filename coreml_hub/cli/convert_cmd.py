"""`convert`: a diffusers Stable Diffusion pipeline -> Core ML packages (Apple's layout and contract)."""

from __future__ import annotations

import click

from .output import Column, Output, human_size, stderr_is_tty

ATTENTIONS = ("original", "split_einsum", "split_einsum_v2")
COMPONENT_NAMES = ("text_encoder", "text_encoder_2", "text_encoder_t5", "unet", "mmdit", "vae_decoder", "vae_encoder",
                   "safety_checker", "controlnet")


@click.command(
    "convert",
    epilog="""\b
Examples:
  coreml-hub convert runwayml/stable-diffusion-v1-5 -o ./sd15
  coreml-hub convert ./my-diffusers-pipeline -o ./out --attention original --precision fp32
  coreml-hub convert stabilityai/stable-diffusion-2-1-base -o ./sd21 --chunk-unet --quantize-nbits 6
  coreml-hub convert ./pipe -o ./out --components unet,vae_decoder --latent-size 96 64
  coreml-hub convert runwayml/stable-diffusion-v1-5 -o ./sd15 --controlnet lllyasviel/sd-controlnet-canny
  coreml-hub convert runwayml/stable-diffusion-v1-5 -o ./sd15 --components controlnet \\
      --controlnet lllyasviel/sd-controlnet-depth            # one more ControlNet for ./sd15
  coreml-hub convert runwayml/stable-diffusion-inpainting -o ./inpaint   # a 9-channel inpainting Unet
  coreml-hub convert stabilityai/stable-diffusion-3-medium-diffusers -o ./sd3 --latent-size 64 64
  coreml-hub convert stabilityai/stable-diffusion-xl-base-1.0 -o ./sdxl \\
      --refiner stabilityai/stable-diffusion-xl-refiner-1.0 --attention original

\b
SOURCE is a local diffusers pipeline folder or a Hub repo id (only model_index.json, the
tokenizer, the scheduler config and the configs and safetensors of the chosen components
are downloaded; HF_ENDPOINT and HF_TOKEN apply). OUT becomes a repo of its own:
  OUT/<attention>/packages/Stable_Diffusion_version_<org>_<name>_<component>.mlpackage
  OUT/tokenizer/{vocab.json,merges.txt}  OUT/scheduler/scheduler_config.json
  OUT/README.md  OUT/.hub.json
so `coreml-hub serve` can mirror it and `coreml-hub pull` can fetch it. Converting again
into the same OUT with another --attention adds that attention's folder. Everything is
written into a hidden folder in OUT and moved into place at the end: an interrupted
conversion (Ctrl-C) leaves nothing that looks like a conversion. Progress: bars on a
terminal, one line per component otherwise; -q prints only OUT.
SD3 (StableDiffusion3Pipeline) gives text_encoder, text_encoder_2, text_encoder_t5 (T5,
OUT/tokenizer_3/), mmdit (MultiModalDiffusionTransformer, float32, original attention),
vae_decoder and vae_encoder; leave T5 out with --components.
--refiner adds an SDXL refiner's Unet beside an SDXL base, as Apple's --refiner-version:
  OUT/<attention>/packages/Stable_Diffusion_version_<base>_refiner.mlpackage
(with --chunk-unet also _refiner_chunk1/2); only the refiner's Unet is read, and
--components refiner converts it alone.
--format compiled also writes OUT/<attention>/compiled/*.mlmodelc with Apple's compiler
(macOS with Xcode only).

\b
--controlnet CN_SRC (repeatable; a diffusers ControlNet folder or a Hub repo id) writes
the Unet that takes ControlNet residuals instead of the plain one, and each ControlNet:
  OUT/<attention>/packages/..._control-unet.mlpackage     (compiled: ControlledUnet.mlmodelc)
  OUT/<attention>/packages/ControlNet_<org>_<name>.mlpackage  (compiled: controlnet/<Name>.mlmodelc)
as Apple's converter names them. A ControlNet made for another base model is refused
before anything converts.""",
)
@click.argument("source")
@click.option("-o", "--out", "out_dir", required=True, type=click.Path(file_okay=False), help="Output folder.")
@click.option("--attention", type=click.Choice(ATTENTIONS), default=None,
              help="Attention implementation in the Unet [default: split_einsum; SD3: original].")
@click.option("--precision", type=click.Choice(("fp16", "fp32")), default="fp16", show_default=True,
              help="Compute precision (and input dtype of the Unet, VAE and safety checker).")
@click.option("--chunk-unet", is_flag=True, help="Also write the Unet as two chunks (unet_chunk1, unet_chunk2).")
@click.option("--unet-batch-one", is_flag=True, help="Unet batch 1 (call it twice for guidance) instead of 2.")
@click.option("--quantize-nbits", type=click.Choice(("2", "4", "6", "8")), default=None,
              help="Palettize text encoder and Unet weights to N-bit look-up tables.")
@click.option("--latent-size", nargs=2, type=int, metavar="H W", default=None,
              help="Latent height and width (pixels are 8x); default: the Unet's sample_size.")
@click.option("--components", metavar="LIST", default=None,
              help=f"Comma-separated subset of: {','.join(COMPONENT_NAMES)} (default: all the pipeline has, "
                   "and the --controlnet ones).")
@click.option("--controlnet", "controlnets", multiple=True, metavar="CN_SRC",
              help="A ControlNet to convert (diffusers folder or Hub repo id); repeatable. The Unet then takes "
                   "their residuals.")
@click.option("--model-version", metavar="ORG/NAME", default=None,
              help="Model id that names the packages (default: the repo id, or the folder's name).")
@click.option("--revision", metavar="REV", default=None, help="Branch, tag or commit of a Hub SOURCE.")
@click.option("--refiner", "refiner", metavar="REFINER_SOURCE", default=None,
              help="An SDXL refiner (folder or repo id) whose Unet to convert beside the SDXL base.")
@click.option("--format", "fmt", type=click.Choice(("packages", "compiled")), default="packages", show_default=True,
              help="compiled: also compile to .mlmodelc (macOS with Xcode).")
@click.option("--json", "json_mode", is_flag=True, help="Print the result as JSON.")
@click.option("-q", "--quiet", is_flag=True, help="No progress; print only the output folder.")
def convert_cmd(source: str, out_dir: str, attention: str | None, precision: str, chunk_unet: bool, unet_batch_one: bool,
                quantize_nbits: str | None, latent_size: tuple[int, int] | None, components: str | None,
                model_version: str | None, revision: str | None, refiner: str | None, fmt: str, json_mode: bool,
                quiet: bool, controlnets: tuple[str, ...] = ()) -> None:
    """Convert a diffusers Stable Diffusion pipeline (SD 1.x/2.x, SDXL, SD3) to Core ML."""
    from ..convert import convert

    out = Output(json_mode=json_mode, quiet=quiet)
    result = convert(
        source,
        out_dir,
        attention=attention,
        precision=precision,
        chunk_unet=chunk_unet,
        unet_batch_one=unet_batch_one,
        quantize_nbits=int(quantize_nbits) if quantize_nbits else None,
        latent_size=tuple(latent_size) if latent_size else None,
        components=components,
        model_version=model_version,
        progress=not (quiet or json_mode) and stderr_is_tty(),  # bars on a terminal; plain lines in logs
        format=fmt,
        revision=revision,
        controlnets=controlnets,
        refiner=refiner,
        on_message=None if quiet or json_mode else out.info,
    )
    for note in result.notes:
        out.warn(note)
    if json_mode:
        out.json(result.to_dict())
        return
    if quiet:
        click.echo(str(result.out))
        return
    rows = [
        {"component": c.name, "size": c.size_bytes, "file": str(c.path.relative_to(result.out))}
        for c in result.components
    ]
    out.table(rows, [Column("component", "component"), Column("size", "size", human_size), Column("file", "file")])
    h, w = result.image_size
    out.info(
        f"Converted {result.model_version} ({result.attention}, {result.precision}, {w}x{h}) "
        f"in {result.seconds:.1f} s -> {result.out}"
    )
