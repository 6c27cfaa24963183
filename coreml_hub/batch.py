"""`coreml-hub batch`: many `run` and `predict` jobs from a JSON Lines file, here or on a Ray cluster.

    result = run_batch("jobs.jsonl", "out/")                    # in this process, one warm model at a time
    result = run_batch("jobs.jsonl", "out/", ray="auto", workers=4, device="cuda")

One job per line: `{"model": "org/name", "prompt": "a red fox", "seed": 7, "steps": 20}` (a `run`:
any option `generate` takes; for a model of another task, `"images"`, `"texts"`, `"task"` and that
task's options, as `coreml-hub run` takes them: `{"model": "apple/coreml-FastViT-T8", "images":
["a.jpg"], "top_k": 3}`) or `{"type": "predict", "model": "./Model.mlpackage", "inputs": {...}}`
(what `predict` takes). Each job's files land in OUT/<job id>/ and one line per job in
OUT/results.jsonl says how it went. A rerun skips the jobs already done; a job that fails is
recorded and the others go on.

Workers (`Worker`) keep one model warm and run the jobs for it; the local engine drives one in
this process, the Ray engine one Ray actor per worker (`--device cuda`: one GPU each), handing
each idle actor the next job of the model it has warm. A job whose actor dies is given to
another; its outputs come back to this process as bytes, so OUT need not be shared with the
cluster. Ray is imported only by the Ray engine.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import os
import re
import shutil
import socket
import sys
import tempfile
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

from .atomic import building_dir, write_text_atomic
from .errors import CoremlHubError, UsageError, translate

RESULTS_FILE = "results.jsonl"
JOB_TYPES = ("run", "predict")
MAX_ATTEMPTS = 3  # a job whose worker died this many times is recorded as failed
FORWARDED_ENV = ("HF_ENDPOINT", "HF_HUB_OFFLINE", "COREML_HUB_HOME", "COREML_HUB_PLUGINS")
# `generate` arguments a job may not set: the batch decides them
RUN_RESERVED = {"model", "output_dir", "backend", "device", "compute_unit", "pull", "progress", "on_message",
                "loaded", "on_step", "started"}
# options naming files: a relative path is taken from the JOBS file's folder
RUN_PATH_FIELDS = ("image", "mask", "control_images", "images")
# what a run job for a task other than text-to-image may name besides its task's options
TASK_FIELDS = ("task", "images", "texts")
PREDICT_FIELDS = ("inputs", "component", "function", "state_in")
_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")

OnResult = Callable[["JobResult"], None]


class BatchFailed(CoremlHubError):
    """Some jobs failed (each is in results.jsonl); the others are done."""


@dataclass(frozen=True)
class Job:
    """One line of a JOBS file, checked and with its paths made absolute."""

    id: str
    type: str  # run | predict
    model: str
    options: dict[str, Any] = field(hash=False)
    line: int = 0
    digest: str = ""  # of the line's content: a job edited under the same id runs again

    def payload(self, load: dict[str, Any]) -> dict[str, Any]:
        """What a worker needs, as plain data (it crosses to Ray actors)."""
        return {"id": self.id, "type": self.type, "model": self.model, "options": self.options, "load": load}

    @property
    def images(self) -> int:
        return int(self.options.get("num_images", 1)) if self.type == "run" else 0


@dataclass(frozen=True)
class JobResult:
    """One line of results.jsonl."""

    id: str
    type: str
    model: str
    status: str  # ok | failed
    paths: tuple[str, ...] = ()  # relative to OUT
    seconds: dict[str, float] = field(default_factory=dict, hash=False)  # load, run, total
    worker: str = ""
    attempts: int = 1
    error: dict[str, Any] | None = field(default=None, hash=False)
    details: dict[str, Any] = field(default_factory=dict, hash=False)
    digest: str = ""
    line: int = 0

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    def to_dict(self) -> dict[str, Any]:
        return {"id": self.id, "type": self.type, "model": self.model, "status": self.status,
                "paths": list(self.paths), "seconds": self.seconds, "worker": self.worker,
                "attempts": self.attempts, "error": self.error, "details": self.details, "digest": self.digest,
                "line": self.line}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "JobResult":
        return cls(id=str(data["id"]), type=str(data.get("type", "run")), model=str(data.get("model", "")),
                   status=str(data.get("status", "failed")), paths=tuple(data.get("paths") or ()),
                   seconds=dict(data.get("seconds") or {}), worker=str(data.get("worker", "")),
                   attempts=int(data.get("attempts", 1)), error=data.get("error"),
                   details=dict(data.get("details") or {}), digest=str(data.get("digest", "")),
                   line=int(data.get("line", 0)))


@dataclass(frozen=True)
class BatchResult:
    """What one `batch` call did."""

    out: Path
    engine: str  # local | ray
    workers: int
    jobs: int  # in the JOBS file
    skipped: int  # done by an earlier run
    results: tuple[JobResult, ...]  # the jobs run now
    seconds: float
    planned: tuple[Job, ...] = ()  # the jobs to run (dry runs)
    failed_before: int = 0  # jobs that failed in an earlier run and were skipped (retry_failed=False)

    @property
    def done(self) -> int:
        return sum(r.ok for r in self.results)

    @property
    def failed(self) -> int:
        return sum(not r.ok for r in self.results)

    @property
    def images(self) -> int:
        return sum(len([p for p in r.paths if p.endswith(".png")]) for r in self.results if r.type == "run")

    @property
    def images_per_minute(self) -> float:
        return self.images * 60.0 / self.seconds if self.seconds > 0 else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {"out": str(self.out), "results_file": str(self.out / RESULTS_FILE), "engine": self.engine,
                "workers": self.workers, "jobs": self.jobs, "skipped": self.skipped, "done": self.done,
                "failed": self.failed, "images": self.images, "seconds": round(self.seconds, 3),
                "images_per_minute": round(self.images_per_minute, 3),
                "results": [r.to_dict() for r in self.results],
                "failed_before": self.failed_before,
                "planned": [{"id": j.id, "type": j.type, "model": j.model, "line": j.line} for j in self.planned]}


# -- reading the JOBS file ----------------------------------------------------------------------


def _generate_options() -> set[str]:
    """What a text-to-image `run` job may set: every keyword of `generate` the batch does not decide itself."""
    from .pipeline.generate import generate  # light: the pipeline imports torch only when it runs

    return {name for name, p in inspect.signature(generate).parameters.items()
            if p.kind == p.KEYWORD_ONLY and name not in RUN_RESERVED} | {"prompt"}


def _run_options() -> set[str]:
    """What a `run` job may set: generate's options, and every task's (the task checks its own when it runs)."""
    from .tasks import available_tasks

    tasks = set().union(*(set(t.options) for t in available_tasks()))
    return _generate_options() | (tasks - RUN_RESERVED) | set(TASK_FIELDS)


def _absolute(value: Any, base: Path) -> Any:
    """A relative path that exists beside the JOBS file, made absolute (workers run elsewhere)."""
    if isinstance(value, list):
        return [_absolute(v, base) for v in value]
    if isinstance(value, str) and value and not os.path.isabs(value) and not value.lstrip().startswith(("[", "{")):
        candidate = base / value
        if candidate.exists():
            return str(candidate.resolve())
    return value


def _digest(data: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(data, sort_keys=True, separators=(",", ":")).encode()).hexdigest()[:16]


def _default_id(kind: str, model: str, options: dict[str, Any], digest: str) -> str:
    from .pipeline.png import slug

    words = options.get("prompt") if kind == "run" else model.rstrip("/").rsplit("/", 1)[-1].split(":")[0]
    stem = slug(str(words or kind), limit=40).strip("-._") or kind
    return f"{stem}-{digest[:8]}"


def read_jobs(path: str | os.PathLike[str]) -> list[Job]:
    """Every job of a JOBS file, checked before anything runs: a bad line is a UsageError naming it."""
    source = Path(path)
    try:
        text = source.read_text(encoding="utf-8")
    except OSError as exc:
        raise UsageError(f"Cannot read the jobs file {source}: {exc.strerror or exc}.") from None
    base = source.resolve().parent
    allowed = _run_options()
    jobs: list[Job] = []
    seen: dict[str, int] = {}
    for number, raw in enumerate(text.splitlines(), start=1):
        if not raw.strip():
            continue
        where = f"{source.name} line {number}"
        try:
            data = json.loads(raw)
        except ValueError as exc:
            raise UsageError(f"{where} is not JSON: {exc}.", hint="One JSON object per line.") from None
        if not isinstance(data, dict):
            raise UsageError(f"{where} is not a JSON object.", hint="One JSON object per line.")
        data = {str(k).replace("-", "_"): v for k, v in data.items()}
        kind = data.pop("type", "predict" if "inputs" in data else "run")
        if kind not in JOB_TYPES:
            raise UsageError(f"{where}: unknown type {kind!r}.", hint="Use \"run\" or \"predict\".")
        model = data.pop("model", None)
        if not isinstance(model, str) or not model.strip():
            raise UsageError(f"{where} has no \"model\".", hint="Name a repo id, REPO:VARIANT or a folder.")
        given_id = data.pop("id", None)
        if kind == "run":
            unknown = sorted(set(data) - allowed)
            if unknown:
                raise UsageError(f"{where}: unknown option(s) for a run job: {', '.join(unknown)}.",
                                 hint=f"A run job takes: {', '.join(sorted(allowed))}.")
            if not isinstance(data.get("prompt"), str) and not data.get("images") and not data.get("texts"):
                raise UsageError(f"{where}: a run job needs a \"prompt\" (text), or \"images\" or \"texts\" "
                                 "for a task that takes them.")
            for name in RUN_PATH_FIELDS:
                if name in data:
                    data[name] = _absolute(data[name], base)
        else:
            unknown = sorted(set(data) - set(PREDICT_FIELDS))
            if unknown:
                raise UsageError(f"{where}: unknown option(s) for a predict job: {', '.join(unknown)}.",
                                 hint=f"A predict job takes: {', '.join(PREDICT_FIELDS)}.")
            inputs = data.get("inputs")
            if not isinstance(inputs, dict) or not inputs:
                raise UsageError(f"{where}: a predict job needs \"inputs\": {{\"NAME\": VALUE, ...}}.")
            data["inputs"] = {str(k): _absolute(v, base) for k, v in inputs.items()}
            if "state_in" in data:
                data["state_in"] = _absolute(data["state_in"], base)
        model = _absolute(model, base)
        digest = _digest({"type": kind, "model": model, **data})
        if given_id is None:
            job_id = _default_id(kind, model, data, digest)
        elif isinstance(given_id, (str, int)) and _ID.fullmatch(str(given_id)):
            job_id = str(given_id)
        else:
            raise UsageError(f"{where}: id {given_id!r} cannot name a folder.",
                             hint="Use letters, digits, '.', '_' and '-' (at most 100, not starting with '.').")
        if job_id in seen:
            if given_id is not None:
                raise UsageError(f"{where}: id {job_id!r} is also on line {seen[job_id]}.")
            n = 2
            while f"{job_id}-{n}" in seen:
                n += 1
            job_id = f"{job_id}-{n}"
        seen[job_id] = number
        jobs.append(Job(id=job_id, type=kind, model=model, options=data, line=number, digest=digest))
    if not jobs:
        raise UsageError(f"{source} holds no jobs.", hint='One JSON object per line, e.g. {"model": "org/name", '
                                                        '"prompt": "a red fox"}.')
    return jobs


def load_specs(jobs: Iterable[Job]) -> dict[tuple[str, ...], dict[str, Any]]:
    """Per warm model, what loading it must cover for every job that uses it (e.g. a VAE encoder)."""
    specs: dict[tuple[str, ...], dict[str, Any]] = {}
    for job in jobs:
        spec = specs.setdefault(warm_key(job), {"img2img": False, "safety": False})
        if job.type == "run":
            spec["img2img"] = spec["img2img"] or job.options.get("image") is not None
            spec["safety"] = spec["safety"] or not job.options.get("disable_safety", False)
    return specs


# `load_pipeline` options the batch sets itself; a run job's other options that `load_pipeline` also takes
# (prediction_type, t5, shift, refiner_start, ...) decide what is loaded, so they are part of a warm model's key
LOAD_RESERVED = {"model", "img2img", "safety", "backend", "device", "compute_unit", "progress", "refiner_model",
                 "on_message"}
# run options that pick which files are loaded before `load_pipeline` sees them (`resolve_model`'s)
RESOLVE_OPTIONS = {"chunked"}


def _load_names() -> set[str]:
    from .pipeline.generate import load_pipeline

    return {name for name, p in inspect.signature(load_pipeline).parameters.items()
            if p.kind == p.KEYWORD_ONLY and name not in LOAD_RESERVED} | RESOLVE_OPTIONS


def load_options(options: dict[str, Any]) -> dict[str, Any]:
    """The options of a run job that change what `load_pipeline` loads."""
    names = _load_names()
    return {k: v for k, v in sorted(options.items()) if k in names}


def warm_key(job: Job) -> tuple[str, ...]:
    """Jobs with the same key share one loaded model."""
    if job.type == "run":
        return ("run", job.model, json.dumps(load_options(job.options), sort_keys=True, default=str))
    return ("predict", job.model, str(job.options.get("component") or ""), str(job.options.get("function") or ""))


# -- results.jsonl ------------------------------------------------------------------------------


def read_results(out: Path) -> dict[str, JobResult]:
    """The last record of each job id; a line cut short by a crash is ignored."""
    found: dict[str, JobResult] = {}
    try:
        lines = (out / RESULTS_FILE).read_text(encoding="utf-8").splitlines()
    except OSError:
        return found
    for line in lines:
        try:
            record = JobResult.from_dict(json.loads(line))
        except (ValueError, KeyError, TypeError):
            continue
        found[record.id] = record
    return found


def _is_done(job: Job, record: JobResult | None, out: Path) -> bool:
    return (record is not None and record.ok and record.digest == job.digest
            and all((out / p).is_file() for p in record.paths))


class _Results:
    """Appends one line per finished job (flushed at once: a crash loses nothing), compacts at the end."""

    def __init__(self, out: Path, previous: dict[str, JobResult]) -> None:
        self.out = out
        self.latest = dict(previous)
        self._file = open(out / RESULTS_FILE, "a", encoding="utf-8")  # noqa: SIM115 - closed by close()

    def add(self, record: JobResult) -> None:
        self.latest[record.id] = record
        self._file.write(json.dumps(record.to_dict(), separators=(",", ":"), default=str) + "\n")
        self._file.flush()

    def close(self, jobs: list[Job]) -> None:
        """Rewrite the file with one line per job, in the JOBS file's order (records of other ids after)."""
        self._file.close()
        order = [j.id for j in jobs if j.id in self.latest]
        order += [i for i in self.latest if i not in set(order)]
        text = "".join(json.dumps(self.latest[i].to_dict(), separators=(",", ":"), default=str) + "\n"
                       for i in order)
        write_text_atomic(self.out / RESULTS_FILE, text)


def _store_files(out: Path, job: Job, files: dict[str, bytes]) -> tuple[str, ...]:
    """Put a job's files in OUT/<id>/ with one rename (an earlier attempt's folder is replaced)."""
    dest = out / job.id
    if dest.is_dir() and not dest.is_symlink():
        shutil.rmtree(dest)
    elif dest.exists() or dest.is_symlink():
        dest.unlink()
    with building_dir(dest, "job") as folder:
        for name, data in files.items():
            target = folder / name
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(data)
    return tuple(f"{job.id}/{name}" for name in files)


def _record(job: Job, outcome: dict[str, Any], out: Path, attempts: int) -> JobResult:
    paths: tuple[str, ...] = ()
    status, error = outcome["status"], outcome.get("error")
    if status == "ok":
        try:
            paths = _store_files(out, job, outcome.get("files") or {})
        except OSError as exc:
            status, error = "failed", {"type": "OSError", "message": f"Cannot write the outputs under {out}: {exc}",
                                       "hint": None}
    return JobResult(id=job.id, type=job.type, model=job.model, status=status, paths=paths,
                     seconds=outcome.get("seconds") or {}, worker=outcome.get("worker", ""), attempts=attempts,
                     error=error, details=outcome.get("details") or {}, digest=job.digest, line=job.line)


def _failure(exc: BaseException) -> dict[str, Any]:
    from .hub import endpoint

    known = translate(exc, endpoint=endpoint()) if isinstance(exc, Exception) else None
    if known is not None:
        return {"type": type(known).__name__, "message": known.message, "hint": known.hint}
    text = str(exc).splitlines()[0] if str(exc) else ""
    return {"type": type(exc).__name__, "message": f"{type(exc).__name__}: {text}" if text else type(exc).__name__,
            "hint": None}


# -- the worker: one warm model, many jobs -------------------------------------------------------


class Worker:
    """Runs jobs, keeping the model of the last one loaded; the same class runs here and as a Ray actor."""

    def __init__(self, backend: str = "auto", device: str = "auto") -> None:
        self.backend = backend
        self.device = device
        self._key: tuple[Any, ...] | None = None
        self._model: Any = None
        self.name = f"{socket.gethostname()}:{os.getpid()}"

    def where(self) -> dict[str, Any]:
        return {"host": socket.gethostname(), "pid": os.getpid(), "name": self.name}

    def run(self, payload: dict[str, Any]) -> dict[str, Any]:
        """Run one job; never raises for the job's own failure (it comes back as status `failed`)."""
        started = time.perf_counter()
        load_seconds = 0.0
        try:
            options = payload["options"]
            chosen = load_options(options) if payload["type"] == "run" else \
                {k: options.get(k) for k in ("component", "function")}
            key = (payload["type"], payload["model"], json.dumps(payload.get("load") or {}, sort_keys=True),
                   json.dumps(chosen, sort_keys=True, default=str))
            if key != self._key:
                self._drop()
                t0 = time.perf_counter()
                self._model = self._load(payload)
                self._key = key
                load_seconds = time.perf_counter() - t0
            t1 = time.perf_counter()
            with tempfile.TemporaryDirectory(prefix="coreml-hub-job-") as tmp:
                details = (self._run(payload, Path(tmp)) if payload["type"] == "run"
                           else self._predict(payload, Path(tmp)))
                files = {p.relative_to(tmp).as_posix(): p.read_bytes()
                         for p in sorted(Path(tmp).rglob("*")) if p.is_file()}
            run_seconds = time.perf_counter() - t1
            outcome: dict[str, Any] = {"status": "ok", "files": files, "details": details}
        except Exception as exc:  # the job failed, the worker goes on
            outcome = {"status": "failed", "error": _failure(exc)}
            run_seconds = time.perf_counter() - started - load_seconds
        outcome["seconds"] = {"load": round(load_seconds, 3), "run": round(max(run_seconds, 0.0), 3),
                              "total": round(time.perf_counter() - started, 3)}
        outcome["worker"] = self.name
        return outcome

    def _drop(self) -> None:
        if self._model is None:
            return
        self._model = None
        self._key = None
        import gc

        gc.collect()
        torch = sys.modules.get("torch")
        if torch is not None and torch.cuda.is_available():
            torch.cuda.empty_cache()

    def _load(self, payload: dict[str, Any]) -> Any:
        options, load = payload["options"], payload.get("load") or {}
        if payload["type"] == "run":
            from .pipeline.generate import load_pipeline
            from .pipeline.resolve import resolve_model
            from .tasks import describe_model, resolve

            extra = load_options(options)
            resolved = resolve(payload["model"], pull=True, chunked=extra.pop("chunked", None))
            info = describe_model(resolved)
            if not info.diffusion or options.get("task") not in (None, "text-to-image"):
                return _TaskModel(info)  # its task loads it for each job
            refiner = extra.get("refiner", True)
            if "refiner" in extra:  # generate's `refiner` is True, False or a model: load_pipeline splits it
                extra["refiner"] = refiner is not False
                if not isinstance(refiner, bool):
                    extra["refiner_model"] = resolve_model(str(refiner), pull=True)
            if extra.get("controlnets"):  # names (or REPO:NAME, paths) -> the bundles, as `generate` finds them
                from .pipeline.controlnet import pair_requests
                from .pipeline.generate import resolve_controlnets

                requests = pair_requests(extra["controlnets"], (), ())
                extra["controlnets"] = tuple(resolve_controlnets(resolved, requests, pull=True))
            return load_pipeline(resolved, backend=self.backend, device=self.device,
                                 img2img=bool(load.get("img2img")), safety=bool(load.get("safety")), **extra)
        from .mil.model import load_model
        from .prediction import find_bundle

        bundle = find_bundle(payload["model"], options.get("component"))
        return load_model(bundle, device=self.device, function_name=options.get("function"))

    def _run(self, payload: dict[str, Any], folder: Path) -> dict[str, Any]:
        from .pipeline.generate import generate

        if isinstance(self._model, _TaskModel):
            return self._run_task(payload, folder)
        options = dict(payload["options"])
        options.pop("task", None)
        unused = sorted(set(options) - _generate_options())
        if unused:
            raise UsageError(f"{', '.join(unused)}: not options of the text-to-image task this model runs.")
        prompt = options.pop("prompt")
        result = generate(payload["model"], prompt, **options, output_dir=folder, backend=self.backend,
                          device=self.device, pull=False, progress=False, loaded=self._model)
        return {"seeds": [i.seed for i in result.images], "size": result.size, "backend": result.backend,
                "device": result.device, "unet_steps": result.unet_steps,
                "flagged": [i.flagged for i in result.images]}

    def _run_task(self, payload: dict[str, Any], folder: Path) -> dict[str, Any]:
        """A run job of another task than text-to-image, through `coreml_hub.tasks.run`."""
        from .tasks import run

        options = dict(payload["options"])
        prompt = options.pop("prompt", None)
        images, texts = options.pop("images", None) or [], options.pop("texts", None) or []
        result = run(self._model.info.resolved, [prompt] if prompt is not None else [], task=options.pop("task", None),
                     images=[images] if isinstance(images, str) else images,
                     texts=[texts] if isinstance(texts, str) else texts, options=options, output_dir=folder,
                     backend=self.backend, device=self.device, pull=False)
        # the files move to OUT/<job id>/: name them relative to that folder
        return json.loads(json.dumps(result.to_dict(), default=str).replace(str(folder) + os.sep, ""))

    def _predict(self, payload: dict[str, Any], folder: Path) -> dict[str, Any]:
        from .prediction import predict

        options = payload["options"]
        result = predict(payload["model"], options["inputs"], component=options.get("component"),
                         function=options.get("function"), device=self.device, state_in=options.get("state_in"),
                         output_dir=folder, loaded=self._model)
        return {"outputs": [o.to_dict() | {"path": o.path.name if o.path else None} for o in result.outputs],
                "function": result.function, "device": result.device}


@dataclass(frozen=True)
class _TaskModel:
    """The warm "model" of a worker whose run jobs go to a task: the model's description."""

    info: Any  # coreml_hub.tasks.ModelInfo


# -- progress -----------------------------------------------------------------------------------


class _Progress:
    """A bar on stderr: jobs done of those to run, failures, and the rate."""

    def __init__(self, total: int, show: bool, unit: str) -> None:
        from tqdm import tqdm

        self.started = time.monotonic()
        self.done = self.failed = self.images = 0
        self.unit = unit
        self.bar = tqdm(total=total, unit="job", desc="batch", disable=not show, file=sys.stderr, dynamic_ncols=True)

    def update(self, record: JobResult) -> None:
        if record.ok:
            self.done += 1
            self.images += len([p for p in record.paths if p.endswith(".png")]) if record.type == "run" else 0
        else:
            self.failed += 1
        minutes = max(time.monotonic() - self.started, 1e-9) / 60
        rate = (self.images if self.unit == "images" else self.done + self.failed) / minutes
        self.bar.set_postfix_str(f"done={self.done} failed={self.failed} {rate:.1f} {self.unit}/min")
        self.bar.update(1)

    def close(self) -> None:
        self.bar.close()


# -- engines ------------------------------------------------------------------------------------


def _local(todo: list[Job], specs: dict[tuple[str, ...], dict[str, Any]], *, backend: str, device: str,
           finish: Callable[[Job, dict[str, Any], int], None]) -> int:
    """One worker in this process; jobs grouped by model so each model loads once."""
    worker = Worker(backend=backend, device=device)
    groups: dict[tuple[str, ...], list[Job]] = {}
    for job in todo:
        groups.setdefault(warm_key(job), []).append(job)
    for key, jobs in groups.items():
        for job in jobs:
            finish(job, worker.run(job.payload(specs[key])), 1)
    return 1


@dataclass
class _Actor:
    handle: Any
    key: tuple[str, ...] | None = None
    job: Job | None = None
    ref: Any = None
    attempt: int = 1


def _connect_ray(address: str) -> tuple[Any, bool]:
    """The ray module, connected; True when this call started a local cluster (to shut it down after)."""
    try:
        import ray
    except ImportError:
        raise UsageError("--ray needs Ray, which is not installed.",
                         hint="pip install 'coreml-hub[ray]' (on every node of the cluster).") from None
    if ray.is_initialized():
        return ray, False
    try:
        if address == "auto":
            try:
                ray.init(address="auto", log_to_driver=False)
                return ray, False
            except ConnectionError:
                ray.init(log_to_driver=False, include_dashboard=False)
                return ray, True
        ray.init(address=address, log_to_driver=False)
        return ray, False
    except CoremlHubError:
        raise
    except Exception as exc:
        raise CoremlHubError(f"Cannot connect to the Ray cluster at {address}: {exc}",
                             hint="Start one with `ray start --head`, or pass its address (--ray HOST:6379).") from None


def _ray(todo: list[Job], specs: dict[tuple[str, ...], dict[str, Any]], *, address: str, workers: int | None,
         backend: str, device: str, finish: Callable[[Job, dict[str, Any], int], None],
         on_event: Callable[[], None]) -> int:
    """Ray actors, one warm model each; an idle actor gets the next job of its model, else of the model
    with the fewest actors on it. A job whose actor dies goes back to the queue for another actor."""
    ray, started = _connect_ray(address)
    from ray.exceptions import RayActorError, RayTaskError

    gpu = device == "cuda"
    capacity = int(ray.cluster_resources().get("GPU" if gpu else "CPU", 0))
    if capacity < 1:
        raise CoremlHubError(f"The Ray cluster has no {'GPU' if gpu else 'CPU'} to run a worker on.",
                             hint="Add nodes, or drop --device cuda." if gpu else "Add nodes to the cluster.")
    count = max(1, min(workers or capacity, len(todo)))
    env = {name: os.environ[name] for name in FORWARDED_ENV if os.environ.get(name)}
    options: dict[str, Any] = {"num_cpus": 1, "num_gpus": 1 if gpu else 0, "max_restarts": 0}
    if env:  # set before the worker process imports anything (huggingface_hub reads HF_ENDPOINT at import)
        options["runtime_env"] = {"env_vars": env}
    remote = ray.remote(Worker).options(**options)

    def spawn() -> _Actor:
        return _Actor(remote.remote(backend=backend, device=device))

    queues: dict[tuple[str, ...], deque[tuple[Job, int]]] = {}
    for job in todo:
        queues.setdefault(warm_key(job), deque()).append((job, 1))
    actors = [spawn() for _ in range(count)]
    deaths = 0

    def hand_out() -> None:
        for actor in actors:
            if actor.ref is not None:
                continue
            key = actor.key if actor.key in queues and queues[actor.key] else None
            if key is None:
                waiting = [k for k, q in queues.items() if q]
                if not waiting:
                    return
                busy = {k: sum(a.key == k and a.ref is not None for a in actors) for k in waiting}
                key = min(waiting, key=lambda k: (busy[k], -len(queues[k])))
            job, attempt = queues[key].popleft()
            actor.key, actor.job, actor.attempt = key, job, attempt
            actor.ref = actor.handle.run.remote(job.payload(specs[key]))

    def died(job: Job, attempt: int, why: str) -> None:
        if attempt < MAX_ATTEMPTS:
            queues[warm_key(job)].appendleft((job, attempt + 1))  # first in line for the next idle actor
            return
        finish(job, {"status": "failed", "worker": "",
                     "error": {"type": "WorkerDied", "message": f"The worker running this job died {attempt} times "
                               f"(last: {why}).", "hint": "Check the Ray logs of the workers (memory, GPU)."}},
               attempt)

    try:
        hand_out()
        while True:
            pending = [a.ref for a in actors if a.ref is not None]
            if not pending:
                break
            ready, _ = ray.wait(pending, num_returns=1, timeout=60.0)
            for ref in ready:
                actor = next(a for a in actors if a.ref == ref)
                job, attempt = actor.job, actor.attempt
                assert job is not None
                actor.ref = actor.job = None
                try:
                    outcome = ray.get(ref)
                except RayActorError as exc:
                    deaths += 1
                    actors.remove(actor)
                    if deaths <= MAX_ATTEMPTS * count:
                        actors.append(spawn())  # the replacement starts cold
                    died(job, attempt, str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__)
                    continue
                except RayTaskError as exc:
                    outcome = {"status": "failed", "worker": "", "error": _failure(exc)}
                finish(job, outcome, attempt)
            if not actors:
                for queue in queues.values():
                    while queue:
                        lost, tries = queue.popleft()
                        finish(lost, {"status": "failed", "worker": "",
                                      "error": {"type": "WorkerDied", "message": "Every worker died.",
                                                "hint": "Check the Ray logs of the workers."}}, tries)
            hand_out()  # before reporting: a result's callback sees every actor at work
            on_event()
    finally:
        for actor in actors:
            try:
                ray.kill(actor.handle)
            except Exception:  # already gone
                pass
        if started:
            ray.shutdown()
    return count


# -- the entry point ----------------------------------------------------------------------------


def run_batch(jobs_file: str | os.PathLike[str], out: str | os.PathLike[str], *, ray: str | None = None,
              workers: int | None = None, device: str = "auto", backend: str = "auto", retry_failed: bool = True,
              dry_run: bool = False, progress: bool = False, on_result: OnResult | None = None) -> BatchResult:
    """Run every job of JOBS that OUT does not hold as done; results go to OUT/results.jsonl.

    `ray`: None runs here; "auto" (the running cluster, else a local one) or a cluster address runs on
    Ray with `workers` actors (default: one per CPU, or per GPU with device="cuda"). `retry_failed=False`
    skips jobs that failed before. `on_result` is called with each finished job's record.
    """
    if workers is not None and workers < 1:
        raise UsageError("--workers must be at least 1.")
    if ray is None and workers not in (None, 1):
        raise UsageError("--workers is for Ray workers; a local batch runs one job at a time.",
                         hint="Add --ray auto (a local Ray cluster, or the one RAY_ADDRESS names).")
    jobs = read_jobs(jobs_file)
    folder = Path(out)
    if folder.exists() and not folder.is_dir():
        raise UsageError(f"{folder} exists and is not a folder.", hint="Pass another -o folder.")
    previous = read_results(folder)
    todo = [j for j in jobs if not _is_done(j, previous.get(j.id), folder)
            and (retry_failed or previous.get(j.id) is None or previous[j.id].ok or previous[j.id].digest != j.digest)]
    engine = "ray" if ray else "local"
    started = time.perf_counter()
    failed_before = sum(1 for j in jobs if j not in todo and not _is_done(j, previous.get(j.id), folder))
    if dry_run or not todo:
        return BatchResult(folder, engine, 0, len(jobs), len(jobs) - len(todo), (), 0.0, tuple(todo), failed_before)
    folder.mkdir(parents=True, exist_ok=True)
    specs = load_specs(todo)
    results = _Results(folder, previous)
    made: list[JobResult] = []
    unit = "images" if any(j.type == "run" for j in todo) else "jobs"
    bar = _Progress(len(todo), progress, unit)
    fresh: list[JobResult] = []

    def finish(job: Job, outcome: dict[str, Any], attempts: int) -> None:
        record = _record(job, outcome, folder, attempts)
        results.add(record)
        made.append(record)
        fresh.append(record)
        bar.update(record)

    def report() -> None:
        while fresh:
            record = fresh.pop(0)
            if on_result is not None:
                on_result(record)

    try:
        if ray:
            count = _ray(todo, specs, address=ray, workers=workers, backend=backend, device=device,
                         finish=finish, on_event=report)
        else:
            def finish_local(job: Job, outcome: dict[str, Any], attempts: int) -> None:
                finish(job, outcome, attempts)
                report()

            count = _local(todo, specs, backend=backend, device=device, finish=finish_local)
        report()
    finally:
        bar.close()
        results.close(jobs)
    return BatchResult(folder, engine, count, len(jobs), len(jobs) - len(todo), tuple(made),
                       time.perf_counter() - started, failed_before=failed_before)
