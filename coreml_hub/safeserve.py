"""The rules every HTTP server of coreml-hub follows, so they exist once: `serve` and `app` both use them.

Files come only from under a root:

- `resolve_under(root, relpath)` maps a request path to a file or folder, or None. It refuses
  NULs, control characters, backslashes, empty, `.` and `..` segments, percent escapes still
  present after the one decoding the framework did (double encoding), names over 255 bytes,
  paths over 4096 bytes, and (unless `allow_hidden`) segments starting with ".". Symlinks are
  followed only when the real target lies inside the root, so a Hugging Face cache folder
  (snapshots link to `../../blobs/<sha>`) works as a root, while a link to `/etc/passwd` does not.
- `walk_under(root, folder)` lists the regular files under a folder by the same rules (links
  out of the root, dangling links, FIFOs, sockets and devices are left out; a link back up the
  tree is not followed twice). List with it and serve only what it listed, and a file is never
  served that a listing would not show.
- `links_out_of(root)` names the links that lead out of the root, for one warning at start.

Request bodies are bounded before they are read:

- `body_limit_check(content_length, limit, transfer_encoding=...)` runs on the headers alone:
  it returns the declared length, or None for a chunked body (then count with
  `body_size_check(received, limit)` while reading), and raises `BodyTooLarge` (413),
  `MalformedBody` (400) or `Refused` (501 for a transfer coding other than chunked).
  A refused body was not read: the server must close the connection after answering.

A 500 answer says only that an internal error happened and which request it was:
`new_request_id()` on every request (sent as `X-Request-Id`), `internal_error_message(id)` for
the client, `log_internal_error(id, what, exc)` for the server's stderr.

What an ASGI app (Starlette/FastAPI under uvicorn) must call: `resolve_under` (or the names
from `walk_under`) for every file route, then open only the returned path; `body_limit_check`
on the request's `content-length` / `transfer-encoding` before `await request.body()`, and
`body_size_check` on the running total when iterating `request.stream()`; answer
`err.status` with `err.message` for a `Refused`. uvicorn's `limit_concurrency` and
`timeout_keep_alive` take `DEFAULT_MAX_CONNECTIONS` and `DEFAULT_IDLE_TIMEOUT`.

Standard library only: this module sits beside errors.py and paths.py and imports nothing of
the project.
"""

from __future__ import annotations

import os
import re
import secrets
import stat
import sys
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator, TextIO

__all__ = [
    "DEFAULT_HEADER_TIMEOUT", "DEFAULT_IDLE_TIMEOUT", "DEFAULT_MAX_CONNECTIONS", "BodyTooLarge", "Found",
    "MalformedBody", "Refused", "body_limit_check", "body_size_check", "clean_parts", "header_safe",
    "internal_error_message", "links_out_of", "log_internal_error", "new_request_id", "resolve_under",
    "walk_under",
]

# Limits every server of the project starts with (each is an option of `serve`).
DEFAULT_HEADER_TIMEOUT = 20.0  # seconds from a request's first byte to the end of its headers
DEFAULT_IDLE_TIMEOUT = 60.0  # seconds a connection may wait for a request, or stall mid-body/mid-answer
DEFAULT_MAX_CONNECTIONS = 512  # open connections; one more gets 503

MAX_NAME_BYTES = 255  # what Linux and macOS file systems allow per name
MAX_PATH_BYTES = 4096

_ESCAPE = re.compile(r"%[0-9A-Fa-f]{2}")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_DIGITS = re.compile(r"[0-9]+")
_NOT_PRINTABLE_ASCII = re.compile(r"[^\x20-\x7e]")


# -- paths under a root --------------------------------------------------------------------------


def clean_parts(relpath: str, *, allow_hidden: bool = False) -> tuple[str, ...] | None:
    """The segments of a relative, already URL-decoded path, or None when any rule refuses it.

    "" is the root itself: (). Purely lexical; `resolve_under` adds what the disk says.
    """
    if not isinstance(relpath, str) or not relpath:
        return () if relpath == "" else None
    if _CONTROL.search(relpath) or "\\" in relpath or _ESCAPE.search(relpath):
        return None
    try:
        size = len(relpath.encode("utf-8"))  # lone surrogates (undecodable names) cannot be asked for
    except UnicodeEncodeError:
        return None
    if size > MAX_PATH_BYTES:
        return None
    parts = tuple(relpath.split("/"))
    for part in parts:
        if part in ("", ".", "..") or (part.startswith(".") and not allow_hidden):
            return None
        if len(part.encode("utf-8")) > MAX_NAME_BYTES:
            return None
    return parts


def _real_root(root: Path | str) -> str | None:
    try:
        real = os.path.realpath(root, strict=True)
    except (OSError, ValueError):
        return None
    return real if os.path.isdir(real) else None


def _inside(real: str, base: str, allow_hidden: bool) -> bool:
    """Whether `real` (a resolved path) is `base` or below it, with no hidden segment in between."""
    if real == base:
        return True
    prefix = base if base.endswith(os.sep) else base + os.sep
    if not real.startswith(prefix):
        return False
    # a link to ROOT/.tokens or a repo's .git is as private as the file itself
    return allow_hidden or not any(p.startswith(".") for p in real[len(prefix):].split(os.sep))


def resolve_under(root: Path | str, relpath: str, *, allow_hidden: bool = False) -> Path | None:
    """The real path that `relpath` names under `root`, when it exists and lies inside `root`; else None.

    `relpath` is posix-style and decoded once (what a framework hands a route). Open the returned
    path, never the joined one: it is the file that was checked.
    """
    parts = clean_parts(relpath, allow_hidden=allow_hidden)
    base = _real_root(root)
    if parts is None or base is None:
        return None
    try:
        real = os.path.realpath(os.path.join(base, *parts), strict=True)
    except (OSError, ValueError):  # missing, a dangling link, a loop of links
        return None
    return Path(real) if _inside(real, base, allow_hidden) else None


@dataclass(frozen=True)
class Found:
    """A regular file that `walk_under` listed."""

    path: str  # posix, relative to the folder walked
    real: Path  # the file itself (links resolved), inside the root
    size: int
    mtime_ns: int


def walk_under(root: Path | str, folder: str = "", *, allow_hidden: bool = False,
               on_escape: Callable[[str, str], None] | None = None) -> Iterator[Found]:
    """Every regular file under `root/folder` that `resolve_under` would also give, in name order.

    `on_escape(path from root, link text)` is called for each link that leads out of the root.
    """
    base = _real_root(root)
    start = resolve_under(root, folder, allow_hidden=allow_hidden)
    if base is None or start is None or not start.is_dir():
        return
    prefix = f"{folder.strip('/')}/" if folder.strip("/") else ""
    yield from _walk(base, str(start), "", prefix, frozenset({str(start)}), allow_hidden, on_escape)


def _walk(base: str, real_dir: str, rel: str, shown_prefix: str, ancestors: frozenset[str], allow_hidden: bool,
          on_escape: Callable[[str, str], None] | None) -> Iterator[Found]:
    try:
        with os.scandir(real_dir) as it:
            entries = sorted(it, key=lambda e: e.name)
    except OSError:
        return
    for entry in entries:
        if clean_parts(entry.name, allow_hidden=allow_hidden) is None:
            continue  # a name no request could name
        path = rel + entry.name
        full = os.path.join(real_dir, entry.name)
        try:
            if entry.is_symlink():
                try:
                    real = os.path.realpath(full, strict=True)
                except (OSError, ValueError):
                    continue  # dangling, or a loop of links
                if not _inside(real, base, allow_hidden):
                    if on_escape is not None:
                        on_escape(shown_prefix + path, _link_text(full))
                    continue
                st = os.stat(real)
            else:
                real = full
                st = entry.stat(follow_symlinks=False)
        except OSError:  # removed while walking
            continue
        if stat.S_ISDIR(st.st_mode):
            if real not in ancestors:  # a link to a folder above would never end
                yield from _walk(base, real, path + "/", shown_prefix, ancestors | {real}, allow_hidden, on_escape)
        elif stat.S_ISREG(st.st_mode):  # a FIFO would hang the reader; devices and sockets are not content
            yield Found(path=path, real=Path(real), size=st.st_size, mtime_ns=st.st_mtime_ns)


def _link_text(path: str) -> str:
    try:
        return os.readlink(path)
    except OSError:
        return "?"


def links_out_of(root: Path | str, *, allow_hidden: bool = False) -> list[tuple[str, str]]:
    """(path from root, link text) of every link under `root` that leads out of it (or to a hidden file)."""
    found: list[tuple[str, str]] = []
    for _ in walk_under(root, "", allow_hidden=allow_hidden, on_escape=lambda p, t: found.append((p, t))):
        pass
    return found


# -- request bodies ------------------------------------------------------------------------------


class Refused(Exception):
    """A request these rules refuse: answer `status` with `message` (safe to show) and close the connection."""

    status = 400
    code = "BadRequest"

    def __init__(self, message: str, *, status: int | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        if status is not None:
            self.status = status
        if code is not None:
            self.code = code


class BodyTooLarge(Refused):
    status = 413
    code = "PayloadTooLarge"


class MalformedBody(Refused):
    status = 400
    code = "BadRequest"


def body_limit_check(content_length: str | Iterable[str] | None, limit: int, *,
                     transfer_encoding: str | None = None) -> int | None:
    """Decide from the headers alone whether a body of at most `limit` bytes may be read.

    `content_length`: the header's value, or every value when it was sent more than once.
    Returns the length to read (0 when there is no body), or None for a chunked body: read it
    and call `body_size_check` on the running total. Raises `BodyTooLarge`, `MalformedBody`,
    or `Refused` (501) for a transfer coding other than chunked.
    """
    values = [content_length] if isinstance(content_length, str) else list(content_length or [])
    if transfer_encoding is not None and transfer_encoding.strip():
        if values:  # both framings at once is how requests are smuggled past proxies
            raise MalformedBody("A request may not carry both Content-Length and Transfer-Encoding.")
        codings = [c.strip().lower() for c in transfer_encoding.split(",") if c.strip()]
        if codings != ["chunked"]:
            raise Refused(f"Transfer-Encoding {header_safe(transfer_encoding)!r} is not supported; send "
                          "Content-Length or chunked.", status=501, code="NotImplemented")
        return None
    if not values:
        return 0
    items = [item.strip() for value in values for item in value.split(",")]
    if not items or not all(_DIGITS.fullmatch(item) for item in items):
        raise MalformedBody("Content-Length must be a number of bytes.")
    if any(len(item) > 18 for item in items):  # a valid number, only far too big (and int() of 10^5 digits is slow)
        raise BodyTooLarge(f"The request body may be at most {limit} bytes.")
    lengths = {int(item) for item in items}
    if len(lengths) != 1:
        raise MalformedBody("Content-Length was sent with different values.")
    length = lengths.pop()
    body_size_check(length, limit)
    return length


def body_size_check(received: int, limit: int) -> None:
    """Raise `BodyTooLarge` once a body (declared or counted so far) exceeds `limit` bytes."""
    if received > limit:
        raise BodyTooLarge(f"The request body may be at most {limit} bytes.")


# -- answers and the log -------------------------------------------------------------------------


def new_request_id() -> str:
    """A short random id, sent as `X-Request-Id` and named in the log next to any failure."""
    return secrets.token_hex(8)


def internal_error_message(request_id: str) -> str:
    """All a client learns about a failure inside the server."""
    return f"Internal error (request id {request_id}); the server's log has the details."


def log_internal_error(request_id: str, what: str, exc: BaseException, stream: TextIO | None = None) -> None:
    """The failure with its traceback on the server's stderr, named by the request id the client got."""
    out = stream if stream is not None else sys.stderr
    text = "".join(traceback.format_exception(exc))
    out.write(f"Error: request {request_id} ({header_safe(what)}) failed:\n{text}")
    out.flush()


def header_safe(text: str) -> str:
    """`text` with everything but printable ASCII escaped: no header or log line can be split or forged."""
    return _NOT_PRINTABLE_ASCII.sub(lambda m: m.group().encode("unicode_escape").decode("ascii"), text)
