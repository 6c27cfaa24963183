"""Turn `run`'s MODEL argument into a variant folder: a local folder, or a pulled (or now pulled) model."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from ..errors import InvalidBundle, ModelNotPulled, UsageError

@dataclass(frozen=True)
class ResolvedModel:
    """Where a model's bundles are, and what to call it in metadata."""

    path: Path
    name: str
    repo: str | None = None
    variant: str | None = None
    revision: str | None = None
    pulled_now: bool = False

    def to_dict(self) -> dict[str, Any]:
        return {"path": str(self.path), "name": self.name, "repo": self.repo, "variant": self.variant,
                "revision": self.revision, "pulled_now": self.pulled_now}


def resolve_local(path: Path) -> ResolvedModel:
    """A variant folder, a store entry, or a folder (like `convert -o`) holding exactly one variant."""
    path = path.expanduser().resolve()
    if path.suffix in (".mlpackage", ".mlmodelc"):
        raise UsageError(f"{path.name} is a single bundle; `run` needs the folder holding all of a variant's bundles.",
                         hint=f"Pass {path.parent} instead.")
    from ..bundle import one_variant

    folder = one_variant(path, "run")
    if folder is None:
        raise InvalidBundle(f"No Core ML Stable Diffusion bundles found in {path}.",
                            hint="Pass a variant folder (holding TextEncoder/Unet/VAEDecoder bundles), "
                                 "the -o folder of `coreml-hub convert`, or a repo id.")
    repo = variant = revision = None
    try:
        from ..store import MANIFEST_NAME, load_entry

        if (folder / MANIFEST_NAME).is_file():
            entry = load_entry(folder)
            repo, variant, revision = entry.repo, entry.variant, entry.commit
    except Exception:  # a local folder needs no store metadata
        pass
    name = folder.name
    from ..layouts import ATTENTIONS, FORMATS

    if folder.name in FORMATS and folder.parent.name in ATTENTIONS:  # OUT/<attention>/<format> of `convert`
        variant = variant or f"{folder.parent.name}/{folder.name}"
        name = folder.parent.parent.name
    elif variant is None and folder != path:
        variant = folder.relative_to(path).as_posix()
    return ResolvedModel(path=folder, name=repo or name, repo=repo, variant=variant, revision=revision)


def looks_like_path(text: str) -> bool:
    """A folder rather than `ORG/NAME[@REV][:VARIANT]` (variant ids hold slashes of their own)."""
    repo_part = text.split(":", 1)[0]
    return text.startswith((".", "/", "~")) or (os.sep != "/" and os.sep in text) or repo_part.count("/") > 1


def resolve_model(text: str, *, pull: bool = True, progress: bool = False,
                  on_message: Callable[[str], None] | None = None, chunked: bool | None = None) -> ResolvedModel:
    """MODEL as `run` takes it: a folder, `REPO`, `REPO:VARIANT`, `REPO@REV[:VARIANT]`.

    `chunked` picks a pulled model's Unet form (and the form a pull fetches); None takes the
    full Unet where both are pulled."""
    candidate = Path(text).expanduser()
    if candidate.exists():
        if chunked is not None:
            raise UsageError(f"--chunked/--no-chunked picks the Unet form of a pulled model; {text} is a folder.",
                             hint="Drop the flag, or name the model as ORG/NAME[:VARIANT].")
        return resolve_local(candidate)
    if looks_like_path(text):
        raise InvalidBundle(f"No such folder: {text}.",
                            hint="Pass an existing variant folder, or a repo id such as ORG/NAME[:VARIANT].")
    from .. import store

    ref = store.parse_ref(text)
    try:
        pulled = store.find_pulled(ref, require_ok=True, chunked=chunked)
        pulled_now = False
    except ModelNotPulled as exc:
        if not pull:
            asked = f"{ref}{store.chunked_flag(chunked)}"
            raise ModelNotPulled(exc.message, hint=f"Pull it with `coreml-hub pull {asked}` (or drop --no-pull "
                                                   "to pull it automatically).") from None
        if on_message:
            on_message(f"{ref} is not pulled yet; pulling it.")
        store.pull(str(ref), progress=progress, chunked=chunked)
        pulled = store.find_pulled(ref, require_ok=True, chunked=chunked)
        pulled_now = True
        if on_message:
            on_message(f"Pulled {pulled.ref()}{pulled.form_flag} ({pulled.commit[:7]}).")
    return ResolvedModel(path=Path(pulled.path), name=pulled.repo, repo=pulled.repo, variant=pulled.variant,
                         revision=pulled.commit, pulled_now=pulled_now)
