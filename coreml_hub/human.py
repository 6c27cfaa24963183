"""Numbers, sizes and times as people read them: `1.2 MB`, `3 files`, `2 days ago`.

Stdlib only, at the bottom of the layers, so the library's own messages (a pull that lacks disk
space, a conversion's progress) and the command line's tables print them the same way.
"""

from __future__ import annotations

from datetime import datetime, timezone


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
