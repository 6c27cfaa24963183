"""What the built-in layout plugins share: bundle detection, component names, name tags, folder variants.

Rules (they are the documented behaviour of `show` and `pull`):

- A bundle is the outermost folder that ends in `.mlmodelc`/`.mlpackage`, or that
  directly holds `model.mil`/`coremldata.bin` (compiled) or `Manifest.json`
  (package). Its format comes from that content, not from its name or its
  parent's name, so a folder `mlpackages/` full of `.mlmodelc` bundles is compiled.
- Component names: Apple's compiled names (`TextEncoder`, `UnetChunk1`, ...,
  `ControlledUnet`, `UnetRefiner`, SD3's `MultiModalDiffusionTransformer` and
  `TextEncoderT5`) or Apple's package names
  `Stable_Diffusion_version_<org>_<name>_<component>.mlpackage`, the component
  being the longest known suffix; `<org>_<name>` is the PyTorch model id with
  `/` turned into `_`, decoded by cutting at the first `_` (orgs on the Hub
  have no `_`; model names may).
- Unet forms: a folder with both `Unet` and `UnetChunk1`+`UnetChunk2` gives one
  variant that fetches one form; the default is `full` when present, else
  `chunked`. A lone chunk is no form and is not fetched. A Controlled Unet or a
  refiner rides along with the matching form when it has both, else with either.
- A variant holds its folder's bundles plus the tokenizer files directly in it
  (`vocab.json`, `merges.txt`, ...); READMEs and images are never part of a variant.
  ControlNets beside a pipeline (its `controlnet/` subfolder, `ControlNet_*.mlpackage`)
  are not either: the variant names them (`controlnets`) and `pull --controlnet NAME`
  fetches one. The component `controlnet` means the Unet takes their residuals
  (a ControlledUnet); a folder of ControlNets alone is a `partial` variant.
- A variant that lacks a text encoder, a Unet or a VAE decoder is `partial` and
  tagged `unet-only` (only a Unet) or `partial`, so it is never mistaken for a
  pipeline.
- Name tags, read from folder and file names: `<n>bit`, `mbp-<x.yy>`,
  `palettized`, `cn`, `no-i2i`; a resolution `WxH`. Tag order is fixed (see TAG_ORDER).
"""

from __future__ import annotations

import dataclasses
import logging
import re
import shutil
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable

from coreml_hub.atomic import building_dir, check_empty_dest
from coreml_hub.layouts import (COMPILED_NAMES, CONTROLNET_PREFIX, ControlNetEntry, RepoFile, Variant, in_variant,
                                sort_components, variant_id)

log = logging.getLogger("coreml_hub.layouts")

BUNDLE_SUFFIXES = {".mlmodelc": "compiled", ".mlpackage": "packages"}
COMPILED_MARKERS = frozenset({"model.mil", "coremldata.bin"})
PACKAGE_MARKERS = frozenset({"Manifest.json"})
AUX_NAMES = ("merges.txt", "vocab.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
JUNK_PARTS = frozenset({"__MACOSX", ".DS_Store", ".git"})
CONTROLNET_DIR = "controlnet"

# Bundle roles. A role names a bundle's job; components (the public names) derive from roles.
# Roles extend the component names: each chunk of the refiner and of the controlled Unet has a role of
# its own, so that a variant can offer their full and chunked forms like the Unet's.
COMPILED_ROLES = {
    **COMPILED_NAMES,
    "UnetRefinerChunk1": "refiner_chunk1",
    "UnetRefinerChunk2": "refiner_chunk2",
    "ControlledUnet": "controlled_unet",
    "ControlledUNet": "controlled_unet",
    "ControlledUnetChunk1": "controlled_unet_chunk1",
    "ControlledUnetChunk2": "controlled_unet_chunk2",
}
PACKAGE_PREFIX = "Stable_Diffusion_version_"
# Apple's converter suffixes (torch2coreml `_get_out_path`); matched longest first, so `text_encoder_2` wins.
PACKAGE_ROLES = {
    "text_encoder_2": "text_encoder_2",
    "text_encoder_t5": "text_encoder_t5",
    "text_encoder": "text_encoder",
    "mmdit": "mmdit",
    "unet_chunk1": "unet_chunk1",
    "unet_chunk2": "unet_chunk2",
    "unet": "unet",
    "vae_decoder": "vae_decoder",
    "vae_encoder": "vae_encoder",
    "safety_checker": "safety_checker",
    "refiner_chunk1": "refiner_chunk1",
    "refiner_chunk2": "refiner_chunk2",
    "refiner": "refiner",
    "control-unet_chunk1": "controlled_unet_chunk1",
    "control-unet_chunk2": "controlled_unet_chunk2",
    "control-unet": "controlled_unet",
}
_SUFFIXES_LONGEST_FIRST = sorted(PACKAGE_ROLES, key=len, reverse=True)
UNET_FAMILIES = {  # family -> (full role, chunk roles)
    "unet": ("unet", ("unet_chunk1", "unet_chunk2")),
    "controlled_unet": ("controlled_unet", ("controlled_unet_chunk1", "controlled_unet_chunk2")),
    "refiner": ("refiner", ("refiner_chunk1", "refiner_chunk2")),
}
SIMPLE_COMPONENTS = {
    "text_encoder": "text_encoder",
    "text_encoder_2": "text_encoder_2",
    "text_encoder_t5": "text_encoder_t5",
    "mmdit": "mmdit",  # SD3's denoiser: one bundle, no chunked form
    "vae_decoder": "vae_decoder",
    "vae_encoder": "vae_encoder",
    "safety_checker": "safety_checker",
    "controlnet": "controlnet",
}
TAG_ORDER = ("bits", "mbp", "palettized", "cn", "no-i2i", "other", "partial", "zip")
DEFAULT_ATTENTION = "original"  # when no path names one: the file list cannot tell (a pulled Unet's ops can)

_ORG = re.compile(r"^[A-Za-z0-9][A-Za-z0-9-]*$")
_MODEL_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


# ---------------------------------------------------------------- files and bundles

def clean_files(files: Iterable[object]) -> list[RepoFile]:
    """Usable entries as RepoFiles: relative paths without junk parts, first of duplicates, sizes >= 0."""
    out: dict[str, RepoFile] = {}
    for f in files:
        path = getattr(f, "path", None)
        if not isinstance(path, str) or path in out:
            continue
        parts = path.split("/")
        if not path or any(p in ("", ".", "..") for p in parts):
            continue
        if any(p in JUNK_PARTS or p.startswith("._") for p in parts):
            continue
        size = getattr(f, "size", 0)
        sha = getattr(f, "sha256", None)
        out[path] = RepoFile(path, size if isinstance(size, int) and size > 0 else 0,
                             sha if isinstance(sha, str) else None)
    return list(out.values())


def parent(path: str) -> str:
    return path.rsplit("/", 1)[0] if "/" in path else ""


def basename(path: str) -> str:
    return path.rsplit("/", 1)[-1]


@dataclass(frozen=True)
class Bundle:
    """A Core ML bundle folder in a repo."""

    path: str
    kind: str  # "compiled" or "packages"
    files: tuple[RepoFile, ...]

    @property
    def name(self) -> str:
        stem = basename(self.path)
        for suffix in BUNDLE_SUFFIXES:
            if stem.lower().endswith(suffix):
                return stem[: -len(suffix)]
        return stem

    @property
    def folder(self) -> str:
        return parent(self.path)


def _marker_kinds(files: list[RepoFile]) -> dict[str, str]:
    kinds: dict[str, str] = {}
    for f in files:
        folder, name = parent(f.path), basename(f.path)
        if not folder or basename(folder) == "analytics":
            continue
        if name in COMPILED_MARKERS:
            kinds[folder] = "compiled"
        elif name in PACKAGE_MARKERS:
            kinds.setdefault(folder, "packages")
    return kinds


def _suffix_kind(name: str) -> str | None:
    lower = name.lower()
    for suffix, kind in BUNDLE_SUFFIXES.items():
        if lower.endswith(suffix) and len(lower) > len(suffix):
            return kind
    return None


def find_bundles(files: list[RepoFile]) -> tuple[list[Bundle], list[RepoFile]]:
    """Bundles (outermost folder wins) and the files outside any bundle."""
    markers = _marker_kinds(files)
    members: dict[str, list[RepoFile]] = defaultdict(list)
    kinds: dict[str, str] = {}
    loose: list[RepoFile] = []
    for f in files:
        parts = f.path.split("/")
        for depth in range(1, len(parts)):
            folder = "/".join(parts[:depth])
            kind = markers.get(folder) or _suffix_kind(parts[depth - 1])
            if kind:
                # content wins over the folder's suffix
                kinds[folder] = markers.get(folder, kind)
                members[folder].append(f)
                break
        else:
            loose.append(f)
    bundles = [Bundle(path=p, kind=kinds[p], files=tuple(sorted(fs, key=lambda x: x.path)))
               for p, fs in members.items()]
    return sorted(bundles, key=lambda b: b.path), loose


def decode_model_version(slug: str) -> str | None:
    """`runwayml_stable-diffusion-v1-5` -> `runwayml/stable-diffusion-v1-5` (cut at the first `_`)."""
    org, sep, name = slug.partition("_")
    if not sep or not _ORG.match(org) or not _MODEL_NAME.match(name):
        return None
    return f"{org}/{name}"


def bundle_role(bundle: Bundle) -> tuple[str | None, str | None]:
    """(role, PyTorch model id) of a bundle from its name; (None, None) when unknown. Every bundle in a
    `controlnet/` folder is a ControlNet (Apple names them after the ControlNet, e.g. `LllyasvielSdControlnetCanny`)."""
    name = bundle.name
    if basename(bundle.folder) == CONTROLNET_DIR:
        return "controlnet", None
    if name in COMPILED_ROLES:
        return COMPILED_ROLES[name], None
    if name.startswith(PACKAGE_PREFIX):
        rest = name[len(PACKAGE_PREFIX):]
        for suffix in _SUFFIXES_LONGEST_FIRST:
            if rest.endswith("_" + suffix) and len(rest) > len(suffix) + 1:
                return PACKAGE_ROLES[suffix], decode_model_version(rest[: -len(suffix) - 1])
        return None, None
    if name.startswith("ControlNet_"):
        return "controlnet", None
    return None, None


# ---------------------------------------------------------------- names -> attention, tags

_ATTENTION_PATTERNS = (
    ("split_einsum_v2", re.compile(r"split[-_ ]?einsum[-_ ]?v2(?![a-z0-9])")),
    ("split_einsum", re.compile(r"split[-_ ]?einsum(?![a-z0-9])")),
    ("original", re.compile(r"(?<![a-z0-9])original(?![a-z0-9])")),
)
_FORMAT_PATTERNS = (
    ("compiled", re.compile(r"(?<![a-z0-9])compiled(?![a-z0-9])")),
    ("packages", re.compile(r"(?<![a-z0-9])packages?(?![a-z0-9])")),
)
_RESOLUTION = re.compile(r"(?<![0-9])([1-9][0-9]{2,3})x([1-9][0-9]{2,3})(?![0-9])")
_MBP = (
    re.compile(r"mbp[-_ ]?([0-9])[-_.]([0-9]{2})"),
    re.compile(r"recipe[-_ ]?([0-9])[-_.]([0-9]{2})[-_ ]?bits?"),
)
_BITS = re.compile(r"(?<![a-z0-9.])([1-9][0-9]?)[-_ ]?bits?(?![a-z0-9])")
_PALETTIZED = re.compile(r"palettiz(?:ed|ation)|mixed[-_ ]?palette")
_CN = re.compile(r"(?<![a-z0-9])(?:cn|control[-_ ]?net)(?![a-z0-9])")
_NO_I2I = re.compile(r"(?<![a-z0-9])no[-_ ]?i2i(?![a-z0-9])")
_XL = re.compile(r"(?<![a-z0-9])(?:sd)?xl(?![a-z0-9])|sdxl")


def _first_named(patterns: tuple[tuple[str, re.Pattern[str]], ...], text: str) -> str | None:
    lower = text.lower()
    return next((name for name, pattern in patterns if pattern.search(lower)), None)


def attention_in(text: str) -> str | None:
    return _first_named(_ATTENTION_PATTERNS, text)


def format_in(text: str) -> str | None:
    return _first_named(_FORMAT_PATTERNS, text)


def resolution_in(text: str) -> str | None:
    match = _RESOLUTION.search(text.lower())
    return f"{match.group(1)}x{match.group(2)}" if match else None


def tags_in(text: str) -> list[str]:
    """Tags a name carries, in TAG_ORDER."""
    lower = text.lower()
    found: dict[str, list[str]] = defaultdict(list)
    for pattern in _MBP:
        for m in pattern.finditer(lower):
            found["mbp"].append(f"mbp-{m.group(1)}.{m.group(2)}")
        lower = pattern.sub(" ", lower)
    for m in _BITS.finditer(lower):
        found["bits"].append(f"{int(m.group(1))}bit")
    if _PALETTIZED.search(lower):
        found["palettized"].append("palettized")
    if _CN.search(lower):
        found["cn"].append("cn")
    if _NO_I2I.search(lower):
        found["no-i2i"].append("no-i2i")
    return order_tags(t for group in found.values() for t in group)


def _tag_rank(tag: str) -> int:
    if re.fullmatch(r"[0-9]+bit", tag):
        return TAG_ORDER.index("bits")
    if tag.startswith("mbp-"):
        return TAG_ORDER.index("mbp")
    if tag in ("unet-only", "partial"):
        return TAG_ORDER.index("partial")
    return TAG_ORDER.index(tag) if tag in TAG_ORDER else TAG_ORDER.index("other")


def order_tags(tags: Iterable[str]) -> list[str]:
    unique = list(dict.fromkeys(tags))
    return sorted(unique, key=lambda t: (_tag_rank(t), unique.index(t)))


def looks_xl(text: str, resolution: str | None) -> bool:
    if _XL.search(text.lower()):
        return True
    if resolution:
        w, _, h = resolution.partition("x")
        return max(int(w), int(h)) >= 1024
    return False


def slug(text: str) -> str:
    out = re.sub(r"[^a-z0-9.]+", "-", text.lower()).strip("-")
    return out or "root"


# ---------------------------------------------------------------- folder variants

def _is_partial(components: Iterable[str]) -> bool:
    comps = set(components)
    has_text = bool(comps & {"text_encoder", "text_encoder_2"})
    has_unet = "unet" in comps or {"unet_chunk1", "unet_chunk2"} <= comps or "mmdit" in comps
    return not (has_text and has_unet and "vae_decoder" in comps)


def partial_tag(components: Iterable[str]) -> str | None:
    comps = set(components)
    if not _is_partial(comps):
        return None
    unets = {"unet", "unet_chunk1", "unet_chunk2", "mmdit"}
    return "unet-only" if comps & unets and comps <= unets | {"controlnet"} else "partial"


@dataclass
class FolderPlan:
    """What one folder contributes: its bundles of one format, plus aux files."""

    root: str
    fmt: str
    bundles: list[Bundle]
    aux: list[RepoFile] = field(default_factory=list)


def _files_of(bundles: Iterable[Bundle]) -> tuple[RepoFile, ...]:
    return tuple(f for b in bundles for f in b.files)


def folder_variant(
    plan: FolderPlan,
    *,
    layout: str,
    attention: str,
    tags: Iterable[str] = (),
    resolution: str | None = None,
    extra: dict | None = None,
) -> Variant | None:
    """A Variant from one folder's bundles; None when no bundle is a known component."""
    roles: dict[str, list[Bundle]] = defaultdict(list)
    unknown: list[Bundle] = []
    model_ids: Counter[str] = Counter()
    for bundle in plan.bundles:
        role, model_id = bundle_role(bundle)
        if model_id:
            model_ids[model_id] += 1
        if role is None:
            unknown.append(bundle)
        else:
            roles[role].append(bundle)
    if not roles:
        return None

    def forms_of(family: str) -> dict[str, list[Bundle]]:
        full_role, chunk_roles = UNET_FAMILIES[family]
        forms: dict[str, list[Bundle]] = {}
        if roles.get(full_role):
            forms["full"] = roles[full_role]
        if all(roles.get(r) for r in chunk_roles):
            forms["chunked"] = [b for r in chunk_roles for b in roles[r]]
        return forms

    ignored = [b.path for fam in UNET_FAMILIES.values() for r in fam[1] for b in roles.get(r, [])]
    families = {fam: forms_of(fam) for fam in UNET_FAMILIES}
    main = "unet" if families["unet"] else ("controlled_unet" if families["controlled_unet"] else None)

    controlnet_names: tuple[str, ...] = ()
    if main is not None and roles.get("controlnet"):  # ControlNets beside a pipeline: fetched only when asked
        controlnet_names = tuple(sorted(controlnet_name(b) for b in roles.pop("controlnet")))
    common: list[Bundle] = [b for role, bs in roles.items() if role in SIMPLE_COMPONENTS for b in bs]
    common += unknown
    components = {SIMPLE_COMPONENTS[r] for r in roles if r in SIMPLE_COMPONENTS}
    unet_files: dict[str, tuple[RepoFile, ...]] = {}
    used: set[str] = set()
    if main is not None:
        if main == "controlled_unet" or families["controlled_unet"]:
            components.add("controlnet")
        if families["refiner"]:
            components.add("refiner")
        for form, bundles in families[main].items():
            chosen = list(bundles)
            for other in UNET_FAMILIES:
                if other == main or not families[other]:
                    continue
                other_forms = families[other]
                chosen += other_forms.get(form) or next(iter(other_forms.values()))
            unet_files[form] = _files_of(chosen)
            used.update(b.path for b in chosen)
    else:
        # no Unet to choose a form for: a refiner alone rides as a plain bundle
        if families["refiner"]:
            components.add("refiner")
            first = next(iter(families["refiner"].values()))
            common += first
            used.update(b.path for b in first)
    ignored = sorted(p for p in ignored if p not in used)

    unet_form = None
    if unet_files:
        unet_form = "full" if "full" in unet_files else "chunked"
        components |= {"unet"} if unet_form == "full" else {"unet_chunk1", "unet_chunk2"}
    components_t = sort_components(components)
    all_tags = list(tags)
    ptag = partial_tag(components_t)
    if ptag:
        all_tags.append(ptag)
    all_tags = order_tags(all_tags)

    info = dict(extra or {})
    info.setdefault("components_from", "files")
    if ignored:
        info["ignored"] = ignored
    return Variant(
        id=variant_id(attention, plan.fmt, resolution, all_tags),
        attention=attention,
        format=plan.fmt,
        layout=layout,
        root=plan.root,
        archive=False,
        resolution=resolution,
        tags=tuple(all_tags),
        components=components_t,
        tokenizer_files=tuple(sorted(in_variant(plan.root, f.path) for f in plan.aux if basename(f.path) in AUX_NAMES)),
        common_files=tuple(sorted(_files_of(common) + tuple(plan.aux), key=lambda f: f.path)),
        unet_files=unet_files,
        unet_form=unet_form,
        model_version=model_ids.most_common(1)[0][0] if model_ids and plan.fmt == "packages" else None,
        partial=ptag is not None,
        extra=info,
        controlnets=controlnet_names,
    )


def folder_plans(bundles: list[Bundle], loose: list[RepoFile], folders: Iterable[str]) -> list[FolderPlan]:
    """One plan per (folder, format) for the given folders; `controlnet/` subfolders fold into their parent.

    When a folder holds both formats, its aux files go with the compiled plan only,
    so no file belongs to two variants (packages variants take their tokenizer from
    the PyTorch model's repo).
    """
    wanted = set(folders)
    by_folder: dict[str, list[Bundle]] = defaultdict(list)
    for b in bundles:
        folder = b.folder
        if basename(folder) == CONTROLNET_DIR and parent(folder) in wanted:
            folder = parent(folder)
        if folder in wanted:
            by_folder[folder].append(b)
    aux_by_folder: dict[str, list[RepoFile]] = defaultdict(list)
    for f in loose:
        if parent(f.path) in wanted and basename(f.path) in AUX_NAMES:
            aux_by_folder[parent(f.path)].append(f)
    plans: list[FolderPlan] = []
    for folder in sorted(by_folder):
        kinds = sorted({b.kind for b in by_folder[folder]})
        for kind in kinds:
            plan = FolderPlan(root=folder, fmt=kind, bundles=[b for b in by_folder[folder] if b.kind == kind])
            if kind == "compiled" or len(kinds) == 1:
                plan.aux = sorted(aux_by_folder.get(folder, []), key=lambda f: f.path)
            plans.append(plan)
    return plans


def variants_by_folder(files: list[RepoFile], *, layout: str, claims: Callable[[set[str]], bool],
                       attention_of: Callable[[str], tuple[str, str]]) -> list[Variant]:
    """One variant per folder of bundles and format (see `folder_plans`), ids made unique.

    `claims(folders)` says whether the layout applies, given the folders that hold bundles;
    `attention_of(root)` gives a folder's attention and where it was read (`path` or `default`).
    """
    bundles, loose = find_bundles(clean_files(files))
    folders = bundle_folders(bundles)
    if not claims(folders):
        return []
    variants: list[Variant] = []
    for plan in folder_plans(bundles, loose, folders):
        attention, attention_from = attention_of(plan.root)
        variant = folder_variant(plan, layout=layout, attention=attention, tags=tags_in(plan.root),
                                 resolution=resolution_in(plan.root),
                                 extra={"attention_from": attention_from, "format_from": "content"})
        if variant is not None:
            variants.append(variant)
    return dedupe_ids(variants)


def bundle_folders(bundles: list[Bundle]) -> set[str]:
    """Folders that directly hold bundles, `controlnet/` subfolders excluded when their parent holds bundles."""
    folders = {b.folder for b in bundles}
    return {f for f in folders if not (basename(f) == CONTROLNET_DIR and parent(f) in folders)}


def dedupe_ids(variants: list[Variant]) -> list[Variant]:
    """Make ids unique: colliding variants get a tag from their root's top folder, then a counter."""
    counts = Counter(v.id for v in variants)
    out: list[Variant] = []
    taken: set[str] = {v.id for v in variants if counts[v.id] == 1}
    for v in variants:
        if counts[v.id] == 1:
            out.append(v)
            continue
        base_tag = slug(v.root.split("/")[0] if v.root else "root")
        tags = list(v.tags) + [base_tag]
        new_id = variant_id(v.attention, v.format, v.resolution, tags)
        n = 2
        while new_id in taken:
            tags = list(v.tags) + [f"{base_tag}-{n}"]
            new_id = variant_id(v.attention, v.format, v.resolution, tags)
            n += 1
        taken.add(new_id)
        out.append(dataclasses.replace(v, id=new_id, tags=tuple(tags)))
    return out


# ---------------------------------------------------------------- shared layout behaviour

def glob_escape(path: str) -> str:
    """A pattern that fnmatch matches against `path` only (`[`, `*`, `?` made literal)."""
    return re.sub(r"([\[*?])", r"[\1]", path)


def guarded(name: str, find: Callable[[list[RepoFile]], list[Variant]], files: list[RepoFile]) -> list[Variant]:
    """Layouts never raise: an unexpected file list gives no variants (logged at debug level)."""
    try:
        return find(files)
    except Exception:  # noqa: BLE001 - contract: never break discovery
        log.debug("layout %s failed on a file list", name, exc_info=True)
        return []


def place(src: Path, target: Path) -> None:
    """Move a downloaded file into the variant folder; a symlink (a Hub cache entry) is copied, never moved."""
    target.parent.mkdir(parents=True, exist_ok=True)
    if src.is_symlink():
        shutil.copy2(src.resolve(strict=True), target)
    else:
        shutil.move(str(src), str(target))


def materialize_folder(downloaded_dir: Path, variant: Variant, dest: Path) -> None:
    """Move the variant's files from the download tree into `dest`, relative to the variant's root."""
    from coreml_hub.errors import EntryNotFound

    downloaded_dir, dest = Path(downloaded_dir), Path(dest)
    check_empty_dest(dest, "build the variant in")
    sources = [(downloaded_dir.joinpath(*p.split("/")), in_variant(variant.root, p)) for p in variant.files]
    missing = [str(src) for src, _ in sources if not src.is_file()]
    if missing:
        raise EntryNotFound(
            f"{len(missing)} file(s) of {variant.id} are missing from the download, e.g. {missing[0]}.",
            hint="Pull the variant again; the download resumes.",
        )
    with building_dir(dest, "building") as staging:
        for src, rel in sources:
            place(src, staging.joinpath(*rel.split("/")))


class LayoutBase:
    """What the built-in layouts share: a guarded finder, exact paths, folder materialization."""

    name = ""

    @staticmethod
    def find(files: list[RepoFile]) -> list[Variant]:
        raise NotImplementedError

    def variants(self, files: list[RepoFile]) -> list[Variant]:
        return guarded(self.name, self.find, files)

    def allow_patterns(self, variant: Variant) -> list[str]:
        return [glob_escape(path) for path in variant.files]

    def materialize(self, downloaded_dir: Path, variant: Variant, dest: Path, **_: object) -> None:
        materialize_folder(downloaded_dir, variant, dest)


# ---------------------------------------------------------------- ControlNets

def controlnet_name(bundle: Bundle) -> str:
    """What `--controlnet` names a bundle: `controlnet/<Name>.mlmodelc` -> `<Name>`;
    `ControlNet_<org>_<name>.mlpackage` -> `<org>_<name>`."""
    return bundle.name.removeprefix(CONTROLNET_PREFIX)


def bundle_controlnets(files: list[RepoFile], layout: str) -> list[ControlNetEntry]:
    """ControlNet bundles of a repo: in a `controlnet/` folder (Apple's compiled layout; it belongs to
    the folder above it) or named `ControlNet_*` (packages; it belongs to its own folder)."""
    bundles, _ = find_bundles(clean_files(files))
    found = []
    for bundle in bundles:
        role, _model = bundle_role(bundle)
        in_dir = basename(bundle.folder) == CONTROLNET_DIR
        if role != "controlnet" and not in_dir:
            continue
        folder = parent(bundle.folder) if in_dir else bundle.folder
        found.append(ControlNetEntry(
            name=controlnet_name(bundle), root=bundle.path, format=bundle.kind, layout=layout, files=bundle.files,
            folder=folder, attention=attention_in(bundle.path), resolution=resolution_in(bundle.path)))
    return found
