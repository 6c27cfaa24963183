"""`convert()`: a diffusers Stable Diffusion pipeline -> Core ML packages in Apple's layout."""

from __future__ import annotations

import gc
import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

from ..errors import ConversionError, UsageError
from .naming import ATTENTIONS as IMPLEMENTATIONS
from .naming import CONTROLNET, COMPONENTS, DEFAULT_QUERY_CHUNK_SIZE, controlnet_package_name, package_name

PRECISIONS = ("fp16", "fp32")
QUANTIZE_NBITS = (2, 4, 6, 8)
FORMATS = ("packages", "compiled")
# Components whose weights `quantize_nbits` palettizes (as Apple's converter does).
QUANTIZED_COMPONENTS = ("text_encoder", "text_encoder_2", "unet", "controlled_unet", "controlnet")


@dataclass(frozen=True)
class ComponentResult:
    name: str  # text_encoder, unet, unet_chunk1, ...
    path: Path
    size_bytes: int
    seconds: float


@dataclass(frozen=True)
class ConversionResult:
    """What `convert` wrote. `out` is a repo folder `serve` can mirror."""

    out: Path
    model_version: str
    arch: str  # "sd" or "sdxl"
    attention: str
    precision: str
    format: str
    latent_size: tuple[int, int]
    image_size: tuple[int, int]
    unet_batch: int
    quantize_nbits: int | None
    components: tuple[ComponentResult, ...]
    extra_files: tuple[Path, ...] = field(default=())
    seconds: float = 0.0
    notes: tuple[str, ...] = ()  # things the user should know (e.g. ControlNets without a controlled Unet)

    @property
    def packages(self) -> dict[str, Path]:
        return {c.name: c.path for c in self.components if c.path.suffix == ".mlpackage"}

    @property
    def compiled(self) -> dict[str, Path]:
        return {c.name: c.path for c in self.components if c.path.suffix == ".mlmodelc"}

    @property
    def packages_dir(self) -> Path:
        return self.out / self.attention / "packages"

    def to_dict(self) -> dict[str, Any]:
        return {
            "out": str(self.out),
            "model_version": self.model_version,
            "arch": self.arch,
            "attention": self.attention,
            "precision": self.precision,
            "format": self.format,
            "latent_size": list(self.latent_size),
            "image_size": list(self.image_size),
            "unet_batch": self.unet_batch,
            "quantize_nbits": self.quantize_nbits,
            "seconds": round(self.seconds, 2),
            "notes": list(self.notes),
            "components": [
                {"name": c.name, "path": str(c.path), "size_bytes": c.size_bytes, "seconds": round(c.seconds, 2)}
                for c in self.components
            ],
        }


def _size(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def _parse_components(components: Iterable[str] | str | None) -> tuple[str, ...] | None:
    if components is None:
        return None
    if isinstance(components, str):
        components = [c for c in components.split(",")]
    names = tuple(dict.fromkeys(c.strip() for c in components if c.strip()))
    choices = (*COMPONENTS, CONTROLNET)
    unknown = [c for c in names if c not in choices]
    if unknown:
        raise UsageError(
            f"Unknown component(s): {', '.join(unknown)}.", hint=f"Choose from: {', '.join(choices)}."
        )
    if not names:
        raise UsageError("--components is empty.", hint=f"Choose from: {', '.join(choices)}.")
    return names


def _validate(attention: str, precision: str, quantize_nbits: int | None, latent_size: Any, fmt: str) -> None:
    if attention not in IMPLEMENTATIONS:
        raise UsageError(f"Unknown attention {attention!r}.", hint=f"Choose from: {', '.join(IMPLEMENTATIONS)}.")
    if precision not in PRECISIONS:
        raise UsageError(f"Unknown precision {precision!r}.", hint="Choose fp16 or fp32.")
    if quantize_nbits is not None and quantize_nbits not in QUANTIZE_NBITS:
        raise UsageError(f"--quantize-nbits must be one of 2, 4, 6, 8 (got {quantize_nbits}).")
    if latent_size is not None:
        if len(latent_size) != 2 or any(int(v) <= 0 for v in latent_size):
            raise UsageError(f"--latent-size takes two positive integers H W (got {latent_size}).")
    if fmt not in FORMATS:
        raise UsageError(f"Unknown format {fmt!r}.", hint="Choose packages or compiled.")


def _geometry(folder: Path, latent_size: tuple[int, int] | None, batch: int) -> tuple[Any, tuple[int, int], int]:
    from .components import Geometry

    def cfg(sub: str) -> dict[str, Any]:
        path = folder / sub / "config.json"
        return json.loads(path.read_text()) if path.is_file() else {}

    vae = cfg("vae")
    scale = 2 ** (len(vae.get("block_out_channels", [0, 0, 0, 0])) - 1)
    if latent_size is None:
        sample = cfg("unet").get("sample_size") or (vae.get("sample_size", 512) // scale)
        h, w = (sample, sample) if isinstance(sample, int) else tuple(sample)
    else:
        h, w = int(latent_size[0]), int(latent_size[1])
    te = cfg("text_encoder") or cfg("text_encoder_2")
    seq = int(te.get("max_position_embeddings", 77))
    return Geometry(latent_h=h, latent_w=w, vae_scale=scale, batch=batch, seq_len=seq), (h, w), scale


class _Progress:
    """One stderr line per component: a short bar over its stages."""

    def __init__(self, name: str, stages: list[str], enabled: bool) -> None:
        from tqdm import tqdm

        self.bar = tqdm(
            total=len(stages),
            desc=f"{name:<16}",
            file=sys.stderr,
            disable=not enabled,
            leave=True,
            bar_format="{desc} {bar:20} {n_fmt}/{total_fmt} [{elapsed}]{postfix}",
        )
        self.stages = stages

    def start(self, stage: str) -> None:
        self.bar.set_postfix_str(stage)

    def step(self) -> None:
        self.bar.update(1)

    def close(self, note: str) -> None:
        self.bar.set_postfix_str(note)
        self.bar.close()


def convert(
    source: str | Path,
    out: str | Path,
    *,
    attention: str = "split_einsum",
    precision: str = "fp16",
    chunk_unet: bool = False,
    unet_batch_one: bool = False,
    quantize_nbits: int | None = None,
    latent_size: tuple[int, int] | None = None,
    components: Iterable[str] | str | None = None,
    model_version: str | None = None,
    progress: bool = True,
    format: str = "packages",
    revision: str | None = None,
    query_chunk_size: int = DEFAULT_QUERY_CHUNK_SIZE,
    controlnets: Iterable[str | Path] = (),
) -> ConversionResult:
    """Convert a diffusers pipeline (local folder or Hub repo id) to Core ML.

    Writes `out/<attention>/packages/Stable_Diffusion_version_<org>_<name>_<component>.mlpackage`
    (and `out/<attention>/compiled/*.mlmodelc` with `format="compiled"`, macOS only), the
    tokenizer(s) and scheduler config, a model card and `.hub.json`.

    `controlnets` (local ControlNet folders or Hub repo ids): the Unet is written as the one that
    takes ControlNet residuals (`..._control-unet.mlpackage`) and each ControlNet as
    `ControlNet_<org>_<name>.mlpackage`; `components=["controlnet"]` converts only the ControlNets,
    for an existing conversion in `out`.
    """
    from . import source as sources
    from .components import Job, convert_component, import_coremltools
    from ..cli.output import human_size

    started = time.time()
    _validate(attention, precision, quantize_nbits, latent_size, format)
    wanted = _parse_components(components)
    controlnets = [str(c) for c in controlnets]
    want_controlnets = bool(controlnets) and (wanted is None or CONTROLNET in wanted)
    if wanted is not None and CONTROLNET in wanted and not controlnets:
        raise UsageError("--components controlnet needs the ControlNets to convert.",
                         hint="Name each with --controlnet CN_SRC (a diffusers ControlNet folder or a Hub repo id).")
    if wanted is not None:
        wanted = tuple(c for c in wanted if c != CONTROLNET)
    if format == "compiled":
        from .compile import ensure_compiler

        ensure_compiler()
    out = Path(out).expanduser().resolve()

    src_path = Path(str(source)).expanduser()
    if src_path.is_dir():
        src, chosen = sources.from_folder(src_path, wanted)
        default_version = src_path.resolve().name
    elif sources.looks_like_repo_id(str(source)):
        src, chosen = sources.from_hub(str(source), wanted, revision=revision)
        default_version = str(source)
    elif str(source).startswith((".", "/", "~")) or src_path.exists():
        raise ConversionError(
            f"No diffusers pipeline folder at {source}.",
            hint="Check the path, or pass a Hub repo id such as runwayml/stable-diffusion-v1-5.",
        )
    else:
        raise ConversionError(
            f"SOURCE {source} is neither a folder nor a Hub repo id.",
            hint="Pass a local diffusers pipeline folder, or a repo id such as runwayml/stable-diffusion-v1-5.",
        )
    version = model_version or default_version
    batch = 1 if unet_batch_one else 2
    if latent_size is None and not chosen and want_controlnets:
        latent_size = _existing_latent_size(out / attention / "packages")  # ControlNets for an earlier conversion
    geometry, latent, scale = _geometry(src.folder, latent_size, batch)
    cn_sources = _controlnet_sources(controlnets, src.folder) if want_controlnets else []

    import_coremltools()
    packages_dir = out / attention / "packages"
    packages_dir.mkdir(parents=True, exist_ok=True)
    results: list[ComponentResult] = []
    order = [c for c in COMPONENTS if c in chosen]
    if controlnets:  # the Unet of a ControlNet conversion takes their residuals (Apple's control-unet)
        order = ["controlled_unet" if c == "unet" else c for c in order]
    for comp in order:
        stages = ["trace + convert", "save"]
        if quantize_nbits and comp in QUANTIZED_COMPONENTS:
            stages.append(f"palettize {quantize_nbits}-bit")
        if comp in ("unet", "controlled_unet") and chunk_unet:
            stages.append("chunk")
        bar = _Progress(comp, stages, progress)
        t0 = time.time()
        job = Job(
            component=comp,
            folder=src.folder,
            variant=src.variants.get(sources.SUBFOLDERS.get(comp, "unet")),
            arch=src.arch,
            attention=attention,
            precision=precision,
            geometry=geometry,
            model_version=version,
            query_chunk_size=query_chunk_size,
        )
        dest = packages_dir / package_name(version, comp)
        try:
            bar.start(stages[0])
            convert_component(job, dest)
            bar.step()
            bar.step()
            if quantize_nbits and comp in QUANTIZED_COMPONENTS:
                from .quantize import palettize

                bar.start(stages[2])
                palettize(dest, quantize_nbits)
                bar.step()
            extra: list[Path] = []
            if comp in ("unet", "controlled_unet") and chunk_unet:
                from .chunking import chunk_package

                bar.start("chunk")
                extra = list(
                    chunk_package(
                        dest,
                        packages_dir / package_name(version, f"{comp}_chunk1"),
                        packages_dir / package_name(version, f"{comp}_chunk2"),
                    )
                )
                bar.step()
        except BaseException:
            bar.close("failed")
            raise
        seconds = time.time() - t0
        bar.close(f"{human_size(_size(dest))} in {seconds:.1f}s")
        results.append(ComponentResult(comp, dest, _size(dest), seconds))
        for i, path in enumerate(extra, start=1):
            results.append(ComponentResult(f"{comp}_chunk{i}", path, _size(path), 0.0))
        gc.collect()
    for cn in cn_sources:
        results.append(_convert_controlnet(cn, src, packages_dir, attention, precision, geometry, version,
                                           query_chunk_size, quantize_nbits, progress))
        gc.collect()
    notes = []
    if cn_sources and not any(packages_dir.glob("*_control-unet*.mlpackage")):
        notes.append(f"{packages_dir} has no Unet that takes ControlNet residuals (control-unet); convert it with "
                     "`--components unet --controlnet ...` to run these ControlNets.")

    extra_files = _write_repo_files(src, out, version, attention, precision, quantize_nbits, order, latent, scale)
    if format == "compiled":
        from .compile import compile_outputs

        results += compile_outputs(results, out / attention / "compiled", out, progress)
    return ConversionResult(
        out=out,
        model_version=version,
        arch=src.arch,
        attention=attention,
        precision=precision,
        format=format,
        latent_size=latent,
        image_size=(latent[0] * scale, latent[1] * scale),
        unet_batch=batch,
        quantize_nbits=quantize_nbits,
        components=tuple(results),
        extra_files=tuple(extra_files),
        seconds=time.time() - started,
        notes=tuple(notes),
    )


def _write_repo_files(
    src: Any,
    out: Path,
    version: str,
    attention: str,
    precision: str,
    quantize_nbits: int | None,
    order: list[str],
    latent: tuple[int, int],
    scale: int,
) -> list[Path]:
    from .repo_files import hub_metadata, write_card, write_scheduler, write_tokenizer

    written: list[Path] = []
    for name in ("tokenizer", "tokenizer_2"):
        if (src.folder / name).is_dir():
            written += write_tokenizer(src.folder / name, out / name)
    written.append(write_scheduler(src.folder / "scheduler", out / "scheduler"))
    attentions = sorted(p.name for p in out.iterdir() if p.is_dir() and p.name in IMPLEMENTATIONS)
    meta = hub_metadata(version, src.arch, attentions or [attention], quantize_nbits)
    write_card(out, meta, order, precision, latent, scale)
    written += [out / "README.md", out / ".hub.json"]
    return written


def _controlnet_sources(controlnets: list[str], pipeline: Path) -> list[Any]:
    """Every ControlNet's source, each checked against the base's Unet config before anything converts."""
    from .controlnet import check_matches_base, controlnet_source

    unet_config_path = pipeline / "unet" / "config.json"
    unet_config = json.loads(unet_config_path.read_text()) if unet_config_path.is_file() else {}
    sources = []
    for cn in controlnets:
        source = controlnet_source(cn)
        check_matches_base(source.config, unet_config, f"The ControlNet {source.model_id}")
        sources.append(source)
    return sources


def _existing_latent_size(packages: Path) -> tuple[int, int] | None:
    """The latent size of a Unet already converted in `packages` (so ControlNets added later match it)."""
    from ..mil.proto import load_spec

    for pkg in sorted(packages.glob("*_unet.mlpackage")) + sorted(packages.glob("*_control-unet.mlpackage")):
        try:
            spec = load_spec(pkg)
        except Exception:  # an unreadable package: fall back to the pipeline's default size
            continue
        for feature in spec.description.input:
            if feature.name == "sample" and len(feature.type.multiArrayType.shape) == 4:
                shape = feature.type.multiArrayType.shape
                return int(shape[2]), int(shape[3])
    return None


def _convert_controlnet(cn: Any, src: Any, packages_dir: Path, attention: str, precision: str, geometry: Any,
                        version: str, query_chunk_size: int, quantize_nbits: int | None,
                        progress: bool) -> ComponentResult:
    from ..cli.output import human_size
    from .components import Job
    from .controlnet import convert_controlnet

    stages = ["trace + convert", "save"] + ([f"palettize {quantize_nbits}-bit"] if quantize_nbits else [])
    bar = _Progress(f"controlnet {cn.model_id.rsplit('/', 1)[-1]}"[:16], stages, progress)
    t0 = time.time()
    job = Job(component="controlnet", folder=cn.folder, variant=cn.variant, arch=src.arch, attention=attention,
              precision=precision, geometry=geometry, model_version=version, query_chunk_size=query_chunk_size)
    dest = packages_dir / controlnet_package_name(cn.model_id)
    unet_config_path = src.folder / "unet" / "config.json"
    unet_config = json.loads(unet_config_path.read_text()) if unet_config_path.is_file() else {}
    try:
        bar.start(stages[0])
        convert_controlnet(job, cn, unet_config, dest)
        bar.step()
        bar.step()
        if quantize_nbits:
            from .quantize import palettize

            bar.start(stages[2])
            palettize(dest, quantize_nbits)
            bar.step()
    except BaseException:
        bar.close("failed")
        raise
    seconds = time.time() - t0
    bar.close(f"{human_size(_size(dest))} in {seconds:.1f}s")
    return ComponentResult("controlnet", dest, _size(dest), seconds)
