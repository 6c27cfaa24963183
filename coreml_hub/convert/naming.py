"""Apple's file names for converted Stable Diffusion components."""

from __future__ import annotations

from ..layouts import COMPILED_FILE_OF

ATTENTIONS = ("original", "split_einsum", "split_einsum_v2")
# Queries per chunk for split_einsum_v2; sequences no longer than this are not chunked.
DEFAULT_QUERY_CHUNK_SIZE = 512

# Components in the order they are converted (and listed).
COMPONENTS = ("text_encoder", "text_encoder_2", "unet", "vae_decoder", "vae_encoder", "safety_checker")
UNET_CHUNKS = ("unet_chunk1", "unet_chunk2")

def version_slug(model_version: str) -> str:
    """`runwayml/stable-diffusion-v1-5` -> `runwayml_stable-diffusion-v1-5`."""
    return model_version.replace("/", "_")


def package_name(model_version: str, component: str) -> str:
    """`Stable_Diffusion_version_<org>_<name>_<component>.mlpackage`, as Apple's converter names it."""
    return f"Stable_Diffusion_version_{version_slug(model_version)}_{component}.mlpackage"


def compiled_name(component: str) -> str:
    """`unet_chunk1` -> `UnetChunk1.mlmodelc`."""
    return f"{COMPILED_FILE_OF[component]}.mlmodelc"
