"""A small CLIP-style byte-level BPE vocabulary, learned deterministically from a word list.

The files have the exact shape of the Stable Diffusion tokenizers on the Hub:
`vocab.json` holds the 256 byte symbols, the same 256 with the word-final `</w>`
marker, one entry per merge, then `<|startoftext|>` and `<|endoftext|>` as the two
last ids; `merges.txt` starts with a `#version` line. Only the sizes differ.
"""

from __future__ import annotations

import json
from collections import Counter
from functools import lru_cache
from pathlib import Path

BOS = "<|startoftext|>"
EOS = "<|endoftext|>"

# Words the merges are learned from: prompt-like English, so that common prompt words
# become single tokens just as they do in the real vocabulary.
_CORPUS = """
a an the of and with in on at by for from to into over under near behind beside
photo photograph picture painting drawing sketch render illustration portrait
landscape cityscape seascape closeup close up wide shot macro aerial view
cat cats dog dogs horse horses bird birds fish fox wolf bear lion tiger owl
astronaut robot knight wizard queen king princess child woman man people
riding running sitting standing flying swimming sleeping walking dancing
space moon mars stars galaxy nebula planet sun sky clouds rain snow storm
mountain mountains river lake ocean sea beach forest trees tree flowers flower
garden field desert island castle tower city street house room window door
red orange yellow green blue purple pink white black gray golden silver
bright dark light shadow shadows sunset sunrise night morning evening
high quality detailed highly intricate sharp focus beautiful stunning epic
cinematic lighting dramatic soft volumetric studio natural warm cold
oil watercolor digital art style artstation trending concept octane unreal
engine hyperrealistic realistic photorealistic fantasy science fiction
vintage retro modern futuristic ancient medieval steampunk cyberpunk
small large huge tiny giant old young happy sad calm wild
wearing holding looking eating drinking reading playing painting
hat helmet armor dress suit coat glasses crown sword shield book cup
car train ship boat plane bicycle rocket
water fire ice stone wood metal glass gold crystal
anime cartoon comic pixel minimalist abstract surreal
trending masterpiece best quality ultra resolution
8k 4k hdr bokeh depth of field lens 35mm 50mm
""".split()


def bytes_to_unicode() -> dict[int, str]:
    """The reversible byte -> printable character table byte-level BPE vocabularies use."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    table: dict[int, str] = {b: chr(b) for b in keep}
    extra = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return dict(sorted(table.items()))


def _word_symbols(word: str, byte_chars: dict[int, str]) -> tuple[str, ...]:
    chars = [byte_chars[b] for b in word.encode("utf-8")]
    return tuple(chars[:-1]) + (chars[-1] + "</w>",)


def learn_merges(num_merges: int, corpus: list[str] | None = None) -> list[tuple[str, str]]:
    """Greedy BPE: repeatedly merge the most frequent adjacent pair (ties broken by the pair itself)."""
    byte_chars = bytes_to_unicode()
    words: Counter[tuple[str, ...]] = Counter(_word_symbols(w.lower(), byte_chars) for w in (corpus or _CORPUS))
    merges: list[tuple[str, str]] = []
    while len(merges) < num_merges:
        pairs: Counter[tuple[str, str]] = Counter()
        for symbols, freq in words.items():
            for pair in zip(symbols, symbols[1:]):
                pairs[pair] += freq
        if not pairs:
            break
        best = min(pairs, key=lambda p: (-pairs[p], p))
        merges.append(best)
        merged: Counter[tuple[str, ...]] = Counter()
        for symbols, freq in words.items():
            out: list[str] = []
            i = 0
            while i < len(symbols):
                if i + 1 < len(symbols) and (symbols[i], symbols[i + 1]) == best:
                    out.append(symbols[i] + symbols[i + 1])
                    i += 2
                else:
                    out.append(symbols[i])
                    i += 1
            merged[tuple(out)] += freq
        words = merged
    return merges


@lru_cache(maxsize=None)
def build_vocab(vocab_size: int) -> tuple[dict[str, int], tuple[tuple[str, str], ...]]:
    """A vocabulary of exactly `vocab_size` entries (512 byte symbols + merges + 2 specials)."""
    num_merges = vocab_size - 512 - 2
    if num_merges < 0:
        raise ValueError(f"vocab_size must be at least 514, got {vocab_size}")
    merges = learn_merges(num_merges)
    if len(merges) < num_merges:
        raise ValueError(f"the word list supports at most {len(merges)} merges; ask for a smaller vocab_size")
    symbols = list(bytes_to_unicode().values())
    tokens = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in merges] + [BOS, EOS]
    vocab: dict[str, int] = {}
    for token in tokens:
        vocab.setdefault(token, len(vocab))
    if len(vocab) != vocab_size:  # a merge result equal to an earlier token would shift ids
        raise ValueError(f"duplicate tokens in the learned vocabulary ({len(vocab)} != {vocab_size})")
    return vocab, tuple(merges)


def write_tokenizer_files(folder: Path, vocab_size: int) -> tuple[Path, Path]:
    """Write `vocab.json` and `merges.txt` into `folder`; returns their paths."""
    vocab, merges = build_vocab(vocab_size)
    folder.mkdir(parents=True, exist_ok=True)
    vocab_path = folder / "vocab.json"
    merges_path = folder / "merges.txt"
    vocab_path.write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    merges_path.write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges), encoding="utf-8")
    return vocab_path, merges_path


def write_tokenizer_config(folder: Path, *, pad_token: str = EOS, model_max_length: int = 77) -> None:
    """The `tokenizer_config.json` + `special_tokens_map.json` a diffusers pipeline folder carries."""
    special = {
        "bos_token": BOS,
        "eos_token": EOS,
        "unk_token": EOS,
        "pad_token": pad_token,
    }
    config = {
        "tokenizer_class": "CLIPTokenizer",
        "model_max_length": model_max_length,
        "do_lower_case": True,
        "errors": "replace",
        "add_prefix_space": False,
        "clean_up_tokenization_spaces": True,
        **special,
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    (folder / "special_tokens_map.json").write_text(json.dumps(special, indent=2) + "\n", encoding="utf-8")


def load_clip_tokenizer(folder: Path, *, pad_token: str = EOS, model_max_length: int = 77):  # type: ignore[no-untyped-def]
    """transformers' CLIPTokenizer over `folder`'s vocab.json + merges.txt (paths passed positionally)."""
    from transformers import CLIPTokenizer

    return CLIPTokenizer(
        str(folder / "vocab.json"), str(folder / "merges.txt"), pad_token=pad_token, model_max_length=model_max_length
    )


# ---- T5 (SentencePiece Unigram) ---------------------------------------------------------------

T5_SPECIALS = ("<pad>", "</s>", "<unk>")  # ids 0, 1, 2, as in the T5 vocabularies on the Hub
T5_WORD_MARK = "\u2581"  # SentencePiece's word-start marker


def build_t5_vocab() -> list[tuple[str, float]]:
    """A small Unigram vocabulary: the specials, whole prompt words (likelier), then single characters."""
    words = sorted(set(w.lower() for w in _CORPUS))
    chars = sorted({c for w in words for c in w} | set("abcdefghijklmnopqrstuvwxyz0123456789.,!?'-"))
    vocab: list[tuple[str, float]] = [(t, 0.0) for t in T5_SPECIALS]
    vocab += [(T5_WORD_MARK + w, -2.0 - 0.01 * i) for i, w in enumerate(words)]
    vocab += [(T5_WORD_MARK, -3.0)]
    vocab += [(c, -8.0) for c in chars] + [(T5_WORD_MARK + c, -7.0) for c in chars]
    seen: set[str] = set()
    return [(piece, score) for piece, score in vocab if not (piece in seen or seen.add(piece))]


def write_t5_tokenizer(folder: Path, *, model_max_length: int = 77) -> int:
    """`tokenizer.json` + `tokenizer_config.json` (+ `special_tokens_map.json`) of a T5-style tokenizer.

    Returns the vocabulary size. The files have the shape of `google-t5/t5-*` and SD3's `tokenizer_3/`:
    a Unigram model, SentencePiece word marks, `</s>` appended to every text, `<pad>` = 0.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors

    vocab = build_t5_vocab()
    tok = Tokenizer(models.Unigram(vocab, unk_id=2))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement=T5_WORD_MARK, prepend_scheme="always")
    tok.decoder = decoders.Metaspace(replacement=T5_WORD_MARK, prepend_scheme="always")
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", pair="$A </s> $B </s>",
                                                       special_tokens=[("</s>", 1)])
    folder.mkdir(parents=True, exist_ok=True)
    tok.save(str(folder / "tokenizer.json"))
    special = {"eos_token": "</s>", "pad_token": "<pad>", "unk_token": "<unk>"}
    config = {"tokenizer_class": "T5Tokenizer", "model_max_length": model_max_length, "extra_ids": 0,
              "additional_special_tokens": [], "clean_up_tokenization_spaces": True, **special}
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    (folder / "special_tokens_map.json").write_text(json.dumps(special, indent=2) + "\n", encoding="utf-8")
    return len(vocab)


def load_t5_tokenizer(folder: Path):  # type: ignore[no-untyped-def]
    """transformers' T5 tokenizer over `folder`'s tokenizer.json (what diffusers' SD3 pipeline takes)."""
    from transformers import T5TokenizerFast

    return T5TokenizerFast(tokenizer_file=str(folder / "tokenizer.json"), eos_token="</s>", pad_token="<pad>",
                           unk_token="<unk>", extra_ids=0, model_max_length=77)
