"""A resumable, parallel, retrying HTTP downloader for Hub files.

Every file is fetched into `<dest>.part`, next to a sidecar `<dest>.part.json` that records
the server's ETag and, for large files, how far each byte range has got. A finished file is
checked against its size and its LFS sha256, then renamed to `<dest>`.

- Small files stream in one request, hashed as they arrive. A later process resumes them
  with `Range: bytes=<size of the part>-`, after re-hashing the bytes already on disk.
- Large files (64 MB and up) are split into a few byte ranges fetched over parallel
  connections and written in place; the sha256 follows the contiguous prefix on disk, so it
  is ready moments after the last byte lands. The sidecar lists each range's progress, so a
  killed process loses at most a few megabytes per range.
- Every resumed request carries `If-Range: <ETag>`; an answer with the whole file or another
  ETag means the file changed, and it starts over.
- Dropped connections, timeouts and 5xx answers are retried with exponential backoff, each
  retry continuing from the last byte written; then DownloadError names the file.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import threading
from concurrent.futures import FIRST_EXCEPTION, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

from .atomic import write_text_atomic
from .errors import CoremlHubError, DownloadError, EntryNotFound, GatedRepo, RepoNotFound, RevisionNotFound

BATCH = 4 << 20  # received bytes gathered before one vectored write
HASH_BLOCK = 8 << 20
SEGMENT_MIN = 32 << 20  # a range is never smaller than this; files under 2x stream in one request
SAVE_EVERY = 16 << 20  # a range's progress is recorded after this many new bytes

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


class _Retryable(Exception):
    pass


def part_path(dest: Path) -> Path:
    return dest.with_name(dest.name + ".part")


def meta_path(dest: Path) -> Path:
    return dest.with_name(dest.name + ".part.json")


def _read_meta(meta: Path) -> dict[str, Any]:
    try:
        data = json.loads(meta.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _valid_segments(data: dict[str, Any], size: int | None) -> list[list[int]] | None:
    segs = data.get("segments")
    if not isinstance(segs, list) or size is None or not segs:
        return None
    out, expect = [], 0
    for seg in segs:
        if not (isinstance(seg, list) and len(seg) == 3 and all(isinstance(v, int) for v in seg)):
            return None
        start, end, done = seg
        if start != expect or end <= start or not 0 <= done <= end - start:
            return None
        out.append([start, end, done])
        expect = end
    return out if expect == size else None


def present_bytes(dest: Path, size: int | None) -> int:
    """Bytes of the file bound for `dest` already on disk and usable (complete file, or resumable part)."""
    try:
        if dest.is_file() and (size is None or dest.stat().st_size == size):
            return dest.stat().st_size
        n = part_path(dest).stat().st_size
    except OSError:
        return 0
    data = _read_meta(meta_path(dest))
    segs = _valid_segments(data, size)
    if segs is not None:
        return sum(done for _s, _e, done in segs)
    if not data:
        return 0  # a part without its sidecar cannot be trusted
    return n if size is None or n <= size else 0


def sha256_file(path: Path, limit: int | None = None, *, buffer: bytearray | None = None,
                on_bytes: ProgressFn | None = None) -> tuple[Any, int]:
    """A running sha256 of the first `limit` bytes of a file (all of it when None), and the count read.

    Reads into one buffer, reusable across files; hashlib releases the GIL, so threads hash in parallel.
    """
    h = hashlib.sha256()
    view = memoryview(buffer if buffer is not None else bytearray(HASH_BLOCK))
    read = 0
    with open(path, "rb", buffering=0) as fh:
        while limit is None or read < limit:
            n = fh.readinto(view if limit is None else view[:min(len(view), limit - read)])
            if not n:
                break
            h.update(view[:n])
            read += n
            if on_bytes is not None:
                on_bytes(n)
    return h, read


def split_ranges(start: int, end: int, count: int) -> list[list[int]]:
    """[start, end) cut into `count` ranges of about equal size, boundaries on 1 MiB."""
    step = max(SEGMENT_MIN, -(-(end - start) // count))
    step = -(-step // (1 << 20)) * (1 << 20)
    out = []
    pos = start
    while pos < end:
        nxt = min(end, pos + step)
        out.append([pos, nxt, 0])
        pos = nxt
    return out


class _FileState:
    """What the requests of one file share: its ETag, its sidecar, a stop flag."""

    def __init__(self, job: DownloadJob, meta: Path, etag: str | None, segments: list[list[int]] | None) -> None:
        self.job = job
        self.meta = meta
        self.etag = etag
        self.segments = segments
        self.lock = threading.Lock()
        self.changed = threading.Condition(self.lock)
        self.stop = threading.Event()
        self.running = 0  # range requests still going

    def check_etag(self, etag: str | None) -> None:
        """Remember the first ETag; any other later means another version of the file."""
        with self.lock:
            if etag is None:
                return
            if self.etag is None:
                self.etag = etag
                self._save_locked()
            elif etag != self.etag:
                raise _Restart()

    def save(self) -> None:
        with self.lock:
            self._save_locked()

    def _save_locked(self) -> None:
        data: dict[str, Any] = {"url": self.job.url, "etag": self.etag, "size": self.job.size,
                                "sha256": self.job.sha256}
        if self.segments is not None:
            data["segments"] = self.segments
        write_text_atomic(self.meta, json.dumps(data))


class Downloader:
    """Fetch files over one pooled HTTP client; safe to use from several threads."""

    def __init__(self, *, headers: dict[str, str] | None = None, workers: int | None = None,
                 retries: int | None = None, backoff: float | None = None, timeout: float | None = None,
                 segments: int | None = None) -> None:
        import httpx2

        self.workers = max(1, int(workers or _env_number("COREML_HUB_DOWNLOAD_WORKERS", 4)))
        self.segments = max(1, int(segments or _env_number("COREML_HUB_DOWNLOAD_SEGMENTS", 4)))
        self.retries = int(retries if retries is not None else _env_number("COREML_HUB_DOWNLOAD_RETRIES", 5))
        self.backoff = float(backoff if backoff is not None else _env_number("COREML_HUB_RETRY_WAIT", 1.0))
        read_timeout = float(timeout if timeout is not None else _env_number("COREML_HUB_DOWNLOAD_TIMEOUT", 60.0))
        base = dict(headers or {})
        # Resuming needs raw bytes: a compressed answer cannot be continued at a byte offset.
        base["Accept-Encoding"] = "identity"
        connections = self.workers * self.segments + 4
        self._client = httpx2.Client(
            headers=base,
            follow_redirects=True,
            timeout=httpx2.Timeout(read_timeout, connect=min(read_timeout, 15.0)),
            limits=httpx2.Limits(max_connections=connections, max_keepalive_connections=connections),
            trust_env=True,
        )
        self._cancel = threading.Event()

    def close(self) -> None:
        self._client.close()

    def __enter__(self) -> "Downloader":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- many files ------------------------------------------------------------------------------

    def fetch_all(self, jobs: Iterable[DownloadJob], progress: ProgressFn | None = None) -> list[Downloaded]:
        """Fetch files in parallel, largest first; the first failure cancels the rest (their parts stay)."""
        ordered = sorted(jobs, key=lambda j: -(j.size or 0))
        if not ordered:
            return []
        if len(ordered) == 1 or self.workers == 1:
            return [self.fetch(job, progress) for job in ordered]
        pool = ThreadPoolExecutor(max_workers=min(self.workers, len(ordered)), thread_name_prefix="coreml-hub-dl")
        futures: dict[Future[Downloaded], DownloadJob] = {}
        order = itertools.count()
        failures: list[tuple[int, BaseException]] = []

        def fetch(job: DownloadJob) -> Downloaded:
            try:
                return self.fetch(job, progress)
            except BaseException as exc:
                if not isinstance(exc, _Cancelled):
                    failures.append((next(order), exc))
                raise

        try:
            for job in ordered:
                futures[pool.submit(fetch, job)] = job
            done, pending = wait(futures, return_when=FIRST_EXCEPTION)
            failed = [f for f in done if f.exception() is not None]
            if failed:
                self._cancel.set()
                wait(pending)
                if failures:
                    raise min(failures, key=lambda item: item[0])[1]  # the first file that failed
                raise failed[0].exception()  # type: ignore[misc]
            return [future.result() for future in futures]
        except BaseException:
            self._cancel.set()
            raise
        finally:
            pool.shutdown(wait=True, cancel_futures=True)

    # -- one file --------------------------------------------------------------------------------

    def fetch(self, job: DownloadJob, progress: ProgressFn | None = None) -> Downloaded:
        """Fetch one file, resuming a part left by an earlier run; returns once `job.dest` is complete."""
        report = progress or (lambda n: None)
        dest, part, meta = job.dest, part_path(job.dest), meta_path(job.dest)
        dest.parent.mkdir(parents=True, exist_ok=True)
        if dest.is_file() and (job.size is None or dest.stat().st_size == job.size):
            return self._already_complete(job)
        started_with = present_bytes(job.dest, job.size)
        restarted = False
        while True:
            try:
                if job.size is not None and self.segments > 1 and job.size >= 2 * SEGMENT_MIN:
                    digest, transferred = self._fetch_ranges(job, part, meta, report)
                else:
                    digest, transferred = self._fetch_stream(job, part, meta, report)
                break
            except _Restart:
                if restarted:
                    raise DownloadError(f"{job.name}: the server kept sending content that does not match "
                                        "what the repo lists.") from None
                restarted = True
                report(-present_bytes(job.dest, job.size))
                part.unlink(missing_ok=True)
                meta.unlink(missing_ok=True)
        size = part.stat().st_size
        if job.size is not None and size != job.size:
            raise DownloadError(f"{job.name}: got {size} bytes, expected {job.size}.")
        os.replace(part, dest)
        meta.unlink(missing_ok=True)
        return Downloaded(name=job.name, dest=dest, size=size, sha256=digest, transferred=transferred,
                          resumed_from=0 if restarted else started_with, skipped=False)

    def _already_complete(self, job: DownloadJob) -> Downloaded:
        # a finished file in staging was checked before its rename; hash only to report it
        sha = job.sha256 or sha256_file(job.dest)[0].hexdigest()
        size = job.dest.stat().st_size
        return Downloaded(name=job.name, dest=job.dest, size=size, sha256=sha, transferred=0, resumed_from=size,
                          skipped=True)

    def _load_meta(self, job: DownloadJob, meta: Path) -> dict[str, Any] | None:
        """The sidecar of an earlier run; None when it describes other content (start over)."""
        data = _read_meta(meta)
        # a part written for other content (another commit's file at this path) cannot be continued
        if job.sha256 and data.get("sha256") not in (None, job.sha256):
            return None
        if job.size is not None and data.get("size") not in (None, job.size):
            return None
        return data

    # one request stream --------------------------------------------------------------------------

    def _fetch_stream(self, job: DownloadJob, part: Path, meta: Path, report: ProgressFn) -> tuple[str, int]:
        """The whole file in one request (resumed at the end of the part); hashed as it arrives."""
        info = self._load_meta(job, meta)
        if info is None or (part.exists() and not info) or _valid_segments(info, job.size) is not None:
            raise _Restart()  # no sidecar, or a ranged part: this mode cannot continue it
        offset = part.stat().st_size if part.exists() else 0
        if job.size is not None and offset > job.size:
            raise _Restart()
        hasher, hashed = sha256_file(part, offset) if offset else (hashlib.sha256(), 0)
        if hashed != offset:
            raise _Restart()
        state = _FileState(job, meta, info.get("etag"), None)
        if not meta.exists():
            state.save()
        fd = os.open(part, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        try:
            def write(chunks: list[bytes], _at: int) -> None:
                for chunk in chunks:
                    hasher.update(chunk)
                _write_all(fd, chunks, None)

            transferred = self._stream_range(job, offset, job.size, state, write, report)
        finally:
            os.close(fd)
        digest = hasher.hexdigest()
        if job.sha256 and digest != job.sha256:
            raise _Restart()
        return digest, transferred

    # parallel ranges ---------------------------------------------------------------------------

    def _fetch_ranges(self, job: DownloadJob, part: Path, meta: Path, report: ProgressFn) -> tuple[str, int]:
        """A large file over parallel range requests, written in place; the hash follows the prefix."""
        assert job.size is not None
        size = job.size
        info = self._load_meta(job, meta)
        if info is None:
            raise _Restart()
        segments = _valid_segments(info, size) if part.exists() else None
        if segments is None:
            done = 0
            if part.exists() and info and "segments" not in info:
                done = min(part.stat().st_size, size)  # a part from one streamed request: a done prefix
            else:
                part.unlink(missing_ok=True)
            segments = ([[0, done, done]] if done else []) + split_ranges(done, size, self.segments)
        state = _FileState(job, meta, info.get("etag"), segments)
        state.save()
        fd = os.open(part, os.O_RDWR | os.O_CREAT, 0o644)
        transferred = [0]
        try:
            pending = [i for i, (s, e, d) in enumerate(segments) if d < e - s]
            state.running = len(pending)
            pool = ThreadPoolExecutor(max_workers=max(1, len(pending)), thread_name_prefix="coreml-hub-range")
            try:
                futures = [pool.submit(self._fetch_segment, job, state, i, fd, report, transferred) for i in pending]
                digest = self._hash_following(fd, state, size)
                wait(futures)
                errors = [f.exception() for f in futures if f.exception() is not None]
            finally:
                state.stop.set()
                with state.changed:
                    state.changed.notify_all()
                pool.shutdown(wait=True)
            real = [e for e in errors if not isinstance(e, _Cancelled)]
            if real or errors:
                raise (real or errors)[0]  # type: ignore[misc]
            if digest is None:
                raise DownloadError(f"{job.name}: the download ended before every byte range was complete.")
        finally:
            os.close(fd)
        if job.sha256 and digest != job.sha256:
            raise _Restart()
        return digest, transferred[0]

    def _fetch_segment(self, job: DownloadJob, state: _FileState, index: int, fd: int, report: ProgressFn,
                       transferred: list[int]) -> None:
        seg = state.segments[index]  # type: ignore[index]
        since_save = [0]

        def write(chunks: list[bytes], at: int) -> None:
            n = _write_all(fd, chunks, at)
            with state.changed:
                seg[2] += n
                since_save[0] += n
                if since_save[0] >= SAVE_EVERY or seg[2] == seg[1] - seg[0]:
                    since_save[0] = 0
                    state._save_locked()
                state.changed.notify_all()

        try:
            got = self._stream_range(job, seg[0] + seg[2], seg[1], state, write, report)
        except BaseException:
            state.stop.set()
            with state.changed:
                state.running -= 1
                state._save_locked()
                state.changed.notify_all()
            raise
        with state.changed:
            transferred[0] += got
            state.running -= 1
            state.changed.notify_all()

    def _hash_following(self, fd: int, state: _FileState, size: int) -> str | None:
        """sha256 of the file, read as soon as each byte of the contiguous prefix is on disk."""
        h = hashlib.sha256()
        pos = 0
        segments = state.segments or []
        while pos < size:
            with state.changed:
                while True:
                    seg = next(s for s in segments if s[0] <= pos < s[1])
                    ready = seg[0] + seg[2]
                    if ready > pos:
                        break
                    if state.stop.is_set() or self._cancel.is_set() or state.running == 0:
                        return None  # a range failed, or all ended yet this byte never came
                    state.changed.wait(0.5)
            while pos < ready:
                block = os.pread(fd, min(HASH_BLOCK, ready - pos), pos)
                if not block:
                    raise DownloadError(f"{state.job.name}: the partial file shrank while downloading.")
                h.update(block)
                pos += len(block)
        return h.hexdigest()

    # the request loop ---------------------------------------------------------------------------

    def _stream_range(self, job: DownloadJob, start: int, end: int | None, state: _FileState,
                      write: Callable[[list[bytes], int], None], report: ProgressFn) -> int:
        """GET bytes [start, end) (to the end of the file when `end` is None), retrying until done.

        `write(chunks, offset)` stores each batch of received bytes; returns the bytes transferred.
        """
        import httpx2

        pos = start
        transferred = 0
        failures = 0
        while True:
            if self._cancel.is_set() or state.stop.is_set():
                raise _Cancelled()
            if end is not None and pos >= end:
                return transferred
            headers: dict[str, str] = {}
            partial_end = end is not None and job.size is not None and end < job.size
            ranged = pos > 0 or partial_end
            if ranged:
                headers["Range"] = f"bytes={pos}-{end - 1 if partial_end and end is not None else ''}"
                if state.etag:
                    headers["If-Range"] = state.etag
            progressed = 0
            try:
                with self._client.stream("GET", job.url, headers=headers) as response:
                    status = response.status_code
                    if status in RETRYABLE_STATUS:
                        raise _Retryable(f"HTTP {status}")
                    if status == 416 and pos > 0:
                        raise _Restart()
                    if status >= 400:
                        raise _http_error(job, response)
                    if ranged and (status != 206 or not _range_starts_at(response.headers.get("Content-Range"), pos)):
                        raise _Restart()  # the server sent the whole file: it changed, or ignores ranges
                    state.check_etag(response.headers.get("ETag"))
                    total = _total_size(response, pos)
                    if job.size is not None and total is not None and total != job.size:
                        raise DownloadError(f"{job.name}: the server sends {total} bytes but the repo lists "
                                            f"{job.size}.", hint="The repo changed while pulling; pull again.")
                    stop_at = end if end is not None else total
                    batch: list[bytes] = []
                    batch_size = 0
                    try:
                        for chunk in response.iter_raw():
                            if self._cancel.is_set() or state.stop.is_set():
                                raise _Cancelled()
                            if stop_at is not None and pos + batch_size + len(chunk) > stop_at:
                                chunk = chunk[: stop_at - pos - batch_size]
                            batch.append(chunk)
                            batch_size += len(chunk)
                            if batch_size >= BATCH:
                                write(batch, pos)
                                pos += batch_size
                                progressed += batch_size
                                # cleared before reporting: if `report` raises, nothing is written twice
                                written, batch, batch_size = batch_size, [], 0
                                report(written)
                            if stop_at is not None and pos + batch_size >= stop_at:
                                break
                    finally:
                        if batch:  # keep what arrived, even when the connection broke mid-batch
                            write(batch, pos)
                            pos += batch_size
                            progressed += batch_size
                            written, batch, batch_size = batch_size, [], 0
                            report(written)
                    transferred += progressed
                    progressed = 0
                    if stop_at is not None and pos < stop_at:
                        raise _Retryable(f"connection closed after {pos} of {stop_at} bytes")
                    return transferred
            except (_Restart, _Cancelled, CoremlHubError):
                raise
            except (_Retryable, httpx2.TransportError, OSError) as exc:
                if isinstance(exc, OSError) and not isinstance(exc, (ConnectionError, TimeoutError)) \
                        and not _is_network_oserror(exc):
                    raise
                transferred += progressed
                if progressed:
                    failures = 0  # the server is making progress: keep going
                failures += 1
                if failures > self.retries:
                    raise DownloadError(
                        f"Downloading {job.name} failed after {self.retries} retries "
                        f"({_on_disk(pos, job)} of {job.size if job.size is not None else '?'} bytes on disk): "
                        f"{_describe(exc)}",
                    ) from None
                delay = min(self.backoff * (2 ** (failures - 1)), 30.0)
                if self._cancel.wait(delay):
                    raise _Cancelled() from None


def _on_disk(pos: int, job: DownloadJob) -> int:
    found = present_bytes(job.dest, job.size)
    return found if found else pos


def _write_all(fd: int, chunks: list[bytes], at: int | None) -> int:
    """Write every chunk at `at` (or append when None) with as few system calls as possible."""
    total = sum(len(c) for c in chunks)
    views = [memoryview(c) for c in chunks if c]
    written = 0
    while views:
        if at is None:
            n = os.writev(fd, views)
        elif hasattr(os, "pwritev"):
            n = os.pwritev(fd, views, at + written)
        else:
            n = os.pwrite(fd, b"".join(views), at + written)
        written += n
        while views and n >= len(views[0]):
            n -= len(views[0])
            views.pop(0)
        if n and views:
            views[0] = views[0][n:]
    return total


def _is_network_oserror(exc: OSError) -> bool:
    import errno

    return exc.errno in {errno.ECONNRESET, errno.ECONNREFUSED, errno.ECONNABORTED, errno.EPIPE,
                         errno.ETIMEDOUT, errno.EHOSTUNREACH, errno.ENETUNREACH}


def _describe(exc: BaseException | None) -> str:
    if exc is None:
        return "unknown error"
    text = str(exc).splitlines()[0] if str(exc) else ""
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


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

    from .version import __version__

    return build_hf_headers(token=token if token else False, library_name="coreml-hub", library_version=__version__)
