"""Rendering: data on stdout as a table, JSON or bare ids; everything else on stderr."""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, Callable, Iterable, Sequence

import click


def human_size(num: float | int | None) -> str:
    """1234567 -> '1.2 MB' (decimal units, like the Hub)."""
    if num is None:
        return "-"
    value = float(num)
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(value) < 1000 or unit == "TB":
            return f"{int(value)} B" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1000
    return f"{value:.1f} TB"  # pragma: no cover


def plural(count: int, noun: str) -> str:
    """`1 file`, `3 files`."""
    return f"{count} {noun}{'' if count == 1 else 's'}"


def human_count(num: int | None) -> str:
    if num is None:
        return "-"
    for unit, size in (("M", 1_000_000), ("K", 1_000)):
        if num >= size:
            return f"{num / size:.1f}{unit}"
    return str(num)


def relative_time(when: datetime | str | None, now: datetime | None = None) -> str:
    """'3 days ago', 'just now'."""
    if when is None:
        return "-"
    if isinstance(when, str):
        when = datetime.fromisoformat(when.replace("Z", "+00:00"))
    if when.tzinfo is None:
        when = when.replace(tzinfo=timezone.utc)
    now = now or datetime.now(timezone.utc)
    seconds = int((now - when).total_seconds())
    if seconds < 0:
        return "in the future"
    for unit, size in (("year", 365 * 86400), ("month", 30 * 86400), ("week", 7 * 86400), ("day", 86400),
                       ("hour", 3600), ("minute", 60)):
        if seconds >= size:
            n = seconds // size
            return f"{plural(n, unit)} ago"
    return "just now"


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
