"""Compiled-bundle (`.mlmodelc`) test fixtures assembled from converted `.mlpackage`s.

Apple's compiler only runs on macOS, so tests on other machines get bundles built here:

- `model.mil`: the package's ML Program printed by `coreml_hub.mil.text.dumps`;
- `weights/weight.bin`: every weight blob rewritten with `coreml_hub.mil.blob.BlobWriter`
  (offsets in `model.mil` updated);
- `metadata.json`: the fields Apple's compiler writes (inputSchema, outputSchema,
  mlProgramOperationTypeHistogram, storagePrecision, computePrecision, availability, ...),
  in its format (shapes as strings, "MultiArray (Float16 2 × 4 × 8 × 8)" types);
- `coremldata.bin` and `analytics/coremldata.bin`: markers only. Apple's files are a
  private binary format; these say in plain text that they are test fixtures.

The `buildInfo` of `model.mil` names coreml-hub's fixture builder as the compiler.
"""

from __future__ import annotations

import json
import re
import shutil
import tempfile
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

FIXTURE_MARKER = b"COREML-HUB TEST FIXTURE: not an Apple coremldata.bin; built from a .mlpackage by coreml_hub.testing.compiled\n"
FIXTURE_COMPILER = "coreml-hub-test-fixture"

# Op types the compiler names without an opset prefix in the histogram (seen in real
# compiled iOS16 programs: data movement ops keep their base definition).
UNVERSIONED_OPS = frozenset({
    "slice_by_index", "slice_by_size", "transpose", "squeeze", "expand_dims", "pad",
    "concat", "split", "stack", "tile", "reverse", "identity",
})
AVAILABILITY = {
    7: {"macOS": "13.0", "tvOS": "16.0", "visionOS": "1.0", "watchOS": "9.0", "iOS": "16.0", "macCatalyst": "16.0"},
    8: {"macOS": "14.0", "tvOS": "17.0", "visionOS": "1.0", "watchOS": "10.0", "iOS": "17.0", "macCatalyst": "17.0"},
    9: {"macOS": "15.0", "tvOS": "18.0", "visionOS": "2.0", "watchOS": "11.0", "iOS": "18.0", "macCatalyst": "18.0"},
}
_DATA_TYPES = {"fp16": "Float16", "fp32": "Float32", "fp64": "Double", "int32": "Int32", "int8": "Int8",
               "uint8": "UInt8", "int16": "Int16", "uint16": "UInt16", "bool": "Bool"}
_FEATURE_TYPES = {65552: "Float16", 65568: "Float32", 65600: "Double", 131104: "Int32", 131080: "Int8"}


def _camel(op_type: str) -> str:
    head, *rest = op_type.split("_")
    return head + "".join(p[:1].upper() + p[1:] for p in rest)


def _pascal(op_type: str) -> str:
    return "".join(p[:1].upper() + p[1:] for p in op_type.split("_"))


def histogram_key(op_type: str, opset: str) -> str:
    """`einsum` in an ios16 function -> `Ios16.einsum`; `slice_by_index` -> `SliceByIndex`."""
    if op_type in UNVERSIONED_OPS or not opset.startswith("ios") or opset == "ios15":
        return _pascal(op_type)
    return f"Ios{opset[3:]}.{_camel(op_type)}"


def op_histogram(program: Any) -> dict[str, int]:
    """The metadata.json histogram: every op but `const`, keyed as the compiler keys them."""
    counts: Counter[str] = Counter()
    for function in program.functions.values():
        for op in function.block.walk():
            if op.type != "const":
                counts[histogram_key(op.type, function.opset)] += 1
    return dict(sorted(counts.items()))


def _mixed(kinds: set[str]) -> str:
    ordered = sorted(kinds)
    return ordered[0] if len(ordered) == 1 else f"Mixed ({', '.join(ordered)})"


def _precisions(program: Any) -> tuple[str, str]:
    """(storagePrecision, computePrecision) as the compiler summarizes them."""
    from coreml_hub.mil.program import TensorType

    storage: set[str] = set()
    compute: set[str] = set()
    for function in program.functions.values():
        for op in function.block.walk():
            if op.type == "const":
                for var in op.outputs:
                    if isinstance(var.type, TensorType) and var.type.dtype in ("fp16", "fp32") and var.type.shape:
                        storage.add(_DATA_TYPES[var.type.dtype])
            elif op.type == "constexpr_lut_to_dense":
                lut = op.attributes.get("lut") or op.inputs.get("lut")
                size = None
                if lut is not None and hasattr(lut, "type") and lut.type.shape:
                    size = int(lut.type.shape[-1] if op.attributes.get("lut") is None else lut.type.shape[0])
                bits = int(np.log2(size)) if size else 0
                storage.add(f"Palettized ({bits} bits)" if bits else "Palettized")
            elif op.type == "constexpr_affine_dequantize":
                data = op.attributes.get("quantized_data")
                storage.add("Int8" if data is None or data.type.dtype == "int8" else "UInt8")
            elif not op.type.startswith("constexpr_"):
                for var in op.outputs:
                    if isinstance(var.type, TensorType) and var.type.dtype in _DATA_TYPES:
                        compute.add(_DATA_TYPES[var.type.dtype])
    compute.discard("Bool")
    return _mixed(storage or {"Float32"}), _mixed(compute or {"Float32"})


_COLOR_SPACES = {10: "Grayscale", 20: "RGB", 30: "BGR", 40: "Grayscale"}  # fp16 gray: read from model.mil
_FEATURE_KINDS = {"multiArrayType": "MultiArray", "imageType": "Image", "stringType": "String",
                  "int64Type": "Int64", "doubleType": "Double", "dictionaryType": "Dictionary",
                  "stateType": "State"}


# the order Apple's compiler writes an entry's keys in (seen in real metadata.json files)
_KEY_ORDER = {k: i for i, k in enumerate(("hasShapeFlexibility", "isOptional", "dataType", "formattedType",
                                           "shortDescription", "shape", "name", "type"))}


def _dims(values: Any, separator: str = ", ", brackets: bool = True) -> str:
    text = separator.join(str(int(v)) for v in values)
    return f"[{text}]" if brackets else text


def _array_fields(array: Any) -> dict[str, str]:
    """The multi-array fields of Core ML's FeatureType::toDictionary (shapes as strings)."""
    flex = array.WhichOneof("ShapeFlexibility")
    shape = [int(d) for d in array.shape]
    fields: dict[str, str] = {"dataType": _FEATURE_TYPES.get(int(array.dataType), "Float32")}
    if flex == "enumeratedShapes":
        shapes = [[int(d) for d in s.shape] for s in array.enumeratedShapes.shapes]
        shape = shape or shapes[0]
        fields["enumeratedShapes"] = "[" + ", ".join(_dims(s) for s in shapes) + "]"
        fields["shapeFlexibility"] = " | ".join(_dims(s, " × ", False) for s in shapes)
    elif flex == "shapeRange":
        ranges = [(int(r.lowerBound), int(r.upperBound)) for r in array.shapeRange.sizeRanges]
        shape = shape or [lo for lo, _ in ranges]
        fields["shapeRange"] = "[" + ", ".join(f"[{lo}, {hi}]" for lo, hi in ranges) + "]"
        fields["shapeFlexibility"] = " × ".join(str(lo) if lo == hi else f"{lo}...{hi if hi >= 0 else ''}"
                                                 for lo, hi in ranges)
    fields["shape"] = _dims(shape)
    fields["hasShapeFlexibility"] = "1" if flex else "0"
    fields["formattedType"] = f"MultiArray ({fields['dataType']} {' × '.join(str(d) for d in shape)})"
    return fields


def _image_fields(image: Any) -> dict[str, str]:
    flex = image.WhichOneof("SizeFlexibility")
    width, height = int(image.width), int(image.height)
    fields: dict[str, str] = {}
    if flex == "enumeratedSizes":
        sizes = [(int(s.width), int(s.height)) for s in image.enumeratedSizes.sizes]
        width, height = (width, height) if width and height else sizes[0]
        fields["enumeratedSizes"] = "[" + ", ".join(f"[{w}, {h}]" for w, h in sizes) + "]"
        fields["sizeFlexibility"] = " | ".join(f"{w} × {h}" for w, h in sizes)
    elif flex == "imageSizeRange":
        rng = image.imageSizeRange
        (wl, wh), (hl, hh) = ((int(rng.widthRange.lowerBound), int(rng.widthRange.upperBound)),
                              (int(rng.heightRange.lowerBound), int(rng.heightRange.upperBound)))
        width, height = (width, height) if width and height else (wl, hl)
        fields["sizeRange"] = f"[[{wl}, {wh}], [{hl}, {hh}]]"
        fields["sizeFlexibility"] = f"{wl}...{wh if wh >= 0 else ''} × {hl}...{hh if hh >= 0 else ''}"
    space = _COLOR_SPACES.get(int(image.colorSpace), "RGB")
    fields.update({"width": str(width), "height": str(height), "colorspace": space,
                   "isColor": "0" if space == "Grayscale" else "1", "hasSizeFlexibility": "1" if flex else "0",
                   "formattedType": f"Image ({'Grayscale' if space == 'Grayscale' else 'Color'} {width} × {height})"})
    return fields


def _schema(features: Any) -> list[dict[str, str]]:
    """metadata.json feature entries, with the fields Core ML's FeatureType::toDictionary writes."""
    rows = []
    for f in features:
        which = f.type.WhichOneof("Type")
        row: dict[str, str] = {"isOptional": "1" if f.type.isOptional else "0", "shortDescription": f.shortDescription,
                               "name": f.name, "type": _FEATURE_KINDS.get(which, "Invalid")}
        if which == "multiArrayType":
            row.update(_array_fields(f.type.multiArrayType))
        elif which == "stateType":
            array = _array_fields(f.type.stateType.arrayType)
            row.update({k: array[k] for k in ("dataType", "shape")})
            row["formattedType"] = "State (" + array["formattedType"] + ")"
        elif which == "imageType":
            row.update(_image_fields(f.type.imageType))
        elif which == "dictionaryType":
            key = f.type.dictionaryType.WhichOneof("KeyType")
            row["keyType"] = "String" if key == "stringKeyType" else "Int64"
            row["formattedType"] = f"Dictionary ({row['keyType']} → Double)"
        else:
            row["formattedType"] = row["type"]
        rows.append(dict(sorted(row.items(), key=lambda kv: _KEY_ORDER.get(kv[0], len(_KEY_ORDER)))))
    return rows


def metadata(spec: Any, program: Any, class_name: str) -> list[dict[str, Any]]:
    """metadata.json content for a compiled bundle of `spec` / `program`."""
    desc = spec.description
    storage, compute = _precisions(program)
    version = int(spec.specificationVersion)
    entry: dict[str, Any] = {
        "shortDescription": desc.metadata.shortDescription,
        "metadataOutputVersion": "3.0",
        "outputSchema": _schema(desc.output),
        "version": desc.metadata.versionString,
        "modelParameters": [],
        "author": desc.metadata.author,
        "specificationVersion": version,
        "storagePrecision": storage,
        "license": desc.metadata.license,
        "mlProgramOperationTypeHistogram": op_histogram(program),
        "computePrecision": compute,
        "stateSchema": _schema(desc.state),
        "isUpdatable": "0",
        "availability": AVAILABILITY.get(version, AVAILABILITY[7]),
        "modelType": {"name": "MLModelType_mlProgram"},
        "inputSchema": _schema(desc.input),
        "userDefinedMetadata": dict(sorted(desc.metadata.userDefined.items())),
        "generatedClassName": class_name,
        "method": "predict",
    }
    return [{k: v for k, v in entry.items() if v != "" or k in ("shortDescription",)}]


def class_name(package: Path) -> str:
    """The class name Xcode generates for a model file (letters, digits and underscores)."""
    return re.sub(r"\W", "_", package.stem)


def _build_info(program: Any) -> None:
    from coreml_hub.mil.program import DictType, DictValue, TensorType, TensorValue

    string = TensorType("string", ())

    def s(text: str) -> Any:
        return TensorValue(string, np.array(text, dtype=object))

    items = [(s("coremlc-component-MIL"), s(FIXTURE_COMPILER)), (s("coremlc-version"), s(FIXTURE_COMPILER))]
    old = program.attributes.get("buildInfo")
    if isinstance(old, DictValue):
        items += [kv for kv in old.items if str(kv[0].data) not in ("coremlc-component-MIL", "coremlc-version")]
    program.attributes["buildInfo"] = DictValue(DictType(string, string), tuple(items))


def build_mlmodelc(package: Path, dest: Path) -> Path:
    """Assemble `dest` (`X.mlmodelc/`) from `package` (`.mlpackage`); atomic."""
    from coreml_hub.mil import text
    from coreml_hub.mil.blob import BlobWriter
    from coreml_hub.mil.program import BlobRef
    from coreml_hub.mil.proto import load_program, load_spec

    spec = load_spec(package)
    program = load_program(package)
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".mlmodelc-", dir=dest.parent) as tmp:
        staged = Path(tmp) / dest.name
        (staged / "weights").mkdir(parents=True)
        (staged / "analytics").mkdir()
        moved: dict[tuple[str, int], int] = {}
        with BlobWriter(staged / "weights" / "weight.bin") as writer:
            for _op, _key, value in program.blob_values():
                ref = value.data
                old = (ref.path, ref.offset)
                if old not in moved:
                    moved[old] = writer.add(np.asarray(value.array()), dtype=value.type.dtype)
                value.data = BlobRef("@model_path/weights/weight.bin", moved[old])
        _build_info(program)
        (staged / "model.mil").write_text(text.dumps(program), encoding="utf-8")
        meta = metadata(spec, program, class_name(package))
        (staged / "metadata.json").write_text(json.dumps(meta, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        (staged / "coremldata.bin").write_bytes(FIXTURE_MARKER)
        (staged / "analytics" / "coremldata.bin").write_bytes(FIXTURE_MARKER)
        if dest.exists():
            shutil.rmtree(dest)
        staged.rename(dest)
    return dest


def is_fixture(bundle: Path) -> bool:
    """True for bundles built here (their coremldata.bin is the marker, not Apple's binary)."""
    marker = bundle / "coremldata.bin"
    return marker.is_file() and marker.read_bytes().startswith(b"COREML-HUB TEST FIXTURE")


def compile_folder(out: Path, attention: str) -> Path:
    """`out/<attention>/compiled/`: every package of `out/<attention>/packages/` as Apple names it
    (TextEncoder.mlmodelc, Unet.mlmodelc, UnetChunk1.mlmodelc, ControlledUnet.mlmodelc,
    controlnet/<Name>.mlmodelc, ...) plus vocab.json and merges.txt (and SD3's T5 tokenizer.json +
    tokenizer_config.json)."""
    from coreml_hub.convert.naming import compiled_path, copy_compiled_resources
    from coreml_hub.layouts import COMPILED_FILE_OF, component_of_stem

    packages = out / attention / "packages"
    compiled = out / attention / "compiled"
    compiled.mkdir(parents=True, exist_ok=True)
    for pkg in sorted(packages.glob("*.mlpackage")):
        component = component_of_stem(pkg.stem)
        if component is None or (component not in COMPILED_FILE_OF and component != "controlnet"):
            continue
        build_mlmodelc(pkg, compiled / compiled_path(component, pkg))
    copy_compiled_resources(out, compiled)
    return compiled
