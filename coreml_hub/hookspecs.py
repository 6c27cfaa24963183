"""Hook specifications for coreml-hub plugins (entry-point group `coreml_hub`)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable

import pluggy

if TYPE_CHECKING:
    from .bundle import Bundle, Problem

hookspec = pluggy.HookspecMarker("coreml_hub")
hookimpl = pluggy.HookimplMarker("coreml_hub")


@hookspec
def register_layouts(register: Callable[[Any], None]) -> None:
    """Register layout objects that find variants in a repo's file list."""


@hookspec
def register_backends(register: Callable[[Any], None]) -> None:
    """Register backends that load Core ML components and predict with them."""


@hookspec
def register_tasks(register: Callable[[Any], None]) -> None:
    """Register tasks that recognize a model and own what `coreml-hub run` does with it."""


@hookspec
def register_commands(cli: Any) -> None:
    """Add click commands to the `coreml-hub` group."""


@hookspec
def validate_bundle(bundle: "Bundle") -> "list[Problem]":
    """Return extra problems found in a pulled or local variant."""
