"""Flat repos: bundles at the repo root or in one or more plain folders.

Each folder that holds bundles is a variant per format found in it; the format
comes from the bundles' content (a folder `mlpackages/` of `.mlmodelc` bundles
is `compiled`). Attention, resolution and tags come from the folder's path when
it names them (`split-einsum/`), else the attention is `original`
(`extra["attention_from"] = "default"`). Repos with Apple's `compiled/` or
`packages/` folders belong to the apple layout: this one gives them nothing.
Folders whose bundles are no known Stable Diffusion component give nothing.
"""

from __future__ import annotations

from coreml_hub.hookspecs import hookimpl
from coreml_hub.layouts import ControlNetEntry, RepoFile, Variant

from ._common import DEFAULT_ATTENTION, LayoutBase, attention_in, bundle_controlnets, guarded, variants_by_folder
from .apple import apple_roots


def _claims(folders: set[str]) -> bool:
    """Any folder of bundles, unless Apple's `compiled/`/`packages/` folders make it an Apple repo."""
    return bool(folders) and not apple_roots(folders)


def _attention(root: str) -> tuple[str, str]:
    found = attention_in(root)
    return (found, "path") if found else (DEFAULT_ATTENTION, "default")


def find_flat_variants(files: list[RepoFile]) -> list[Variant]:
    """Variants of a flat repo; [] for Apple-shaped repos and repos without bundles."""
    return variants_by_folder(files, layout=FlatLayout.name, claims=_claims, attention_of=_attention)


class FlatLayout(LayoutBase):
    """Bundles at the repo root or in plain folders, found by content."""

    name = "flat"
    find = staticmethod(find_flat_variants)

    def controlnets(self, files: list[RepoFile]) -> list[ControlNetEntry]:
        """ControlNet bundles: `controlnet/<Name>.mlmodelc` beside compiled bundles, `ControlNet_*.mlpackage`."""
        return guarded(self.name, lambda f: bundle_controlnets(f, self.name), files)


@hookimpl
def register_layouts(register) -> None:  # type: ignore[no-untyped-def]
    register(FlatLayout())
