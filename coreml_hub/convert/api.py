"""`convert()`: a diffusers Stable Diffusion pipeline -> Core ML packages in Apple's layout."""

from __future__ import annotations

import gc
import json
import os
import shutil
import socket
import sys
import time
import uuid
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Iterable

from ..errors import ConversionError, UsageError
from .naming import ATTENTIONS as IMPLEMENTATIONS
from .naming import CONTROLNET, CONTROLNET_DIR, COMPONENTS, DEFAULT_QUERY_CHUNK_SIZE, controlnet_package_name, package_name
from .refiner import BASE_TIME_IDS, REFINER, REFINER_TIME_IDS, refiner_source

PRECISIONS = ("fp16", "fp32")
QUANTIZE_NBITS = (2, 4, 6, 8)
FORMATS = ("packages", "compiled")
# Components whose weights `quantize_nbits` palettizes (as Apple's converter does).
QUANTIZED_COMPONENTS = ("text_encoder", "text_encoder_2", "text_encoder_t5", "unet", "mmdit", "refiner",
                        "controlled_unet", "controlnet")
# Unets that --chunk-unet writes as two chunks as well (Apple chunks the refiner with the Unet).
CHUNKED_COMPONENTS = ("unet", "controlled_unet", "refiner")


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
    arch: str  # "sd", "sdxl" or "sd3"
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
    refiner_version: str | None = None  # the refiner pipeline converted beside the base, if any

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
            "refiner_version": self.refiner_version,
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


def _parse_components(components: Iterable[str] | str | None, refiner: bool = False) -> tuple[str, ...] | None:
    if components is None:
        return None
    if isinstance(components, str):
        components = [c for c in components.split(",")]
    names = tuple(dict.fromkeys(c.strip() for c in components if c.strip()))
    known = (*COMPONENTS, CONTROLNET) + ((REFINER,) if refiner else ())
    unknown = [c for c in names if c not in known]
    if unknown:
        hint = f"Choose from: {', '.join(known)}."
        if REFINER in unknown:
            hint = "The refiner is converted with --refiner REFINER_SOURCE; " + hint
        raise UsageError(f"Unknown component(s): {', '.join(unknown)}.", hint=hint)
    if not names:
        raise UsageError("--components is empty.", hint=f"Choose from: {', '.join(known)}.")
    return names


def _validate(attention: str | None, precision: str, quantize_nbits: int | None, latent_size: Any, fmt: str) -> None:
    if attention is not None and attention not in IMPLEMENTATIONS:
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


def _attention_for(arch: str, attention: str | None, chunk_unet: bool) -> str:
    """The attention to convert with: the asked one, else the family's default (SD3: original only)."""
    if arch != "sd3":
        return attention or "split_einsum"
    if attention not in (None, "original"):
        raise UsageError(f"SD3's transformer converts with original attention only (asked: {attention}).",
                         hint="Drop --attention, or pass --attention original.")
    if chunk_unet:
        raise UsageError("--chunk-unet splits a Unet; SD3 has a transformer (MultiModalDiffusionTransformer).",
                         hint="Drop --chunk-unet.")
    return "original"


def _geometry(folder: Path, latent_size: tuple[int, int] | None, batch: int) -> tuple[Any, tuple[int, int], int]:
    from .components import Geometry

    def cfg(sub: str) -> dict[str, Any]:
        path = folder / sub / "config.json"
        return json.loads(path.read_text()) if path.is_file() else {}

    vae = cfg("vae")
    scale = 2 ** (len(vae.get("block_out_channels", [0, 0, 0, 0])) - 1)
    if latent_size is None:
        denoiser = cfg("unet") or cfg("transformer")
        sample = denoiser.get("sample_size") or (vae.get("sample_size", 512) // scale)
        h, w = (sample, sample) if isinstance(sample, int) else tuple(sample)
    else:
        h, w = int(latent_size[0]), int(latent_size[1])
    te = cfg("text_encoder") or cfg("text_encoder_2")
    seq = int(te.get("max_position_embeddings", 77))
    return Geometry(latent_h=h, latent_w=w, vae_scale=scale, batch=batch, seq_len=seq), (h, w), scale


class _Progress:
    """One stderr line per component: a short bar over its stages (on a terminal), or one plain
    line when the component is done (`on_line`, for logs: no carriage returns)."""

    def __init__(self, name: str, stages: list[str], enabled: bool,
                 on_line: Callable[[str], None] | None = None) -> None:
        self.name = name
        self.on_line = on_line
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
        if self.on_line is not None and self.bar.disable:
            self.on_line(f"{self.name}: {note}")


PARTIAL_PREFIX = ".coreml-hub-partial-"  # inside OUT while converting: hidden, so nothing takes it for a variant


def _partial_name() -> str:
    """The staging folder's name: it names this host and process, so a later conversion can tell a
    folder left by a killed one (SIGKILL, power loss: no chance to clean up) from one in progress."""
    return f"{PARTIAL_PREFIX}{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:12]}"


def remove_stale_partials(out: Path) -> list[Path]:
    """Remove the staging folders in `out` left by conversions on this host whose process is gone."""
    removed = []
    host = socket.gethostname()
    for folder in out.glob(f"{PARTIAL_PREFIX}*") if out.is_dir() else ():
        owner = folder.name[len(PARTIAL_PREFIX):].rpartition("-")[0]
        owner_host, _, pid = owner.rpartition("-")
        if owner_host != host or not pid.isascii() or not pid.isdigit() or _alive(int(pid)):
            continue  # another host's, an older name, or still converting
        shutil.rmtree(folder, ignore_errors=True)
        removed.append(folder)
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def _install(stage: Path, out: Path) -> None:
    """Move a finished conversion from `stage` into `out`, one rename per bundle or file.

    Bundles and files of the same name in `out` are replaced; others there (another attention,
    components converted earlier) stay.
    """
    trash = stage / ".replaced"
    trash.mkdir()

    def put(src: Path, dest: Path) -> None:
        if dest.exists() or dest.is_symlink():
            os.replace(dest, trash / uuid.uuid4().hex)
        os.replace(src, dest)

    for item in sorted(stage.iterdir()):
        if item == trash:
            continue
        dest = out / item.name
        if item.name in IMPLEMENTATIONS and dest.is_dir():  # OUT/<attention>/{packages,compiled}/<bundle>
            for fmt in sorted(item.iterdir()):
                (dest / fmt.name).mkdir(parents=True, exist_ok=True)
                for bundle in sorted(fmt.iterdir()):
                    if bundle.name == CONTROLNET_DIR:  # compiled ControlNets: one by one, others stay
                        (dest / fmt.name / bundle.name).mkdir(exist_ok=True)
                        for net in sorted(bundle.iterdir()):
                            put(net, dest / fmt.name / bundle.name / net.name)
                        continue
                    put(bundle, dest / fmt.name / bundle.name)
        else:
            put(item, dest)


def convert(
    source: str | Path,
    out: str | Path,
    *,
    attention: str | None = None,
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
    refiner: str | Path | None = None,
    on_message: Callable[[str], None] | None = None,
    controlnets: Iterable[str | Path] = (),
) -> ConversionResult:
    """Convert a diffusers pipeline (local folder or Hub repo id) to Core ML.

    Writes `out/<attention>/packages/Stable_Diffusion_version_<org>_<name>_<component>.mlpackage`
    (and `out/<attention>/compiled/*.mlmodelc` with `format="compiled"`, macOS only), the
    tokenizer(s) and scheduler config, a model card and `.hub.json`. `attention` defaults to
    `split_einsum` (SD 1.x/2.x, SDXL) and is `original` for SD3, whose transformer is exported
    with plain attention as DiffusionKit exports it; SD3's transformer is float32 whatever
    `precision` says (Apple's contract). `refiner` (an SDXL refiner's folder or repo id; only
    its Unet is read) adds `..._refiner.mlpackage` beside an SDXL base, as Apple's
    `--refiner-version` does; `components` may then name `refiner` alone.
    `controlnets` (local ControlNet folders or Hub repo ids): the Unet is written as the one that
    takes ControlNet residuals (`..._control-unet.mlpackage`) and each ControlNet as
    `ControlNet_<org>_<name>.mlpackage`; `components=["controlnet"]` converts only the ControlNets,
    for an existing conversion in `out`.
    Everything is written into a hidden folder inside `out` first and moved into place at the
    end, so an interrupted or failed conversion leaves nothing in `out` that looks like (part of)
    a conversion. `progress` shows bars (terminals); without it, `on_message` gets one plain line
    per component.
    """
    from . import source as sources
    from .components import import_coremltools

    started = time.time()
    _validate(attention, precision, quantize_nbits, latent_size, format)
    wanted = _parse_components(components, refiner=refiner is not None)
    with_refiner = refiner is not None and (wanted is None or REFINER in wanted)
    controlnets = [str(c) for c in controlnets]
    want_controlnets = bool(controlnets) and (wanted is None or CONTROLNET in wanted)
    if wanted is not None and CONTROLNET in wanted and not controlnets:
        raise UsageError("--components controlnet needs the ControlNets to convert.",
                         hint="Name each with --controlnet CN_SRC (a diffusers ControlNet folder or a Hub repo id).")
    if wanted is not None:
        wanted = tuple(c for c in wanted if c not in (REFINER, CONTROLNET))
    if format == "compiled":
        from .compile import ensure_compiler

        ensure_compiler()
    out = Path(out).expanduser().resolve()

    src_path = Path(str(source)).expanduser()
    if src_path.is_dir():
        src, chosen = sources.from_folder(src_path, wanted)
        default_version = src_path.resolve().name
    elif sources.looks_like_repo_id(str(source)):
        src, chosen = sources.from_hub(str(source), wanted, revision=revision, progress=progress)
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
    attention = _attention_for(src.arch, attention, chunk_unet)
    if controlnets and src.arch == "sd3":
        raise UsageError("ControlNets are converted for Unet pipelines (SD 1.x/2.x, SDXL); SD3's transformer takes none.",
                         hint="Convert SD3 without --controlnet.")
    refiner_src = refiner_source(refiner, src, revision) if refiner is not None else None
    batch = 1 if unet_batch_one else 2
    if latent_size is None and not chosen and want_controlnets:
        latent_size = _existing_latent_size(out / attention / "packages")  # ControlNets for an earlier conversion
    geometry, latent, scale = _geometry(src.folder, latent_size, batch)
    cn_sources = _controlnet_sources(controlnets, src.folder) if want_controlnets else []

    import_coremltools()
    created = not out.exists()
    remove_stale_partials(out)
    stage = out / _partial_name()
    stage.mkdir(parents=True)
    try:
        results, extra_files, _order = _convert_into(
            stage, out, src, chosen, version, attention, precision, geometry, latent, scale, chunk_unet,
            quantize_nbits, query_chunk_size, format, progress, on_message, refiner_src if with_refiner else None,
            tuple(controlnets), cn_sources)
        _install(stage, out)
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        if created:
            _remove_if_empty(out)
        raise
    shutil.rmtree(stage, ignore_errors=True)
    notes = []
    packages_dir = out / attention / "packages"
    if cn_sources and not any(packages_dir.glob("*_control-unet*.mlpackage")):
        notes.append(f"{packages_dir} has no Unet that takes ControlNet residuals (control-unet); convert it with "
                     "`--components unet --controlnet ...` to run these ControlNets.")

    def moved(path: Path) -> Path:
        return out / path.relative_to(stage) if path.is_relative_to(stage) else path

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
        components=tuple(replace(c, path=moved(c.path)) for c in results),
        extra_files=tuple(moved(p) for p in extra_files),
        seconds=time.time() - started,
        refiner_version=(refiner_src.repo_id or str(refiner_src.folder)) if with_refiner and refiner_src else None,
        notes=tuple(notes),
    )


def _remove_if_empty(folder: Path) -> None:
    try:
        folder.rmdir()
    except OSError:
        pass


def _convert_into(stage: Path, out: Path, src: Any, chosen: tuple[str, ...], version: str, attention: str,
                  precision: str, geometry: Any, latent: tuple[int, int], scale: int, chunk_unet: bool,
                  quantize_nbits: int | None, query_chunk_size: int, format: str, progress: bool,
                  on_message: Callable[[str], None] | None, refiner_src: Any = None, controlnets: tuple[str, ...] = (),
                  cn_sources: list[Any] | None = None) -> tuple[list[ComponentResult], list[Path], list[str]]:
    """Every component (and the refiner's Unet when `refiner_src` is given; the controlled Unet and
    each ControlNet of `cn_sources` when `controlnets` are asked for), the repo files and (macOS)
    the compiled bundles, written into `stage`."""
    from . import source as sources
    from .components import Job, convert_component
    from ..human import human_size

    packages_dir = stage / attention / "packages"
    packages_dir.mkdir(parents=True, exist_ok=True)
    results: list[ComponentResult] = []
    order = [c for c in COMPONENTS if c in chosen] + ([REFINER] if refiner_src is not None else [])
    if controlnets:  # the Unet of a ControlNet conversion takes their residuals (Apple's control-unet)
        order = ["controlled_unet" if c == "unet" else c for c in order]
    for comp in order:
        stages = ["trace + convert", "save"]
        if quantize_nbits and comp in QUANTIZED_COMPONENTS:
            stages.append(f"palettize {quantize_nbits}-bit")
        if comp in CHUNKED_COMPONENTS and chunk_unet:
            stages.append("chunk")
        bar = _Progress(comp, stages, progress, on_message)
        t0 = time.time()
        comp_src = refiner_src if comp == REFINER else src
        job = Job(
            component=comp,
            folder=comp_src.folder,
            variant=comp_src.variants.get(sources.SUBFOLDERS.get(comp, "unet")),
            arch=comp_src.arch,
            attention=attention,
            precision=precision,
            geometry=geometry,
            model_version=version,
            query_chunk_size=query_chunk_size,
            time_ids=REFINER_TIME_IDS if comp == REFINER else BASE_TIME_IDS,
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
            if comp in CHUNKED_COMPONENTS and chunk_unet:
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
    for cn in cn_sources or ():
        results.append(_convert_controlnet(cn, src, packages_dir, attention, precision, geometry, version,
                                           query_chunk_size, quantize_nbits, progress, on_message))
        gc.collect()

    extra_files = _write_repo_files(src, stage, out, version, attention, precision, quantize_nbits, order, latent,
                                    scale)
    if format == "compiled":
        from .compile import compile_outputs

        results += compile_outputs(results, stage / attention / "compiled", stage, progress)
    return results, extra_files, order


def _write_repo_files(
    src: Any,
    stage: Path,
    out: Path,
    version: str,
    attention: str,
    precision: str,
    quantize_nbits: int | None,
    order: list[str],
    latent: tuple[int, int],
    scale: int,
) -> list[Path]:
    """Tokenizer(s), scheduler config, card and `.hub.json` into `stage`; the card names the
    attentions `out` will hold (those there already and this one)."""
    from .repo_files import hub_metadata, write_card, write_scheduler, write_t5_tokenizer, write_tokenizer

    written: list[Path] = []
    for name in ("tokenizer", "tokenizer_2"):
        if (src.folder / name).is_dir():
            written += write_tokenizer(src.folder / name, stage / name)
    if (src.folder / "tokenizer_3").is_dir():
        written += write_t5_tokenizer(src.folder / "tokenizer_3", stage / "tokenizer_3")
    written.append(write_scheduler(src.folder / "scheduler", stage / "scheduler"))
    attentions = sorted({p.name for p in out.iterdir() if p.is_dir() and p.name in IMPLEMENTATIONS} | {attention})
    meta = hub_metadata(version, src.arch, attentions, quantize_nbits)
    write_card(stage, meta, order, precision, latent, scale)
    written += [stage / "README.md", stage / ".hub.json"]
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
                        progress: bool, on_message: Callable[[str], None] | None) -> ComponentResult:
    from ..human import human_size
    from .components import Job
    from .controlnet import convert_controlnet

    stages = ["trace + convert", "save"] + ([f"palettize {quantize_nbits}-bit"] if quantize_nbits else [])
    bar = _Progress(f"controlnet {cn.model_id.rsplit('/', 1)[-1]}"[:16], stages, progress, on_message)
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
