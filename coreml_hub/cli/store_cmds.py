"""`pull`, `ls`, `rm` and `cache`: the local store from the command line."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from ..errors import UsageError
from .output import Column, Output, human_size, plural, relative_time, stderr_is_tty

if TYPE_CHECKING:
    from ..pulling import PlannedFile, PullPlan
    from ..store import PulledVariant


@click.command(
    "pull",
    epilog="""\b
Examples:
  coreml-hub pull apple/coreml-stable-diffusion-v1-5 --variant split_einsum/compiled
  coreml-hub pull apple/coreml-stable-diffusion-v1-5:original/packages --chunked
  coreml-hub pull coreml-community/coreml-anything-v3.0 --variant original/512x768/anything_original_512x768.zip
  coreml-hub pull apple/coreml-stable-diffusion-2-1-base --dry-run --json
  coreml-hub pull ORG/SD15-WITH-CONTROLNETS --controlnet LllyasvielSdControlnetCanny
  coreml-hub pull coreml-community/coreml-stable-diffusion-v1-5_cn --variant split_einsum/compiled+cn \\
      --controlnet coreml-community/ControlNet-Models-For-Core-ML:Canny
  coreml-hub pull apple/coreml-depth-anything-v2-small --variant DepthAnythingV2SmallF16

\b
Default variant (no --variant, several in the repo):
  macOS with native Core ML: split_einsum attention (Neural Engine), then split_einsum_v2,
    then original; compiled before packages.
  elsewhere (portable torch runtime): original attention (fuses into one attention kernel),
    then split_einsum, then split_einsum_v2; compiled before packages (a compiled variant
    carries its own tokenizer).
  Then untagged before tagged, default resolution first, smaller download first;
  a partial variant (a lone Unet) is never the default.
  Single models (plain Core ML repos: one variant per bundle): fp32 first on a CPU,
    fp16 first on a GPU or with Core ML; quantized ones last.
The full Unet is fetched unless --chunked is given or the variant only ships chunks.
Packages variants also get the tokenizer and scheduler config files (never weights) of the
PyTorch model they were converted from, named by the files or by --model-version.

\b
ControlNets are never fetched with a variant. --controlnet NAME (repeatable) adds one to
the variant's store entry, only its files: NAME as `coreml-hub show` lists it (case and
separators do not matter; `Canny` picks the archive that fits the variant's attention
and size), from the model's repo or from another one as REPO:NAME. The variant's Unet
must take ControlNet residuals (a ControlledUnet).

\b
An interrupted pull resumes where it stopped. A pulled variant is fetched again only with
--force. Environment: HF_ENDPOINT, HF_TOKEN, HF_HUB_OFFLINE (answer from the store),
COREML_HUB_HOME, COREML_HUB_DOWNLOAD_WORKERS (files at once, 4), COREML_HUB_DOWNLOAD_SEGMENTS
(connections per large file, 4), COREML_HUB_DOWNLOAD_RETRIES (5), COREML_HUB_RETRY_WAIT
(first backoff, 1 s).""",
)
@click.argument("model")
@click.option("--variant", "variant", metavar="ID", help="Variant id, or its folder, bundle or archive path in the repo.")
@click.option("--revision", metavar="REV", help="Branch, tag or commit (default: main).")
@click.option("--force", is_flag=True, help="Download again even if the store holds the variant.")
@click.option("--dry-run", is_flag=True, help="Print the files and bytes it would fetch; fetch nothing.")
@click.option("--chunked/--no-chunked", default=None, help="Take the two Unet chunks / the full Unet.")
@click.option("--model-version", metavar="ORG/NAME", help="PyTorch model to take tokenizer files from (packages).")
@click.option("--keep-archive", is_flag=True, help="Keep the zip of an archive variant next to its files.")
@click.option("--controlnet", "controlnets", multiple=True, metavar="NAME",
              help="Also fetch this ControlNet (NAME or REPO:NAME) into the variant; repeatable.")
@click.option("--json", "json_mode", is_flag=True, help="Print one JSON record.")
@click.option("-q", "--quiet", is_flag=True, help="No progress, print only the path.")
def pull_cmd(model: str, variant: str | None, revision: str | None, force: bool, dry_run: bool,
             chunked: bool | None, model_version: str | None, keep_archive: bool, json_mode: bool,
             quiet: bool, controlnets: tuple[str, ...] = ()) -> None:
    """Download one variant of MODEL (ORG/NAME[@REVISION][:VARIANT]) into the local store."""
    from ..pulling import describe_choice, plan_pull, plan_variant_controlnets

    out = Output(json_mode=json_mode, quiet=quiet)
    plan = plan_pull(model, variant=variant, revision=revision, force=force, chunked=chunked,
                     model_version=model_version, keep_archive=keep_archive)
    cn_plans = plan_variant_controlnets(plan, controlnets) if controlnets else []
    choice = describe_choice(plan)
    if choice and not json_mode:
        out.info(choice)
    for warning in plan.warnings:
        out.warn(warning)
    if dry_run:
        _print_plan(out, plan, cn_plans)
        return
    if plan.offline:
        out.info(f"HF_HUB_OFFLINE is set: using {plan.repo}:{plan.variant.id} from the store.")
    show = not quiet and not json_mode and stderr_is_tty()
    waited = []

    def on_wait() -> None:
        waited.append(True)
        out.info(f"Waiting for another coreml-hub process pulling {plan.repo}:{plan.variant.id}...")

    result = plan.execute(progress=show, on_phase=(out.info if show else (lambda msg: None)), on_wait=on_wait)
    pulled_cns = []
    if controlnets:
        from ..controlnets import pull_controlnets

        pulled_cns = pull_controlnets(result.path, controlnets, progress=show, force=force, plans=cn_plans)
    if json_mode:
        record = result.to_dict()
        if controlnets:
            record["controlnets"] = [c.to_dict() for c in pulled_cns]
        out.json(record)
        return
    if result.already_present:
        out.info(f"{result.repo}:{result.variant} is already pulled ({human_size(result.size)}).")
    else:
        out.info(f"Pulled {result.repo}:{result.variant} ({result.files} files, {human_size(result.size)}; "
                 f"{human_size(result.bytes_downloaded)} downloaded in {result.seconds:.1f} s).")
    for cn in pulled_cns:
        where = cn.path.relative_to(result.path)
        if cn.already_present:
            out.info(f"ControlNet {cn.name} is already in the variant ({where}).")
        else:
            out.info(f"Pulled ControlNet {cn.name} from {cn.repo} into {where} ({human_size(cn.size)}; "
                     f"{human_size(cn.bytes_downloaded)} downloaded).")
    click.echo(str(result.path))


def _file_state(plan: PullPlan, f: PlannedFile) -> str:
    if not plan.needs_download or (f.size and f.present == f.size):
        return "have"
    return "partial" if 0 < f.present < f.size else "fetch"


def _print_plan(out: Output, plan: PullPlan, controlnets: list[Any] = ()) -> None:  # type: ignore[assignment]
    if out.json_mode:
        record = plan.to_dict()
        if controlnets:
            record["controlnets"] = [c.to_dict() for c in controlnets]
        out.json(record)
        return
    rows = [{"path": f.path, "size": f.size, "repo": f.repo, "state": _file_state(plan, f)} for f in plan.all_files]
    rows += [{"path": f.path, "size": f.size, "repo": c.repo, "state": "fetch"} for c in controlnets
             for f in c.entry.files]
    if not out.quiet:
        click.echo(f"{plan.repo}:{plan.variant.id} @ {plan.commit[:12]}"
                   + (f" (Unet: {plan.variant.unet_form})" if plan.variant.unet_form else ""))
    out.table(rows, [Column("path", "File"), Column("size", "Size", human_size), Column("state", "State"),
                     Column("repo", "Repo")])
    if not out.quiet:
        if not plan.needs_download:
            click.echo(f"Already pulled: {plan.path}. Nothing to download (use --force to download again).")
        else:
            click.echo(f"Would download {human_size(plan.download_bytes)} of {human_size(plan.total_bytes)} "
                       f"({len(plan.all_files)} files) into {plan.path}.")
        for cn in controlnets:
            click.echo(f"ControlNet {cn.entry.name} from {cn.repo}: {human_size(cn.entry.size_bytes)} "
                       f"({len(cn.entry.files)} files) into {cn.dest} unless the variant already has it.")


LS_COLUMNS = [
    Column("model", "Model"),
    Column("variant", "Variant"),
    Column("unet", "Unet"),  # full or chunked: `--chunked` names the second form in rm, verify and run
    Column("size_bytes", "Size", human_size),
    Column("pulled_at", "Pulled", relative_time),
    Column("status", "Status"),
]


def ls_rows(pulled: list[PulledVariant]) -> list[dict[str, Any]]:
    """Rows for `ls` / `list --local`; the commit shows only where one repo has several."""
    commits: dict[str, set[str]] = {}
    for p in pulled:
        commits.setdefault(p.repo, set()).add(p.commit)
    rows = []
    for p in pulled:
        row = p.to_dict()
        row["model"] = p.repo if len(commits[p.repo]) == 1 else f"{p.repo}@{p.commit[:7]}"
        row["unet"] = p.unet
        rows.append(row)
    return rows


@click.command(
    "ls",
    epilog="""\b
Examples:
  coreml-hub ls
  coreml-hub ls --json
  coreml-hub ls apple/coreml-stable-diffusion-v1-5

\b
UNET is the form of the Unet pulled: full, or chunked (UnetChunk1 + UnetChunk2, pulled with
--chunked). Both forms of one variant can be pulled; `--chunked` / `--no-chunked` picks one
in rm, verify and run.""",
)
@click.argument("repo", required=False)
@click.option("--json", "json_mode", is_flag=True, help="Print JSON.")
@click.option("-q", "--quiet", is_flag=True, help="Print model ids only.")
def ls_cmd(repo: str | None, json_mode: bool, quiet: bool) -> None:
    """List pulled models: MODEL, VARIANT, UNET, SIZE, PULLED, STATUS (same as `list --local`)."""
    from ..store import list_pulled

    out = Output(json_mode=json_mode, quiet=quiet)
    pulled = list_pulled(repo)
    if json_mode:
        out.json([p.to_dict() for p in pulled])
        return
    if quiet:
        for p in pulled:
            click.echo(f"{p.repo}:{p.variant}")
        return
    if not pulled:
        others = list_pulled() if repo else []
        if others:
            models = len({p.repo for p in others})
            out.info(f"{repo} is not pulled; {plural(models, 'other model')} {'is' if models == 1 else 'are'} "
                     f"(`coreml-hub ls` lists them). Pull it with `coreml-hub pull {repo}`.")
        else:
            out.info("Nothing pulled yet. Pull a model with `coreml-hub pull ORG/NAME`.")
        return
    out.table(ls_rows(pulled), LS_COLUMNS)


@click.command(
    "rm",
    epilog="""\b
Examples:
  coreml-hub rm apple/coreml-stable-diffusion-v1-5                  # every pulled variant
  coreml-hub rm apple/coreml-stable-diffusion-v1-5:split_einsum/compiled -y
  coreml-hub rm apple/coreml-stable-diffusion-v1-5:original/compiled --chunked   # the chunked Unet form only
  coreml-hub rm apple/coreml-stable-diffusion-v1-5@abc1234 --dry-run   # one commit""",
)
@click.argument("model")
@click.option("--variant", metavar="ID", help="Only this variant.")
@click.option("--revision", metavar="REV", help="Only the commit this revision or commit prefix names.")
@click.option("--chunked/--no-chunked", default=None,
              help="Only the chunked / the full Unet form (default: both, when both are pulled).")
@click.option("-y", "--yes", is_flag=True, help="Do not ask.")
@click.option("--dry-run", is_flag=True, help="Show what would be removed.")
@click.option("--json", "json_mode", is_flag=True, help="Print JSON.")
def rm_cmd(model: str, variant: str | None, revision: str | None, chunked: bool | None, yes: bool, dry_run: bool,
           json_mode: bool) -> None:
    """Remove pulled variants of MODEL (ORG/NAME[@REVISION][:VARIANT]) from the store."""
    from ..store import remove

    out = Output(json_mode=json_mode)
    planned = remove(model, variant=variant, revision=revision, chunked=chunked, dry_run=True)
    entries, total = list(planned.entries), planned.bytes_freed
    if not json_mode:
        out.table(ls_rows(entries), LS_COLUMNS[:4] + [Column("path", "Path")])
    if dry_run:
        if json_mode:
            out.json(planned.to_dict())
        else:
            click.echo(f"Would remove {len(entries)} variant(s), freeing {human_size(total)}.")
        return
    if not yes:
        if not sys.stdin.isatty():
            raise UsageError(f"Removing {len(entries)} variant(s) ({human_size(total)}) needs confirmation.",
                             hint="Pass -y to remove without asking, or --dry-run to see what would go.")
        click.confirm(f"Remove {len(entries)} variant(s), freeing {human_size(total)}?", abort=True, err=True)
    result = remove(model, variant=variant, revision=revision, chunked=chunked)
    if json_mode:
        out.json(result.to_dict())
    else:
        click.echo(f"Removed {len(result.entries)} variant(s), freed {human_size(result.bytes_freed)}.")


@click.command(
    "du",
    epilog="""\b
Examples:
  coreml-hub du
  coreml-hub du --json

\b
SIZE is what each model's pulled variants (every commit, both Unet forms) take on disk;
PRUNABLE is what `coreml-hub cache prune` would free of it (interrupted downloads, refs to
removed commits, leftover folders). Remove a model with `coreml-hub rm MODEL`.""",
)
@click.option("--json", "json_mode", is_flag=True, help="Print JSON.")
@click.option("-q", "--quiet", is_flag=True, help="Print the total in bytes only.")
def du_cmd(json_mode: bool, quiet: bool) -> None:
    """Disk space by model, and what `cache prune` would free."""
    from ..store import disk_usage

    out = Output(json_mode=json_mode, quiet=quiet)
    usage = disk_usage()
    if json_mode:
        out.json(usage.to_dict())
        return
    if quiet:
        click.echo(str(usage.size + usage.prunable))
        return
    if usage.repos:
        out.table([r.to_dict() for r in usage.repos], [
            Column("repo", "Model"), Column("variants", "Variants"), Column("size_bytes", "Size", human_size),
            Column("prunable_bytes", "Prunable", lambda n: human_size(n) if n else "-")])
    models = sum(1 for r in usage.repos if r.variants)
    line = f"{human_size(usage.size)} in {plural(models, 'pulled model')} under {usage.home}"
    if usage.prunable:
        line += f"; `coreml-hub cache prune` would free {human_size(usage.prunable)} more."
    else:
        line += "; nothing to prune."
    out.info(line)


@click.group("cache", epilog="""\b
Examples:
  coreml-hub cache path
  coreml-hub cache prune --dry-run
  coreml-hub cache prune""")
def cache_group() -> None:
    """Manage the local store (COREML_HUB_HOME, else the user cache dir)."""


@cache_group.command("path")
def cache_path_cmd() -> None:
    """Print the store's folder."""
    from ..paths import home

    click.echo(str(home()))


@cache_group.command("prune")
@click.option("--dry-run", is_flag=True, help="Show what would be removed.")
@click.option("--json", "json_mode", is_flag=True, help="Print JSON.")
def cache_prune_cmd(dry_run: bool, json_mode: bool) -> None:
    """Remove interrupted downloads no process is using, refs to removed commits and empty folders.

    Pulled variants are never touched; remove those with `coreml-hub rm`.
    """
    from ..paths import home
    from ..store import prune

    out = Output(json_mode=json_mode)
    result = prune(dry_run=dry_run)
    if json_mode:
        out.json(result.to_dict())
        return
    root = home()
    rows = [{"kind": i.kind, "size_bytes": i.size, "path": _rel(i.path, root)} for i in result.items]
    if rows:
        out.table(rows, [Column("kind", "Kind"), Column("size_bytes", "Size", human_size), Column("path", "Path")])
    for skipped in result.skipped_locked:
        out.info(f"Skipped {_rel(skipped, root)}: a running pull holds it.")
    if not result.items:
        out.info("Nothing to prune: no interrupted downloads, stale refs or empty folders"
                 + (" (a running pull holds what is in staging)." if result.skipped_locked else "."))
        return
    verb = "Would free" if dry_run else "Freed"
    click.echo(f"{verb} {human_size(result.bytes_freed)} ({plural(len(result.items), 'item')}).")


def _rel(path: Path, root: Path) -> str:
    return path.relative_to(root).as_posix() if path.is_relative_to(root) else str(path)
