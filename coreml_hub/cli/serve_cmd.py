"""`coreml-hub serve`: run the read-only Hub mirror."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import click

from ..safeserve import DEFAULT_HEADER_TIMEOUT, DEFAULT_IDLE_TIMEOUT, DEFAULT_MAX_CONNECTIONS

if TYPE_CHECKING:
    from ..server import MirrorServer


@click.command(
    "serve",
    epilog="""\b
Examples:
  coreml-hub serve ./mirror --port 8080
  HF_ENDPOINT=http://127.0.0.1:8080 coreml-hub list --author apple
  coreml-hub serve ./mirror --port 0 --log-requests requests.jsonl
  coreml-hub serve ~/.cache/huggingface/hub            # a Hugging Face cache as the mirror
  coreml-hub serve ./mirror --host 0.0.0.0 --max-connections 1024 --idle-timeout 30

\b
ROOT layout:
  ROOT/<org>/<name>/...              the repo's files, as plain files
  ROOT/<org>/<name>/.hub.json        optional: likes, downloads, tags, pipeline_tag,
                                     library_name, lastModified, gated, private
  ROOT/.tokens                       bearer tokens (one a line) that may read gated
                                     and private repos; also COREML_HUB_SERVE_TOKENS=a,b
  ROOT/models--<org>--<name>/        a Hugging Face cache folder: serves refs/main's snapshot
Files and folders whose name starts with "." are not served, nor is anything whose real
path is outside ROOT: a symlink is followed only when its target is inside ROOT (links
that lead out are named once at start). File hashes (the Hub's blob ids and LFS sha256)
are computed once and kept in ROOT/.coreml-hub-digests.json when ROOT is writable, so
restarting a large mirror is quick.

\b
Limits (safe defaults for a LAN mirror):
  request bodies     paths-info takes at most 1 MiB (413 beyond, before reading it)
  --header-timeout   a request's line and headers must arrive within this (408)
  --idle-timeout     an idle keep-alive connection, or a stalled body or download, is closed
  --max-connections  beyond this, the oldest idle connection is closed; if none is idle, 503
A failure inside the server answers 500 with a request id only; the details go to stderr.""",
)
@click.argument("root", type=click.Path(file_okay=False, path_type=Path))
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on (0.0.0.0 for a LAN mirror).")
@click.option("--port", default=8080, show_default=True, type=click.IntRange(0, 65535),
              help="Port to listen on; 0 picks a free one.")
@click.option("--log-requests", "log_requests", type=click.Path(dir_okay=False, path_type=Path),
              help="Append one JSON line per request (method, path, status, range, bytes, time) to FILE.")
@click.option("--page-size", default=1000, show_default=True, type=click.IntRange(1, 100000),
              help="Entries per page in model and file listings (the Hub uses 1000).")
@click.option("--no-warm", is_flag=True, help="Hash files on first request instead of at startup.")
@click.option("--no-digest-cache", is_flag=True,
              help="Do not keep file hashes in ROOT/.coreml-hub-digests.json across restarts.")
@click.option("--header-timeout", default=DEFAULT_HEADER_TIMEOUT, show_default=True,
              type=click.FloatRange(min=0, min_open=True), metavar="SECONDS",
              help="Time a client has to send a request's line and headers.")
@click.option("--idle-timeout", default=DEFAULT_IDLE_TIMEOUT, show_default=True,
              type=click.FloatRange(min=0, min_open=True), metavar="SECONDS",
              help="Time a connection may wait for its next request, or stall while sending or receiving.")
@click.option("--max-connections", default=DEFAULT_MAX_CONNECTIONS, show_default=True,
              type=click.IntRange(min=1), help="Open connections at most (one thread each).")
def serve_cmd(root: Path, host: str, port: int, log_requests: Path | None, page_size: int, no_warm: bool,
              no_digest_cache: bool, header_timeout: float, idle_timeout: float, max_connections: int) -> None:
    """Serve a folder of repos as a read-only Hugging Face Hub mirror.

    Point any huggingface_hub client (and coreml-hub itself) at it with HF_ENDPOINT.
    Prints `Serving ROOT at URL` on stdout once it accepts connections.
    """
    from ..server import Limits, serve

    def announce(server: MirrorServer) -> None:
        click.echo(f"Serving {root} at {server.url}")
        click.get_text_stream("stdout").flush()

    limits = Limits(header_timeout=header_timeout, idle_timeout=idle_timeout, max_connections=max_connections)
    serve(root, host, port, log_path=log_requests, page_size=page_size, warm=not no_warm,
          remember_digests=not no_digest_cache, limits=limits, on_ready=announce)
