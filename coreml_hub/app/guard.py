"""Who may use the app, and how much they may send: checks that run before any route.

- With a token (`--token`, `COREML_HUB_APP_TOKEN`): every request needs it, as
  `Authorization: Bearer TOKEN` (API clients) or the cookie that `/login` or `?token=TOKEN`
  sets (browsers). Without one, the app listens on a loopback address only and answers only
  requests whose Host header names this machine (a web page elsewhere cannot reach it by
  DNS rebinding).
- Requests that change something (POST, PUT, DELETE) from a browser must come from the app's
  own pages (Origin), so another site cannot make a visitor's browser use the app.
- Request bodies have a limit per route, checked from Content-Length before anything is read
  (413), and counted while they arrive when no length is given.
"""

from __future__ import annotations

import asyncio
import hmac
import ipaddress
import json
from http.cookies import SimpleCookie
from typing import Any, Awaitable, Callable
from urllib.parse import parse_qsl, urlencode, urlsplit

COOKIE = "coreml_hub_token"
LOCAL_NAMES = ("localhost", "127.0.0.1", "::1")
OPEN_PATHS = ("/login", "/static/app.css")  # what the login page itself needs

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


def is_loopback(host: str) -> bool:
    name = host.strip("[]").lower()
    if name == "localhost":
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


def same_token(given: str | None, token: str) -> bool:
    return given is not None and hmac.compare_digest(given.encode(), token.encode())


def _headers(scope: Scope) -> dict[str, str]:
    return {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}


def _wants_json(path: str) -> bool:
    return path.startswith(("/api/", "/v1/", "/files/"))


async def send_json(send: Send, status: int, message: str, *, kind: str = "invalid_request_error",
                    code: str | None = None, headers: dict[str, str] | None = None) -> None:
    """An error in OpenAI's shape: {"error": {"message", "type", "param", "code"}}."""
    body = json.dumps({"error": {"message": message, "type": kind, "param": None, "code": code}}).encode()
    extra = [(k.encode(), v.encode()) for k, v in (headers or {}).items()]
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            (b"cache-control", b"no-store"), *extra]})
    await send({"type": "http.response.body", "body": body})


class AccessGuard:
    """Token, Host and Origin checks (see the module docstring)."""

    def __init__(self, app: ASGIApp, *, token: str | None, host: str, login_page: Callable[[str], bytes],
                 allowed_hosts: tuple[str, ...] = ()) -> None:
        self.app = app
        self.token = token
        self.hosts = {name.strip("[]").lower() for name in (host, *allowed_hosts)}
        self.login_page = login_page

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = _headers(scope)
        path = scope.get("path", "/")
        method = scope.get("method", "GET")
        if self.token is None and not self._local_host(headers.get("host", "")):
            await send_json(send, 403, "This app answers only requests addressed to this machine "
                                       "(localhost or 127.0.0.1).", code="host_not_allowed")
            return
        if method in ("POST", "PUT", "PATCH", "DELETE") and not self._same_origin(headers):
            await send_json(send, 403, "Requests from other web sites are refused.", code="cross_origin")
            return
        if self.token is None or path in OPEN_PATHS:
            await self.app(scope, receive, send)
            return
        query = dict(parse_qsl(scope.get("query_string", b"").decode("latin-1")))
        if method == "GET" and "token" in query and not _wants_json(path):
            await self._login_by_query(scope, send, query, path)
            return
        if self._authorized(headers):
            await self.app(scope, receive, send)
            return
        if _wants_json(path) or method != "GET":
            await send_json(send, 401, "This app needs a token: send `Authorization: Bearer TOKEN`.",
                            kind="authentication_error", code="invalid_token",
                            headers={"www-authenticate": 'Bearer realm="coreml-hub"'})
            return
        await self._send_html(send, 401, self.login_page(""))

    def _local_host(self, host_header: str) -> bool:
        host = urlsplit(f"//{host_header}").hostname or ""
        return is_loopback(host) or host in self.hosts

    @staticmethod
    def _same_origin(headers: dict[str, str]) -> bool:
        origin = headers.get("origin")
        if origin is None:
            return True  # not a browser (or a same-origin GET-like request from an old one)
        return urlsplit(origin).netloc.lower() == headers.get("host", "").lower()

    def _authorized(self, headers: dict[str, str]) -> bool:
        assert self.token is not None
        auth = headers.get("authorization", "")
        scheme, _, value = auth.partition(" ")
        if scheme.lower() == "bearer" and same_token(value.strip(), self.token):
            return True
        cookie = SimpleCookie()
        try:
            cookie.load(headers.get("cookie", ""))
        except Exception:  # a malformed cookie header is no login
            return False
        morsel = cookie.get(COOKIE)
        return morsel is not None and same_token(morsel.value, self.token)

    async def _login_by_query(self, scope: Scope, send: Send, query: dict[str, str], path: str) -> None:
        if not same_token(query.get("token"), self.token or ""):
            await self._send_html(send, 401, self.login_page("That token is not right."))
            return
        rest = {k: v for k, v in query.items() if k != "token"}
        location = path + (f"?{urlencode(rest)}" if rest else "")
        await send({"type": "http.response.start", "status": 303,
                    "headers": [(b"location", location.encode()), (b"content-length", b"0"),
                                (b"set-cookie", login_cookie(self.token or "").encode())]})
        await send({"type": "http.response.body", "body": b""})

    @staticmethod
    async def _send_html(send: Send, status: int, body: bytes) -> None:
        await send({"type": "http.response.start", "status": status,
                    "headers": [(b"content-type", b"text/html; charset=utf-8"),
                                (b"content-length", str(len(body)).encode()), (b"cache-control", b"no-store")]})
        await send({"type": "http.response.body", "body": body})


def login_cookie(token: str) -> str:
    return f"{COOKIE}={token}; Path=/; HttpOnly; SameSite=Strict"


class BodyLimit:
    """Reads each request body (up to its route's limit) before the route runs, by the shared rules
    of coreml_hub.safeserve: a declared length over the limit is refused before any byte is read (413),
    a chunked body is counted as it arrives, a malformed length is a 400."""

    def __init__(self, app: ASGIApp, limit_for: Callable[[str, str], int]) -> None:
        self.app = app
        self.limit_for = limit_for

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        from ..safeserve import DEFAULT_IDLE_TIMEOUT, Refused, body_limit_check, body_size_check

        if scope["type"] != "http" or scope.get("method") in ("GET", "HEAD", "OPTIONS"):
            await self.app(scope, receive, send)  # no route reads a body there: it is never read
            return
        limit = self.limit_for(scope.get("method", "GET"), scope.get("path", "/"))
        lengths = [v.decode("latin-1") for k, v in scope.get("headers", []) if k.lower() == b"content-length"]
        coding = _headers(scope).get("transfer-encoding")
        body = bytearray()
        try:
            body_limit_check(lengths, limit, transfer_encoding=coding)
            while True:
                try:  # a client that stalls mid-body holds its connection no longer than an idle one
                    message = await asyncio.wait_for(receive(), DEFAULT_IDLE_TIMEOUT)
                except asyncio.TimeoutError:
                    await send_json(send, 408, "The request body stopped arriving.", code="body_timeout",
                                    headers={"connection": "close"})
                    return
                if message["type"] == "http.disconnect":
                    return
                body += message.get("body", b"")
                body_size_check(len(body), limit)
                if not message.get("more_body", False):
                    break
        except Refused as err:  # the rest of the body is never read: the connection closes after the answer
            await send_json(send, err.status, err.message, code=err.code, headers={"connection": "close"})
            return
        replayed = False

        async def replay() -> dict[str, Any]:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": bytes(body), "more_body": False}
            return await receive()

        await self.app(scope, replay, send)


class CrashGuard:
    """An exception no route handled: the client gets a 500 naming only a request id, the log gets the rest."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        from ..safeserve import internal_error_message, log_internal_error, new_request_id

        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def watch(message: dict[str, Any]) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, receive, watch)
        except Exception as exc:
            request_id = new_request_id()
            log_internal_error(request_id, f"{scope.get('method')} {scope.get('path')}", exc)
            if not started:  # once headers went out, hanging up is the only signal left
                await send_json(send, 500, internal_error_message(request_id), kind="server_error",
                                headers={"x-request-id": request_id})
