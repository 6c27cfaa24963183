"""Tiny random-weight Stable Diffusion pipelines, built from configs (nothing is downloaded).

Styles structurally like the real models but a few hundred kilobytes each:

- ``sd1``: SD 1.x. CLIP text encoder (quick_gelu), conv proj_in/proj_out, epsilon
  prediction, PNDM scheduler, the safety checker.
- ``sd2``: SD 2.x. Wider text context (gelu), linear projections, v-prediction DDIM
  scheduler, the tokenizer pads with "!", no safety checker.
- ``sdxl``: SDXL. Two text encoders (the second with a projection), the Unet's
  ``text_time`` added conditioning (``time_ids`` + ``text_embeds``), VAE scale 0.13025.
- ``sdxl-refiner``: the SDXL refiner for ``sdxl``: no first text encoder, the same second
  text encoder and VAE (the same weights), its own Unet that takes only the second encoder's
  states and five time ids (sizes, crop, aesthetic score); diffusers'
  StableDiffusionXLImg2ImgPipeline with `requires_aesthetics_score`, as the real refiner ships.
- ``sd3``: Stable Diffusion 3. Two CLIP encoders with projections, a T5 encoder (gated
  GELU, relative position buckets) and its SentencePiece-style tokenizer, the MMDiT
  transformer (2x2 patches, joint attention), a 16-channel VAE without quant convs
  (scale 1.5305, shift 0.0609), the flow-matching Euler scheduler with shift 3.
- ``sd1-inpaint``: ``sd1`` with a 9-channel inpainting Unet (latents, mask, masked-image
  latents), as a StableDiffusionInpaintPipeline without a safety checker. Its text encoder
  and VAE are ``sd1``'s (same configs and seeds), so conversions share them (its packages
  folder then names those two after ``sd1``).

Tiny ControlNets (``controlnet(name)``, see CONTROLNETS) are built for a style's Unet with
random weights everywhere, the zero-initialized output convolutions included, so their
residuals visibly steer the image.

Every model is built under a fixed seed, so a style always has the same weights.
Latents are 8x8 (64x64 pixels): small enough that converting every component takes
seconds on two cores, large enough for the VAE's three 2x stages.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

from .tokenizer import (EOS, build_t5_vocab, load_clip_tokenizer, load_t5_tokenizer, write_t5_tokenizer,
                        write_tokenizer_config, write_tokenizer_files)

STYLES = ("sd1", "sd2", "sdxl", "sdxl-refiner", "sd3")
UNET_STYLES = ("sd1", "sd2", "sdxl")  # whole pipelines around a Unet (the refiner converts beside sdxl)
INPAINT_STYLE = "sd1-inpaint"
VOCAB_SIZE = 1000
LATENT = 8  # latent height and width; pixels are 8x this
SEED = 20240229

# Model ids the tiny pipelines pretend to be converted from (they name the packages).
MODEL_VERSIONS = {
    "sd1": "coreml-hub-test/tiny-sd1",
    "sd2": "coreml-hub-test/tiny-sd2",
    "sdxl": "coreml-hub-test/tiny-sdxl",
    "sdxl-refiner": "coreml-hub-test/tiny-sdxl-refiner",
    "sd3": "coreml-hub-test/tiny-sd3",
    INPAINT_STYLE: "coreml-hub-test/tiny-sd1-inpaint",
}

# name -> (base style, seed offset): the tiny ControlNets. `sd1-inpaint` is the inpaint ControlNet (for a
# 4-channel sd1 Unet, like control_v11p_sd15_inpaint); `sd2` exists to be refused by sd1 conversions.
CONTROLNETS = {
    "sd1": ("sd1", 11),
    "sd1-b": ("sd1", 12),
    "sd1-inpaint": ("sd1", 13),
    "sd2": ("sd2", 14),
    "sdxl": ("sdxl", 15),
}
CONTROLNET_CONDITIONING_CHANNELS = (8, 8, 16, 16)  # three stride-2 convolutions: image size -> latent size
CONTROLNET_OUTPUT_STD = 0.5  # the zero-initialized convolutions get this much noise

_TEXT_ENCODER = {
    "vocab_size": VOCAB_SIZE,
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "max_position_embeddings": 77,
    "hidden_act": "quick_gelu",
    "bos_token_id": VOCAB_SIZE - 2,
    "eos_token_id": VOCAB_SIZE - 1,
    "pad_token_id": 1,
}

_VAE = {
    "in_channels": 3,
    "out_channels": 3,
    "latent_channels": 4,
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
    "block_out_channels": [8, 16, 16, 16],
    "layers_per_block": 1,
    "norm_num_groups": 8,
    "sample_size": LATENT * 8,
    "scaling_factor": 0.18215,
}

_UNET = {
    "sample_size": LATENT,
    "in_channels": 4,
    "out_channels": 4,
    "layers_per_block": 1,
    "block_out_channels": [32, 64],
    "norm_num_groups": 8,
    "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"],
    "cross_attention_dim": 32,
    "attention_head_dim": 2,
}

SD1_SCHEDULER = {
    "_class_name": "PNDMScheduler",
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "num_train_timesteps": 1000,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "prediction_type": "epsilon",
    "trained_betas": None,
}

_SCHEDULER_SD2 = {
    "_class_name": "DDIMScheduler",
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "num_train_timesteps": 1000,
    "clip_sample": False,
    "set_alpha_to_one": False,
    "steps_offset": 1,
    "prediction_type": "v_prediction",
    "trained_betas": None,
}

_SCHEDULER_SDXL = {
    "_class_name": "EulerDiscreteScheduler",
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "num_train_timesteps": 1000,
    "interpolation_type": "linear",
    "prediction_type": "epsilon",
    "steps_offset": 1,
    "timestep_spacing": "leading",
    "use_karras_sigmas": False,
    "trained_betas": None,
}


def _merged(base: dict[str, Any], **changes: Any) -> dict[str, Any]:
    out = copy.deepcopy(base)
    out.update(changes)
    return out


def style_config(style: str) -> dict[str, Any]:
    """The configs one style is built from (plain data: they also key the caches)."""
    if style == "sd1":
        return {
            "style": "sd1",
            "model_version": MODEL_VERSIONS["sd1"],
            "pad_token": EOS,
            "text_encoder": dict(_TEXT_ENCODER),
            "unet": dict(_UNET),
            "vae": dict(_VAE),
            "scheduler": dict(SD1_SCHEDULER),
            "safety_checker": {
                "projection_dim": 16,
                "vision": {
                    "hidden_size": 32,
                    "intermediate_size": 64,
                    "num_hidden_layers": 1,
                    "num_attention_heads": 4,
                    "image_size": 224,
                    "patch_size": 32,
                    "hidden_act": "quick_gelu",
                },
            },
        }
    if style == "sd2":
        text = _merged(_TEXT_ENCODER, hidden_size=64, intermediate_size=128, hidden_act="gelu", pad_token_id=0)
        unet = _merged(
            _UNET, cross_attention_dim=64, attention_head_dim=[2, 4], use_linear_projection=True, upcast_attention=False
        )
        return {
            "style": "sd2",
            "model_version": MODEL_VERSIONS["sd2"],
            "pad_token": "!",
            "text_encoder": text,
            "unet": unet,
            "vae": dict(_VAE),
            "scheduler": dict(_SCHEDULER_SD2),
            "safety_checker": None,
        }
    if style == "sdxl":
        text_1 = _merged(_TEXT_ENCODER, hidden_act="quick_gelu")
        text_2 = _merged(
            _TEXT_ENCODER, hidden_size=48, intermediate_size=96, hidden_act="gelu", projection_dim=24, pad_token_id=0
        )
        time_dim = 8
        unet = _merged(
            _UNET,
            down_block_types=["DownBlock2D", "CrossAttnDownBlock2D"],
            up_block_types=["CrossAttnUpBlock2D", "UpBlock2D"],
            cross_attention_dim=text_1["hidden_size"] + text_2["hidden_size"],
            attention_head_dim=[2, 2],
            use_linear_projection=True,
            addition_embed_type="text_time",
            addition_time_embed_dim=time_dim,
            projection_class_embeddings_input_dim=text_2["projection_dim"] + 6 * time_dim,
            transformer_layers_per_block=[1, 1],
        )
        vae = _merged(_VAE, scaling_factor=0.13025, force_upcast=True)
        return {
            "style": "sdxl",
            "model_version": MODEL_VERSIONS["sdxl"],
            "pad_token": EOS,
            "pad_token_2": "!",
            "text_encoder": text_1,
            "text_encoder_2": text_2,
            "unet": unet,
            "vae": vae,
            "scheduler": dict(_SCHEDULER_SDXL),
            "safety_checker": None,
        }
    if style == "sdxl-refiner":
        base = style_config("sdxl")
        text_2 = base["text_encoder_2"]
        time_dim = base["unet"]["addition_time_embed_dim"]
        unet = _merged(
            base["unet"],
            cross_attention_dim=text_2["hidden_size"],  # the second encoder's states only
            projection_class_embeddings_input_dim=text_2["projection_dim"] + 5 * time_dim,  # 5 time ids
        )
        return {
            "style": "sdxl-refiner",
            "model_version": MODEL_VERSIONS["sdxl-refiner"],
            "pad_token_2": base["pad_token_2"],
            "text_encoder_2": text_2,
            "unet": unet,
            "vae": base["vae"],
            "scheduler": base["scheduler"],
            "safety_checker": None,
        }
    if style == "sd3":
        text_1 = _merged(_TEXT_ENCODER, projection_dim=32)
        text_2 = _merged(
            _TEXT_ENCODER, hidden_size=48, intermediate_size=96, hidden_act="gelu", projection_dim=48, pad_token_id=0
        )
        t5 = {
            "vocab_size": len(build_t5_vocab()),
            "d_model": 96,  # SD3's joint attention width: >= the two CLIP widths together (32 + 48)
            "d_kv": 16,
            "d_ff": 128,
            "num_layers": 2,
            "num_heads": 4,
            "relative_attention_num_buckets": 8,
            "relative_attention_max_distance": 20,
            "feed_forward_proj": "gated-gelu",
            "dropout_rate": 0.0,
            "pad_token_id": 0,
            "eos_token_id": 1,
            "decoder_start_token_id": 0,
        }
        transformer = {
            "sample_size": LATENT,
            "patch_size": 2,
            "in_channels": 16,
            "num_layers": 2,
            "attention_head_dim": 8,
            "num_attention_heads": 4,
            "joint_attention_dim": t5["d_model"],
            "caption_projection_dim": 32,
            "pooled_projection_dim": text_1["projection_dim"] + text_2["projection_dim"],
            "out_channels": 16,
            "pos_embed_max_size": 16,
        }
        vae = _merged(_VAE, latent_channels=16, scaling_factor=1.5305, shift_factor=0.0609, use_quant_conv=False,
                      use_post_quant_conv=False)
        return {
            "style": "sd3",
            "model_version": MODEL_VERSIONS["sd3"],
            "pad_token": EOS,
            "pad_token_2": "!",
            "text_encoder": text_1,
            "text_encoder_2": text_2,
            "text_encoder_3": t5,
            "transformer": transformer,
            "vae": vae,
            "scheduler": {"_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000,
                          "shift": 3.0},
            "safety_checker": None,
        }
    if style == INPAINT_STYLE:
        cfg = style_config("sd1")
        cfg.update(style=INPAINT_STYLE, model_version=MODEL_VERSIONS[INPAINT_STYLE], safety_checker=None)
        cfg["unet"] = _merged(cfg["unet"], in_channels=9)
        return cfg
    raise ValueError(f"unknown tiny style {style!r}; expected one of {', '.join((*STYLES, INPAINT_STYLE))}")


def _seeded(offset: int) -> None:
    import torch

    torch.manual_seed(SEED + offset)


def _text_encoder(cfg: dict[str, Any], offset: int, with_projection: bool = False):  # type: ignore[no-untyped-def]
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    _seeded(offset)
    config = CLIPTextConfig(**cfg)
    cls = CLIPTextModelWithProjection if with_projection else CLIPTextModel
    return cls(config).eval()


def _safety_checker(cfg: dict[str, Any]):  # type: ignore[no-untyped-def]
    import torch
    from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
    from transformers import CLIPConfig, CLIPImageProcessor

    _seeded(5)
    text = {k: v for k, v in _TEXT_ENCODER.items() if k not in ("bos_token_id", "eos_token_id", "pad_token_id")}
    config = CLIPConfig(text_config=text, vision_config=cfg["vision"], projection_dim=cfg["projection_dim"])
    checker = StableDiffusionSafetyChecker(config).eval()
    with torch.no_grad():
        # Random concepts around a threshold near the typical cosine distance, so that
        # `adjustment` moves images across the line in tests.
        checker.concept_embeds.copy_(torch.randn_like(checker.concept_embeds))
        checker.special_care_embeds.copy_(torch.randn_like(checker.special_care_embeds))
        checker.concept_embeds_weights.copy_(0.3 + 0.05 * torch.randn_like(checker.concept_embeds_weights))
        checker.special_care_embeds_weights.copy_(0.3 + 0.05 * torch.randn_like(checker.special_care_embeds_weights))
    size = cfg["vision"]["image_size"]
    extractor = CLIPImageProcessor(
        crop_size={"height": size, "width": size},
        size={"shortest_edge": size},
        do_center_crop=True,
        do_resize=True,
        do_normalize=True,
        do_rescale=True,
        image_mean=[0.48145466, 0.4578275, 0.40821073],
        image_std=[0.26862954, 0.26130258, 0.27577711],
    )
    return checker, extractor


def _scheduler(cfg: dict[str, Any]):  # type: ignore[no-untyped-def]
    import diffusers

    params = {k: v for k, v in cfg.items() if k != "_class_name"}
    return getattr(diffusers, cfg["_class_name"]).from_config(params)


def build_pipeline(style: str = "sd1", tokenizer_dir: Path | None = None):  # type: ignore[no-untyped-def]
    """A fresh diffusers pipeline of `style` with deterministic random weights."""
    import tempfile

    import diffusers

    cfg = style_config(style)
    if tokenizer_dir is None:
        tokenizer_dir = Path(tempfile.mkdtemp(prefix="coreml-hub-tiny-tok-"))
    write_tokenizer_files(tokenizer_dir, VOCAB_SIZE)
    if style == "sdxl-refiner":
        return _build_refiner(cfg, load_clip_tokenizer(tokenizer_dir, pad_token=cfg["pad_token_2"]))
    tokenizer = load_clip_tokenizer(tokenizer_dir, pad_token=cfg["pad_token"])

    if style == "sd3":
        return _build_sd3(cfg, tokenizer, load_clip_tokenizer(tokenizer_dir, pad_token=cfg["pad_token_2"]))
    _seeded(1)
    unet = diffusers.UNet2DConditionModel(**cfg["unet"]).eval()
    _seeded(2)
    vae = diffusers.AutoencoderKL(**cfg["vae"]).eval()
    text_encoder = _text_encoder(cfg["text_encoder"], 3)
    scheduler = _scheduler(cfg["scheduler"])

    if style == "sdxl":
        text_encoder_2 = _text_encoder(cfg["text_encoder_2"], 4, with_projection=True)
        tokenizer_2 = load_clip_tokenizer(tokenizer_dir, pad_token=cfg["pad_token_2"])
        return diffusers.StableDiffusionXLPipeline(
            vae=vae,
            text_encoder=text_encoder,
            text_encoder_2=text_encoder_2,
            tokenizer=tokenizer,
            tokenizer_2=tokenizer_2,
            unet=unet,
            scheduler=scheduler,
            add_watermarker=False,
        )
    safety: dict[str, Any] = {"safety_checker": None, "feature_extractor": None, "requires_safety_checker": False}
    if style != INPAINT_STYLE and cfg["safety_checker"] is not None:
        checker, extractor = _safety_checker(cfg["safety_checker"])
        safety = {"safety_checker": checker, "feature_extractor": extractor, "requires_safety_checker": True}
    pipeline_class = diffusers.StableDiffusionInpaintPipeline if style == INPAINT_STYLE else diffusers.StableDiffusionPipeline
    return pipeline_class(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
                          **safety)


def _build_refiner(cfg: dict[str, Any], tokenizer_2: Any):  # type: ignore[no-untyped-def]
    import diffusers

    _seeded(7)
    unet = diffusers.UNet2DConditionModel(**cfg["unet"]).eval()
    _seeded(2)  # the base's seed and config: the same VAE weights, as the real pair shares its VAE
    vae = diffusers.AutoencoderKL(**cfg["vae"]).eval()
    text_encoder_2 = _text_encoder(cfg["text_encoder_2"], 4, with_projection=True)  # the base's too
    return diffusers.StableDiffusionXLImg2ImgPipeline(
        vae=vae, text_encoder=None, text_encoder_2=text_encoder_2, tokenizer=None, tokenizer_2=tokenizer_2,
        unet=unet, scheduler=_scheduler(cfg["scheduler"]), requires_aesthetics_score=True,
        force_zeros_for_empty_prompt=False, add_watermarker=False,
    )


def _build_sd3(cfg: dict[str, Any], tokenizer: Any, tokenizer_2: Any):  # type: ignore[no-untyped-def]
    import tempfile

    import diffusers
    import torch
    from transformers import T5Config, T5EncoderModel

    _seeded(1)
    transformer = diffusers.SD3Transformer2DModel(**cfg["transformer"]).eval()
    with torch.no_grad():  # diffusers starts the output projection at zero; random weights make real images
        transformer.proj_out.weight.normal_(0.0, 0.05)
        for block in transformer.transformer_blocks:
            for name, param in block.named_parameters():
                if "norm1" in name and param.abs().sum() == 0:
                    param.normal_(0.0, 0.05)
    _seeded(2)
    vae = diffusers.AutoencoderKL(**cfg["vae"]).eval()
    text_encoder = _text_encoder(cfg["text_encoder"], 3, with_projection=True)
    text_encoder_2 = _text_encoder(cfg["text_encoder_2"], 4, with_projection=True)
    _seeded(6)
    text_encoder_3 = T5EncoderModel(T5Config(**cfg["text_encoder_3"])).eval()
    t5_dir = Path(tempfile.mkdtemp(prefix="coreml-hub-tiny-t5-"))
    write_t5_tokenizer(t5_dir)
    return diffusers.StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=_scheduler(cfg["scheduler"]),
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        text_encoder_2=text_encoder_2,
        tokenizer_2=tokenizer_2,
        text_encoder_3=text_encoder_3,
        tokenizer_3=load_t5_tokenizer(t5_dir),
    )


def save_pipeline(pipe: Any, folder: Path, style: str) -> None:
    """Save like a Hub diffusers repo: safetensors weights plus CLIP `vocab.json`/`merges.txt`.

    transformers 5 saves a tokenizer as `tokenizer.json` only; the Stable Diffusion repos
    on the Hub carry the two BPE files as well, and so do these.
    """
    cfg = style_config(style)
    pipe.save_pretrained(folder, safe_serialization=True)
    names = [("tokenizer", cfg["pad_token"])] if "pad_token" in cfg else []
    if style in ("sdxl", "sdxl-refiner", "sd3"):
        names.append(("tokenizer_2", cfg["pad_token_2"]))
    for name, pad in names:
        write_tokenizer_files(folder / name, VOCAB_SIZE)
        write_tokenizer_config(folder / name, pad_token=pad)
    if style == "sd3":
        write_t5_tokenizer(folder / "tokenizer_3")


def controlnet_config(name: str) -> dict[str, Any]:
    """The plain-data description of a tiny ControlNet (it also keys the caches)."""
    style, offset = CONTROLNETS[name]
    return {"name": name, "style": style, "seed_offset": offset, "unet": style_config(style)["unet"],
            "conditioning_channels": list(CONTROLNET_CONDITIONING_CHANNELS), "output_std": CONTROLNET_OUTPUT_STD}


def build_controlnet(name: str):  # type: ignore[no-untyped-def]
    """A diffusers ControlNetModel for the tiny `name` (see CONTROLNETS), deterministic random weights."""
    import diffusers
    import torch

    cfg = controlnet_config(name)
    unet = diffusers.UNet2DConditionModel(**cfg["unet"])
    _seeded(cfg["seed_offset"])
    controlnet = diffusers.ControlNetModel.from_unet(
        unet, conditioning_embedding_out_channels=tuple(cfg["conditioning_channels"]), load_weights_from_unet=False)
    zero_initialized = [*controlnet.controlnet_down_blocks, controlnet.controlnet_mid_block,
                        controlnet.controlnet_cond_embedding.conv_out]
    with torch.no_grad():
        for module in zero_initialized:
            for param in module.parameters():
                param.copy_(cfg["output_std"] * torch.randn_like(param))
    return controlnet.eval()
