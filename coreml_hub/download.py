"""A resumable, parallel, retrying HTTP downloader for Hub files.

Each file streams into `<dest>.part`, hashed (sha256) while it is written. A sidecar
`<dest>.part.json` keeps the server's ETag so a later process can resume with an HTTP
Range request: it re-hashes the bytes already on disk, asks for the rest with `If-Range`,
and starts the file over when the server answers with the whole file or a different ETag.
A finished file is checked against its size and LFS sha256, then renamed to `<dest>`.
Dropped connections and 5xx answers are retried with exponential backoff; each retry
continues from the last byte written.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
import time
from concurrent.futures import FIRST_EXCEPTION, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

from .errors import CoremlHubError, DownloadError, EntryNotFound, GatedRepo, RepoNotFound, RevisionNotFound

READ_SIZE = 1 << 20  # bytes asked of the socket layer per read
WRITE_BUFFER = 8 << 20  # big buffered writes: few syscalls per GB
HASH_BLOCK = 8 << 20
PROGRESS_STEP = 1 << 20  # report progress in steps of at least this much

RETRYABLE_STATUS = {408, 429, 500, 502, 503, 504}

ProgressFn = Callable[[int], None]


def _env_number(name: str, default: float) -> float:
    raw = os.environ.get(name)
    try:
        return float(raw) if raw else default
    except ValueError:
        return default


@dataclass(frozen=True)
class DownloadJob:
    """One file to fetch: where from, where to, and what it must be."""

    name: str  # shown in messages, e.g. the repo path
    url: str
    dest: Path
    size: int | None = None
    sha256: str | None = None


@dataclass(frozen=True)
class Downloaded:
    """One finished file."""

    name: str
    dest: Path
    size: int
    sha256: str
    transferred: int  # bytes that came over the network in this run
    resumed_from: int  # bytes that were already on disk when this run started
    skipped: bool  # complete before this run: nothing transferred


class _Restart(Exception):
    """The partial file cannot be continued: start it over."""


class _Cancelled(Exception):
    """Another file failed or the user interrupted: stop quietly."""


def part_path(dest: Path) -> Path:
    return dest.with_name(dest.name + ".part")


def meta_path(dest: Path) -> Path:
    return dest.with_name(dest.name + ".part.json")


def present_bytes(job: DownloadJob) -> int:
    """Bytes of this file already on disk (complete file or resumable part)."""
    if job.dest.is_file() and (job.size is None or job.dest.stat().st_size == job.size):
        return job.dest.stat().st_size
    try:
        n = part_path(job.dest).stat().st_size
    except OSError:
        return 0
    return n if job.size is None or n <= job.size else 0


def sha256_file(path: Path, limit: int | None = None) -> tuple[Any, int]:
    """A running sha256 of the first `limit` bytes of a file (all of it when None), and the count read."""
    h = hashlib.sha256()
    read = 0
    with open(path, "rb", buffering=0) as fh:
        while limit is None or read < limit:
            want = HASH_BLOCK if limit is None else min(HASH_BLOCK, limit - read)
            block = fh.read(want)
            if not block:
                break
            h.update(block)
            read += len(block)
    return h, read


class Downloader:
    """Fetch files over one pooled HTTP client; safe to use from several threads."""

    def __init__(self, *, headers: dict[str, str] | None = None, workers: int | None = None,
                 retries: int | None = None, backoff: float | None = None, timeout: float | None = None) -> None:
        import httpx2

        self.workers = max(1, int(workers or _env_number("COREML_HUB_DOWNLOAD_WORKERS", 4)))
        self.retries = int(retries if retries is not None else _env_number("COREML_HUB_DOWNLOAD_RETRIES", 5))
        self.backoff = float(backoff if backoff is not None else _env_number("COREML_HUB_RETRY_WAIT", 1.0))
        read_timeout = float(timeout if timeout is not None else _env_number("COREML_HUB_DOWNLOAD_TIMEOUT", 60.0))
        base = dict(headers or {})
        # Resuming needs raw bytes: a compressed answer cannot be continued at a byte offset.
        base["Accept-Encoding"] = "identity"
        self._client = httpx2.Client(
            headers=base,
            follow_redirects=True,
            timeout=httpx2.Timeout(read_timeout, connect=min(read_timeout, 15.0)),
            limits=httpx2.Limits(max_connections=self.workers * 2, max_keepalive_connections=self.workers * 2),
            trust_env=True,
        )
        self._cancel = threading.Event()

    def close(self) -> None:
        self._client.close()

    def __enter__(self) -> "Downloader":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def cancel(self) -> None:
        self._cancel.set()

    # -- many files ------------------------------------------------------------------------------

    def fetch_all(self, jobs: Iterable[DownloadJob], progress: ProgressFn | None = None) -> list[Downloaded]:
        """Fetch files in parallel, largest first; the first failure cancels the rest (their parts stay)."""
        ordered = sorted(jobs, key=lambda j: -(j.size or 0))
        if not ordered:
            return []
        if len(ordered) == 1 or self.workers == 1:
            return [self.fetch(job, progress) for job in ordered]
        results: dict[str, Downloaded] = {}
        pool = ThreadPoolExecutor(max_workers=min(self.workers, len(ordered)), thread_name_prefix="coreml-hub-dl")
        futures: dict[Future[Downloaded], DownloadJob] = {}
        try:
            for job in ordered:
                futures[pool.submit(self.fetch, job, progress)] = job
            done, pending = wait(futures, return_when=FIRST_EXCEPTION)
            failed = [f for f in done if f.exception() is not None and not isinstance(f.exception(), _Cancelled)]
            if failed or pending:
                self._cancel.set()
                wait(pending)
                first = failed[0] if failed else next(f for f in done if f.exception() is not None)
                raise first.exception()  # type: ignore[misc]
            for future, job in futures.items():
                results[job.name] = future.result()
        except BaseException:
            self._cancel.set()
            raise
        finally:
            pool.shutdown(wait=True, cancel_futures=True)
        return [results[job.name] for job in ordered]

    # -- one file --------------------------------------------------------------------------------

    def fetch(self, job: DownloadJob, progress: ProgressFn | None = None) -> Downloaded:
        """Fetch one file, resuming a part left by an earlier run; returns once `job.dest` is complete."""
        report = progress or (lambda n: None)
        dest, part, meta = job.dest, part_path(job.dest), meta_path(job.dest)
        dest.parent.mkdir(parents=True, exist_ok=True)
        if dest.is_file() and (job.size is None or dest.stat().st_size == job.size):
            return self._already_complete(job)
        started_with = present_bytes(job)
        restarted = False
        while True:
            try:
                digest, size, transferred = self._fetch_into_part(job, part, meta, report)
                break
            except _Restart:
                if restarted:
                    raise DownloadError(f"{job.name}: the server kept sending content that does not match "
                                        "what the repo lists.") from None
                restarted = True
                on_disk = part.stat().st_size if part.exists() else 0
                part.unlink(missing_ok=True)
                meta.unlink(missing_ok=True)
                report(-on_disk)
        os.replace(part, dest)
        meta.unlink(missing_ok=True)
        return Downloaded(name=job.name, dest=dest, size=size, sha256=digest, transferred=transferred,
                          resumed_from=0 if restarted else started_with, skipped=False)

    def _already_complete(self, job: DownloadJob) -> Downloaded:
        # a finished file in staging was checked before its rename; hash only to report it
        if job.sha256:
            sha = job.sha256
        else:
            sha = sha256_file(job.dest)[0].hexdigest()
        return Downloaded(name=job.name, dest=job.dest, size=job.dest.stat().st_size, sha256=sha,
                          transferred=0, resumed_from=job.dest.stat().st_size, skipped=True)

    def _load_meta(self, job: DownloadJob, meta: Path) -> dict[str, Any]:
        try:
            data = json.loads(meta.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return {}
        if not isinstance(data, dict):
            return {}
        # a part written for other content (another commit's file at this path) cannot be continued
        if job.sha256 and data.get("sha256") not in (None, job.sha256):
            return {"stale": True}
        if job.size is not None and data.get("size") not in (None, job.size):
            return {"stale": True}
        return data

    def _fetch_into_part(self, job: DownloadJob, part: Path, meta: Path, report: ProgressFn) -> tuple[str, int, int]:
        """Stream the rest of the file into `part`; returns (sha256, size, bytes transferred)."""
        import httpx2

        info = self._load_meta(job, meta)
        if info.get("stale"):
            raise _Restart()
        offset = part.stat().st_size if part.exists() else 0
        if job.size is not None and offset > job.size:
            raise _Restart()
        hasher, hashed = sha256_file(part, offset) if offset else (hashlib.sha256(), 0)
        if hashed != offset:
            raise _Restart()
        etag = info.get("etag")
        transferred = 0
        failures = 0
        last_error: BaseException | None = None
        while True:
            if self._cancel.is_set():
                raise _Cancelled()
            if job.size is not None and offset == job.size and offset > 0:
                break
            headers: dict[str, str] = {}
            if offset:
                headers["Range"] = f"bytes={offset}-"
                if etag:
                    headers["If-Range"] = etag
            progressed = 0
            try:
                with self._client.stream("GET", job.url, headers=headers) as response:
                    status = response.status_code
                    if status in RETRYABLE_STATUS:
                        raise _Retryable(f"HTTP {status}")
                    if status == 416 and offset:
                        raise _Restart()
                    if status >= 400:
                        raise _http_error(job, response)
                    new_etag = response.headers.get("ETag")
                    if offset:
                        if status == 200 or (etag and new_etag and new_etag != etag):
                            raise _Restart()  # the server sent the whole file, or another version of it
                        if not _range_starts_at(response.headers.get("Content-Range"), offset):
                            raise _Restart()
                    total = _total_size(response, offset)
                    if job.size is not None and total is not None and total != job.size:
                        raise DownloadError(f"{job.name}: the server sends {total} bytes but the repo lists "
                                            f"{job.size}.", hint="The repo changed while pulling; pull again.")
                    if not offset or etag != new_etag:
                        etag = new_etag
                        _write_meta(meta, {"url": job.url, "etag": etag, "size": job.size or total,
                                           "sha256": job.sha256})
                    with open(part, "ab", buffering=WRITE_BUFFER) as fh:
                        pending = 0
                        try:
                            for chunk in response.iter_raw(READ_SIZE):
                                if self._cancel.is_set():
                                    raise _Cancelled()
                                fh.write(chunk)
                                hasher.update(chunk)
                                n = len(chunk)
                                offset += n
                                progressed += n
                                pending += n
                                if pending >= PROGRESS_STEP:
                                    report(pending)
                                    pending = 0
                        finally:
                            if pending:
                                report(pending)
                    transferred += progressed
                    if total is not None and offset < total:
                        raise _Retryable(f"connection closed after {offset} of {total} bytes")
                    break
            except (_Restart, _Cancelled, CoremlHubError):
                raise
            except (_Retryable, httpx2.TransportError, OSError) as exc:
                if isinstance(exc, OSError) and not isinstance(exc, (ConnectionError, TimeoutError)) \
                        and not _is_network_oserror(exc):
                    raise
                transferred += progressed
                last_error = exc
                if progressed:
                    failures = 0  # the server is making progress: keep going
                failures += 1
                if failures > self.retries:
                    raise DownloadError(
                        f"Downloading {job.name} failed after {self.retries} retries "
                        f"({offset} of {job.size if job.size is not None else '?'} bytes on disk): "
                        f"{_describe(last_error)}",
                    ) from None
                delay = min(self.backoff * (2 ** (failures - 1)), 30.0)
                if self._cancel.wait(delay):
                    raise _Cancelled() from None
        size = offset
        if job.size is not None and size != job.size:
            raise DownloadError(f"{job.name}: got {size} bytes, expected {job.size}.")
        digest = hasher.hexdigest()
        if job.sha256 and digest != job.sha256:
            raise _Restart()
        return digest, size, transferred


class _Retryable(Exception):
    pass


def _is_network_oserror(exc: OSError) -> bool:
    import errno

    return exc.errno in {errno.ECONNRESET, errno.ECONNREFUSED, errno.ECONNABORTED, errno.EPIPE,
                         errno.ETIMEDOUT, errno.EHOSTUNREACH, errno.ENETUNREACH}


def _describe(exc: BaseException | None) -> str:
    if exc is None:
        return "unknown error"
    text = str(exc).splitlines()[0] if str(exc) else ""
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _write_meta(meta: Path, data: dict[str, Any]) -> None:
    tmp = meta.with_name(meta.name + ".tmp")
    tmp.write_text(json.dumps(data), encoding="utf-8")
    os.replace(tmp, meta)


def _range_starts_at(content_range: str | None, offset: int) -> bool:
    if not content_range:
        return False
    try:
        spec = content_range.split()[1]
        return int(spec.split("-", 1)[0]) == offset
    except (IndexError, ValueError):
        return False


def _total_size(response: Any, offset: int) -> int | None:
    content_range = response.headers.get("Content-Range")
    if content_range and "/" in content_range:
        tail = content_range.rsplit("/", 1)[1]
        if tail.isdigit():
            return int(tail)
    length = response.headers.get("Content-Length")
    if length and length.isdigit():
        return int(length) + (offset if response.status_code == 206 else 0)
    return None


def _http_error(job: DownloadJob, response: Any) -> CoremlHubError:
    code = response.headers.get("X-Error-Code")
    status = response.status_code
    message = response.headers.get("X-Error-Message") or response.reason_phrase or ""
    if code == "RepoNotFound":
        return RepoNotFound(f"{job.name}: repository not found ({message}).")
    if code == "RevisionNotFound":
        return RevisionNotFound(f"{job.name}: revision not found ({message}).")
    if code == "EntryNotFound" or status == 404:
        return EntryNotFound(f"{job.name} is not in the repo (HTTP 404).",
                             hint="The repo changed while pulling; pull again.")
    if code == "GatedRepo" or status in (401, 403):
        return GatedRepo(f"{job.name}: access denied (HTTP {status}; {message}).")
    return DownloadError(f"{job.name}: HTTP {status} {message}".rstrip(), hint=None)


def hub_headers(token: str | None) -> dict[str, str]:
    """User agent and, when there is one, the token header huggingface_hub would send."""
    from huggingface_hub.utils import build_hf_headers

    from . import __version__

    return build_hf_headers(token=token if token else False, library_name="coreml-hub", library_version=__version__)
