"""`coreml-hub app`: a local web app and an HTTP API over the same library calls as the CLI.

The pages (Library, Generate, Queue, Gallery) and the API (OpenAI-compatible
`/v1/images/generations`, `/v1/models`, job progress streams, the gallery as JSON) are served
by one Starlette application under uvicorn. Generation jobs run one after another on a worker
thread that keeps loaded pipelines warm between requests; pulls run on a second one.

Modules: jobs (queue, states, cancel, the event bus), warm (loaded pipelines per model),
requests (checking what a client asks for), work (what a job calls in the library),
gallery (images in the outputs folder and their PNG metadata), guard (token, host and body
checks), web (routes), server (bind and run). Nothing heavy is imported until a job needs it.
"""

from __future__ import annotations

import importlib
from typing import Any

_API = {
    "AppSettings": "server",
    "make_app": "web",
    "serve_app": "server",
}

__all__ = list(_API)


def __getattr__(name: str) -> Any:
    if name in _API:
        return getattr(importlib.import_module(f".{_API[name]}", __name__), name)
    raise AttributeError(f"module 'coreml_hub.app' has no attribute {name!r}")
