"""`coreml-hub serve`: a read-only Hugging Face Hub-compatible mirror of a folder of repos.

ROOT/<org>/<name>/ holds a repo's files as plain files; ROOT/<org>/<name>/.hub.json holds
optional metadata (likes, downloads, tags, pipeline_tag, library_name, lastModified,
createdAt, gated, private). The unmodified huggingface_hub client pointed at the server
with HF_ENDPOINT can search, inspect and download, with Range requests.

Safe by construction (coreml_hub/safeserve.py holds the rules, shared with the app): nothing
whose real path is outside ROOT is listed or served, request bodies are bounded before they are
read, slow and idle clients are cut off (connections.py), and a 500 names only a request id.
"""

from __future__ import annotations

import signal
import sys
import threading
from http.server import ThreadingHTTPServer
from pathlib import Path
from typing import Any, Callable

from .connections import Connections, Limits
from .handler import MirrorHandler, _InFlight
from .repos import RepoStore
from .requestlog import RequestLog
from .upstream import DEFAULT_REFRESH, MirrorStats, Upstream

__all__ = ["Limits", "MirrorServer", "MirrorStats", "make_server", "serve"]

DEFAULT_PAGE_SIZE = 1000


class MirrorServer(ThreadingHTTPServer):
    """One thread per connection; files stream with sendfile so memory stays flat."""

    daemon_threads = True
    request_queue_size = 1024  # a burst of connects waits in the kernel, not in SYN retries
    allow_reuse_address = True

    def __init__(self, root: Path, host: str, port: int, *, log_path: Path | None = None,
                 page_size: int = DEFAULT_PAGE_SIZE, remember_digests: bool = True,
                 limits: Limits | None = None, upstream: str | None = None, upstream_token: str | None = None,
                 offline: bool = False, refresh: float = DEFAULT_REFRESH) -> None:
        self.store = RepoStore(root, remember_digests=remember_digests)
        self.offline = offline
        # with --offline the upstream is never asked: ROOT is all there is
        self.upstream = Upstream(self.store, upstream, upstream_token, refresh=refresh) \
            if upstream and not offline else None
        self.log = RequestLog(log_path)
        self.page_size = max(1, page_size)
        self.limits = limits or Limits()
        self._inflight = _InFlight()
        super().__init__((host, port), MirrorHandler)
        self.connections = Connections(self.limits)  # after binding: a failed bind leaves no reaper thread

    def process_request(self, request: Any, client_address: Any) -> None:
        """Runs on the accept loop: a new connection gets a thread, or 503 at once when all slots work."""
        if not self.connections.admit():
            self.connections.refuse(request)
            return
        try:
            super().process_request(request, client_address)
        except BaseException:  # no thread could be started: give the slot back (the caller closes the socket)
            self.connections.release(request)
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self.connections.release(request)

    def handle_error(self, request: Any, client_address: Any) -> None:
        """A connection's thread failed outside any request (the handler answers errors inside one)."""
        import traceback

        print(f"Error: connection from {client_address[0]} failed:\n{traceback.format_exc()}", file=sys.stderr,
              end="", flush=True)

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        shown = "127.0.0.1" if host in ("0.0.0.0", "") else host
        if ":" in str(shown):
            shown = f"[{shown}]"
        return f"http://{shown}:{port}"

    def begin_request(self) -> None:
        self._inflight.begin()

    def end_request(self) -> None:
        self._inflight.end()

    def wait_idle(self) -> None:
        self._inflight.wait_idle()

    def warm_in_background(self) -> threading.Thread:
        thread = threading.Thread(target=self.store.warm, name="mirror-warm", daemon=True)
        thread.start()
        return thread

    def server_close(self) -> None:
        super().server_close()
        if hasattr(self, "connections"):
            self.connections.close()
        self.store.digests.save()
        if self.upstream is not None:
            self.upstream.close()
        self.log.close()


def make_server(root: Path, host: str = "127.0.0.1", port: int = 0, *, log_path: Path | None = None,
                page_size: int = DEFAULT_PAGE_SIZE, remember_digests: bool = True,
                limits: Limits | None = None, upstream: str | None = None, upstream_token: str | None = None,
                offline: bool = False, refresh: float = DEFAULT_REFRESH) -> MirrorServer:
    """A bound, not yet serving mirror; port 0 picks a free port (see `.url`).

    `upstream` (a Hub or another mirror) fills ROOT on demand (a pull-through mirror; ROOT is created
    when missing); `offline` serves only what ROOT holds.
    """
    root = Path(root)
    if upstream:
        _check_upstream(upstream)
        if not root.exists():
            root.mkdir(parents=True)
    if not root.is_dir():
        from ..errors import UsageError

        raise UsageError(f"{root} is not a folder.", hint="Pass a folder laid out as ROOT/<org>/<name>/.")
    try:
        return MirrorServer(root, host, port, log_path=log_path, page_size=page_size,
                            remember_digests=remember_digests, limits=limits, upstream=upstream,
                            upstream_token=upstream_token, offline=offline, refresh=refresh)
    except OSError as exc:
        from ..errors import CoremlHubError

        raise CoremlHubError(f"Cannot listen on {host}:{port}: {exc.strerror or exc}",
                             hint="Pick another --port, or --port 0 for a free one.") from None


def serve(root: Path, host: str = "127.0.0.1", port: int = 0, *, log_path: Path | None = None,
          page_size: int = DEFAULT_PAGE_SIZE, warm: bool = True, remember_digests: bool = True,
          limits: Limits | None = None, upstream: str | None = None, upstream_token: str | None = None,
          offline: bool = False, refresh: float = DEFAULT_REFRESH,
          on_ready: Callable[[MirrorServer], None] | None = None) -> None:
    """Serve until interrupted (Ctrl-C or SIGTERM); links out of ROOT are named once on stderr first."""
    server = make_server(root, host, port, log_path=log_path, page_size=page_size,
                         remember_digests=remember_digests, limits=limits, upstream=upstream,
                         upstream_token=upstream_token, offline=offline, refresh=refresh)
    warn_links_out(server.store)

    def _stop(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _stop)
    try:
        if warm:
            server.warm_in_background()
        if on_ready is not None:
            on_ready(server)
        server.serve_forever(poll_interval=0.2)
    except KeyboardInterrupt:
        print("Stopped.", file=sys.stderr, flush=True)
    finally:
        server.server_close()


def _check_upstream(url: str) -> None:
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        from ..errors import UsageError

        raise UsageError(f"--upstream {url!r} is not an http(s) URL.",
                         hint="For example --upstream https://huggingface.co or --upstream http://10.0.0.5:8080.")


def warn_links_out(store: RepoStore, shown: int = 20) -> None:
    """One warning naming the links that lead out of ROOT (they are left out of every listing and 404)."""
    links = store.links_out()
    if not links:
        return
    what = "1 link that leads" if len(links) == 1 else f"{len(links)} links that lead"
    lines = [f"Warning: not serving {what} out of {store.root} (or to hidden files):"]
    lines += [f"  {path} -> {target}" for path, target in links[:shown]]
    if len(links) > shown:
        lines.append(f"  ... and {len(links) - shown} more")
    print("\n".join(lines), file=sys.stderr, flush=True)
