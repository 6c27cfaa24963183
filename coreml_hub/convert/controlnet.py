"""ControlNets for conversion: where a ControlNet comes from, the Unet that takes its residuals, and
the ControlNet itself, with Apple's I/O contract (torch2coreml `--unet-support-controlnet`,
`--convert-controlnet`; ControlNet.swift):

- the controlled Unet takes the usual Unet inputs, then `additional_residual_0 ... additional_residual_N`
  (the down-block residuals in order, the mid-block residual last), each [B, C_i, H_i, W_i];
- a ControlNet takes `sample`, `timestep`, `encoder_hidden_states` ([B, C, 1, 77]) and
  `controlnet_cond` ([B, 3, H, W] in [0, 1], H and W the image size), plus `time_ids` and
  `text_embeds` for SDXL ControlNets, and returns `additional_residual_i` with exactly the shapes
  the controlled Unet takes. No conditioning scale inside: the pipeline scales (and sums) them.
"""

from __future__ import annotations

import json
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import ConversionError
from .components import Geometry, Job, Prepared, _input_dtype, _load, _quiet, _trace

CONTROLNET_DESCRIPTION = (
    "ControlNet is a neural network structure to control diffusion models by adding extra conditions. "
    "Please refer to https://arxiv.org/abs/2302.05543 for details."
)
INPUT_DESCRIPTIONS = {
    "controlnet_cond": "An additional input image for ControlNet to condition the generated images.",
}
RESIDUAL_DESCRIPTION = ("One of the outputs of each downsampling block in ControlNet. "
                        "The value added to the corresponding resnet output in UNet.")
WEIGHT_NAMES = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.fp16.safetensors")


@dataclass(frozen=True)
class ControlNetSource:
    """A diffusers ControlNetModel folder (config.json + safetensors) and the id that names its files."""

    folder: Path
    model_id: str  # `org/name` for a Hub repo, the folder's name for a local folder
    config: dict[str, Any]
    variant: str | None = None  # "fp16" when only those weights exist

    @property
    def arch(self) -> str:
        return "sdxl" if self.config.get("addition_embed_type") == "text_time" else "sd"


def _read_config(folder: Path, where: str) -> dict[str, Any]:
    path = folder / "config.json"
    if not path.is_file():
        raise ConversionError(f"{where} is not a diffusers ControlNet: config.json is missing.",
                              hint="Pass a folder saved with `ControlNetModel.save_pretrained`, or a Hub repo id "
                                   "such as lllyasviel/sd-controlnet-canny.")
    try:
        config = json.loads(path.read_text())
    except ValueError as exc:
        raise ConversionError(f"{where}: config.json is not valid JSON ({exc}).") from exc
    if config.get("_class_name") not in ("ControlNetModel", None):
        raise ConversionError(f"{where} is a {config.get('_class_name')}, not a ControlNetModel.",
                              hint="coreml-hub converts diffusers ControlNetModel checkpoints.")
    return config


def _weights_variant(names: set[str], where: str) -> str | None:
    if WEIGHT_NAMES[0] in names:
        return None
    if WEIGHT_NAMES[1] in names:
        return "fp16"
    raise ConversionError(f"{where} has no safetensors weights (diffusion_pytorch_model.safetensors).",
                          hint="Save the ControlNet with safe_serialization=True, or pick a repo that ships safetensors.")


def controlnet_source(source: str | Path, revision: str | None = None) -> ControlNetSource:
    """A local ControlNet folder, or the config and weights of a Hub repo (nothing else is fetched)."""
    from . import source as sources

    path = Path(str(source)).expanduser()
    if path.is_dir():
        folder = path.resolve()
        config = _read_config(folder, str(folder))
        variant = _weights_variant({p.name for p in folder.iterdir()}, str(folder))
        return ControlNetSource(folder, folder.name, config, variant)
    if not sources.looks_like_repo_id(str(source)):
        raise ConversionError(f"--controlnet {source} is neither a folder nor a Hub repo id.",
                              hint="Pass a local diffusers ControlNet folder or a repo id such as "
                                   "lllyasviel/sd-controlnet-canny.")
    from huggingface_hub import snapshot_download

    from .. import hub

    repo_id = str(source)
    snapshot = hub.repo_files(repo_id, revision)
    names = {f.path for f in snapshot.files}
    where = f"Hub repo {repo_id}"
    if "config.json" not in names:
        raise ConversionError(f"{where} is not a diffusers ControlNet: config.json is missing.",
                              hint="ControlNet repos in diffusers' format have config.json and "
                                   "diffusion_pytorch_model.safetensors at the root.")
    variant = _weights_variant(names, where)
    wanted = ["config.json", WEIGHT_NAMES[1] if variant else WEIGHT_NAMES[0]]
    with hub.hub_errors(repo_id, revision):
        folder = Path(snapshot_download(repo_id, revision=snapshot.sha, allow_patterns=wanted,
                                        endpoint=hub.endpoint(), token=hub.token()))
    return ControlNetSource(folder, repo_id, _read_config(folder, where), variant)


# ---- residual shapes -----------------------------------------------------------------------

def _conv_out(size: int, conv: Any) -> int:
    kernel, stride, padding = conv.kernel_size[0], conv.stride[0], conv.padding[0]
    return (size + 2 * padding - kernel) // stride + 1


def residual_shapes(model: Any, batch: int, latent_h: int, latent_w: int) -> list[tuple[int, int, int, int]]:
    """The residuals a ControlNet makes and a Unet takes, in Apple's order: conv_in, every resnet and
    downsampler of the down blocks, the mid block last. `model` is a Unet or a ControlNet (same encoder)."""
    h, w = _conv_out(latent_h, model.conv_in), _conv_out(latent_w, model.conv_in)
    shapes = [(batch, model.conv_in.out_channels, h, w)]
    for block in model.down_blocks:
        shapes += [(batch, resnet.out_channels, h, w) for resnet in block.resnets]
        for down in getattr(block, "downsamplers", None) or ():
            conv = getattr(down, "conv", None)
            if hasattr(conv, "kernel_size"):
                h, w = _conv_out(h, conv), _conv_out(w, conv)
                channels = conv.out_channels
            else:  # pooling: halves, keeps channels
                h, w, channels = h // 2, w // 2, shapes[-1][1]
            shapes.append((batch, channels, h, w))
    shapes.append((batch, model.mid_block.resnets[-1].out_channels, h, w))
    return shapes


def _context_dim(config: Any) -> int:
    dim = config.cross_attention_dim
    return int(dim[0] if isinstance(dim, (list, tuple)) else dim)


def check_matches_base(config: dict[str, Any], unet_config: dict[str, Any], where: str) -> None:
    """Refuse a ControlNet made for another base: its hidden size, added conditioning or residuals differ.

    Both arguments are configs (a ControlNetModel's and a UNet2DConditionModel's), so this runs before
    any weights are read.
    """
    def dim(cfg: dict[str, Any]) -> int | None:
        value = cfg.get("cross_attention_dim")
        value = value[0] if isinstance(value, (list, tuple)) else value
        return int(value) if value is not None else None

    base_dim, cn_dim = dim(unet_config), dim(config)
    if base_dim is not None and cn_dim is not None and base_dim != cn_dim:
        raise ConversionError(
            f"{where} was made for another base model: it takes {cn_dim}-wide text states, the Unet {base_dim}.",
            hint="Convert it with the pipeline it was trained for (SD 1.x: 768, SD 2.x: 1024, SDXL: 2048).")
    base_xl = unet_config.get("addition_embed_type") == "text_time"
    cn_xl = config.get("addition_embed_type") == "text_time"
    if base_xl != cn_xl:
        raise ConversionError(f"{where} is {'an SDXL' if cn_xl else 'an SD 1.x/2.x'} ControlNet but the pipeline is "
                              f"{'SDXL' if base_xl else 'SD 1.x/2.x'}.", hint="Pair ControlNets with their base model.")
    for key in ("block_out_channels", "layers_per_block"):
        base, ours = unet_config.get(key), config.get(key)
        if base is not None and ours is not None and base != ours:
            raise ConversionError(
                f"{where} was made for another base model: its residual shapes differ from the Unet's "
                f"({key} {ours} against {base}).", hint="Convert it with the pipeline it was trained for.")


# ---- wrappers ------------------------------------------------------------------------------

def _torch_wrappers() -> tuple[type, type]:
    import torch
    from torch import nn

    from .wrappers import _unet_call

    class ControlledUnet(nn.Module):
        """Unet inputs (+ SDXL `time_ids`, `text_embeds`), then `additional_residual_0..N` -> `noise_pred`."""

        def __init__(self, unet: nn.Module, sdxl: bool) -> None:
            super().__init__()
            self.unet = unet
            self.sdxl = sdxl

        def forward(self, sample: torch.Tensor, timestep: torch.Tensor, encoder_hidden_states: torch.Tensor,
                    *rest: torch.Tensor) -> torch.Tensor:
            kwargs: dict[str, Any] = {}
            if self.sdxl:
                kwargs["added_cond_kwargs"] = {"time_ids": rest[0], "text_embeds": rest[1]}
                rest = rest[2:]
            return _unet_call(self.unet, sample, timestep, encoder_hidden_states,
                              down_block_additional_residuals=tuple(rest[:-1]),
                              mid_block_additional_residual=rest[-1], **kwargs)

    class ControlNet(nn.Module):
        """(`sample`, `timestep`, `encoder_hidden_states`, `controlnet_cond` [, `time_ids`, `text_embeds`])
        -> `additional_residual_0..N`, unscaled."""

        def __init__(self, controlnet: nn.Module, sdxl: bool) -> None:
            super().__init__()
            self.controlnet = controlnet
            self.sdxl = sdxl

        def forward(self, sample: torch.Tensor, timestep: torch.Tensor, encoder_hidden_states: torch.Tensor,
                    controlnet_cond: torch.Tensor, *extra: torch.Tensor) -> tuple[torch.Tensor, ...]:
            context = encoder_hidden_states.squeeze(2).transpose(1, 2)
            added = {"time_ids": extra[0], "text_embeds": extra[1]} if self.sdxl else None
            down, mid = self.controlnet(sample, timestep, context, controlnet_cond, conditioning_scale=1.0,
                                        added_cond_kwargs=added, guess_mode=False, return_dict=False)
            return (*down, mid)

    return ControlledUnet, ControlNet


def _sdxl_inputs(config: Any, g: Geometry, dtype: Any, rng: np.random.Generator) -> "OrderedDict[str, np.ndarray]":
    text_dim = config.projection_class_embeddings_input_dim - 6 * config.addition_time_embed_dim
    row = [g.image_h, g.image_w, 0, 0, g.image_h, g.image_w]
    extra: OrderedDict[str, np.ndarray] = OrderedDict()
    extra["time_ids"] = np.array([row] * g.batch, dtype=dtype)
    extra["text_embeds"] = rng.standard_normal((g.batch, text_dim)).astype(dtype)
    return extra


def prepare_controlled_unet(job: Job, rng: np.random.Generator) -> Prepared:
    """The Unet with Apple's `additional_residual_i` inputs after the usual ones."""
    from . import attention

    unet = _load("unet", job, "unet")
    attention.install(unet, job.attention, job.query_chunk_size)
    cfg = unet.config
    if cfg.addition_embed_type not in (None, "text_time"):
        raise ConversionError(f"This Unet uses addition_embed_type={cfg.addition_embed_type!r}, which coreml-hub "
                              "cannot convert.", hint="Supported: Stable Diffusion 1.x/2.x and SDXL Unets.")
    g = job.geometry
    dtype = _input_dtype(job.precision)
    inputs: OrderedDict[str, np.ndarray] = OrderedDict()
    inputs["sample"] = rng.standard_normal((g.batch, cfg.in_channels, g.latent_h, g.latent_w)).astype(dtype)
    inputs["timestep"] = np.full((g.batch,), 981.0, dtype=dtype)
    inputs["encoder_hidden_states"] = rng.standard_normal((g.batch, _context_dim(cfg), 1, g.seq_len)).astype(dtype)
    sdxl = cfg.addition_embed_type == "text_time"
    if sdxl:
        inputs.update(_sdxl_inputs(cfg, g, dtype, rng))
    for i, shape in enumerate(residual_shapes(unet, g.batch, g.latent_h, g.latent_w)):
        inputs[f"additional_residual_{i}"] = (0.1 * rng.standard_normal(shape)).astype(dtype)
    controlled, _ = _torch_wrappers()
    traced = _trace(controlled(unet, sdxl), inputs)
    return Prepared(traced, inputs, ("noise_pred",), job.precision)


def load_controlnet(source: ControlNetSource) -> Any:
    import torch
    from diffusers import ControlNetModel

    kwargs: dict[str, Any] = {"torch_dtype": torch.float32}
    if source.variant:
        kwargs["variant"] = source.variant
    try:
        with _quiet():
            return ControlNetModel.from_pretrained(str(source.folder), **kwargs).eval()
    except (OSError, ValueError, EnvironmentError) as exc:
        raise ConversionError(f"Cannot load the ControlNet {source.model_id}: {str(exc).splitlines()[0]}",
                              hint="Check that the folder holds config.json and diffusion_pytorch_model.safetensors.") from exc


def prepare_controlnet(job: Job, source: ControlNetSource, unet_config: dict[str, Any],
                       rng: np.random.Generator) -> Prepared:
    """A ControlNet traced with Apple's inputs, checked against the base it is converted for."""
    from . import attention

    check_matches_base(source.config, unet_config, f"The ControlNet {source.model_id}")
    controlnet = load_controlnet(source)
    g = job.geometry
    attention.install(controlnet, job.attention, job.query_chunk_size)
    cfg = controlnet.config
    dtype = _input_dtype(job.precision)
    inputs: OrderedDict[str, np.ndarray] = OrderedDict()
    inputs["sample"] = rng.standard_normal((g.batch, cfg.in_channels, g.latent_h, g.latent_w)).astype(dtype)
    inputs["timestep"] = np.full((g.batch,), 981.0, dtype=dtype)
    inputs["encoder_hidden_states"] = rng.standard_normal((g.batch, _context_dim(cfg), 1, g.seq_len)).astype(dtype)
    channels = getattr(cfg, "conditioning_channels", 3)
    inputs["controlnet_cond"] = rng.uniform(0, 1, (g.batch, channels, g.image_h, g.image_w)).astype(dtype)
    sdxl = cfg.addition_embed_type == "text_time"
    if sdxl:
        inputs.update(_sdxl_inputs(cfg, g, dtype, rng))
    count = len(residual_shapes(controlnet, g.batch, g.latent_h, g.latent_w))
    _, wrapper = _torch_wrappers()
    traced = _trace(wrapper(controlnet, sdxl), inputs)
    return Prepared(traced, inputs, tuple(f"additional_residual_{i}" for i in range(count)), job.precision)


def convert_controlnet(job: Job, source: ControlNetSource, unet_config: dict[str, Any], dest: Path) -> Path:
    """Convert one ControlNet to `dest` (.mlpackage), atomically, with Apple's descriptions."""
    from .components import finish_conversion

    rng = np.random.default_rng(0)
    try:
        prepared = prepare_controlnet(job, source, unet_config, rng)
    except ConversionError:
        raise
    except Exception as exc:
        raise ConversionError(f"Tracing the ControlNet {source.model_id} failed: {type(exc).__name__}: "
                              f"{str(exc).splitlines()[0] if str(exc) else ''}",
                              hint="Run again with COREML_HUB_DEBUG=1 for the traceback.") from exc
    extra = {"com.github.coreml-hub.controlnet": source.model_id}
    descriptions = dict(INPUT_DESCRIPTIONS)
    descriptions.update({name: RESIDUAL_DESCRIPTION for name in prepared.outputs})
    return finish_conversion(job, prepared, dest, extra=extra, author_id=source.model_id,
                             short_description=CONTROLNET_DESCRIPTION, descriptions=descriptions)
