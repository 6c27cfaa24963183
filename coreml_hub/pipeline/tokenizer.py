"""CLIP BPE tokenizer for the text encoders, read from the files a variant carries.

Compiled variants ship `vocab.json` + `merges.txt` beside the bundles; packages variants
get the PyTorch model's `tokenizer/` files at pull time (`vocab.json`, `merges.txt`,
maybe `tokenizer.json` and `tokenizer_config.json`). transformers is imported lazily.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import InvalidBundle

BOS = "<|startoftext|>"
EOS = "<|endoftext|>"
MAX_LENGTH = 77

# Folders, relative to a variant folder, that may hold tokenizer files (first match wins).
TOKENIZER_DIRS = {
    1: ("", "tokenizer"),
    2: ("tokenizer_2", ""),
}


@dataclass(frozen=True)
class TokenizerFiles:
    """Where one tokenizer's files are, and the padding it uses."""

    folder: Path
    vocab: Path | None
    merges: Path | None
    tokenizer_json: Path | None
    pad_token: str
    max_length: int


def model_roots(variant_dir: Path) -> list[Path]:
    """Folders that may hold a variant's shared files: the variant folder itself, and for the
    `<attention>/<format>` layout (`convert -o OUT`, Apple repos) the folder above both."""
    from ..layouts import ATTENTIONS, FORMATS

    roots = [variant_dir]
    parent = variant_dir.parent
    if variant_dir.name in FORMATS and parent.name in ATTENTIONS:
        roots.append(parent.parent)
    return roots


def find_tokenizer_files(variant_dir: Path, which: int = 1, *, default_pad: str = EOS,
                         also: tuple[Path, ...] = ()) -> TokenizerFiles:
    """Locate tokenizer `which` (1, or 2 for SDXL's second encoder) for a variant folder
    (and the folders in `also`, e.g. the one the bundles sit in)."""
    roots = [r for base in (*also, variant_dir) for r in model_roots(base)]
    candidates = [root / sub if sub else root for root in dict.fromkeys(roots) for sub in TOKENIZER_DIRS[which]]
    for folder in candidates:
        vocab, merges, tok_json = folder / "vocab.json", folder / "merges.txt", folder / "tokenizer.json"
        has_bpe = vocab.is_file() and merges.is_file()
        if not has_bpe and not tok_json.is_file():
            continue
        pad, max_len = _read_config(folder / "tokenizer_config.json", default_pad)
        return TokenizerFiles(folder, vocab if has_bpe else None, merges if has_bpe else None,
                              tok_json if tok_json.is_file() else None, pad, max_len)
    raise InvalidBundle(
        f"No tokenizer files (vocab.json + merges.txt) found in {variant_dir}.",
        hint="Compiled variants ship them beside the bundles; for packages, re-pull so the "
             "PyTorch model's tokenizer files are fetched, or copy them into the folder.",
    )


def _read_config(path: Path, default_pad: str) -> tuple[str, int]:
    if not path.is_file():
        return default_pad, MAX_LENGTH
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError):
        return default_pad, MAX_LENGTH
    pad = config.get("pad_token", default_pad)
    if isinstance(pad, dict):  # AddedToken serialised as a dict
        pad = pad.get("content", default_pad)
    max_len = config.get("model_max_length", MAX_LENGTH)
    if not isinstance(max_len, int) or max_len > 10_000:  # "very large" sentinel in some configs
        max_len = MAX_LENGTH
    return str(pad), max_len


class ClipTokenizer:
    """Turns a prompt into exactly `length` token ids: BOS, BPE tokens, EOS, then padding."""

    def __init__(self, files: TokenizerFiles, length: int | None = None) -> None:
        self.files = files
        self.length = length or files.max_length
        self._tok = _load_backend(files)
        self.pad_id = self._token_id(files.pad_token)
        self.bos_id = self._token_id(BOS)
        self.eos_id = self._token_id(EOS)

    def _token_id(self, token: str) -> int:
        token_id = self._tok.convert_tokens_to_ids(token)
        if token_id is None or (token_id == self._tok.unk_token_id and token not in (EOS,)):
            vocab = self._tok.get_vocab()
            if token not in vocab:
                raise InvalidBundle(f"Tokenizer in {self.files.folder} has no token {token!r}.")
            token_id = vocab[token]
        return int(token_id)

    def encode(self, text: str) -> list[int]:
        """Ids for one prompt, truncated and padded to `self.length`."""
        pieces = self._tok(text, add_special_tokens=False)["input_ids"]
        body = list(pieces)[: self.length - 2]
        ids = [self.bos_id, *body, self.eos_id]
        return ids + [self.pad_id] * (self.length - len(ids))

    def __call__(self, text: str) -> list[int]:
        return self.encode(text)

    def truncated(self, text: str) -> bool:
        """True when the prompt has more tokens than fit (the rest is dropped)."""
        return len(self._tok(text, add_special_tokens=False)["input_ids"]) > self.length - 2


def _load_backend(files: TokenizerFiles) -> Any:
    from transformers import CLIPTokenizer

    kwargs = {"pad_token": files.pad_token}
    if files.vocab is not None and files.merges is not None:
        # Positional: transformers 5 silently builds an empty model from vocab_file=/merges_file=.
        tok = CLIPTokenizer(str(files.vocab), str(files.merges), **kwargs)
    else:
        tok = CLIPTokenizer(tokenizer_file=str(files.tokenizer_json), **kwargs)
    if len(tok.get_vocab()) <= 2:
        raise InvalidBundle(f"The tokenizer files in {files.folder} produced an empty vocabulary.")
    return tok


def load_tokenizer(variant_dir: Path, which: int = 1, *, length: int | None = None,
                   default_pad: str = EOS, also: tuple[Path, ...] = ()) -> ClipTokenizer:
    """The tokenizer for text encoder `which` of the variant in `variant_dir`."""
    return ClipTokenizer(find_tokenizer_files(variant_dir, which, default_pad=default_pad, also=also), length)
