"""The pull-through part of `serve ROOT --upstream URL`: what ROOT lacks comes from upstream once.

ROOT keeps what it fetched in the Hugging Face cache layout, which `serve` reads (repos.py):

    ROOT/models--<org>--<name>/snapshots/<commit>/.hub.json   upstream's model info at that commit
    ROOT/models--<org>--<name>/refs/<branch>                    the commit a branch was at
    ROOT/models--<org>--<name>/snapshots/<commit>/<path>        a link to ../../blobs/<sha256 or blob id>
    ROOT/.coreml-hub-mirror/staging/                            transfers in progress (resumable)
    ROOT/.coreml-hub-mirror/stats.json                          hits, misses, bytes (`serve --stats`)

- Revisions are pinned the way the Hub pins them: a branch resolves to upstream's commit (asked
  again once `refresh` seconds have passed), a commit is immutable, and every answer carries
  upstream's commit id and listing.
- A file is fetched by one background transfer, however many clients ask for it: they stream
  it from the staging file as it grows, each from its own offset. The transfer is coreml-hub's
  resumable downloader (download.py): a transfer cut by a restart continues with a Range request.
  LFS files are checked against upstream's sha256, others against their git blob id, before
  they join ROOT.
- Upstream down: what ROOT holds is served as is; anything else is a 502 in the Hub's error shape.
"""

from __future__ import annotations

import json
import os
import re
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Callable
from urllib.parse import quote

from ..atomic import write_text_atomic
from ..safeserve import clean_parts
from .hashing import git_blob_sha1, lfs_pointer
from .repos import META_FILE, Entry, RepoStore, cache_folder, valid_repo_path

MIRROR_DIR = ".coreml-hub-mirror"
STATS_FILE = "stats.json"
DEFAULT_REFRESH = 60.0  # seconds a branch's commit is trusted before upstream is asked again
RETRY_DOWN = 5.0  # seconds before asking an unreachable upstream again about a revision ROOT holds
INFO_TIMEOUT = 30.0
_COMMIT = re.compile(r"[0-9a-f]{40}")
_BLOB_KEY = re.compile(r"[0-9a-f]{40}|[0-9a-f]{64}")


class MirrorError(Exception):
    """An answer in the Hub's error shape: status, X-Error-Code, message (the handler sends it)."""

    def __init__(self, status: int, code: str | None, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message


class TransferFailed(Exception):
    """A transfer stopped before the bytes a client waits for arrived."""


# -- statistics ---------------------------------------------------------------------------------


@dataclass
class RepoStats:
    hits: int = 0  # file requests answered from ROOT
    misses: int = 0  # file requests that needed upstream (the one that started a transfer, and those joining it)
    bytes_served: int = 0  # file bytes sent to clients
    bytes_from_upstream: int = 0  # file bytes that came over from upstream

    @property
    def bytes_saved(self) -> int:
        """Bytes clients got that upstream did not have to send."""
        return max(0, self.bytes_served - self.bytes_from_upstream)

    def to_dict(self) -> dict[str, int]:
        return {"hits": self.hits, "misses": self.misses, "bytes_served": self.bytes_served,
                "bytes_from_upstream": self.bytes_from_upstream, "bytes_saved": self.bytes_saved}


@dataclass
class MirrorStats:
    """Counters per repo, kept in ROOT/.coreml-hub-mirror/stats.json across restarts."""

    path: Path
    repos: dict[str, RepoStats] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _dirty: bool = False
    _saved: float = 0.0

    @classmethod
    def load(cls, root: Path) -> "MirrorStats":
        path = Path(root) / MIRROR_DIR / STATS_FILE
        stats = cls(path)
        try:
            data = json.loads(path.read_text())
            for repo_id, row in (data.get("repos") or {}).items():
                stats.repos[repo_id] = RepoStats(**{k: int(row.get(k, 0)) for k in
                                                    ("hits", "misses", "bytes_served", "bytes_from_upstream")})
        except (OSError, ValueError, TypeError, AttributeError):
            pass  # no stats yet, or unreadable: start counting again
        return stats

    def served(self, repo_id: str, nbytes: int, *, hit: bool) -> None:
        with self._lock:
            row = self.repos.setdefault(repo_id, RepoStats())
            if hit:
                row.hits += 1
            else:
                row.misses += 1
            row.bytes_served += nbytes
            self._dirty = True
        self._maybe_save()

    def fetched(self, repo_id: str, nbytes: int) -> None:
        with self._lock:
            self.repos.setdefault(repo_id, RepoStats()).bytes_from_upstream += nbytes
            self._dirty = True
        self._maybe_save()

    def total(self) -> RepoStats:
        out = RepoStats()
        for row in self.repos.values():
            out.hits += row.hits
            out.misses += row.misses
            out.bytes_served += row.bytes_served
            out.bytes_from_upstream += row.bytes_from_upstream
        return out

    def _maybe_save(self) -> None:
        if time.monotonic() - self._saved > 2.0:
            self.save()

    def save(self) -> None:
        with self._lock:
            if not self._dirty:
                return
            self._dirty = False
            self._saved = time.monotonic()
            data = {"repos": {k: v.to_dict() for k, v in sorted(self.repos.items())}}
        try:
            write_text_atomic(self.path, json.dumps(data, indent=1))
        except OSError:
            pass  # a read-only ROOT: counters live in memory only


# -- one file on its way from upstream ------------------------------------------------------------


class Transfer:
    """One file being fetched; clients read it from the staging file as it grows."""

    def __init__(self, repo_id: str, staged: Path, blob: Path, size: int, already: int) -> None:
        self.repo_id = repo_id
        self.staged = staged
        self.part = staged.with_name(staged.name + ".part")
        self.blob = blob
        self.size = size
        self.available = already  # bytes of the contiguous prefix on disk
        self.generation = 0  # bumped when the downloader starts the file over
        self.state = "running"  # running | done | failed
        self.error: str | None = None
        self.failure: MirrorError | None = None  # how to answer a client that has not had headers yet
        self.cond = threading.Condition()

    @classmethod
    def complete(cls, repo_id: str, blob: Path, size: int) -> "Transfer":
        done = cls(repo_id, blob, blob, size, size)
        done.state = "done"
        return done

    def advance(self, nbytes: int) -> None:
        """The downloader's progress callback: bytes written (negative when it starts over)."""
        with self.cond:
            if nbytes < 0:
                self.available = 0
                self.generation += 1
            else:
                self.available += nbytes
            self.cond.notify_all()

    def finish(self) -> None:
        with self.cond:
            self.state = "done"
            self.available = self.size
            self.cond.notify_all()

    def fail(self, message: str, failure: MirrorError) -> None:
        with self.cond:
            self.state = "failed"
            self.error = message
            self.failure = failure
            self.cond.notify_all()

    def started(self, wait: float = 60.0) -> None:
        """Return once bytes arrive or the transfer ends; raise its failure (as the Hub would answer it) when
        it failed before any byte came, so a client gets an error status instead of a cut-off body."""
        deadline = time.monotonic() + wait
        with self.cond:
            while self.state == "running" and self.available == 0 and time.monotonic() < deadline:
                self.cond.wait(min(1.0, max(0.0, deadline - time.monotonic())))
            if self.state == "failed" and self.failure is not None:
                raise self.failure

    def _open(self) -> IO[bytes]:
        """The file under whichever name it has now (part, staged, blob); called with the lock held, so
        the last rename (to the blob) cannot happen in between."""
        for path in ((self.blob,) if self.state == "done" else (self.part, self.staged, self.blob)):
            try:
                return open(path, "rb")  # noqa: SIM115 - closed by stream()
            except FileNotFoundError:
                continue
        raise TransferFailed(f"{self.blob.name} vanished while it was being fetched")

    def stream(self, send: Callable[[IO[bytes], int, int], int], start: int, length: int,
               wait: float = 600.0) -> int:
        """Send bytes [start, start + length) as they arrive; returns the count sent.

        Raises TransferFailed when the transfer fails, starts over, or stalls for `wait` seconds.
        """
        pos, end = start, start + length
        handle: IO[bytes] | None = None
        generation = None
        try:
            while pos < end:
                with self.cond:
                    deadline = time.monotonic() + wait
                    while self.state == "running" and self.available <= pos:
                        left = deadline - time.monotonic()
                        if left <= 0:
                            raise TransferFailed("upstream sent nothing for too long")
                        self.cond.wait(min(left, 5.0))
                    if self.state == "failed":
                        raise TransferFailed(self.error or "the transfer failed")
                    if generation is not None and generation != self.generation:
                        raise TransferFailed("upstream's content changed during the transfer")
                    ready = min(end, self.size if self.state == "done" else self.available)
                    if handle is None:
                        handle = self._open()
                        generation = self.generation
                sent = send(handle, pos, ready - pos)
                if sent <= 0:
                    raise TransferFailed("the client stopped reading")
                pos += sent
            return pos - start
        finally:
            if handle is not None:
                handle.close()


# -- the upstream ---------------------------------------------------------------------------------


class Upstream:
    """Fills ROOT from another Hub on demand; shared by every request thread of one `serve`."""

    def __init__(self, store: RepoStore, url: str, token: str | None = None, *,
                 refresh: float = DEFAULT_REFRESH) -> None:
        from ..download import Downloader, hub_headers

        self.store = store
        self.root = store.root
        self.url = url.rstrip("/")
        self.token = token
        self.refresh = refresh
        self.stats = MirrorStats.load(self.root)
        self.staging = self.root / MIRROR_DIR / "staging"
        # one request per file, appending: a client can read the staging file up to its size
        self.downloader = Downloader(headers=hub_headers(token), workers=1, segments=1)
        self._lock = threading.Lock()
        self._checked: dict[tuple[str, str], float] = {}  # (repo, revision) -> when upstream last answered
        self._filling: dict[tuple[str, str], threading.Lock] = {}
        self._transfers: dict[tuple[str, str], Transfer] = {}
        self._warned: set[str] = set()

    def close(self) -> None:
        self.stats.save()
        self.downloader.close()

    # -- revisions and listings -------------------------------------------------------------------

    def fill(self, repo_id: str, revision: str) -> None:
        """Make sure ROOT knows `revision` of the repo as upstream has it now; raises MirrorError."""
        if repo_id.count("/") != 1 or not valid_repo_path(repo_id) or "--" in repo_id \
                or clean_parts(revision) is None:
            return  # a name no repo has: the store answers 404
        if self.store.is_plain(repo_id):
            return  # a folder of ROOT/<org>/<name> is served as it is
        pinned = _COMMIT.fullmatch(revision) is not None
        if self._fresh(repo_id, revision, pinned):
            return
        with self._lock:
            gate = self._filling.setdefault((repo_id, revision), threading.Lock())
        with gate:  # concurrent requests for one revision make one upstream request
            if self._fresh(repo_id, revision, pinned):
                return
            try:
                info = self._fetch_info(repo_id, revision)
            except MirrorError as err:
                if err.status >= 500 and self._held(repo_id, revision, pinned):
                    self._note_down(err.message)
                    self._checked[(repo_id, revision)] = time.monotonic() - self.refresh + RETRY_DOWN
                    return  # serve what ROOT holds
                raise
            self._keep_info(repo_id, revision, info)
            self._checked[(repo_id, revision)] = time.monotonic()

    def _fresh(self, repo_id: str, revision: str, pinned: bool) -> bool:
        if pinned:
            return self._held(repo_id, revision, pinned)  # a commit never changes
        when = self._checked.get((repo_id, revision))
        return when is not None and time.monotonic() - when < self.refresh and self._held(repo_id, revision, pinned)

    def _held(self, repo_id: str, revision: str, pinned: bool) -> bool:
        """Whether ROOT can answer for the revision without upstream."""
        if pinned:
            repo = self.store.get(repo_id, revision)
            return repo is not None and repo.commit == revision
        return self.store.ref(repo_id, revision) is not None

    def _note_down(self, message: str) -> None:
        if message not in self._warned:
            self._warned.add(message)
            print(f"Warning: {message}; serving what {self.root} holds.", file=sys.stderr, flush=True)

    def _fetch_info(self, repo_id: str, revision: str) -> dict[str, Any]:
        """Upstream's model info with every file's size, blob id and LFS sha256, as a JSON document."""
        from .. import errors
        from ..hub import api, hub_errors

        client = api(self.url, self.token)
        try:
            with hub_errors(repo_id, revision):
                info = client.model_info(repo_id, revision=revision, files_metadata=True, timeout=INFO_TIMEOUT)
                files = [(s.rfilename, s.size, s.blob_id, s.lfs) for s in info.siblings or []]
                if any(size is None or blob is None for _p, size, blob, _l in files):
                    from huggingface_hub.hf_api import RepoFile

                    files = [(f.path, f.size, f.blob_id, f.lfs) for f in
                             client.list_repo_tree(repo_id, revision=info.sha or revision, recursive=True)
                             if isinstance(f, RepoFile)]
        except errors.RepoNotFound as exc:
            raise MirrorError(404, "RepoNotFound", f"Repository not found upstream ({exc.message})") from None
        except errors.RevisionNotFound as exc:
            raise MirrorError(404, "RevisionNotFound", f"Invalid rev id: {revision} ({exc.message})") from None
        except errors.GatedRepo as exc:
            raise MirrorError(403, "GatedRepo", exc.message) from None
        except errors.CoremlHubError as exc:
            raise MirrorError(502, "UpstreamUnavailable", f"Cannot get {repo_id}@{revision} from the upstream "
                                                          f"{self.url}: {exc.message}") from None
        sha = info.sha or ""
        if not _COMMIT.fullmatch(sha):
            raise MirrorError(502, "UpstreamUnavailable", f"The upstream {self.url} did not name the commit of "
                                                          f"{repo_id}@{revision}.")
        siblings = []
        for path, size, blob_id, lfs in files:
            item: dict[str, Any] = {"rfilename": path, "size": int(size or 0), "blobId": blob_id}
            if lfs is not None:
                item["lfs"] = {"sha256": lfs.sha256, "size": lfs.size,
                               "pointerSize": getattr(lfs, "pointer_size", None)
                               or len(lfs_pointer(lfs.sha256, lfs.size))}
            siblings.append(item)
        card = getattr(info, "card_data", None)
        return {
            "id": info.id or repo_id, "sha": sha, "private": bool(info.private), "gated": info.gated or False,
            "likes": info.likes or 0, "downloads": info.downloads or 0, "tags": list(info.tags or []),
            "pipeline_tag": info.pipeline_tag, "library_name": info.library_name,
            "lastModified": _iso(info.last_modified), "createdAt": _iso(info.created_at),
            "cardData": card.to_dict() if card is not None and hasattr(card, "to_dict") else None,
            "siblings": siblings,
        }

    def _keep_info(self, repo_id: str, revision: str, info: dict[str, Any]) -> None:
        """Write the snapshot's .hub.json and the branch's ref (each atomically)."""
        base = self.root / cache_folder(repo_id)
        sha = info["sha"]
        meta = {k: v for k, v in info.items() if v is not None}
        meta_path = base / "snapshots" / sha / META_FILE
        text = json.dumps(meta, indent=1, sort_keys=True)
        try:
            unchanged = meta_path.read_text() == text
        except OSError:
            unchanged = False
        if not unchanged:
            write_text_atomic(meta_path, text)
        if revision != sha:
            ref = base / "refs" / revision
            try:
                same = ref.read_text().strip() == sha
            except OSError:
                same = False
            if not same:
                write_text_atomic(ref, sha)

    # -- files ------------------------------------------------------------------------------------

    def transfer(self, repo_id: str, commit: str, entry: Entry) -> Transfer:
        """The transfer of a listed file ROOT lacks: a running one, or a new one started here."""
        digest = entry.digest
        if digest is None or not _COMMIT.fullmatch(commit):
            raise MirrorError(502, "UpstreamUnavailable", f"{entry.path} has no upstream content id.")
        key = digest.sha256 or digest.blob_id
        if not _BLOB_KEY.fullmatch(key):
            raise MirrorError(502, "UpstreamUnavailable", f"{entry.path} has an invalid content id upstream.")
        base = self.root / cache_folder(repo_id)
        blob = base / "blobs" / key
        with self._lock:
            running = self._transfers.get((repo_id, key))
            if running is not None:
                return running
            if blob.is_file() and blob.stat().st_size == entry.size:  # another commit brought the same content
                self._link(base, commit, entry.path, blob)
                return Transfer.complete(repo_id, blob, entry.size)
            from ..download import present_bytes

            staged = self.staging / f"{cache_folder(repo_id)}--{key}"
            transfer = Transfer(repo_id, staged, blob, entry.size, present_bytes(staged, entry.size))
            self._transfers[(repo_id, key)] = transfer
        thread = threading.Thread(target=self._fetch, args=(transfer, repo_id, commit, entry, key),
                                  name=f"mirror-fetch-{key[:8]}", daemon=True)
        thread.start()
        return transfer

    def _fetch(self, transfer: Transfer, repo_id: str, commit: str, entry: Entry, key: str) -> None:
        from ..download import DownloadJob

        assert entry.digest is not None
        job = DownloadJob(name=f"{repo_id}/{entry.path}", url=f"{self.url}/{quote(repo_id)}/resolve/{commit}/"
                          f"{quote(entry.path)}", dest=transfer.staged, size=entry.size, sha256=entry.digest.sha256)
        base = self.root / cache_folder(repo_id)
        try:
            got = self.downloader.fetch(job, progress=transfer.advance)
            self.stats.fetched(repo_id, got.transferred)
            if entry.digest.sha256 is None and _git_blob_id(transfer.staged) != entry.digest.blob_id:
                transfer.staged.unlink(missing_ok=True)
                raise MirrorError(502, "UpstreamUnavailable", f"{entry.path} from upstream does not match its "
                                                              "blob id.")
            transfer.blob.parent.mkdir(parents=True, exist_ok=True)
            with transfer.cond:  # readers open the file by name with this lock held: no rename slips between
                os.replace(transfer.staged, transfer.blob)
            self._link(base, commit, entry.path, transfer.blob)
            transfer.finish()
        except BaseException as exc:  # the part stays in staging: the next request resumes it
            message = getattr(exc, "message", None) or f"{type(exc).__name__}: {exc}"
            print(f"Warning: fetching {repo_id}/{entry.path} from {self.url} failed: {message}", file=sys.stderr,
                  flush=True)
            transfer.fail(message, _as_answer(exc, self.url))
        finally:
            with self._lock:
                if self._transfers.get((repo_id, key)) is transfer:
                    del self._transfers[(repo_id, key)]

    @staticmethod
    def _link(base: Path, commit: str, path: str, blob: Path) -> None:
        """snapshots/<commit>/<path> -> the blob, relative (as huggingface_hub's cache does), put in place atomically."""
        link = base / "snapshots" / commit / path
        link.parent.mkdir(parents=True, exist_ok=True)
        tmp = link.with_name(f".{link.name}.{os.getpid()}.{threading.get_ident()}.link")
        tmp.unlink(missing_ok=True)
        os.symlink(os.path.relpath(blob, link.parent), tmp)
        os.replace(tmp, link)


def _as_answer(exc: BaseException, url: str) -> MirrorError:
    """A failed transfer as the Hub's error for the client: upstream's refusal relayed, anything else a 502."""
    from .. import errors

    if isinstance(exc, MirrorError):
        return exc
    message = getattr(exc, "message", None) or f"{type(exc).__name__}: {exc}"
    if isinstance(exc, errors.GatedRepo):
        return MirrorError(403, "GatedRepo", f"The upstream {url} refused the file: {message}")
    if isinstance(exc, errors.RepoNotFound):
        return MirrorError(404, "RepoNotFound", message)
    if isinstance(exc, (errors.EntryNotFound, errors.RevisionNotFound)):
        return MirrorError(404, "EntryNotFound", message)
    return MirrorError(502, "UpstreamUnavailable", f"Fetching from the upstream {url} failed: {message}")


def _git_blob_id(path: Path) -> str:
    return git_blob_sha1(path.read_bytes())  # only files outside LFS (under 10 MB) get here


def _iso(when: Any) -> str | None:
    """The Hub's timestamp form: `2024-01-31T12:00:00.000Z`."""
    if when is None:
        return None
    if not hasattr(when, "astimezone"):
        return str(when)
    from datetime import timezone

    stamp = when.astimezone(timezone.utc)
    return stamp.strftime("%Y-%m-%dT%H:%M:%S.") + f"{stamp.microsecond // 1000:03d}Z"
