"""`coreml-hub serve`: run the read-only Hub mirror."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import click

from .limits import connection_limits

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
  coreml-hub serve ./cache --host 0.0.0.0 --upstream https://huggingface.co   # pull-through
  coreml-hub serve --stats ./cache                     # hits, misses, bytes saved

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
A failure inside the server answers 500 with a request id only; the details go to stderr.

\b
Pull-through (--upstream URL: the Hub, or another mirror):
  A repo, revision or file ROOT lacks is fetched from upstream, checked against its
  sha256 (LFS) or git blob id, kept in ROOT (ROOT/models--<org>--<name>/, the Hugging
  Face cache layout, with upstream's model info as .hub.json) and served; later
  requests come from ROOT. A branch resolves to upstream's commit (asked again after
  --refresh seconds); commits are upstream's. Concurrent requests for one file share
  one transfer; an interrupted transfer resumes (ROOT/.coreml-hub-mirror/staging).
  --upstream-token (default HF_TOKEN) reads gated repos upstream; clients still need
  a token of ROOT/.tokens for them here. Upstream down: what ROOT holds is served,
  anything else gets 502. --offline serves only ROOT.""",
)
@click.argument("root", type=click.Path(file_okay=False, path_type=Path))
@click.option("--upstream", default=None, metavar="URL",
              help="Fetch what ROOT lacks from this Hub or mirror (a pull-through cache).")
@click.option("--upstream-token", default=None, metavar="TOKEN",
              help="Token for gated and private repos upstream (default: HF_TOKEN).")
@click.option("--offline", is_flag=True, help="Serve only what ROOT holds; never ask the upstream.")
@click.option("--refresh", default=60.0, show_default=True, type=click.FloatRange(min=0), metavar="SECONDS",
              help="How long a branch's commit is trusted before the upstream is asked again.")
@click.option("--stats", "show_stats", is_flag=True,
              help="Print the pull-through statistics kept in ROOT (hits, misses, bytes) and exit.")
@click.option("--json", "json_mode", is_flag=True, help="With --stats: print them as JSON.")
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
@connection_limits(idle_help="Time a connection may wait for its next request, or stall while sending or receiving.",
                   max_help="Open connections at most (one thread each).")
def serve_cmd(root: Path, upstream: str | None, upstream_token: str | None, offline: bool, refresh: float,
              show_stats: bool, json_mode: bool, host: str, port: int, log_requests: Path | None, page_size: int,
              no_warm: bool, no_digest_cache: bool, header_timeout: float, idle_timeout: float,
              max_connections: int) -> None:
    """Serve a folder of repos as a read-only Hugging Face Hub mirror.

    Point any huggingface_hub client (and coreml-hub itself) at it with HF_ENDPOINT.
    Prints `Serving ROOT at URL` on stdout once it accepts connections.
    """
    if show_stats:
        _print_stats(root, json_mode)
        return
    from ..server import Limits, serve

    def announce(server: MirrorServer) -> None:
        click.echo(f"Serving {root} at {server.url}")
        click.get_text_stream("stdout").flush()

    limits = Limits(header_timeout=header_timeout, idle_timeout=idle_timeout, max_connections=max_connections)
    serve(root, host, port, log_path=log_requests, page_size=page_size, warm=not no_warm,
          remember_digests=not no_digest_cache, limits=limits, upstream=upstream,
          upstream_token=upstream_token or None, offline=offline, refresh=refresh, on_ready=announce)


def _print_stats(root: Path, json_mode: bool) -> None:
    from ..errors import UsageError
    from ..server import MirrorStats
    from .output import Column, Output, human_size

    if not root.is_dir():
        raise UsageError(f"{root} is not a folder.", hint="Pass the ROOT of a `coreml-hub serve --upstream` mirror.")
    stats = MirrorStats.load(root)
    total = stats.total()
    out = Output(json_mode=json_mode)
    if json_mode:
        out.json({"root": str(root), "total": total.to_dict(),
                  "repos": {k: v.to_dict() for k, v in sorted(stats.repos.items())}})
        return
    rows = [{"repo": k, **v.to_dict()} for k, v in sorted(stats.repos.items())]
    rows.append({"repo": "(all)", **total.to_dict()})
    out.table(rows, [Column("repo", "repo"), Column("hits", "hits"), Column("misses", "misses"),
                     Column("bytes_from_upstream", "from upstream", human_size),
                     Column("bytes_served", "served", human_size), Column("bytes_saved", "saved", human_size)])
    if not stats.repos:
        out.info(f"No pull-through statistics in {root} yet (they are kept by `coreml-hub serve ROOT --upstream URL`).")
