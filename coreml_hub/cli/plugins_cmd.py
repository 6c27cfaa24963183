"""`coreml-hub plugins`: what was loaded from the `coreml_hub` entry-point group."""

from __future__ import annotations

from typing import Any

import click

from .output import Column, Output


@click.command(
    "plugins",
    epilog="""\b
Examples:
  coreml-hub plugins
  coreml-hub plugins --json
  COREML_HUB_PLUGINS=apple,torch coreml-hub plugins     # load only these

\b
Plugins are Python distributions that declare an entry point in the group
`coreml_hub`; built-in layouts, backends and tasks register the same way. A plugin
that fails to import is reported and skipped.""",
)
@click.option("--json", "json_mode", is_flag=True, help="One record per plugin.")
@click.option("-q", "--quiet", is_flag=True, help="Print plugin names only.")
def plugins_cmd(json_mode: bool, quiet: bool) -> None:
    """List installed plugins: name, version, hooks and the distribution that provides each."""
    from ..errors import CoremlHubError
    from ..plugins import failures, installed, list_plugins, registered_by, restriction, unknown_requested

    unknown = unknown_requested()
    if unknown:
        names = ", ".join(repr(name) for name in unknown)
        raise CoremlHubError(f"{restriction()} names {names}, which no installed plugin provides.",
                             hint=f"Installed plugins: {', '.join(installed()) or 'none'}; fix or unset "
                                  "COREML_HUB_PLUGINS.")
    rows = [{"name": p.name, "version": p.version, "hooks": list(p.hooks), "distribution": p.distribution,
             "module": p.module, "status": "loaded", "error": None, **_provides(registered_by(p.name))}
            for p in list_plugins()]
    rows += [
        {"name": f.name, "version": None, "hooks": [], "distribution": None, "module": None, "status": "failed",
         "error": f.error, "layouts": [], "backends": [], "tasks": []}
        for f in failures()
    ]
    out = Output(json_mode=json_mode, quiet=quiet)
    if not rows and not json_mode:
        out.info("No plugins loaded.")
        return
    out.table(rows, [
        Column("name", "NAME"),
        Column("version", "VERSION", lambda v: v or "-"),
        Column("distribution", "DISTRIBUTION", lambda v: v or "-"),
        Column("status", "STATUS"),
        Column("hooks", "HOOKS", lambda v: ", ".join(v) or "-"),
        Column("provides", "PROVIDES"),
    ])


def _provides(found: dict[str, list[Any]]) -> dict[str, Any]:
    """Layouts, backends and tasks a plugin registers; a backend says whether it can run here and why."""
    layouts = [getattr(layout, "name", "?") for layout in found["layouts"]]
    tasks = [getattr(task, "name", "?") for task in found.get("tasks", [])]
    backends = []
    for backend in found["backends"]:
        answer = backend.available()
        # the contract is (bool, reason); a plain bool from a third-party backend still works
        ok, reason = answer if isinstance(answer, tuple) else (bool(answer), "")
        backends.append({"name": backend.name, "formats": list(getattr(backend, "formats", ())),
                         "available": ok, "reason": reason})
    parts = [f"layout {name}" for name in layouts]
    parts += [f"backend {b['name']} ({'available' if b['available'] else 'unavailable: ' + b['reason']})"
              for b in backends]
    parts += [f"task {name}" for name in tasks]
    return {"layouts": layouts, "backends": backends, "tasks": tasks, "provides": "; ".join(parts) or "-"}
