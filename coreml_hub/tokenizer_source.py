"""Where a task's tokenizer comes from: `--tokenizer`, the model's own folder, or a Hub repo.

Language models exported by Hugging Face's tools name the model they were converted from in
their metadata (`co.huggingface.exporters.name`); repos such as apple/mistral-coreml ship no
tokenizer, so its files (a few MB at most, never weights) are fetched from that repo into the
Hugging Face cache. CLIP-style encoders (apple/coreml-mobileclip) ship none either and take
CLIP's BPE files from a default repo. A gated repo without a token is one clear error that
says which model needs it and why.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from .errors import GatedRepo, InvalidBundle, RepoNotFound

NAME_KEY = "co.huggingface.exporters.name"
LM_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
            "tokenizer.model", "chat_template.jinja", "chat_template.json", "generation_config.json")
CLIP_FILES = ("vocab.json", "merges.txt", "tokenizer_config.json", "special_tokens_map.json")
CLIP_REPO = "openai/clip-vit-base-patch32"  # the CLIP BPE that MobileCLIP's apps use


@dataclass(frozen=True)
class TokenizerSource:
    """A folder of tokenizer files and where it came from (said in messages and --json)."""

    folder: Path
    origin: str  # "model folder", "--tokenizer", "metadata", "default"
    repo: str | None = None

    def describe(self) -> str:
        if self.origin == "model folder":
            return "the model's folder"
        where = self.repo or str(self.folder)
        return {"--tokenizer": f"{where} (--tokenizer)", "metadata": f"{where} (named by the model's metadata)",
                "default": f"{where} (the default for this kind of model)"}.get(self.origin, where)

    def to_dict(self) -> dict[str, str | None]:
        return {"folder": str(self.folder), "origin": self.origin, "repo": self.repo}


def has_lm_tokenizer(folder: Path) -> bool:
    return (folder / "tokenizer.json").is_file() or (folder / "tokenizer.model").is_file()


def locate(model_name: str, folders: tuple[Path, ...], *, present: Callable[[Path], bool], files: tuple[str, ...],
           wanted: str | None = None, named: str | None = None, default: str | None = None) -> TokenizerSource:
    """The tokenizer: `wanted` (a folder or a repo id), else the first of `folders` holding one,
    else the repo the model's metadata `named`, else the `default` repo."""
    if wanted:
        path = Path(wanted).expanduser()
        if path.exists():
            folder = path if path.is_dir() else path.parent
            if not present(folder):
                raise InvalidBundle(f"{folder} holds no tokenizer files ({', '.join(files[:2])}, ...).",
                                    hint="Pass --tokenizer a folder holding them, or a repo id.")
            return TokenizerSource(folder, "--tokenizer")
        return TokenizerSource(fetch(wanted, files, model_name, "--tokenizer", present), "--tokenizer", wanted)
    for folder in folders:
        if present(folder):
            return TokenizerSource(folder, "model folder")
    if named:
        why = f"named by its metadata ({NAME_KEY})"
        return TokenizerSource(fetch(named, files, model_name, why, present), "metadata", named)
    if default:
        return TokenizerSource(fetch(default, files, model_name, "the default for this kind of model", present),
                               "default", default)
    raise InvalidBundle(f"{model_name} comes with no tokenizer, and its metadata names no repo to take one from.",
                        hint="Pass --tokenizer with a folder or a repo id holding the tokenizer files.")


def fetch(repo: str, files: tuple[str, ...], model_name: str, why: str, present: Callable[[Path], bool]) -> Path:
    """Fetch a tokenizer's files from `repo`, with errors that say which model needs them."""
    from . import hub

    try:
        folder = hub.download_files(repo, files)
    except GatedRepo as exc:
        raise GatedRepo(f"The tokenizer of {model_name} comes from {repo} ({why}), which is gated on "
                        f"{hub.endpoint()}: fetching it needs an access token that was granted access.",
                        hint="Accept its terms on the Hub and set HF_TOKEN (or run `hf auth login`), or pass "
                             "--tokenizer PATH to a local copy of its tokenizer files.") from exc
    except RepoNotFound as exc:
        raise RepoNotFound(f"The tokenizer of {model_name} comes from {repo} ({why}), which {hub.endpoint()} "
                           "does not have (or it is private and no valid token was sent).",
                           hint="Pass --tokenizer with a folder or another repo holding the tokenizer files.") from exc
    if not present(folder):
        raise InvalidBundle(f"{repo} has no tokenizer files ({', '.join(files[:2])}, ...), which {model_name} needs.",
                            hint="Pass --tokenizer with a folder or another repo holding them.")
    return folder
