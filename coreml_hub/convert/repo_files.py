"""The files that make a conversion output a Hub repo: tokenizer, scheduler, model card, `.hub.json`."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

TOKENIZER_EXTRAS = ("tokenizer_config.json", "special_tokens_map.json")


def _bpe_from_tokenizer_json(path: Path) -> tuple[dict[str, int], list[str]]:
    """vocab and merges of a BPE `tokenizer.json` (what transformers 5 saves instead of the two files)."""
    data = json.loads(path.read_text(encoding="utf-8"))
    model = data.get("model", {})
    if model.get("type") != "BPE":
        raise ValueError(f"{path} does not hold a BPE tokenizer")
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    return dict(model["vocab"]), merges


def write_tokenizer(src: Path, dest: Path) -> list[Path]:
    """Put `vocab.json` + `merges.txt` (+ configs) of the tokenizer folder `src` into `dest`."""
    dest.mkdir(parents=True, exist_ok=True)
    written = []
    vocab, merges = src / "vocab.json", src / "merges.txt"
    if vocab.is_file() and merges.is_file():
        for f in (vocab, merges):
            shutil.copyfile(f, dest / f.name)
    elif (src / "tokenizer.json").is_file():
        vocab_map, merge_list = _bpe_from_tokenizer_json(src / "tokenizer.json")
        (dest / "vocab.json").write_text(json.dumps(vocab_map, ensure_ascii=False), encoding="utf-8")
        (dest / "merges.txt").write_text("#version: 0.2\n" + "".join(m + "\n" for m in merge_list), encoding="utf-8")
    else:
        raise FileNotFoundError(f"{src} has neither vocab.json + merges.txt nor tokenizer.json")
    written += [dest / "vocab.json", dest / "merges.txt"]
    for name in TOKENIZER_EXTRAS:
        if (src / name).is_file():
            shutil.copyfile(src / name, dest / name)
            written.append(dest / name)
    return written


T5_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "spiece.model")


def write_t5_tokenizer(src: Path, dest: Path) -> list[Path]:
    """Copy SD3's T5 tokenizer (`tokenizer_3/`): `tokenizer.json` is what runs it; the rest when present."""
    if not (src / "tokenizer.json").is_file():
        raise FileNotFoundError(f"{src} has no tokenizer.json")
    dest.mkdir(parents=True, exist_ok=True)
    written = []
    for name in T5_TOKENIZER_FILES:
        if (src / name).is_file():
            shutil.copyfile(src / name, dest / name)
            written.append(dest / name)
    return written


def write_scheduler(src: Path, dest: Path) -> Path:
    dest.mkdir(parents=True, exist_ok=True)
    out = dest / "scheduler_config.json"
    shutil.copyfile(src / "scheduler_config.json", out)
    return out


def hub_metadata(model_version: str, arch: str, attentions: list[str], quantize_nbits: int | None) -> dict[str, Any]:
    tags = ["coreml", "core-ml", "stable-diffusion", "text-to-image", "diffusers"]
    if arch == "sdxl":
        tags.append("stable-diffusion-xl")
    if arch == "sd3":
        tags.append("stable-diffusion-3")
    if quantize_nbits:
        tags.append(f"{quantize_nbits}bit")
        tags.append("palettized")
    return {
        "library_name": "coreml",
        "pipeline_tag": "text-to-image",
        "tags": tags,
        "base_model": model_version,
        "attention": attentions,
    }


def write_card(out: Path, meta: dict[str, Any], components: list[str], precision: str, latent: tuple[int, int], scale: int) -> None:
    """README.md with the card metadata as front matter, and `.hub.json` with the same fields."""
    front = [
        "---",
        f"library_name: {meta['library_name']}",
        f"pipeline_tag: {meta['pipeline_tag']}",
        f"base_model: {meta['base_model']}",
        "tags:",
        *[f"- {t}" for t in meta["tags"]],
        "---",
    ]
    h, w = latent
    body = [
        "",
        f"# Core ML conversion of {meta['base_model']}",
        "",
        f"Converted with coreml-hub from the diffusers pipeline `{meta['base_model']}`.",
        "",
        f"- Attention: {', '.join(meta['attention'])}",
        f"- Precision: {precision}",
        f"- Image size: {w * scale}x{h * scale} (latents {w}x{h})",
        f"- Components: {', '.join(components)}",
        "",
        "Run it with `coreml-hub run`, or with Apple's ml-stable-diffusion (Swift or Python).",
        "",
    ]
    (out / "README.md").write_text("\n".join(front + body), encoding="utf-8")
    (out / ".hub.json").write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
