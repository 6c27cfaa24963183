"""Plugin discovery: entry points of group `coreml_hub`, loaded lazily and once.

The core never imports a plugin by name. `COREML_HUB_PLUGINS=a,b` restricts loading
to the named entry points; a plugin that fails to import is reported and skipped.
"""

from __future__ import annotations

import os
import sys
import threading
from dataclasses import dataclass
from importlib import metadata
from typing import TYPE_CHECKING, Any

import pluggy

from . import hookspecs

if TYPE_CHECKING:
    from .layouts import Layout
    from .tasks import Task

GROUP = "coreml_hub"

pm = pluggy.PluginManager(GROUP)
pm.add_hookspecs(hookspecs)

_loaded = False
_lock = threading.Lock()


@dataclass(frozen=True)
class PluginInfo:
    name: str
    hooks: tuple[str, ...]
    version: str | None = None
    distribution: str | None = None
    module: str | None = None


@dataclass(frozen=True)
class _Failure:
    """A plugin that failed to import, and why."""

    name: str
    error: str


_failures: list[_Failure] = []
_dists: dict[str, tuple[str | None, str | None]] = {}


ENV = "COREML_HUB_PLUGINS"


def _allowed() -> set[str] | None:
    raw = os.environ.get(ENV)
    if raw is None:
        return None
    return {part.strip() for part in raw.split(",") if part.strip()}


def installed() -> list[str]:
    """Names of every entry point in the group, loaded or not (nothing is imported)."""
    return sorted({ep.name for ep in metadata.entry_points(group=GROUP)})


def excluded() -> list[str]:
    """Installed plugins that COREML_HUB_PLUGINS leaves out (none when it is unset)."""
    allowed = _allowed()
    return [] if allowed is None else [name for name in installed() if name not in allowed]


def unknown_requested() -> list[str]:
    """Names in COREML_HUB_PLUGINS that no installed plugin has (a typo, or a plugin not installed)."""
    allowed = _allowed()
    return [] if allowed is None else sorted(allowed - set(installed()))


def restriction() -> str | None:
    """`COREML_HUB_PLUGINS=a,b` as set now, for messages; None when it is unset."""
    raw = os.environ.get(ENV)
    return None if raw is None else f"{ENV}={raw}"


def load_plugins() -> None:
    """Import every allowed entry point once; later calls return at once."""
    global _loaded
    if _loaded:
        return
    with _lock:
        if _loaded:
            return
        allowed = _allowed()
        for ep in metadata.entry_points(group=GROUP):
            if allowed is not None and ep.name not in allowed:
                continue
            if pm.has_plugin(ep.name):
                continue
            try:
                module = ep.load()
            except Exception as exc:  # a broken plugin must not take the tool down
                _failures.append(_Failure(ep.name, f"{type(exc).__name__}: {exc}"))
                print(f"Warning: plugin {ep.name!r} failed to load ({type(exc).__name__}: {exc}); skipped.",
                      file=sys.stderr)
                continue
            pm.register(module, name=ep.name)
            dist = getattr(ep, "dist", None)
            _dists[ep.name] = (dist.version if dist else None, dist.metadata["Name"] if dist else None)
        unknown = unknown_requested()
        if unknown:
            print(f"Warning: {restriction()} names {', '.join(map(repr, unknown))}, which no installed plugin "
                  f"provides (installed: {', '.join(installed()) or 'none'}).", file=sys.stderr)
        _loaded = True


def failures() -> list[_Failure]:
    load_plugins()
    return list(_failures)


def list_plugins() -> list[PluginInfo]:
    """Loaded plugins with the hooks each implements, sorted by name."""
    load_plugins()
    infos = []
    for plugin in pm.get_plugins():
        name = pm.get_name(plugin)
        hooks = tuple(sorted(h.name for h in pm.get_hookcallers(plugin) or []))
        version, dist = _dists.get(name, (None, None))
        infos.append(PluginInfo(name=name, hooks=hooks, version=version, distribution=dist,
                                module=getattr(plugin, "__name__", None)))
    return sorted(infos, key=lambda p: p.name)


def _collect(hook_name: str) -> list[Any]:
    load_plugins()
    found: list[Any] = []
    getattr(pm.hook, hook_name)(register=found.append)
    return found


def registered_by(name: str) -> dict[str, list[Any]]:
    """What one loaded plugin registers: {"layouts": [...], "backends": [...], "tasks": [...]}."""
    load_plugins()
    plugin = pm.get_plugin(name)
    found: dict[str, list[Any]] = {"layouts": [], "backends": [], "tasks": []}
    for hook, key in (("register_layouts", "layouts"), ("register_backends", "backends"),
                      ("register_tasks", "tasks")):
        impl = getattr(plugin, hook, None)
        if callable(impl):
            impl(register=found[key].append)
    return found


def get_layouts() -> list[Layout]:
    """Layout objects from every plugin, in registration order."""
    return _collect("register_layouts")


def get_backends() -> dict[str, Any]:
    """Backends by name."""
    return {backend.name: backend for backend in _collect("register_backends")}


def get_tasks() -> list[Task]:
    """Task objects from every plugin, in registration order."""
    return _collect("register_tasks")


def _reset_for_tests() -> None:
    """Forget every loaded plugin so the next use rediscovers entry points (test isolation only)."""
    global _loaded
    with _lock:
        for plugin in list(pm.get_plugins()):
            pm.unregister(plugin)
        _failures.clear()
        _dists.clear()
        _loaded = False
