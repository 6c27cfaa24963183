"""The local store: where pulled variants live, their manifests, locks, scan, removal and pruning.

Layout under `coreml_hub.paths.home()`:

    models/<org>--<name>/<commit>/<variant-slug>/     one complete, checked variant
        coreml-hub.json                                its manifest
        <bundles and files>                            real files, no symlinks
    models/<org>--<name>/refs/<revision>               commit the revision pointed to when pulled
    staging/<org>--<name>--<commit>--<variant-slug>/   downloads and extraction in progress
    locks/<org>--<name>--<commit>--<variant-slug>.lock one lock per store entry

A variant folder appears in `models/` by a single rename once its files are downloaded,
materialized, checked and described by a manifest, so nothing under `models/` is ever
half-written. Locks are fcntl locks: the kernel drops them when their holder dies.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Iterator
from urllib.parse import quote, unquote

from . import paths
from .atomic import write_json_atomic, write_text_atomic
from .errors import CoremlHubError, ModelNotPulled, UsageError

MANIFEST_NAME = "coreml-hub.json"
MANIFEST_VERSION = 1

STATUS_OK = "ok"
STATUS_INCOMPLETE = "incomplete"
STATUS_INVALID = "invalid"


class StoreBusy(CoremlHubError):
    default_hint = "Another coreml-hub process is using this model; wait for it to finish and try again."


# ---------------------------------------------------------------------------
# Names


def repo_folder(repo_id: str) -> str:
    """`org/name` -> `org--name` (the Hub cache's convention; `/` never appears in a part)."""
    return repo_id.replace("/", "--")


def variant_slug(variant_id: str, unet_form: str | None = None) -> str:
    """A folder name for a variant id; the chunked Unet form is a separate entry."""
    slug = variant_id.replace("/", "--")
    if unet_form == "chunked":
        slug += "~chunked"
    return slug


def revision_file_name(revision: str) -> str:
    """Revisions may contain `/` (`refs/pr/1`): quote them into one file name."""
    return quote(revision, safe="")


@dataclass(frozen=True)
class EntryKey:
    """What identifies one store entry: repo, commit, variant (and Unet form)."""

    repo: str
    commit: str
    variant: str
    unet_form: str | None = None

    @property
    def slug(self) -> str:
        return variant_slug(self.variant, self.unet_form)

    @property
    def name(self) -> str:
        """Flat name for staging folders and lock files."""
        return f"{repo_folder(self.repo)}--{self.commit}--{self.slug}"

    def path(self) -> Path:
        return paths.models_dir() / repo_folder(self.repo) / self.commit / self.slug

    def staging(self) -> Path:
        return paths.staging_dir() / self.name

    def lock_path(self) -> Path:
        return paths.locks_dir() / f"{self.name}.lock"


# ---------------------------------------------------------------------------
# Model references: REPO[@REVISION][:VARIANT]


@dataclass(frozen=True)
class ModelRef:
    repo: str
    revision: str | None = None
    variant: str | None = None

    def __str__(self) -> str:
        text = self.repo
        if self.revision:
            text += f"@{self.revision}"
        if self.variant:
            text += f":{self.variant}"
        return text


def parse_ref(text: str, *, variant: str | None = None, revision: str | None = None) -> ModelRef:
    """Parse `REPO[@REVISION][:VARIANT]`; explicit `variant`/`revision` arguments win when both are given.

    Repo ids hold neither `@` nor `:`, so the first `:` ends the repo part and an `@`
    before it starts the revision (variant ids may contain `@`, as in `original/compiled@512x768`).
    """
    text = text.strip()
    repo_part, sep, variant_part = text.partition(":")
    repo, at, rev_part = repo_part.partition("@")
    repo = repo.strip().strip("/")
    if not repo or " " in repo or repo.count("/") > 1:
        raise UsageError(f"Not a model reference: {text!r}", hint="Use ORG/NAME[:VARIANT], e.g. apple/coreml-stable-diffusion-v1-5:split_einsum/compiled.")
    if variant and sep and variant_part and variant_part != variant:
        raise UsageError(f"Two different variants given: {variant_part!r} in the reference and {variant!r} in --variant.")
    if revision and at and rev_part and rev_part != revision:
        raise UsageError(f"Two different revisions given: {rev_part!r} in the reference and {revision!r} in --revision.")
    return ModelRef(repo=repo, revision=revision or rev_part or None, variant=variant or variant_part or None)


# ---------------------------------------------------------------------------
# Pulled variants


@dataclass(frozen=True)
class PulledVariant:
    """One variant in the store, as `ls`, `run` and `verify` see it."""

    repo: str
    commit: str
    revision: str | None
    variant: str  # variant id, e.g. "split_einsum/compiled"
    path: Path
    size: int
    pulled_at: datetime | None
    status: str  # ok, incomplete or invalid
    attention: str | None = None
    format: str | None = None
    unet_form: str | None = None
    layout: str | None = None
    files: int = 0
    problems: tuple[str, ...] = ()
    refs: tuple[str, ...] = ()  # revisions of this repo that point at this commit
    # from the manifest's variant record, for matching and ranking (not shown by `ls`)
    root: str = ""
    resolution: str | None = None
    tags: tuple[str, ...] = ()
    kind: str = "pipeline"  # "model" for a single-model variant of a plain Core ML repo

    @property
    def tokenizer_path(self) -> Path | None:
        """Folder holding vocab.json + merges.txt: the variant's own, else the source model's `tokenizer/`."""
        if (self.path / "vocab.json").is_file() and (self.path / "merges.txt").is_file():
            return self.path
        tok = self.path / "tokenizer"
        return tok if tok.is_dir() else None

    @property
    def key(self) -> EntryKey:
        return EntryKey(self.repo, self.commit, self.variant, self.unet_form)

    def manifest(self) -> dict[str, Any]:
        return read_manifest(self.path)

    def ref(self) -> str:
        return f"{self.repo}:{self.variant}"

    @property
    def form_flag(self) -> str:
        """` --chunked` for the chunked Unet form: with `ref()`, the name `pull`, `rm`, `verify` and `run` take."""
        return " --chunked" if self.unet_form == "chunked" else ""

    @property
    def unet(self) -> str:
        """The Unet form as `ls` shows it: full, chunked, or - (a variant without a Unet)."""
        return self.unet_form or "-"

    def to_dict(self) -> dict[str, Any]:
        return {
            "repo": self.repo,
            "variant": self.variant,
            "commit": self.commit,
            "revision": self.revision,
            "refs": list(self.refs),
            "path": str(self.path),
            "size_bytes": self.size,
            "files": self.files,
            "pulled_at": self.pulled_at.isoformat() if self.pulled_at else None,
            "status": self.status,
            "attention": self.attention,
            "format": self.format,
            "unet_form": self.unet_form,
            "layout": self.layout,
            "problems": list(self.problems),
        }


def read_manifest(entry: Path) -> dict[str, Any]:
    with open(entry / MANIFEST_NAME, encoding="utf-8") as fh:
        data = json.load(fh)
    if not isinstance(data, dict):
        raise ValueError("manifest is not a JSON object")
    return data


def _parse_time(value: Any) -> datetime | None:
    if not isinstance(value, str):
        return None
    try:
        when = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None
    return when if when.tzinfo else when.replace(tzinfo=timezone.utc)


def _check_files(entry: Path, files: list[dict[str, Any]]) -> tuple[str, list[str]]:
    """Cheap completeness check (existence and size, no hashing): ls must stay fast."""
    missing, wrong = [], []
    for item in files:
        rel = item.get("path")
        if not isinstance(rel, str):
            return STATUS_INVALID, ["manifest lists a file without a path"]
        target = entry / rel
        try:
            st = target.lstat()
        except OSError:
            missing.append(rel)
            continue
        if not target.is_file() or target.is_symlink() or st.st_size != item.get("size"):
            wrong.append(rel)
    problems = [f"missing: {p}" for p in missing[:5]] + [f"changed: {p}" for p in wrong[:5]]
    if wrong:
        return STATUS_INVALID, problems
    if missing:
        return STATUS_INCOMPLETE, problems
    return STATUS_OK, []


def _ref_path(repo: str, revision: str) -> Path:
    return paths.models_dir() / repo_folder(repo) / "refs" / revision_file_name(revision)


def _read_ref(ref: Path) -> str | None:
    """The commit a ref file names; None when it cannot be read or is empty."""
    try:
        return ref.read_text(encoding="utf-8").strip() or None
    except OSError:
        return None


def _refs_by_commit(repo_dir: Path) -> dict[str, list[str]]:
    found: dict[str, list[str]] = {}
    refs = repo_dir / "refs"
    if refs.is_dir():
        for ref in sorted(refs.iterdir()):
            commit = _read_ref(ref)
            if commit is not None:
                found.setdefault(commit, []).append(unquote(ref.name))
    return found


def load_entry(entry: Path, refs: tuple[str, ...] = ()) -> PulledVariant:
    """Describe one variant folder of the store (also one without a readable manifest)."""
    commit = entry.parent.name
    repo_guess = entry.parent.parent.name.replace("--", "/", 1)
    try:
        manifest = read_manifest(entry)
    except (OSError, ValueError) as exc:
        status, problem = ((STATUS_INCOMPLETE, "no manifest") if isinstance(exc, FileNotFoundError)
                           else (STATUS_INVALID, f"unreadable manifest: {exc}"))
        return PulledVariant(repo=repo_guess, commit=commit, revision=None, variant=entry.name.replace("--", "/"),
                             path=entry, size=tree_size(entry), pulled_at=None, status=status,
                             problems=(problem,), refs=refs)
    variant = manifest.get("variant") or {}
    files = manifest.get("files") or []
    status, problems = _check_files(entry, files)
    validation = manifest.get("validation") or {}
    if status == STATUS_OK and validation.get("status") == STATUS_INVALID:
        status = STATUS_INVALID
        problems = [str(p) for p in validation.get("problems", [])][:5] or ["failed its structural check"]
    return PulledVariant(
        repo=str(manifest.get("repo") or repo_guess),
        commit=str(manifest.get("commit") or commit),
        revision=manifest.get("revision"),
        variant=str(variant.get("id") or entry.name),
        path=entry,
        size=int(sum(int(f.get("size") or 0) for f in files)),
        pulled_at=_parse_time(manifest.get("pulled_at")),
        status=status,
        attention=variant.get("attention"),
        format=variant.get("format"),
        unet_form=variant.get("unet_form"),
        layout=manifest.get("layout"),
        files=len(files),
        problems=tuple(problems),
        refs=refs,
        root=str(variant.get("root") or ""),
        resolution=variant.get("resolution"),
        tags=tuple(variant.get("tags") or ()),
        kind=str(variant.get("kind") or "pipeline"),
    )


def tree_size(root: Path) -> int:
    """Bytes of every file under `root` (links counted as links, unreadable files skipped)."""
    total = 0
    for dirpath, _dirs, names in os.walk(root):
        for name in names:
            with suppress(OSError):
                total += os.lstat(os.path.join(dirpath, name)).st_size
    return total


def _entry_dirs() -> Iterator[tuple[Path, dict[str, list[str]]]]:
    models = paths.models_dir()
    if not models.is_dir():
        return
    for repo_dir in sorted(models.iterdir()):
        if not repo_dir.is_dir():
            continue
        refs = _refs_by_commit(repo_dir)
        for commit_dir in sorted(repo_dir.iterdir()):
            if commit_dir.name == "refs" or not commit_dir.is_dir():
                continue
            for entry in sorted(commit_dir.iterdir()):
                if entry.is_dir() and not entry.name.startswith("."):
                    yield entry, refs


def list_pulled(repo: str | None = None) -> list[PulledVariant]:
    """Every variant in the store (optionally of one repo), sorted by repo then variant id."""
    found = []
    for entry, refs in _entry_dirs():
        pulled = load_entry(entry, tuple(refs.get(entry.parent.name, ())))
        if repo is None or pulled.repo.lower() == repo.lower():
            found.append(pulled)
    return sorted(found, key=lambda p: (p.repo.lower(), p.variant, p.unet_form == "chunked", p.commit))


def _matches_variant(pulled: PulledVariant, wanted: str) -> bool:
    """Variant ids match exactly, or by the repo folder/archive the variant was pulled from."""
    if pulled.variant == wanted or pulled.variant.lower() == wanted.lower():
        return True
    base = wanted.strip("/")
    if pulled.variant.startswith(base + "@") or pulled.variant.startswith(base + "+"):
        return True
    root = pulled.root.strip("/")
    return bool(root) and root == base


def _matches_revision(pulled: PulledVariant, revision: str) -> bool:
    return revision in pulled.refs or pulled.revision == revision or (
        len(revision) >= 7 and pulled.commit.startswith(revision))


def _is_form(pulled: PulledVariant, chunked: bool | None) -> bool:
    """`chunked` True: the chunked Unet form; False: the full one (or no Unet); None: either."""
    return chunked is None or (pulled.unet_form == "chunked") == chunked


def _named_by(ref: ModelRef, chunked: bool | None = None) -> list[PulledVariant]:
    """Store entries of the ref's repo, narrowed by its revision, variant and Unet form when it names them."""
    found = list_pulled(ref.repo)
    if ref.revision:
        found = [p for p in found if _matches_revision(p, ref.revision)]
    if ref.variant:
        exact = [p for p in found if p.variant == ref.variant]
        found = exact or [p for p in found if _matches_variant(p, ref.variant)]
    return [p for p in found if _is_form(p, chunked)]


def match_pulled(ref: ModelRef | str, *, chunked: bool | None = None) -> list[PulledVariant]:
    """Store entries a reference names, best first (see `find_pulled`)."""
    if isinstance(ref, str):
        ref = parse_ref(ref)
    return sorted(_named_by(ref, chunked), key=_preference)


def _preference(pulled: PulledVariant) -> tuple:
    from .pulling import variant_rank  # the default-variant rule, shared with `pull`

    status_rank = {STATUS_OK: 0, STATUS_INVALID: 1, STATUS_INCOMPLETE: 2}.get(pulled.status, 3)
    newest = -(pulled.pulled_at.timestamp() if pulled.pulled_at else 0.0)
    rank = variant_rank(attention=pulled.attention or "", fmt=pulled.format or "", tags=pulled.tags,
                        resolution=pulled.resolution, size=pulled.size, unet_form=pulled.unet_form,
                        kind=pulled.kind)
    return (status_rank, 0 if "main" in pulled.refs else 1, rank, newest)


def find_pulled(model_ref: str | ModelRef | os.PathLike[str], *, variant: str | None = None,
                revision: str | None = None, require_ok: bool = False, chunked: bool | None = None) -> PulledVariant:
    """The store entry for `REPO[@REVISION][:VARIANT]` (or a path inside the store).

    `chunked` picks the Unet form (True: the two chunks, False: the full Unet) when both are
    pulled. Several matches: complete entries first, then the commit `main` points at, then the
    default-variant rule of `pull`, then the newest. Raises ModelNotPulled when nothing
    matches; with `require_ok`, raises InvalidBundle for an incomplete or invalid entry.
    """
    if isinstance(model_ref, os.PathLike) or (isinstance(model_ref, str) and os.sep in model_ref
                                              and Path(model_ref).is_dir() and (Path(model_ref) / MANIFEST_NAME).is_file()):
        found = load_entry(Path(model_ref).resolve())
        return _require(found, require_ok)
    ref = model_ref if isinstance(model_ref, ModelRef) else parse_ref(str(model_ref), variant=variant, revision=revision)
    matches = match_pulled(ref, chunked=chunked)
    if not matches:
        pulled_here = list_pulled(ref.repo)
        asked = f"{ref}{chunked_flag(chunked)}"
        if pulled_here:
            have = ", ".join(sorted({f"{p.variant}{p.form_flag}" + (f" ({p.commit[:7]})" if ref.revision else "")
                                     for p in pulled_here}))
            raise ModelNotPulled(
                f"{asked} is not pulled; pulled variants of {ref.repo}: {have}.",
                hint=f"Pull it with `coreml-hub pull {asked}`, or use one of the pulled variants.")
        raise ModelNotPulled(f"{asked} is not pulled.", hint=f"Pull it first with `coreml-hub pull {asked}`.")
    return _require(matches[0], require_ok)


def chunked_flag(chunked: bool | None) -> str:
    """The `--chunked` / `--no-chunked` flag that asked for a Unet form (nothing when none was asked)."""
    return {True: " --chunked", False: " --no-chunked", None: ""}[chunked]


def _require(pulled: PulledVariant, require_ok: bool) -> PulledVariant:
    if require_ok and pulled.status != STATUS_OK:
        from .errors import InvalidBundle

        detail = "; ".join(pulled.problems) or pulled.status
        raise InvalidBundle(f"{pulled.ref()}{pulled.form_flag} in the store is {pulled.status} ({detail}).",
                            hint=f"Pull it again with `coreml-hub pull {pulled.ref()}{pulled.form_flag} --force`.")
    return pulled


def is_complete(key: EntryKey) -> bool:
    """True when the entry exists with a manifest and every listed file at its size."""
    entry = key.path()
    return (entry / MANIFEST_NAME).is_file() and load_entry(entry).status == STATUS_OK


def record_validation(entry: Path, status: str, problems: list[str]) -> None:
    """Store the result of a later structural check (e.g. `verify`) in an entry's manifest."""
    manifest = read_manifest(entry)
    manifest["validation"] = {"status": status, "problems": list(problems),
                              "checked_at": datetime.now(timezone.utc).isoformat()}
    write_json_atomic(entry / MANIFEST_NAME, manifest)


def set_ref(repo: str, revision: str, commit: str) -> None:
    if revision == commit:
        return
    write_text_atomic(_ref_path(repo, revision), commit + "\n")


def resolve_ref(repo: str, revision: str) -> str | None:
    """The commit a revision pointed to at the last pull, if any."""
    return _read_ref(_ref_path(repo, revision))


# ---------------------------------------------------------------------------
# Locks


@contextmanager
def entry_lock(key: EntryKey, *, timeout: float = -1, on_wait: Any = None) -> Iterator[None]:
    """Hold the lock of one store entry. `on_wait()` is called once when another process holds it.

    filelock's UnixFileLock uses flock(2): the kernel releases it when the holder exits or is
    killed, so a crashed pull never blocks later ones.
    """
    import filelock

    path = key.lock_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    lock = filelock.FileLock(str(path), thread_local=False)
    try:
        lock.acquire(timeout=0)
    except filelock.Timeout:
        if on_wait is not None:
            on_wait()
        try:
            lock.acquire(timeout=timeout)
        except filelock.Timeout:
            raise StoreBusy(f"{key.repo}:{key.variant} is locked by another coreml-hub process.") from None
    try:
        yield
    finally:
        lock.release()


def _try_lock(lock_path: Path) -> Any:
    """Acquire a lock without waiting; None when a live process holds it."""
    import filelock

    lock = filelock.FileLock(str(lock_path), thread_local=False)
    try:
        lock.acquire(timeout=0)
    except filelock.Timeout:
        return None
    return lock


# ---------------------------------------------------------------------------
# Moving entries in and out


def _trash_dir() -> Path:
    """A fresh folder name on the store's file system for things about to be deleted."""
    path = paths.staging_dir() / f".trash-{uuid.uuid4().hex[:12]}"
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


def _discard(folder: Path) -> None:
    """Take a folder out of `models/` with one rename, then delete it (a crash leaves only a trash folder)."""
    doomed = _trash_dir()
    os.rename(folder, doomed)
    shutil.rmtree(doomed, ignore_errors=True)


def install_entry(built: Path, key: EntryKey, *, replace: bool = False) -> Path:
    """Move a finished variant folder into `models/` with one rename (the caller holds the entry lock)."""
    final = key.path()
    final.parent.mkdir(parents=True, exist_ok=True)
    old = None
    if final.exists():
        if not replace:
            raise CoremlHubError(f"{final} already exists.")
        old = _trash_dir()
        os.rename(final, old)
    try:
        os.rename(built, final)
    except FileNotFoundError:
        # a concurrent prune removed the (then empty) commit folder: make it again
        final.parent.mkdir(parents=True, exist_ok=True)
        os.rename(built, final)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    return final


@dataclass(frozen=True)
class Removal:
    """What `remove` deleted (or, with dry_run, would delete)."""

    entries: tuple[PulledVariant, ...]
    bytes_freed: int
    dry_run: bool

    def to_dict(self) -> dict[str, Any]:
        return {"removed": [p.to_dict() for p in self.entries], "bytes_freed": self.bytes_freed,
                "dry_run": self.dry_run}


def plan_remove(model_ref: str | ModelRef, *, variant: str | None = None, revision: str | None = None,
                chunked: bool | None = None) -> list[PulledVariant]:
    """Entries `remove` would delete: every variant, Unet form and commit of the repo unless narrowed."""
    ref = model_ref if isinstance(model_ref, ModelRef) else parse_ref(model_ref, variant=variant, revision=revision)
    found = _named_by(ref, chunked)
    if not found:
        raise ModelNotPulled(f"Nothing pulled matches {ref}{chunked_flag(chunked)}.",
                             hint="List pulled models with `coreml-hub ls`.")
    return found


def remove(model_ref: str | ModelRef, *, variant: str | None = None, revision: str | None = None,
           chunked: bool | None = None, dry_run: bool = False) -> Removal:
    """Delete pulled variants. Each entry leaves `models/` by one rename, then is deleted."""
    entries = plan_remove(model_ref, variant=variant, revision=revision, chunked=chunked)
    size = sum(tree_size(p.path) for p in entries)
    if dry_run:
        return Removal(tuple(entries), size, True)
    for pulled in entries:
        with entry_lock(pulled.key, timeout=30):
            if pulled.path.exists():
                _discard(pulled.path)
    # tidy only the repos touched: their refs to removed commits and their empty folders
    _remove_orphans(dry_run=False, repos={repo_folder(p.repo) for p in entries}, entries=False)
    return Removal(tuple(entries), size, False)


# ---------------------------------------------------------------------------
# Pruning


@dataclass(frozen=True)
class PruneItem:
    path: Path
    kind: str  # staging, orphan-ref, empty-dir, no-manifest
    size: int

    def to_dict(self) -> dict[str, Any]:
        return {"path": str(self.path), "kind": self.kind, "size_bytes": self.size}


@dataclass(frozen=True)
class PruneResult:
    items: tuple[PruneItem, ...]
    skipped_locked: tuple[Path, ...]
    dry_run: bool

    @property
    def bytes_freed(self) -> int:
        return sum(i.size for i in self.items)

    def to_dict(self) -> dict[str, Any]:
        return {"items": [i.to_dict() for i in self.items], "bytes_freed": self.bytes_freed,
                "skipped_locked": [str(p) for p in self.skipped_locked], "dry_run": self.dry_run}


def prune(*, dry_run: bool = False) -> PruneResult:
    """Remove staging leftovers no live process holds, refs to missing commits and empty folders."""
    items: list[PruneItem] = []
    skipped: list[Path] = []
    staging = paths.staging_dir()
    if staging.is_dir():
        for leftover in sorted(staging.iterdir()):
            if leftover.name.startswith(".trash-"):
                items.append(PruneItem(leftover, "staging", tree_size(leftover)))
                if not dry_run:
                    shutil.rmtree(leftover, ignore_errors=True)
                continue
            lock = _try_lock(paths.locks_dir() / f"{leftover.name}.lock")
            if lock is None:
                skipped.append(leftover)
                continue
            try:
                items.append(PruneItem(leftover, "staging", tree_size(leftover) if leftover.is_dir()
                                       else leftover.lstat().st_size))
                if not dry_run:
                    if leftover.is_dir() and not leftover.is_symlink():
                        shutil.rmtree(leftover, ignore_errors=True)
                    else:
                        leftover.unlink(missing_ok=True)
            finally:
                lock.release()
    items.extend(_remove_orphans(dry_run=dry_run))
    return PruneResult(tuple(items), tuple(skipped), dry_run)


def _remove_orphans(*, dry_run: bool, repos: set[str] | None = None, entries: bool = True) -> list[PruneItem]:
    """`_tidy_repo` over every repo folder, or only over those named in `repos`."""
    models = paths.models_dir()
    if not models.is_dir():
        return []
    items: list[PruneItem] = []
    for repo_dir in sorted(p for p in models.iterdir() if p.is_dir()):
        if repos is None or repo_dir.name in repos:
            items += _tidy_repo(repo_dir, dry_run=dry_run, entries=entries)
    return items


def _tidy_repo(repo_dir: Path, *, dry_run: bool, entries: bool) -> list[PruneItem]:
    """Refs pointing at no pulled commit, variant folders without a manifest (with `entries`), empty folders."""
    items: list[PruneItem] = []
    gone: set[Path] = set()

    def drop(path: Path, kind: str | None, size: int, remove: Callable[[Path], None]) -> None:
        if kind is not None:
            items.append(PruneItem(path, kind, size))
        gone.add(path)
        if not dry_run:
            remove(path)

    def emptied(folder: Path) -> bool:
        return all(p in gone for p in folder.iterdir())

    for commit_dir in sorted(p for p in repo_dir.iterdir() if p.is_dir() and p.name != "refs"):
        for entry in sorted(commit_dir.iterdir()):
            if entries and entry.is_dir() and not entry.name.startswith(".") and not (entry / MANIFEST_NAME).exists():
                drop(entry, "no-manifest", tree_size(entry), _discard)
        if emptied(commit_dir):
            drop(commit_dir, "empty-dir", 0, _rmdir_quietly)
    commits = {p.name for p in repo_dir.iterdir() if p.is_dir() and p.name != "refs" and p not in gone}
    refs = repo_dir / "refs"
    if refs.is_dir():
        for ref in sorted(refs.iterdir()):
            if _read_ref(ref) not in commits:
                drop(ref, "orphan-ref", ref.lstat().st_size, lambda path: path.unlink(missing_ok=True))
        if emptied(refs):
            drop(refs, None, 0, _rmdir_quietly)
    if emptied(repo_dir):
        drop(repo_dir, "empty-dir", 0, _rmdir_quietly)
    return items


def _rmdir_quietly(folder: Path) -> None:
    """Remove an empty folder; one that gained an entry meanwhile (a concurrent pull) stays."""
    with suppress(OSError):
        folder.rmdir()


# ---------------------------------------------------------------------------
# Disk usage


@dataclass(frozen=True)
class RepoUsage:
    """One repo's share of the store: its pulled variants, and what `prune` would free of it."""

    repo: str
    variants: int
    commits: int
    size: int  # bytes on disk of its pulled variants (files and manifests)
    prunable: int  # interrupted downloads, stale refs and leftover folders `prune` would remove

    def to_dict(self) -> dict[str, Any]:
        return {"repo": self.repo, "variants": self.variants, "commits": self.commits, "size_bytes": self.size,
                "prunable_bytes": self.prunable}


@dataclass(frozen=True)
class DiskUsage:
    """`du`: the store's bytes by repo, and what `prune` would free."""

    home: Path
    repos: tuple[RepoUsage, ...]
    prunable: int  # everything `prune` would free now, some of it belonging to no repo
    skipped_locked: int  # staging folders a running pull holds (neither counted as prunable nor freed)

    @property
    def size(self) -> int:
        return sum(r.size for r in self.repos)

    def to_dict(self) -> dict[str, Any]:
        return {"home": str(self.home), "repos": [r.to_dict() for r in self.repos], "size_bytes": self.size,
                "prunable_bytes": self.prunable, "skipped_locked": self.skipped_locked}


def _repo_of_leftover(path: Path) -> str | None:
    """The repo a prunable item belongs to, read from its place or name (`org--name[--commit--slug]`)."""
    for root in (paths.models_dir(), paths.staging_dir()):
        if path.is_relative_to(root) and path != root:
            first = path.relative_to(root).parts[0]
            org, sep, rest = first.partition("--")
            if sep and rest and not first.startswith("."):
                return f"{org}/{rest.split('--', 1)[0]}"
    return None


def disk_usage() -> DiskUsage:
    """Bytes on disk per repo (every pulled variant and commit), and what `prune` would free of each."""
    pulled = list_pulled()
    pending = prune(dry_run=True)
    prunable: dict[str, int] = {}
    for item in pending.items:
        repo = _repo_of_leftover(item.path)
        if repo is not None:
            prunable[repo.lower()] = prunable.get(repo.lower(), 0) + item.size
    by_repo: dict[str, list[PulledVariant]] = {}
    names: dict[str, str] = {}
    for p in pulled:
        by_repo.setdefault(p.repo.lower(), []).append(p)
        names.setdefault(p.repo.lower(), p.repo)
    for item in pending.items:
        repo = _repo_of_leftover(item.path)
        if repo is not None:
            names.setdefault(repo.lower(), repo)
    repos = tuple(
        RepoUsage(repo=names[key], variants=len(by_repo.get(key, [])),
                  commits=len({p.commit for p in by_repo.get(key, [])}),
                  size=sum(tree_size(p.path) for p in by_repo.get(key, [])), prunable=prunable.get(key, 0))
        for key in sorted(names))
    return DiskUsage(paths.home(), repos, pending.bytes_freed, len(pending.skipped_locked))


def pull(model_ref: str, **kwargs: Any) -> Any:
    """Pull a variant into the store (see `coreml_hub.pulling.pull`)."""
    from .pulling import pull as _pull

    return _pull(model_ref, **kwargs)


__all__ = [
    "EntryKey", "ModelRef", "PulledVariant", "Removal", "PruneResult", "PruneItem", "StoreBusy",
    "parse_ref", "list_pulled", "find_pulled", "match_pulled", "load_entry", "read_manifest",
    "record_validation", "remove", "plan_remove", "prune", "entry_lock", "install_entry", "is_complete",
    "set_ref", "resolve_ref", "pull", "MANIFEST_NAME", "disk_usage", "DiskUsage", "RepoUsage",
]
