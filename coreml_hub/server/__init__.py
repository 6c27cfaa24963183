"""`coreml-hub serve`: a read-only Hugging Face Hub-compatible mirror of a folder of repos.

ROOT/<org>/<name>/ holds a repo's files as plain files; ROOT/<org>/<name>/.hub.json holds
optional metadata (likes, downloads, tags, pipeline_tag, library_name, lastModified,
createdAt, gated, private). The unmodified huggingface_hub client pointed at the server
with HF_ENDPOINT can search, inspect and download, with Range requests.
"""

from __future__ import annotations

import signal
import sys
import threading
from http.server import ThreadingHTTPServer
from pathlib import Path
from typing import Callable

from .handler import MirrorHandler, _InFlight
from .repos import RepoStore
from .requestlog import RequestLog

__all__ = ["MirrorServer", "make_server", "serve"]

DEFAULT_PAGE_SIZE = 1000


class MirrorServer(ThreadingHTTPServer):
    """One thread per connection; files stream with sendfile so memory stays flat."""

    daemon_threads = True
    request_queue_size = 128
    allow_reuse_address = True

    def __init__(self, root: Path, host: str, port: int, *, log_path: Path | None = None,
                 page_size: int = DEFAULT_PAGE_SIZE, remember_digests: bool = True) -> None:
        self.store = RepoStore(root, remember_digests=remember_digests)
        self.log = RequestLog(log_path)
        self.page_size = max(1, page_size)
        self._inflight = _InFlight()
        super().__init__((host, port), MirrorHandler)

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
        self.store.digests.save()
        self.log.close()


def make_server(root: Path, host: str = "127.0.0.1", port: int = 0, *, log_path: Path | None = None,
                page_size: int = DEFAULT_PAGE_SIZE, remember_digests: bool = True) -> MirrorServer:
    """A bound, not yet serving mirror; port 0 picks a free port (see `.url`)."""
    root = Path(root)
    if not root.is_dir():
        from ..errors import UsageError

        raise UsageError(f"{root} is not a folder.", hint="Pass a folder laid out as ROOT/<org>/<name>/.")
    try:
        return MirrorServer(root, host, port, log_path=log_path, page_size=page_size,
                            remember_digests=remember_digests)
    except OSError as exc:
        from ..errors import CoremlHubError

        raise CoremlHubError(f"Cannot listen on {host}:{port}: {exc.strerror or exc}",
                             hint="Pick another --port, or --port 0 for a free one.") from None


def serve(root: Path, host: str = "127.0.0.1", port: int = 0, *, log_path: Path | None = None,
          page_size: int = DEFAULT_PAGE_SIZE, warm: bool = True, remember_digests: bool = True,
          on_ready: Callable[[MirrorServer], None] | None = None) -> None:
    """Serve until interrupted (Ctrl-C or SIGTERM)."""
    server = make_server(root, host, port, log_path=log_path, page_size=page_size,
                         remember_digests=remember_digests)

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
