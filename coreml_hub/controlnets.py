"""`pull MODEL --controlnet NAME`: fetch one ControlNet into a pulled variant's store entry.

A ControlNet is named as the repo shows it (`coreml-hub show`): `LllyasvielSdControlnetCanny`
(Apple's `controlnet/<Name>.mlmodelc`), `lllyasviel_sd-controlnet-canny` (`ControlNet_*.mlpackage`),
or an archive's name (`Canny_split-einsum_512x512`); case and separators do not matter, and a
name without the attention and size (`Canny`) picks the archive that fits the variant. It comes
from the variant's own repo (at the pulled commit) or from another one as `REPO:NAME`.

Only the ControlNet's files are downloaded. Before anything is fetched, the variant must have a
Unet that takes ControlNet residuals; once fetched, the ControlNet must match it (text width,
residual shapes, image size) and pass the structural checks, or nothing is installed. It then lands
where Apple's pipelines look for it (`controlnet/<Name>.mlmodelc`, or `ControlNet_<name>.mlpackage`
beside the packages), and the entry's manifest records its files and where it came from.
"""

from __future__ import annotations

import os
import re
import shutil
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterable

from . import paths, store
from .atomic import write_json_atomic
from .errors import CoremlHubError, InvalidBundle, UsageError, VariantNotFound
from .layouts import CONTROLNET_DIR, CONTROLNET_PREFIX, ControlNetEntry, Variant, controlnet_base_key, controlnet_key

_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
# the image size a variant without a resolution in its name makes (SD 1.x/2.x base): ranks ControlNet archives
DEFAULT_SIZE = "512x512"


class ControlNetNotFound(VariantNotFound):
    """No ControlNet of that name in the repo."""


@dataclass(frozen=True)
class PlannedControlNet:
    """One ControlNet a pull will fetch: where it is in which repo, and where it goes in the entry."""

    request: str
    repo: str
    commit: str
    entry: ControlNetEntry
    dest: str  # path relative to the store entry (for archives: decided once extracted)

    def to_dict(self) -> dict[str, Any]:
        return {"request": self.request, "repo": self.repo, "commit": self.commit, "name": self.entry.name,
                "root": self.entry.root, "dest": self.dest, "size_bytes": self.entry.size_bytes,
                "files": [f.path for f in self.entry.files]}


@dataclass(frozen=True)
class PulledControlNet:
    name: str
    repo: str
    commit: str
    root: str
    path: Path
    size: int
    bytes_downloaded: int
    already_present: bool

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "repo": self.repo, "commit": self.commit, "root": self.root, "path": str(self.path),
                "size_bytes": self.size, "bytes_downloaded": self.bytes_downloaded,
                "already_present": self.already_present}


def split_request(text: str, default_repo: str) -> tuple[str, str]:
    """`REPO:NAME` -> (REPO, NAME); a plain NAME belongs to `default_repo`."""
    repo, sep, name = text.rpartition(":")
    if sep and _REPO_ID.match(repo) and name:
        return repo, name
    if sep and not repo:
        raise UsageError(f"--controlnet {text!r} names no ControlNet.", hint="Use NAME or REPO:NAME.")
    return default_repo, text


def choose_entry(entries: list[ControlNetEntry], wanted: str, *, folder: str | None, fmt: str | None,
                 attention: str | None, resolution: str | None, repo: str) -> ControlNetEntry:
    """The entry `wanted` names: an exact name first, else a base name (`Canny`) that fits the variant."""
    key = controlnet_key(wanted)
    candidates = [e for e in entries if controlnet_key(e.name) == key]
    if not candidates:
        candidates = [e for e in entries if controlnet_base_key(e.name) == key or controlnet_key(Path(e.root).stem) == key]
    if not candidates:
        names = sorted({e.name for e in entries})
        shown = ", ".join(names[:12]) + (f", ... ({len(names)} in all)" if len(names) > 12 else "")
        raise ControlNetNotFound(f"{repo} has no ControlNet named {wanted!r} (it has: {shown or 'none'}).",
                                 hint=f"`coreml-hub show {repo}` lists them; another repo's: --controlnet REPO:NAME.")
    size = resolution or DEFAULT_SIZE

    def score(e: ControlNetEntry) -> tuple:
        return (e.folder == folder, e.format == fmt, e.attention == attention,
                e.attention is None, e.resolution == size, e.resolution is None, -len(e.root))

    return max(candidates, key=score)


def _controlled(entry_path: Path) -> list[Path]:
    from .bundle import open_bundle

    found = {c.name: c.path for c in open_bundle(entry_path).components if c.known}
    if "controlled_unet" in found:
        return [found["controlled_unet"]]
    if "controlled_unet_chunk1" in found and "controlled_unet_chunk2" in found:
        return [found["controlled_unet_chunk1"], found["controlled_unet_chunk2"]]
    return []


def no_residuals_error(repo: str, variant_id: str, variants: Iterable[Variant] | None = None) -> InvalidBundle:
    """The error for a ControlNet asked of a variant whose Unet takes no residuals, naming one that has them."""
    with_cn = [v.id for v in variants or () if "controlnet" in v.components and v.id != variant_id]
    hint = (f"Pull a variant whose Unet takes them: `coreml-hub pull {repo} --variant {with_cn[0]} --controlnet NAME`."
            if with_cn else "None of this repo's variants has one; convert one with "
                            "`coreml-hub convert SRC -o OUT --controlnet CN_SRC`.")
    return InvalidBundle(f"{repo}:{variant_id} has no Unet that takes ControlNet residuals (no ControlledUnet), so "
                         "ControlNets cannot drive it.", hint=hint)


def plan_controlnets(requests: Iterable[str], *, repo: str, commit: str, variant: dict[str, Any]) -> list[PlannedControlNet]:
    """Find each requested ControlNet (one file-list request per repo); `variant` is the variant's record."""
    from . import hub
    from .layouts import find_controlnets

    listings: dict[str, tuple[str, list[ControlNetEntry]]] = {}
    planned = []
    for request in requests:
        source, name = split_request(request, repo)
        if source not in listings:
            snapshot = hub.repo_files(source, commit if source == repo else None)
            listings[source] = (snapshot.sha, find_controlnets(list(snapshot.files)))
        sha, entries = listings[source]
        entry = choose_entry(entries, name, folder=str(variant.get("root") or "") if source == repo else None,
                             fmt=variant.get("format"), attention=variant.get("attention"),
                             resolution=variant.get("resolution"), repo=source)
        planned.append(PlannedControlNet(request, source, sha, entry, _dest(entry)))
    return planned


def _dest(entry: ControlNetEntry) -> str:
    if entry.archive or entry.format == "compiled":
        return f"{CONTROLNET_DIR}/{entry.name}.mlmodelc"
    return Path(entry.root).name if Path(entry.root).name.startswith(CONTROLNET_PREFIX) else \
        f"{CONTROLNET_PREFIX}{entry.name}.mlpackage"


def pull_controlnets(entry_path: str | Path, requests: Iterable[str], *, progress: bool | None = None,
                     force: bool = False, workers: int | None = None,
                     plans: list[PlannedControlNet] | None = None) -> list[PulledControlNet]:
    """Fetch each requested ControlNet into the pulled variant at `entry_path` (see the module doc);
    `plans` (from `plan_controlnets`) saves looking the names up again."""
    entry_path = Path(entry_path)
    pulled = store.load_entry(entry_path)
    manifest = store.read_manifest(entry_path)
    variant = manifest.get("variant") or {}
    requests = list(requests)
    unet = _controlled(entry_path)
    if not unet:
        from .hub import repo_variants

        try:
            _, variants = repo_variants(pulled.repo, pulled.commit)
        except CoremlHubError:
            variants = []
        raise no_residuals_error(pulled.repo, pulled.variant, variants)
    if plans is None:
        plans = plan_controlnets(requests, repo=pulled.repo, commit=pulled.commit, variant=variant)
    results = []
    key = pulled.key
    for plan in plans:
        recorded = {r.get("root"): r for r in manifest.get("controlnets") or [] if isinstance(r, dict)}
        done = recorded.get(plan.entry.root)
        if done and done.get("commit") == plan.commit and (entry_path / done["path"]).exists() and not force:
            results.append(PulledControlNet(plan.entry.name, plan.repo, plan.commit, plan.entry.root,
                                            entry_path / done["path"], int(done.get("size_bytes") or 0), 0, True))
            continue
        with store.entry_lock(key):
            results.append(_fetch_one(plan, entry_path, key, unet, progress, workers))
            manifest = store.read_manifest(entry_path)
    return results


def _fetch_one(plan: PlannedControlNet, entry_path: Path, key: store.EntryKey, unet: list[Path],
               progress: bool | None, workers: int | None) -> PulledControlNet:
    import sys

    from huggingface_hub import hf_hub_url

    from . import hub
    from .download import DownloadJob, Downloader, hub_headers

    staging = key.staging() / "controlnets" / f"{store.repo_folder(plan.repo)}--{controlnet_key(plan.entry.root)[:80]}"
    files_dir, build = staging / "files", staging / "build"
    shutil.rmtree(build, ignore_errors=True)
    jobs = [DownloadJob(name=f.path, url=hf_hub_url(plan.repo, f.path, revision=plan.commit, endpoint=hub.endpoint()),
                        dest=files_dir / f.path, size=f.size, sha256=f.sha256) for f in plan.entry.files]
    from .pulling import check_disk_space

    check_disk_space(paths.home(), plan.entry.size_bytes * (2 if plan.entry.archive else 1))
    show = sys.stderr.isatty() if progress is None else progress
    from .pulling import _Bar

    bar = _Bar(show, plan.entry.size_bytes, 0, plan.entry.name)
    try:
        with Downloader(headers=hub_headers(hub.token()), workers=workers) as downloader:
            downloaded = downloader.fetch_all(jobs, bar.update)
    finally:
        bar.close()
    bundle = _materialize(plan, files_dir, build)
    dest_rel = f"{CONTROLNET_DIR}/{plan.entry.name}.mlmodelc" if bundle.suffix == ".mlmodelc" else \
        (bundle.name if bundle.name.startswith(CONTROLNET_PREFIX) else f"{CONTROLNET_PREFIX}{plan.entry.name}.mlpackage")
    _check(bundle, plan, entry_path, unet)
    dest = entry_path / dest_rel
    dest.parent.mkdir(parents=True, exist_ok=True)
    if dest.exists():
        shutil.rmtree(dest)
    os.replace(bundle, dest)
    known = {} if plan.entry.archive else {
        f"{dest_rel}/{d.name[len(plan.entry.root) + 1:]}": (d.size, d.sha256) for d in downloaded}
    size = _record(entry_path, plan, dest_rel, known)
    shutil.rmtree(staging, ignore_errors=True)
    if not any(staging.parent.iterdir()):
        shutil.rmtree(key.staging(), ignore_errors=True)
    return PulledControlNet(plan.entry.name, plan.repo, plan.commit, plan.entry.root, dest, size,
                            sum(d.transferred for d in downloaded), False)


def _materialize(plan: PlannedControlNet, files_dir: Path, build: Path) -> Path:
    """The fetched ControlNet as one bundle folder in `build`: moved as is, or extracted from its archive."""
    build.mkdir(parents=True, exist_ok=True)
    if not plan.entry.archive:
        source = files_dir.joinpath(*plan.entry.root.split("/"))
        target = build / source.name
        shutil.copytree(source, target, copy_function=os.link if _same_fs(source, build) else shutil.copy2)
        return target
    from .archive import safe_extract

    extracted = build / "archive"
    safe_extract(files_dir.joinpath(*plan.entry.root.split("/")), extracted)
    bundles = sorted({p for p in extracted.rglob("*") if p.is_dir() and p.suffix in (".mlmodelc", ".mlpackage")
                      and not any(q.suffix in (".mlmodelc", ".mlpackage") for q in p.parents)})
    if len(bundles) != 1:
        raise InvalidBundle(f"The archive {plan.entry.root} holds {len(bundles)} Core ML bundles; a ControlNet archive "
                            "holds one.", hint="Report the repo; pull another ControlNet.")
    return bundles[0]


def _same_fs(a: Path, b: Path) -> bool:
    try:
        return a.stat().st_dev == b.stat().st_dev
    except OSError:
        return False


def _check(bundle: Path, plan: PlannedControlNet, entry_path: Path, unet: list[Path]) -> None:
    """Structural checks of the bundle, then the ControlNet contract against the variant's Unet."""
    from .bundle import verify_bundle, open_bundle
    from .controlnet_io import bundle_io, controlnet_mismatches, unet_io

    report = verify_bundle(open_bundle(bundle), plugins=False)
    if not report.ok:
        raise InvalidBundle(f"The ControlNet {plan.entry.name} from {plan.repo} failed its structural check: "
                            + "; ".join(str(p) for p in report.errors[:3]), hint="Nothing was installed.")
    image = None
    decoder = next((c.path for c in open_bundle(entry_path).components if c.name == "vae_decoder"), None)
    if decoder is not None:
        shape = bundle_io(decoder).outputs.get("image", ())
        image = (shape[3], shape[2]) if len(shape) == 4 else None
    problems = controlnet_mismatches(bundle_io(bundle), unet_io(unet), image, plan.entry.name)
    if problems:
        raise InvalidBundle(problems[0], hint="Nothing was installed; pick a ControlNet made for this model's base, "
                                              "size and attention.")


def _record(entry_path: Path, plan: PlannedControlNet, dest_rel: str, known: dict[str, tuple[int, str]]) -> int:
    """Add the ControlNet's files and origin to the entry's manifest (atomically); returns its size."""
    from .download import sha256_file

    manifest = store.read_manifest(entry_path)
    prefix = dest_rel + "/"
    files = [f for f in manifest.get("files") or [] if not str(f.get("path", "")).startswith(prefix)]
    added = []
    for path in sorted((entry_path / dest_rel).rglob("*")):
        if not path.is_file():
            continue
        rel = path.relative_to(entry_path).as_posix()
        size = path.stat().st_size
        hit = known.get(rel)
        digest = hit[1] if hit and hit[0] == size else sha256_file(path)[0].hexdigest()
        added.append({"path": rel, "size": size, "sha256": digest})
    manifest["files"] = sorted(files + added, key=lambda f: f["path"])
    records = [r for r in manifest.get("controlnets") or [] if isinstance(r, dict) and r.get("path") != dest_rel]
    total = sum(f["size"] for f in added)
    records.append({"name": plan.entry.name, "repo": plan.repo, "commit": plan.commit, "root": plan.entry.root,
                    "path": dest_rel, "size_bytes": total, "pulled_at": datetime.now(timezone.utc).isoformat()})
    manifest["controlnets"] = records
    write_json_atomic(entry_path / store.MANIFEST_NAME, manifest)
    return total
