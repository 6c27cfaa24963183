"""The Variant model and what layout plugins share.

A layout plugin turns a repo's file list into variants. It has:
- `name: str`
- `variants(files: list[RepoFile]) -> list[Variant]`: empty when it does not apply; never raises
- `allow_patterns(variant) -> list[str]`: the repo paths to fetch (defaults to `variant.files`)
- `materialize(downloaded_dir, variant, dest) -> None`: turn the fetched files into a
  variant folder in `dest` (copy/move bundles, extract a zip)
- optionally `controlnets(files: list[RepoFile]) -> list[ControlNetEntry]`: the ControlNets a
  repo holds (never fetched with a variant; `pull --controlnet NAME` fetches one); never raises
- optional `store_path(variant, repo_path) -> str | None`: where a fetched file lands in the
  variant folder when that is not its path relative to `variant.root`, so a pull can reuse
  the download's hash instead of reading the file again

A variant's `kind` says what it is: `pipeline` (a diffusion pipeline: its components are
checked against each other) or `model` (one Core ML model with its companion files, valid
when its bundle is).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Protocol, runtime_checkable

ATTENTIONS = ("original", "split_einsum", "split_einsum_v2")
KINDS = ("pipeline", "model")
FORMATS = ("packages", "compiled")

# Component names as used throughout coreml-hub (Apple's package suffixes).
COMPONENTS = (
    "text_encoder", "text_encoder_2", "text_encoder_t5", "unet", "unet_chunk1", "unet_chunk2", "mmdit",
    "controlled_unet", "controlled_unet_chunk1", "controlled_unet_chunk2",
    "vae_decoder", "vae_encoder", "safety_checker", "controlnet", "refiner", "refiner_chunk1", "refiner_chunk2",
)

# Compiled bundle names (Apple's Swift layout) -> component names.
COMPILED_NAMES = {
    "TextEncoder": "text_encoder",
    "TextEncoder2": "text_encoder_2",
    "TextEncoderT5": "text_encoder_t5",  # SD3's optional T5 (argmaxinc's repos; Apple's Swift pipeline)
    "MultiModalDiffusionTransformer": "mmdit",  # SD3's denoiser, in place of the Unet
    "Unet": "unet",
    "UnetChunk1": "unet_chunk1",
    "UnetChunk2": "unet_chunk2",
    "VAEDecoder": "vae_decoder",
    "VAEEncoder": "vae_encoder",
    "SafetyChecker": "safety_checker",
    "ControlNet": "controlnet",
    "ControlledUnet": "controlled_unet",
    "ControlledUnetChunk1": "controlled_unet_chunk1",
    "ControlledUnetChunk2": "controlled_unet_chunk2",
    "UnetRefiner": "refiner",  # the SDXL refiner's Unet (Apple's `--refiner-version`)
    "UnetRefinerChunk1": "refiner_chunk1",
    "UnetRefinerChunk2": "refiner_chunk2",
}
COMPILED_FILE_OF = {v: k for k, v in COMPILED_NAMES.items()}

TOKENIZER_FILES = ("vocab.json", "merges.txt")

# Apple's package suffixes that differ from the component name (torch2coreml `--unet-support-controlnet`).
PACKAGE_SUFFIX_OF = {
    "controlled_unet": "control-unet",
    "controlled_unet_chunk1": "control-unet_chunk1",
    "controlled_unet_chunk2": "control-unet_chunk2",
}
CONTROLNET_PREFIX = "ControlNet_"  # packages: ControlNet_<org>_<name>.mlpackage beside the pipeline's packages
CONTROLNET_DIR = "controlnet"  # compiled: controlnet/<Name>.mlmodelc beside the pipeline's bundles


def component_of_stem(stem: str) -> str | None:
    """The component a bundle's name (without suffix) stands for: Apple's compiled names
    (`ControlledUnet`), package names (`..._control-unet_chunk1`, `..._text_encoder_2`),
    `ControlNet_<org>_<name>`; None for other names."""
    if stem in COMPILED_NAMES:
        return COMPILED_NAMES[stem]
    if stem.startswith(CONTROLNET_PREFIX):
        return "controlnet"
    lowered = stem.lower()
    suffixes = {PACKAGE_SUFFIX_OF.get(c, c): c for c in COMPONENTS}
    for suffix in sorted(suffixes, key=len, reverse=True):
        if lowered == suffix or lowered.endswith("_" + suffix):
            return suffixes[suffix]
    return None


def controlnet_bundle_name(model_id: str) -> str:
    """Apple's compiled name of a ControlNet: `lllyasviel/sd-controlnet-canny` -> `LllyasvielSdControlnetCanny`
    (the id's `/`, `_` and `-` separated words, each `str.title()`d, as torch2coreml names them)."""
    import re

    slug = model_id.replace("/", "_")
    return "".join(word.title() for word in re.split("[_-]", slug) if word)


def controlnet_key(name: str) -> str:
    """What ControlNet names are compared by: `LllyasvielSdControlnetCanny`, `lllyasviel_sd-controlnet-canny`,
    `ControlNet_lllyasviel_sd-controlnet-canny` and `lllyasviel/sd-controlnet-canny` are one ControlNet."""
    import re

    stem = name.rsplit("/", 1)[-1] if name.endswith((".mlmodelc", ".mlpackage", ".zip")) else name
    for suffix in (".mlmodelc", ".mlpackage", ".zip"):
        stem = stem.removesuffix(suffix)
    stem = stem.removeprefix(CONTROLNET_PREFIX)
    return re.sub(r"[^a-z0-9]", "", stem.lower())


def controlnet_base_key(name: str) -> str:
    """`controlnet_key` without the attention, size and format words an archive's name carries:
    `Canny_split-einsum_512x512` -> `canny`, so that `--controlnet Canny` finds it."""
    import re

    noise = r"(original|split[-_ ]?einsum(?:[-_ ]?v2)?|compiled|packages|[0-9]{3,4}x[0-9]{3,4}|(?<![a-z])cn(?![a-z]))"
    return controlnet_key(re.sub(noise, " ", name, flags=re.IGNORECASE))


@dataclass(frozen=True)
class RepoFile:
    """One file of a repo as the Hub lists it."""

    path: str
    size: int = 0
    sha256: str | None = None  # LFS files only


@dataclass(frozen=True)
class Variant:
    """One runnable form of a repo: attention x format (x resolution, tags).

    `files` are repo paths, exactly what a pull fetches (one Unet form only).
    `unet_files` holds the per-form Unet files so a pull can switch form
    (`full` or `chunked`) with `with_unet_form`.
    """

    id: str
    attention: str
    format: str
    layout: str
    root: str  # folder in the repo holding the bundles, or the archive's path
    archive: bool = False
    resolution: str | None = None  # "WxH"
    tags: tuple[str, ...] = ()
    components: tuple[str, ...] = ()
    tokenizer_files: tuple[str, ...] = ()  # names inside the variant folder once materialized ("vocab.json")
    common_files: tuple[RepoFile, ...] = ()
    unet_files: dict[str, tuple[RepoFile, ...]] = field(default_factory=dict, compare=False, hash=False)
    unet_form: str | None = None  # "full", "chunked" or None when the variant has no Unet choice
    model_version: str | None = None  # PyTorch model the packages were converted from
    partial: bool = False  # lacks a text encoder, a Unet or a VAE decoder (e.g. a lone Unet): never a default pick
    kind: str = "pipeline"  # "pipeline" (diffusion components) or "model" (one model and its companion files)
    extra: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)
    controlnets: tuple[str, ...] = ()  # names of the ControlNets beside it in the repo (fetched only when asked)

    @property
    def file_entries(self) -> tuple[RepoFile, ...]:
        chosen = self.unet_files.get(self.unet_form, ()) if self.unet_form else ()
        return tuple(sorted(self.common_files + chosen, key=lambda f: f.path))

    @property
    def files(self) -> tuple[str, ...]:
        return tuple(f.path for f in self.file_entries)

    @property
    def size_bytes(self) -> int:
        return sum(f.size for f in self.file_entries)

    @property
    def unet_forms(self) -> tuple[str, ...]:
        return tuple(form for form in ("full", "chunked") if self.unet_files.get(form))

    def with_unet_form(self, form: str) -> "Variant":
        """The same variant fetching the `full` or the `chunked` Unet."""
        if form not in self.unet_forms:
            from .errors import VariantNotFound

            raise VariantNotFound(
                f"Variant {self.id} has no {form} Unet (it has: {', '.join(self.unet_forms) or 'none'}).",
                hint="Drop --chunked/--no-chunked to take the form the variant has.",
            )
        comps = list(self.components)
        for base in ("unet", "controlled_unet"):  # a ControlledUnet rides with the form of the Unet
            names = (base, f"{base}_chunk1", f"{base}_chunk2")
            if base == "unet" or any(c in names for c in comps):
                comps = [c for c in comps if c not in names]
                comps += [base] if form == "full" else [f"{base}_chunk1", f"{base}_chunk2"]
        return dataclasses.replace(self, unet_form=form, components=sort_components(comps))

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "kind": self.kind,
            "attention": self.attention,
            "format": self.format,
            "resolution": self.resolution,
            "tags": list(self.tags),
            "components": list(self.components),
            "archive": self.archive,
            "root": self.root,
            "layout": self.layout,
            "unet_form": self.unet_form,
            "unet_forms": list(self.unet_forms),
            "tokenizer_files": list(self.tokenizer_files),
            "model_version": self.model_version,
            "partial": self.partial,
            "size_bytes": self.size_bytes,
            "files": list(self.files),
            "controlnets": list(self.controlnets),
        }


@dataclass(frozen=True)
class ControlNetEntry:
    """One ControlNet in a repo: a bundle folder (`controlnet/<Name>.mlmodelc`, `ControlNet_*.mlpackage`)
    or an archive holding one; `folder` is the variant folder it sits beside ("" when none)."""

    name: str
    root: str  # the bundle's folder in the repo, or the archive's path
    format: str  # "compiled" or "packages"
    layout: str
    files: tuple[RepoFile, ...]
    archive: bool = False
    folder: str = ""
    attention: str | None = None  # when its path names one
    resolution: str | None = None  # "WxH", when its path names one

    @property
    def size_bytes(self) -> int:
        return sum(f.size for f in self.files)

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "root": self.root, "format": self.format, "layout": self.layout,
                "archive": self.archive, "folder": self.folder, "attention": self.attention,
                "resolution": self.resolution, "size_bytes": self.size_bytes, "files": [f.path for f in self.files]}


def component_order(name: str) -> int:
    """Pipeline order of a component name (COMPONENTS); unknown names last."""
    return COMPONENTS.index(name) if name in COMPONENTS else len(COMPONENTS)


def sort_components(names: Iterable[str]) -> tuple[str, ...]:
    return tuple(sorted(set(names), key=component_order))


def in_variant(root: str, path: str) -> str:
    """A repo path as it lies in the variant folder: relative to the variant's root folder when inside it."""
    root = root.strip("/")
    return path[len(root) + 1:] if root and path.startswith(root + "/") else path


def variant_id(attention: str, fmt: str, resolution: str | None = None, tags: Iterable[str] = ()) -> str:
    """`<attention>/<format>[@WxH][+tag...]`, hyphens in attention normalized to underscores."""
    vid = f"{attention.replace('-', '_')}/{fmt}"
    if resolution:
        vid += f"@{resolution}"
    for tag in tags:
        vid += f"+{tag}"
    return vid


@runtime_checkable
class Layout(Protocol):
    name: str

    def variants(self, files: list[RepoFile]) -> list[Variant]: ...

    def allow_patterns(self, variant: Variant) -> list[str]: ...

    def materialize(self, downloaded_dir: Path, variant: Variant, dest: Path) -> None: ...


def find_controlnets(files: list[RepoFile]) -> list[ControlNetEntry]:
    """ControlNets of a repo from every layout plugin that finds them; one entry per root, sorted."""
    from .plugins import get_layouts

    seen: dict[str, ControlNetEntry] = {}
    for layout in get_layouts():
        finder = getattr(layout, "controlnets", None)
        if finder is None:
            continue
        try:
            found = finder(list(files))
        except Exception:  # contract: a layout never breaks discovery for the others
            continue
        for entry in found:
            seen.setdefault(entry.root, entry)
    return sorted(seen.values(), key=lambda e: (e.folder, e.name.lower(), e.root))


def find_variants(files: list[RepoFile]) -> list[Variant]:
    """Variants of a repo from every registered layout plugin; a failing plugin is skipped."""
    from .plugins import get_layouts

    seen: dict[str, Variant] = {}
    for layout in get_layouts():
        try:
            found = layout.variants(list(files))
        except Exception:  # contract: a layout never breaks discovery for the others
            continue
        for variant in found:
            seen.setdefault(variant.id, variant)
    return sorted(seen.values(), key=lambda v: v.id)
