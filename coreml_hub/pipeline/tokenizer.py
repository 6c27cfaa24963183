"""CLIP BPE tokenizer for the text encoders, read from the files a variant carries.

Compiled variants ship `vocab.json` + `merges.txt` beside the bundles; packages variants
get the PyTorch model's `tokenizer/` files at pull time (`vocab.json`, `merges.txt`,
maybe `tokenizer.json` and `tokenizer_config.json`). The byte-level BPE is coreml-hub's own
(stdlib only): `run` needs no transformers import, which costs more than tokenizing.
`tests/test_pipeline.py` checks it id for id against transformers' CLIPTokenizer.
"""

from __future__ import annotations

import json
import re
import unicodedata
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

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
        files = tokenizer_files_in(folder, default_pad=default_pad)
        if files is not None:
            return files
    raise InvalidBundle(
        f"No tokenizer files (vocab.json + merges.txt) found in {variant_dir}.",
        hint="Compiled variants ship them beside the bundles; for packages, re-pull so the "
             "PyTorch model's tokenizer files are fetched, or copy them into the folder.",
    )


def tokenizer_files_in(folder: Path, *, default_pad: str = EOS) -> TokenizerFiles | None:
    """The CLIP BPE files in `folder` itself (`vocab.json` + `merges.txt`, or `tokenizer.json`), or None."""
    vocab, merges, tok_json = folder / "vocab.json", folder / "merges.txt", folder / "tokenizer.json"
    has_bpe = vocab.is_file() and merges.is_file()
    if not has_bpe and not tok_json.is_file():
        return None
    pad, max_len = _read_config(folder / "tokenizer_config.json", default_pad)
    return TokenizerFiles(folder, vocab if has_bpe else None, merges if has_bpe else None,
                          tok_json if tok_json.is_file() else None, pad, max_len)


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


@lru_cache(maxsize=1)
def byte_symbols() -> tuple[str, ...]:
    """Byte -> the printable character byte-level BPE vocabularies spell it with.

    Printable Latin-1 bytes stand for themselves; the other 68 (controls, space, ...) take the
    characters from U+0100 on, in byte order, so every byte has a visible, distinct symbol.
    """
    printable = {*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)}
    spare = iter(range(0x100, 0x200))
    return tuple(chr(b) if b in printable else chr(next(spare)) for b in range(256))


CONTRACTIONS = ("'s", "'t", "'re", "'ve", "'m", "'ll", "'d")
WORD_END = "</w>"


def _kind(char: str) -> str:
    """L (letter), N (number), S (space) or P (anything else), as CLIP's word pattern classes them."""
    if char.isspace():
        return "S"
    major = unicodedata.category(char)[0]
    return major if major in "LN" else "P"


def split_words(text: str) -> list[str]:
    """CLIP's words of normalized text: contractions, letter runs, single digits, runs of other
    characters; spaces separate and are dropped."""
    words: list[str] = []
    i, n = 0, len(text)
    while i < n:
        contraction = next((c for c in CONTRACTIONS if text.startswith(c, i)), None)
        if contraction is not None:
            words.append(contraction)
            i += len(contraction)
            continue
        kind = _kind(text[i])
        end = i + 1
        if kind in "LP":
            while end < n and _kind(text[end]) == kind:
                end += 1
        if kind != "S":
            words.append(text[i:end])
        i = end
    return words


def normalize(text: str) -> str:
    """NFC, whitespace runs to one space, lower case (CLIP's normalizer)."""
    return re.sub(r"\s+", " ", unicodedata.normalize("NFC", text)).lower()


class BytePairEncoder:
    """CLIP's byte-level BPE over a vocabulary and its ranked merges; specials are matched whole."""

    def __init__(self, vocab: dict[str, int], merges: list[tuple[str, str]], unknown: str = EOS,
                 specials: tuple[str, ...] = (BOS, EOS)) -> None:
        self.vocab = vocab
        self.ranks = {pair: rank for rank, pair in enumerate(merges)}
        self.unknown_id = vocab.get(unknown)
        # matched in the raw text before anything else, longest first
        self.specials = tuple(sorted({s for s in specials if s in vocab}, key=len, reverse=True))
        self._split = re.compile("(" + "|".join(re.escape(s) for s in self.specials) + ")") if self.specials else None
        self._cache: dict[str, list[int]] = {}

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`, with no BOS/EOS framing added."""
        ids: list[int] = []
        for part in (self._split.split(text) if self._split else [text]):
            if part in self.specials:
                ids.append(self.vocab[part])
                continue
            symbols = byte_symbols()
            for word in split_words(normalize(part)):
                ids += self._word("".join(symbols[b] for b in word.encode()))
        return ids

    def _word(self, word: str) -> list[int]:
        """One word's ids: merge the best-ranked adjacent pair, everywhere it occurs, until none is ranked."""
        cached = self._cache.get(word)
        if cached is not None:
            return cached
        parts = [*word[:-1], word[-1] + WORD_END]
        unranked = len(self.ranks)
        while len(parts) > 1:
            rank, first = min((self.ranks.get(pair, unranked), i) for i, pair in enumerate(zip(parts, parts[1:])))
            if rank == unranked:
                break
            pair = parts[first:first + 2]
            merged, i = parts[:first], first  # nothing before the first occurrence changes
            while i < len(parts):
                take = 2 if parts[i:i + 2] == pair else 1
                merged.append("".join(parts[i:i + take]))
                i += take
            parts = merged
        ids = [self.vocab.get(p, self.unknown_id) for p in parts]
        ids = [i for i in ids if i is not None]
        if len(self._cache) < 10_000:
            self._cache[word] = ids
        return ids


def _read_bpe(files: TokenizerFiles) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Vocabulary and merges from `vocab.json` + `merges.txt`, else from `tokenizer.json`'s BPE model."""
    try:
        if files.vocab is not None and files.merges is not None:
            vocab = json.loads(files.vocab.read_text(encoding="utf-8"))
            lines = files.merges.read_text(encoding="utf-8").splitlines()
            merges = [tuple(line.split()) for line in lines if line.strip() and not line.startswith("#version")]
        else:
            assert files.tokenizer_json is not None
            model = json.loads(files.tokenizer_json.read_text(encoding="utf-8")).get("model") or {}
            if model.get("type", "BPE") != "BPE":
                raise InvalidBundle(f"{files.tokenizer_json} holds a {model.get('type')} tokenizer, not CLIP's BPE.")
            vocab = model.get("vocab") or {}
            merges = [tuple(m.split()) if isinstance(m, str) else tuple(m) for m in model.get("merges") or []]
    except (OSError, ValueError) as exc:
        raise InvalidBundle(f"The tokenizer files in {files.folder} cannot be read ({exc}).") from exc
    if not isinstance(vocab, dict) or len(vocab) <= 2 or any(len(m) != 2 for m in merges):
        raise InvalidBundle(f"The tokenizer files in {files.folder} produced an empty vocabulary.")
    return {str(k): int(v) for k, v in vocab.items()}, [(str(a), str(b)) for a, b in merges]


class ClipTokenizer:
    """Turns a prompt into exactly `length` token ids: BOS, BPE tokens, EOS, then padding."""

    def __init__(self, files: TokenizerFiles, length: int | None = None) -> None:
        self.files = files
        self.length = length or files.max_length
        vocab, merges = _read_bpe(files)
        # the pad token is special too: SD 2.x pads with "!", so a "!" in a prompt is that token
        self._bpe = BytePairEncoder(vocab, merges, specials=(BOS, EOS, files.pad_token))
        self.pad_id = self._token_id(files.pad_token)
        self.bos_id = self._token_id(BOS)
        self.eos_id = self._token_id(EOS)

    def _token_id(self, token: str) -> int:
        if token in self._bpe.vocab:
            return self._bpe.vocab[token]
        ids = self._bpe.encode(token)  # a pad token spelled as text, e.g. "!" when only "!</w>" is listed
        if len(ids) != 1:
            raise InvalidBundle(f"Tokenizer in {self.files.folder} has no token {token!r}.")
        return ids[0]

    def encode(self, text: str) -> list[int]:
        """Ids for one prompt, truncated and padded to `self.length`."""
        body = self._bpe.encode(text)[: self.length - 2]
        ids = [self.bos_id, *body, self.eos_id]
        return ids + [self.pad_id] * (self.length - len(ids))

    def __call__(self, text: str) -> list[int]:
        return self.encode(text)

    def truncated(self, text: str) -> bool:
        """True when the prompt has more tokens than fit (the rest is dropped)."""
        return len(self._bpe.encode(text)) > self.length - 2


def load_tokenizer(variant_dir: Path, which: int = 1, *, length: int | None = None,
                   default_pad: str = EOS, also: tuple[Path, ...] = ()) -> ClipTokenizer:
    """The tokenizer for text encoder `which` of the variant in `variant_dir`."""
    return ClipTokenizer(find_tokenizer_files(variant_dir, which, default_pad=default_pad, also=also), length)
