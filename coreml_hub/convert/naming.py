"""Apple's file names for converted Stable Diffusion components."""

from __future__ import annotations

from pathlib import Path

from ..layouts import COMPILED_FILE_OF, CONTROLNET_DIR, CONTROLNET_PREFIX, PACKAGE_SUFFIX_OF, controlnet_bundle_name

ATTENTIONS = ("original", "split_einsum", "split_einsum_v2")
# Queries per chunk for split_einsum_v2; sequences no longer than this are not chunked.
DEFAULT_QUERY_CHUNK_SIZE = 512

# Components in the order they are converted (and listed).
COMPONENTS = ("text_encoder", "text_encoder_2", "unet", "vae_decoder", "vae_encoder", "safety_checker")
UNET_CHUNKS = ("unet_chunk1", "unet_chunk2")
# `--components controlnet`: only the ControlNets (the Unet that takes their residuals is the `unet` component)
CONTROLNET = "controlnet"


def version_slug(model_version: str) -> str:
    """`runwayml/stable-diffusion-v1-5` -> `runwayml_stable-diffusion-v1-5`."""
    return model_version.replace("/", "_")


def package_name(model_version: str, component: str) -> str:
    """`Stable_Diffusion_version_<org>_<name>_<component>.mlpackage`, as Apple's converter names it
    (`controlled_unet` is written `control-unet`, as torch2coreml's `--unet-support-controlnet` does)."""
    suffix = PACKAGE_SUFFIX_OF.get(component, component)
    return f"Stable_Diffusion_version_{version_slug(model_version)}_{suffix}.mlpackage"


def compiled_name(component: str) -> str:
    """`unet_chunk1` -> `UnetChunk1.mlmodelc`."""
    return f"{COMPILED_FILE_OF[component]}.mlmodelc"


def controlnet_package_name(controlnet_id: str) -> str:
    """`lllyasviel/sd-controlnet-canny` -> `ControlNet_lllyasviel_sd-controlnet-canny.mlpackage`."""
    return f"{CONTROLNET_PREFIX}{version_slug(controlnet_id)}.mlpackage"


def controlnet_compiled_path(controlnet_id: str) -> str:
    """`lllyasviel/sd-controlnet-canny` -> `controlnet/LllyasvielSdControlnetCanny.mlmodelc`."""
    return f"{CONTROLNET_DIR}/{controlnet_bundle_name(controlnet_id)}.mlmodelc"


def compiled_path(component: str, package: Path) -> str:
    """Where a converted package goes in Apple's compiled layout, relative to the compiled folder:
    `Unet.mlmodelc`, `ControlledUnetChunk1.mlmodelc`, `controlnet/<Name>.mlmodelc`."""
    if component == CONTROLNET:
        return controlnet_compiled_path(package.stem.removeprefix(CONTROLNET_PREFIX))
    return compiled_name(component)
