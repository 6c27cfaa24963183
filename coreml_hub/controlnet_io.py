"""A bundle's inputs and outputs from its description alone, and the ControlNet contract on them.

`run`, `pull --controlnet` and `verify` all ask whether a ControlNet can drive a Unet; answering
from `metadata.json` (compiled) or the spec's description (packages) takes milliseconds and loads
no weights, so bad pairs are refused before anything heavy happens.

The contract (apple/ml-stable-diffusion: torch2coreml.py, ControlNet.swift, Unet.swift): the
controlled Unet takes `additional_residual_0..N` after its usual inputs; a ControlNet takes
`sample`, `timestep`, `encoder_hidden_states` ([B, C, 1, L], C the Unet's), `controlnet_cond`
([B, 3, H, W], H and W the VAE's image size) and, for SDXL, `time_ids` and `text_embeds`; it
returns `additional_residual_i` with the shapes the Unet takes.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import InvalidBundle

RESIDUAL_PREFIX = "additional_residual_"
CONTROLNET_INPUTS = ("sample", "timestep", "encoder_hidden_states", "controlnet_cond")


def residual_index(name: str) -> int:
    tail = name[len(RESIDUAL_PREFIX):]
    return int(tail) if tail.isdigit() else 1 << 30


@dataclass(frozen=True)
class BundleIO:
    """A bundle's input and output shapes, read from its description (nothing is loaded)."""

    path: Path
    inputs: dict[str, tuple[int, ...]]
    outputs: dict[str, tuple[int, ...]]

    def residual_inputs(self) -> list[str]:
        return sorted((n for n in self.inputs if n.startswith(RESIDUAL_PREFIX)), key=residual_index)

    def residual_outputs(self) -> list[str]:
        return sorted((n for n in self.outputs if n.startswith(RESIDUAL_PREFIX)), key=residual_index)


def _shape(value: Any) -> tuple[int, ...]:
    if isinstance(value, str):
        return tuple(int(d) for d in value.strip("[]() ").split(",") if d.strip())
    return tuple(int(d) for d in value or ())


def bundle_io(path: str | Path) -> BundleIO:
    """Inputs and outputs of a `.mlmodelc` (metadata.json) or `.mlpackage` (its spec's description)."""
    path = Path(path)
    if path.suffix == ".mlmodelc" or (path / "metadata.json").is_file():
        try:
            meta = json.loads((path / "metadata.json").read_text())
            entry = meta[0] if isinstance(meta, list) else meta
            inputs = {i["name"]: _shape(i.get("shape")) for i in entry["inputSchema"]}
            outputs = {o["name"]: _shape(o.get("shape")) for o in entry["outputSchema"]}
        except (OSError, ValueError, KeyError, TypeError, IndexError) as exc:
            raise InvalidBundle(f"Cannot read the inputs of {path.name} from its metadata.json ({exc}).",
                                hint=f"Run `coreml-hub verify {path}`.") from exc
        return BundleIO(path, inputs, outputs)
    from .mil.proto import load_spec

    spec = load_spec(path)

    def shapes(features: Any) -> dict[str, tuple[int, ...]]:
        return {f.name: tuple(int(d) for d in f.type.multiArrayType.shape) for f in features}

    return BundleIO(path, shapes(spec.description.input), shapes(spec.description.output))


def unet_io(paths: list[Path]) -> BundleIO:
    """A (chunked) Unet's inputs: the first part's, plus the later parts' that no earlier part makes."""
    inputs: dict[str, tuple[int, ...]] = {}
    produced: set[str] = set()
    outputs: dict[str, tuple[int, ...]] = {}
    for path in paths:
        io = bundle_io(path)
        for name, shape in io.inputs.items():
            if name not in produced:
                inputs.setdefault(name, shape)
        produced |= set(io.outputs)
        outputs = io.outputs
    return BundleIO(Path(paths[0]), inputs, outputs)


def controlnet_mismatches(cn: BundleIO, unet: BundleIO, image_size: tuple[int, int] | None, name: str) -> list[str]:
    """Why `cn` cannot drive `unet` (empty when it can). `image_size` is (width, height) of the images."""
    missing = [n for n in CONTROLNET_INPUTS if n not in cn.inputs]
    if missing or not cn.residual_outputs():
        return [f"{cn.path.name} is not a ControlNet: it lacks {', '.join(missing) or 'additional_residual_* outputs'}."]
    problems = []
    if not unet.residual_inputs():
        problems.append(f"{unet.path.name} takes no ControlNet residuals (additional_residual_* inputs).")
        return problems
    theirs, ours = cn.inputs["encoder_hidden_states"], unet.inputs.get("encoder_hidden_states", ())
    if len(theirs) == 4 and len(ours) == 4 and theirs[1] != ours[1]:
        problems.append(f"The ControlNet {name} was made for another base model: it takes {theirs[1]}-wide text "
                        f"states, the Unet {ours[1]}.")
    outs, ins = cn.residual_outputs(), unet.residual_inputs()
    if len(outs) != len(ins):
        problems.append(f"The ControlNet {name} makes {len(outs)} residuals but the Unet takes {len(ins)}: it was "
                        "made for another base model.")
    else:
        for out_name, in_name in zip(outs, ins):
            if tuple(cn.outputs[out_name][1:]) != tuple(unet.inputs[in_name][1:]):
                problems.append(f"The ControlNet {name} was made for another base model or size: its {out_name} is "
                                f"{list(cn.outputs[out_name])}, the Unet takes {list(unet.inputs[in_name])}.")
                break
    sample, unet_sample = cn.inputs["sample"], unet.inputs.get("sample", ())
    if len(sample) == 4 and len(unet_sample) == 4 and tuple(sample[2:]) != tuple(unet_sample[2:]):
        problems.append(f"The ControlNet {name} takes {sample[3]}x{sample[2]} latents, the Unet {unet_sample[3]}x"
                        f"{unet_sample[2]}.")
    cond = cn.inputs["controlnet_cond"]
    if image_size is not None and len(cond) == 4 and tuple(cond[2:]) != (image_size[1], image_size[0]):
        problems.append(f"The ControlNet {name} takes {cond[3]}x{cond[2]} control images but the model makes "
                        f"{image_size[0]}x{image_size[1]} images.")
    sdxl_unet, sdxl_cn = "time_ids" in unet.inputs, "time_ids" in cn.inputs
    if sdxl_unet != sdxl_cn:
        problems.append(f"The ControlNet {name} is {'an SDXL' if sdxl_cn else 'an SD 1.x/2.x'} ControlNet but the "
                        f"model is {'SDXL' if sdxl_unet else 'SD 1.x/2.x'}.")
    return problems
