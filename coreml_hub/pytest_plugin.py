"""pytest plugin: `coremltools.models.MLModel(...).predict` on Linux in a test suite.

    pytest -p coreml_hub.pytest_plugin          # install for this run
    COREML_HUB_COREMLTOOLS=1 pytest             # the same, without the flag

With `-p` it installs `coreml_hub.coremltools_compat` (see there) when pytest starts.
The plugin is also registered for every pytest run (entry point `pytest11`), where it
installs only when COREML_HUB_COREMLTOOLS=1 and otherwise does nothing: importing this
module imports neither coremltools nor torch.
"""

from __future__ import annotations

import sys
from typing import Any

ENTRY_POINT_NAME = "coreml_hub.pytest_plugin"


def _asked_for_explicitly(config: Any) -> bool:
    """Whether `-p coreml_hub.pytest_plugin` was given (rather than only the entry point loading it)."""
    args = list(getattr(getattr(config, "invocation_params", None), "args", ()) or ())
    args += list(getattr(config.option, "plugins", None) or ())
    return any(str(a).removeprefix("-p").strip() == ENTRY_POINT_NAME for a in args)


def pytest_configure(config: Any) -> None:
    from .coremltools_compat import enabled_by_environment, install_when_imported

    if enabled_by_environment() or _asked_for_explicitly(config):
        install_when_imported()


def pytest_report_header(config: Any) -> str | None:
    from .coremltools_compat import armed, installed

    if installed() or armed():
        return "coreml-hub: coremltools' MLModel.predict runs on the portable ML Program runtime"
    return None
