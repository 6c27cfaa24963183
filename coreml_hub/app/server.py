"""Binding and running the app under uvicorn; the refusal to listen beyond this machine without a token."""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import socket
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from ..errors import CoremlHubError, UsageError
from ..safeserve import DEFAULT_HEADER_TIMEOUT, DEFAULT_IDLE_TIMEOUT, DEFAULT_MAX_CONNECTIONS
from .guard import is_loopback

TOKEN_ENV = "COREML_HUB_APP_TOKEN"
MIN_TOKEN_LENGTH = 16


@dataclass(frozen=True)
class AppSettings:
    outputs: Path
    host: str = "127.0.0.1"
    port: int = 7860
    token: str | None = None
    max_models: int | None = None
    preview_every: int = 5
    max_waiting: int = 64
    allowed_hosts: tuple[str, ...] = ()
    header_timeout: float = DEFAULT_HEADER_TIMEOUT  # the limits every server of the project starts with
    idle_timeout: float = DEFAULT_IDLE_TIMEOUT
    max_connections: int = DEFAULT_MAX_CONNECTIONS


def new_token() -> str:
    return secrets.token_urlsafe(24)


def check_token(host: str, token: str | None) -> str | None:
    """The token the app will require; refuses a non-loopback address without one."""
    if token is not None:
        token = token.strip()
        if len(token) < MIN_TOKEN_LENGTH:
            raise UsageError(f"The token is {len(token)} characters long; use at least {MIN_TOKEN_LENGTH}.",
                             hint="Pass --token alone to have one made for you.")
        if any(c.isspace() or not c.isprintable() or c in ";," for c in token):
            raise UsageError("The token must be printable, without spaces, commas or semicolons.")
        return token
    if not is_loopback(host):
        raise UsageError(f"Listening on {host} lets other machines use this app, so it needs a token.",
                         hint=f"Add --token (one is made and printed), or set {TOKEN_ENV}; "
                              "or leave --host at 127.0.0.1.")
    return None


def bind(host: str, port: int) -> socket.socket:
    """A listening socket (port 0 picks a free one)."""
    family = socket.AF_INET6 if ":" in host.strip("[]") else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host.strip("[]"), port))
        sock.listen(2048)
    except OSError as exc:
        sock.close()
        raise CoremlHubError(f"Cannot listen on {host}:{port}: {exc.strerror or exc}",
                             hint="Pick another --port, or --port 0 for a free one.") from None
    sock.set_inheritable(True)
    return sock


def url_of(sock: socket.socket, host: str) -> str:
    port = sock.getsockname()[1]
    shown = "127.0.0.1" if host in ("0.0.0.0", "") else ("[::1]" if host in ("::", "[::]") else host)
    if ":" in shown and not shown.startswith("["):
        shown = f"[{shown}]"
    return f"http://{shown}:{port}"


def header_timeout_protocol(seconds: float) -> type:
    """uvicorn's HTTP/1.1 protocol, with a limit on how long a request's headers may take.

    uvicorn itself waits for headers forever, so a client that connects and sends nothing (or one
    byte a second) would hold its connection for good, and enough of them would fill the connection
    cap for everyone. Here a connection that has not sent a whole request head within `seconds` of
    connecting (or of its previous answer) is closed.
    """
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class HeaderTimeoutProtocol(H11Protocol):
        _header_timer: asyncio.TimerHandle | None = None

        def connection_made(self, transport: Any) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self._arm()

        def data_received(self, data: bytes) -> None:
            if self.cycle is None or self.cycle.response_complete:
                self._arm()  # the head of a new request is coming in
            super().data_received(data)
            if self.cycle is not None and not self.cycle.response_complete:
                self._disarm()  # it has arrived whole

        def on_response_complete(self) -> None:
            super().on_response_complete()
            if self.cycle is None or self.cycle.response_complete:
                self._disarm()  # waiting for the next request is the keep-alive timeout's business

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm()
            super().connection_lost(exc)

        def send_400_response(self, msg: str) -> None:
            # called while h11's error is being handled: it knows whether the request was malformed (400)
            # or asked for what no server here does, such as a transfer coding other than chunked (501)
            import h11

            error = sys.exc_info()[1]
            status = getattr(error, "error_status_hint", 400) if isinstance(error, h11.RemoteProtocolError) else 400
            text = str(error) if isinstance(error, h11.RemoteProtocolError) and str(error) else msg
            body = json.dumps({"error": {"message": text, "type": "invalid_request_error", "param": None,
                                         "code": None}}).encode()
            for event in (h11.Response(status_code=status, headers=[(b"content-type", b"application/json"),
                                                                    (b"connection", b"close")]),
                          h11.Data(data=body), h11.EndOfMessage()):
                self.transport.write(self.conn.send(event))
            self.transport.close()

        def _arm(self) -> None:
            if self._header_timer is None:
                self._header_timer = self.loop.call_later(seconds, self._expired)

        def _disarm(self) -> None:
            if self._header_timer is not None:
                self._header_timer.cancel()
                self._header_timer = None

        def _expired(self) -> None:
            self._header_timer = None
            if (self.cycle is None or self.cycle.response_complete) and not self.transport.is_closing():
                self.transport.close()

    return HeaderTimeoutProtocol


def serve_app(settings: AppSettings, *, on_ready: Callable[[str], None] | None = None) -> None:
    """Serve until Ctrl-C or SIGTERM; `on_ready(url)` once the socket accepts connections."""
    import uvicorn

    from .web import AppConfig, make_app

    token = check_token(settings.host, settings.token)
    settings.outputs.mkdir(parents=True, exist_ok=True)
    sock = bind(settings.host, settings.port)
    config = AppConfig(outputs=settings.outputs.resolve(), token=token, host=settings.host,
                       allowed_hosts=settings.allowed_hosts,
                       max_models=settings.max_models, preview_every=settings.preview_every,
                       max_waiting=settings.max_waiting)
    app = make_app(config)
    uv_config = uvicorn.Config(app, log_level=os.environ.get("COREML_HUB_APP_LOG_LEVEL", "warning"),
                               access_log=False, timeout_graceful_shutdown=3, lifespan="on",
                               server_header=False, h11_max_incomplete_event_size=64 * 1024,
                               limit_concurrency=settings.max_connections,
                               timeout_keep_alive=max(1, round(settings.idle_timeout)),
                               http=header_timeout_protocol(settings.header_timeout))
    server = uvicorn.Server(uv_config)
    if on_ready is not None:
        url = url_of(sock, settings.host)
        original = server.startup

        async def startup(sockets: list[socket.socket] | None = None) -> None:
            await original(sockets=sockets)
            on_ready(url)

        server.startup = startup  # type: ignore[method-assign]
    try:
        server.run(sockets=[sock])
    finally:
        sock.close()
