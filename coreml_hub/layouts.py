"""The Variant model and what layout plugins share.

A layout plugin turns a repo's file list into variants. It has:
- `name: str`
- `variants(files: list[RepoFile]) -> list[Variant]`: empty when it does not apply; never raises
- `allow_patterns(variant) -> list[str]`: the repo paths to fetch (defaults to `variant.files`)
- `materialize(downloaded_dir, variant, dest) -> None`: turn the fetched files into a
  variant folder in `dest` (copy/move bundles, extract a zip)
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
    "UnetRefiner": "refiner",  # the SDXL refiner's Unet (Apple's `--refiner-version`)
    "UnetRefinerChunk1": "refiner_chunk1",
    "UnetRefinerChunk2": "refiner_chunk2",
}
COMPILED_FILE_OF = {v: k for k, v in COMPILED_NAMES.items()}

TOKENIZER_FILES = ("vocab.json", "merges.txt")


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
        comps = [c for c in self.components if c not in ("unet", "unet_chunk1", "unet_chunk2")]
        comps += ["unet"] if form == "full" else ["unet_chunk1", "unet_chunk2"]
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
        }


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
