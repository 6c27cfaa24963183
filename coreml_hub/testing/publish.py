"""Lay tiny conversions out as Hub repos in a `coreml-hub serve` ROOT, in every real layout.

Every file is a real, runnable Core ML file converted from a tiny pipeline (packages by
coremltools, compiled bundles by `coreml_hub.testing.compiled`); only the file and folder
names imitate the repos on the Hub (see ARCHITECTURE.md "Hub layouts"):

- ``apple``: `<attention>/{packages,compiled}/` with the full Unet and its two chunks,
  Apple's package and bundle names, `vocab.json`/`merges.txt` beside compiled bundles.
- ``apple-sdxl``: `packages/` and `compiled/` at the root (no attention level) and the
  root zip `<name>_original_compiled.zip`.
- ``root-zip``: `<name>_<attention>_compiled.zip` at the root (the zip mirrors).
- ``community``: one zip per attention (and resolution) in `original/`, `split_einsum/`
  or `split-einsum/` folders, hyphenated attention in the file name, optional
  `<W>x<H>` folders and suffixes, `_no-i2i` (no VAEEncoder), `_cn`, or names with spaces.
  The `_cn` tag is only a name: the Unet inside takes no ControlNet residuals.
- ``flat``: bundles at the root or in one folder (e.g. `mlpackages/` holding `.mlmodelc`).
- ``argmax``: SD3 as argmaxinc publishes it: a root zip `<name>_original_compiled.zip` of the
  Swift resources, with T5 (and its tokenizer.json + tokenizer_config.json) inside it
  (`t5="zip"`, like `coreml-stable-diffusion-3-medium-1024-t5`) or `TextEncoderT5.mlmodelc/`
  beside it at the repo root (`t5="root"`, like `coreml-stable-diffusion-3-medium`).

ControlNets (`publish_controlnets`, `publish_controlnet_collection`): Apple's compiled layout with
`ControlledUnet.mlmodelc` and `controlnet/<Name>.mlmodelc` beside the pipeline's bundles, packages
with `..._control-unet.mlpackage` and `ControlNet_*.mlpackage`, and coreml-community's collection
of zipped compiled ControlNets under `CN/<attention>/`.

Files are copied, never linked, so tests may damage what they publish. Zips are written
with fixed timestamps, so a layout has the same bytes (and hashes) every time.
"""

from __future__ import annotations

import json
import shutil
import zipfile
from pathlib import Path
from typing import Any, Iterable

from . import factory

LAYOUTS = ("apple", "apple-sdxl", "root-zip", "community", "flat", "argmax")
T5_FILES = ("TextEncoderT5.mlmodelc", "tokenizer.json", "tokenizer_config.json")
GITATTRIBUTES = (
    "*.bin filter=lfs diff=lfs merge=lfs -text\n"
    "*.mlmodel filter=lfs diff=lfs merge=lfs -text\n"
    "*.zip filter=lfs diff=lfs merge=lfs -text\n"
    "*.safetensors filter=lfs diff=lfs merge=lfs -text\n"
)
_ZIP_TIME = (2023, 1, 1, 0, 0, 0)


def _meta(style: str, tags: Iterable[str] = (), library: str = "coreml") -> dict[str, Any]:
    base = ["coreml", "stable-diffusion", "text-to-image"]
    if style == "sdxl":
        base.append("stable-diffusion-xl")
    if style == "sd3":
        base.append("stable-diffusion-3")
    return {
        "library_name": library,
        "pipeline_tag": "text-to-image",
        "tags": base + [t for t in tags if t not in base],
        "base_model": factory.model_version(style),
    }


def _card(title: str, meta: dict[str, Any], lines: Iterable[str] = ()) -> str:
    front = ["---", f"library_name: {meta['library_name']}", f"pipeline_tag: {meta['pipeline_tag']}", "tags:"]
    front += [f"- {t}" for t in meta["tags"]] + ["---", "", f"# {title}", ""]
    return "\n".join(front + list(lines) + [""])


def _repo_folder(root: Path, repo_id: str, style: str, tags: Iterable[str], title: str, notes: Iterable[str]) -> Path:
    from .hubrepo import make_repo

    meta = _meta(style, tags)
    return make_repo(
        root,
        repo_id,
        {".gitattributes": GITATTRIBUTES, "README.md": _card(title, meta, notes)},
        meta=meta,
    )


def _copy(src: Path, dest: Path) -> None:
    dest.parent.mkdir(parents=True, exist_ok=True)
    if src.is_dir():
        shutil.copytree(src, dest, dirs_exist_ok=True)
    else:
        shutil.copyfile(src, dest)


def _zip_folder(src: Path, zip_path: Path, arcroot: str) -> Path:
    """Zip `src`'s contents under `arcroot/` (deterministic order and timestamps)."""
    zip_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = zip_path.with_name(zip_path.name + ".partial")
    with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=1) as zf:
        for path in sorted(src.rglob("*")):
            rel = path.relative_to(src).as_posix()
            name = f"{arcroot}/{rel}" if arcroot else rel
            info = zipfile.ZipInfo(name + ("/" if path.is_dir() else ""), date_time=_ZIP_TIME)
            if path.is_dir():
                info.external_attr = 0o40755 << 16
                zf.writestr(info, b"")
            else:
                info.external_attr = 0o644 << 16
                info.compress_type = zipfile.ZIP_DEFLATED
                zf.writestr(info, path.read_bytes())
    tmp.replace(zip_path)
    return zip_path


def _converted(style: str, attention: str, precision: str, chunk: bool, quantize: int | None,
               latent: tuple[int, int] | None = None, refiner: bool = False) -> Path:
    return factory.converted(style, attention, precision, chunk=chunk, quantize=quantize, latent_size=latent,
                             compiled=True, refiner=refiner)


def _stage_compiled(out: Path, attention: str, dest: Path, drop: Iterable[str] = (), chunks: bool = False) -> None:
    """Copy the compiled bundles (and tokenizer files) of `out` into `dest`, leaving out `drop` bundles."""
    dropped = set(drop)
    if not chunks:
        dropped |= {"UnetChunk1.mlmodelc", "UnetChunk2.mlmodelc", "UnetRefinerChunk1.mlmodelc",
                    "UnetRefinerChunk2.mlmodelc"}
    for item in sorted((out / attention / "compiled").iterdir()):
        if item.name not in dropped:
            _copy(item, dest / item.name)


def _stage_packages(out: Path, attention: str, dest: Path, chunks: bool = True) -> None:
    for pkg in sorted((out / attention / "packages").glob("*.mlpackage")):
        if not chunks and ("_unet_chunk" in pkg.name or "_refiner_chunk" in pkg.name):
            continue
        _copy(pkg, dest / pkg.name)


def publish_source(root: Path | str, style: str = "sd1", repo_id: str | None = None) -> Path:
    """The tiny diffusers pipeline itself as a Hub repo (by default under its model version id).

    Packages variants name this repo as the model they were converted from; `pull` takes
    the tokenizer and scheduler files from it.
    """
    from .hubrepo import make_repo

    repo_id = repo_id or factory.model_version(style)
    folder = factory.pipeline_folder(style)
    meta = {"library_name": "diffusers", "pipeline_tag": "text-to-image", "tags": ["diffusers", "stable-diffusion"]}
    dest = make_repo(root, repo_id, {".gitattributes": GITATTRIBUTES}, meta=meta)
    for item in sorted(folder.iterdir()):
        _copy(item, dest / item.name)
    if not (dest / "README.md").exists():
        (dest / "README.md").write_text(_card(f"{repo_id} (tiny random weights, for tests)", meta))
    return dest


def publish(
    root: Path | str,
    repo_id: str,
    *,
    style: str = "sd1",
    layout: str = "apple",
    attentions: Iterable[str] = ("original", "split_einsum"),
    formats: Iterable[str] = ("packages", "compiled"),
    precision: str = "fp16",
    quantize: int | None = None,
    resolutions: Iterable[tuple[int, int]] = (),
    tags: Iterable[str] = (),
    folder: str | None = None,
    hyphen_folders: bool = False,
    spaces: bool = False,
    with_source: bool | None = None,
    chunks: bool = True,
    t5: str = "zip",
    refiner: bool = False,
) -> Path:
    """Write `repo_id` into the serve ROOT `root` in `layout`; returns the repo folder.

    `resolutions`: (width, height) pixel sizes for community zips in `<W>x<H>` folders
    (each converted at that size); the default size zip is always written. `tags`:
    community name tags (`no-i2i`, `cn`, `6bit`). `folder`: for ``flat``, the one folder
    holding the bundles (None = the repo root). `with_source`: also publish the tiny
    diffusers repo the packages name (default: when packages are published). `t5`: for
    ``argmax``, T5 inside the zip (`zip`) or beside it at the root (`root`). `refiner`: for
    ``apple-sdxl``, the tiny SDXL refiner beside the Unet (`apple/coreml-stable-diffusion-xl-base-with-refiner`).
    """
    if layout not in LAYOUTS:
        raise ValueError(f"unknown layout {layout!r}; expected one of {', '.join(LAYOUTS)}")
    root = Path(root)
    attentions = tuple(attentions)
    formats = tuple(formats)
    tags = tuple(tags)
    name = repo_id.split("/", 1)[1]
    title = f"{repo_id}: tiny Core ML Stable Diffusion for tests ({layout} layout)"
    notes = [
        f"Random weights converted from `{factory.model_version(style)}` by coreml-hub; compiled bundles are test",
        "fixtures assembled on Linux (their coremldata.bin files are markers, not Apple's format).",
    ]
    card_tags = list(tags) + ([f"{quantize}bit", "palettized"] if quantize else [])
    repo = _repo_folder(root, repo_id, style, card_tags, title, notes)
    if with_source is None:
        with_source = "packages" in formats and layout in ("apple", "apple-sdxl", "flat")

    if layout == "apple":
        for attention in attentions:
            out = _converted(style, attention, precision, True, quantize)
            if "packages" in formats:
                _stage_packages(out, attention, repo / attention / "packages", chunks=chunks)
            if "compiled" in formats:
                _stage_compiled(out, attention, repo / attention / "compiled", chunks=chunks)
    elif layout == "apple-sdxl":
        attention = attentions[0] if attentions else "original"
        out = _converted(style, attention, precision, chunks, quantize, refiner=refiner)
        if "packages" in formats:
            _stage_packages(out, attention, repo / "packages", chunks=chunks)
        if "compiled" in formats:
            _stage_compiled(out, attention, repo / "compiled", chunks=chunks)
            _zip_folder(repo / "compiled", repo / f"{name}_{attention}_compiled.zip", f"{name}_{attention}_compiled")
    elif layout == "root-zip":
        for attention in attentions:
            out = _converted(style, attention, precision, False, quantize)
            stem = f"{name}_{attention}_compiled"
            staging = root / f".staging-{stem}"
            _stage_compiled(out, attention, staging)
            _zip_folder(staging, repo / f"{stem}.zip", stem)
            shutil.rmtree(staging)
    elif layout == "community":
        _community(root, repo, style, attentions, precision, quantize, tuple(resolutions), tags, hyphen_folders, spaces)
    elif layout == "argmax":
        out = _converted(style, "original", precision, False, quantize)
        stem = f"{name}_original_compiled"
        staging = root / f".staging-{stem}"
        _stage_compiled(out, "original", staging, drop=T5_FILES if t5 == "root" else ())
        _zip_folder(staging, repo / f"{stem}.zip", stem)
        shutil.rmtree(staging)
        if t5 == "root":
            _copy(out / "original" / "compiled" / "TextEncoderT5.mlmodelc", repo / "TextEncoderT5.mlmodelc")
    elif layout == "flat":
        attention = attentions[0] if attentions else "original"
        out = _converted(style, attention, precision, chunks, quantize)
        dest = repo / folder if folder else repo
        if "compiled" in formats:
            _stage_compiled(out, attention, dest, chunks=chunks)
        if "packages" in formats:
            _stage_packages(out, attention, dest, chunks=chunks)
            for sub in ("tokenizer", "scheduler"):
                _copy(out / sub, repo / sub)
    if with_source:
        publish_source(root, style)
    return repo


def _community(root: Path, repo: Path, style: str, attentions: tuple[str, ...], precision: str,
               quantize: int | None, resolutions: tuple[tuple[int, int], ...], tags: tuple[str, ...],
               hyphen_folders: bool, spaces: bool) -> None:
    base = repo.name.removeprefix("coreml-")
    drop = ["VAEEncoder.mlmodelc"] if "no-i2i" in tags else []
    sizes: list[tuple[int, int] | None] = [None, *resolutions]
    for attention in attentions:
        for size in sizes:
            latent = (size[1] // 8, size[0] // 8) if size else None
            out = _converted(style, attention, precision, False, quantize, latent)
            folder = attention.replace("_", "-") if hyphen_folders else attention
            res = f"{size[0]}x{size[1]}" if size else None
            if spaces:
                words = [base.replace("-", " "), attention.replace("_", "-").title()]
                words += [res] if res else []
                words += ["For ControlNet"] if "cn" in tags else []
                file_stem = " ".join(words)
            else:
                parts = [base, *[t for t in tags if t == "no-i2i"], attention.replace("_", "-")]
                parts += [t for t in tags if t not in ("no-i2i",)]
                parts += [res] if res else []
                file_stem = "_".join(parts)
            rel = Path(folder) / res / f"{file_stem}.zip" if res else Path(folder) / f"{file_stem}.zip"
            staging = root / f".staging-{file_stem}"
            _stage_compiled(out, attention, staging, drop=drop)
            _zip_folder(staging, repo / rel, file_stem)
            shutil.rmtree(staging)


def demo_repos(root: Path | str) -> list[str]:
    """The repos of the README demo: `demo/coreml-tiny-sd` (Apple layout, both attentions,
    packages and compiled) and the tiny diffusers repo its packages were converted from."""
    repo = "demo/coreml-tiny-sd"
    publish(root, repo, style="sd1", layout="apple", attentions=("original", "split_einsum"),
            formats=("packages", "compiled"), with_source=True)
    return [repo, factory.model_version("sd1")]


def repo_manifest(repo: Path) -> dict[str, int]:
    """{path: size} of a published repo, dotfiles left out (what `serve` lists)."""
    from .hubrepo import repo_file_sizes

    return repo_file_sizes(repo)


def describe(root: Path) -> str:
    """A JSON listing of every repo in a ROOT (handy when a test fails)."""
    repos = {}
    for hub in sorted(root.glob("*/*/.hub.json")):
        folder = hub.parent
        repos[f"{folder.parent.name}/{folder.name}"] = sorted(repo_manifest(folder))
    return json.dumps(repos, indent=2)


def _stage_controlled(style: str, attention: str, controlnets: tuple[str, ...], dest: Path, fmt: str,
                      with_controlnets: bool = True) -> None:
    """The controlled Unet (and the ControlNets) of a conversion with `controlnets`, copied into `dest`."""
    out = factory.converted(style, attention, "fp16", controlnets=controlnets, compiled=fmt == "compiled")
    if fmt == "compiled":
        src = out / attention / "compiled"
        _copy(src / "ControlledUnet.mlmodelc", dest / "ControlledUnet.mlmodelc")
        if with_controlnets:
            _copy(src / "controlnet", dest / "controlnet")
    else:
        for pkg in sorted((out / attention / "packages").glob("*.mlpackage")):
            if pkg.stem.endswith("_control-unet") or (with_controlnets and pkg.name.startswith("ControlNet_")):
                _copy(pkg, dest / pkg.name)


def publish_controlnets(root: Path | str, repo_id: str, *, style: str = "sd1",
                        controlnets: tuple[str, ...] = ("sd1", "sd1-b"),
                        plain_attentions: tuple[str, ...] = ("split_einsum",)) -> Path:
    """Apple's layout with ControlNets: `original/compiled/` and `original/packages/` hold the pipeline,
    its controlled Unet and the tiny `controlnets` (`controlnet/TinyControlnetSd1.mlmodelc`,
    `ControlNet_tiny-controlnet-sd1.mlpackage`); each of `plain_attentions` is a variant without them
    (a Unet that takes no residuals). The packages' source repo is published too."""
    root = Path(root)
    repo = _repo_folder(root, repo_id, style, ["controlnet"], f"{repo_id}: tiny Core ML Stable Diffusion with ControlNets",
                        ["Random weights; ControlledUnet and ControlNets beside the pipeline, as Apple's converter "
                         "lays them out."])
    out = _converted(style, "original", "fp16", False, None)
    for fmt in ("compiled", "packages"):
        dest = repo / "original" / fmt
        if fmt == "compiled":
            _stage_compiled(out, "original", dest)
        else:
            _stage_packages(out, "original", dest, chunks=False)
        _stage_controlled(style, "original", controlnets, dest, fmt)
    for attention in plain_attentions:
        _stage_compiled(_converted(style, attention, "fp16", False, None), attention, repo / attention / "compiled")
    publish_source(root, style)
    return repo


def publish_controlnet_collection(root: Path | str, repo_id: str,
                                  controlnets: tuple[tuple[str, str], ...] = (("sd1", "original"),)) -> Path:
    """coreml-community's ControlNet collection: `CN/<attention>/Tiny<Name>_<attention>.zip`, each zip holding
    one compiled ControlNet (`Tiny<Name>_<attention>/TinyControlnet<Name>.mlmodelc`). `controlnets`: (tiny
    ControlNet name, attention) pairs; each is converted (fp16) for its own base style."""
    from ..layouts import controlnet_bundle_name
    from .compiled import build_mlmodelc

    root = Path(root)
    meta = _meta("sd1", ["controlnet"])
    repo = make_repo_folder(root, repo_id, meta, f"{repo_id}: tiny compiled ControlNets, zipped (tests)")
    for name, attention in controlnets:
        package = factory.controlnet_package(name, attention, "fp16")
        words = "".join(w.title() for w in name.split("-"))
        hyphen = attention.replace("_", "-")
        stem = f"Tiny{words}_{hyphen}"
        staging = root / f".staging-{stem}"
        build_mlmodelc(package, staging / f"{controlnet_bundle_name(factory.controlnet_id(name))}.mlmodelc")
        _zip_folder(staging, repo / "CN" / hyphen / f"{stem}.zip", stem)
        shutil.rmtree(staging)
    return repo


def make_repo_folder(root: Path, repo_id: str, meta: dict[str, Any], title: str) -> Path:
    from .hubrepo import make_repo

    return make_repo(root, repo_id, {".gitattributes": GITATTRIBUTES, "README.md": _card(title, meta)}, meta=meta)


def publish_plain(root: Path | str, repo_id: str, listing: Iterable[tuple[str, int]], bundles: dict[str, Path], *,
                  meta: dict[str, Any] | None = None, files: dict[str, bytes | str] | None = None) -> Path:
    """A plain Core ML repo in the layout of a real one: `listing` is its (path, size) file list
    (as in tests/data/layouts); each bundle named in `bundles` (`X.mlpackage` -> a converted
    tiny bundle) takes the place of the listed one, `files` give other files' contents, and the
    remaining files outside any bundle get generated bytes of their listed size. Listed bundles
    not in `bundles` are left out. Returns the repo folder."""
    from .hubrepo import make_repo

    rows = list(listing)
    listed_bundles = {path.split("/")[0] for path, _size in rows if ".mlpackage/" in path or ".mlmodelc/" in path}
    unknown = set(bundles) - listed_bundles
    if unknown:
        raise ValueError(f"{', '.join(sorted(unknown))} not in the listing of {repo_id}")
    content: dict[str, bytes | str | int] = {}
    for path, size in rows:
        if path.split("/")[0] in listed_bundles:
            continue
        content[path] = (files or {}).get(path, size)
    content.update({path: data for path, data in (files or {}).items() if path not in content})
    for name, bundle in bundles.items():
        for item in sorted(Path(bundle).rglob("*")):
            if item.is_file():
                content[f"{name}/{item.relative_to(bundle).as_posix()}"] = item.read_bytes()
    return make_repo(root, repo_id, content, meta={"library_name": "coreml", **(meta or {})})
