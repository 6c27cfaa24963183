"""Jobs: a queue that runs them one after another on a worker thread, their states, and the
event bus that tells every open page (and API stream) what changed.

A job is queued, then running, then done, failed or cancelled; a failed or cancelled job
says why in `message` (and `hint`). Workers call the library; the web layer only reads
snapshots and subscribes to events, from the asyncio loop, without blocking it.
"""

from __future__ import annotations

import asyncio
import itertools
import secrets
import threading
import time
import traceback
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Callable

QUEUED, RUNNING, DONE, FAILED, CANCELLED = "queued", "running", "done", "failed", "cancelled"
FINISHED = (DONE, FAILED, CANCELLED)
KEEP_FINISHED = 200  # finished jobs remembered for the Queue page and the API


class JobCancelled(Exception):
    """Raised inside a job (from a progress callback) to stop it where it is."""


class QueueFull(Exception):
    """More jobs are waiting than the queue takes."""


@dataclass
class Failure:
    """Why a job failed, in the words the API and the page show."""

    message: str
    hint: str | None = None
    kind: str = "server_error"  # invalid_request_error, not_found_error, server_error
    status: int = 500
    param: str | None = None  # the request field at fault


@dataclass
class Job:
    """One unit of work and everything a client may want to know about it."""

    id: str
    kind: str  # "generate" or "pull"
    title: str
    params: dict[str, Any]  # what was asked, as JSON
    payload: Any = None  # what the runner works from (e.g. the checked request)
    created: float = field(default_factory=time.time)
    state: str = QUEUED
    started: float | None = None
    finished: float | None = None
    position: int | None = None  # place in the line while queued, from 1
    phase: str = "Waiting for the jobs before it"
    progress: dict[str, Any] = field(default_factory=dict)
    message: str | None = None  # why it failed or was cancelled
    hint: str | None = None
    failure: Failure | None = None
    result: dict[str, Any] | None = None
    preview: str | None = None  # the latest preview image as a data URL
    preview_step: int | None = None
    cancel_requested: threading.Event = field(default_factory=threading.Event)
    done: threading.Event = field(default_factory=threading.Event)

    def snapshot(self, *, with_preview: bool = True) -> dict[str, Any]:
        data = {
            "id": self.id, "kind": self.kind, "title": self.title, "params": self.params, "state": self.state,
            "created": self.created, "started": self.started, "finished": self.finished, "position": self.position,
            "phase": self.phase, "progress": self.progress, "message": self.message, "hint": self.hint,
            "result": self.result, "preview_step": self.preview_step,
            "param": self.failure.param if self.failure else None,
        }
        if with_preview:
            data["preview"] = self.preview
        return data


class EventBus:
    """Fan-out of events from worker threads to asyncio subscribers (pages and API streams).

    A subscriber that stops reading does not hold the others up: once its queue is full it is
    marked `lagging` and gets a fresh snapshot instead of the events it missed.
    """

    def __init__(self, queue_size: int = 500) -> None:
        self._lock = threading.Lock()
        self._subscribers: set[Subscription] = set()
        self._queue_size = queue_size

    def subscribe(self) -> "Subscription":
        sub = Subscription(asyncio.get_running_loop(), asyncio.Queue(self._queue_size))
        with self._lock:
            self._subscribers.add(sub)
        return sub

    def unsubscribe(self, sub: "Subscription") -> None:
        with self._lock:
            self._subscribers.discard(sub)

    def publish(self, event: dict[str, Any]) -> None:
        with self._lock:
            subscribers = list(self._subscribers)
        for sub in subscribers:
            try:
                sub.loop.call_soon_threadsafe(sub.put, event)
            except RuntimeError:  # its loop is closed: the server is stopping
                self.unsubscribe(sub)


@dataclass(eq=False)
class Subscription:
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue
    lagging: bool = False

    def put(self, event: dict[str, Any]) -> None:
        try:
            self.queue.put_nowait(event)
        except asyncio.QueueFull:
            self.lagging = True

    async def get(self, timeout: float) -> dict[str, Any] | None:
        """The next event, or None after `timeout` seconds without one."""
        try:
            return await asyncio.wait_for(self.queue.get(), timeout)
        except asyncio.TimeoutError:
            return None

    def drain(self) -> None:
        while not self.queue.empty():
            self.queue.get_nowait()
        self.lagging = False


class Reporter:
    """What a running job may do: say what it is doing, report progress and a preview, check for cancel."""

    def __init__(self, queue: "JobQueue", job: Job) -> None:
        self._queue = queue
        self.job = job

    def check_cancelled(self) -> None:
        if self.job.cancel_requested.is_set():
            raise JobCancelled()

    @property
    def cancelled(self) -> bool:
        return self.job.cancel_requested.is_set()

    def phase(self, text: str, **progress: Any) -> None:
        self.check_cancelled()
        with self._queue.lock:
            self.job.phase = text
            self.job.progress = progress
        self._queue.changed(self.job)

    def progress(self, **progress: Any) -> None:
        self.check_cancelled()
        with self._queue.lock:
            self.job.progress = progress
        self._queue.changed(self.job)

    def preview(self, data_url: str, step: int) -> None:
        with self._queue.lock:
            self.job.preview, self.job.preview_step = data_url, step
        self._queue.bus.publish({"type": "preview", "id": self.job.id, "step": step, "image": data_url})


Runner = Callable[[Job, Reporter], dict[str, Any]]
Classifier = Callable[[BaseException], Failure]


class JobQueue:
    """Jobs of one kind, run in order on one worker thread; `max_waiting` bounds the line."""

    def __init__(self, name: str, runner: Runner, bus: EventBus, classify: Classifier, *, max_waiting: int = 64,
                 log: Callable[[str], None] | None = None) -> None:
        self.name = name
        self.bus = bus
        self.lock = threading.RLock()
        self._runner = runner
        self._classify = classify
        self._max_waiting = max_waiting
        self._log = log or (lambda _line: None)
        self._jobs: OrderedDict[str, Job] = OrderedDict()
        self._waiting: list[Job] = []
        self._wake = threading.Condition(self.lock)
        self._closing = False
        self._counter = itertools.count(1)
        self._thread = threading.Thread(target=self._work, name=f"coreml-hub-app-{name}", daemon=True)
        self._thread.start()

    # -- what clients do ---------------------------------------------------------------------------

    def submit(self, kind: str, title: str, params: dict[str, Any], payload: Any = None) -> Job:
        with self.lock:
            if self._closing:
                raise QueueFull("The app is shutting down.")
            if len(self._waiting) >= self._max_waiting:
                raise QueueFull(f"{len(self._waiting)} {self.name} jobs are already waiting; the queue takes "
                                f"{self._max_waiting}.")
            job = Job(id=f"{next(self._counter)}-{secrets.token_hex(4)}", kind=kind, title=title, params=params,
                      payload=payload)
            self._jobs[job.id] = job
            self._waiting.append(job)
            self._renumber()
            self._forget_old()
            self._wake.notify()
        self.changed(job)
        return job

    def get(self, job_id: str) -> Job | None:
        with self.lock:
            return self._jobs.get(job_id)

    def jobs(self) -> list[Job]:
        with self.lock:
            return list(self._jobs.values())

    def cancel(self, job_id: str) -> Job | None:
        """Cancel a queued job at once, a running one at its next step; a finished one stays as it is."""
        with self.lock:
            job = self._jobs.get(job_id)
            if job is None or job.state in FINISHED:
                return job
            job.cancel_requested.set()
            if job.state == QUEUED:
                self._waiting.remove(job)
                self._renumber()
                self._finish(job, CANCELLED, message="Cancelled before it started.")
                return job
            job.phase = "Cancelling at the next step"
        self.changed(job)
        return job

    def close(self) -> None:
        """Cancel everything and stop the worker (running jobs stop at their next step)."""
        with self.lock:
            self._closing = True
            for job in list(self._waiting):
                self.cancel(job.id)
            for job in self._jobs.values():
                if job.state == RUNNING:
                    job.cancel_requested.set()
            self._wake.notify_all()
        self._thread.join(timeout=30)

    # -- the worker --------------------------------------------------------------------------------

    def _work(self) -> None:
        while True:
            with self.lock:
                while not self._waiting and not self._closing:
                    self._wake.wait()
                if self._closing:
                    return
                job = self._waiting.pop(0)
                job.state, job.started, job.position, job.phase = RUNNING, time.time(), None, "Starting"
                self._renumber()
            self.changed(job)
            try:
                result = self._runner(job, Reporter(self, job))
            except JobCancelled:
                step = job.progress.get("step")
                where = f" at step {step}/{job.progress.get('total')}" if step else ""
                self._finish(job, CANCELLED, message=f"Cancelled{where}.")
            except BaseException as exc:  # a crash inside one job fails that job, never the worker
                failure = self._classify(exc)
                if failure.status >= 500:
                    self._log(f"{self.name} job {job.id} failed:\n{traceback.format_exc()}")
                self._finish(job, FAILED, failure=failure)
            else:
                self._finish(job, DONE, result=result)

    def _finish(self, job: Job, state: str, *, message: str | None = None, failure: Failure | None = None,
                result: dict[str, Any] | None = None) -> None:
        with self.lock:
            job.state, job.finished, job.position = state, time.time(), None
            job.phase = {DONE: "Done", FAILED: "Failed", CANCELLED: "Cancelled"}[state]
            job.failure = failure
            job.message = failure.message if failure else message
            job.hint = failure.hint if failure else None
            job.result = result
            job.done.set()
        self.changed(job)

    def _renumber(self) -> None:
        for index, waiting in enumerate(self._waiting, start=1):
            waiting.position = index
        for waiting in self._waiting:
            self.bus.publish({"type": "job", "job": waiting.snapshot(with_preview=False)})

    def _forget_old(self) -> None:
        finished = [j for j in self._jobs.values() if j.state in FINISHED]
        for job in finished[: max(0, len(finished) - KEEP_FINISHED)]:
            del self._jobs[job.id]

    def changed(self, job: Job) -> None:
        with self.lock:
            event = {"type": "job", "job": job.snapshot(with_preview=False)}
        self.bus.publish(event)


async def wait_for(job: Job, bus: EventBus, *, poll: Callable[[], Any] | None = None, every: float = 1.0) -> None:
    """Wait, without a thread, until `job` has finished; `poll()` (awaitable) runs every `every` seconds."""
    sub = bus.subscribe()
    try:
        while not job.done.is_set():
            await sub.get(every)
            if sub.lagging:
                sub.drain()
            if poll is not None and not job.done.is_set():
                await poll()
    finally:
        bus.unsubscribe(sub)
