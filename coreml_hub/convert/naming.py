"""Apple's file names for converted Stable Diffusion components."""

from __future__ import annotations

ATTENTIONS = ("original", "split_einsum", "split_einsum_v2")
# Queries per chunk for split_einsum_v2; sequences no longer than this are not chunked.
DEFAULT_QUERY_CHUNK_SIZE = 512

# Components in the order they are converted (and listed).
COMPONENTS = ("text_encoder", "text_encoder_2", "unet", "vae_decoder", "vae_encoder", "safety_checker")
UNET_CHUNKS = ("unet_chunk1", "unet_chunk2")

# Component -> compiled bundle name in Apple's Swift layout.
COMPILED_NAMES = {
    "text_encoder": "TextEncoder",
    "text_encoder_2": "TextEncoder2",
    "unet": "Unet",
    "unet_chunk1": "UnetChunk1",
    "unet_chunk2": "UnetChunk2",
    "vae_decoder": "VAEDecoder",
    "vae_encoder": "VAEEncoder",
    "safety_checker": "SafetyChecker",
}


def version_slug(model_version: str) -> str:
    """`runwayml/stable-diffusion-v1-5` -> `runwayml_stable-diffusion-v1-5`."""
    return model_version.replace("/", "_")


def package_name(model_version: str, component: str) -> str:
    """`Stable_Diffusion_version_<org>_<name>_<component>.mlpackage`, as Apple's converter names it."""
    return f"Stable_Diffusion_version_{version_slug(model_version)}_{component}.mlpackage"


def compiled_name(component: str) -> str:
    """`unet_chunk1` -> `UnetChunk1.mlmodelc`."""
    return f"{COMPILED_NAMES[component]}.mlmodelc"
