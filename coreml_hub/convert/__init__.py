"""diffusers Stable Diffusion pipelines -> Core ML packages with Apple's names and I/O contract.

Importing this package is cheap; torch, diffusers and coremltools load when `convert` runs.
"""

from __future__ import annotations

from .api import ComponentResult, ConversionResult, convert

__all__ = ["convert", "ConversionResult", "ComponentResult"]
