"""Per-component conversion: load one PyTorch component, wrap, trace, convert, describe, save.

Only one component is in memory at a time: each is loaded from the pipeline folder on
its own, and its module, traced graph and Core ML model are dropped before the next.
"""

from __future__ import annotations

import contextlib
import gc
import io
import logging
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from ..errors import ConversionError

LICENSES = {
    "sd": "OpenRAIL (https://huggingface.co/spaces/CompVis/stable-diffusion-license)",
    "sdxl": "OpenRAIL++-M (https://huggingface.co/stabilityai/stable-diffusion-xl-base-1.0/blob/main/LICENSE.md)",
    "sd3": "Stability AI Community License (https://huggingface.co/stabilityai/stable-diffusion-3-medium/blob/main/LICENSE.md)",
}
SHORT_DESCRIPTION = (
    "Stable Diffusion generates images conditioned on text or other images as input through the diffusion process. "
    "Please refer to https://arxiv.org/abs/2112.10752 for details."
)

DESCRIPTIONS = {
    "input_ids": "The token ids that represent the input text",
    "last_hidden_state": "The token embeddings as encoded by the Transformer model",
    "hidden_embeds": "Hidden states after the encoder layers",
    "pooled_outputs": "The version of the `last_hidden_state` output after pooling",
    "sample": "The low resolution latent feature maps being denoised through reverse diffusion",
    "timestep": "A value emitted by the associated scheduler object to condition the model on a given noise schedule",
    "encoder_hidden_states": "Output embeddings from the associated text_encoder model to condition to generated "
    "image on text. A maximum of 77 tokens (~40 words) are allowed. Longer text is truncated.",
    "time_ids": "Additional embeddings that if specified are added to the embeddings that are passed along to the UNet blocks.",
    "text_embeds": "Additional embeddings from text_encoder_2 that if specified are added to the embeddings "
    "that are passed along to the UNet blocks.",
    "noise_pred": "Same shape and dtype as the `sample` input. The predicted noise to facilitate the reverse "
    "diffusion (denoising) process",
    "z": "The denoised latent embeddings from the unet model after the last step of reverse diffusion",
    "image": "Generated image normalized to range [-1, 1]",
    "x": "The input image to base the initial latents on normalized to range [-1, 1]",
    "latent": "The latent embeddings from the unet model from the input image.",
    "clip_input": "The normalized image input tensor resized to (224x224) in channels-first (BCHW) format",
    "images": "Output of the vae_decoder (pre-normalized to [0, 1]) in channels-last (BHWC) format",
    "adjustment": "Bias added to the concept scores to trade off increased recall for reduce precision "
    "in the safety checker classifier",
    "filtered_images": "Identical to the input `images`. If safety checker detected any sensitive content, "
    "the corresponding image is replaced with a blank image (zeros)",
    "has_nsfw_concepts": "Indicates whether the safety checker model found any sensitive content in the given image",
    "concept_scores": "Concept scores are the scores before thresholding at zero yields the `has_nsfw_concepts` "
    "output. These scores can be used to tune the `adjustment` input",
    "latent_image_embeddings": "The low resolution latent feature maps being denoised through reverse diffusion",
    "token_level_text_embeddings": "Output embeddings from the associated text encoders (CLIP, zero padded, then "
    "T5) to condition the generated image on text",
    "pooled_text_embeddings": "Pooled embeddings of both CLIP text encoders, added to the time embedding",
    "denoiser_output": "Same shape and dtype as the `latent_image_embeddings` input: the predicted velocity of the "
    "flow-matching reverse diffusion process",
    "attention_mask": "1 at padding positions the T5 encoder ignores, 0 elsewhere (all zeros: attend everywhere)",
}
# Names whose meaning depends on the component.
COMPONENT_DESCRIPTIONS = {
    ("text_encoder_t5", "encoder_hidden_states"): "T5 token embeddings in the [1, C, 1, L] text layout",
    ("mmdit", "timestep"): "The flow-matching time (sigma) times 1000, as the scheduler emits it",
}


@dataclass(frozen=True)
class Geometry:
    """The shapes one conversion uses."""

    latent_h: int
    latent_w: int
    vae_scale: int  # pixels per latent
    batch: int  # Unet batch (2 for classifier-free guidance in one call, or 1)
    seq_len: int = 77

    @property
    def image_h(self) -> int:
        return self.latent_h * self.vae_scale

    @property
    def image_w(self) -> int:
        return self.latent_w * self.vae_scale


@dataclass(frozen=True)
class Job:
    """Everything needed to convert one component."""

    component: str
    folder: Path  # local diffusers pipeline folder
    variant: str | None  # weights variant ("fp16") when only that is present
    arch: str  # "sd", "sdxl" or "sd3"
    attention: str
    precision: str  # "fp16" or "fp32"
    geometry: Geometry
    model_version: str
    query_chunk_size: int
    time_ids: int = 6  # SDXL Unets: 6 time ids; the refiner's: 5 (its last is the aesthetic score)


@dataclass
class Prepared:
    """A traced module and how to describe it to coremltools."""

    module: Any  # torch.jit.ScriptModule
    inputs: "OrderedDict[str, np.ndarray]"  # sample inputs, in the dtype the Core ML input takes
    outputs: tuple[str, ...]
    precision: str  # effective precision for this component


def _load(kind: str, job: Job, subfolder: str) -> Any:
    import torch

    kwargs: dict[str, Any] = {"subfolder": subfolder, "torch_dtype": torch.float32}
    if job.variant:
        kwargs["variant"] = job.variant
    try:
        if kind == "unet":
            from diffusers import UNet2DConditionModel as cls
        elif kind == "vae":
            from diffusers import AutoencoderKL as cls  # type: ignore[no-redef]
        elif kind == "clip":
            from transformers import CLIPTextModel as cls  # type: ignore[no-redef]
        elif kind == "clip_projection":
            from transformers import CLIPTextModelWithProjection as cls  # type: ignore[no-redef]
        elif kind == "t5":
            from transformers import T5EncoderModel as cls  # type: ignore[no-redef]
        elif kind == "transformer":
            from diffusers import SD3Transformer2DModel as cls  # type: ignore[no-redef]
        else:
            from diffusers.pipelines.stable_diffusion.safety_checker import (  # type: ignore[no-redef]
                StableDiffusionSafetyChecker as cls,
            )
        with _quiet():
            model = cls.from_pretrained(str(job.folder), **kwargs)
    except (OSError, ValueError, EnvironmentError) as exc:
        raise ConversionError(
            f"Cannot load {subfolder} from {job.folder}: {str(exc).splitlines()[0]}",
            hint="Check that the folder is a complete diffusers pipeline (model_index.json, configs and safetensors).",
        ) from exc
    return model.eval()


@contextlib.contextmanager
def _quiet() -> Any:
    """Silence library chatter (progress bars, warnings) that would break the one-line-per-component output."""
    buffer = io.StringIO()
    loggers = [logging.getLogger(n) for n in ("coremltools", "diffusers", "transformers", "torch")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stderr(buffer), contextlib.redirect_stdout(buffer):
            import warnings

            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                yield buffer
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def import_coremltools() -> Any:
    """coremltools, imported without its import-time warnings on stderr."""
    with _quiet():
        import coremltools

    return coremltools


def _input_dtype(precision: str) -> Any:
    return np.float16 if precision == "fp16" else np.float32


def _trace(module: Any, inputs: "OrderedDict[str, np.ndarray]") -> Any:
    import torch

    example = tuple(torch.from_numpy(np.asarray(v, dtype=np.float32)) for v in inputs.values())
    with torch.no_grad(), _quiet():
        return torch.jit.trace(module.eval(), example, check_trace=False)


def prepare_text_encoder(job: Job, rng: np.random.Generator) -> Prepared:
    from .wrappers import TextEncoder

    projected = job.component == "text_encoder_2" or job.arch == "sd3"  # SD3's first CLIP projects too
    model = _load("clip_projection" if projected else "clip", job, job.component)
    vocab = model.config.vocab_size
    seq = model.config.max_position_embeddings
    ids = rng.integers(0, vocab - 2, size=(1, seq)).astype(np.float32)
    ids[0, 0] = vocab - 2
    ids[0, seq // 2 :] = vocab - 1  # an end token, then padding
    penultimate = job.arch in ("sdxl", "sd3")  # both take the states before the last layer
    module = TextEncoder(model, penultimate=penultimate)
    inputs = OrderedDict(input_ids=ids)
    traced = _trace(module, inputs)
    names = ("hidden_embeds", "pooled_outputs") if penultimate else ("last_hidden_state", "pooled_outputs")
    return Prepared(traced, inputs, names, job.precision)


def prepare_text_encoder_t5(job: Job, rng: np.random.Generator) -> Prepared:
    from .wrappers import TextEncoderT5

    model = _load("t5", job, "text_encoder_3")
    seq = job.geometry.seq_len  # the MMDiT keeps this many T5 tokens (Apple's pipeline: 77)
    ids = rng.integers(2, model.config.vocab_size, size=(1, seq)).astype(np.float32)
    ids[0, seq // 2] = 1  # the end token, then padding
    ids[0, seq // 2 + 1 :] = 0
    mask = np.zeros((1, seq), dtype=np.float32)
    inputs = OrderedDict(input_ids=ids, attention_mask=mask)
    traced = _trace(TextEncoderT5(model, seq), inputs)
    return Prepared(traced, inputs, ("encoder_hidden_states",), job.precision)


def prepare_mmdit(job: Job, rng: np.random.Generator) -> Prepared:
    from .wrappers import MMDiT

    transformer = _load("transformer", job, "transformer")
    cfg = transformer.config
    g = job.geometry
    b = g.batch
    inputs: OrderedDict[str, np.ndarray] = OrderedDict()
    inputs["latent_image_embeddings"] = rng.standard_normal((b, cfg.in_channels, g.latent_h, g.latent_w)).astype(np.float32)
    inputs["token_level_text_embeddings"] = rng.standard_normal(
        (b, cfg.joint_attention_dim, 1, 2 * g.seq_len)).astype(np.float32)  # CLIP tokens, then T5 tokens
    inputs["pooled_text_embeddings"] = rng.standard_normal((b, cfg.pooled_projection_dim, 1, 1)).astype(np.float32)
    inputs["timestep"] = np.full((b,), 750.0, dtype=np.float32)
    traced = _trace(MMDiT(transformer), inputs)
    # float32 whatever --precision says, as Apple's converter (through DiffusionKit) exports it
    return Prepared(traced, inputs, ("denoiser_output",), "fp32")


def prepare_unet(job: Job, rng: np.random.Generator) -> Prepared:
    from . import attention
    from .wrappers import Unet, UnetXL

    unet = _load("unet", job, "unet")
    attention.install(unet, job.attention, job.query_chunk_size)
    cfg = unet.config
    g = job.geometry
    b = g.batch
    dtype = _input_dtype(job.precision)
    context_dim = cfg.cross_attention_dim
    if isinstance(context_dim, (list, tuple)):
        context_dim = context_dim[0]
    inputs: OrderedDict[str, np.ndarray] = OrderedDict()
    inputs["sample"] = rng.standard_normal((b, cfg.in_channels, g.latent_h, g.latent_w)).astype(dtype)
    inputs["timestep"] = np.full((b,), 981.0, dtype=dtype)
    inputs["encoder_hidden_states"] = rng.standard_normal((b, context_dim, 1, g.seq_len)).astype(dtype)
    if cfg.addition_embed_type == "text_time":
        text_embeds_dim = cfg.projection_class_embeddings_input_dim - job.time_ids * cfg.addition_time_embed_dim
        row = [g.image_h, g.image_w, 0, 0, g.image_h, g.image_w][: job.time_ids]
        if job.time_ids == 5:
            row[4] = 6.0  # the refiner's aesthetic score
        inputs["time_ids"] = np.array([row] * b, dtype=dtype)
        inputs["text_embeds"] = rng.standard_normal((b, text_embeds_dim)).astype(dtype)
        module: Any = UnetXL(unet)
    elif cfg.addition_embed_type is not None:
        raise ConversionError(
            f"This Unet uses addition_embed_type={cfg.addition_embed_type!r}, which coreml-hub cannot convert.",
            hint="Supported: Stable Diffusion 1.x/2.x and SDXL Unets.",
        )
    else:
        module = Unet(unet)
    traced = _trace(module, inputs)
    return Prepared(traced, inputs, ("noise_pred",), job.precision)


def _vae_precision(job: Job, vae: Any) -> str:
    # SDXL's VAE overflows in float16 (its config says force_upcast); Apple converts it in float32.
    return "fp32" if getattr(vae.config, "force_upcast", False) and job.arch == "sdxl" else job.precision


def prepare_vae_decoder(job: Job, rng: np.random.Generator) -> Prepared:
    from . import attention
    from .wrappers import VAEDecoder

    vae = _load("vae", job, "vae")
    attention.install(vae, "original")
    precision = _vae_precision(job, vae)
    g = job.geometry
    z = rng.standard_normal((1, vae.config.latent_channels, g.latent_h, g.latent_w)).astype(_input_dtype(precision))
    inputs = OrderedDict(z=z)
    traced = _trace(VAEDecoder(vae), inputs)
    return Prepared(traced, inputs, ("image",), precision)


def prepare_vae_encoder(job: Job, rng: np.random.Generator) -> Prepared:
    from . import attention
    from .wrappers import VAEEncoder

    vae = _load("vae", job, "vae")
    attention.install(vae, "original")
    precision = _vae_precision(job, vae)
    g = job.geometry
    x = rng.uniform(-1, 1, (1, vae.config.in_channels, g.image_h, g.image_w)).astype(_input_dtype(precision))
    inputs = OrderedDict(x=x)
    traced = _trace(VAEEncoder(vae), inputs)
    return Prepared(traced, inputs, ("latent",), precision)


def prepare_safety_checker(job: Job, rng: np.random.Generator) -> Prepared:
    from .wrappers import SafetyChecker

    checker = _load("safety", job, "safety_checker")
    size = checker.config.vision_config.image_size
    g = job.geometry
    dtype = _input_dtype(job.precision)
    inputs: OrderedDict[str, np.ndarray] = OrderedDict()
    inputs["clip_input"] = rng.standard_normal((1, 3, size, size)).astype(dtype)
    inputs["images"] = rng.uniform(0, 1, (1, g.image_h, g.image_w, 3)).astype(dtype)
    inputs["adjustment"] = np.zeros((1,), dtype=dtype)
    traced = _trace(SafetyChecker(checker), inputs)
    return Prepared(traced, inputs, ("filtered_images", "has_nsfw_concepts", "concept_scores"), job.precision)


def prepare_controlled_unet(job: Job, rng: np.random.Generator) -> Prepared:
    from .controlnet import prepare_controlled_unet as prepare

    return prepare(job, rng)


PREPARERS: dict[str, Callable[[Job, np.random.Generator], Prepared]] = {
    "text_encoder": prepare_text_encoder,
    "text_encoder_2": prepare_text_encoder,
    "text_encoder_t5": prepare_text_encoder_t5,
    "unet": prepare_unet,
    "controlled_unet": prepare_controlled_unet,
    "mmdit": prepare_mmdit,
    "refiner": prepare_unet,  # the refiner pipeline's Unet (Job.folder is the refiner's)
    "vae_decoder": prepare_vae_decoder,
    "vae_encoder": prepare_vae_encoder,
    "safety_checker": prepare_safety_checker,
}


def to_coreml(prepared: Prepared) -> Any:
    """coremltools conversion of a traced module into an ML Program (iOS16 / macOS13 opset)."""
    ct = import_coremltools()

    inputs = [ct.TensorType(name=k, shape=v.shape, dtype=v.dtype.type) for k, v in prepared.inputs.items()]
    outputs = [ct.TensorType(name=name, dtype=np.float32) for name in prepared.outputs]
    precision = ct.precision.FLOAT16 if prepared.precision == "fp16" else ct.precision.FLOAT32
    with _quiet():
        return ct.convert(
            prepared.module,
            convert_to="mlprogram",
            minimum_deployment_target=ct.target.iOS16,
            inputs=inputs,
            outputs=outputs,
            compute_precision=precision,
            compute_units=ct.ComputeUnit.CPU_AND_GPU,
            skip_model_load=True,
        )


RESIDUAL_INPUT_DESCRIPTION = "ControlNet residual added to the corresponding resnet output (zeros: no control)"


def describe(mlmodel: Any, job: Job, extra: dict[str, str] | None = None, *, author_id: str | None = None,
             short_description: str | None = None, descriptions: dict[str, str] | None = None) -> None:
    """Author, license, version, descriptions and coreml-hub's own metadata, like Apple's packages carry."""
    from ..version import __version__

    author_id = author_id or job.model_version
    own = descriptions or {}
    mlmodel.author = f"Please refer to the Model Card available at huggingface.co/{author_id}"
    mlmodel.license = LICENSES[job.arch]
    mlmodel.version = author_id
    mlmodel.short_description = short_description or SHORT_DESCRIPTION
    spec = mlmodel.get_spec()
    for features, target, inputs in ((spec.description.input, mlmodel.input_description, True),
                                     (spec.description.output, mlmodel.output_description, False)):
        for feature in features:
            text = (own.get(feature.name) or COMPONENT_DESCRIPTIONS.get((job.component, feature.name))
                    or DESCRIPTIONS.get(feature.name))
            if not text and inputs and feature.name.startswith("additional_residual_"):
                text = RESIDUAL_INPUT_DESCRIPTION
            if text:
                target[feature.name] = text
    meta = mlmodel.user_defined_metadata
    meta["com.github.coreml-hub.version"] = __version__
    meta["com.github.coreml-hub.model_version"] = job.model_version
    meta["com.github.coreml-hub.component"] = job.component
    if job.component in ("unet", "mmdit", "refiner", "controlled_unet", "controlnet"):
        meta["com.github.coreml-hub.attention"] = job.attention
    for key, value in (extra or {}).items():
        meta[key] = value


def convert_component(job: Job, dest: Path) -> Path:
    """Convert `job.component` and save it as `dest` (.mlpackage), atomically."""
    rng = np.random.default_rng(0)
    try:
        prepared = PREPARERS[job.component](job, rng)
    except ConversionError as exc:
        if job.component in exc.message:
            raise
        raise type(exc)(f"{job.component}: {exc.message}", hint=exc.hint) from exc
    except Exception as exc:
        raise ConversionError(
            f"Tracing {job.component} failed: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}",
            hint="Run again with COREML_HUB_DEBUG=1 for the traceback.",
        ) from exc
    return finish_conversion(job, prepared, dest)


def finish_conversion(job: Job, prepared: Prepared, dest: Path, *, extra: dict[str, str] | None = None,
                      author_id: str | None = None, short_description: str | None = None,
                      descriptions: dict[str, str] | None = None) -> Path:
    """coremltools conversion of a traced component, its descriptions, then an atomic save as `dest`."""
    import shutil

    gc.collect()
    try:
        mlmodel = to_coreml(prepared)
    except Exception as exc:
        raise ConversionError(
            f"coremltools failed to convert {job.component}: {type(exc).__name__}: "
            f"{str(exc).splitlines()[0] if str(exc) else ''}",
            hint="Run again with COREML_HUB_DEBUG=1 for the traceback.",
        ) from exc
    del prepared
    gc.collect()
    hidden = None
    if job.component.startswith("text_encoder"):
        shape = mlmodel.get_spec().description.output[0].type.multiArrayType.shape
        hidden = str(shape[1] if job.component == "text_encoder_t5" else shape[-1])  # T5: [1, C, 1, L]
    meta = dict(extra or {})
    if hidden:
        meta["hidden_size"] = hidden
    describe(mlmodel, job, meta or None, author_id=author_id, short_description=short_description,
             descriptions=descriptions)
    tmp = dest.with_name(f".partial-{dest.name}")
    if tmp.exists():
        shutil.rmtree(tmp)
    dest.parent.mkdir(parents=True, exist_ok=True)
    with _quiet():
        mlmodel.save(str(tmp))
    del mlmodel
    gc.collect()
    if dest.exists():
        shutil.rmtree(dest)
    tmp.rename(dest)
    return dest
