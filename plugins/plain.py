"""Plain Core ML repos: every model bundle is a variant of its own.

Repos such as apple/coreml-depth-anything-v2-small, apple/coreml-FastViT-T8,
apple/coreml-mobileclip, apple/mistral-coreml or coreml-projects/Llama-2-7b-chat-coreml
hold one or more `.mlpackage` / `.mlmodelc` bundles (at the root or in folders, also
zipped as `X.mlpackage.zip`), each a complete model:

- Each bundle at any depth is a variant (`kind` "model") named by its path without the
  extension: `DepthAnythingV2SmallF16.mlpackage` -> `DepthAnythingV2SmallF16`,
  `coreml/text/Model.mlmodelc` -> `coreml/text/Model`. When two bundles share that name
  (a package and its compiled form, a folder and its zip), the format is added as a tag
  (`X+packages`, `X+compiled`), then `+zip` for the archive. `pull --variant` also takes
  the bundle's path as it is in the repo (`DepthAnythingV2SmallF16.mlpackage`).
- Precision and compression are read from the name into tags: `F16`/`FP16`/`Float16` ->
  `fp16`, `F32`/`FP32` -> `fp32`, `BF16` -> `bf16`, `P4`/`P6`/`P8` (Apple's palettized
  suffix, `F16P6`) and `<n>bit` -> `<n>bit` + `palettized`, `INT8`/`Int4`/`W8` -> `int8`/`int4`,
  `LUT` -> `palettized`.
- Companion files travel with every variant: tokenizer files, `config.json`,
  `generation_config.json`, preprocessor configs and label lists that sit in the bundle's
  folder or any folder above it (or in a `tokenizer/` folder there). In the variant folder
  they sit next to the bundle, relative to the folder that holds them; the nearest wins
  when two would land on the same name. READMEs, licenses and images never travel.
- A repo that the diffusion layouts (apple, flat, archives) recognize, or whose bundles
  carry diffusion component names (`Unet`, `TextEncoder`, `Stable_Diffusion_version_*`),
  is not a plain repo: this layout gives it nothing.

The variant folder holds the bundle under its own name (a zipped bundle is extracted
safely, its zip removed) and the companion files next to it.
"""

from __future__ import annotations

import dataclasses
import os
import re
import shutil
from collections import defaultdict
from pathlib import Path

from coreml_hub.atomic import building_dir, check_empty_dest, temp_dir_beside
from coreml_hub.hookspecs import hookimpl
from coreml_hub.layouts import RepoFile, Variant

from ._common import (
    BUNDLE_SUFFIXES,
    JUNK_PARTS,
    Bundle,
    basename,
    bundle_role,
    clean_files,
    find_bundles,
    glob_escape,
    guarded,
    parent,
    place,
)

KIND = "model"
ZIPPED_SUFFIXES = {suffix + ".zip": kind for suffix, kind in BUNDLE_SUFFIXES.items()}

# Files that a model needs next to it (tokenizers, configs, labels); matched on the file name.
COMPANION_NAMES = frozenset({
    "config.json", "generation_config.json", "preprocessor_config.json", "processor_config.json",
    "image_processor_config.json", "feature_extractor_config.json", "tokenizer.json", "tokenizer_config.json",
    "special_tokens_map.json", "added_tokens.json", "tokenizer.model", "tokenizer.model.v3", "vocab.json",
    "vocab.txt", "merges.txt", "spiece.model", "sentencepiece.bpe.model", "chat_template.json",
    "chat_template.jinja",
})
_COMPANION_PATTERNS = (
    re.compile(r".*labels?\.(?:txt|json)$"),
    re.compile(r"^(?:classes|class_names|synsets?)\.(?:txt|json)$"),
    re.compile(r".*(?:vocab|merges)[^/]*\.(?:txt|json|txt\.gz)$"),
)
TOKENIZER_DIR = "tokenizer"
TOKENIZER_HINTS = ("tokenizer", "vocab", "merges", "spiece", "sentencepiece")

# Name tags. Names are CamelCase (`DepthAnythingV2SmallF16P6`, `FastViTMA36F16`) or snake/kebab
# case (`model_fp16`): a tag may follow a letter or a digit, but never runs into a digit.
_PRECISION = (
    ("bf16", re.compile(r"(?:BF16|bf16|Bf16|BFloat16|bfloat16|BFLOAT16)(?![0-9])")),
    ("fp16", re.compile(r"(?<![Bb])(?:F16|FP16|Fp16|fp16|f16|Float16|FLOAT16|float16)(?![0-9])")),
    ("fp32", re.compile(r"(?:F32|FP32|Fp32|fp32|f32|Float32|FLOAT32|float32)(?![0-9])")),
)
_PALETTE_AFTER_PRECISION = re.compile(r"(?:F16|FP16|F32|FP32|f16|fp16|f32|fp32)[-_]?[Pp]([1-8])(?![0-9])")
_PALETTE_ALONE = re.compile(r"(?:^|[-_.])[Pp]([1-8])(?:$|[-_.])")
_BITS = re.compile(r"(?<![0-9A-Za-z])([1-8])[-_ ]?bits?(?![A-Za-z0-9])", re.IGNORECASE)
_INT = re.compile(r"(?:(?<![A-Z])INT|Int|(?<![A-Za-z])int|(?<![0-9A-Za-z])W)(4|8)(?![0-9])")
_LUT = re.compile(r"LUT|[Ll]ut(?![a-z])|[Pp]alettiz")
PLAIN_TAG_ORDER = ("fp32", "fp16", "bf16", "int8", "int4", "bits", "palettized", "compiled", "packages", "zip")


def name_tags(name: str) -> list[str]:
    """Precision and compression tags a bundle's name carries (see the module docstring)."""
    found: list[str] = []
    for tag, pattern in _PRECISION:
        if pattern.search(name):
            found.append(tag)
            break
    bits = [m.group(1) for m in _PALETTE_AFTER_PRECISION.finditer(name)]
    bits += [m.group(1) for m in _PALETTE_ALONE.finditer(name)]
    if bits:
        found += [f"{bits[0]}bit", "palettized"]
    elif (m := _BITS.search(name)) is not None:
        found.append(f"{m.group(1)}bit")
    for m in _INT.finditer(name):
        found.append(f"int{m.group(1)}")
    if _LUT.search(name):
        found.append("palettized")
    return _ordered(found)


def _ordered(tags: list[str]) -> list[str]:
    unique = list(dict.fromkeys(tags))

    def rank(tag: str) -> int:
        if re.fullmatch(r"[0-9]+bit", tag):
            return PLAIN_TAG_ORDER.index("bits")
        return PLAIN_TAG_ORDER.index(tag) if tag in PLAIN_TAG_ORDER else len(PLAIN_TAG_ORDER)

    return sorted(unique, key=lambda t: (rank(t), unique.index(t)))


def is_companion(path: str) -> bool:
    name = basename(path).lower()
    return name in COMPANION_NAMES or any(p.fullmatch(name) for p in _COMPANION_PATTERNS)


def _zipped_kind(path: str) -> str | None:
    lower = path.lower()
    for suffix, kind in ZIPPED_SUFFIXES.items():
        if lower.endswith(suffix) and len(basename(lower)) > len(suffix):
            return kind
    return None


def _strip_bundle_suffix(path: str) -> str:
    lower = path.lower()
    for suffix in (*ZIPPED_SUFFIXES, *BUNDLE_SUFFIXES):
        if lower.endswith(suffix):
            return path[: -len(suffix)]
    return path


@dataclasses.dataclass(frozen=True)
class _Model:
    """One bundle (or zipped bundle) of the repo."""

    path: str  # the bundle folder, or the zip
    fmt: str
    files: tuple[RepoFile, ...]
    archive: bool

    @property
    def name(self) -> str:
        return _strip_bundle_suffix(self.path)

    @property
    def folder(self) -> str:
        return parent(self.path)


def _companions_for(folder: str, companions: list[RepoFile]) -> dict[str, RepoFile]:
    """Variant path -> companion file, for a bundle in `folder`: its folder and those above, nearest first."""
    by_home: dict[str, list[RepoFile]] = defaultdict(list)
    for f in companions:
        home = parent(f.path)
        if basename(home) == TOKENIZER_DIR:
            home = parent(home)
        by_home[home].append(f)
    chosen: dict[str, RepoFile] = {}
    here: str | None = folder
    while here is not None:
        for f in sorted(by_home.get(here, []), key=lambda f: f.path):
            rel = f.path[len(here) + 1:] if here else f.path
            chosen.setdefault(rel, f)
        here = parent(here) if here else None
    return chosen


def _diffusion_repo(files: list[RepoFile], bundles: list[Bundle], loose: list[RepoFile]) -> bool:
    """Whether the diffusion layouts own this repo: they find a variant, or a bundle has a component's name."""
    if any(bundle_role(b)[0] is not None for b in bundles):
        return True
    for f in loose:
        if _zipped_kind(f.path):
            stem = basename(_strip_bundle_suffix(f.path))
            if bundle_role(Bundle(path=stem + ".mlmodelc", kind="compiled", files=()))[0] is not None:
                return True
    from .apple import find_apple_variants
    from .archives import find_archive_variants
    from .flat import find_flat_variants

    return any(guarded(name, finder, files) for name, finder in (
        ("apple", find_apple_variants), ("flat", find_flat_variants), ("archives", find_archive_variants)))


def find_plain_variants(files: list[RepoFile]) -> list[Variant]:
    """One variant per model bundle of a plain Core ML repo; [] for diffusion repos and repos without bundles."""
    files = clean_files(files)
    bundles, loose = find_bundles(files)
    models = [_Model(b.path, b.kind, b.files, False) for b in bundles]
    models += [_Model(f.path, kind, (f,), True) for f in loose if (kind := _zipped_kind(f.path))]
    if not models or _diffusion_repo(files, bundles, loose):
        return []
    companions = [f for f in loose if is_companion(f.path)]
    names: dict[str, list[_Model]] = defaultdict(list)
    for model in models:
        names[model.name].append(model)
    variants = []
    for name, group in sorted(names.items()):
        formats = {m.fmt for m in group}
        for model in sorted(group, key=lambda m: (m.archive, m.fmt, m.path)):
            extra_tags = []
            if len(group) > 1:
                if len(formats) > 1:
                    extra_tags.append(model.fmt)
                if model.archive and sum(1 for m in group if m.fmt == model.fmt) > 1:
                    extra_tags.append("zip")
            variants.append(_variant(model, name, extra_tags, _companions_for(model.folder, companions)))
    return variants


def _variant(model: _Model, name: str, extra_tags: list[str], companions: dict[str, RepoFile]) -> Variant:
    bundle_name = basename(_strip_bundle_suffix(model.path)) + (".mlpackage" if model.fmt == "packages" else ".mlmodelc")
    folder = model.folder
    paths: dict[str, str] = {}
    if not model.archive:
        for f in model.files:
            paths[f.path] = f.path[len(folder) + 1:] if folder else f.path
    for rel, f in companions.items():
        paths[f.path] = rel
    tags = _ordered(name_tags(basename(name)) + extra_tags)
    vid = name + "".join(f"+{t}" for t in extra_tags)
    tokenizer = tuple(sorted(rel for rel in companions if any(h in basename(rel).lower() for h in TOKENIZER_HINTS)))
    return Variant(
        id=vid,
        attention="",
        format=model.fmt,
        layout=PlainLayout.name,
        root=model.path,
        archive=model.archive,
        tags=tuple(tags),
        components=(bundle_name,),
        tokenizer_files=tokenizer,
        common_files=tuple(sorted(model.files + tuple(companions.values()), key=lambda f: f.path)),
        kind=KIND,
        extra={"paths": paths, "bundle": bundle_name, "companions": tuple(sorted(companions)),
               "shared_files": tuple(sorted(f.path for f in companions.values())),
               "format_from": "content" if not model.archive else "name"},
    )


# ---------------------------------------------------------------- materialize

def _find_extracted_bundle(root: Path, fmt: str) -> Path | None:
    """The bundle folder inside an extracted zip: the archive itself when it holds a bare bundle."""
    from .archives import _bundle_kind  # content first, then the folder's suffix

    if _bundle_kind(root) == fmt:
        return root
    found = []
    for dirpath, dirnames, _ in os.walk(root):
        here = Path(dirpath)
        dirnames[:] = sorted(d for d in dirnames if d not in JUNK_PARTS and not d.startswith("._"))
        for name in list(dirnames):
            if _bundle_kind(here / name) == fmt:
                found.append(here / name)
                dirnames.remove(name)  # never look inside a bundle
    return found[0] if len(found) == 1 else None


class PlainLayout:
    """Plain Core ML repos: one variant per model bundle, companion files alongside."""

    name = "plain"

    def variants(self, files: list[RepoFile]) -> list[Variant]:
        return guarded(self.name, find_plain_variants, files)

    def allow_patterns(self, variant: Variant) -> list[str]:
        return [glob_escape(path) for path in variant.files]

    def store_path(self, variant: Variant, repo_path: str) -> str | None:
        return (variant.extra.get("paths") or {}).get(repo_path)

    def materialize(self, downloaded_dir: Path, variant: Variant, dest: Path, *, max_total_bytes: int | None = None,
                    progress=None, **_: object) -> None:  # type: ignore[no-untyped-def]
        """Move the bundle and its companions into `dest` (a zipped bundle is extracted safely first)."""
        from coreml_hub.errors import EntryNotFound, InvalidBundle

        downloaded_dir, dest = Path(downloaded_dir), Path(dest)
        check_empty_dest(dest, "build the variant in")
        paths = variant.extra.get("paths") or {}
        missing = [p for p in variant.files if not downloaded_dir.joinpath(*p.split("/")).is_file()]
        if missing:
            raise EntryNotFound(f"{len(missing)} file(s) of {variant.id} are missing from the download, e.g. {missing[0]}.",
                                hint="Pull the variant again; the download resumes.")
        bundle_name = variant.extra.get("bundle") or basename(variant.root)
        with building_dir(dest, "building") as staging:
            for repo_path in variant.files:
                if variant.archive and repo_path == variant.root:
                    continue
                rel = paths.get(repo_path) or basename(repo_path)
                place(downloaded_dir.joinpath(*repo_path.split("/")), staging.joinpath(*rel.split("/")))
            if variant.archive:
                from coreml_hub.archive import safe_extract

                work = temp_dir_beside(dest, "unpacking")
                try:
                    extracted = work / "archive"
                    safe_extract(downloaded_dir.joinpath(*variant.root.split("/")), extracted,
                                 max_total_bytes=max_total_bytes, progress=progress)
                    bundle = _find_extracted_bundle(extracted, variant.format)
                    if bundle is None:
                        raise InvalidBundle(f"The archive {variant.root} holds no single {variant.format} bundle.",
                                            hint="Pull another variant of the repo, or report the archive.")
                    target = staging / bundle_name
                    if target.exists():
                        raise InvalidBundle(f"The archive {variant.root} and a companion file both give {bundle_name}.")
                    os.replace(bundle, target)
                    target.chmod(0o755)
                finally:
                    shutil.rmtree(work, ignore_errors=True)


@hookimpl
def register_layouts(register) -> None:  # type: ignore[no-untyped-def]
    register(PlainLayout())


__all__ = ["PlainLayout", "find_plain_variants", "name_tags", "is_companion"]
