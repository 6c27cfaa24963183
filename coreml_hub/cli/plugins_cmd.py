"""`coreml-hub plugins`: what was loaded from the `coreml_hub` entry-point group."""

from __future__ import annotations

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
`coreml_hub`; built-in layouts and backends register the same way. A plugin
that fails to import is reported and skipped.""",
)
@click.option("--json", "json_mode", is_flag=True, help="One record per plugin.")
@click.option("-q", "--quiet", is_flag=True, help="Print plugin names only.")
def plugins_cmd(json_mode: bool, quiet: bool) -> None:
    """List installed plugins: name, version, hooks and the distribution that provides each."""
    from ..plugins import failures, list_plugins

    rows = [
        {"name": p.name, "version": p.version, "hooks": list(p.hooks), "distribution": p.distribution,
         "module": p.module, "status": "loaded", "error": None}
        for p in list_plugins()
    ]
    rows += [
        {"name": f.name, "version": None, "hooks": [], "distribution": None, "module": None, "status": "failed",
         "error": f.error}
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
    ])
