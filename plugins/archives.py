"""Zip archives as variants: Apple's root zips, zip mirrors and the community org's zips.

Only `.zip` files are considered (a zipped single bundle, `X.mlmodelc.zip`, is
not a variant). A zip is a variant when its name or folders name an attention
(`original`, `split_einsum`/`split-einsum`, `..._v2`) or a format (`compiled`,
`packages`); the file name wins over its folders, the nearest folder over
outer ones. A missing format is `compiled` (community zips hold the Swift
resources); a missing attention is `original`. Resolution (`512x768`) and tags
(`6bit`, `cn` or "For ControlNet", `no-i2i`, `palettized`, `mbp-4.50`) are read
from the whole path, spaces and hyphens included.

Mirrors: a zip named `<repo>_<attention>_<format>.zip` (Apple's and the
pcuenq mirrors' convention) in a repo that also has exactly one complete
folder variant with that attention and format is that folder zipped: its id is
the folder variant's id plus `+zip`, and it reports that variant's components
(`extra["components_from"] = "folder:<root>"`). Other zips report the
components their names imply (`extra["components_from"] = "archive-name"`):
text_encoder, unet, vae_decoder, vae_encoder; + text_encoder_2 for SDXL names
(`xl`, `sdxl`, or 1024 px); - vae_encoder for `no-i2i`; + controlnet for `cn`
(a Unet that takes ControlNet residuals); SD3 names (`sd3`, `stable-diffusion-3`,
argmaxinc's repos) imply text_encoder, text_encoder_2, mmdit and vae_decoder, plus
text_encoder_t5 when the name says `t5`. What a zip really holds is known
after extraction, when the store checks the bundle.

An id that another variant of the repo already has gets `+zip`, then a tag
from the archive's name.

ControlNet archives: a zip in a folder named `CN`, `controlnet` or `controlnets` (any case;
coreml-community's ControlNet collection keeps its zips under `CN/`) is a ControlNet, never a
variant; it is named by its file name without `.zip`, with the attention and resolution its path
names. `pull --controlnet NAME` fetches it and keeps the one bundle it holds. `materialize` extracts safely (coreml_hub.archive)
and keeps the one folder of the archive that holds the variant's bundles,
preferring the variant's format, then a folder named after the format, then
one named after the attention: an archive that unpacks to `compiled/` and
`packages/` gives `compiled/` to a compiled variant.
"""

from __future__ import annotations

import dataclasses
import os
import re
import shutil
from pathlib import Path
from typing import Callable

from coreml_hub.atomic import check_empty_dest, temp_dir_beside
from coreml_hub.hookspecs import hookimpl
from coreml_hub.layouts import ControlNetEntry, RepoFile, Variant, sort_components, variant_id

from ._common import (
    BUNDLE_SUFFIXES,
    COMPILED_MARKERS,
    CONTROLNET_DIR,
    DEFAULT_ATTENTION,
    JUNK_PARTS,
    PACKAGE_MARKERS,
    LayoutBase,
    attention_in,
    basename,
    clean_files,
    find_bundles,
    format_in,
    guarded,
    looks_xl,
    order_tags,
    parent,
    resolution_in,
    slug,
    tags_in,
)
from .apple import find_apple_variants
from .flat import find_flat_variants

CONTROLNET_FOLDERS = frozenset({"cn", "controlnet", "controlnets"})
_APPLE_ZIP = re.compile(r"^(?P<prefix>.+)_(?P<attention>original|split_einsum_v2|split_einsum)_(?P<fmt>compiled|packages)$")
BASE_COMPONENTS = ("text_encoder", "unet", "vae_decoder", "vae_encoder")
SD3_COMPONENTS = ("text_encoder", "text_encoder_2", "mmdit", "vae_decoder")
_SD3 = re.compile(r"(?<![a-z0-9])(?:sd3|stable[-_ ]?diffusion[-_ ]?3)(?![0-9])")
_T5 = re.compile(r"(?<![a-z0-9])t5(?![a-z0-9])")


def _is_variant_zip(path: str) -> bool:
    lower = path.lower()
    if not lower.endswith(".zip"):
        return False
    stem = lower[:-4]
    return not any(stem.endswith(suffix) for suffix in BUNDLE_SUFFIXES)


def is_controlnet_zip(path: str) -> bool:
    """A zip kept in a ControlNet folder (`CN/...`, `controlnet/...`)."""
    return path.lower().endswith(".zip") and any(p.lower() in CONTROLNET_FOLDERS for p in path.split("/")[:-1])


def find_controlnet_archives(files: list[RepoFile]) -> list[ControlNetEntry]:
    """One ControlNet per zip in a ControlNet folder."""
    _, loose = find_bundles(clean_files(files))
    found = []
    for zf in sorted((f for f in loose if is_controlnet_zip(f.path)), key=lambda f: f.path):
        found.append(ControlNetEntry(name=basename(zf.path)[:-4], root=zf.path, format="compiled",
                                     layout=ArchiveLayout.name, files=(zf,), archive=True,
                                     attention=attention_in(zf.path), resolution=resolution_in(zf.path)))
    return found


def _first(found_in: Callable[[str], str | None], stem: str, folders: list[str]) -> str | None:
    """Search the file name, then its folders from the nearest outwards."""
    for text in [stem, *reversed(folders)]:
        value = found_in(text)
        if value:
            return value
    return None


def expected_components(tags: list[str], xl: bool, sd3: bool = False, t5: bool = False) -> tuple[str, ...]:
    if sd3:  # argmaxinc's zips: the CLIP pair, the transformer, the decoder; T5 when the name says so
        return sort_components(SD3_COMPONENTS + (("text_encoder_t5",) if t5 else ()))
    comps = set(BASE_COMPONENTS)
    if xl:
        comps.add("text_encoder_2")
    if "no-i2i" in tags:
        comps.discard("vae_encoder")
    if "cn" in tags:
        comps.add("controlnet")
    return sort_components(comps)


def _archive_variant(zf: RepoFile, folder_variants: list[Variant]) -> Variant | None:
    path = zf.path
    stem = basename(path)[:-4]
    folders = [p for p in parent(path).split("/") if p]
    attention = _first(attention_in, stem, folders)
    fmt = _first(format_in, stem, folders)
    if attention is None and fmt is None:
        return None
    resolution = _first(resolution_in, stem, folders)
    tags = tags_in(path)
    extra: dict = {
        "attention_from": "name" if attention else "default",
        "format_from": "name" if fmt else "default",
    }
    attention = attention or DEFAULT_ATTENTION
    fmt = fmt or "compiled"

    mirror = None
    apple_name = _APPLE_ZIP.match(stem)
    if apple_name and not folders:
        matches = [v for v in folder_variants
                   if not v.partial and v.attention == attention and v.format == fmt and v.resolution == resolution]
        mirror = matches[0] if len(matches) == 1 else None
    if mirror is not None:
        tags = order_tags([*mirror.tags, "zip"])
        components = mirror.components
        extra.update(components_from=f"folder:{mirror.root}", mirror_of=mirror.id)
    else:
        lower = path.lower()
        components = expected_components(tags, looks_xl(path, resolution), sd3=bool(_SD3.search(lower)),
                                         t5=bool(_T5.search(lower)))
        extra["components_from"] = "archive-name"
    return Variant(
        id=variant_id(attention, fmt, resolution, tags),
        attention=attention,
        format=fmt,
        layout=ArchiveLayout.name,
        root=path,
        archive=True,
        resolution=resolution,
        tags=tuple(tags),
        components=components,
        tokenizer_files=("merges.txt", "vocab.json") if fmt == "compiled" else (),
        common_files=(zf,),
        model_version=mirror.model_version if mirror is not None else None,
        extra=extra,
    )


def _retag(variant: Variant, tags: list[str]) -> Variant:
    tags = order_tags(tags)
    return dataclasses.replace(
        variant, tags=tuple(tags), id=variant_id(variant.attention, variant.format, variant.resolution, tags)
    )


def find_archive_variants(files: list[RepoFile]) -> list[Variant]:
    """One variant per zip archive that names an attention or a format."""
    files = clean_files(files)
    _, loose = find_bundles(files)  # a zip inside a bundle is part of that bundle
    zips = sorted((f for f in loose if _is_variant_zip(f.path) and not is_controlnet_zip(f.path)),
                  key=lambda f: f.path)
    if not zips:
        return []
    folder_variants = (guarded("apple", find_apple_variants, files)
                       + guarded("flat", find_flat_variants, files))
    taken = {v.id for v in folder_variants}
    out: list[Variant] = []
    for zf in zips:
        variant = _archive_variant(zf, folder_variants)
        if variant is None:
            continue
        if variant.id in taken and "zip" not in variant.tags:
            variant = _retag(variant, [*variant.tags, "zip"])
        base_tags = list(variant.tags)
        n = 1
        while variant.id in taken:
            name_tag = slug(basename(zf.path)[:-4]) + (f"-{n}" if n > 1 else "")
            variant = _retag(variant, [*base_tags, name_tag])
            n += 1
        taken.add(variant.id)
        out.append(variant)
    return out


# ---------------------------------------------------------------- materialize

def _bundle_kind(folder: Path) -> str | None:
    try:
        names = set(os.listdir(folder))
    except OSError:
        return None
    if names & COMPILED_MARKERS:
        return "compiled"
    if names & PACKAGE_MARKERS:
        return "packages"
    lower = folder.name.lower()
    for suffix, kind in BUNDLE_SUFFIXES.items():
        if lower.endswith(suffix):
            return kind
    return None


def bundle_containers(root: Path) -> dict[Path, list[str]]:
    """Folders under `root` that directly hold bundles, with the bundles' formats."""
    found: dict[Path, list[str]] = {}
    for dirpath, dirnames, _ in os.walk(root):
        here = Path(dirpath)
        dirnames[:] = sorted(d for d in dirnames if d not in JUNK_PARTS and not d.startswith("._"))
        for name in list(dirnames):
            kind = _bundle_kind(here / name)
            if kind:
                found.setdefault(here, []).append(kind)
                dirnames.remove(name)  # never look inside a bundle
    return {
        folder: kinds for folder, kinds in found.items()
        if not (folder.name == CONTROLNET_DIR and folder.parent in found)
    }


def choose_container(root: Path, variant: Variant) -> Path:
    """The folder of an extracted archive that holds `variant`'s bundles."""
    from coreml_hub.errors import InvalidBundle

    containers = bundle_containers(root)

    def score(item: tuple[Path, list[str]]) -> tuple:
        folder, kinds = item
        parts = [p.lower().replace("-", "_") for p in folder.relative_to(root).parts]
        return (
            variant.format in kinds,
            variant.format in parts,
            variant.attention in parts,
            kinds.count(variant.format),
            -len(parts),
        )

    best = max(sorted(containers.items(), key=lambda kv: str(kv[0])), key=score, default=None)
    if best is None or variant.format not in best[1]:
        raise InvalidBundle(
            f"The archive {variant.root} holds no {variant.format} bundles "
            f"(found: {', '.join(sorted({k for ks in containers.values() for k in ks})) or 'none'})."
        )
    return best[0]


def _strip_junk(folder: Path) -> None:
    for dirpath, dirnames, filenames in os.walk(folder, topdown=True):
        for name in list(dirnames):
            if name in JUNK_PARTS:
                shutil.rmtree(Path(dirpath) / name, ignore_errors=True)
                dirnames.remove(name)
        for name in filenames:
            if name in JUNK_PARTS or name.startswith("._"):
                (Path(dirpath) / name).unlink(missing_ok=True)


class ArchiveLayout(LayoutBase):
    """Zip archives: Apple root zips, zip mirrors, community zips."""

    name = "archives"
    find = staticmethod(find_archive_variants)

    def controlnets(self, files: list[RepoFile]) -> list[ControlNetEntry]:
        """ControlNet archives (zips in a `CN/` or `controlnet/` folder)."""
        return guarded(self.name, find_controlnet_archives, files)

    def materialize(
        self,
        downloaded_dir: Path,
        variant: Variant,
        dest: Path,
        *,
        progress=None,  # type: ignore[no-untyped-def]
        max_total_bytes: int | None = None,
        **_: object,
    ) -> None:
        """Extract the archive safely and keep the folder holding the variant's bundles as `dest`.

        `progress(done_bytes, total_bytes)` follows the extraction. The archive itself is left in place.
        """
        from coreml_hub.archive import safe_extract
        from coreml_hub.errors import EntryNotFound

        dest = Path(dest)
        check_empty_dest(dest, "build the variant in")
        zip_path = Path(downloaded_dir).joinpath(*variant.root.split("/"))
        if not zip_path.is_file():
            raise EntryNotFound(f"The archive {variant.root} is missing from the download ({zip_path}).",
                                hint="Pull the variant again; the download resumes.")
        work = temp_dir_beside(dest, "unpacking")
        try:
            extracted = work / "archive"
            safe_extract(zip_path, extracted, max_total_bytes=max_total_bytes, progress=progress)
            container = choose_container(extracted, variant)
            _strip_junk(container)
            container.chmod(0o755)
            os.replace(container, dest)
        finally:
            shutil.rmtree(work, ignore_errors=True)


@hookimpl
def register_layouts(register) -> None:  # type: ignore[no-untyped-def]
    register(ArchiveLayout())

