"""Tiny pipelines and their Core ML conversions, cached on disk across tests and processes.

`tiny_pipeline(style)` gives a diffusers pipeline with deterministic random weights and
the folder it is saved in; `converted(style, attention, precision, ...)` gives a
conversion output folder (the same layout `coreml-hub convert` writes). Both are cached
under `$COREML_HUB_TEST_CACHE` (default: `<tmp>/coreml-hub-test-cache`), keyed by a hash
of the configs, the options, the installed library versions and the source of the
converter itself, so a code change never serves a stale conversion. A file lock per
entry lets pytest-xdist workers share one conversion.

Entries are shared: treat returned folders as read-only (copy before changing them).
Converting is split into a Unet part (per attention) and a part with everything else,
so the three attention variants of a style share one conversion of the text encoder
and VAE.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from functools import lru_cache
from pathlib import Path
from typing import Any, Callable, Iterator

from . import tiny

PACKAGE_ROOT = Path(__file__).resolve().parent.parent
# Sources whose change invalidates an entry, per kind of entry.
CODE_PIPELINE = ("testing/tiny.py", "testing/tokenizer.py")
CODE_CONVERT = CODE_PIPELINE + ("convert", "testing/factory.py")
CODE_COMPILED = CODE_CONVERT + ("testing/compiled.py", "mil/text.py", "mil/blob.py", "mil/proto.py", "mil/program.py")
_LIBRARIES = ("torch", "coremltools", "diffusers", "transformers", "numpy")


def cache_dir() -> Path:
    override = os.environ.get("COREML_HUB_TEST_CACHE")
    root = Path(override).expanduser() if override else Path(tempfile.gettempdir()) / "coreml-hub-test-cache"
    root.mkdir(parents=True, exist_ok=True)
    return root


@lru_cache(maxsize=None)
def code_version(sources: tuple[str, ...] = CODE_CONVERT) -> str:
    """Hash of the given coreml_hub sources plus the library versions they run on."""
    from importlib import metadata

    digest = hashlib.sha256()
    for rel in sources:
        path = PACKAGE_ROOT / rel
        files = sorted(path.rglob("*.py")) if path.is_dir() else [path] if path.exists() else []
        for f in files:
            digest.update(f.relative_to(PACKAGE_ROOT).as_posix().encode())
            digest.update(f.read_bytes())
    for lib in _LIBRARIES:
        try:
            digest.update(f"{lib}={metadata.version(lib)}".encode())
        except metadata.PackageNotFoundError:
            digest.update(f"{lib}=none".encode())
    return digest.hexdigest()[:16]


def _key(kind: str, code: tuple[str, ...], **fields: Any) -> str:
    payload = json.dumps({"kind": kind, "code": code_version(code), **fields}, sort_keys=True, default=str)
    return hashlib.sha256(payload.encode()).hexdigest()[:20]


@contextlib.contextmanager
def _locked(name: str) -> Iterator[None]:
    from filelock import FileLock

    locks = cache_dir() / "locks"
    locks.mkdir(exist_ok=True)
    with FileLock(str(locks / f"{name}.lock"), timeout=1800):
        yield


def cached(kind: str, build: Callable[[Path], None], code: tuple[str, ...] = CODE_CONVERT, **fields: Any) -> Path:
    """The cache entry `kind-<hash(code, fields)>`, built once by `build(tmp_dir)` and renamed into place."""
    name = f"{kind}-{_key(kind, code, **fields)}"
    final = cache_dir() / kind / name
    if final.is_dir():
        return final
    with _locked(name):
        if final.is_dir():
            return final
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=final.parent))
        try:
            build(tmp)
            tmp.rename(final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return final


def pipeline_folder(style: str = "sd1") -> Path:
    """The saved diffusers pipeline folder of a tiny style (model_index.json, configs, safetensors)."""

    def build(tmp: Path) -> None:
        with _quiet_loading():
            pipe = tiny.build_pipeline(style, tokenizer_dir=tmp / "tokenizer")
            tiny.save_pipeline(pipe, tmp, style)

    return cached("pipeline", build, code=CODE_PIPELINE, style=style, config=tiny.style_config(style))


def tiny_pipeline(style: str = "sd1") -> tuple[Any, Path]:
    """(diffusers pipeline, its saved folder): the in-memory pipeline has exactly the saved weights."""
    import diffusers

    folder = pipeline_folder(style)
    with _quiet_loading():
        pipe = diffusers.DiffusionPipeline.from_pretrained(str(folder))
    pipe.set_progress_bar_config(disable=True)
    return pipe, folder


@contextlib.contextmanager
def _quiet_loading() -> Iterator[None]:
    from ..convert.components import _quiet

    with _quiet():
        yield


def model_version(style: str) -> str:
    return tiny.MODEL_VERSIONS[style]


def controlnet_folder(name: str = "sd1") -> Path:
    """A tiny ControlNet saved as diffusers does (config.json + safetensors), in a folder named
    `tiny-controlnet-<name>` (the name its conversions carry: `ControlNet_tiny-controlnet-<name>`)."""

    def build(tmp: Path) -> None:
        with _quiet_loading():
            tiny.build_controlnet(name).save_pretrained(tmp / controlnet_id(name), safe_serialization=True)

    return cached("controlnet", build, code=CODE_PIPELINE, config=tiny.controlnet_config(name)) / controlnet_id(name)


def controlnet_id(name: str) -> str:
    return f"tiny-controlnet-{name}"


def tiny_controlnet(name: str = "sd1") -> tuple[Any, Path]:
    """(diffusers ControlNetModel, its saved folder), with exactly the saved weights."""
    import diffusers

    folder = controlnet_folder(name)
    with _quiet_loading():
        model = diffusers.ControlNetModel.from_pretrained(str(folder))
    return model.eval(), folder


def components_of(style: str) -> tuple[str, ...]:
    """Components a full conversion of `style` produces (Unet chunks not included)."""
    if style == "sd3":
        return ("text_encoder", "text_encoder_2", "text_encoder_t5", "mmdit", "vae_decoder", "vae_encoder")
    comps = ["text_encoder"]
    if style == "sdxl":
        comps.append("text_encoder_2")
    comps += ["unet", "vae_decoder", "vae_encoder"]
    if tiny.style_config(style)["safety_checker"] is not None:
        comps.append("safety_checker")
    return tuple(comps)


def _convert_part(style: str, components: tuple[str, ...], **options: Any) -> Path:
    from ..convert import convert

    folder = pipeline_folder(style)

    def build(tmp: Path) -> None:
        convert(folder, tmp, components=components, model_version=model_version(style), progress=False, **options)

    return cached("part", build, style=style, components=components, options=options)


def converted(
    style: str = "sd1",
    attention: str = "split_einsum",
    precision: str = "fp16",
    chunk: bool = False,
    quantize: int | None = None,
    batch_one: bool = False,
    latent_size: tuple[int, int] | None = None,
    compiled: bool = False,
    controlnets: tuple[str, ...] = (),
    refiner: bool = False,
) -> Path:
    """A full conversion output folder of a tiny style, as `coreml-hub convert` writes it.

    `OUT/<attention>/packages/Stable_Diffusion_version_coreml-hub-test_tiny-<style>_<component>.mlpackage`
    (+ `unet_chunk1`/`unet_chunk2` with `chunk=True`), `OUT/tokenizer[_2]/`, `OUT/scheduler/`,
    `README.md`, `.hub.json`. With `compiled=True` also `OUT/<attention>/compiled/` with
    Apple's bundle names (test fixtures from `coreml_hub.testing.compiled`) and the tokenizer files.
    With `controlnets` (names of tiny ControlNets, see `tiny.CONTROLNETS`) the Unet is the one that
    takes their residuals (`..._control-unet.mlpackage`) and each ControlNet is there as
    `ControlNet_tiny-controlnet-<name>.mlpackage` (compiled: `controlnet/TinyControlnet<Name>.mlmodelc`).
    `refiner=True` (sdxl) adds the tiny refiner's Unet as `..._refiner.mlpackage` (and its chunks).
    """
    comps = components_of(style) + (("refiner",) if refiner else ())
    if refiner and style != "sdxl":
        raise ValueError("the tiny refiner goes with the sdxl style")
    latent = tuple(latent_size) if latent_size else None
    controlnets = tuple(controlnets)
    if style == "sd3" and attention != "original":
        raise ValueError("SD3 converts with original attention only")

    def build(tmp: Path) -> None:
        parts = [(_component_part(style, comp, attention, precision, chunk, quantize, batch_one, latent,
                                  controlled=comp == "unet" and bool(controlnets)), comp)
                 for comp in comps]
        parts += [(_controlnet_part(style, name, attention, precision, quantize, batch_one, latent), "unet")
                  for name in controlnets]
        _assemble(tmp, style, attention, precision, quantize, latent or (tiny.LATENT, tiny.LATENT),
                  [(part, attention if comp in ("unet", "refiner") else "original") for part, comp in parts],
                  comps)
        if compiled:
            from .compiled import compile_folder

            compile_folder(tmp, attention)

    return cached(
        "converted",
        build,
        code=CODE_COMPILED if compiled else CODE_CONVERT,
        style=style,
        attention=attention,
        precision=precision,
        chunk=chunk,
        quantize=quantize,
        batch_one=batch_one,
        latent=latent,
        compiled=compiled,
        controlnets=controlnets,
        refiner=refiner,
    )


# split_einsum_v2 chunks queries longer than this: small enough to really chunk the tiny Unet.
TINY_QUERY_CHUNK = 16


def _component_part(style: str, comp: str, attention: str, precision: str, chunk: bool, quantize: int | None,
                    batch_one: bool, latent: tuple[int, ...] | None, controlled: bool = False) -> Path:
    """One component converted on its own, keyed only by the options that change it, so that
    conversions share what they have in common (the text encoders across sizes, the VAE
    across attentions and quantizations, ...)."""
    from ..convert.api import QUANTIZED_COMPONENTS

    if style == tiny.INPAINT_STYLE and comp != "unet":
        style = "sd1"  # the same text encoder and VAE (same configs and seeds): one conversion serves both
    options: dict[str, Any] = {"precision": precision, "attention": "original"}
    if comp in QUANTIZED_COMPONENTS and quantize:
        options["quantize_nbits"] = quantize
    if not comp.startswith("text_encoder") and latent:
        options["latent_size"] = latent
    if comp in ("unet", "refiner"):
        options.update(attention=attention, chunk_unet=chunk, unet_batch_one=batch_one,
                       query_chunk_size=TINY_QUERY_CHUNK)
    if controlled:  # any ControlNet of the style makes convert write the controlled Unet; none is converted
        options["controlnets"] = (str(controlnet_folder(_style_controlnet(style))),)
    if comp == "refiner":
        options["refiner"] = str(pipeline_folder("sdxl-refiner"))
    return _convert_part(style, (comp,), **options)


def controlnet_package(name: str = "sd1", attention: str = "original", precision: str = "fp16") -> Path:
    """The `ControlNet_tiny-controlnet-<name>.mlpackage` of one tiny ControlNet, converted for its base style."""
    style = tiny.CONTROLNETS[name][0]
    part = _controlnet_part(style, name, attention, precision, None, False, None)
    return next((part / attention / "packages").glob("ControlNet_*.mlpackage"))


def _style_controlnet(style: str) -> str:
    return next(name for name, (base, _) in tiny.CONTROLNETS.items() if base == style)


def _controlnet_part(style: str, name: str, attention: str, precision: str, quantize: int | None, batch_one: bool,
                     latent: tuple[int, ...] | None) -> Path:
    """One tiny ControlNet converted for `style` (`--components controlnet`)."""
    options: dict[str, Any] = {"precision": precision, "attention": attention, "unet_batch_one": batch_one,
                               "query_chunk_size": TINY_QUERY_CHUNK, "controlnets": (str(controlnet_folder(name)),)}
    if quantize:
        options["quantize_nbits"] = quantize
    if latent:
        options["latent_size"] = latent
    return _convert_part(style, ("controlnet",), **options)


def _link_tree(src: Path, dest: Path) -> None:
    """Copy a tree using hard links where the filesystem allows (cache entries are immutable)."""

    def link(s: str, d: str) -> None:
        try:
            os.link(s, d)
        except OSError:
            shutil.copy2(s, d)

    shutil.copytree(src, dest, copy_function=link)


def _assemble(
    out: Path,
    style: str,
    attention: str,
    precision: str,
    quantize: int | None,
    latent: tuple[int, ...],
    parts: list[tuple[Path, str]],
    comps: tuple[str, ...],
) -> None:
    from ..convert.repo_files import hub_metadata, write_card

    packages = out / attention / "packages"
    packages.mkdir(parents=True)
    for part, part_attention in parts:
        for pkg in sorted((part / part_attention / "packages").glob("*.mlpackage")):
            _link_tree(pkg, packages / pkg.name)
        for sub in ("tokenizer", "tokenizer_2", "tokenizer_3", "scheduler"):
            if (part / sub).is_dir() and not (out / sub).exists():
                _link_tree(part / sub, out / sub)
    arch = style if style in ("sdxl", "sd3") else "sd"
    meta = hub_metadata(model_version(style), arch, [attention], quantize)
    write_card(out, meta, list(comps), precision, (latent[0], latent[1]), 8)


def package(out: Path, component: str) -> Path:
    """The `.mlpackage` of `component` inside a conversion output folder."""
    matches = sorted(out.glob(f"*/packages/*_{component}.mlpackage"))
    if not matches:
        raise FileNotFoundError(f"no {component} package under {out}")
    return matches[0]
