"""Builders for Core ML bundles used by the verify, text and blob tests.

- compiled-layout bundles (`.mlmodelc`) written from the program model: model.mil by
  `mil.text.dumps`, weights/weight.bin by `mil.blob.BlobWriter`, metadata.json from the
  main function's signature (as Apple's compiler writes it);
- `.mlpackage` bundles converted from tiny torch modules with real coremltools;
- the public model.mil files collected under `shared/mil` (see tests/data/mil/README.md).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import warnings
from pathlib import Path
from typing import Any, Iterable

import numpy as np

from coreml_hub.mil.blob import BlobWriter
from coreml_hub.mil.program import (
    BlobRef,
    Block,
    DictType,
    DictValue,
    Function,
    Operation,
    Program,
    TensorType,
    TensorValue,
    Var,
)
from coreml_hub.mil.text import dumps

REPO = Path(__file__).resolve().parents[1]


def _samples_dir() -> Path:
    """Where the real model.mil files and bundles are (tests/data/mil/README.md): $COREML_HUB_MIL_SAMPLES,
    else shared/mil in the checkout, else shared/mil beside it (a read-only shared folder next to the clone)."""
    if os.environ.get("COREML_HUB_MIL_SAMPLES"):
        return Path(os.environ["COREML_HUB_MIL_SAMPLES"])
    for candidate in (REPO / "shared" / "mil", REPO.parent / "shared" / "mil"):
        if candidate.is_dir():
            return candidate
    return REPO / "shared" / "mil"


SAMPLES = _samples_dir()
_LOOKED_IN = (str(SAMPLES) if os.environ.get("COREML_HUB_MIL_SAMPLES")
              else f"{REPO / 'shared' / 'mil'} or {REPO.parent / 'shared' / 'mil'}")
SAMPLES_MISSING = (f"the public model.mil samples are not in {_LOOKED_IN} (kept out of git; "
                   "tests/data/mil/README.md names their origin)")

METADATA_TYPES = {"fp16": "Float16", "fp32": "Float32", "int32": "Int32"}
COMPILED = {"text_encoder": "TextEncoder", "text_encoder_2": "TextEncoder2", "unet": "Unet",
            "unet_chunk1": "UnetChunk1", "unet_chunk2": "UnetChunk2", "vae_decoder": "VAEDecoder",
            "vae_encoder": "VAEEncoder", "safety_checker": "SafetyChecker"}

Spec = tuple[str, str, tuple[int, ...]]  # (name, dtype, shape)


def string(text: str) -> TensorValue:
    array = np.empty((), dtype=object)
    array[()] = text
    return TensorValue(TensorType("string", ()), array)


def scalar(dtype: str, value: Any) -> TensorValue:
    from coreml_hub.mil.program import DTYPES

    return TensorValue(TensorType(dtype, ()), np.array(value, dtype=DTYPES[dtype]))


def build_buildinfo() -> DictValue:
    key = TensorType("string", ())
    return DictValue(DictType(key, key), ((string("coremlc-version"), string("0.0.0-test")),))


def compiled_program(inputs: Iterable[Spec], outputs: Iterable[Spec], weights: dict[str, np.ndarray],
                     offsets: dict[str, int], einsum: bool = False, version: str = "1.0",
                     opset: str = "ios16") -> Program:
    """A small, well-typed program: one const per weight (in the weight file), and one op per
    output reading the first input and the weights (its math is irrelevant to the checks)."""
    inputs = [Var(n, TensorType(d, s)) for n, d, s in inputs]
    ops: list[Operation] = []
    weight_names = []
    for name, array in weights.items():
        dtype = {np.dtype(np.float16): "fp16", np.dtype(np.float32): "fp32", np.dtype(np.int8): "int8"}[array.dtype]
        ttype = TensorType(dtype, tuple(array.shape))
        value = TensorValue(ttype, BlobRef("@model_path/weights/weight.bin", offsets[name]))
        ops.append(Operation("const", {}, (Var(name, ttype),), {"name": string(name), "val": value}))
        weight_names.append(name)
    first = inputs[0].name
    if einsum:
        eq = TensorType("string", ())
        ops.append(Operation("const", {}, (Var("eq", eq),), {"name": string("eq"), "val": string("bchq,bkhc->bkhq")}))
        ops.append(Operation("einsum", {"equation": "eq", "values": (first, first)},
                             (Var("attn", inputs[0].type),), {"name": string("attn")}))
    outs = []
    for name, dtype, shape in outputs:
        args: dict[str, Any] = {"x": first}
        if weight_names:
            args["w"] = weight_names[len(outs) % len(weight_names)]
        ops.append(Operation("fixture_op", args, (Var(name, TensorType(dtype, shape)),), {"name": string(name)}))
        outs.append(name)
    main = Function("main", opset, tuple(inputs), Block(ops, tuple(outs)))
    return Program(version=version, functions={"main": main}, attributes={"buildInfo": build_buildinfo()})


def metadata_for(program: Program) -> list[dict[str, Any]]:
    def entry(name: str, ttype: TensorType) -> dict[str, Any]:
        shape = "[" + ", ".join(str(d) for d in ttype.shape) + "]"
        return {"hasShapeFlexibility": "0", "isOptional": "0", "dataType": METADATA_TYPES[ttype.dtype],
                "formattedType": f"MultiArray ({METADATA_TYPES[ttype.dtype]} {' × '.join(shape[1:-1].split(', '))})",
                "shortDescription": "", "shape": shape, "name": name, "type": "MultiArray"}

    histogram: dict[str, int] = {}
    for op, n in program.op_histogram().items():
        if op != "const":
            histogram[f"Ios16.{op}"] = n
    return [{
        "metadataOutputVersion": "3.0",
        "specificationVersion": 7,
        "modelType": {"name": "MLModelType_mlProgram"},
        "mlProgramOperationTypeHistogram": histogram,
        "inputSchema": [entry(v.name, v.type) for v in program.main.inputs],
        "outputSchema": [entry(n, t) for n, t in program.main.output_types().items()],
    }]


def write_compiled(dest: Path, inputs: Iterable[Spec], outputs: Iterable[Spec], *, seed: int = 0,
                   einsum: bool = False, version: str = "1.0", opset: str = "ios16", weight_count: int = 3) -> Path:
    """A `.mlmodelc` folder laid out like Apple's compiler output."""
    rng = np.random.default_rng(seed)
    weights = {f"w{i}": rng.standard_normal((4, 3 + i)).astype(np.float16) for i in range(weight_count)}
    (dest / "weights").mkdir(parents=True, exist_ok=True)
    (dest / "analytics").mkdir(exist_ok=True)
    with BlobWriter(dest / "weights" / "weight.bin") as writer:
        offsets = {name: writer.add(array) for name, array in weights.items()}
    program = compiled_program(inputs, outputs, weights, offsets, einsum=einsum, version=version, opset=opset)
    (dest / "model.mil").write_text(dumps(program))
    (dest / "metadata.json").write_text(json.dumps(metadata_for(program), indent=2))
    (dest / "coremldata.bin").write_bytes(hashlib.sha256(dest.name.encode()).digest() * 8)
    (dest / "analytics" / "coremldata.bin").write_bytes(b"\0" * 64)
    return dest


def sd_specs(style: str = "sd1", batch: int = 2, latent: int = 8, hidden: int = 32, hidden2: int = 48,
             tokens: int = 77) -> dict[str, tuple[list[Spec], list[Spec]]]:
    """(inputs, outputs) of each Stable Diffusion component, per Apple's I/O contract (tiny sizes)."""
    image = latent * 8
    channels = hidden + hidden2 if style == "sdxl" else hidden
    unet_in = [("sample", "fp16", (batch, 4, latent, latent)), ("timestep", "fp16", (batch,)),
               ("encoder_hidden_states", "fp16", (batch, channels, 1, tokens))]
    if style == "sdxl":
        unet_in += [("time_ids", "fp16", (batch, 6)), ("text_embeds", "fp16", (batch, hidden2))]
    specs = {
        "text_encoder": ([("input_ids", "fp32", (1, tokens))],
                         [("hidden_embeds" if style == "sdxl" else "last_hidden_state", "fp32", (1, tokens, hidden)),
                          ("pooled_outputs", "fp32", (1, hidden))]),
        "unet": (unet_in, [("noise_pred", "fp16", (batch, 4, latent, latent))]),
        "unet_chunk1": (unet_in, [("h_mid", "fp16", (batch, 8, latent, latent))]),
        "unet_chunk2": ([("h_mid", "fp16", (batch, 8, latent, latent))] + unet_in[1:2],
                        [("noise_pred", "fp16", (batch, 4, latent, latent))]),
        "vae_decoder": ([("z", "fp16", (1, 4, latent, latent))], [("image", "fp16", (1, 3, image, image))]),
        "vae_encoder": ([("x", "fp16", (1, 3, image, image))], [("latent", "fp16", (1, 8, latent, latent))]),
        "safety_checker": ([("clip_input", "fp16", (1, 3, 224, 224)), ("images", "fp16", (1, image, image, 3)),
                            ("adjustment", "fp16", (1,))],
                           [("filtered_images", "fp16", (1, image, image, 3)), ("has_nsfw_concepts", "fp16", (1,))]),
    }
    if style == "sdxl":
        specs["text_encoder_2"] = ([("input_ids", "fp32", (1, tokens))],
                                   [("hidden_embeds", "fp32", (1, tokens, hidden2)),
                                    ("pooled_outputs", "fp32", (1, hidden2))])
    return specs


def write_variant(root: Path, *, style: str = "sd1", components: Iterable[str] | None = None,
                  attention: str = "original", tokenizer: bool = True, overrides: dict[str, Any] | None = None,
                  **shape_args: Any) -> Path:
    """A compiled Stable Diffusion variant folder (Apple's names) with tiny synthetic bundles."""
    specs = sd_specs(style, **shape_args)
    for name, (inputs, outputs) in (overrides or {}).items():
        specs[name] = (inputs, outputs)
    if components is None:
        components = ["text_encoder", "unet", "vae_decoder", "vae_encoder"]
        if style == "sdxl":
            components.append("text_encoder_2")
    root.mkdir(parents=True, exist_ok=True)
    for i, name in enumerate(components):
        inputs, outputs = specs[name]
        write_compiled(root / f"{COMPILED[name]}.mlmodelc", inputs, outputs, seed=i,
                       einsum=attention.startswith("split_einsum") and name.startswith("unet"))
    if tokenizer:
        (root / "vocab.json").write_text('{"<|endoftext|>": 49407}')
        (root / "merges.txt").write_text("#version: 0.2\n")
    return root


def write_manifest(root: Path, attention: str | None = None) -> Path:
    """A pull manifest (`coreml-hub.json`) listing every file with its size and sha256."""
    files = []
    for path in sorted(p for p in root.rglob("*") if p.is_file() and p.name != "coreml-hub.json"):
        files.append({"path": path.relative_to(root).as_posix(), "size": path.stat().st_size,
                      "sha256": hashlib.sha256(path.read_bytes()).hexdigest()})
    manifest = {"format_version": 1, "repo": "test/tiny", "variant": {"attention": attention}, "files": files}
    (root / "coreml-hub.json").write_text(json.dumps(manifest, indent=2))
    return root / "coreml-hub.json"


# -- .mlpackage from tiny torch modules --------------------------------------------------


def _quiet_coremltools() -> Any:
    warnings.filterwarnings("ignore")
    logging.getLogger("coremltools").setLevel(logging.ERROR)
    import coremltools as ct

    return ct


def convert_package(module: Any, inputs: list[tuple[str, tuple[int, ...], Any]], outputs: list[str],
                    dest: Path) -> Path:
    """Trace a torch module and convert it to an ML Program `.mlpackage` (iOS 16 target)."""
    import torch

    ct = _quiet_coremltools()
    example = tuple(torch.zeros(shape) if dtype is None else torch.zeros(shape, dtype=torch.float32)
                    for _, shape, dtype in inputs)
    traced = torch.jit.trace(module.eval(), example)
    mlmodel = ct.convert(
        traced,
        inputs=[ct.TensorType(name=n, shape=s, dtype=d) if d is not None else ct.TensorType(name=n, shape=s)
                for n, s, d in inputs],
        outputs=[ct.TensorType(name=o) for o in outputs],
        minimum_deployment_target=ct.target.iOS16,
        convert_to="mlprogram",
    )
    mlmodel.save(str(dest))
    return dest


def torch_modules(hidden: int = 32, batch: int = 2, latent: int = 8, einsum: bool = False) -> dict[str, Any]:
    """Tiny torch stand-ins for the SD components, with Apple's input and output names."""
    import torch

    class TextEncoder(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed = torch.nn.Embedding(100, hidden)
            self.norm = torch.nn.LayerNorm(hidden)

        def forward(self, input_ids):  # type: ignore[no-untyped-def]
            h = self.norm(self.embed(input_ids.long().clamp(0, 99)))
            return h, h[:, -1, :]

    class Unet(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = torch.nn.Conv2d(4, 4, 3, padding=1)
            self.proj = torch.nn.Linear(hidden, 4)
            self.q = torch.nn.Conv2d(4, hidden, 1)

        def forward(self, sample, timestep, encoder_hidden_states):  # type: ignore[no-untyped-def]
            h = self.conv(sample) + timestep[:, None, None, None] * 0.01
            ctx = encoder_hidden_states.mean(dim=3)[:, :, 0]
            if einsum:  # Apple's split_einsum attention pattern
                q = self.q(h).flatten(2)[:, :, None, :]  # B C 1 HW
                k = encoder_hidden_states.permute(0, 3, 2, 1)  # B 77 1 C
                w = torch.einsum("bchq,bkhc->bkhq", q, k)  # B 77 1 HW
                h = h + w.mean(dim=1).reshape(h.shape[0], 1, latent, latent)
            return h + self.proj(ctx)[:, :, None, None]

    class VAEDecoder(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = torch.nn.Conv2d(4, 3, 3, padding=1)

        def forward(self, z):  # type: ignore[no-untyped-def]
            return torch.tanh(self.conv(torch.nn.functional.interpolate(z, scale_factor=8, mode="nearest")))

    return {"text_encoder": TextEncoder(), "unet": Unet(), "vae_decoder": VAEDecoder()}


def write_package_variant(root: Path, model_version: str = "runwayml/stable-diffusion-v1-5", hidden: int = 32,
                          batch: int = 2, latent: int = 8, einsum: bool = False) -> Path:
    """A packages variant: the three required components converted by coremltools, Apple's names."""
    import torch

    torch.manual_seed(0)
    modules = torch_modules(hidden=hidden, batch=batch, latent=latent, einsum=einsum)
    prefix = f"Stable_Diffusion_version_{model_version.replace('/', '_')}_"
    root.mkdir(parents=True, exist_ok=True)
    convert_package(modules["text_encoder"], [("input_ids", (1, 77), np.float32)],
                    ["last_hidden_state", "pooled_outputs"], root / f"{prefix}text_encoder.mlpackage")
    convert_package(modules["unet"], [("sample", (batch, 4, latent, latent), None), ("timestep", (batch,), None),
                                      ("encoder_hidden_states", (batch, hidden, 1, 77), None)],
                    ["noise_pred"], root / f"{prefix}unet.mlpackage")
    convert_package(modules["vae_decoder"], [("z", (1, 4, latent, latent), None)], ["image"],
                    root / f"{prefix}vae_decoder.mlpackage")
    return root


def package_to_compiled(package: Path, dest: Path) -> Path:
    """The compiled layout of a converted package without Apple's compiler: its program printed
    as model.mil, its weights copied blob by blob into a new weight file."""
    from coreml_hub.mil.proto import load_program

    program = load_program(package)
    (dest / "weights").mkdir(parents=True, exist_ok=True)
    moved: dict[tuple[str, int], int] = {}
    with BlobWriter(dest / "weights" / "weight.bin") as writer:
        for _op, _key, value in program.blob_values():
            ref = value.data
            if (ref.path, ref.offset) not in moved:
                moved[(ref.path, ref.offset)] = writer.add(value.array(), dtype=value.type.dtype)
    for _op, _key, value in program.blob_values():
        ref = value.data
        value.data = BlobRef("@model_path/weights/weight.bin", moved[(ref.path, ref.offset)])
        value.base_dir = dest
    (dest / "model.mil").write_text(dumps(program))
    (dest / "metadata.json").write_text(json.dumps(metadata_for(program), indent=2))
    (dest / "coremldata.bin").write_bytes(b"\1" * 32)
    return dest
