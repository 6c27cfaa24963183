"""HTTP routes of the mirror: the subset of the Hub API that huggingface_hub uses to find and fetch models."""

from __future__ import annotations

import errno
import json
import os
import re
import select
import socket
import stat
import sys
import threading
import time
from datetime import datetime, timezone
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs, quote, unquote, urlencode

from ..safeserve import (
    MalformedBody,
    Refused,
    body_limit_check,
    body_size_check,
    header_safe,
    internal_error_message,
    log_internal_error,
    new_request_id,
)
from . import api
from .access import accepted_tokens, bearer
from .repos import Repo, valid_repo_path
from .upstream import MirrorError, TransferFailed

if TYPE_CHECKING:
    from . import MirrorServer

IDLE_PATH = "/_coreml_hub/idle"  # test barrier: answers once no other request is in flight; never logged
PATHS_INFO_BODY_LIMIT = 1 << 20  # bytes: some ten thousand paths
MAX_REQUEST_LINE = 65536  # as the standard library's handler
LINGER_SECONDS = 2.0  # after refusing a body: read and drop what the client still sends, so it sees the answer
LINGER_BYTES = 64 << 20
_CHUNK_SIZE = re.compile(rb"[0-9A-Fa-f]{1,15}")
_OPEN_FLAGS = getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0)  # no link, and a FIFO cannot block


class HubError(Exception):
    """An error answer: status, the Hub's X-Error-Code, a message, optional extra headers."""

    def __init__(self, status: int, code: str | None, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.headers = headers or {}


def _truthy(values: list[str] | None) -> bool:
    return bool(values) and values[-1].lower() in ("1", "true", "yes", "on")


def _last(params: dict[str, list[str]], name: str) -> str | None:
    """The last value given for a query parameter; None when absent or empty."""
    values = params.get(name)
    return values[-1] or None if values else None


def _expand(params: dict[str, list[str]]) -> tuple[str, ...]:
    """The properties `expand` names (either spelling) that this mirror can answer."""
    return tuple(p for p in params.get("expand", []) + params.get("expand[]", []) if p in api.EXPANDABLE)


def _repo_id(org: str, name: str) -> str:
    return f"{unquote(org)}/{unquote(name)}"


class MirrorHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "coreml-hub-mirror"
    server: "MirrorServer"
    timeout = 300  # seconds an idle keep-alive connection may hold a thread
    disable_nagle_algorithm = True  # headers and body go out as separate writes; do not wait on delayed ACKs

    # -- plumbing --------------------------------------------------------------------------------

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - stdlib signature
        pass  # the JSON request log replaces the stderr access log

    def setup(self) -> None:
        self.timeout = self.server.limits.idle_timeout
        super().setup()
        self._reset()

    def _reset(self) -> None:
        self.request_id = new_request_id()
        self.command = None  # type: ignore[assignment]
        self.requestline = ""
        self.request_version = self.protocol_version
        self._sent = 0
        self._status = 0
        self._unread_body = False
        self._log_extra: dict[str, Any] = {}

    def handle_one_request(self) -> None:
        """Wait for a request (idle timeout), take its line and headers (header timeout, in total), answer it."""
        connections = self.server.connections
        sock = self.connection
        self.close_connection = True
        self._reset()
        # a connection whose request is already here is never idle, so it cannot be displaced
        arrived = _readable(sock)
        if not arrived:
            connections.idle(sock)
        try:
            if not self.rfile.peek(1):
                return  # the client closed, or its slot went to a new connection
        except OSError:  # the idle timeout, or a reset
            return
        if not connections.reading(sock, was_idle=not arrived):
            return
        sock.settimeout(self.server.limits.header_timeout)  # also a client that sends nothing more
        parsed = timed_out = False
        try:
            self.raw_requestline = self.rfile.readline(MAX_REQUEST_LINE + 1)
            if len(self.raw_requestline) <= MAX_REQUEST_LINE and self.raw_requestline.endswith(b"\n"):
                parsed = self.parse_request()  # reads the headers; answers a malformed request itself
        except TimeoutError:
            timed_out = True
        except OSError:
            connections.busy(sock)
            return
        if not connections.busy(sock) or timed_out:  # the reaper cut the connection at the deadline
            self.send_error(HTTPStatus.REQUEST_TIMEOUT, "The request's headers took too long.")
            return
        if len(self.raw_requestline) > MAX_REQUEST_LINE:
            self.send_error(HTTPStatus.REQUEST_URI_TOO_LONG)
            return
        if not parsed:
            return
        sock.settimeout(self.server.limits.idle_timeout)
        method = getattr(self, f"do_{self.command}", None)
        if method is None:
            self.send_error(HTTPStatus.NOT_IMPLEMENTED, f"Unsupported method {self.command!r}")
            return
        try:
            method()
            self.wfile.flush()
        except OSError:  # a timeout or a reset while answering: nothing more can be said on this connection
            self.close_connection = True

    def finish(self) -> None:
        super().finish()
        if self._unread_body:
            self._linger()

    def _linger(self) -> None:
        """Close after a refused body without resetting it: a client still sending would lose the answer."""
        sock = self.connection
        deadline = time.monotonic() + LINGER_SECONDS
        budget = LINGER_BYTES
        try:
            sock.shutdown(socket.SHUT_WR)
            while budget > 0 and (left := deadline - time.monotonic()) > 0:
                sock.settimeout(left)
                chunk = sock.recv(65536)
                if not chunk:
                    break
                budget -= len(chunk)
        except OSError:
            pass

    def handle_expect_100(self) -> bool:
        return True  # "100 Continue" goes out once the route has checked the body's size (see _body)

    def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
        """Protocol-level errors (malformed request, timeout) in the same JSON shape as every other error."""
        self.close_connection = True
        text = message or HTTPStatus(code).phrase
        try:
            self._send_json({"error": text}, status=code, head=self.command == "HEAD",
                            headers={"X-Error-Message": text, "Connection": "close"})
        except OSError:
            pass

    def send_header(self, keyword: str, value: Any) -> None:
        # values may carry request text (a revision, a file name): never let them split or forge a header
        super().send_header(keyword, header_safe(str(value)))

    def end_headers(self) -> None:
        self.send_header("X-Request-Id", self.request_id)
        if self._unread_body and not self.close_connection:
            self.send_header("Connection", "close")  # the unread body is in the way of any next request
        super().end_headers()

    def do_GET(self) -> None:
        self._dispatch(head=False)

    def do_HEAD(self) -> None:
        self._dispatch(head=True)

    def do_POST(self) -> None:
        self._dispatch(head=False)

    def _dispatch(self, head: bool) -> None:
        raw_path, _, query = self.path.partition("?")
        if raw_path == IDLE_PATH:
            self.server.wait_idle()
            self._send_json({"idle": True}, head=head)
            return
        self.server.begin_request()
        started = time.monotonic()
        try:
            try:
                self._unread_body = self._declares_body()
                # framing first, for every request: a broken one leaves no way to find the next request
                body_limit_check(self.headers.get_all("Content-Length"), sys.maxsize,
                                 transfer_encoding=self.headers.get("Transfer-Encoding"))
                self._route(raw_path, parse_qs(query, keep_blank_values=True), head)
            except Refused as err:
                self._send_error(HubError(err.status, err.code, err.message), head)
            except MirrorError as err:  # the upstream's answer, or its absence, in the Hub's shape
                self._send_error(HubError(err.status, err.code, err.message), head)
            except HubError as err:
                self._send_error(err, head)
            except (BrokenPipeError, ConnectionResetError):
                self.close_connection = True
            except TimeoutError:  # the client stalled mid-body or stopped reading the answer
                self.close_connection = True
                if not self._status:
                    self._send_error(HubError(408, None, "The request took too long."), head)
            except Exception as exc:  # answer 500 rather than drop the connection; details go to the log only
                log_internal_error(self.request_id, f"{self.command} {raw_path}", exc)
                if self._status:  # headers already went out: the only honest signal left is to hang up
                    self.close_connection = True
                else:
                    self._send_error(HubError(500, None, internal_error_message(self.request_id)), head)
        except OSError:
            self.close_connection = True
        finally:
            self.server.log.write({
                "time": datetime.now(timezone.utc).isoformat(timespec="milliseconds"),
                "method": self.command,
                "path": unquote(raw_path),
                "query": query,
                "status": self._status,
                "range": self.headers.get("Range"),
                "bytes": self._sent,
                "duration_ms": round((time.monotonic() - started) * 1000, 3),
                "request_id": self.request_id,
                **self._log_extra,
            })
            self.server.end_request()

    def _send_json(self, data: Any, status: int = 200, head: bool = False, headers: dict[str, str] | None = None) -> None:
        body = json.dumps(data, separators=(",", ":")).encode()
        self._status = status
        self.send_response(status)
        self.send_header("Content-Type", "application/json; charset=utf-8")
        self.send_header("Content-Length", str(len(body)))
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.end_headers()
        if not head:
            self.wfile.write(body)
            self._sent += len(body)

    def _send_error(self, err: HubError, head: bool) -> None:
        headers = dict(err.headers)
        if err.code:
            headers["X-Error-Code"] = err.code
        headers["X-Error-Message"] = err.message
        self._send_json({"error": err.message}, status=err.status, head=head, headers=headers)

    # -- request bodies ----------------------------------------------------------------------------

    def _declares_body(self) -> bool:
        lengths = self.headers.get_all("Content-Length") or []
        return bool((self.headers.get("Transfer-Encoding") or "").strip()) or any(v.strip() != "0" for v in lengths)

    def _body(self, limit: int) -> bytes:
        """The request body, refused from its headers alone (413, 400, 501) before a byte of it is read."""
        length = body_limit_check(self.headers.get_all("Content-Length"), limit,
                                  transfer_encoding=self.headers.get("Transfer-Encoding"))
        if (self.headers.get("Expect") or "").lower() == "100-continue" and length != 0:
            self.wfile.write(b"HTTP/1.1 100 Continue\r\n\r\n")  # only now that the body is welcome
            self.wfile.flush()
        data = self._read_chunked(limit) if length is None else self._read_exactly(length)
        self._unread_body = False
        return data

    def _read_exactly(self, length: int) -> bytes:
        data = self.rfile.read(length) if length else b""
        if len(data) != length:
            raise MalformedBody("The request body ended before Content-Length bytes.")
        return data

    def _read_chunked(self, limit: int) -> bytes:
        parts: list[bytes] = []
        total = 0
        while True:
            line = self.rfile.readline(1024)
            size_text = line.split(b";", 1)[0].strip()
            if not line.endswith(b"\n") or not _CHUNK_SIZE.fullmatch(size_text):
                raise MalformedBody("A chunk of the request body has no valid size line.")
            size = int(size_text, 16)
            if size == 0:
                break
            total += size
            body_size_check(total, limit)
            data = self.rfile.read(size)
            if len(data) != size or self.rfile.read(2) != b"\r\n":
                raise MalformedBody("A chunk of the request body is cut short.")
            parts.append(data)
        for _ in range(64):  # trailer fields, ignored
            line = self.rfile.readline(8192)
            if line in (b"\r\n", b"\n"):
                return b"".join(parts)
            if not line.endswith(b"\n"):
                break
        raise MalformedBody("The request body's trailer is malformed.")

    def _base_url(self) -> str:
        return f"http://{self.headers.get('Host') or '%s:%d' % self.server.server_address[:2]}"

    # -- routing -----------------------------------------------------------------------------------

    def _route(self, raw_path: str, params: dict[str, list[str]], head: bool) -> None:
        parts = raw_path.strip("/").split("/")
        if self.command == "POST":
            if len(parts) >= 6 and parts[:2] == ["api", "models"] and parts[4] == "paths-info":
                self._paths_info(parts, self._body(PATHS_INFO_BODY_LIMIT), head)
                return
            raise HubError(404, None, "Not Found")  # without reading a body no route wants
        if parts[:2] == ["api", "models"]:
            if len(parts) == 2:
                self._list_models(params, head)
                return
            if len(parts) >= 4:
                repo_id = _repo_id(parts[2], parts[3])
                rest = parts[4:]
                if not rest:
                    self._model_info(repo_id, "main", params, head)
                    return
                if rest[0] == "revision" and len(rest) == 2:
                    self._model_info(repo_id, unquote(rest[1]), params, head)
                    return
                if rest[0] == "tree" and len(rest) >= 2:
                    folder = unquote("/".join(rest[2:]))
                    self._tree(repo_id, unquote(rest[1]), folder, params, head)
                    return
            raise HubError(404, None, "Not Found")
        if parts[:2] in (["api", "datasets"], ["api", "spaces"]) or parts[:1] in (["datasets"], ["spaces"]):
            raise HubError(404, "RepoNotFound", "This mirror serves models only.")
        if len(parts) >= 5 and parts[2] == "resolve" and self.command in ("GET", "HEAD"):
            self._resolve(_repo_id(parts[0], parts[1]), unquote(parts[3]), unquote("/".join(parts[4:])), head)
            return
        if raw_path in ("", "/"):
            self._send_json({"mirror": "coreml-hub", "repos": len(self.server.store.repo_ids())}, head=head)
            return
        raise HubError(404, None, "Not Found")

    # -- access ----------------------------------------------------------------------------------

    def _token_ok(self) -> bool:
        token = bearer(self.headers.get("Authorization"))
        return token is not None and token in accepted_tokens(self.server.store.root)

    def _repo(self, repo_id: str, revision: str = "main") -> Repo:
        if self.server.upstream is not None:
            self.server.upstream.fill(repo_id, revision)  # what ROOT lacks, from upstream
        repo = self.server.store.get(repo_id, revision)
        if repo is None:
            if self.server.offline:
                raise HubError(404, "RepoNotFound", "Repository not found (this mirror is offline: it serves only "
                                                    "what it holds)")
            raise HubError(404, "RepoNotFound", "Repository not found")
        if repo.private and not self._token_ok():
            # the Hub does not reveal that a private repo exists
            raise HubError(401, "RepoNotFound", "Invalid username or password.")
        self._log_extra["repo"] = repo_id
        return repo

    def _check_revision(self, repo: Repo, revision: str) -> str:
        if repo.commit is not None:  # pinned: the store found it by this revision, or fell back to main
            if revision not in repo.revisions:
                raise HubError(404, "RevisionNotFound", f"Invalid rev id: {revision}")
            return repo.commit
        commit = self.server.store.commit(repo)
        if revision not in ("main", commit):
            raise HubError(404, "RevisionNotFound", f"Invalid rev id: {revision}")
        return commit

    def _check_gate(self, repo: Repo) -> None:
        if not repo.gated:
            return
        token = bearer(self.headers.get("Authorization"))
        if token is None:
            raise HubError(401, "GatedRepo", f"Access to model {repo.repo_id} is restricted. You must have access "
                                             "to it and be authenticated to access it. Please log in.")
        if token not in accepted_tokens(self.server.store.root):
            raise HubError(403, "GatedRepo", f"Access to model {repo.repo_id} is restricted and you are not in the "
                                             "authorized list.")

    # -- endpoints -----------------------------------------------------------------------------------

    def _list_models(self, params: dict[str, list[str]], head: bool) -> None:
        gated = params.get("gated")
        query = api.Query(
            filters=tuple(f for f in params.get("filter", []) + params.get("filter[]", []) if f),
            author=_last(params, "author"),
            search=_last(params, "search"),
            pipeline_tag=_last(params, "pipeline_tag"),
            library=tuple(v for v in params.get("library", []) if v),
            gated=None if not gated else _truthy(gated),
            sort=_last(params, "sort"),
            descending=_last(params, "direction") != "1",
        )
        props = _expand(params) or (api.FULL_LIST_PROPS if _truthy(params.get("full")) else api.DEFAULT_LIST_PROPS)
        if _truthy(params.get("cardData")) and "cardData" not in props:
            props = props + ("cardData",)

        visible = self._token_ok()
        repos = [r for r in self.server.store.repos() if (visible or not r.private) and query.matches(r)]
        repos = query.order(repos)
        limit = _int_param(params, "limit")
        if limit is not None:
            repos = repos[:limit]
        start = _int_param(params, "cursor") or 0
        page = repos[start:start + self.server.page_size]
        headers = {}
        if start + self.server.page_size < len(repos):
            headers["Link"] = self._next_link("/api/models", params, start + self.server.page_size)
        docs = [api.model_document(self.server.store, r, props) for r in page]
        self._send_json(docs, head=head, headers=headers)

    def _model_info(self, repo_id: str, revision: str, params: dict[str, list[str]], head: bool) -> None:
        repo = self._repo(repo_id, revision)
        self._check_revision(repo, revision)
        doc = api.model_document(self.server.store, repo, _expand(params) or api.INFO_PROPS,
                                 blobs=_truthy(params.get("blobs")))
        self._send_json(doc, head=head)

    def _tree(self, repo_id: str, revision: str, folder: str, params: dict[str, list[str]], head: bool) -> None:
        repo = self._repo(repo_id, revision)
        commit = self._check_revision(repo, revision)
        folder = folder.strip("/")
        if folder and (not valid_repo_path(folder) or folder not in repo.directories()):
            raise HubError(404, "EntryNotFound", f"{folder} does not exist on \"{revision}\"",
                           {"X-Repo-Commit": commit})
        recursive = _truthy(params.get("recursive"))
        expand = _truthy(params.get("expand"))
        items = api.tree_paths(repo, folder, recursive)
        page_size = min(self.server.page_size, 50) if expand else self.server.page_size
        start = _int_param(params, "cursor") or 0
        page = items[start:start + page_size]
        docs = [api.path_entry(self.server.store, repo, path, expand=expand, commit=commit) for _kind, path in page]
        headers = {"X-Repo-Commit": commit}
        if start + page_size < len(items):
            headers["Link"] = self._next_link(self.path.partition("?")[0], params, start + page_size)
        self._send_json(docs, head=head, headers=headers)

    def _paths_info(self, parts: list[str], body: bytes, head: bool) -> None:
        revision = unquote("/".join(parts[5:])) or "main"
        repo = self._repo(_repo_id(parts[2], parts[3]), revision)
        commit = self._check_revision(repo, revision)
        content_type = (self.headers.get("Content-Type") or "").split(";")[0].strip()
        if content_type == "application/json":
            try:
                data = json.loads(body or b"{}")
            except ValueError:
                raise HubError(400, "BadRequest", "The body is not valid JSON") from None
            if not isinstance(data, dict):
                raise HubError(400, "BadRequest", "The body must be a JSON object with `paths`")
            paths = data.get("paths") or []
            paths = [paths] if isinstance(paths, str) else list(paths)
            expand = bool(data.get("expand"))
        else:
            form = parse_qs(body.decode(), keep_blank_values=True)
            paths = form.get("paths", []) + form.get("paths[]", [])
            expand = _truthy(form.get("expand"))
        directories = set(repo.directories())
        wanted = [p.strip("/") for p in paths]
        docs = [api.path_entry(self.server.store, repo, path, expand=expand, commit=commit) for path in wanted
                if valid_repo_path(path) and (path in directories or repo.entry(path) is not None)]
        self._send_json(docs, head=head, headers={"X-Repo-Commit": commit})

    def _resolve(self, repo_id: str, revision: str, path: str, head: bool) -> None:
        repo = self._repo(repo_id, revision)
        commit = self._check_revision(repo, revision)
        self._check_gate(repo)
        entry = repo.entry(path) if valid_repo_path(path) else None
        if entry is None:
            raise HubError(404, "EntryNotFound", "Entry not found", {"X-Repo-Commit": commit})
        self._log_extra["file"] = path
        digest = self.server.store.digest(entry)
        size = entry.size
        headers = {
            "X-Repo-Commit": commit,
            "ETag": f'"{digest.etag}"',
            "Accept-Ranges": "bytes",
            "Content-Type": "application/octet-stream",
            "Content-Disposition": f"inline; filename*=UTF-8''{quote(path.rsplit('/', 1)[-1])}",
        }
        if digest.sha256 is not None:
            headers["X-Linked-Etag"] = f'"{digest.sha256}"'
            headers["X-Linked-Size"] = str(size)
        start, end = 0, size - 1
        status = 200
        byte_range = _parse_range(self.headers.get("Range"), size)
        if byte_range == "unsatisfiable":
            raise HubError(416, None, "Requested range not satisfiable", {"Content-Range": f"bytes */{size}"})
        if byte_range is not None:
            start, end = byte_range
            status = 206
            headers["Content-Range"] = f"bytes {start}-{end}/{size}"
        length = max(0, end - start + 1)
        if not entry.present:
            self._resolve_upstream(repo, commit, entry, status, headers, start, length, head)
            return
        try:  # the listing resolved every link: one put in the file's place since then is not followed
            fd = os.open(entry.abs_path, os.O_RDONLY | _OPEN_FLAGS)
        except OSError as exc:
            if exc.errno not in (errno.ENOENT, errno.ENOTDIR, errno.ELOOP):
                raise
            raise HubError(404, "EntryNotFound", "Entry not found", {"X-Repo-Commit": commit}) from None
        with os.fdopen(fd, "rb") as f:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                raise HubError(404, "EntryNotFound", "Entry not found", {"X-Repo-Commit": commit})
            self._send_file_headers(status, headers, length)
            if head or length == 0:
                return
            self._stream(f, start, length)
        if self.server.upstream is not None and repo.commit is not None:
            self._log_extra["cache"] = "hit"
            self.server.upstream.stats.served(repo.repo_id, self._sent, hit=True)

    def _send_file_headers(self, status: int, headers: dict[str, str], length: int) -> None:
        self._status = status
        self.send_response(status)
        for key, value in headers.items():
            self.send_header(key, value)
        self.send_header("Content-Length", str(length))
        self.end_headers()

    def _resolve_upstream(self, repo: Repo, commit: str, entry: Any, status: int, headers: dict[str, str],
                          start: int, length: int, head: bool) -> None:
        """A listed file ROOT lacks: join (or start) its transfer from upstream and stream it as it arrives."""
        upstream = self.server.upstream
        if upstream is None:
            why = "this mirror is offline" if self.server.offline else "this server has no upstream"
            raise HubError(404, "EntryNotFound", f"{entry.path} is not cached in this mirror and {why}",
                           {"X-Repo-Commit": commit})
        self._log_extra["cache"] = "miss"
        transfer = upstream.transfer(repo.repo_id, commit, entry) if not head else None
        if transfer is not None:
            transfer.started()  # upstream's refusal (gated, gone) still reaches the client as an error status
        self._send_file_headers(status, headers, length)
        if transfer is None or length == 0:
            return
        sent_before = self._sent

        def send(f: Any, offset: int, count: int) -> int:
            sent = self.connection.sendfile(f, offset, count)
            self._sent += sent
            return sent

        try:
            transfer.stream(send, start, length)
        except TransferFailed as exc:  # the headers are out: hanging up is the only signal left
            self._log_extra["error"] = str(exc)
            self.close_connection = True
        finally:
            if self._sent - sent_before != length:
                self.close_connection = True
            upstream.stats.served(repo.repo_id, self._sent - sent_before, hit=False)

    def _stream(self, f: Any, offset: int, count: int) -> None:
        """Kernel-side copy from the file to the socket; the file never passes through Python memory."""
        sent_before = self._sent
        try:
            sent = self.connection.sendfile(f, offset, count)
            self._sent += sent
        finally:
            if self._sent - sent_before != count:
                self.close_connection = True

    def _next_link(self, path: str, params: dict[str, list[str]], cursor: int) -> str:
        pairs = [(k, v) for k, values in params.items() if k != "cursor" for v in values]
        pairs.append(("cursor", str(cursor)))
        return f'<{self._base_url()}{path}?{urlencode(pairs)}>; rel="next"'


def _readable(sock: socket.socket) -> bool:
    poller = select.poll()  # not select.select: descriptors past 1024 are common on a busy mirror
    poller.register(sock, select.POLLIN)
    return bool(poller.poll(0))


def _int_param(params: dict[str, list[str]], name: str) -> int | None:
    values = params.get(name)
    if not values or not values[-1]:
        return None
    try:
        return max(0, int(values[-1]))
    except ValueError:
        raise HubError(400, None, f"Invalid {name}: {values[-1]!r}") from None


def _parse_range(header: str | None, size: int) -> tuple[int, int] | str | None:
    """A single `bytes=` range as (start, end) inclusive; None to send the whole file."""
    if not header:
        return None
    unit, _, spec = header.partition("=")
    if unit.strip().lower() != "bytes" or "," in spec:
        return None  # other units and multi-range requests: the whole file is a valid answer
    first, dash, last = spec.strip().partition("-")
    if not dash:
        return None
    try:
        if first == "":
            suffix = int(last)
            if suffix <= 0:
                return "unsatisfiable"
            return max(0, size - suffix), size - 1
        start = int(first)
        end = int(last) if last else size - 1
    except ValueError:
        return None
    if start >= size or end < start:
        return "unsatisfiable"
    return start, min(end, size - 1)


class _InFlight:
    """Counts requests being answered, so a barrier can wait until the log holds them all."""

    def __init__(self) -> None:
        self._count = 0
        self._cond = threading.Condition()

    def begin(self) -> None:
        with self._cond:
            self._count += 1

    def end(self) -> None:
        with self._cond:
            self._count -= 1
            self._cond.notify_all()

    def wait_idle(self, timeout: float = 30.0) -> None:
        with self._cond:
            self._cond.wait_for(lambda: self._count == 0, timeout=timeout)
