"""`coreml-hub predict`: run any Core ML model (ML Program) once on given inputs."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from .output import Column, Output

if TYPE_CHECKING:
    from ..prediction import Prediction


def _parse_inputs(values: tuple[str, ...]) -> dict[str, str]:
    inputs: dict[str, str] = {}
    for item in values:
        name, sep, value = item.partition("=")
        name = name.strip()
        if not sep or not name or not value:
            raise click.BadParameter(f"{item!r} is not NAME=VALUE.", param_hint="--input")
        if name in inputs:
            raise click.BadParameter(f"input {name!r} is given twice.", param_hint="--input")
        inputs[name] = value
    return inputs


@click.command(
    "predict",
    epilog="""\b
Examples:
  coreml-hub predict Classifier.mlpackage --input image=cat.jpg
  coreml-hub predict ./Model.mlmodelc --input x=x.npy --input scale=0.5 --output-dir out/
  coreml-hub predict apple/coreml-stable-diffusion-v1-5:original/compiled --component vae_decoder \\
      --input z=latents.npy --output-dir out/ --json
  coreml-hub predict Decoder.mlpackage --input token=[42] --state-in s.npz --state-out s.npz
  coreml-hub predict Multi.mlpackage --function decode --input x=[1,2,3]

\b
TARGET is a bundle (.mlpackage or .mlmodelc), a folder holding bundles (--component
names one), or a pulled MODEL[:VARIANT]. VALUE is a .npy or .npz file (the array named
NAME, or its only array), an image file (for image inputs), or a JSON number or list
(a flat list fills the input's shape). Optional inputs may be left out.
Prints each output's name, dtype, shape and a summary (the top 5 classes of a
classifier); --output-dir writes arrays as NAME.npy, images as NAME.png, labels and
probabilities as NAME.json. Stateful models start from zeros, or from --state-in.""",
)
@click.argument("target", metavar="TARGET")
@click.option("-i", "--input", "inputs", multiple=True, metavar="NAME=VALUE", help="An input (repeat for each).")
@click.option("--component", default=None, metavar="NAME", help="Which bundle of a folder or variant (e.g. unet).")
@click.option("--function", "function", default=None, metavar="NAME",
              help="Which function of a multifunction model (default: the model's default).")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda", "mps"]), default="auto", show_default=True,
              help="Where to run (fp16 programs run in fp16 on GPUs).")
@click.option("--state-in", type=click.Path(path_type=Path, dir_okay=False), default=None,
              help="Stateful models: start from the states in this .npz (as --state-out writes it).")
@click.option("--state-out", type=click.Path(path_type=Path, dir_okay=False), default=None,
              help="Stateful models: write the states after the prediction to this .npz.")
@click.option("-o", "--output-dir", type=click.Path(path_type=Path, file_okay=False), default=None,
              help="Write every output to this folder.")
@click.option("--json", "json_mode", is_flag=True, help="Print the outputs' summaries and the timings as JSON.")
@click.option("-q", "--quiet", is_flag=True, help="Print only the output names (and nothing on stderr).")
def predict_cmd(target: str, inputs: tuple[str, ...], component: str | None, function: str | None, device: str,
                state_in: Path | None, state_out: Path | None, output_dir: Path | None, json_mode: bool,
                quiet: bool) -> None:
    """Run a Core ML model (ML Program) on the given inputs and show its outputs."""
    from ..prediction import predict

    out = Output(json_mode=json_mode, quiet=quiet)
    result = predict(target, _parse_inputs(inputs), component=component, function=function, device=device,
                     state_in=state_in, state_out=state_out, output_dir=output_dir)
    if json_mode:
        out.json(result.to_dict())
        return
    _render(out, result, saved=output_dir is not None)


def _render(out: Output, result: Prediction, saved: bool) -> None:
    rows = [{"name": o.name, "dtype": o.dtype, "shape": _shape(o.shape, o.kind), "summary": o.summary,
             "path": str(o.path) if o.path else "-"} for o in result.outputs]
    columns = [Column("name", "output"), Column("dtype", "dtype"), Column("shape", "shape"),
               Column("summary", "summary")]
    if saved:
        columns.append(Column("path", "file"))
    out.table(rows, columns)
    function = f", function {result.function}" if result.function != "main" else ""
    out.info(f"Ran {result.bundle.name}{function} on {result.device}: loaded in {_seconds(result.load_seconds)}, "
             f"predicted in {_seconds(result.predict_seconds)}.")
    if result.state_out:
        out.info(f"States written to {result.state_out}.")


def _shape(shape: Any, kind: str) -> str:
    if shape is None:
        return "-"
    if kind == "image":
        return f"{shape[1]}x{shape[0]}"
    if kind == "probabilities":
        return f"{shape[0]} classes"
    return "[" + ", ".join(str(d) for d in shape) + "]"


def _seconds(value: float) -> str:
    return f"{value * 1000:.0f} ms" if value < 1 else f"{value:.1f} s"
