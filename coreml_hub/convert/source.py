"""Where a conversion reads from: a local diffusers pipeline folder or a Hub repo.

From the Hub only what the conversion needs is fetched: `model_index.json`, the
tokenizer and scheduler folders, and the config and safetensors weights of the chosen
components (full precision when the repo has them, else the `fp16` variant).
"""

from __future__ import annotations

import json
import re
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

from ..errors import ConversionError, UnsupportedArchitecture

PIPELINES = {
    "StableDiffusionPipeline": "sd",
    "StableDiffusionImg2ImgPipeline": "sd",
    "StableDiffusionInpaintPipeline": "sd",  # a 9-channel Unet: latents, mask, masked-image latents
    "StableDiffusionControlNetPipeline": "sd",  # the base pipeline; its ControlNet comes with --controlnet
    "StableDiffusionXLPipeline": "sdxl",
    "StableDiffusionXLImg2ImgPipeline": "sdxl",
    "StableDiffusionXLInpaintPipeline": "sdxl",
    "StableDiffusionXLControlNetPipeline": "sdxl",
    "StableDiffusion3Pipeline": "sd3",
    "StableDiffusion3Img2ImgPipeline": "sd3",
}

# Component -> the pipeline subfolder holding its weights.
SUBFOLDERS = {
    "text_encoder": "text_encoder",
    "text_encoder_2": "text_encoder_2",
    "text_encoder_t5": "text_encoder_3",
    "unet": "unet",
    "mmdit": "transformer",
    "vae_decoder": "vae",
    "vae_encoder": "vae",
    "safety_checker": "safety_checker",
}
WEIGHT_STEMS = {"unet": "diffusion_pytorch_model", "vae": "diffusion_pytorch_model",
                "transformer": "diffusion_pytorch_model"}  # else transformers' "model"
SUPPORT_DIRS = ("tokenizer", "tokenizer_2", "tokenizer_3", "scheduler")
# Small configs that fix the geometry (latent size, VAE scale, sequence lengths) of any component.
GEOMETRY_CONFIGS = ("unet", "transformer", "vae", "text_encoder", "text_encoder_2", "text_encoder_3")


@dataclass(frozen=True)
class Source:
    """A local pipeline folder ready to convert."""

    folder: Path
    arch: str  # "sd", "sdxl" or "sd3"
    pipeline_class: str
    available: tuple[str, ...]  # components the pipeline has
    variants: dict[str, str | None] = field(default_factory=dict)  # subfolder -> weights variant
    repo_id: str | None = None


def _read_index(files: set[str], read: "callable[[str], str]", where: str) -> dict:  # type: ignore[valid-type]
    if "model_index.json" not in files:
        raise ConversionError(
            f"{where} is not a diffusers pipeline: model_index.json is missing.",
            hint="Point SOURCE at a folder or repo saved with `DiffusionPipeline.save_pretrained`.",
        )
    try:
        return json.loads(read("model_index.json"))
    except json.JSONDecodeError as exc:
        raise ConversionError(f"{where}: model_index.json is not valid JSON ({exc}).") from exc


def _arch(index: dict, where: str) -> tuple[str, str]:
    name = index.get("_class_name", "?")
    if name not in PIPELINES:
        raise UnsupportedArchitecture(
            f"{where} is a {name}; coreml-hub converts Stable Diffusion 1.x/2.x, SDXL and SD3 pipelines only.",
            hint=f"Supported pipelines: {', '.join(sorted(PIPELINES))}.",
        )
    unet = index.get("unet")
    if isinstance(unet, list) and len(unet) == 2 and unet[1] != "UNet2DConditionModel":
        raise UnsupportedArchitecture(f"{where}: the denoiser is a {unet[1]}, not a UNet2DConditionModel.")
    return PIPELINES[name], name


def _available(index: dict) -> tuple[str, ...]:
    present = {k for k, v in index.items() if not k.startswith("_") and isinstance(v, list) and v[0] is not None}
    comps = []
    for comp, sub in SUBFOLDERS.items():
        if sub in present:
            comps.append(comp)
    return tuple(comps)


def _weights(files: set[str], subfolder: str) -> tuple[list[str], str | None]:
    """The weight files of one subfolder: (paths, variant), preferring full precision safetensors."""
    stem = WEIGHT_STEMS.get(subfolder, "model")
    for variant in (None, "fp16"):
        suffix = f".{variant}" if variant else ""
        single = f"{subfolder}/{stem}{suffix}.safetensors"
        if single in files:
            return [single], variant
        if variant is None:
            indexes = [f"{subfolder}/{stem}.safetensors.index.json"]
        else:
            indexes = [f"{subfolder}/{stem}.safetensors.index.{variant}.json", f"{subfolder}/{stem}.{variant}.safetensors.index.json"]
        index = next((i for i in indexes if i in files), "")
        if index in files:
            pattern = re.compile(rf"^{re.escape(subfolder)}/{re.escape(stem)}{re.escape(suffix)}-\d+-of-\d+\.safetensors$")
            shards = sorted(f for f in files if pattern.match(f))
            return [index, *shards], variant
    return [], None


def needed_files(files: set[str], subfolders: set[str], where: str) -> tuple[list[str], dict[str, str | None]]:
    """Repo paths a conversion of `subfolders` reads; raises naming what is missing."""
    wanted = ["model_index.json"]
    wanted += sorted(f for f in files if f.split("/", 1)[0] in SUPPORT_DIRS)
    # small configs that fix the geometry (latent size, VAE scale, sequence length) of any component
    wanted += [f"{sub}/config.json" for sub in GEOMETRY_CONFIGS if f"{sub}/config.json" in files]
    variants: dict[str, str | None] = {}
    missing = []
    for sub in sorted(subfolders):
        config = f"{sub}/config.json"
        if config not in files:
            missing.append(config)
        weights, variant = _weights(files, sub)
        if not weights:
            has_bin = any(f.startswith(f"{sub}/") and f.endswith(".bin") for f in files)
            missing.append(f"{sub}/*.safetensors" + (" (only .bin weights found)" if has_bin else ""))
        variants[sub] = variant
        wanted += [w for w in (config, *weights) if w not in wanted]
    if "scheduler/scheduler_config.json" not in files:
        missing.append("scheduler/scheduler_config.json")
    if missing:
        raise ConversionError(
            f"{where} is missing files needed for the conversion: {', '.join(missing)}",
            hint="Convert fewer components with --components, or point SOURCE at a complete pipeline.",
        )
    return wanted, variants


def _subfolders(components: tuple[str, ...]) -> set[str]:
    return {SUBFOLDERS[c] for c in components}


def _check_components(requested: tuple[str, ...] | None, available: tuple[str, ...], where: str) -> tuple[str, ...]:
    if requested is None:
        return available
    absent = [c for c in requested if c not in available]
    if absent:
        raise ConversionError(
            f"{where} has no {', '.join(absent)} (it has: {', '.join(available)}).",
            hint="Leave those out of --components.",
        )
    return requested


def from_folder(folder: Path, components: tuple[str, ...] | None) -> tuple[Source, tuple[str, ...]]:
    """Inspect a local pipeline folder."""
    folder = folder.expanduser().resolve()
    where = str(folder)
    files = {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()}
    index = _read_index(files, lambda name: (folder / name).read_text(), where)
    arch, cls = _arch(index, where)
    available = _available(index)
    chosen = _check_components(components, available, where)
    _, variants = needed_files(files, _subfolders(chosen), where)
    return Source(folder, arch, cls, available, variants), chosen


def from_hub(repo_id: str, components: tuple[str, ...] | None, revision: str | None = None,
             progress: bool = True) -> tuple[Source, tuple[str, ...]]:
    """Download just what converting `components` of `repo_id` needs; returns the local snapshot.

    `progress` False keeps huggingface_hub's download bars off (`convert -q`, and logs: no terminal).
    """
    from huggingface_hub import snapshot_download

    from .. import hub

    where = f"Hub repo {repo_id}"
    snapshot = hub.repo_files(repo_id, revision)
    files = {f.path for f in snapshot.files}
    with hub.hub_errors(repo_id, revision), _hub_bars(progress):
        fetch = lambda patterns: Path(  # noqa: E731 - one call site per phase
            snapshot_download(repo_id, revision=snapshot.sha, allow_patterns=patterns, endpoint=hub.endpoint(),
                              token=hub.token())
        )
        index_dir = fetch(["model_index.json"]) if "model_index.json" in files else None
        index = _read_index(files, lambda name: (index_dir / name).read_text(), where)  # type: ignore[operator]
        arch, cls = _arch(index, where)
        available = _available(index)
        chosen = _check_components(components, available, where)
        wanted, variants = needed_files(files, _subfolders(chosen), where)
        local = fetch(wanted)
    return Source(local, arch, cls, available, variants, repo_id=repo_id), chosen


@contextmanager
def _hub_bars(enabled: bool) -> Iterator[None]:
    """huggingface_hub's progress bars off for the block unless `enabled` (its switch is global)."""
    from huggingface_hub.utils import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars

    if enabled or are_progress_bars_disabled():
        yield
        return
    disable_progress_bars()
    try:
        yield
    finally:
        enable_progress_bars()


def looks_like_repo_id(text: str) -> bool:
    return bool(re.fullmatch(r"[A-Za-z0-9][\w.-]*/[\w.-]+", text)) and not Path(text).exists()
