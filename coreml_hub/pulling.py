"""`pull`: resolve a repo and variant, plan what to fetch, then fetch, materialize, check and store it.

`plan_pull(...)` asks the Hub for the repo's file list (one metadata request) and returns a
`PullPlan`: the chosen variant, the files and bytes it needs, and whether the store already
holds it. `PullPlan.execute()` does the work under the store entry's lock:

    download (resumable, into staging) -> materialize (layout plugin: move or extract)
    -> tokenizer/scheduler files for packages variants -> structural check
    -> manifest -> one rename into models/

Default variant, when a repo has several and none is named:
  * on macOS with the native Core ML backend: split_einsum attention first (it runs on the
    Neural Engine), then split_einsum_v2, then original; compiled bundles before packages
    (they load without a compile step);
  * elsewhere (the portable torch backend): original attention first (plain attention fuses
    into one scaled-dot-product kernel; split_einsum's many small einsums are slower off the
    Neural Engine), then split_einsum, then split_einsum_v2; compiled before packages
    (a compiled variant carries its own tokenizer, so nothing is fetched from a second repo);
  * then variants without tags before tagged ones (quantized, ControlNet, no-i2i), the
    default resolution before explicit ones, and the smaller download; a partial variant
    (a lone Unet) is never the default.
Single-model variants (`kind` "model", plain Core ML repos) go by precision instead: full
precision (fp32) first where the model would run on a CPU, fp16 first where a GPU or Core ML
runs it (a CUDA build of PyTorch with an NVIDIA device, Apple's MPS, native Core ML); then
untagged names, then the other float precision, then quantized ones (more bits first),
compiled before packages, the smaller download first.
The Unet form is the full Unet unless `--chunked` is given or the variant only ships chunks.
"""

from __future__ import annotations

import functools
import os
import re
import shutil
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

from . import paths, store
from .atomic import write_json_atomic
from .errors import (CoremlHubError, InvalidBundle, NotEnoughDiskSpace, OfflineError, RepoNotFound, RevisionNotFound,
                     UsageError, VariantNotFound)
from .layouts import Layout, Variant, in_variant

# What a packages variant needs from the PyTorch model it was converted from: never weights.
SOURCE_MODEL_FILES = (
    "model_index.json",
    "scheduler/scheduler_config.json",
    "tokenizer/vocab.json",
    "tokenizer/merges.txt",
    "tokenizer/tokenizer_config.json",
    "tokenizer/special_tokens_map.json",
)
SECOND_TOKENIZER_FILES = tuple(p.replace("tokenizer/", "tokenizer_2/") for p in SOURCE_MODEL_FILES
                               if p.startswith("tokenizer/"))
# SD3's T5 tokenizer, for packages variants with a text_encoder_t5 (tokenizer.json is what runs it).
T5_TOKENIZER_FILES = ("tokenizer_3/tokenizer.json", "tokenizer_3/tokenizer_config.json",
                      "tokenizer_3/special_tokens_map.json")
DISK_MARGIN = 16 * 1024 * 1024

# PyTorch models that Apple's packages name but that left the Hub, and where the same files live now.
MOVED_MODELS = {"runwayml/stable-diffusion-v1-5": "stable-diffusion-v1-5/stable-diffusion-v1-5"}

NATIVE_ATTENTION_ORDER = ("split_einsum", "split_einsum_v2", "original")
PORTABLE_ATTENTION_ORDER = ("original", "split_einsum", "split_einsum_v2")
FORMAT_ORDER = ("compiled", "packages")

PhaseFn = Callable[[str], None]
BytesFn = Callable[[int, int], None]  # (bytes present so far, total bytes), called from download threads


# ---------------------------------------------------------------------------
# Choosing a variant


@functools.lru_cache(maxsize=1)
def _backends_here() -> tuple[bool, frozenset[str]]:
    """(native Core ML available here, formats the installed backends run).

    Only the native backend is asked whether it is available: asking the portable one
    would import torch, seconds spent just to pick a variant.
    """
    formats: set[str] = set()
    native = False
    try:
        from .plugins import get_backends

        backends = get_backends()
    except Exception:  # no backend information: every format counts as runnable
        return False, frozenset()
    for backend in backends.values():
        formats.update(getattr(backend, "formats", ()) or ())
        if getattr(backend, "name", "") == "coreml" and sys.platform == "darwin":
            try:
                ok = backend.available()
            except Exception:
                ok = False
            native = bool(ok[0] if isinstance(ok, tuple) else ok)
    return native, frozenset(formats)


@functools.lru_cache(maxsize=1)
def _accelerator_here() -> str | None:
    """What would run a model here in fp16: `coreml`, `cuda`, `mps`, or None for the CPU.

    Decided without importing torch: a CUDA build is read from torch/version.py, a device from
    the NVIDIA driver's files (CUDA_VISIBLE_DEVICES set empty hides it).
    """
    import importlib.util
    import platform

    native, _ = _backends_here()
    if native:
        return "coreml"
    try:
        spec = importlib.util.find_spec("torch")
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        return None
    if sys.platform == "darwin":
        return "mps" if platform.machine() == "arm64" else None
    try:
        version = (Path(next(iter(spec.submodule_search_locations))) / "version.py").read_text(encoding="utf-8")
    except OSError:
        return None
    cuda_build = re.search(r"^cuda\b[^=\n]*=\s*['\"]", version, re.MULTILINE) is not None
    hidden = os.environ.get("CUDA_VISIBLE_DEVICES", None) in ("", "-1")
    gpus = Path("/proc/driver/nvidia/gpus")
    device = (gpus.is_dir() and any(gpus.iterdir())) or Path("/dev/nvidia0").exists()
    return "cuda" if cuda_build and device and not hidden else None


def _precision_rank(tags: tuple[str, ...] | list[str], accelerator: str | None) -> tuple[int, int]:
    """(rank, -bits) of a single-model variant's precision tags; smaller is preferred."""
    tagset = set(tags)
    bits = max((int(t[:-3]) for t in tagset if re.fullmatch(r"[0-9]+bit", t)), default=0)
    bits = max([bits] + [int(t[3:]) for t in tagset if t in ("int8", "int4")])
    if bits or "palettized" in tagset:
        return 5, -bits
    order = ("fp16", "", "bf16", "fp32") if accelerator else ("fp32", "", "fp16", "bf16")
    precision = next((t for t in ("fp32", "fp16", "bf16") if t in tagset), "")
    return order.index(precision), 0


def variant_rank(*, attention: str, fmt: str, tags: tuple[str, ...] | list[str] = (), resolution: str | None = None,
                 size: int = 0, unet_form: str | None = None, kind: str = "pipeline") -> tuple:
    """Sort key of the default-variant rule (smaller is preferred); see the module docstring."""
    native, formats = _backends_here()
    runnable = 0 if not formats or fmt in formats else 1
    if kind == "model":
        format_rank = FORMAT_ORDER.index(fmt) if fmt in FORMAT_ORDER else len(FORMAT_ORDER)
        return (runnable, *_precision_rank(tags, _accelerator_here()), format_rank, size)
    order = NATIVE_ATTENTION_ORDER if native else PORTABLE_ATTENTION_ORDER
    attention_rank = order.index(attention) if attention in order else len(order)
    format_rank = FORMAT_ORDER.index(fmt) if fmt in FORMAT_ORDER else len(FORMAT_ORDER)
    return (runnable, attention_rank, format_rank, len(tuple(tags)), 0 if not resolution else 1,
            0 if unet_form in (None, "full") else 1, size)


def default_rule_text(kind: str = "pipeline") -> str:
    if kind == "model":
        where = {"coreml": "native Core ML here", "cuda": "a CUDA GPU here", "mps": "Apple's GPU (MPS) here"}
        accelerator = _accelerator_here()
        if accelerator is None:
            return "portable torch runtime on the CPU here: full precision (fp32) first"
        return f"{where[accelerator]}: fp16 first"
    native, _ = _backends_here()
    if native:
        return "native Core ML here: split_einsum attention, compiled bundles"
    return "portable torch runtime here: original attention, compiled bundles"


def choose_variant(variants: list[Variant]) -> Variant:
    """The default variant of a repo (see the module docstring)."""
    def key(v: Variant) -> tuple:
        rank = variant_rank(attention=v.attention, fmt=v.format, tags=v.tags, resolution=v.resolution,
                            size=v.size_bytes, kind=v.kind)
        return (v.partial, rank, v.id)

    return min(variants, key=key)


def select_variant(variants: list[Variant], wanted: str, repo: str) -> Variant:
    """A variant by id, by its folder or archive path in the repo, or by an id missing only its tags."""
    wanted = wanted.strip()
    for v in variants:
        if v.id == wanted:
            return v
    lowered = wanted.lower()
    for v in variants:
        if v.id.lower() == lowered:
            return v
    path = wanted.strip("/")
    for v in variants:
        if v.root.strip("/") == path or (v.archive and path in v.files):
            return v
    prefixed = [v for v in variants if v.id.startswith(wanted + "@") or v.id.startswith(wanted + "+")]
    if len(prefixed) == 1:
        return prefixed[0]
    ids = ", ".join(v.id for v in variants)
    raise VariantNotFound(
        f"{repo} has no variant {wanted!r}. Its variants: {ids}.",
        hint=f"Pull one of them, e.g. `coreml-hub pull {repo} --variant {variants[0].id}`.",
    )


def choose_unet_form(variant: Variant, chunked: bool | None) -> Variant:
    forms = variant.unet_forms
    if not forms:
        if chunked is not None:
            raise UsageError(f"Variant {variant.id} has no Unet to choose a form for; drop --chunked/--no-chunked.")
        return variant
    if chunked is None:
        form = "full" if "full" in forms else forms[0]
    else:
        form = "chunked" if chunked else "full"
    if variant.unet_form == form:
        return variant
    return variant.with_unet_form(form)


# ---------------------------------------------------------------------------
# The plan


@dataclass(frozen=True)
class PlannedFile:
    """One file a pull needs: repo path, size, expected sha256, and what is already in staging."""

    path: str
    size: int
    sha256: str | None
    repo: str
    commit: str
    present: int = 0  # bytes already downloaded by an earlier, interrupted pull

    def to_dict(self) -> dict[str, Any]:
        return {"path": self.path, "size": self.size, "sha256": self.sha256, "repo": self.repo,
                "present_bytes": self.present}


@dataclass(frozen=True)
class SourceModel:
    """The PyTorch model a packages variant was converted from; only its tokenizer and scheduler files are used."""

    repo: str
    commit: str | None = None
    files: tuple[PlannedFile, ...] = ()
    error: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"repo": self.repo, "commit": self.commit, "files": [f.path for f in self.files], "error": self.error}


@dataclass(frozen=True)
class PullPlan:
    """What a pull will do; `execute()` does it. Printed as is by `pull --dry-run`."""

    repo: str
    revision: str
    commit: str
    endpoint: str
    variant: Variant
    files: tuple[PlannedFile, ...]
    source_model: SourceModel | None
    key: store.EntryKey  # the store entry it fills
    up_to_date: bool  # the store already holds it complete
    chosen_by_default: bool = False
    other_variants: tuple[str, ...] = ()
    force: bool = False
    keep_archive: bool = False
    offline: bool = False
    warnings: tuple[str, ...] = ()
    # the repo card's pipeline_tag, library_name and tags: what `run` recognizes a task by
    repo_card: dict[str, Any] = field(default_factory=dict, compare=False)

    @property
    def layout(self) -> str:
        return self.variant.layout

    @property
    def path(self) -> Path:
        """Where the variant lives (or will live) in the store."""
        return self.key.path()

    @property
    def needs_download(self) -> bool:
        return self.force or not self.up_to_date

    @property
    def staged_files(self) -> tuple[tuple[str, PlannedFile], ...]:
        """Every planned file with its staging folder: `files` for the variant's, `source` for the source model's."""
        source = self.source_model.files if self.source_model else ()
        return tuple(("files", f) for f in self.files) + tuple(("source", f) for f in source)

    @property
    def all_files(self) -> tuple[PlannedFile, ...]:
        return tuple(f for _folder, f in self.staged_files)

    @property
    def total_bytes(self) -> int:
        return sum(f.size for f in self.all_files)

    @property
    def download_bytes(self) -> int:
        """Bytes that would come over the network."""
        if not self.needs_download:
            return 0
        return sum(f.size - (0 if self.force else f.present) for f in self.all_files)

    @property
    def archive_bytes(self) -> int:
        return sum(f.size for f in self.files) if self.variant.archive else 0

    @property
    def disk_bytes_needed(self) -> int:
        """Free space needed: what is left to download, plus room to extract an archive."""
        if not self.needs_download:
            return 0
        return self.download_bytes + self.archive_bytes

    def to_dict(self) -> dict[str, Any]:
        return {
            "repo": self.repo,
            "revision": self.revision,
            "commit": self.commit,
            "endpoint": self.endpoint,
            "variant": self.variant.to_dict(),
            "layout": self.layout,
            "unet_form": self.variant.unet_form,
            "chosen_by_default": self.chosen_by_default,
            "other_variants": list(self.other_variants),
            "path": str(self.path),
            "up_to_date": self.up_to_date,
            "force": self.force,
            "files": [f.to_dict() for f in self.files],
            "source_model": self.source_model.to_dict() if self.source_model else None,
            "total_bytes": self.total_bytes,
            "download_bytes": self.download_bytes,
            "disk_bytes_needed": self.disk_bytes_needed,
            "warnings": list(self.warnings),
        }

    def execute(self, *, progress: bool | None = None, on_phase: PhaseFn | None = None,
                on_wait: Callable[[], None] | None = None, workers: int | None = None,
                on_bytes: BytesFn | None = None) -> "PullResult":
        """Fetch, materialize, check and store the variant. `progress=None`: a bar only when stderr is a terminal.

        `on_bytes(done, total)` follows the download for callers that draw their own progress.
        """
        return _execute(self, progress=progress, on_phase=on_phase, on_wait=on_wait, workers=workers,
                        on_bytes=on_bytes)


@dataclass(frozen=True)
class PullResult:
    """What a pull did."""

    repo: str
    revision: str
    commit: str
    variant: str
    unet_form: str | None
    path: Path
    size: int
    files: int
    bytes_downloaded: int
    files_downloaded: int
    seconds: float
    already_present: bool
    validation: str
    warnings: tuple[str, ...] = ()
    source_model: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "repo": self.repo,
            "revision": self.revision,
            "commit": self.commit,
            "variant": self.variant,
            "unet_form": self.unet_form,
            "path": str(self.path),
            "size_bytes": self.size,
            "files": self.files,
            "bytes_downloaded": self.bytes_downloaded,
            "files_downloaded": self.files_downloaded,
            "seconds": round(self.seconds, 3),
            "already_present": self.already_present,
            "validation": self.validation,
            "source_model": self.source_model,
            "warnings": list(self.warnings),
        }


def _present(staging_files: Path, path: str, size: int) -> int:
    from .download import present_bytes

    return present_bytes(staging_files / path, size)


def plan_pull(model_ref: str, *, variant: str | None = None, revision: str | None = None, force: bool = False,
              chunked: bool | None = None, model_version: str | None = None, keep_archive: bool = False) -> PullPlan:
    """Resolve `REPO[@REVISION][:VARIANT]` against the Hub (one metadata request) and the store."""
    from . import hub

    ref = store.parse_ref(model_ref, variant=variant, revision=revision)
    if hub.offline():
        if force:
            raise OfflineError("HF_HUB_OFFLINE is set, so --force cannot download the variant again.",
                               hint="Unset HF_HUB_OFFLINE to download it again.")
        return _offline_plan(ref, chunked=chunked)
    try:
        snapshot, variants = hub.repo_variants(ref.repo, ref.revision)
    except RevisionNotFound as exc:
        if revision is None and ref.revision:  # named as REPO@REVISION, not with --revision
            raise RevisionNotFound(exc.message, hint=f"Drop `@{ref.revision}` to use `main`, or check the branch, "
                                                     "tag or commit name.") from exc
        raise
    repo, commit = snapshot.repo_id, snapshot.sha
    if not variants:
        raise hub.no_variants(snapshot)
    if ref.variant:
        chosen = select_variant(variants, ref.variant, repo)
        by_default = False
    else:
        chosen = choose_variant(variants)
        by_default = len(variants) > 1
    chosen = choose_unet_form(chosen, chunked)
    others = tuple(v.id for v in variants if v.id != chosen.id)
    key = store.EntryKey(repo=repo, commit=commit, variant=chosen.id, unet_form=chosen.unet_form)
    up_to_date = store.is_complete(key)
    warnings: list[str] = []
    staging_files = key.staging() / "files"
    files = tuple(
        PlannedFile(path=f.path, size=f.size, sha256=f.sha256, repo=repo, commit=commit,
                    present=0 if force else _present(staging_files, f.path, f.size))
        for f in chosen.file_entries
    )
    source = None
    if force or not up_to_date:
        source = _plan_source_model(chosen, model_version, warnings, force, key)
    elif model_version and chosen.format != "packages":
        warnings.append(f"--model-version is ignored: {chosen.id} is a compiled variant with its own tokenizer.")
    return PullPlan(
        repo=repo, revision=ref.revision or "main", commit=commit, endpoint=hub.endpoint(), variant=chosen,
        files=files, source_model=source, key=key, up_to_date=up_to_date, chosen_by_default=by_default,
        other_variants=others, force=force, keep_archive=keep_archive, warnings=tuple(warnings),
        repo_card={"pipeline_tag": snapshot.pipeline_tag, "library_name": snapshot.library_name,
                   "tags": list(snapshot.tags)},
    )


def _needs_source_model(variant: Variant) -> bool:
    if variant.kind != "pipeline" or variant.format != "packages":
        return False
    have = {p.rsplit("/", 1)[-1] for p in variant.tokenizer_files}
    return not {"vocab.json", "merges.txt"} <= have


def _plan_source_model(variant: Variant, model_version: str | None, warnings: list[str], force: bool,
                       key: store.EntryKey) -> SourceModel | None:
    """Tokenizer and scheduler files of the PyTorch model a packages variant came from (never weights)."""
    from . import hub

    if not _needs_source_model(variant):
        if model_version:
            warnings.append(f"--model-version is ignored: {variant.id} carries its own tokenizer files.")
        return None
    source = model_version or variant.model_version
    if not source:
        warnings.append(f"{variant.id} does not name the model it was converted from, so no tokenizer files "
                        "were fetched; pass --model-version ORG/NAME (e.g. runwayml/stable-diffusion-v1-5).")
        return SourceModel(repo="", error="source model unknown")
    try:
        snapshot = hub.repo_files(source)
    except CoremlHubError as exc:
        moved = MOVED_MODELS.get(source)
        snapshot = None
        if moved and not model_version and isinstance(exc, RepoNotFound):
            try:
                snapshot = hub.repo_files(moved)
                warnings.append(f"{source} is gone from the Hub; took its tokenizer from {moved}.")
                source = moved
            except CoremlHubError:
                snapshot = None
        if snapshot is None:
            warnings.append(f"Cannot fetch the tokenizer of {source} ({exc.message}); running this variant will "
                            "need tokenizer files (pass --model-version ORG/NAME of a reachable copy).")
            return SourceModel(repo=source, error=exc.message)
    wanted = list(SOURCE_MODEL_FILES)
    if "text_encoder_2" in variant.components:
        wanted += list(SECOND_TOKENIZER_FILES)
    if "text_encoder_t5" in variant.components:
        wanted += list(T5_TOKENIZER_FILES)
    by_path = {f.path: f for f in snapshot.files}
    if "tokenizer/vocab.json" not in by_path and "tokenizer/tokenizer.json" in by_path:
        wanted.append("tokenizer/tokenizer.json")  # transformers 5 saves only tokenizer.json
    if "tokenizer_2/vocab.json" not in by_path and "tokenizer_2/tokenizer.json" in by_path \
            and "text_encoder_2" in variant.components:
        wanted.append("tokenizer_2/tokenizer.json")
    commit = snapshot.sha
    staging_files = key.staging() / "source"
    files = tuple(PlannedFile(path=p, size=by_path[p].size, sha256=by_path[p].sha256, repo=source, commit=commit,
                              present=0 if force else _present(staging_files, p, by_path[p].size))
                  for p in wanted if p in by_path)
    missing = [p for p in ("tokenizer/vocab.json", "tokenizer/merges.txt") if p not in by_path]
    error = None
    if missing and "tokenizer/tokenizer.json" not in by_path:
        error = f"{source} has no {', '.join(missing)}"
        warnings.append(f"{error}; running this variant will need tokenizer files.")
    return SourceModel(repo=source, commit=commit, files=files, error=error)


def _offline_plan(ref: store.ModelRef, *, chunked: bool | None) -> PullPlan:
    """HF_HUB_OFFLINE: the answer is whatever the store holds."""
    try:
        matches = [p for p in store.match_pulled(ref) if p.status == store.STATUS_OK]
    except CoremlHubError:
        matches = []
    if chunked is not None:
        matches = [p for p in matches if (p.unet_form == "chunked") == chunked] or matches
    if not matches:
        raise OfflineError(f"HF_HUB_OFFLINE is set and {ref} is not in the store.",
                           hint="Unset HF_HUB_OFFLINE to download it, or use a model listed by `coreml-hub ls`.")
    pulled = matches[0]
    manifest = pulled.manifest()
    vdict = manifest.get("variant") or {}
    variant = Variant(id=pulled.variant, attention=str(vdict.get("attention") or ""),
                      format=str(vdict.get("format") or ""), layout=str(manifest.get("layout") or ""),
                      root=str(vdict.get("root") or ""), archive=bool(vdict.get("archive")),
                      resolution=vdict.get("resolution"), tags=tuple(vdict.get("tags") or ()),
                      components=tuple(vdict.get("components") or ()), unet_form=pulled.unet_form,
                      model_version=vdict.get("model_version"), kind=str(vdict.get("kind") or "pipeline"))
    return PullPlan(repo=pulled.repo, revision=ref.revision or pulled.revision or "main", commit=pulled.commit,
                    endpoint=str(manifest.get("endpoint") or ""), variant=variant, files=(), source_model=None,
                    key=pulled.key, up_to_date=True, offline=True)


# ---------------------------------------------------------------------------
# Doing it


class _Bar:
    """One aggregated byte bar (tqdm on stderr), safe to update from download threads."""

    def __init__(self, enabled: bool, total: int, initial: int, desc: str, observer: BytesFn | None = None) -> None:
        import threading

        self._lock = threading.Lock()
        self._bar = None
        self._observer = observer
        self._done, self._total = initial, total
        if observer is not None:
            observer(initial, total)
        if enabled:
            from tqdm import tqdm

            columns, rows = _terminal_size()
            self._bar = tqdm(total=total, initial=initial, unit="B", unit_scale=True, unit_divisor=1000,
                             desc=desc, file=sys.stderr, ncols=columns, nrows=rows, mininterval=0.2, leave=True)

    def update(self, n: int) -> None:
        if n and (self._bar is not None or self._observer is not None):
            with self._lock:
                self._done += n
                if self._bar is not None:
                    self._bar.update(n)
                if self._observer is not None:
                    self._observer(self._done, self._total)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()


def _terminal_size() -> tuple[int, int]:
    """stderr's (columns, rows); a terminal that reports no size (0 x 0) gets a usual one."""
    try:
        size = os.get_terminal_size(sys.stderr.fileno())
        columns, rows = size.columns, size.lines
    except (OSError, ValueError):
        columns, rows = 0, 0
    return (min(columns, 120) if columns > 20 else 100), (rows if rows > 0 else 24)


def check_disk_space(where: Path, needed: int) -> None:
    """Refuse before writing when the file system holding `where` has less free space than needed."""
    probe = where
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    if needed + DISK_MARGIN > free:
        from .human import human_size

        raise NotEnoughDiskSpace(
            f"Pulling needs {human_size(needed)} of free space in {where}, but only {human_size(free)} is free.")


def _execute(plan: PullPlan, *, progress: bool | None, on_phase: PhaseFn | None,
             on_wait: Callable[[], None] | None, workers: int | None, on_bytes: BytesFn | None = None) -> PullResult:
    started = time.monotonic()
    if plan.offline or not plan.needs_download:
        return _result_from_store(plan, started, already=True)
    show = sys.stderr.isatty() if progress is None else progress
    phase = on_phase or ((lambda msg: print(msg, file=sys.stderr, flush=True)) if show else (lambda msg: None))
    key = plan.key
    with store.entry_lock(key, on_wait=on_wait):
        # another process may have finished this very entry while we waited for its lock
        if not plan.force and store.is_complete(key):
            return _result_from_store(plan, started, already=True)
        staging = key.staging()
        if plan.force:
            shutil.rmtree(staging, ignore_errors=True)
        build = staging / "build"
        shutil.rmtree(build, ignore_errors=True)
        remaining = sum(f.size - _present(staging / folder, f.path, f.size) for folder, f in plan.staged_files)
        check_disk_space(paths.home(), remaining + plan.archive_bytes)
        downloaded = _download(plan, staging, show, workers, on_bytes)
        _materialize(plan, staging, build, phase)
        source_record = _place_source_files(plan, staging, build)
        phase(f"Verifying {plan.variant.id}")
        validation = _structural_check(build, plan.variant.kind)
        if validation["status"] == store.STATUS_INVALID:
            raise InvalidBundle(
                f"{plan.repo}:{plan.variant.id} failed its structural check: "
                + "; ".join(validation["problems"][:5]),
                hint="The downloaded files stay in staging; report the repo, or try another variant.")
        manifest = _manifest(plan, build, downloaded, validation, source_record)
        write_json_atomic(build / store.MANIFEST_NAME, manifest)
        final = store.install_entry(build, key, replace=plan.force)
        store.set_ref(plan.repo, plan.revision, plan.commit)
        shutil.rmtree(staging, ignore_errors=True)
    transferred = sum(d.transferred for d in downloaded.values())
    return PullResult(
        repo=plan.repo, revision=plan.revision, commit=plan.commit, variant=plan.variant.id,
        unet_form=plan.variant.unet_form, path=final, size=sum(f["size"] for f in manifest["files"]),
        files=len(manifest["files"]), bytes_downloaded=transferred,
        files_downloaded=sum(1 for d in downloaded.values() if d.transferred),
        seconds=time.monotonic() - started, already_present=False, validation=validation["status"],
        warnings=plan.warnings, source_model=plan.source_model.repo if plan.source_model else None,
    )


def _result_from_store(plan: PullPlan, started: float, *, already: bool) -> PullResult:
    pulled = store.load_entry(plan.key.path())
    if not plan.offline:
        store.set_ref(plan.repo, plan.revision, plan.commit)
    manifest = pulled.manifest()
    validation = (manifest.get("validation") or {}).get("status", "unchecked")
    source = (manifest.get("source_model") or {}).get("repo")
    return PullResult(repo=pulled.repo, revision=plan.revision, commit=pulled.commit, variant=pulled.variant,
                      unet_form=pulled.unet_form, path=pulled.path, size=pulled.size, files=pulled.files,
                      bytes_downloaded=0, files_downloaded=0, seconds=time.monotonic() - started,
                      already_present=already, validation=validation, warnings=plan.warnings,
                      source_model=source or None)


def _download(plan: PullPlan, staging: Path, show: bool, workers: int | None,
              on_bytes: BytesFn | None = None) -> dict[tuple[str, str], Any]:
    """Fetch every planned file into staging/files and staging/source (repo paths); keyed by (folder, path)."""
    from huggingface_hub import hf_hub_url

    from . import hub
    from .download import DownloadJob, Downloader, hub_headers, present_bytes

    jobs = []
    keys: dict[str, tuple[str, str]] = {}
    for folder, f in plan.staged_files:
        url = hf_hub_url(f.repo, f.path, revision=f.commit, endpoint=plan.endpoint)
        name = f.path if folder == "files" else f"{f.repo}:{f.path}"  # what messages call the file
        keys[name] = (folder, f.path)
        jobs.append(DownloadJob(name=name, url=url, dest=staging / folder / f.path, size=f.size, sha256=f.sha256))
    initial = sum(present_bytes(j.dest, j.size) for j in jobs)
    total = sum(j.size or 0 for j in jobs)
    bar = _Bar(show and initial < total, total, initial, plan.variant.id, on_bytes)
    try:
        with Downloader(headers=hub_headers(hub.token()), workers=workers) as downloader:
            results = downloader.fetch_all(jobs, bar.update)
    finally:
        bar.close()
    return {keys[r.name]: r for r in results}


def _layout_plugin(name: str) -> Layout | None:
    try:
        from .plugins import get_layouts

        for layout in get_layouts():
            if getattr(layout, "name", None) == name:
                return layout
    except Exception:
        return None
    return None


def _materialize(plan: PullPlan, staging: Path, build: Path, phase: PhaseFn) -> None:
    """Turn the downloaded repo files into the variant folder (the layout plugin's job)."""
    files_dir = staging / "files"
    variant = plan.variant
    if variant.archive:
        _check_archive_space(plan, files_dir)
        phase(f"Extracting {variant.root}")
    # Layout plugins move files: hand them hard links, so the downloads stay complete in
    # staging until the entry is installed and a pull killed after this point resumes for free.
    source_dir = _link_tree(files_dir, staging / "linked")
    layout = _layout_plugin(plan.layout)
    if layout is not None and hasattr(layout, "materialize"):
        layout.materialize(source_dir, variant, build)
    else:
        _materialize_plain(source_dir, variant, build)
    build.mkdir(parents=True, exist_ok=True)
    if variant.archive and plan.keep_archive:
        for f in plan.files:
            src = files_dir / f.path
            if src.is_file():
                os.replace(src, build / f.path.rsplit("/", 1)[-1])
    if source_dir != files_dir:
        shutil.rmtree(source_dir, ignore_errors=True)
    _reject_links(build)


def _link_tree(src: Path, dst: Path) -> Path:
    """A hard-linked copy of `src` at `dst`; `src` itself where the file system cannot link."""
    shutil.rmtree(dst, ignore_errors=True)
    try:
        for dirpath, _dirs, names in os.walk(src):
            rel = Path(dirpath).relative_to(src)
            (dst / rel).mkdir(parents=True, exist_ok=True)
            for name in names:
                os.link(Path(dirpath) / name, dst / rel / name)
    except OSError:
        shutil.rmtree(dst, ignore_errors=True)
        return src
    return dst


def _check_archive_space(plan: PullPlan, files_dir: Path) -> None:
    """Now that the archive is here, its declared size is known exactly."""
    from .archive import plan as archive_plan

    declared = 0
    for f in plan.files:
        if f.path.endswith(".zip"):
            declared += sum(e.info.file_size for e in archive_plan(files_dir / f.path) if not e.is_dir)
    check_disk_space(files_dir, declared)


def _materialize_plain(files_dir: Path, variant: Variant, build: Path) -> None:
    """Without a layout plugin: bundles move out of the variant's folder, archives are extracted safely."""
    if variant.archive:
        from .archive import safe_extract

        zips = [p for p in variant.files if p.endswith(".zip")]
        if len(zips) != 1:
            raise CoremlHubError(f"{variant.id}: expected one archive, found {len(zips)}.")
        safe_extract(files_dir / zips[0], build)
        return
    build.mkdir(parents=True, exist_ok=True)
    for rel in variant.files:
        target = build / in_variant(variant.root, rel)
        target.parent.mkdir(parents=True, exist_ok=True)
        os.replace(files_dir / rel, target)


def _reject_links(build: Path) -> None:
    """The store holds real files only: a layout plugin must never leave a link behind."""
    for dirpath, dirnames, filenames in os.walk(build):
        for name in dirnames + filenames:
            full = Path(dirpath) / name
            if full.is_symlink():
                raise CoremlHubError(f"Materializing left a symbolic link at {full.relative_to(build)}.")


def _place_source_files(plan: PullPlan, staging: Path, build: Path) -> dict[str, Any] | None:
    source = plan.source_model
    if source is None:
        return None
    for f in source.files:
        target = build / f.path
        target.parent.mkdir(parents=True, exist_ok=True)
        os.replace(staging / "source" / f.path, target)
    return source.to_dict()


def _structural_check(path: Path, kind: str = "pipeline") -> dict[str, Any]:
    """The verify module's structural checks: {'status': ok|invalid|unchecked, 'problems': [...], ...}."""
    from .bundle import verify_variant

    try:
        report = verify_variant(path, kind=kind)
    except ImportError as exc:  # a checker that cannot load leaves the variant unchecked, not unusable
        return {"status": "unchecked", "problems": [], "checker": None, "error": str(exc)}
    return {"status": store.STATUS_OK if report.ok else store.STATUS_INVALID,
            "problems": [str(p) for p in (report.problems if report.ok else report.errors)][:50],
            "checker": "coreml_hub.bundle.verify_variant",
            "checked_at": datetime.now(timezone.utc).isoformat()}


def _manifest(plan: PullPlan, build: Path, downloaded: dict[tuple[str, str], Any], validation: dict[str, Any],
              source: dict[str, Any] | None) -> dict[str, Any]:
    known = _known_hashes(plan, downloaded)
    files = _hash_tree(build, known)
    return {
        "format_version": store.MANIFEST_VERSION,
        "repo": plan.repo,
        "revision": plan.revision,
        "commit": plan.commit,
        "endpoint": plan.endpoint,
        "variant": plan.variant.to_dict(),
        "unet_form": plan.variant.unet_form,
        "layout": plan.layout,
        "pulled_at": datetime.now(timezone.utc).isoformat(),
        "repo_files": [f.to_dict() for f in plan.files],
        "repo_card": dict(plan.repo_card),
        "source_model": source,
        "validation": validation,
        "keep_archive": plan.keep_archive,
        "files": files,
    }


def _known_hashes(plan: PullPlan, downloaded: dict[tuple[str, str], Any]) -> dict[str, tuple[int, str]]:
    """Store-relative path -> (size, sha256) for files moved without change, so they need no second read."""
    known: dict[str, tuple[int, str]] = {}
    layout = _layout_plugin(plan.layout)
    store_path = getattr(layout, "store_path", None)
    for (folder, repo_path), result in downloaded.items():
        if folder == "source":
            known[repo_path] = (result.size, result.sha256)
            continue
        if plan.variant.archive:
            if plan.keep_archive:
                known[repo_path.rsplit("/", 1)[-1]] = (result.size, result.sha256)
            continue
        placed = store_path(plan.variant, repo_path) if callable(store_path) else None
        known[placed or in_variant(plan.variant.root, repo_path)] = (result.size, result.sha256)
    return known


def _hash_tree(build: Path, known: dict[str, tuple[int, str]]) -> list[dict[str, Any]]:
    from concurrent.futures import ThreadPoolExecutor

    from .download import sha256_file

    rels = []
    for dirpath, _dirs, names in os.walk(build):
        for name in names:
            full = Path(dirpath) / name
            rel = full.relative_to(build).as_posix()
            if rel == store.MANIFEST_NAME:
                continue
            rels.append(rel)
    rels.sort()

    def describe(rel: str) -> dict[str, Any]:
        size = (build / rel).stat().st_size
        hit = known.get(rel)
        sha = hit[1] if hit is not None and hit[0] == size else sha256_file(build / rel)[0].hexdigest()
        return {"path": rel, "size": size, "sha256": sha}

    with ThreadPoolExecutor(max_workers=4) as pool:
        return list(pool.map(describe, rels))


# ---------------------------------------------------------------------------
# One call


def pull(model_ref: str, *, variant: str | None = None, revision: str | None = None, force: bool = False,
         chunked: bool | None = None, model_version: str | None = None, keep_archive: bool = False,
         progress: bool | None = None, controlnets: tuple[str, ...] | list[str] = ()) -> PullResult:
    """Pull `REPO[@REVISION][:VARIANT]` into the store and return where it is; see `plan_pull`.

    `controlnets` (NAME or REPO:NAME) are fetched into the variant's entry too (coreml_hub.controlnets);
    they are looked up, and the variant's Unet checked for residual inputs, before anything is downloaded.
    """
    plan = plan_pull(model_ref, variant=variant, revision=revision, force=force, chunked=chunked,
                     model_version=model_version, keep_archive=keep_archive)
    planned = plan_variant_controlnets(plan, controlnets) if controlnets else None
    result = plan.execute(progress=progress)
    if controlnets:
        from .controlnets import pull_controlnets

        pull_controlnets(result.path, controlnets, progress=progress, force=force, plans=planned)
    return result


def plan_variant_controlnets(plan: PullPlan, controlnets: tuple[str, ...] | list[str]) -> list[Any]:
    """The ControlNets a pull of `plan` will add, after checking the variant's Unet takes their residuals."""
    from .controlnets import no_residuals_error, plan_controlnets

    if "controlnet" not in plan.variant.components:
        from .hub import repo_variants

        try:
            _, variants = repo_variants(plan.repo, plan.commit)
        except CoremlHubError:
            variants = []
        raise no_residuals_error(plan.repo, plan.variant.id, variants)
    return plan_controlnets(controlnets, repo=plan.repo, commit=plan.commit, variant=plan.variant.to_dict())


def describe_choice(plan: PullPlan) -> str | None:
    """The line telling which variant the default rule took and how to take another."""
    if not plan.chosen_by_default:
        return None
    others = ", ".join(plan.other_variants)
    return (f"Chose {plan.variant.id} ({default_rule_text(plan.variant.kind)}); other variants: {others}; "
            f"pull another with `coreml-hub pull {plan.repo} --variant ID`.")


__all__ = ["PullPlan", "PullResult", "PlannedFile", "SourceModel", "plan_pull", "pull", "plan_variant_controlnets",
           "choose_variant",
           "select_variant", "variant_rank", "check_disk_space", "describe_choice"]
