"""Who may read gated and private repos: bearer tokens listed in ROOT/.tokens or COREML_HUB_SERVE_TOKENS.

Public repos ignore the Authorization header entirely, so a client that carries its
huggingface.co token still reads the mirror.
"""

from __future__ import annotations

import os
from pathlib import Path

from .repos import TOKENS_FILE

ENV_TOKENS = "COREML_HUB_SERVE_TOKENS"


def accepted_tokens(root: Path) -> set[str]:
    """Read on every check so editing ROOT/.tokens takes effect without a restart."""
    tokens = {t.strip() for t in os.environ.get(ENV_TOKENS, "").split(",") if t.strip()}
    try:
        for line in (Path(root) / TOKENS_FILE).read_text().splitlines():
            line = line.strip()
            if line and not line.startswith("#"):
                tokens.add(line)
    except OSError:
        pass
    return tokens


def bearer(authorization: str | None) -> str | None:
    if not authorization:
        return None
    scheme, _, value = authorization.partition(" ")
    if scheme.lower() != "bearer" or not value.strip():
        return None
    return value.strip()
