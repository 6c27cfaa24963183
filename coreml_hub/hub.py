"""The remote side: search the Hub, list a repo's files, find its variants.

Everything here reads HF_ENDPOINT, HF_HUB_OFFLINE and HF_TOKEN when called (huggingface_hub
itself reads the first two at import), so a mirror or a token set later still applies.
Failures come out as coreml_hub.errors types that name the repo and the endpoint.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING, Any, Iterable, Iterator, Sequence

from .version import __version__
from .errors import (CoremlHubError, EndpointUnreachable, NoVariants, OfflineError, UsageError, translate,
                     unreachable_hint)
from .layouts import RepoFile, Variant, find_variants

if TYPE_CHECKING:
    from pathlib import Path

    from huggingface_hub import HfApi

DEFAULT_ENDPOINT = "https://huggingface.co"
_TRUE = {"1", "on", "yes", "true"}

# `sort` names coreml-hub accepts -> the name huggingface_hub's list_models takes
SORTS = {
    "likes": "likes",
    "downloads": "downloads",
    "updated": "last_modified",
    "last_modified": "last_modified",
    "lastModified": "last_modified",
    "created": "created_at",
    "created_at": "created_at",
    "trending": "trending_score",
    "trending_score": "trending_score",
}

# What one search request asks for per repo: enough for the catalog, including file names.
_SEARCH_EXPAND = ["author", "downloads", "gated", "lastModified", "library_name", "likes", "pipeline_tag",
                  "private", "siblings", "tags"]


def endpoint() -> str:
    """HF_ENDPOINT as set now, without a trailing slash; the public Hub when unset."""
    return (os.environ.get("HF_ENDPOINT") or DEFAULT_ENDPOINT).rstrip("/")


def checked_endpoint() -> str:
    """`endpoint()`, refused at once when it is not an http(s) URL (a typo would otherwise surface
    as a confusing name-resolution or connection error)."""
    where = endpoint()
    scheme, sep, rest = where.partition("://")
    if not sep or scheme.lower() not in ("http", "https") or not rest.strip("/"):
        what = f"its scheme {scheme!r} is neither http nor https" if sep else "it is not a URL"
        raise EndpointUnreachable(f"HF_ENDPOINT is {where!r}: {what}.",
                                  hint="Set HF_ENDPOINT to e.g. https://huggingface.co or http://127.0.0.1:8080, "
                                       "or unset it to use the Hub.")
    return where


def offline() -> bool:
    """HF_HUB_OFFLINE (or TRANSFORMERS_OFFLINE) as set now."""
    raw = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE") or ""
    return raw.strip().lower() in _TRUE


def token() -> str | None:
    """The token huggingface_hub would send now (HF_TOKEN, else the saved login); never printed."""
    from huggingface_hub import get_token

    return get_token()


def api(url: str | None = None, token_value: str | None = None) -> "HfApi":
    """An HfApi bound to the endpoint and token as set now, or to `url` and `token_value` when given
    (a mirror's upstream)."""
    from huggingface_hub import HfApi

    return HfApi(endpoint=url or checked_endpoint(), token=token_value or token(), library_name="coreml-hub",
                 library_version=__version__)


@dataclass(frozen=True)
class RepoSnapshot:
    """A repo's file list and metadata at one commit."""

    repo_id: str
    revision: str  # as asked ("main", a branch, a sha)
    sha: str  # the commit it resolved to
    files: tuple[RepoFile, ...]
    last_modified: datetime | None = None
    created_at: datetime | None = None
    likes: int | None = None
    downloads: int | None = None
    tags: tuple[str, ...] = ()
    pipeline_tag: str | None = None
    library_name: str | None = None
    gated: bool | str = False
    private: bool = False
    endpoint: str = DEFAULT_ENDPOINT

    def to_dict(self) -> dict[str, Any]:
        return {
            "repo_id": self.repo_id,
            "revision": self.revision,
            "sha": self.sha,
            "endpoint": self.endpoint,
            "last_modified": _iso(self.last_modified),
            "created_at": _iso(self.created_at),
            "likes": self.likes,
            "downloads": self.downloads,
            "tags": list(self.tags),
            "pipeline_tag": self.pipeline_tag,
            "library_name": self.library_name,
            "gated": self.gated,
            "private": self.private,
            "files": [{"path": f.path, "size": f.size, "sha256": f.sha256} for f in self.files],
        }


@dataclass(frozen=True)
class ModelSummary:
    """One search hit: metadata plus the variants its file names reveal."""

    repo_id: str
    author: str | None = None
    likes: int | None = None
    downloads: int | None = None
    last_modified: datetime | None = None
    tags: tuple[str, ...] = ()
    pipeline_tag: str | None = None
    library_name: str | None = None
    gated: bool | str = False
    private: bool = False
    files: tuple[str, ...] = ()
    variants: tuple[Variant, ...] = field(default=(), compare=False)

    def to_dict(self) -> dict[str, Any]:
        return {
            "repo_id": self.repo_id,
            "author": self.author,
            "likes": self.likes,
            "downloads": self.downloads,
            "last_modified": _iso(self.last_modified),
            "tags": list(self.tags),
            "pipeline_tag": self.pipeline_tag,
            "library_name": self.library_name,
            "gated": self.gated,
            "private": self.private,
            "variants": [v.id for v in self.variants],
            "files": len(self.files),
        }


def _iso(when: datetime | None) -> str | None:
    return when.isoformat().replace("+00:00", "Z") if when is not None else None


def _metadata(info: Any) -> dict[str, Any]:
    """The fields RepoSnapshot and ModelSummary share, from a huggingface_hub ModelInfo."""
    return {
        "likes": info.likes,
        "downloads": info.downloads,
        "last_modified": info.last_modified,
        "tags": tuple(info.tags or ()),
        "pipeline_tag": info.pipeline_tag,
        "library_name": info.library_name,
        "gated": info.gated or False,
        "private": bool(info.private),
    }


def _check_reachable() -> None:
    """Fail at once when nothing listens at the endpoint.

    huggingface_hub retries paginated listings on refused connections for ~25 s; a TCP
    connect tells in milliseconds. Skipped behind a proxy, where only the proxy can tell.
    """
    checked_endpoint()
    if any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY",
                                       "all_proxy")):
        return
    import socket
    from urllib.parse import urlsplit

    where = endpoint()
    parts = urlsplit(where)
    if not parts.hostname:
        raise EndpointUnreachable(f"HF_ENDPOINT is not a URL: {where!r}.",
                                  hint="Set HF_ENDPOINT to e.g. https://huggingface.co or http://127.0.0.1:8080.")
    port = parts.port or (443 if parts.scheme == "https" else 80)
    try:
        socket.create_connection((parts.hostname, port), timeout=10).close()
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__
        raise EndpointUnreachable(f"Cannot reach {where}: {reason}.", hint=unreachable_hint(where)) from None


def _require_online(what: str) -> None:
    if offline():
        raise OfflineError(f"HF_HUB_OFFLINE is set, so coreml-hub cannot {what}.")


@contextmanager
def hub_errors(repo_id: str | None = None, revision: str | None = None) -> Iterator[None]:
    """Turn huggingface_hub / HTTP failures into coreml-hub errors that name the repo and endpoint."""
    try:
        yield
    except CoremlHubError:
        raise
    except Exception as exc:
        known = translate(exc, repo_id, revision, endpoint=endpoint())
        if known is None:
            raise
        raise known from exc


def _files_from_siblings(siblings: Iterable[Any]) -> tuple[RepoFile, ...]:
    out = []
    for s in siblings:
        lfs = getattr(s, "lfs", None)
        size = s.size if s.size is not None else (lfs.size if lfs is not None else 0)
        out.append(RepoFile(path=s.rfilename, size=int(size or 0), sha256=lfs.sha256 if lfs is not None else None))
    return tuple(sorted(out, key=lambda f: f.path))


def repo_files(repo_id: str, revision: str | None = None) -> RepoSnapshot:
    """The repo's files with sizes and LFS sha256 at `revision` (default `main`): one request,
    or two when a server leaves the sizes out of its model info."""
    _require_online(f"list the files of {repo_id}")
    client = api()
    with hub_errors(repo_id, revision):
        info = client.model_info(repo_id, revision=revision, files_metadata=True)
        siblings = list(info.siblings or [])
        if not siblings or any(s.size is None for s in siblings):
            # a server that omits sizes in model_info still lists them in the tree
            from huggingface_hub.hf_api import RepoFile as HfRepoFile

            tree = [f for f in client.list_repo_tree(repo_id, revision=info.sha or revision, recursive=True)
                    if isinstance(f, HfRepoFile)]
            files = tuple(sorted((RepoFile(path=f.path, size=f.size, sha256=f.lfs.sha256 if f.lfs else None)
                                  for f in tree), key=lambda f: f.path))
        else:
            files = _files_from_siblings(siblings)
    if not info.sha:
        raise CoremlHubError(f"{endpoint()} did not say which commit {repo_id} is at.",
                             hint="Check that HF_ENDPOINT points at a Hugging Face Hub or a coreml-hub mirror.")
    return RepoSnapshot(repo_id=info.id or repo_id, revision=revision or "main", sha=info.sha, files=files,
                        created_at=info.created_at, endpoint=endpoint(), **_metadata(info))


def download_files(repo_id: str, patterns: Sequence[str], *, revision: str | None = None) -> "Path":
    """Fetch the files of `repo_id` matching `patterns` (a tokenizer's few files, say) into the
    Hugging Face cache and return the snapshot folder; offline, the cached copy or an OfflineError."""
    from pathlib import Path

    from huggingface_hub import snapshot_download

    kwargs: dict[str, Any] = {"revision": revision, "allow_patterns": list(patterns), "endpoint": endpoint(),
                              "token": token(), "library_name": "coreml-hub", "library_version": __version__}
    if offline():
        try:
            return Path(snapshot_download(repo_id, local_files_only=True, **kwargs))
        except Exception:
            raise OfflineError(f"HF_HUB_OFFLINE is set and no copy of {repo_id}'s files is cached here.",
                               hint=f"Unset HF_HUB_OFFLINE once, so the files of {repo_id} can be fetched.") from None
    _check_reachable()
    with hub_errors(repo_id, revision):
        return Path(snapshot_download(repo_id, **kwargs))


def no_variants(snapshot: RepoSnapshot) -> NoVariants:
    """The error for a repo without Core ML variants; a diffusers pipeline is pointed at `convert`."""
    repo = snapshot.repo_id
    if any(f.path == "model_index.json" for f in snapshot.files):
        return NoVariants(f"{repo} is a diffusers pipeline (it has model_index.json), not Core ML bundles.",
                          hint=f"Convert it with `coreml-hub convert {repo} -o OUT`, then run "
                               "`coreml-hub run OUT \"PROMPT\"`.")
    return NoVariants(f"{repo} has no Core ML variant coreml-hub recognizes "
                      f"({len(snapshot.files)} file{'' if len(snapshot.files) == 1 else 's'} at {snapshot.sha[:7]}).")


def repo_variants(repo_id: str, revision: str | None = None) -> tuple[RepoSnapshot, list[Variant]]:
    """The repo's snapshot and the variants the layout plugins find in it (possibly none)."""
    snapshot = repo_files(repo_id, revision)
    return snapshot, find_variants(list(snapshot.files))


def search_models(
    *,
    filter: str | Sequence[str] | None = None,  # noqa: A002 - the Hub's own name
    search: str | None = None,
    author: str | None = None,
    pipeline_tag: str | None = None,
    sort: str | None = None,
    limit: int | None = 20,
) -> list[ModelSummary]:
    """Search the Hub; each hit carries its variants, found from the file names in the same response."""
    _require_online("search the Hub")
    if sort is not None and sort not in SORTS:
        raise UsageError(f"Unknown sort {sort!r}.", hint=f"Use one of: {', '.join(sorted(set(SORTS)))}.")
    filters = [filter] if isinstance(filter, str) else list(filter or [])
    _check_reachable()
    with hub_errors():
        models = list(api().list_models(
            filter=filters or None,
            search=search or None,
            author=author or None,
            pipeline_tag=pipeline_tag or None,
            sort=SORTS[sort] if sort else None,
            limit=limit,
            expand=_SEARCH_EXPAND,
        ))
    out = []
    for info in models:
        # siblings are missing only when a server ignored `expand`: then one request for this repo
        files = repo_files(info.id).files if info.siblings is None else _files_from_siblings(info.siblings)
        out.append(ModelSummary(repo_id=info.id, author=info.author, files=tuple(f.path for f in files),
                                variants=tuple(find_variants(list(files))), **_metadata(info)))
    return out
