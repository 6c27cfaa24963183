"""Open connections and what each is doing, so slow and idle clients cannot take the mirror down.

The mirror runs one thread per connection. A connection is *idle* while it waits for a request
(bounded by the idle timeout: its socket times out), *reading* from a request's first byte to the
end of its headers (bounded by the header timeout in total: a client sending one byte a second
never trips a per-read timeout, so a reaper thread cuts it off), then *busy* answering (each read
or write may stall at most the idle timeout). At most `max_connections` are open: a new one
first displaces the oldest idle one, and when every connection is working it gets 503 at once.
"""

from __future__ import annotations

import json
import socket
import threading
import time
from dataclasses import dataclass

from ..safeserve import (
    DEFAULT_HEADER_TIMEOUT,
    DEFAULT_IDLE_TIMEOUT,
    DEFAULT_MAX_CONNECTIONS,
    header_safe,
    new_request_id,
)

DRAIN_SECONDS = 1.0  # how long a refused connection is read (and discarded) so the client sees the 503, not a reset
MAX_DRAINING = 256  # refused connections being drained at once; more are closed at once


@dataclass(frozen=True)
class Limits:
    """How long a client may take and how many may be connected (`serve --header-timeout` etc.)."""

    header_timeout: float = DEFAULT_HEADER_TIMEOUT
    idle_timeout: float = DEFAULT_IDLE_TIMEOUT
    max_connections: int = DEFAULT_MAX_CONNECTIONS

    def __post_init__(self) -> None:
        if self.header_timeout <= 0 or self.idle_timeout <= 0 or self.max_connections < 1:
            raise ValueError(f"limits must be positive: {self}")


def _shutdown(sock: socket.socket, how: int) -> None:
    try:
        sock.shutdown(how)
    except OSError:  # already closed by its own thread, or the peer is gone
        pass


def refusal(status: int, message: str, retry_after: int | None = None) -> bytes:
    """A complete HTTP/1.1 error answer, for connections no handler thread will ever serve."""
    body = json.dumps({"error": message}).encode()
    reason = {503: "Service Unavailable"}.get(status, "Error")
    lines = [f"HTTP/1.1 {status} {reason}", "Content-Type: application/json; charset=utf-8",
             f"Content-Length: {len(body)}", f"X-Error-Message: {header_safe(message)}",
             f"X-Request-Id: {new_request_id()}", "Connection: close"]
    if retry_after is not None:
        lines.append(f"Retry-After: {retry_after}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


class Connections:
    """The table of open connections and the reaper thread that enforces header deadlines."""

    def __init__(self, limits: Limits) -> None:
        self.limits = limits
        self._lock = threading.Lock()
        self._count = 0
        self._idle: dict[socket.socket, float] = {}  # insertion order = oldest first
        self._reading: dict[socket.socket, float] = {}  # header deadline (monotonic)
        self._draining: dict[socket.socket, float] = {}
        self._stop = threading.Event()
        self._tick = min(0.5, max(0.02, min(limits.header_timeout, limits.idle_timeout) / 8))
        self._reaper = threading.Thread(target=self._reap, name="mirror-reaper", daemon=True)
        self._reaper.start()

    @property
    def count(self) -> int:
        return self._count

    # -- the accept loop ---------------------------------------------------------------------------

    def admit(self) -> bool:
        """Take a slot for a new connection, displacing the oldest idle one when full; False when none is free."""
        with self._lock:
            if self._count >= self.limits.max_connections:
                if not self._idle:
                    return False
                oldest = next(iter(self._idle))
                del self._idle[oldest]
                _shutdown(oldest, socket.SHUT_RDWR)  # its thread sees the end of the stream and leaves
            self._count += 1
            return True

    def refuse(self, sock: socket.socket) -> None:
        """Answer 503 without a thread; the reaper reads what the client sends for a moment, then closes."""
        try:
            sock.setblocking(False)
            sock.send(refusal(503, "The mirror has too many connections; try again in a moment.", retry_after=1))
            sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass
        with self._lock:
            if len(self._draining) < MAX_DRAINING:
                self._draining[sock] = time.monotonic() + DRAIN_SECONDS
                return
        sock.close()

    def release(self, sock: socket.socket) -> None:
        """The connection's thread is done with it (the socket is closed or about to be)."""
        with self._lock:
            self._idle.pop(sock, None)
            self._reading.pop(sock, None)
            self._count -= 1

    # -- a connection's thread -------------------------------------------------------------------

    def idle(self, sock: socket.socket) -> None:
        with self._lock:
            self._idle.pop(sock, None)
            self._idle[sock] = time.monotonic()

    def reading(self, sock: socket.socket, *, was_idle: bool = True) -> bool:
        """A request began; False when the connection, registered idle, was displaced meanwhile."""
        with self._lock:
            if self._idle.pop(sock, None) is None and was_idle:
                return False
            self._reading[sock] = time.monotonic() + self.limits.header_timeout
            return True

    def busy(self, sock: socket.socket) -> bool:
        """The headers are in; False when the header deadline passed first (the reaper cut the connection)."""
        with self._lock:
            return self._reading.pop(sock, None) is not None

    # -- the reaper ------------------------------------------------------------------------------

    def _reap(self) -> None:
        while not self._stop.wait(self._tick):
            now = time.monotonic()
            with self._lock:
                late = [s for s, deadline in self._reading.items() if deadline <= now]
                for sock in late:
                    del self._reading[sock]
                    _shutdown(sock, socket.SHUT_RD)  # its blocked read ends; its thread answers 408
                draining = list(self._draining.items())
            for sock, deadline in draining:
                if self._drained(sock) or deadline <= now:
                    with self._lock:
                        self._draining.pop(sock, None)
                    sock.close()

    @staticmethod
    def _drained(sock: socket.socket) -> bool:
        try:
            for _ in range(16):  # at most 1 MiB a tick: a client that floods is closed at its deadline
                if not sock.recv(65536):
                    return True
        except BlockingIOError:
            return False
        except OSError:
            return True
        return False

    def close(self) -> None:
        self._stop.set()
        self._reaper.join(timeout=5)
        with self._lock:
            draining = list(self._draining)
            self._draining.clear()
        for sock in draining:
            sock.close()
