"""Rendering: data on stdout as a table, JSON or bare ids; everything else on stderr."""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Callable, Iterable, Sequence

import click

from ..human import human_count, human_size, plural, relative_time

__all__ = ["Column", "Output", "format_table", "human_count", "human_size", "plural", "relative_time",
           "stderr_is_tty"]


@dataclass(frozen=True)
class Column:
    key: str
    header: str
    render: Callable[[Any], str] = str


class Output:
    """One renderer per command: table (default), --json, or --quiet (first column only)."""

    def __init__(self, json_mode: bool = False, quiet: bool = False) -> None:
        self.json_mode = json_mode
        self.quiet = quiet

    def table(self, rows: Sequence[dict[str, Any]], columns: Sequence[Column]) -> None:
        if self.json_mode:
            self.json(list(rows))
            return
        if self.quiet:
            for row in rows:
                click.echo(row[columns[0].key])
            return
        click.echo(format_table(rows, columns))

    def json(self, data: Any) -> None:
        click.echo(json.dumps(data, indent=2, default=_json_default))

    def info(self, message: str) -> None:
        if not self.quiet:
            click.echo(message, err=True)

    @staticmethod
    def warn(message: str) -> None:
        click.echo(f"Warning: {message}", err=True)


def format_table(rows: Iterable[dict[str, Any]], columns: Sequence[Column]) -> str:
    """Borderless, upper-case headers, columns padded to the widest cell."""
    cells = [[c.header.upper() for c in columns]]
    for row in rows:
        cells.append([c.render(row.get(c.key)) for c in columns])
    widths = [max(len(r[i]) for r in cells) for i in range(len(columns))]
    lines = ["   ".join(cell.ljust(w) for cell, w in zip(r, widths)).rstrip() for r in cells]
    return "\n".join(lines)


def _json_default(obj: Any) -> Any:
    if isinstance(obj, datetime):
        return obj.isoformat()
    if hasattr(obj, "to_dict"):
        return obj.to_dict()
    if hasattr(obj, "__fspath__"):
        return str(obj)
    raise TypeError(f"not JSON serializable: {type(obj).__name__}")


def stderr_is_tty() -> bool:
    return sys.stderr.isatty()
