"""Test and benchmark fixtures: tiny random-weight Stable Diffusion pipelines, their Core ML
conversions (cached on disk), Hub repo layouts built from them, and compiled-bundle fixtures.

    from coreml_hub.testing import tiny_pipeline, converted, publish
    pipe, folder = tiny_pipeline("sd1")
    out = converted("sd1", "split_einsum", "fp16")
"""

from __future__ import annotations

from .factory import (
    cache_dir,
    components_of,
    converted,
    model_version,
    package,
    pipeline_folder,
    tiny_pipeline,
)
from .tiny import LATENT, MODEL_VERSIONS, STYLES, VOCAB_SIZE

__all__ = [
    "LATENT",
    "MODEL_VERSIONS",
    "STYLES",
    "VOCAB_SIZE",
    "cache_dir",
    "components_of",
    "converted",
    "model_version",
    "package",
    "pipeline_folder",
    "tiny_pipeline",
]
