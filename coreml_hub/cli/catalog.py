"""`coreml-hub list` and `coreml-hub show`: what the Hub (or a mirror) offers."""

from __future__ import annotations

import shlex
from typing import TYPE_CHECKING

import click

from ..errors import UsageError
from .output import Column, Output, human_count, human_size, plural, relative_time

if TYPE_CHECKING:
    from ..layouts import Variant

FILTER_KEYS = ("library", "author", "pipeline_tag", "tag")
DEFAULT_LIBRARY = "coreml"


def parse_filters(raw: tuple[str, ...]) -> dict[str, list[str]]:
    """`key=value` pairs -> {key: [values]}; a malformed pair is a usage error."""
    parsed: dict[str, list[str]] = {}
    for item in raw:
        key, sep, value = item.partition("=")
        key, value = key.strip().replace("-", "_"), value.strip()
        if not sep or not key or not value:
            raise UsageError(f"Bad filter {item!r}: expected KEY=VALUE.",
                             hint=f"For example --filter library=coreml; keys: {', '.join(FILTER_KEYS)}.")
        if key not in FILTER_KEYS:
            raise UsageError(f"Unknown filter key {key!r} in {item!r}.",
                             hint=f"Use one of: {', '.join(FILTER_KEYS)} (e.g. --filter tag=stable-diffusion).")
        parsed.setdefault(key, []).append(value)
    return parsed


def _single(parsed: dict[str, list[str]], key: str, also: str | None = None) -> str | None:
    values = list(dict.fromkeys(parsed.get(key, []) + ([also] if also else [])))
    if len(values) > 1:
        raise UsageError(f"Only one {key} can be searched at a time (got {', '.join(values)}).",
                         hint=f"Run `coreml-hub list` once per {key}.")
    return values[0] if values else None


def _variant_count(variants: list[str]) -> str:
    return str(len(variants))


def _pulled_cell(pulled: list[str]) -> str:
    return ", ".join(pulled) if len(pulled) <= 2 else f"{len(pulled)} variants"


LIST_COLUMNS = [
    Column("repo_id", "REPO"),
    Column("variants", "VARIANTS", _variant_count),
    Column("pulled", "PULLED", lambda v: _pulled_cell(v) or "-"),
    Column("likes", "LIKES", human_count),
    Column("downloads", "DOWNLOADS", human_count),
    Column("last_modified", "UPDATED", relative_time),
]


@click.command(
    "list",
    epilog="""\b
Examples:
  coreml-hub list                                   # Core ML models (library=coreml)
  coreml-hub list --author apple --sort likes
  coreml-hub list --filter tag=stable-diffusion-xl --limit 5
  coreml-hub list --search anything --json
  coreml-hub list --local                           # models pulled to this machine

\b
Without --filter, --search or --author the search is limited to library=coreml, so
the list shows Core ML models; pass any of them to search beyond that.
Filter keys: library, author, pipeline_tag, tag (repeat --filter to combine).
VARIANTS counts the runnable forms found in each repo's files (attention x format for
diffusion pipelines, one per model bundle in plain Core ML repos); PULLED names the
variants already in the local store (`coreml-hub ls`, `coreml-hub du`).""",
)
@click.option("--filter", "filters", multiple=True, metavar="KEY=VALUE",
              help="library=, author=, pipeline_tag= or tag=; repeatable.")
@click.option("--search", help="Text the repo id must contain.")
@click.option("--author", help="Only repos of this user or organization.")
@click.option("--sort", type=click.Choice(["likes", "downloads", "updated"]), default="downloads", show_default=True)
@click.option("--limit", type=click.IntRange(1, 1000), default=20, show_default=True)
@click.option("--local", is_flag=True, help="List models pulled to this machine instead of searching.")
@click.option("--json", "json_mode", is_flag=True, help="One JSON record per repo (raw numbers, ISO-8601 dates).")
@click.option("-q", "--quiet", is_flag=True, help="Print repo ids only.")
def list_cmd(filters: tuple[str, ...], search: str | None, author: str | None, sort: str, limit: int,
             local: bool, json_mode: bool, quiet: bool) -> None:
    """Search the Hub for Core ML diffusion models, with the variants each repo offers."""
    out = Output(json_mode=json_mode, quiet=quiet)
    if local:
        if filters or search or author:
            raise UsageError("--local lists pulled models and takes no search options.",
                             hint="Drop --filter/--search/--author, or drop --local to search the Hub.")
        _list_local(json_mode, quiet)
        return
    parsed = parse_filters(filters)
    author = _single(parsed, "author", author)
    pipeline_tag = _single(parsed, "pipeline_tag")
    tags = parsed.get("library", []) + parsed.get("tag", [])
    if not filters and not search and not author:
        tags = [DEFAULT_LIBRARY]

    from ..hub import search_models

    models = search_models(filter=tags, search=search, author=author, pipeline_tag=pipeline_tag, sort=sort,
                           limit=limit)
    rows = [m.to_dict() for m in models]
    from ..store import list_pulled

    pulled: dict[str, list[str]] = {}
    for p in list_pulled():
        pulled.setdefault(p.repo.lower(), []).append(f"{p.variant}{p.form_flag}")
    for row in rows:
        row["pulled"] = sorted(set(pulled.get(row["repo_id"].lower(), [])))
    if not rows and not json_mode:
        out.info("No models found.")
        return
    out.table(rows, LIST_COLUMNS)


def _list_local(json_mode: bool, quiet: bool) -> None:
    """Same output as `coreml-hub ls`: the store owns how pulled models are shown."""
    from .store_cmds import ls_cmd

    click.get_current_context().invoke(ls_cmd, repo=None, json_mode=json_mode, quiet=quiet)


def pull_command(repo_id: str, variant_id: str, revision: str | None = None) -> str:
    """The exact command that pulls one variant."""
    parts = ["coreml-hub", "pull", repo_id, "--variant", variant_id]
    if revision:
        parts += ["--revision", revision]
    return shlex.join(parts)


def _form_sizes(variant: Variant) -> dict[str, int]:
    common = sum(f.size for f in variant.common_files)
    return {form: common + sum(f.size for f in variant.unet_files[form]) for form in variant.unet_forms}


def _unet_cell(variant: Variant) -> str:
    forms = list(variant.unet_forms)
    if variant.unet_form in forms:
        forms.remove(variant.unet_form)
        forms.insert(0, variant.unet_form)
    return ", ".join(forms) or "-"


SHOW_COLUMNS = [
    Column("id", "VARIANT"),
    Column("size_bytes", "SIZE", human_size),
    Column("attention", "ATTENTION"),
    Column("format", "FORMAT"),
    Column("resolution", "RESOLUTION", lambda v: v or "-"),
    Column("tags", "TAGS", lambda v: ",".join(v) or "-"),
    Column("unet", "UNET"),
    Column("components", "COMPONENTS", lambda v: ", ".join(v)),
]
CONTROLNET_COLUMNS = [
    Column("name", "CONTROLNET"),
    Column("size_bytes", "SIZE", human_size),
    Column("format", "FORMAT"),
    Column("attention", "ATTENTION", lambda v: v or "-"),
    Column("resolution", "RESOLUTION", lambda v: v or "-"),
    Column("beside", "BESIDE"),
]


# Single-model variants (plain Core ML repos) have no attention, resolution or Unet: show the bundle instead.
MODEL_SHOW_COLUMNS = [
    Column("id", "VARIANT"),
    Column("size_bytes", "SIZE", human_size),
    Column("format", "FORMAT"),
    Column("tags", "TAGS", lambda v: ",".join(v) or "-"),
    Column("root", "BUNDLE"),
    Column("companions", "WITH", lambda v: ", ".join(v) or "-"),
]


@click.command(
    "show",
    epilog="""\b
Examples:
  coreml-hub show apple/coreml-stable-diffusion-v1-5
  coreml-hub show apple/coreml-stable-diffusion-xl-base --json
  coreml-hub show coreml-community/coreml-anything-v3.0 --revision main

\b
SIZE is what a pull downloads. UNET lists the Unet forms a variant offers,
the one pulled by default first (full Unet, or UnetChunk1 + UnetChunk2).
A `controlnet` component means the variant's Unet takes ControlNet residuals.
The repo's ControlNets (never part of a variant) are listed after the variants,
each with the folder it sits beside; `pull --controlnet NAME` fetches one.
In a plain Core ML repo every bundle is a variant: BUNDLE is its path in the repo,
TAGS its precision and compression, WITH the companion files (tokenizer, config,
labels) pulled with it.""",
)
@click.argument("repo")
@click.option("--revision", help="Branch or commit sha (default: main).")
@click.option("--json", "json_mode", is_flag=True, help="The repo and every variant as JSON.")
def show_cmd(repo: str, revision: str | None, json_mode: bool) -> None:
    """Show a repo's variants: size, components, attention, format, and the command that pulls each."""
    from ..hub import no_variants, repo_variants

    from ..layouts import find_controlnets

    snapshot, variants = repo_variants(repo, revision)
    controlnets = find_controlnets(list(snapshot.files))
    if not variants and not controlnets:
        raise no_variants(snapshot)
    out = Output(json_mode=json_mode)
    records = []
    for v in variants:
        record = v.to_dict()
        record["unet"] = _unet_cell(v)
        record["unet_form_sizes"] = _form_sizes(v)
        record["pull_command"] = pull_command(snapshot.repo_id, v.id, revision)
        if v.kind == "model":
            record["companions"] = list(v.extra.get("companions") or ())
        records.append(record)
    if json_mode:
        doc = snapshot.to_dict()
        doc.pop("files")
        doc["file_count"] = len(snapshot.files)
        doc["variants"] = [{k: r[k] for k in r if k != "unet"} for r in records]
        doc["controlnets"] = [c.to_dict() for c in controlnets]
        out.json(doc)
        return
    updated = relative_time(snapshot.last_modified) if snapshot.last_modified else "-"
    counts = [plural(len(variants), "variant")] + ([plural(len(controlnets), "ControlNet")] if controlnets else [])
    click.echo(f"{snapshot.repo_id} @ {snapshot.revision} (commit {snapshot.sha[:7]}), updated {updated}, "
               f"{', '.join(counts)}")
    if records:
        click.echo()
        single_models = all(v.kind == "model" for v in variants)
        out.table(records, MODEL_SHOW_COLUMNS if single_models else SHOW_COLUMNS)
    if controlnets:
        click.echo()
        out.table([{**c.to_dict(), "beside": c.folder or ("-" if c.archive else "(root)")} for c in controlnets],
                  CONTROLNET_COLUMNS)
    click.echo()
    click.echo("Pull with:")
    for record in records:
        click.echo(f"  {record['pull_command']}")
    if controlnets:
        name = controlnets[0].name
        with_cn = next((v for v in variants if "controlnet" in v.components), None)
        if with_cn is not None:
            click.echo(f"  {pull_command(snapshot.repo_id, with_cn.id, revision)} --controlnet {shlex.quote(name)}")
        else:
            click.echo(f"  coreml-hub pull MODEL --controlnet {shlex.quote(f'{snapshot.repo_id}:{name}')}"
                       "   # into a variant whose Unet takes ControlNet residuals")
    if snapshot.gated:
        out.info(f"Note: {snapshot.repo_id} is gated; pulling it needs HF_TOKEN for an account that was granted access.")
