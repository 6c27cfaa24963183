"""Apple's file names for converted Stable Diffusion components."""

from __future__ import annotations

from pathlib import Path

from ..layouts import COMPILED_FILE_OF, CONTROLNET_DIR, CONTROLNET_PREFIX, PACKAGE_SUFFIX_OF, controlnet_bundle_name

ATTENTIONS = ("original", "split_einsum", "split_einsum_v2")
# Queries per chunk for split_einsum_v2; sequences no longer than this are not chunked.
DEFAULT_QUERY_CHUNK_SIZE = 512

# Components in the order they are converted (and listed). SD3 has `mmdit` (Apple's package suffix for
# its MultiModalDiffusionTransformer) in place of the Unet, and optionally `text_encoder_t5`.
COMPONENTS = ("text_encoder", "text_encoder_2", "text_encoder_t5", "unet", "mmdit", "vae_decoder", "vae_encoder",
              "safety_checker")
UNET_CHUNKS = ("unet_chunk1", "unet_chunk2")
# `--components controlnet`: only the ControlNets (the Unet that takes their residuals is the `unet` component)
CONTROLNET = "controlnet"


# Files a compiled variant carries beside its bundles (where Apple's Swift pipeline reads them):
# OUT/<this> -> compiled/<name>. SD3's T5 tokenizer lies flat as tokenizer.json + tokenizer_config.json.
COMPILED_RESOURCES = (
    ("tokenizer/vocab.json", "vocab.json"),
    ("tokenizer/merges.txt", "merges.txt"),
    ("tokenizer_3/tokenizer.json", "tokenizer.json"),
    ("tokenizer_3/tokenizer_config.json", "tokenizer_config.json"),
)

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


def copy_compiled_resources(out: Path, compiled_dir: Path) -> list[Path]:
    """Put the tokenizer files of a conversion output `out` beside its compiled bundles."""
    import shutil

    written = []
    for rel, name in COMPILED_RESOURCES:
        src = out / rel
        if src.is_file():
            shutil.copyfile(src, compiled_dir / name)
            written.append(compiled_dir / name)
    return written
