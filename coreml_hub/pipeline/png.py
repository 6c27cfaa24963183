"""PNG files with generation metadata, written atomically under names that never collide.

Metadata follows the `parameters` text chunk that image tools read (prompt, then a
`Negative prompt:` line, then `Key: value` pairs), plus one text chunk per field.
"""

from __future__ import annotations

import errno
import json
import os
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, Callable, Mapping

from .schedulers import SAMPLER_NAMES

SOFTWARE = "coreml-hub"


@dataclass(frozen=True)
class ImageMetadata:
    """What made one image; enough to make it again."""

    prompt: str
    negative_prompt: str
    seed: int
    steps: int
    scheduler: str
    guidance_scale: float
    width: int
    height: int
    model: str
    variant: str | None = None
    revision: str | None = None
    backend: str | None = None
    strength: float | None = None  # image-to-image only
    init_image: str | None = None
    step: int | None = None  # intermediate decodes only
    prediction_type: str | None = None  # from the model's scheduler config or --prediction-type
    mask_image: str | None = None  # inpainting only
    # one per ControlNet, in order: {"controlnet", "image", "image_sha256", "scale"}
    controlnets: tuple[dict[str, Any], ...] = ()
    rng: str | None = None  # the noise source (torch, numpy, nvidia)
    seed_mode: str | None = None  # "stream": image `image_index` of one stream seeded with `seed`
    image_index: int | None = None
    extra: dict[str, str] = field(default_factory=dict)

    def parameters_text(self) -> str:
        """The `parameters` chunk: prompt, negative prompt line, then comma-separated settings."""
        lines = [self.prompt]
        if self.negative_prompt:
            lines.append(f"Negative prompt: {self.negative_prompt}")
        pairs = [
            ("Steps", str(self.steps)),
            ("Sampler", SAMPLER_NAMES.get(self.scheduler, self.scheduler)),
            ("CFG scale", _num(self.guidance_scale)),
            ("Seed", str(self.seed)),
            ("Size", f"{self.width}x{self.height}"),
            ("Model", self.model),
        ]
        if self.rng:
            pairs.append(("RNG", self.rng))
        if self.seed_mode == "stream":
            pairs += [("Seed mode", "stream"), ("Image index", str(self.image_index or 0))]
        if self.variant:
            pairs.append(("Variant", self.variant))
        if self.revision:
            pairs.append(("Model hash", self.revision[:10]))
        if self.strength is not None:
            pairs.append(("Denoising strength", _num(self.strength)))
        if self.mask_image is not None:
            pairs.append(("Inpaint", "mask"))
        for i, unit in enumerate(self.controlnets):
            digest = unit.get("image_sha256") or ""
            pairs.append((f"ControlNet {i}", f"Model: {unit['controlnet']}, Weight: {_num(unit['scale'])}"
                                             + (f", Image hash: {digest[:10]}" if digest else ", Image: inpaint mask")))
        if self.backend:
            pairs.append(("Backend", self.backend))
        if self.step is not None:
            pairs.append(("Step", str(self.step)))
        pairs.append(("Version", SOFTWARE))
        lines.append(", ".join(f"{k}: {_quote(v)}" for k, v in pairs))
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        data: dict[str, Any] = {
            "prompt": self.prompt,
            "negative_prompt": self.negative_prompt,
            "seed": self.seed,
            "steps": self.steps,
            "scheduler": self.scheduler,
            "guidance_scale": self.guidance_scale,
            "width": self.width,
            "height": self.height,
            "model": self.model,
            "variant": self.variant,
            "revision": self.revision,
            "backend": self.backend,
            "strength": self.strength,
        }
        if self.init_image is not None:
            data["init_image"] = self.init_image
        if self.step is not None:
            data["step"] = self.step
        if self.prediction_type is not None:
            data["prediction_type"] = self.prediction_type
        if self.mask_image is not None:
            data["mask_image"] = self.mask_image
        if self.controlnets:
            data["controlnets"] = [dict(unit) for unit in self.controlnets]
        if self.rng is not None:
            data["rng"] = self.rng
        if self.seed_mode is not None:
            data["seed_mode"] = self.seed_mode
        if self.image_index is not None:
            data["image_index"] = self.image_index
        data.update(self.extra)
        return data

    def text_chunks(self) -> dict[str, str]:
        chunks = {"parameters": self.parameters_text(), "Software": SOFTWARE}
        for key, value in self.to_dict().items():
            if value is not None:
                chunks[key] = json.dumps(value) if isinstance(value, (list, dict)) else str(value)
        return chunks


def _num(value: float) -> str:
    return f"{value:g}"


def _quote(value: str) -> str:
    # A value holding the separators is quoted, as image tools expect.
    if "," in value or ":" in value or "\n" in value or value.startswith('"'):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'
    return value


def parse_parameters(text: str) -> dict[str, str]:
    """Read a `parameters` chunk back: prompt, negative prompt and each setting."""
    lines = text.split("\n")
    settings_line = lines[-1] if len(lines) > 1 else ""
    body = lines[:-1] if len(lines) > 1 else lines
    result: dict[str, str] = {}
    negative = [i for i, line in enumerate(body) if line.startswith("Negative prompt: ")]
    if negative:
        cut = negative[0]
        result["prompt"] = "\n".join(body[:cut])
        result["negative_prompt"] = "\n".join(body[cut:])[len("Negative prompt: "):]
    else:
        result["prompt"] = "\n".join(body)
        result["negative_prompt"] = ""
    for match in re.finditer(r'\s*([\w ]+):\s*("(?:\\.|[^\\"])*"|[^,]*)(?:,|$)', settings_line):
        key, value = match.group(1).strip(), match.group(2).strip()
        if value.startswith('"'):
            value = re.sub(r"\\(.)", lambda m: "\n" if m.group(1) == "n" else m.group(1), value[1:-1])
        result[key] = value
    return result


# `parameters` keys (A1111 style) -> ImageMetadata fields, for PNGs that carry only that chunk.
_PARAMETER_FIELDS = {"Steps": "steps", "CFG scale": "guidance_scale", "Seed": "seed", "Model": "model",
                     "Variant": "variant", "Denoising strength": "strength", "Backend": "backend", "Step": "step"}
_INT_FIELDS = ("seed", "steps", "width", "height", "step")
_FLOAT_FIELDS = ("guidance_scale", "strength")


def read_metadata(path: Path | str) -> dict[str, Any] | None:
    """The settings a PNG was made with, as `ImageMetadata.to_dict()` gives them; None when it has none.

    coreml-hub's own chunks (one per setting) come first; a PNG with only the `parameters` chunk
    (other image tools) is read from that. Unreadable files give None, never an exception.
    """
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as img:
            if img.format != "PNG":
                return None
            chunks = dict(getattr(img, "text", {}) or {})
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError):
        return None
    known = {f for f in ImageMetadata.__dataclass_fields__ if f != "extra"}
    data: dict[str, Any] = {k: v for k, v in chunks.items() if k in known or k == "prediction_type"}
    if "prompt" not in data and "parameters" in chunks:
        parsed = parse_parameters(chunks["parameters"])
        data = {"prompt": parsed.get("prompt", ""), "negative_prompt": parsed.get("negative_prompt", "")}
        for key, field_name in _PARAMETER_FIELDS.items():
            if key in parsed:
                data[field_name] = parsed[key]
        by_sampler = {v: k for k, v in SAMPLER_NAMES.items()}
        if "Sampler" in parsed:
            data["scheduler"] = by_sampler.get(parsed["Sampler"], parsed["Sampler"])
        width, _, height = parsed.get("Size", "").partition("x")
        if width.isdigit() and height.isdigit():
            data["width"], data["height"] = width, height
    if "prompt" not in data:
        return None
    for keys, kind in ((_INT_FIELDS, int), (_FLOAT_FIELDS, float)):
        for key in keys:
            if key in data:
                try:
                    data[key] = kind(data[key])
                except (TypeError, ValueError):
                    data.pop(key)  # a value no tool could have meant: left out rather than guessed
    return data


def slug(text: str, limit: int = 40) -> str:
    """A short, filesystem-safe name from a prompt."""
    words = re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")
    return (words[:limit].rstrip("-")) or "image"


def save_png(image: Any, folder: Path, stem: str, metadata: ImageMetadata | Mapping[str, str] | None = None) -> Path:
    """Write `image` (PIL) as `folder/stem.png`, or `stem-1.png`, ...: never overwrites.

    `metadata`: the settings an image was made with, or plain text chunks.
    """
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    chunks = metadata.text_chunks() if isinstance(metadata, ImageMetadata) else dict(metadata or {})
    for key, value in chunks.items():
        info.add_text(key, value)
    return save_file(folder, stem, ".png", lambda fh: image.save(fh, format="PNG", pnginfo=info))


def save_file(folder: Path, stem: str, suffix: str, write: Callable[[BinaryIO], None]) -> Path:
    """Write `folder/<stem><suffix>` (or `<stem>-1<suffix>`, ...) with `write(fh)`: never overwrites.

    The data goes to a hidden temp file first; the final name appears only when the file
    is complete (hard link, which fails if the name exists), so an interruption never
    leaves a partial file under a real name.
    """
    folder.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{stem}.", suffix=f"{suffix}.part", dir=folder)
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o644)  # mkstemp's 0600 would carry over to the published name
        return _publish(tmp, folder, stem, suffix)
    finally:
        tmp.unlink(missing_ok=True)


def _publish(tmp: Path, folder: Path, stem: str, suffix: str = ".png") -> Path:
    for n in range(0, 100_000):
        target = folder / (f"{stem}{suffix}" if n == 0 else f"{stem}-{n}{suffix}")
        try:
            os.link(tmp, target)
            return target
        except FileExistsError:
            continue
        except OSError as exc:
            if exc.errno not in (errno.EPERM, errno.ENOTSUP, errno.EXDEV, errno.EMLINK, errno.ENOSYS):
                raise
            # No hard links here: reserve the name exclusively, then move the data over it.
            try:
                os.close(os.open(target, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644))
            except FileExistsError:
                continue
            try:
                os.replace(tmp, target)
            except BaseException:
                target.unlink(missing_ok=True)
                raise
            return target
    raise FileExistsError(f"Could not find a free file name for {stem}{suffix} in {folder}")
