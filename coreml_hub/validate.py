"""The checks behind `verify`: bundles, weight files, the pipeline contract, file hashes.

Every check returns `Problem`s and never raises on bad input: a damaged file is a finding,
not a crash. Each problem names the file concerned and says what is wrong in one line.
"""

from __future__ import annotations

import json
import math
import os
import re
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable, Iterable

from .bundle import ERROR, MANIFEST_NAME, REPULL_HINT, WARNING, Bundle, Component, Port, Problem
from .errors import CoremlHubError, UnsupportedOperation
from .layouts import COMPILED_FILE_OF

BUG_HINT = "This is a bug in coreml-hub's checks; please report it with the file."

# metadata.json dataType -> MIL dtype
METADATA_DTYPES = {"Float16": "fp16", "Float32": "fp32", "Float64": "fp64", "Double": "fp64", "Int32": "int32",
                   "Int8": "int8", "Int16": "int16", "Int64": "int64"}
# FeatureTypes.proto ArrayFeatureType.ArrayDataType -> MIL dtype
SPEC_ARRAY_DTYPES = {65552: "fp16", 65568: "fp32", 65600: "fp64", 131104: "int32", 131080: "int8"}


def guarded(check: Callable[..., list[Problem]], *args: Any, where: str) -> list[Problem]:
    """Run a check; an unexpected exception becomes one problem instead of a traceback."""
    try:
        return check(*args)
    except CoremlHubError as exc:
        return [Problem(ERROR, where, exc.message, exc.hint)]
    except Exception as exc:  # the contract: verify reports, it does not crash
        return [Problem(ERROR, where, f"internal error while checking ({type(exc).__name__}: {exc})", BUG_HINT)]


# -- components --------------------------------------------------------------------------


def check_components(bundle: Bundle) -> list[Problem]:
    problems: list[Problem] = []
    if not bundle.components:
        problems.append(Problem(ERROR, ".", "no Core ML bundles (.mlmodelc or .mlpackage) found",
                                "Point verify at a variant folder or a bundle; pulled models are listed by `coreml-hub ls`."))
    for component in bundle.components:
        rel = bundle.relative(component.path)
        check = check_compiled if component.format == "compiled" else check_package
        problems.extend(guarded(check, bundle, component, where=rel))
    return problems


def _problem(bundle: Bundle, path: Path, message: str, hint: str | None = REPULL_HINT,
             severity: str = ERROR) -> Problem:
    return Problem(severity, bundle.relative(path), message, hint)


def check_compiled(bundle: Bundle, component: Component) -> list[Problem]:
    """A `.mlmodelc`: required files, metadata.json, model.mil, its weights and its signature."""
    from .mil.text import MILSyntaxError, load

    root = component.path
    problems: list[Problem] = []
    for name in ("model.mil", "coremldata.bin", "metadata.json"):
        if not (root / name).is_file():
            problems.append(_problem(bundle, root / name, "is missing"))
    metadata = None
    if (root / "metadata.json").is_file():
        metadata, meta_problems = _read_metadata(bundle, root / "metadata.json")
        problems.extend(meta_problems)
    if not (root / "model.mil").is_file():
        return problems
    try:
        program = load(root / "model.mil")
    except MILSyntaxError as exc:
        problems.append(_problem(bundle, root / "model.mil",
                                 f"does not parse: line {exc.line}, column {exc.column}: {exc.reason}"
                                 + (f" (near {exc.excerpt!r})" if exc.excerpt else "")))
        return problems
    component.program = program
    if "main" not in program.functions:
        problems.append(_problem(bundle, root / "model.mil", "has no 'main' function"))
        return problems
    if metadata is not None:
        problems.extend(_compare_metadata(bundle, root / "metadata.json", metadata, component))
    problems.extend(check_blobs(bundle, component, program))
    return problems


def _read_json(bundle: Bundle, path: Path) -> tuple[Any, list[Problem]]:
    """A JSON file's content, or None and the problem that stops it being read."""
    try:
        return json.loads(path.read_bytes()), []
    except ValueError as exc:
        return None, [_problem(bundle, path, f"is not valid JSON ({exc})")]
    except OSError as exc:
        return None, [_problem(bundle, path, f"cannot be read ({exc.strerror})")]


def _read_metadata(bundle: Bundle, path: Path) -> tuple[dict[str, Any] | None, list[Problem]]:
    data, problems = _read_json(bundle, path)
    if problems:
        return None, problems
    if isinstance(data, list) and data and isinstance(data[0], dict):
        data = data[0]
    if not isinstance(data, dict):
        return None, [_problem(bundle, path, "is not a model description (expected a list holding one object)")]
    problems = []
    for key in ("inputSchema", "outputSchema"):
        if not isinstance(data.get(key), list) or not all(isinstance(x, dict) for x in data[key]):
            problems.append(_problem(bundle, path, f"has no {key} list"))
    return (data if not problems else None), problems


def parse_shape_string(text: Any) -> tuple[int, ...] | None:
    """metadata.json's "[2, 4, 64, 64]" -> (2, 4, 64, 64); None when it is not such a list."""
    if not isinstance(text, str) or not re.fullmatch(r"\s*\[\s*(\d+\s*(,\s*\d+\s*)*)?\]\s*", text):
        return None
    inner = text.strip()[1:-1].strip()
    return tuple(int(x) for x in inner.split(",")) if inner else ()


def _compare_metadata(bundle: Bundle, path: Path, metadata: dict[str, Any], component: Component) -> list[Problem]:
    problems: list[Problem] = []
    for kind, schema_key, ports in (("input", "inputSchema", component.inputs()),
                                    ("output", "outputSchema", component.outputs())):
        by_name = {p.name: p for p in ports}
        seen = set()
        for entry in metadata[schema_key]:
            name = entry.get("name")
            seen.add(name)
            if name not in by_name:
                problems.append(_problem(bundle, path, f"lists {kind} {name!r}, which model.mil's main function "
                                                       f"does not {'take' if kind == 'input' else 'return'}"))
                continue
            problems.extend(_compare_port(bundle, path, kind, entry, by_name[name], "metadata.json", "model.mil"))
        for name in by_name:
            if name not in seen:
                problems.append(_problem(bundle, path, f"does not list the {kind} {name!r} of model.mil's main function"))
    return problems


def _compare_port(bundle: Bundle, path: Path, kind: str, entry: dict[str, Any], port: Port,
                  declared_in: str, program_in: str) -> list[Problem]:
    if entry.get("type", "MultiArray") != "MultiArray":
        return []  # images, strings: no array dtype or shape to compare
    problems: list[Problem] = []
    meta_dtype = entry.get("dataType")
    mil_dtype = METADATA_DTYPES.get(meta_dtype) if isinstance(meta_dtype, str) else None
    if mil_dtype is None:
        problems.append(_problem(bundle, path, f"{kind} {port.name!r} has an unknown dataType {meta_dtype!r}"))
    elif mil_dtype != port.dtype:
        problems.append(_problem(bundle, path, f"{kind} {port.name!r} is {meta_dtype} in {declared_in} but "
                                               f"{port.dtype} in {program_in}"))
    shape = parse_shape_string(entry.get("shape"))
    if shape is None:
        problems.append(_problem(bundle, path, f"{kind} {port.name!r} has an unreadable shape {entry.get('shape')!r}"))
    elif port.shape is not None and not _shapes_agree(shape, port.shape):
        problems.append(_problem(bundle, path, f"{kind} {port.name!r} has shape {list(shape)} in {declared_in} but "
                                               f"{_fmt_shape(port.shape)} in {program_in}"))
    return problems


def _shapes_agree(declared: tuple[int, ...], actual: tuple[int | str, ...]) -> bool:
    return len(declared) == len(actual) and all(not isinstance(a, int) or a == d for d, a in zip(declared, actual))


def _fmt_shape(shape: Iterable[Any] | None) -> str:
    return "[?]" if shape is None else "[" + ", ".join(str(d) for d in shape) + "]"


# -- packages ------------------------------------------------------------------------------


def check_package(bundle: Bundle, component: Component) -> list[Problem]:
    """A `.mlpackage`: Manifest.json, the model spec (an ML Program), its weights, its description."""
    root = component.path
    problems, spec_path = _check_manifest(bundle, root)
    if spec_path is None or not spec_path.is_file():
        fallback = root / "Data" / "com.apple.CoreML" / "model.mlmodel"
        if spec_path is not None and spec_path != fallback:
            problems.append(_problem(bundle, spec_path, "is missing (Manifest.json names it as the model spec)"))
        if not fallback.is_file():
            if spec_path == fallback or spec_path is None:
                problems.append(_problem(bundle, fallback, "is missing (the model spec)"))
            return problems
        spec_path = fallback
    spec, spec_problems = _read_spec(bundle, spec_path)
    problems.extend(spec_problems)
    if spec is None:
        return problems
    from .mil.proto import program_from_proto

    try:
        program = program_from_proto(spec.mlProgram, base_dir=spec_path.parent)
    except CoremlHubError as exc:
        severity = WARNING if isinstance(exc, UnsupportedOperation) else ERROR
        problems.append(_problem(bundle, spec_path, f"the ML Program cannot be read: {exc.message}",
                                 severity=severity))
        return problems
    component.program = program
    if "main" not in program.functions:
        problems.append(_problem(bundle, spec_path, "the ML Program has no 'main' function"))
        return problems
    problems.extend(_compare_description(bundle, spec_path, spec, component))
    problems.extend(check_blobs(bundle, component, program))
    return problems


def _check_manifest(bundle: Bundle, root: Path) -> tuple[list[Problem], Path | None]:
    """Manifest.json's schema; returns the spec file its root model item names (when readable)."""
    path = root / "Manifest.json"
    if not path.is_file():
        return [_problem(bundle, path, "is missing")], None
    data, problems = _read_json(bundle, path)
    if problems:
        return problems, None
    if not isinstance(data, dict):
        return [_problem(bundle, path, "is not a JSON object")], None
    problems = []
    if not isinstance(data.get("fileFormatVersion"), str):
        problems.append(_problem(bundle, path, "has no fileFormatVersion string"))
    entries = data.get("itemInfoEntries")
    if not isinstance(entries, dict):
        problems.append(_problem(bundle, path, "has no itemInfoEntries object"))
        return problems, None
    for key, entry in entries.items():
        if not isinstance(entry, dict) or not isinstance(entry.get("path"), str):
            problems.append(_problem(bundle, path, f"item {key!r} has no path"))
    root_id = data.get("rootModelIdentifier")
    if not isinstance(root_id, str):
        problems.append(_problem(bundle, path, "has no rootModelIdentifier"))
        return problems, None
    entry = entries.get(root_id)
    if not isinstance(entry, dict) or not isinstance(entry.get("path"), str):
        problems.append(_problem(bundle, path, f"rootModelIdentifier {root_id!r} names no item in itemInfoEntries"))
        return problems, None
    relative = Path(entry["path"])
    if relative.is_absolute() or ".." in relative.parts:
        problems.append(_problem(bundle, path, f"the root model item's path {entry['path']!r} leaves the package"))
        return problems, None
    return problems, root / "Data" / relative


def _read_spec(bundle: Bundle, spec_path: Path) -> tuple[Any, list[Problem]]:
    from .mil.proto import proto_module

    spec = proto_module("Model_pb2").Model()
    try:
        spec.ParseFromString(spec_path.read_bytes())
    except Exception:  # protobuf's DecodeError and friends
        return None, [_problem(bundle, spec_path, "is not a Core ML model spec (the protobuf does not parse)")]
    kind = spec.WhichOneof("Type")
    if kind is None:
        return None, [_problem(bundle, spec_path, "is not a Core ML model spec (it describes no model)")]
    if kind != "mlProgram":
        return None, [_problem(bundle, spec_path, f"holds a {kind!r} model, not an ML Program",
                               "Core ML Stable Diffusion bundles are ML Programs; convert with convert_to='mlprogram'.")]
    problems = []
    if spec.specificationVersion < 7:
        problems.append(_problem(bundle, spec_path, f"has specification version {spec.specificationVersion}; "
                                                    "ML Programs need 7 or later"))
    return spec, problems


def _compare_description(bundle: Bundle, spec_path: Path, spec: Any, component: Component) -> list[Problem]:
    problems: list[Problem] = []
    for kind, features, ports in (("input", spec.description.input, component.inputs()),
                                  ("output", spec.description.output, component.outputs())):
        by_name = {p.name: p for p in ports}
        for feature in features:
            if feature.name not in by_name:
                problems.append(_problem(bundle, spec_path, f"the description lists {kind} {feature.name!r}, which the "
                                                            f"ML Program's main function does not "
                                                            f"{'take' if kind == 'input' else 'return'}"))
                continue
            if feature.type.WhichOneof("Type") != "multiArrayType":
                continue
            array = feature.type.multiArrayType
            port = by_name[feature.name]
            dtype = SPEC_ARRAY_DTYPES.get(array.dataType)
            if dtype is not None and dtype != port.dtype:
                problems.append(_problem(bundle, spec_path, f"{kind} {port.name!r} is {dtype} in the description but "
                                                            f"{port.dtype} in the ML Program"))
            shape = tuple(int(d) for d in array.shape)
            if shape and port.shape is not None and array.WhichOneof("ShapeFlexibility") is None \
                    and not _shapes_agree(shape, port.shape):
                problems.append(_problem(bundle, spec_path, f"{kind} {port.name!r} has shape {list(shape)} in the "
                                                            f"description but {_fmt_shape(port.shape)} in the ML Program"))
    return problems


# -- weights -----------------------------------------------------------------------------


def check_blobs(bundle: Bundle, component: Component, program: Any) -> list[Problem]:
    """Every weight the program references: the file exists, the offset lands on a valid blob
    header inside it, the blob's dtype is the declared one and its size fits the shape.

    One damage gives one problem: a truncated file is one line however many weights it cuts
    off, and weights failing for the very same reason are counted in one line.
    """
    from .mil.blob import METADATA_SIZE, BlobError, BlobFile, packed_size, resolve_blob_path

    problems: list[Problem] = []
    files: dict[Path, Any] = {}
    failures: dict[Path, list[tuple[int, str, str]]] = {}  # weight file -> (offset, what, reason) per bad weight
    referenced: dict[Path, set[int]] = {}
    try:
        for op, key, value in program.blob_values():
            ref = value.data
            what = f"'{op.name or op.type}' {key}"
            try:
                path = resolve_blob_path(ref.path, value.base_dir)
            except BlobError as exc:
                problems.append(_problem(bundle, component.path, f"{what}: {exc.reason}"))
                continue
            if path not in files:
                try:
                    files[path] = BlobFile(path)
                except BlobError as exc:
                    files[path] = None
                    problems.append(_problem(bundle, path, exc.reason))
            blob_file = files[path]
            if blob_file is None or ref.offset in referenced.setdefault(path, set()):
                continue
            referenced[path].add(ref.offset)
            reason = _check_one_blob(blob_file, ref.offset, value.type, packed_size)
            if reason:
                failures.setdefault(path, []).append((ref.offset, what, reason))
        for path, bad in failures.items():
            size, furthest = files[path].size, max(referenced[path])
            bad.sort()
            cut = [b for b in bad if b[0] + METADATA_SIZE > size or f"the file ends at {size} " in b[2]]
            if furthest + METADATA_SIZE > size and len(cut) > 1:  # cut short: every weight from the cut on is gone
                offset, what, reason = cut[0]
                problems.append(_problem(bundle, path, (
                    f"is truncated: {size} bytes, but the program reads a weight at offset {furthest}; "
                    f"{len(cut)} of the {len(referenced[path])} weights the program keeps in it cannot be read "
                    f"(first: blob at offset {offset} for {what}{reason})")))
                bad = [b for b in bad if b not in cut]
            by_reason: dict[str, list[tuple[int, str, str]]] = {}
            for item in bad:
                by_reason.setdefault(item[2], []).append(item)
            for reason, items in by_reason.items():
                offset, what, _ = items[0]
                if len(items) == 1:
                    problems.append(_problem(bundle, path, f"blob at offset {offset} for {what}{reason}"))
                else:
                    problems.append(_problem(bundle, path, f"{len(items)} weights{reason} (first: blob at offset "
                                                           f"{offset} for {what})"))
    finally:
        for blob_file in files.values():
            if blob_file is not None:
                blob_file.close()
    return problems


def _check_one_blob(blob_file: Any, offset: int, ttype: Any, packed_size: Callable[[str, int], int]) -> str | None:
    """What is wrong with one weight, as the end of a sentence about it (`: reason` or ` holds ...`)."""
    from .mil.blob import BlobError

    try:
        info = blob_file.info(offset)
    except BlobError as exc:
        return f": {exc.reason}"
    if info.dtype != ttype.dtype:
        return f" holds {info.dtype}, the program declares {ttype.dtype}"
    shape = ttype.static_shape
    if shape is None:
        return " has no static shape in the program"
    expected = packed_size(info.dtype, math.prod(shape))
    if info.size != expected:
        return f" holds {info.size} bytes; {ttype.dtype}{list(shape)} needs {expected}"
    return None


# -- the pipeline contract -------------------------------------------------------------------

TEXT_HIDDEN_OUTPUTS = ("last_hidden_state", "hidden_embeds")


def _static(port: Port | None) -> tuple[int, ...] | None:
    if port is None or port.shape is None or not all(isinstance(d, int) for d in port.shape):
        return None
    return tuple(int(d) for d in port.shape)


def check_contract(bundle: Bundle) -> list[Problem]:
    """The components a Stable Diffusion variant needs, and their shapes agreeing across them."""
    problems: list[Problem] = []

    def need(ok: bool, component: Component | None, message: str, hint: str | None = REPULL_HINT) -> None:
        if not ok:
            where = bundle.relative(component.path) if component is not None else "."
            problems.append(Problem(ERROR, where, message, hint))

    te, te2 = bundle.get("text_encoder"), bundle.get("text_encoder_2")
    unet, c1, c2 = bundle.get("unet"), bundle.get("unet_chunk1"), bundle.get("unet_chunk2")
    if unet is None and c1 is None and c2 is None:  # a variant whose only Unet takes ControlNet residuals
        unet, c1, c2 = (bundle.get("controlled_unet"), bundle.get("controlled_unet_chunk1"),
                        bundle.get("controlled_unet_chunk2"))
    vd, ve, sc = bundle.get("vae_decoder"), bundle.get("vae_encoder"), bundle.get("safety_checker")
    known = [c for c in bundle.components if c.known]
    if not known:
        return [Problem(WARNING, ".", "no Stable Diffusion components recognized by name; only each bundle was checked")]
    if bundle.get("mmdit") is not None:  # SD3: a transformer in place of the Unet
        from .validate_sd3 import check_sd3_contract

        return check_sd3_contract(bundle)

    compiled = any(c.format == "compiled" for c in bundle.components)
    te_name = _display("text_encoder", compiled)
    need(te is not None, None, f"no {te_name} bundle: every variant needs the text encoder")
    need(vd is not None, None, f"no {_display('vae_decoder', compiled)} bundle: every variant needs the VAE decoder")
    if unet is None and (c1 is None or c2 is None):
        if c1 is not None or c2 is not None:
            have = c1 or c2
            need(False, None, f"only {have.display_name} of the chunked Unet is present: both chunks are needed")
        else:
            need(False, None, f"no {_display('unet', compiled)} bundle (or UnetChunk1 + UnetChunk2)")
    if unet is not None and (c1 is not None or c2 is not None):
        problems.append(Problem(WARNING, ".", "both the full Unet and its chunks are present; one form is enough",
                                "Remove one form, or pull with --chunked/--no-chunked to fetch one."))
    if compiled and bundle.tokenizer_dir() is None:
        need(False, None, "vocab.json and merges.txt are missing: compiled variants carry their tokenizer")
    elif not compiled and bundle.tokenizer_dir() is None:
        problems.append(Problem(WARNING, ".", "no tokenizer files (vocab.json, merges.txt) next to the packages",
                                "`coreml-hub pull` fetches them from the model's PyTorch repo; generating needs them."))

    # shapes need the programs; a bundle that did not load was already reported
    first_unet = unet if unet is not None else c1
    if first_unet is None or first_unet.program is None:
        return problems
    sample = first_unet.port("sample")
    timestep = first_unet.port("timestep")
    ehs = first_unet.port("encoder_hidden_states")
    for name, port in (("sample", sample), ("timestep", timestep), ("encoder_hidden_states", ehs)):
        need(port is not None, first_unet, f"has no input {name!r}")
    sample_shape, ehs_shape, t_shape = _static(sample), _static(ehs), _static(timestep)
    sdxl = first_unet.port("time_ids") is not None and first_unet.port("text_embeds") is not None
    batch = None
    if sample_shape is not None:
        # 4 latent channels, or 9 for an inpainting Unet (latents, mask, masked-image latents)
        need(len(sample_shape) == 4 and sample_shape[1] in (4, 9), first_unet,
             f"sample is {_fmt_shape(sample_shape)}; expected [B, 4, H, W] (or [B, 9, H, W] for inpainting)")
        batch = sample_shape[0] if sample_shape else None
        need(batch in (1, 2), first_unet, f"batch size {batch}: Stable Diffusion Unets take a batch of 1 or 2")
    if t_shape is not None and batch is not None:
        need(t_shape == (batch,), first_unet, f"timestep is {_fmt_shape(t_shape)}; with sample batch {batch} it "
                                              f"must be [{batch}]")
    hidden = None
    if ehs_shape is not None:
        ok = len(ehs_shape) == 4 and ehs_shape[2] == 1 and (batch is None or ehs_shape[0] == batch)
        need(ok, first_unet, f"encoder_hidden_states is {_fmt_shape(ehs_shape)}; expected [{batch or 'B'}, C, 1, 77]")
        if ok:
            hidden = ehs_shape[1]
    if sdxl:
        for name, want in (("time_ids", 6), ("text_embeds", None)):
            shape = _static(first_unet.port(name))
            if shape is not None:
                need(len(shape) == 2 and (batch is None or shape[0] == batch) and (want is None or shape[1] == want),
                     first_unet, f"{name} is {_fmt_shape(shape)}; expected [{batch or 'B'}, {want or 'N'}]")
        need(te2 is not None, None, f"no {_display('text_encoder_2', compiled)} bundle: SDXL variants need "
                                    "the second text encoder")

    # text encoders: hidden sizes sum to the Unet's channels, sequence length matches
    te_total = 0
    te_known = True
    for encoder in ([te, te2] if sdxl else [te]):
        if encoder is None or encoder.program is None:
            te_known = False
            continue
        out = next((p for p in (encoder.port(n, output=True) for n in TEXT_HIDDEN_OUTPUTS) if p is not None), None)
        shape = _static(out)
        if out is None:
            need(False, encoder, "has no output 'last_hidden_state' (or 'hidden_embeds')")
            te_known = False
            continue
        if shape is None or len(shape) != 3:
            need(shape is None, encoder, f"{out.name} is {_fmt_shape(shape)}; expected [1, 77, C]")
            te_known = False
            continue
        te_total += shape[2]
        ids = _static(encoder.port("input_ids"))
        if ehs_shape is not None and len(ehs_shape) == 4:
            need(shape[1] == ehs_shape[3], encoder, f"{out.name} has {shape[1]} tokens but the Unet's "
                                                    f"encoder_hidden_states has {ehs_shape[3]}")
        if ids is not None:
            need(len(ids) == 2 and ids[1] == shape[1], encoder, f"input_ids is {_fmt_shape(ids)} but {out.name} has "
                                                                f"{shape[1]} tokens")
    if te_known and hidden is not None and te_total:
        what = "the text encoders' hidden sizes add up to" if sdxl else f"{te.display_name}'s hidden size is"
        need(te_total == hidden, first_unet, f"encoder_hidden_states has {hidden} channels but {what} {te_total}")
    if sdxl and te2 is not None and te2.program is not None:
        pooled = _static(te2.port("pooled_outputs", output=True))
        embeds = _static(first_unet.port("text_embeds"))
        if pooled is not None and embeds is not None and len(embeds) == 2:
            need(pooled[-1] == embeds[1], te2, f"pooled_outputs has {pooled[-1]} values but the Unet's text_embeds "
                                               f"takes {embeds[1]}")

    # Unet output, chunks
    final = unet if unet is not None else c2
    if final is not None and final.program is not None:
        noise = final.port("noise_pred", output=True)
        need(noise is not None, final, "has no output 'noise_pred'")
        if noise is not None and sample_shape is not None and _static(noise) is not None and len(sample_shape) == 4:
            expected = (sample_shape[0], 4, *sample_shape[2:])  # the latents only, for inpainting Unets too
            need(_static(noise) == expected, final, f"noise_pred is {_fmt_shape(noise.shape)} but sample is "
                                                    f"{_fmt_shape(sample_shape)}")
    if unet is None and c1 is not None and c2 is not None and c1.program is not None and c2.program is not None:
        produced = {p.name: p for p in c1.outputs()}
        accepted = {p.name: p for p in c1.inputs()}
        for port in c2.inputs():
            source = produced.get(port.name) or accepted.get(port.name)
            if source is None:
                need(False, c2, f"takes {port.name!r}, which neither UnetChunk1's outputs nor the Unet inputs provide")
            elif _static(source) is not None and _static(port) is not None and _static(source) != _static(port):
                need(False, c2, f"takes {port.name!r} as {_fmt_shape(port.shape)} but it is "
                                f"{_fmt_shape(source.shape)} where it comes from")

    # VAE: latent size agrees with the Unet, image sizes agree between decoder and encoder
    latent_hw = sample_shape[2:] if sample_shape is not None and len(sample_shape) == 4 else None
    image_hw = None
    if vd is not None and vd.program is not None:
        z = _static(vd.port("z"))
        need(vd.port("z") is not None, vd, "has no input 'z'")
        if z is not None:
            need(len(z) == 4 and z[1] == 4, vd, f"z is {_fmt_shape(z)}; expected [1, 4, H, W]")
            if latent_hw is not None and len(z) == 4:
                need(z[2:] == latent_hw, vd, f"z is {_fmt_shape(z)} but the Unet's sample is {_fmt_shape(sample_shape)}: "
                                             "the latent sizes differ")
        image = _static(vd.port("image", output=True))
        need(vd.port("image", output=True) is not None, vd, "has no output 'image'")
        if image is not None and z is not None and len(z) == 4:
            ok = len(image) == 4 and image[1] == 3 and vae_scale_factor(z[2:], image[2:]) is not None
            need(ok, vd, f"image is {_fmt_shape(image)}; for z {_fmt_shape(z)} it must be [1, 3, k*{z[2]}, k*{z[3]}] "
                         "with one whole scale factor k for both sides")
            image_hw = image[2:] if ok else None
    if ve is not None and ve.program is not None:
        x = _static(ve.port("x"))
        need(ve.port("x") is not None, ve, "has no input 'x'")
        if x is not None and image_hw is not None:
            need(len(x) == 4 and x[1] == 3 and x[2:] == image_hw, ve,
                 f"x is {_fmt_shape(x)} but {_display('vae_decoder', compiled)} makes images of "
                 f"{image_hw[1]}x{image_hw[0]}")
        elif x is not None and latent_hw is not None:
            need(len(x) == 4 and x[1] == 3 and vae_scale_factor(latent_hw, x[2:]) is not None, ve,
                 f"x is {_fmt_shape(x)}; for the Unet's sample {_fmt_shape(sample_shape)} it must be "
                 f"[1, 3, k*{latent_hw[0]}, k*{latent_hw[1]}] with one whole scale factor k for both sides")
        latent = _static(ve.port("latent", output=True))
        if latent is not None and latent_hw is not None:
            need(len(latent) == 4 and latent[2:] == latent_hw, ve,
                 f"latent is {_fmt_shape(latent)} but the Unet's sample is {_fmt_shape(sample_shape)}")
    if sc is None and not sdxl:
        problems.append(Problem(WARNING, ".", "no SafetyChecker: generated images are not filtered", None))
    if bundle.get("refiner") or bundle.get("refiner_chunk1") or bundle.get("refiner_chunk2"):
        from .validate_refiner import check_refiner_contract

        problems.extend(check_refiner_contract(bundle))

    problems.extend(check_controlnets(bundle, sdxl, image_hw))

    # attention: what the bundles say against what the variant declares
    found = attention_from_bundles(bundle)
    declared = bundle.attention
    if found is not None and declared is not None:
        if declared.startswith("split_einsum") and found == "original":
            need(False, first_unet, f"the variant is {declared} but the Unet has no einsum op (original attention)")
        elif declared == "original" and found == "split_einsum":
            need(False, first_unet, "the variant is original but the Unet uses einsum (split_einsum attention)")
    return problems


def _io(components: list[Component]) -> Any:
    """The ports of a (chunked) model as a controlnet_io.BundleIO: the first part's inputs, plus later parts'
    that no earlier part makes, and the last part's outputs."""
    from .controlnet_io import BundleIO

    inputs: dict[str, tuple[int, ...]] = {}
    produced: set[str] = set()
    outputs: dict[str, tuple[int, ...]] = {}
    for part in components:
        for port in part.inputs():
            if port.name not in produced:
                inputs.setdefault(port.name, _static(port) or ())
        produced |= {p.name for p in part.outputs()}
        outputs = {p.name: _static(p) or () for p in part.outputs()}
    return BundleIO(components[0].path, inputs, outputs)


def check_controlnets(bundle: Bundle, sdxl: bool, image_hw: tuple[int, ...] | None) -> list[Problem]:
    """The ControlNet contract: a controlled Unet takes residuals; each ControlNet takes the Unet's text width,
    latent size and the VAE's image size, makes the residuals it takes, and uses the Unet's attention."""
    from .controlnet_io import controlnet_mismatches

    problems: list[Problem] = []
    controlled = [c for c in (bundle.get("controlled_unet"),) if c is not None] or \
        [c for c in (bundle.get("controlled_unet_chunk1"), bundle.get("controlled_unet_chunk2")) if c is not None]
    nets = [c for c in bundle.components if c.name == "controlnet"]
    if not controlled and not nets:
        return problems
    hint = "Pull ControlNets made for this model (same base, size and attention), or convert them with --controlnet."
    if any(c.program is None for c in controlled + nets):
        return problems  # a bundle that did not load was already reported
    if controlled:
        unet = _io(controlled)
        if not unet.residual_inputs():
            problems.append(Problem(ERROR, bundle.relative(controlled[0].path),
                                    "takes no additional_residual_* inputs, so it is no Unet for ControlNets",
                                    REPULL_HINT))
            return problems
    elif nets:
        problems.append(Problem(WARNING, ".", f"{len(nets)} ControlNet(s) but no Unet that takes their residuals "
                                              "(ControlledUnet): they cannot be used", hint))
        return problems
    image = (image_hw[1], image_hw[0]) if image_hw is not None and len(image_hw) == 2 else None
    unet_attention = "split_einsum" if any(c.program.op_histogram().get("einsum") for c in controlled) else "original"
    for net in nets:
        where = bundle.relative(net.path)
        for message in controlnet_mismatches(_io([net]), unet, image, net.path.stem):
            problems.append(Problem(ERROR, where, message, hint))
        attention = "split_einsum" if net.program.op_histogram().get("einsum") else "original"
        if attention != unet_attention:
            problems.append(Problem(WARNING, where, f"uses {attention} attention but the Unet {unet_attention}; it "
                                                    "runs, but not on the same compute units", None))
    return problems


def vae_scale_factor(latent_hw: Iterable[int], image_hw: Iterable[int]) -> int | None:
    """How many pixels one latent cell covers per side (8 for Stable Diffusion's four-block VAE),
    read from the shapes: `k` when the image is `k` times the latent on both sides, else None."""
    latent, image = tuple(latent_hw), tuple(image_hw)
    if len(latent) != 2 or len(image) != 2 or min(latent) <= 0 or min(image) <= 0:
        return None
    factor, rest = divmod(image[0], latent[0])
    return factor if factor >= 1 and rest == 0 and image[1] == factor * latent[1] else None


def attention_from_bundles(bundle: Bundle) -> str | None:
    """`split_einsum` when the Unet (or a chunk) has einsum ops, `original` when it has none."""
    unets = [c for c in (bundle.get("unet"), bundle.get("unet_chunk1"), bundle.get("unet_chunk2")) if c is not None]
    programs = [c.program for c in unets if c.program is not None]
    if not programs:
        return None
    return "split_einsum" if any(p.op_histogram().get("einsum") for p in programs) else "original"


def _display(name: str, compiled: bool) -> str:
    return COMPILED_FILE_OF.get(name, name) if compiled else name


# -- hashes ------------------------------------------------------------------------------


def hash_files(paths: list[Path], workers: int | None = None,
               on_bytes: Callable[[int], None] | None = None) -> dict[Path, str | OSError]:
    """sha256 of several files in parallel threads; an unreadable file maps to its OSError."""
    from .download import HASH_BLOCK, sha256_file

    workers = workers or min(8, max(1, len(paths)), (os.cpu_count() or 2) * 2)
    local = threading.local()

    def one(path: Path) -> tuple[Path, str | OSError]:
        buf = getattr(local, "buf", None)
        if buf is None:
            buf = local.buf = bytearray(HASH_BLOCK)
        try:
            return path, sha256_file(path, buffer=buf, on_bytes=on_bytes)[0].hexdigest()
        except OSError as exc:
            return path, exc

    # biggest first, so one huge weight file does not start last and run alone
    ordered = sorted(paths, key=lambda p: -_size(p))
    with ThreadPoolExecutor(max_workers=workers) as pool:
        return dict(pool.map(one, ordered))


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0


def check_hashes(bundle: Bundle, progress: bool = False) -> tuple[list[Problem], int]:
    """Re-hash every file the pull manifest lists (under the verified path) and compare."""
    manifest = bundle.manifest
    hint = "Re-pull with `--force` to fetch the file again."
    if manifest is None or "_unreadable" in manifest:
        what = "the pull manifest is unreadable" if manifest else f"no pull manifest ({MANIFEST_NAME}) was found"
        return [Problem(ERROR, ".", f"{what}; there are no recorded hashes to compare with",
                        "--hashes works on pulled models (`coreml-hub ls`).")], 0
    entries = manifest.get("files")
    if not isinstance(entries, list):
        return [Problem(ERROR, MANIFEST_NAME, "the pull manifest lists no files", hint)], 0
    variant_root = bundle.path if bundle.is_variant else bundle.path.parent
    if not (variant_root / MANIFEST_NAME).is_file():
        variant_root = bundle.path
    prefix = "" if bundle.is_variant else bundle.path.name + "/"
    problems: list[Problem] = []
    wanted: dict[Path, tuple[str, int | None, str | None]] = {}
    for entry in entries:
        rel = entry.get("path") if isinstance(entry, dict) else None
        if not isinstance(rel, str):
            problems.append(Problem(ERROR, MANIFEST_NAME, "lists a file without a path", hint))
            continue
        if prefix and not rel.startswith(prefix):
            continue
        path = variant_root / rel
        shown = bundle.relative(path)
        if not path.is_file():
            problems.append(Problem(ERROR, shown, "is missing (listed in the pull manifest)", hint))
            continue
        size = entry.get("size")
        if isinstance(size, int) and path.stat().st_size != size:
            problems.append(Problem(ERROR, shown, f"is {path.stat().st_size} bytes; the pull manifest says {size}", hint))
            continue
        wanted[path] = (shown, size if isinstance(size, int) else None, entry.get("sha256"))
    listed = {variant_root / e["path"] for e in entries if isinstance(e, dict) and isinstance(e.get("path"), str)}
    scan_root = bundle.path
    for dirpath, _dirs, names in os.walk(scan_root):
        for name in names:
            path = Path(dirpath) / name
            if path not in listed and name != MANIFEST_NAME and not name.startswith("."):
                problems.append(Problem(WARNING, bundle.relative(path), "is not in the pull manifest", None))
    bar = None
    total = sum(_size(p) for p in wanted)
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=total, unit="B", unit_scale=True, desc="hashing", leave=False)
    lock = threading.Lock()

    def advance(n: int) -> None:
        with lock:
            bar.update(n)

    try:
        results = hash_files(list(wanted), on_bytes=advance if bar is not None else None)
    finally:
        if bar is not None:
            bar.close()
    for path, (shown, _size_, expected) in sorted(wanted.items(), key=lambda kv: kv[1][0]):
        got = results[path]
        if isinstance(got, OSError):
            problems.append(Problem(ERROR, shown, f"cannot be read ({got.strerror})", hint))
        elif not isinstance(expected, str):
            problems.append(Problem(WARNING, shown, "has no recorded sha256 in the pull manifest", None))
        elif got != expected.lower():
            problems.append(Problem(ERROR, shown, f"sha256 {got[:12]}… differs from the recorded {expected[:12]}…", hint))
    return problems, len(wanted)
