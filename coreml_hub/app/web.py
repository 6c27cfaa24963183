"""The app's routes: pages, the app's JSON API, the OpenAI-compatible API and the outputs files.

Every error is JSON in OpenAI's shape (`{"error": {"message", "type", "param", "code"}}`) with a
4xx status for what the client can fix; an unexpected exception is logged with a request id and
answered 500 with only that id (guard.CrashGuard). Blocking library calls run in worker threads,
never on the loop.
"""

from __future__ import annotations

import asyncio
import base64
import html
import json
import sys
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, AsyncIterator
from urllib.parse import quote

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import FileResponse, HTMLResponse, JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from ..version import __version__
from .gallery import Gallery
from .guard import COOKIE, AccessGuard, BodyLimit, CrashGuard, login_cookie, same_token
from .jobs import DONE, FINISHED, EventBus, Job, JobQueue, QueueFull, wait_for
from .requests import RequestError, parse_generate, parse_pull, response_format
from .warm import WarmPipelines
from .work import Generator, Puller, Uploads, classify, list_models, remove_model

JSON_LIMIT = 1024 * 1024
UPLOAD_LIMIT = 20 * 1024 * 1024
FORM_LIMIT = 4096
KEEPALIVE_SECONDS = 15.0


@dataclass(frozen=True)
class AppConfig:
    outputs: Path
    token: str | None = None
    host: str = "127.0.0.1"
    allowed_hosts: tuple[str, ...] = ()  # more names this machine is reached by (without a token)
    max_models: int | None = None
    preview_every: int = 5
    max_waiting: int = 64


def body_limit(method: str, path: str) -> int:
    if path == "/api/uploads":
        return UPLOAD_LIMIT
    if path == "/login":
        return FORM_LIMIT
    return JSON_LIMIT


def _static(name: str) -> bytes:
    return resources.files(__package__).joinpath("static", name).read_bytes()


def login_page(error: str) -> bytes:
    page = _static("login.html").decode()
    note = f'<p class="error" role="alert">{html.escape(error)}</p>' if error else ""
    return page.replace("<!--error-->", note).encode()


def error_response(status: int, message: str, *, kind: str = "invalid_request_error", param: str | None = None,
                   code: str | None = None, hint: str | None = None) -> JSONResponse:
    body: dict[str, Any] = {"message": message, "type": kind, "param": param, "code": code}
    if hint:
        body["hint"] = hint
    return JSONResponse({"error": body}, status_code=status, headers={"cache-control": "no-store"})


class State:
    """Everything the routes share: the queues, the warm pipelines, uploads, the gallery."""

    def __init__(self, config: AppConfig) -> None:
        self.config = config
        self.bus = EventBus()
        self.pool = WarmPipelines(max_models=config.max_models)
        self.uploads = Uploads()
        self.gallery = Gallery(config.outputs)

        def log_line(text: str) -> None:
            print(text, file=sys.stderr, flush=True)

        self.generator = Generator(self.pool, self.uploads, config.outputs, preview_every=config.preview_every,
                                   file_url=file_url)
        self.generation = JobQueue("generate", self.generator, self.bus, classify,
                                   max_waiting=config.max_waiting, log=log_line)
        self.pulls = JobQueue("pull", Puller(), self.bus, classify, max_waiting=config.max_waiting, log=log_line)

    def queues(self) -> tuple[JobQueue, JobQueue]:
        return self.generation, self.pulls

    def job(self, job_id: str) -> tuple[JobQueue, Job]:
        for queue in self.queues():
            job = queue.get(job_id)
            if job is not None:
                return queue, job
        raise RequestError(f"No job {job_id!r} (finished jobs are kept for a while, then forgotten).", "id",
                           status=404, kind="not_found_error")

    def all_jobs(self) -> list[Job]:
        jobs = [j for q in self.queues() for j in q.jobs()]
        return sorted(jobs, key=lambda j: j.created, reverse=True)

    def close(self) -> None:
        for queue in self.queues():
            queue.close()
        self.pool.clear()
        self.uploads.close()


def file_url(name: str) -> str:
    return "/files/" + quote(name)


def _state(request: Request) -> State:
    return request.app.state.coreml_hub


async def _json_body(request: Request) -> Any:
    kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if kind != "application/json":
        raise RequestError("Send the request body as JSON (Content-Type: application/json).")
    raw = await request.body()
    try:
        return json.loads(raw or b"null")
    except (ValueError, UnicodeDecodeError) as exc:
        raise RequestError(f"The request body is not valid JSON ({exc}).") from None


def _queue_full(exc: QueueFull) -> RequestError:
    return RequestError(str(exc), None, status=429, kind="rate_limit_error")


# ---- pages ---------------------------------------------------------------------------------------

async def index(request: Request) -> Response:
    return HTMLResponse(_static("index.html"), headers={"cache-control": "no-store"})


async def static_file(request: Request) -> Response:
    name = request.path_params["name"]
    types = {"app.js": "text/javascript", "app.css": "text/css"}
    if name not in types:
        raise HTTPException(404)
    return Response(_static(name), media_type=types[name], headers={"cache-control": "no-cache"})


async def login(request: Request) -> Response:
    token = _state(request).config.token
    if request.method == "GET" or token is None:
        return HTMLResponse(login_page(""), headers={"cache-control": "no-store"})
    from urllib.parse import parse_qs

    given = parse_qs((await request.body()).decode("utf-8", "replace")).get("token", [""])[0]
    if not same_token(given.strip(), token):
        return HTMLResponse(login_page("That token is not right."), status_code=401)
    response = Response(status_code=303, headers={"location": "/"})
    response.headers["set-cookie"] = login_cookie(token)
    return response


async def logout(request: Request) -> Response:
    response = Response(status_code=303, headers={"location": "/login"})
    response.delete_cookie(COOKIE, path="/")
    return response


# ---- the app's API -------------------------------------------------------------------------------

async def info(request: Request) -> Response:
    from ..pipeline.schedulers import DEFAULT_SCHEDULER, PREDICTION_TYPES, SAMPLER_NAMES
    from .requests import BACKENDS, COMPUTE_UNITS, DEVICES, MAX_IMAGES, MAX_STEPS

    state = _state(request)
    return JSONResponse({
        "version": __version__, "outputs": str(state.config.outputs), "token_required": state.config.token is not None,
        "schedulers": [{"id": k, "name": v} for k, v in SAMPLER_NAMES.items()], "default_scheduler": DEFAULT_SCHEDULER,
        "prediction_types": list(PREDICTION_TYPES), "backends": list(BACKENDS), "devices": list(DEVICES),
        "compute_units": list(COMPUTE_UNITS), "max_images": MAX_IMAGES, "max_steps": MAX_STEPS,
        "preview_every": state.config.preview_every, "upload_limit": UPLOAD_LIMIT, "warm": state.pool.describe(),
    })


async def models(request: Request) -> Response:
    state = _state(request)
    found = await run_in_threadpool(list_models)
    for record in found:
        record["warm"] = state.pool.is_warm(Path(record["path"]))
    return JSONResponse({"models": found, "warm": state.pool.describe()})


async def remove(request: Request) -> Response:
    ref = request.path_params["ref"]
    state = _state(request)
    repo = ref.split(":", 1)[0].split("@", 1)[0]
    busy = [j for j in state.generation.jobs()
            if j.state not in FINISHED and j.params["model"].split(":", 1)[0].split("@", 1)[0] == repo]
    if busy:
        raise RequestError(f"{ref} is used by {len(busy)} queued or running job(s); cancel them first.", "model",
                           status=409, kind="conflict_error")
    return JSONResponse(await run_in_threadpool(remove_model, ref, state.pool))


async def search(request: Request) -> Response:
    from ..hub import search_models

    query = request.query_params.get("q", "").strip() or None
    try:
        limit = max(1, min(int(request.query_params.get("limit", "30")), 100))
    except ValueError:
        raise RequestError("`limit` must be a whole number.", "limit") from None
    found = await run_in_threadpool(lambda: search_models(filter="coreml", search=query, limit=limit))
    return JSONResponse({"models": [m.to_dict() for m in found]})


async def variants(request: Request) -> Response:
    from ..hub import repo_variants

    repo = f"{request.path_params['org']}/{request.path_params['name']}"
    snapshot, found = await run_in_threadpool(repo_variants, repo)
    return JSONResponse({"repo": repo, "commit": snapshot.commit if hasattr(snapshot, "commit") else None,
                         "variants": [v.to_dict() for v in found]})


async def start_pull(request: Request) -> Response:
    model, variant = parse_pull(await _json_body(request))
    state = _state(request)
    try:
        job = state.pulls.submit("pull", f"Pull {model}{f':{variant}' if variant else ''}",
                                 {"model": model, "variant": variant})
    except QueueFull as exc:
        raise _queue_full(exc) from None
    return JSONResponse(job.snapshot(), status_code=202)


async def upload(request: Request) -> Response:
    kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if not kind.startswith("image/"):
        raise RequestError("Send the image itself as the body, with its Content-Type (image/png, image/jpeg).",
                           "image")
    data = await request.body()
    if not data:
        raise RequestError("The upload is empty.", "image")
    return JSONResponse(await run_in_threadpool(_state(request).uploads.add, data), status_code=201)


def _submit_generation(state: State, req: Any) -> Job:
    try:
        return state.generation.submit("generate", req.prompt[:120], req.to_dict(), req)
    except QueueFull as exc:
        raise _queue_full(exc) from None


async def start_job(request: Request) -> Response:
    req = parse_generate(await _json_body(request))
    state = _state(request)
    await run_in_threadpool(_resolve_inputs, state, req)
    return JSONResponse(_submit_generation(state, req).snapshot(), status_code=202)


def _resolve_inputs(state: State, req: Any) -> None:
    """Fail before queueing when the model is not pulled or the init image is gone."""
    from .work import pulled_model

    pulled_model(req.model)
    uploads = [(req.init_image, "init_image"), (req.mask, "mask"),
               *((image, "controlnets") for _, image, _ in req.controlnets)]
    for upload, param in uploads:
        if upload:
            state.uploads.path(upload, param)


async def list_jobs(request: Request) -> Response:
    return JSONResponse({"jobs": [j.snapshot(with_preview=False) for j in _state(request).all_jobs()]})


async def get_job(request: Request) -> Response:
    _queue, job = _state(request).job(request.path_params["id"])
    return JSONResponse(job.snapshot())


async def cancel_job(request: Request) -> Response:
    queue, job = _state(request).job(request.path_params["id"])
    queue.cancel(job.id)
    return JSONResponse(job.snapshot())


def _sse(data: dict[str, Any]) -> bytes:
    return f"data: {json.dumps(data, separators=(',', ':'))}\n\n".encode()


async def _stream(request: Request, job: Job | None) -> AsyncIterator[bytes]:
    """Server-sent events: a snapshot first, then every change (one job's, or all of them)."""
    state = _state(request)
    sub = state.bus.subscribe()
    try:
        def snapshot() -> dict[str, Any]:
            if job is not None:
                return {"type": "job", "job": job.snapshot()}
            return {"type": "snapshot", "jobs": [j.snapshot(with_preview=False) for j in state.all_jobs()]}

        yield b"retry: 2000\n\n" + _sse(snapshot())
        while not (job is not None and job.done.is_set()):
            event = await sub.get(KEEPALIVE_SECONDS)
            if await request.is_disconnected():
                return
            if sub.lagging:
                sub.drain()
                yield _sse(snapshot())
                continue
            if event is None:
                yield b": keep-alive\n\n"
                continue
            event_job = event.get("id") or event.get("job", {}).get("id")
            if job is None or event_job == job.id:
                yield _sse(event)
        yield _sse({"type": "job", "job": job.snapshot()}) + _sse({"type": "end", "id": job.id})
    finally:
        state.bus.unsubscribe(sub)


def _event_response(request: Request, job: Job | None) -> Response:
    return StreamingResponse(_stream(request, job), media_type="text/event-stream",
                             headers={"cache-control": "no-store", "x-accel-buffering": "no"})


async def job_events(request: Request) -> Response:
    _queue, job = _state(request).job(request.path_params["id"])
    return _event_response(request, job)


async def all_events(request: Request) -> Response:
    return _event_response(request, None)


async def gallery(request: Request) -> Response:
    try:
        limit = max(1, min(int(request.query_params.get("limit", "200")), 1000))
        offset = max(0, int(request.query_params.get("offset", "0")))
    except ValueError:
        raise RequestError("`limit` and `offset` must be whole numbers.") from None
    images = await run_in_threadpool(_state(request).gallery.images)
    page = images[offset:offset + limit]
    return JSONResponse({"total": len(images), "offset": offset,
                         "images": [img.to_dict(file_url(img.name)) for img in page]})


async def delete_image(request: Request) -> Response:
    from .files import output_file

    state = _state(request)
    path = output_file(state.config.outputs, request.path_params["name"])
    if path.suffix.lower() != ".png":
        raise HTTPException(404)
    path.unlink()
    return JSONResponse({"deleted": path.name})


async def files(request: Request) -> Response:
    from .files import list_files

    return JSONResponse({"files": await run_in_threadpool(list_files, _state(request).config.outputs)})


async def files_info(request: Request) -> Response:
    """`{"paths": [...]}` -> the files among them, as `GET /api/files` lists them (an empty body names none)."""
    from .files import files_info as info_of

    body = await _json_body(request)
    paths = [] if body is None else body.get("paths") if isinstance(body, dict) else None
    if not isinstance(paths, list) or not all(isinstance(p, str) for p in paths) or len(paths) > 1000:
        raise RequestError("Send {\"paths\": [...]}: at most 1000 paths, each a string.", "paths")
    return JSONResponse(await run_in_threadpool(info_of, _state(request).config.outputs, paths))


async def output(request: Request) -> Response:
    from .files import output_file

    path = output_file(_state(request).config.outputs, request.path_params["name"])
    return FileResponse(path, headers={"cache-control": "no-cache", "x-content-type-options": "nosniff"},
                        content_disposition_type="inline")


# ---- the OpenAI-compatible API -------------------------------------------------------------------

async def openai_models(request: Request) -> Response:
    found = await run_in_threadpool(list_models)
    data = [{"id": m["id"], "object": "model", "owned_by": m["repo"].split("/", 1)[0],
             "created": int(time.mktime(time.strptime(m["pulled_at"][:19], "%Y-%m-%dT%H:%M:%S")))
             if m.get("pulled_at") else 0} for m in found if m["status"] == "ok"]
    return JSONResponse({"object": "list", "data": data})


async def openai_generate(request: Request) -> Response:
    body = await _json_body(request)
    req = parse_generate(body, openai=True)
    fmt = response_format(body)
    state = _state(request)
    await run_in_threadpool(_resolve_inputs, state, req)
    job = _submit_generation(state, req)

    async def client_gone() -> None:
        if await request.is_disconnected():
            state.generation.cancel(job.id)

    await wait_for(job, state.bus, poll=client_gone)
    if job.state != DONE:
        failure = job.failure
        if failure is None:  # cancelled (on the Queue page, or by the app stopping)
            return error_response(409, f"The job was cancelled: {job.message}", kind="cancelled_error",
                                  code="cancelled")
        return error_response(failure.status, failure.message, kind=failure.kind, hint=failure.hint,
                              param=failure.param)
    assert job.result is not None
    data = []
    for image in job.result["images"]:
        if fmt == "url":
            data.append({"url": str(request.base_url).rstrip("/") + image["url"], "revised_prompt": None})
        else:
            from .files import output_file

            raw = await run_in_threadpool(lambda name=image["name"]: output_file(state.config.outputs, name)
                                          .read_bytes())
            data.append({"b64_json": base64.b64encode(raw).decode(), "revised_prompt": None})
    return JSONResponse({"created": int(job.finished or time.time()), "data": data,
                         "output_format": "png", "size": job.result["size"]})


# ---- errors --------------------------------------------------------------------------------------

async def on_request_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, RequestError)
    return error_response(exc.status, exc.message, kind=exc.kind, param=exc.param)


async def on_http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    messages = {404: "Not found.", 405: "Method not allowed."}
    return error_response(exc.status_code, messages.get(exc.status_code, str(exc.detail)),
                          kind="not_found_error" if exc.status_code == 404 else "invalid_request_error")


async def on_library_error(request: Request, exc: Exception) -> Response:
    """A coreml-hub error names what went wrong and what to do: the client gets both."""
    failure = classify(exc)
    return error_response(failure.status, failure.message, kind=failure.kind, hint=failure.hint)



# ---- the application -----------------------------------------------------------------------------

ROUTES = [
    Route("/", index),
    Route("/static/{name}", static_file),
    Route("/login", login, methods=["GET", "POST"]),
    Route("/logout", logout, methods=["POST"]),
    Route("/api/info", info),
    Route("/api/models", models),
    Route("/api/models/{ref:path}", remove, methods=["DELETE"]),
    Route("/api/search", search),
    Route("/api/repos/{org}/{name}/variants", variants),
    Route("/api/pulls", start_pull, methods=["POST"]),
    Route("/api/uploads", upload, methods=["POST"]),
    Route("/api/jobs", start_job, methods=["POST"]),
    Route("/api/jobs", list_jobs, methods=["GET"]),
    Route("/api/jobs/{id}", get_job),
    Route("/api/jobs/{id}/cancel", cancel_job, methods=["POST"]),
    Route("/api/jobs/{id}/events", job_events),
    Route("/api/events", all_events),
    Route("/api/gallery", gallery),
    Route("/api/gallery/{name:path}", delete_image, methods=["DELETE"]),
    Route("/api/files", files),
    Route("/api/files/info", files_info, methods=["POST"]),
    Route("/files/{name:path}", output),
    Route("/v1/models", openai_models),
    Route("/v1/images/generations", openai_generate, methods=["POST"]),
]


def make_app(config: AppConfig) -> Any:
    """The ASGI application: routes behind the access guard and the body limits."""
    from ..errors import CoremlHubError

    state = State(config)

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        try:
            yield
        finally:
            await asyncio.get_running_loop().run_in_executor(None, state.close)

    app = Starlette(
        routes=ROUTES,
        middleware=[Middleware(CrashGuard),
                    Middleware(AccessGuard, token=config.token, host=config.host, login_page=login_page,
                               allowed_hosts=config.allowed_hosts),
                    Middleware(BodyLimit, limit_for=body_limit)],
        exception_handlers={RequestError: on_request_error, HTTPException: on_http_error,
                            CoremlHubError: on_library_error},
        lifespan=lifespan,
    )
    app.router.redirect_slashes = False  # a redirect would echo the request's Host header back
    app.state.coreml_hub = state
    return app
