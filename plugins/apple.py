"""Apple's Hub layouts.

- SD 1.x/2.x and the palettized repos: `<attention>/<format>/` folders
  (`original/compiled/`, `split_einsum_v2/packages/`, ...).
- SDXL: `compiled/` and `packages/` with no attention level above them; the
  attention is then `original` (the file list cannot show it; a pulled
  variant's Unet metadata can), recorded as `extra["attention_from"] = "default"`.
- The same folders under a prefix folder whose name carries tags
  (`coreml-stable-diffusion-xl-base_mbp_4_50_palettized/compiled/` ->
  `original/compiled+mbp-4.50+palettized`).
- Any other folder of bundles in such a repo becomes its own variant, one per
  format; a lone Unet (the mixed-bit repo's
  `unet-mbp-sdxl-1-base/recipe_4_50_bit_mixedpalette/`) is a `partial`
  variant tagged `unet-only`, never a pipeline. `recipes/*.json` are no variant.

The format is what the bundles are (by content), whatever the folder is called.
This layout claims a repo only when it has a `compiled/` or `packages/` folder
of bundles; the flat layout stays silent on such repos.
"""

from __future__ import annotations

from coreml_hub.hookspecs import hookimpl
from coreml_hub.layouts import ControlNetEntry, RepoFile, Variant

from ._common import (
    DEFAULT_ATTENTION,
    LayoutBase,
    attention_in,
    basename,
    bundle_controlnets,
    guarded,
    variants_by_folder,
)

FORMAT_FOLDERS = ("compiled", "packages")


def apple_roots(folders: set[str]) -> set[str]:
    """Folders named `compiled` or `packages` that hold bundles: the mark of an Apple layout."""
    return {f for f in folders if basename(f) in FORMAT_FOLDERS}


def _attention(root: str) -> tuple[str, str]:
    """The attention named by the innermost folder of `root` that names one, else the default."""
    for part in reversed(root.split("/")):
        found = attention_in(part)
        if found:
            return found, "path"
    return DEFAULT_ATTENTION, "default"


def find_apple_variants(files: list[RepoFile]) -> list[Variant]:
    """Variants of an Apple-shaped repo; [] for any other repo."""
    return variants_by_folder(files, layout=AppleLayout.name, claims=lambda folders: bool(apple_roots(folders)),
                              attention_of=_attention)


class AppleLayout(LayoutBase):
    """Apple's folder layouts (SD 1.x/2.x, SDXL, palettized, mixed-bit)."""

    name = "apple"
    find = staticmethod(find_apple_variants)

    def controlnets(self, files: list[RepoFile]) -> list[ControlNetEntry]:
        """ControlNet bundles: `controlnet/<Name>.mlmodelc` beside compiled bundles, `ControlNet_*.mlpackage`."""
        return guarded(self.name, lambda f: bundle_controlnets(f, self.name), files)


@hookimpl
def register_layouts(register) -> None:  # type: ignore[no-untyped-def]
    register(AppleLayout())
