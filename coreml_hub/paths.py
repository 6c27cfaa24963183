"""Where coreml-hub keeps things on disk. `COREML_HUB_HOME` overrides the platform default."""

from __future__ import annotations

import os
from pathlib import Path

APP_NAME = "coreml-hub"


def home() -> Path:
    """Root of the local store: `$COREML_HUB_HOME`, else the platform's user cache dir."""
    override = os.environ.get("COREML_HUB_HOME")
    if override:
        return Path(override).expanduser()
    import platformdirs

    return Path(platformdirs.user_cache_dir(APP_NAME, appauthor=False))


def models_dir() -> Path:
    """Complete, verified variants."""
    return home() / "models"


def staging_dir() -> Path:
    """Downloads and extractions in progress; never read by `ls`, `run` or `verify`."""
    return home() / "staging"


def locks_dir() -> Path:
    return home() / "locks"


def outputs_dir() -> Path:
    """Default folder for generated images when `-o` is not given."""
    override = os.environ.get("COREML_HUB_OUTPUTS")
    if override:
        return Path(override).expanduser()
    return Path.cwd() / "coreml-hub-outputs"


def debug() -> bool:
    return os.environ.get("COREML_HUB_DEBUG", "") not in ("", "0", "false")
