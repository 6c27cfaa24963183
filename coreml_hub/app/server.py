"""Binding and running the app under uvicorn; the refusal to listen beyond this machine without a token."""

from __future__ import annotations

import os
import secrets
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from ..errors import CoremlHubError, UsageError
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


def serve_app(settings: AppSettings, *, on_ready: Callable[[str], None] | None = None) -> None:
    """Serve until Ctrl-C or SIGTERM; `on_ready(url)` once the socket accepts connections."""
    import uvicorn

    from ..safeserve import DEFAULT_IDLE_TIMEOUT, DEFAULT_MAX_CONNECTIONS
    from .web import AppConfig, make_app

    token = check_token(settings.host, settings.token)
    settings.outputs.mkdir(parents=True, exist_ok=True)
    sock = bind(settings.host, settings.port)
    config = AppConfig(outputs=settings.outputs.resolve(), token=token, host=settings.host,
                       max_models=settings.max_models, preview_every=settings.preview_every,
                       max_waiting=settings.max_waiting)
    app = make_app(config)
    # the connection limits every server of the project starts with (safeserve)
    uv_config = uvicorn.Config(app, log_level=os.environ.get("COREML_HUB_APP_LOG_LEVEL", "warning"),
                               access_log=False, timeout_graceful_shutdown=3, lifespan="on",
                               server_header=False, h11_max_incomplete_event_size=64 * 1024,
                               limit_concurrency=DEFAULT_MAX_CONNECTIONS,
                               timeout_keep_alive=int(DEFAULT_IDLE_TIMEOUT))
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
