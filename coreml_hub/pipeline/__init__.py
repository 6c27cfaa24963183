"""Text-to-image and image-to-image over Core ML components, whatever backend runs them.

`generate(model, prompt, ...)` is the one call `coreml-hub run` makes. The modules:
tokenizer (CLIP BPE), schedulers (diffusers', configured from the model), components
(bundles in a folder, loaded through a backend), diffusion (the denoising loop), safety,
images, png (metadata and atomic, never-overwriting files), resolve (MODEL -> folder).
Nothing heavy is imported until a function needs it.
"""

from __future__ import annotations

import importlib
from typing import Any

_API = {
    "generate": "generate",
    "load_pipeline": "generate",
    "RunResult": "generate",
    "SavedImage": "generate",
    "StepProgress": "generate",
    "StableDiffusion": "diffusion",
    "resolve_model": "resolve",
    "select_backend": "components",
    "ImageMetadata": "png",
    "SCHEDULERS": "schedulers",
}

__all__ = list(_API)


def __getattr__(name: str) -> Any:
    if name in _API:
        return getattr(importlib.import_module(f".{_API[name]}", __name__), name)
    raise AttributeError(f"module 'coreml_hub.pipeline' has no attribute {name!r}")
