"""coreml-hub: find, pull, verify, convert and run Core ML models (Stable Diffusion, and the rest of library=coreml).

The public Python API. Every name loads its module on first use, so importing
`coreml_hub` stays cheap (no torch, no coremltools).
"""

from __future__ import annotations

import importlib
import os as _os
from typing import Any

from .version import __version__

# public name -> module that defines it
_API = {
    "CoremlHubError": "errors",
    "Variant": "layouts",
    "RepoFile": "layouts",
    "find_variants": "layouts",
    "search_models": "hub",
    "repo_variants": "hub",
    "pull": "store",
    "list_pulled": "store",
    "find_pulled": "store",
    "PulledVariant": "store",
    "remove": "store",
    "prune": "store",
    "plan_pull": "pulling",
    "verify": "bundle",
    "load_model": "mil",
    "convert": "convert",
    "generate": "pipeline",
    "predict": "prediction",
    "run": "tasks",
}

__all__ = ["__version__", *_API]

if _os.environ.get("COREML_HUB_COREMLTOOLS", "").strip().lower() in ("1", "true", "yes", "on"):
    # coremltools' MLModel.predict through the portable runtime, once coremltools is imported
    from .coremltools_compat import install_when_imported as _install_when_imported

    _install_when_imported()


def __getattr__(name: str) -> Any:
    if name in _API:
        module = importlib.import_module(f".{_API[name]}", __name__)
        return getattr(module, name)
    raise AttributeError(f"module 'coreml_hub' has no attribute {name!r}")
