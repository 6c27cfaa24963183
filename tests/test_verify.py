"""`verify` and `inspect`: real bundles (coremltools packages, compiled-layout folders), each
corrupted in every way a download or a disk can corrupt it, each giving its exact problem."""

from __future__ import annotations

import hashlib
import json
import shutil
import struct
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from coreml_hub.bundle import Problem, open_bundle, verify
from coreml_hub.cli import run_cli
from coreml_hub.mil.blob import BlobFile
from coreml_hub.mil.text import loads
from coreml_hub.plugins import pm
from coreml_hub.hookspecs import hookimpl
from coreml_hub.validate import hash_files

from _mil_fixtures import (
    SAMPLES,
    SAMPLES_MISSING,
    sd_specs,
    write_compiled,
    write_manifest,
    write_package_variant,
    write_variant,
)

PREFIX = "Stable_Diffusion_version_runwayml_stable-diffusion-v1-5_"
UNET_PKG = f"{PREFIX}unet.mlpackage"
NO_SAFETY = "warning: .: no SafetyChecker: generated images are not filtered"


def errors(report: Any) -> list[str]:
    return [f"{p.path}: {p.message}" for p in report.problems if p.is_error]


def everything(report: Any) -> list[str]:
    return [str(p) for p in report.problems]


@pytest.fixture(scope="module")
def package_variant(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_package_variant(tmp_path_factory.mktemp("packages") / "variant")


@pytest.fixture
def packages(package_variant: Path, tmp_path: Path) -> Path:
    """A fresh copy of the converted packages variant for one test to damage."""
    return Path(shutil.copytree(package_variant, tmp_path / "packages"))


@pytest.fixture
def compiled(tmp_path: Path) -> Path:
    return write_variant(tmp_path / "compiled")


def _blobs(bundle: Path) -> list[tuple[int, Any]]:
    """(metadata offset, BlobInfo) of every blob in the bundle's weight file, in file order."""
    weight = next(bundle.rglob("weight.bin"))
    with BlobFile(weight) as f:
        return [(info.offset, info) for info in f]


def _owner(bundle: Path, offset: int) -> str:
    """`'<const name>' val` of the constant that references a blob offset."""
    if bundle.suffix == ".mlpackage":
        from coreml_hub.mil.proto import load_program

        program = load_program(bundle)
    else:
        from coreml_hub.mil.text import load

        program = load(bundle)
    for op, key, value in program.blob_values():
        if value.data.offset == offset:
            return f"'{op.name}' {key}"
    raise AssertionError(f"no constant references offset {offset}")


def _patch(path: Path, at: int, data: bytes) -> None:
    raw = bytearray(path.read_bytes())
    raw[at:at + len(data)] = data
    path.write_bytes(bytes(raw))


# -- healthy inputs --------------------------------------------------------------------------


def test_converted_packages_variant_is_valid(package_variant: Path) -> None:
    report = verify(package_variant)
    assert report.ok, everything(report)
    assert everything(report) == [
        "warning: .: no tokenizer files (vocab.json, merges.txt) next to the packages",
        NO_SAFETY,
    ]
    assert report.components == tuple(f"{PREFIX}{c}.mlpackage" for c in ("text_encoder", "unet", "vae_decoder"))
    assert report.attention == "original"


def test_compiled_variants_of_each_family_are_valid(tmp_path: Path) -> None:
    for style, hidden in (("sd1", 32), ("sd2", 64), ("sdxl", 32)):
        report = verify(write_variant(tmp_path / style, style=style, hidden=hidden))
        assert report.ok, (style, everything(report))
        assert everything(report) == ([] if style == "sdxl" else [NO_SAFETY])


def test_chunked_unet_and_safety_checker(tmp_path: Path) -> None:
    root = write_variant(tmp_path / "v", components=["text_encoder", "unet_chunk1", "unet_chunk2", "vae_decoder",
                                                     "safety_checker"], batch=1)
    assert everything(verify(root)) == []
    write_compiled(root / "Unet.mlmodelc", *sd_specs(batch=1)["unet"])
    assert everything(verify(root)) == ["warning: .: both the full Unet and its chunks are present; one form is enough"]
    shutil.rmtree(root / "UnetChunk2.mlmodelc")
    shutil.rmtree(root / "Unet.mlmodelc")
    assert errors(verify(root)) == [".: only UnetChunk1 of the chunked Unet is present: both chunks are needed"]


@pytest.mark.skipif(not (SAMPLES / "bundles").is_dir(), reason=SAMPLES_MISSING)
def test_apple_compiled_bundles_verify_clean() -> None:
    for bundle in sorted((SAMPLES / "bundles").iterdir()):
        report = verify(bundle)
        assert report.ok and report.problems == (), (bundle.name, everything(report))


# -- .mlpackage corruptions -------------------------------------------------------------------


def test_package_weight_file_truncated(packages: Path) -> None:
    unet = packages / UNET_PKG
    weight = unet / "Data/com.apple.CoreML/weights/weight.bin"
    offset, info = _blobs(unet)[-1]
    size = weight.stat().st_size
    weight.write_bytes(weight.read_bytes()[:-10])
    assert errors(verify(packages)) == [
        f"{UNET_PKG}/Data/com.apple.CoreML/weights/weight.bin: blob at offset {offset} for {_owner(unet, offset)}: "
        f"blob declares {info.size} bytes at {info.data_offset} but the file ends at {size - 10} (short by 10 bytes)"
    ]


def test_package_blob_offset_past_the_end(packages: Path) -> None:
    unet = packages / UNET_PKG
    weight = unet / "Data/com.apple.CoreML/weights/weight.bin"
    offset, _info = _blobs(unet)[-1]
    weight.write_bytes(weight.read_bytes()[:offset])
    assert errors(verify(packages / UNET_PKG)) == [
        f"{UNET_PKG}/Data/com.apple.CoreML/weights/weight.bin: blob at offset {offset} for {_owner(unet, offset)}: "
        f"offset is past the end of the file ({offset} bytes)"
    ]


@pytest.mark.parametrize("field,value,reason", [
    ("sentinel", 0, ": no blob here (sentinel 0x00000000, expected 0xDEADBEEF)"),
    ("size", 2**64 - 1, ": blob declares 18446744073709551615 bytes at {data} but the file ends at {end} "
                        "(short by {short} bytes)"),
    ("dtype", 2, " holds fp32, the program declares fp16"),
    ("dtype", 77, ": unknown blob data type code 77"),
    ("size", -2, " holds {smaller} bytes; fp16{shape} needs {size}"),
])
def test_package_blob_header_damage(packages: Path, field: str, value: int, reason: str) -> None:
    from coreml_hub.mil.proto import load_program

    unet = packages / UNET_PKG
    weight = unet / "Data/com.apple.CoreML/weights/weight.bin"
    offset, info = next((o, i) for o, i in _blobs(unet) if i.dtype == "fp16")
    shape = next(list(v.type.shape) for _o, _k, v in load_program(unet).blob_values() if v.data.offset == offset)
    if field == "sentinel":
        _patch(weight, offset, struct.pack("<I", value))
    elif field == "dtype":
        _patch(weight, offset + 4, struct.pack("<I", value))
    else:
        _patch(weight, offset + 8, struct.pack("<Q", info.size + value if value < 0 else value))
    end = weight.stat().st_size
    text = reason.format(data=info.data_offset, end=end, short=value - (end - info.data_offset),
                         smaller=info.size + value, shape=shape, size=info.size)
    assert errors(verify(unet)) == [
        f"{UNET_PKG}/Data/com.apple.CoreML/weights/weight.bin: blob at offset {offset} for {_owner(unet, offset)}{text}"
    ]


def test_a_truncated_weight_file_is_one_problem(packages: Path) -> None:
    unet = packages / UNET_PKG
    weight = unet / "Data/com.apple.CoreML/weights/weight.bin"
    blobs = _blobs(unet)
    weight.write_bytes(weight.read_bytes()[: weight.stat().st_size // 2])
    size = weight.stat().st_size
    bad = [o for o, info in blobs if o + 64 > size or info.data_offset + info.size > size]
    assert len(bad) > 1
    found = errors(verify(packages))
    assert len(found) == 1, found  # one damage, one line (not one per unreadable weight)
    assert found[0].startswith(f"{UNET_PKG}/Data/com.apple.CoreML/weights/weight.bin: is truncated: {size} bytes, "
                               f"but the program reads a weight at offset {blobs[-1][0]}; {len(bad)} of the "
                               f"{len(blobs)} weights the program keeps in it cannot be read (first: blob at "
                               f"offset {bad[0]} for {_owner(unet, bad[0])}: ")


def test_inspect_fails_on_a_truncated_weight_file(packages: Path, capsys: pytest.CaptureFixture[str]) -> None:
    unet = packages / UNET_PKG
    weight = unet / "Data/com.apple.CoreML/weights/weight.bin"
    weight.write_bytes(weight.read_bytes()[: weight.stat().st_size // 2])
    assert run_cli(["inspect", str(unet)]) == 1
    captured = capsys.readouterr()
    assert "Inputs:" in captured.out  # what could be read is still shown
    lines = captured.err.splitlines()
    assert lines[0].startswith(f"Error: {UNET_PKG}/Data/com.apple.CoreML/weights/weight.bin: is truncated")
    assert lines[1].startswith(f"Hint: `coreml-hub verify {unet}` lists every problem.")
    assert "not a pulled model" in lines[1]
    assert run_cli(["inspect", str(unet), "--json"]) == 1
    data = json.loads(capsys.readouterr().out)
    assert len(data["problems"]) == 1 and "is truncated" in data["problems"][0]["message"]


def test_package_garbage_protobuf(packages: Path) -> None:
    spec = packages / UNET_PKG / "Data/com.apple.CoreML/model.mlmodel"
    spec.write_bytes(b"\xff" * 64)
    assert errors(verify(packages)) == [
        f"{UNET_PKG}/Data/com.apple.CoreML/model.mlmodel: is not a Core ML model spec (the protobuf does not parse)"
    ]


def test_package_truncated_protobuf(packages: Path) -> None:
    spec = packages / UNET_PKG / "Data/com.apple.CoreML/model.mlmodel"
    spec.write_bytes(spec.read_bytes()[: spec.stat().st_size // 2])
    assert errors(verify(packages / UNET_PKG)) == [
        f"{UNET_PKG}/Data/com.apple.CoreML/model.mlmodel: is not a Core ML model spec (the protobuf does not parse)"
    ]


def _edit_spec(package: Path, change: Any) -> None:
    from coreml_hub.mil.proto import load_spec

    path = package / "Data/com.apple.CoreML/model.mlmodel"
    spec = load_spec(path)
    change(spec)
    path.write_bytes(spec.SerializeToString())


def test_package_spec_version_type_and_description(packages: Path) -> None:
    unet = packages / UNET_PKG
    spec_path = f"{UNET_PKG}/Data/com.apple.CoreML/model.mlmodel"
    _edit_spec(unet, lambda s: setattr(s, "specificationVersion", 6))
    assert errors(verify(unet)) == [f"{spec_path}: has specification version 6; ML Programs need 7 or later"]
    _edit_spec(unet, lambda s: setattr(s, "specificationVersion", 7))
    _edit_spec(unet, lambda s: setattr(s.description.input[0], "name", "latents"))
    assert errors(verify(unet)) == [f"{spec_path}: the description lists input 'latents', which the ML Program's "
                                    "main function does not take"]
    _edit_spec(unet, lambda s: s.neuralNetwork.SetInParent())
    assert errors(verify(unet)) == [f"{spec_path}: holds a 'neuralNetwork' model, not an ML Program"]


def test_package_manifest_damage(packages: Path) -> None:
    unet = packages / UNET_PKG
    manifest = unet / "Manifest.json"
    good = json.loads(manifest.read_text())
    where = f"{UNET_PKG}/Manifest.json"
    manifest.write_text(json.dumps({**good, "rootModelIdentifier": "nope"}))
    assert errors(verify(unet)) == [f"{where}: rootModelIdentifier 'nope' names no item in itemInfoEntries"]
    manifest.write_text(json.dumps({k: v for k, v in good.items() if k != "fileFormatVersion"}))
    assert errors(verify(unet)) == [f"{where}: has no fileFormatVersion string"]
    manifest.write_text("{")
    assert errors(verify(unet)) == [f"{where}: is not valid JSON (Expecting property name enclosed in double "
                                    "quotes: line 1 column 2 (char 1))"]
    manifest.unlink()
    assert errors(verify(unet)) == [f"{where}: is missing"]
    manifest.write_text(json.dumps(good))
    (unet / "Data/com.apple.CoreML/model.mlmodel").unlink()
    spec_item = next(e["path"] for k, e in good["itemInfoEntries"].items() if k == good["rootModelIdentifier"])
    assert errors(verify(unet)) == [
        f"{UNET_PKG}/Data/{spec_item}: is missing (the model spec)"
    ]


def test_package_missing_weight_file(packages: Path) -> None:
    (packages / UNET_PKG / "Data/com.apple.CoreML/weights/weight.bin").unlink()
    assert errors(verify(packages)) == [f"{UNET_PKG}/Data/com.apple.CoreML/weights/weight.bin: weight file not found"]


# -- .mlmodelc corruptions --------------------------------------------------------------------


@pytest.mark.parametrize("name", ["model.mil", "coremldata.bin", "metadata.json"])
def test_compiled_required_files(compiled: Path, name: str) -> None:
    (compiled / "Unet.mlmodelc" / name).unlink()
    assert errors(verify(compiled)) == [f"Unet.mlmodelc/{name}: is missing"]


def test_compiled_unbalanced_bracket(compiled: Path) -> None:
    mil = compiled / "Unet.mlmodelc" / "model.mil"
    lines = mil.read_text().split("\n")
    index = next(i for i, line in enumerate(lines) if line.endswith(")];"))
    lines[index] = lines[index][:-2] + ";"  # drop the ']' closing the attributes
    mil.write_text("\n".join(lines))
    assert errors(verify(compiled)) == [
        f"Unet.mlmodelc/model.mil: does not parse: line {index + 1}, column {len(lines[index])}: "
        "expected ']', found ';' (near ';')"
    ]


def test_compiled_unknown_type(compiled: Path) -> None:
    mil = compiled / "VAEDecoder.mlmodelc" / "model.mil"
    lines = mil.read_text().split("\n")
    index = next(i for i, line in enumerate(lines) if "tensor<fp16," in line)
    column = lines[index].index("tensor<fp16,") + 1
    lines[index] = lines[index].replace("tensor<fp16,", "tensor<fp99,", 1)
    mil.write_text("\n".join(lines))
    (problem,) = errors(verify(compiled))
    assert problem.startswith(f"VAEDecoder.mlmodelc/model.mil: does not parse: line {index + 1}, column {column}: "
                              "unknown data type 'fp99' (near 'tensor<fp99,")


def test_compiled_garbage_model_mil(compiled: Path) -> None:
    (compiled / "Unet.mlmodelc" / "model.mil").write_bytes(bytes(range(256)) * 4)
    # the first byte that is not UTF-8 is 0x80, at offset 128, on the line after byte 10 ('\\n')
    assert errors(verify(compiled)) == ["Unet.mlmodelc/model.mil: does not parse: line 2, column 118: "
                                        "not UTF-8 text"]
    (compiled / "Unet.mlmodelc" / "model.mil").write_text("program(1.0)\n{\n    func main<ios16>(")
    assert errors(verify(compiled)) == ["Unet.mlmodelc/model.mil: does not parse: line 3, column 22: "
                                        "expected a type, found end of file"]


def test_compiled_metadata_disagrees_with_model_mil(compiled: Path) -> None:
    path = compiled / "Unet.mlmodelc" / "metadata.json"
    good = path.read_text()
    meta = json.loads(good)
    meta[0]["inputSchema"][0]["shape"] = "[2, 4, 16, 16]"
    meta[0]["inputSchema"][1]["dataType"] = "Float32"
    meta[0]["outputSchema"][0]["name"] = "noise"
    path.write_text(json.dumps(meta))
    assert errors(verify(compiled)) == [
        "Unet.mlmodelc/metadata.json: input 'sample' has shape [2, 4, 16, 16] in metadata.json but [2, 4, 8, 8] "
        "in model.mil",
        "Unet.mlmodelc/metadata.json: input 'timestep' is Float32 in metadata.json but fp16 in model.mil",
        "Unet.mlmodelc/metadata.json: lists output 'noise', which model.mil's main function does not return",
        "Unet.mlmodelc/metadata.json: does not list the output 'noise_pred' of model.mil's main function",
    ]
    path.write_text(good[:-5])
    (problem,) = errors(verify(compiled))
    assert problem.startswith("Unet.mlmodelc/metadata.json: is not valid JSON (")


def test_compiled_blob_damage(compiled: Path) -> None:
    unet = compiled / "Unet.mlmodelc"
    weight = unet / "weights" / "weight.bin"
    blobs = _blobs(unet)
    first, info = blobs[0]
    _patch(weight, first, b"\0\0\0\0")
    _patch(weight, blobs[1][0] + 8, struct.pack("<Q", 2**64 - 1))
    size = weight.stat().st_size
    assert errors(verify(compiled)) == [
        f"Unet.mlmodelc/weights/weight.bin: blob at offset {first} for 'w0' val: "
        "no blob here (sentinel 0x00000000, expected 0xDEADBEEF)",
        f"Unet.mlmodelc/weights/weight.bin: blob at offset {blobs[1][0]} for 'w1' val: blob declares "
        f"18446744073709551615 bytes at {blobs[1][1].data_offset} but the file ends at {size} "
        f"(short by {2**64 - 1 - (size - blobs[1][1].data_offset)} bytes)",
    ]
    weight.write_bytes(b"")
    assert errors(verify(compiled)) == [
        "Unet.mlmodelc/weights/weight.bin: 0 bytes, too small for a weight file header (64 bytes)"]


def test_compiled_blobfile_paths(compiled: Path) -> None:
    mil = compiled / "Unet.mlmodelc" / "model.mil"
    good = mil.read_text()
    mil.write_text(good.replace("@model_path/weights/weight.bin", "@model_path/weights/other.bin"))
    assert errors(verify(compiled)) == ["Unet.mlmodelc/weights/other.bin: weight file not found"]
    mil.write_text(good.replace("@model_path/weights/weight.bin", "@model_path/../../../etc/passwd", 1))
    assert errors(verify(compiled)) == [
        "Unet.mlmodelc: 'w0' val: Weight path '@model_path/../../../etc/passwd' points outside the model folder"]
    mil.write_text(good.replace("@model_path/weights/weight.bin", "@model_path/weights/w\\x00.bin", 1))
    assert errors(verify(compiled)) == [
        "Unet.mlmodelc: 'w0' val: Weight path '@model_path/weights/w\\x00.bin' is not a file name"]


def test_offsets_into_the_middle_of_data_are_caught(compiled: Path) -> None:
    mil = compiled / "Unet.mlmodelc" / "model.mil"
    offset = _blobs(compiled / "Unet.mlmodelc")[0][0]
    mil.write_text(mil.read_text().replace(f"tensor<uint64, []>({offset})", f"tensor<uint64, []>({offset + 64})", 1))
    assert errors(verify(compiled)) == [
        f"Unet.mlmodelc/weights/weight.bin: blob at offset {offset + 64} for 'w0' val: no blob here "
        f"(sentinel 0x{struct.unpack_from('<I', (compiled / 'Unet.mlmodelc/weights/weight.bin').read_bytes(), offset + 64)[0]:08X}, "
        "expected 0xDEADBEEF)"]


# -- the pipeline contract --------------------------------------------------------------------


def test_missing_components_and_tokenizer(compiled: Path) -> None:
    shutil.rmtree(compiled / "TextEncoder.mlmodelc")
    (compiled / "vocab.json").unlink()
    assert errors(verify(compiled)) == [
        ".: no TextEncoder bundle: every variant needs the text encoder",
        ".: vocab.json and merges.txt are missing: compiled variants carry their tokenizer",
    ]
    shutil.rmtree(compiled / "Unet.mlmodelc")
    shutil.rmtree(compiled / "VAEDecoder.mlmodelc")
    assert errors(verify(compiled))[1:3] == [
        ".: no VAEDecoder bundle: every variant needs the VAE decoder",
        ".: no Unet bundle (or UnetChunk1 + UnetChunk2)",
    ]


def test_shape_disagreements(tmp_path: Path) -> None:
    specs = sd_specs()
    wide_text = sd_specs(hidden=48)["text_encoder"]
    report = verify(write_variant(tmp_path / "a", overrides={"text_encoder": wide_text}))
    assert errors(report) == ["Unet.mlmodelc: encoder_hidden_states has 32 channels but TextEncoder's hidden size is 48"]
    big = sd_specs(latent=16)
    report = verify(write_variant(tmp_path / "b", components=["text_encoder", "unet", "vae_decoder"],
                                  overrides={"vae_decoder": big["vae_decoder"]}))
    assert errors(report) == ["VAEDecoder.mlmodelc: z is [1, 4, 16, 16] but the Unet's sample is [2, 4, 8, 8]: "
                              "the latent sizes differ"]
    report = verify(write_variant(tmp_path / "c", batch=3))
    assert errors(report) == ["Unet.mlmodelc: batch size 3: Stable Diffusion Unets take a batch of 1 or 2"]
    unet_in, _ = specs["unet"]
    report = verify(write_variant(tmp_path / "d", overrides={"unet": (unet_in, [("noise_pred", "fp16", (2, 4, 8, 9))])}))
    assert errors(report) == ["Unet.mlmodelc: noise_pred is [2, 4, 8, 9] but sample is [2, 4, 8, 8]"]
    short = sd_specs(tokens=64)["text_encoder"]
    report = verify(write_variant(tmp_path / "e", overrides={"text_encoder": short}))
    assert errors(report) == ["TextEncoder.mlmodelc: last_hidden_state has 64 tokens but the Unet's "
                              "encoder_hidden_states has 77"]
    # the VAE's scale factor is read from its shapes (a two-block VAE scales by 4), but it must be one
    # whole factor for both sides
    scale_4 = ([("z", "fp16", (1, 4, 8, 8))], [("image", "fp16", (1, 3, 32, 32))])
    report = verify(write_variant(tmp_path / "f", overrides={"vae_decoder": scale_4},
                                  components=["text_encoder", "unet", "vae_decoder"]))
    assert errors(report) == []
    for i, hw in enumerate([(32, 64), (36, 36)]):
        wrong_image = ([("z", "fp16", (1, 4, 8, 8))], [("image", "fp16", (1, 3, *hw))])
        report = verify(write_variant(tmp_path / f"g{i}", overrides={"vae_decoder": wrong_image},
                                      components=["text_encoder", "unet", "vae_decoder"]))
        assert errors(report) == [f"VAEDecoder.mlmodelc: image is [1, 3, {hw[0]}, {hw[1]}]; for z [1, 4, 8, 8] it "
                                  "must be [1, 3, k*8, k*8] with one whole scale factor k for both sides"]


def test_sdxl_contract(tmp_path: Path) -> None:
    report = verify(write_variant(tmp_path / "a", style="sdxl", components=["text_encoder", "unet", "vae_decoder"]))
    assert errors(report) == [".: no TextEncoder2 bundle: SDXL variants need the second text encoder"]
    small = sd_specs("sdxl", hidden2=40)["text_encoder_2"]
    report = verify(write_variant(tmp_path / "c", style="sdxl", overrides={"text_encoder_2": small}))
    assert errors(report) == [
        "Unet.mlmodelc: encoder_hidden_states has 80 channels but the text encoders' hidden sizes add up to 72",
        "TextEncoder2.mlmodelc: pooled_outputs has 40 values but the Unet's text_embeds takes 48",
    ]
    xl = sd_specs("sdxl")
    pooled_wrong = (xl["text_encoder_2"][0], [xl["text_encoder_2"][1][0], ("pooled_outputs", "fp32", (1, 40))])
    report = verify(write_variant(tmp_path / "b", style="sdxl", overrides={"text_encoder_2": pooled_wrong}))
    assert errors(report) == ["TextEncoder2.mlmodelc: pooled_outputs has 40 values but the Unet's text_embeds "
                              "takes 48"]


def test_attention_must_match_what_the_variant_declares(tmp_path: Path) -> None:
    einsum = write_variant(tmp_path / "einsum", attention="split_einsum")
    assert verify(einsum).attention == "split_einsum"
    write_manifest(einsum, attention="original")
    assert errors(verify(einsum)) == [
        "Unet.mlmodelc: the variant is original but the Unet uses einsum (split_einsum attention)"]
    plain = write_variant(tmp_path / "plain")
    write_manifest(plain, attention="split_einsum")
    assert errors(verify(plain)) == [
        "Unet.mlmodelc: the variant is split_einsum but the Unet has no einsum op (original attention)"]
    assert verify(plain, attention="original").ok


def test_packages_with_einsum_read_as_split_einsum(tmp_path: Path) -> None:
    root = write_package_variant(tmp_path / "v", einsum=True)
    report = verify(root, attention="original")
    assert report.attention == "split_einsum"
    assert errors(report) == [f"{UNET_PKG}: the variant is original but the Unet uses einsum (split_einsum attention)"]


def test_no_bundles_at_all(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    assert errors(verify(tmp_path / "empty")) == [".: no Core ML bundles (.mlmodelc or .mlpackage) found"]


class _Plugin:
    @hookimpl
    def validate_bundle(self, bundle: Any) -> list[Problem]:
        return [Problem("warning", ".", f"plugin saw {len(bundle.components)} components")]


class _BrokenPlugin:
    @hookimpl
    def validate_bundle(self, bundle: Any) -> list[Problem]:
        raise RuntimeError("boom")


def test_validate_bundle_hook_is_merged(compiled: Path) -> None:
    pm.register(_Plugin(), name="test-validator")
    pm.register(_BrokenPlugin(), name="test-broken")
    try:
        report = verify(compiled)
    finally:
        pm.unregister(name="test-validator")
        pm.unregister(name="test-broken")
    assert report.ok
    assert "warning: .: plugin saw 4 components" in everything(report)
    assert "warning: .: plugin 'test-broken' failed while validating: RuntimeError: boom" in everything(report)


# -- hashes -------------------------------------------------------------------------------------


def test_hashes_against_the_pull_manifest(compiled: Path) -> None:
    write_manifest(compiled, attention="original")
    report = verify(compiled, hashes=True)
    assert report.ok and report.hashed_files == len(json.loads((compiled / "coreml-hub.json").read_text())["files"])
    weight = compiled / "Unet.mlmodelc" / "weights" / "weight.bin"
    recorded = hashlib.sha256(weight.read_bytes()).hexdigest()
    _patch(weight, weight.stat().st_size - 1, b"\x55")  # same size, different content
    now = hashlib.sha256(weight.read_bytes()).hexdigest()
    (compiled / "VAEEncoder.mlmodelc" / "analytics" / "coremldata.bin").unlink()
    (compiled / "notes.txt").write_text("mine")
    meta = compiled / "TextEncoder.mlmodelc" / "metadata.json"
    meta.write_text(meta.read_text() + "\n")
    report = verify(compiled, hashes=True)
    assert everything(report) == [
        NO_SAFETY,
        "error: TextEncoder.mlmodelc/metadata.json: is "
        f"{meta.stat().st_size} bytes; the pull manifest says {meta.stat().st_size - 1}",
        "error: VAEEncoder.mlmodelc/analytics/coremldata.bin: is missing (listed in the pull manifest)",
        "warning: notes.txt: is not in the pull manifest",
        f"error: Unet.mlmodelc/weights/weight.bin: sha256 {now[:12]}… differs from the recorded {recorded[:12]}…",
    ]
    # one bundle of the variant: only its files are hashed
    single = verify(compiled / "Unet.mlmodelc", hashes=True)
    assert errors(single) == [f"Unet.mlmodelc/weights/weight.bin: sha256 {now[:12]}… differs from the recorded "
                              f"{recorded[:12]}…"]
    assert single.hashed_files == 5


def test_hashes_without_a_manifest(compiled: Path) -> None:
    assert errors(verify(compiled, hashes=True)) == [
        ".: no pull manifest (coreml-hub.json) was found; there are no recorded hashes to compare with"]


def test_parallel_hashing_matches_hashlib(tmp_path: Path) -> None:
    rng = np.random.default_rng(3)
    paths = []
    for i, size in enumerate([0, 1, 8 << 20, (8 << 20) + 3, 12345]):
        path = tmp_path / f"f{i}"
        path.write_bytes(rng.integers(0, 256, size, dtype=np.uint8).tobytes())
        paths.append(path)
    got = hash_files(paths + [tmp_path / "missing"], workers=3)
    for path in paths:
        assert got[path] == hashlib.sha256(path.read_bytes()).hexdigest()
    assert isinstance(got[tmp_path / "missing"], OSError)


# -- CLI ------------------------------------------------------------------------------------------


def test_verify_cli_exit_codes_and_json(compiled: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert run_cli(["verify", str(compiled)]) == 0
    assert "Valid:" in capsys.readouterr().err
    (compiled / "Unet.mlmodelc" / "coremldata.bin").unlink()
    assert run_cli(["verify", str(compiled)]) == 1
    captured = capsys.readouterr()
    assert "Unet.mlmodelc/coremldata.bin" in captured.out and "is missing" in captured.out
    # a folder that was never pulled cannot be mended by `pull --force`, and the hint says so
    assert "Invalid:" in captured.err and "Hint: It is not a pulled model" in captured.err
    assert "pull MODEL" not in captured.err
    assert run_cli(["verify", str(compiled), "--json"]) == 1
    data = json.loads(capsys.readouterr().out)
    assert data["ok"] is False and data["errors"] == 1
    assert data["problems"][0] == {"severity": "error", "path": "Unet.mlmodelc/coremldata.bin",
                                   "message": "is missing", "hint": data["problems"][0]["hint"]}
    assert run_cli(["verify"]) == 2
    assert run_cli(["verify", str(compiled), "--no-such-flag"]) == 2
    assert run_cli(["verify", "nobody/nothing"]) == 1
    assert "is not pulled" in capsys.readouterr().err


def test_inspect_cli(compiled: Path, package_variant: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert run_cli(["inspect", str(compiled / "Unet.mlmodelc")]) == 0
    out = capsys.readouterr().out
    assert "encoder_hidden_states   fp16    [2, 32, 1, 77]" in out and "fixture_op" in out
    assert run_cli(["inspect", str(package_variant / UNET_PKG), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert [p["name"] for p in data["inputs"]] == ["sample", "timestep", "encoder_hidden_states"]
    assert data["outputs"] == [{"name": "noise_pred", "dtype": "fp16", "shape": [2, 4, 8, 8]}]
    assert data["ops"]["conv"] == 1 and data["weight_bytes"] > 0
    weight = package_variant / UNET_PKG / "Data/com.apple.CoreML/weights/weight.bin"
    with BlobFile(weight) as f:
        assert data["weight_bytes"] == sum(i.size for i in f)
    assert run_cli(["inspect", str(compiled / "VAEDecoder.mlmodelc"), "--mil"]) == 0
    text = capsys.readouterr().out
    from coreml_hub.mil.text import load

    assert loads(text.rstrip("\n")) == load(compiled / "VAEDecoder.mlmodelc")
    assert run_cli(["inspect", str(compiled)]) == 2  # a variant: --component names one of its bundles
    assert "is not a Core ML bundle but a variant" in capsys.readouterr().err
    assert run_cli(["inspect", str(compiled), "--component", "unet", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["path"] == str(compiled / "Unet.mlmodelc")


def test_open_bundle_names_components(tmp_path: Path, package_variant: Path) -> None:
    bundle = open_bundle(package_variant)
    assert [c.name for c in bundle.components] == ["text_encoder", "unet", "vae_decoder"]
    assert all(c.format == "packages" for c in bundle.components)
    nested = write_variant(tmp_path / "zip" / "compiled")
    assert [c.display_name for c in open_bundle(tmp_path / "zip").components] == [
        "TextEncoder", "Unet", "VAEDecoder", "VAEEncoder"]
    assert nested.is_dir()


# -- through the store: pull runs the structural checks, verify MODEL:VARIANT ---------------------


def _repo_files(variant: Path, folder: str) -> dict[str, bytes]:
    return {f"{folder}/{p.relative_to(variant).as_posix()}": p.read_bytes()
            for p in sorted(variant.rglob("*")) if p.is_file()}


def test_pull_then_verify_by_name(tmp_path: Path, hub_root: Path, hub_server: Any, store_home: Path,
                                  capsys: pytest.CaptureFixture[str]) -> None:
    from coreml_hub.testing.hubrepo import make_repo

    variant = write_variant(tmp_path / "src", attention="split_einsum")
    make_repo(hub_root, "tiny/coreml-sd", _repo_files(variant, "split_einsum/compiled"))
    assert run_cli(["pull", "tiny/coreml-sd", "--variant", "split_einsum/compiled", "-q"]) == 0
    capsys.readouterr()
    assert run_cli(["verify", "tiny/coreml-sd:split_einsum/compiled", "--hashes", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["ok"] and report["attention"] == "split_einsum" and report["hashed_files"] > 10
    # a damaged download is refused by pull's structural check
    broken = dict(_repo_files(variant, "original/compiled"))
    broken["original/compiled/Unet.mlmodelc/model.mil"] = b"program(1.0)\n{\n"
    make_repo(hub_root, "tiny/broken-sd", broken)
    assert run_cli(["pull", "tiny/broken-sd", "--variant", "original/compiled", "-q"]) == 1
    err = capsys.readouterr().err
    assert "failed its structural check" in err and "Unet.mlmodelc/model.mil: does not parse" in err


# -- the tiny-model factory's SD components (real diffusers conversions) --------------------------


@pytest.mark.slow
@pytest.mark.parametrize("style,attention", [("sd1", "split_einsum"), ("sd2", "original"), ("sdxl", "original")])
def test_factory_conversions_verify_clean(style: str, attention: str) -> None:
    from coreml_hub.testing.factory import converted

    out = converted(style, attention, compiled=True)
    for fmt in ("packages", "compiled"):
        report = verify(out / attention / fmt, attention=attention)
        assert report.ok, (fmt, everything(report))
        assert report.attention == ("split_einsum" if attention.startswith("split") else "original")
        assert not report.errors
    wrong = "original" if attention == "split_einsum" else "split_einsum"
    unet = "Unet.mlmodelc"
    assert errors(verify(out / attention / "compiled", attention=wrong)) == [
        f"{unet}: the variant is original but the Unet uses einsum (split_einsum attention)"
        if wrong == "original" else
        f"{unet}: the variant is split_einsum but the Unet has no einsum op (original attention)"
    ]


@pytest.mark.slow
def test_verify_takes_what_run_takes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from coreml_hub.testing.factory import converted

    out = converted("sd1", "split_einsum")  # the folder `convert -o OUT` writes: OUT/<attention>/packages
    assert run_cli(["verify", str(out)]) == 0, capsys.readouterr()
    assert f"Valid: {out / 'split_einsum' / 'packages'} (5 bundles, split_einsum attention)" in capsys.readouterr().err
    two = tmp_path / "two"
    for attention in ("split_einsum", "original"):
        shutil.copytree(converted("sd1", attention) / attention, two / attention)
    assert run_cli(["verify", str(two)]) == 2  # as `run` does: a folder of several variants names them
    err = capsys.readouterr().err
    assert "holds several variants" in err and str(two / "original" / "packages") in err


@pytest.mark.slow
def test_factory_chunked_unet_verifies_clean() -> None:
    from coreml_hub.testing.factory import converted

    out = converted("sd1", "split_einsum", chunk=True, compiled=True)
    report = verify(out / "split_einsum" / "compiled")
    names = {c.split(".")[0] for c in report.components}
    assert {"UnetChunk1", "UnetChunk2"} <= names
    assert report.ok, everything(report)
