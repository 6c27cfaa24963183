"""`verify` and `inspect`: check a variant or bundle; show what a bundle holds."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import click

from .output import Column, Output, format_table, human_size, plural, stderr_is_tty

if TYPE_CHECKING:
    from ..bundle import Inspection, Port, VerifyReport


@click.command(
    "verify",
    epilog="""\b
Examples:
  coreml-hub verify apple/coreml-stable-diffusion-v1-5:split_einsum/compiled
  coreml-hub verify ./my-variant --hashes
  coreml-hub verify Unet.mlmodelc --json
  coreml-hub verify apple/coreml-stable-diffusion-v1-5:original/compiled --chunked

\b
TARGET is a pulled model (ORG/NAME[@REV][:VARIANT]), a variant folder, or one bundle
(.mlmodelc or .mlpackage). Checks: every bundle is complete and well formed (Manifest.json,
model spec, model.mil, metadata.json, each weight's blob header, dtype and size), the
components a Stable Diffusion variant needs are present and their shapes agree, and the
attention the bundles use matches the variant. --hashes also re-hashes every file against
the manifest recorded when it was pulled.
Exit status: 0 valid (warnings allowed), 1 problems found, 2 usage error.""",
)
@click.argument("target", metavar="TARGET")
@click.option("--hashes", is_flag=True, help="Also recompute every file's sha256 and compare with the pull manifest.")
@click.option("--chunked/--no-chunked", default=None,
              help="A pulled model's chunked / full Unet form, when both are pulled.")
@click.option("--json", "json_mode", is_flag=True, help="Print the report as JSON.")
@click.option("-q", "--quiet", is_flag=True, help="Print nothing; only the exit status tells.")
def verify_cmd(target: str, hashes: bool, chunked: bool | None, json_mode: bool, quiet: bool) -> None:
    """Check that a variant or a bundle is complete, well formed and consistent."""
    from ..bundle import verify

    out = Output(json_mode=json_mode, quiet=quiet)
    report = verify(target, hashes=hashes, chunked=chunked,
                    progress=hashes and not quiet and not json_mode and stderr_is_tty())
    _record_in_store(report)
    if json_mode:
        out.json(report.to_dict())
    elif not quiet:
        if report.problems:
            rows = [p.to_dict() for p in report.problems]
            out.table(rows, [Column("severity", "severity"), Column("path", "path"), Column("message", "problem")])
            for problem in report.problems:
                if problem.hint and problem.is_error:
                    out.info(f"Hint: {problem.hint}")
                    break
        summary = plural(len(report.components), "bundle")
        if report.attention:
            summary += f", {report.attention} attention"
        if report.hashed_files is not None:
            summary += f", {report.hashed_files} files hashed"
        if report.ok:
            warn = f" ({plural(len(report.warnings), 'warning')})" if report.warnings else ""
            out.info(f"Valid: {report.path} ({summary}){warn}.")
        else:
            out.info(f"Invalid: {report.path}: {plural(len(report.errors), 'error')}, "
                     f"{plural(len(report.warnings), 'warning')} ({summary}).")
    if not report.ok:
        raise click.exceptions.Exit(1)


def _record_in_store(report: VerifyReport) -> None:
    """A verified store entry remembers the result, so `ls` shows it."""
    from .. import paths, store

    path = report.path
    if report.kind != "variant" or not (path / store.MANIFEST_NAME).is_file():
        return
    if not path.resolve().is_relative_to(paths.models_dir().resolve()):
        return  # a folder outside the store keeps its manifest untouched
    errors = [f"{p.path}: {p.message}" for p in report.errors]
    try:
        store.record_validation(path, store.STATUS_OK if not errors else store.STATUS_INVALID, errors)
    except (OSError, ValueError):
        pass


@click.command(
    "inspect",
    epilog="""\b
Examples:
  coreml-hub inspect Unet.mlmodelc
  coreml-hub inspect Stable_Diffusion_version_runwayml_stable-diffusion-v1-5_text_encoder.mlpackage --json
  coreml-hub inspect VAEDecoder.mlmodelc --mil > vae_decoder.mil
  coreml-hub inspect apple/coreml-stable-diffusion-v1-5:split_einsum/compiled --component unet
  coreml-hub inspect ./converted --component vae_decoder    # the -o folder of `convert`
  coreml-hub inspect apple/coreml-depth-anything-v2-small:DepthAnythingV2SmallF16

\b
TARGET is one bundle (.mlmodelc or .mlpackage folder), or a variant with --component naming
one of its bundles: a variant folder, or a pulled model (ORG/NAME[@REV][:VARIANT]). A pulled
single-model variant (MODEL[:VARIANT] of a plain Core ML repo, or its folder in the store)
needs no --component.""",
)
@click.argument("target", metavar="TARGET")
@click.option("--component", metavar="NAME",
              help="The bundle of a variant to show: unet, text_encoder, vae_decoder, ... (or Unet.mlmodelc).")
@click.option("--chunked/--no-chunked", default=None,
              help="A pulled model's chunked / full Unet form, when both are pulled.")
@click.option("--mil", "mil", is_flag=True, help="Print the whole program as model.mil text instead of the summary.")
@click.option("--json", "json_mode", is_flag=True, help="Print as JSON (with --mil: the text under \"mil\").")
def inspect_cmd(target: str, component: str | None, chunked: bool | None, mil: bool, json_mode: bool) -> None:
    """Show a bundle's inputs, outputs, op histogram and weight bytes by dtype."""
    from ..bundle import component_path, inspect_bundle

    out = Output(json_mode=json_mode)
    info = inspect_bundle(component_path(target, component, chunked=chunked), mil=mil)
    if json_mode:
        out.json(info.to_dict())
    elif mil:
        click.echo(info.mil)
    else:
        _print_inspection(info)
    if info.problems:
        _fail_on(info)


def _fail_on(info: Inspection) -> None:
    """The summary is printed; damaged weights still make the command fail, naming the first."""
    from ..errors import InvalidBundle

    first = info.problems[0]
    more = f" (and {plural(len(info.problems) - 1, 'more problem')})" if len(info.problems) > 1 else ""
    raise InvalidBundle(f"{first.path}: {first.message}{more}.",
                        hint=f"`coreml-hub verify {info.path}` lists every problem. {first.hint or ''}".strip())


def _print_inspection(info: Inspection) -> None:
    functions = ", ".join(f"{name}<{opset}>" for name, opset in info.functions)
    click.echo(f"{info.path}  ({info.format}, program {info.program_version}, {functions}, "
               f"{human_size(info.size_bytes)} on disk)")
    for title, ports in (("Inputs", info.inputs), ("Outputs", info.outputs)):
        click.echo(f"\n{title}:")
        click.echo(_indent(_ports_table(ports)))
    click.echo(f"\nOps ({sum(info.ops.values())}):")
    rows = [{"op": op, "count": n} for op, n in info.ops.items()]
    click.echo(_indent(_table(rows, [Column("op", "op"), Column("count", "count")])))
    click.echo(f"\nWeights in files ({info.weight_count} blobs, {human_size(sum(info.weights.values()))}):")
    rows = [{"dtype": d, "bytes": human_size(b), "exact": b} for d, b in info.weights.items()]
    click.echo(_indent(_table(rows, [Column("dtype", "dtype"), Column("bytes", "size"), Column("exact", "bytes")])))


def _ports_table(ports: tuple[Port, ...]) -> str:
    rows = [{"name": p.name, "dtype": p.dtype, "shape": "?" if p.shape is None else
             "[" + ", ".join(str(d) for d in p.shape) + "]"} for p in ports]
    return _table(rows, [Column("name", "name"), Column("dtype", "dtype"), Column("shape", "shape")])


def _table(rows: list[dict[str, Any]], columns: list[Column]) -> str:
    return format_table(rows, columns) if rows else "(none)"


def _indent(text: str) -> str:
    return "\n".join("  " + line for line in text.splitlines())
