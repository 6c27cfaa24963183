"""The app's parts on their own: the pipeline's step hook and warm pipelines (real tiny models), PNG
metadata read back, the job queue, request checking, and the guards as ASGI middleware."""

from __future__ import annotations

import asyncio
import json
import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image
from PIL.PngImagePlugin import PngInfo

from coreml_hub.app.jobs import CANCELLED, DONE, FAILED, EventBus, Job, JobCancelled, JobQueue, QueueFull, Reporter
from coreml_hub.app.requests import RequestError, parse_generate
from coreml_hub.app.work import classify
from coreml_hub.pipeline.png import ImageMetadata, read_metadata, save_png
from coreml_hub.testing import factory

PROMPT = "a watercolor of a heron"


# ---- the pipeline's hook and warm pipelines (real tiny conversions) --------------------------------------

@pytest.fixture(scope="module")
def sd1() -> Path:
    return factory.converted("sd1", attention="split_einsum", precision="fp16")


@pytest.fixture(scope="module")
def sd1_original() -> Path:
    return factory.converted("sd1", attention="original", precision="fp16")


def pixels(path: Path) -> np.ndarray:
    with Image.open(path) as img:
        return np.asarray(img.convert("RGB"))


@pytest.mark.slow
@pytest.mark.runtime
def test_step_hook_reports_every_step_with_previews_and_can_stop_a_run(sd1: Path, tmp_path: Path) -> None:
    from coreml_hub.pipeline.generate import StepProgress, generate, load_pipeline
    from coreml_hub.pipeline.resolve import resolve_model

    seen: list[StepProgress] = []
    previews = []

    def hook(p: StepProgress) -> None:
        seen.append(p)
        if p.step == 2:
            previews.append(p.preview())

    fresh = generate(str(sd1), PROMPT, steps=3, seed=5, num_images=2, output_dir=tmp_path / "a",
                     disable_safety=True, backend="torch", device="cpu", on_step=hook)
    total = seen[0].total
    assert [(p.image_index, p.step) for p in seen] == [(i, s) for i in (0, 1) for s in range(1, total + 1)]
    assert {p.seed for p in seen} == {5, 6} and all(p.num_images == 2 for p in seen)
    assert len(previews) == 2 and previews[0].size == (64, 64) and previews[0].mode == "RGB"

    # a pipeline loaded once makes the same pixels, and reports no load time
    loaded = load_pipeline(resolve_model(str(sd1)), backend="torch", device="cpu", safety=False)
    warm = generate(loaded.model, PROMPT, steps=3, seed=5, num_images=2, output_dir=tmp_path / "b",
                    disable_safety=True, loaded=loaded)
    assert warm.load_seconds == 0.0
    for a, b in zip(fresh.images, warm.images):
        assert np.array_equal(pixels(a.path), pixels(b.path))

    class Stop(Exception):
        pass

    def stop(p: StepProgress) -> None:
        if p.step == 2:
            raise Stop()

    with pytest.raises(Stop):
        generate(loaded.model, PROMPT, steps=3, seed=5, output_dir=tmp_path / "c", loaded=loaded, on_step=stop)
    assert not (tmp_path / "c").exists() or not list((tmp_path / "c").iterdir())  # nothing half written


@pytest.mark.slow
@pytest.mark.runtime
def test_warm_pipelines_keep_one_per_model_and_make_room(sd1: Path, sd1_original: Path) -> None:
    from coreml_hub.app.warm import LoadOptions, WarmPipelines
    from coreml_hub.pipeline.resolve import resolve_model

    a, b = resolve_model(str(sd1)), resolve_model(str(sd1_original))
    cpu = LoadOptions(backend="torch", device="cpu")
    pool = WarmPipelines(max_models=1)
    first, warm = pool.get(a, cpu)
    assert not warm and "vae_encoder" in first.pipeline.components  # loaded once for every kind of request
    again, warm = pool.get(a, cpu)
    assert warm and again is first
    _, warm = pool.get(b, cpu)
    assert not warm and not pool.is_warm(a.path) and pool.is_warm(b.path)  # one model at most: a went
    assert pool.released == [a.name]
    _, warm = pool.get(b, LoadOptions(backend="torch", device="cpu", prediction_type="epsilon"))
    assert warm  # what the model's config says anyway (settings read back from a PNG name it)
    other, warm = pool.get(b, LoadOptions(backend="torch", device="cpu", prediction_type="v_prediction"))
    assert not warm and other.pipeline.scheduler_config["prediction_type"] == "v_prediction"
    assert [d["path"] for d in pool.describe()] == [str(b.path)]  # still one pipeline for the model

    free = {"bytes": 1 << 40}
    roomy = WarmPipelines(memory=lambda: free["bytes"])
    roomy.get(a, cpu)
    roomy.get(b, cpu)
    assert roomy.is_warm(a.path) and roomy.is_warm(b.path)  # memory to spare: both stay
    free["bytes"] = 0
    roomy.release(b.path)
    roomy.get(b, cpu)
    assert not roomy.is_warm(a.path) and roomy.is_warm(b.path)  # memory short: the oldest went first
    roomy.release_under(b.path.parent)
    assert roomy.describe() == []


# ---- PNG metadata read back ----------------------------------------------------------------------------

def test_read_metadata_of_our_pngs_and_of_other_tools(tmp_path: Path) -> None:
    meta = ImageMetadata(prompt="a fox, at night", negative_prompt="blur", seed=12, steps=20, scheduler="dpmpp",
                         guidance_scale=6.5, width=64, height=64, model="org/m", variant="original/compiled",
                         strength=0.6)
    path = save_png(Image.new("RGB", (64, 64)), tmp_path, "ours", meta)
    data = read_metadata(path)
    assert data is not None
    assert {k: data[k] for k in ("prompt", "negative_prompt", "seed", "steps", "scheduler", "guidance_scale",
                                 "width", "model", "variant", "strength")} == {
        "prompt": "a fox, at night", "negative_prompt": "blur", "seed": 12, "steps": 20, "scheduler": "dpmpp",
        "guidance_scale": 6.5, "width": 64, "model": "org/m", "variant": "original/compiled", "strength": 0.6}
    # another tool's PNG: only the `parameters` chunk
    info = PngInfo()
    info.add_text("parameters", 'a castle\nNegative prompt: fog\nSteps: 30, Sampler: Euler a, CFG scale: 5, '
                                'Seed: 99, Size: 512x768, Model: "some, model"')
    Image.new("RGB", (8, 8)).save(tmp_path / "other.png", pnginfo=info)
    other = read_metadata(tmp_path / "other.png")
    assert other == {"prompt": "a castle", "negative_prompt": "fog", "steps": 30, "scheduler": "euler_a",
                     "guidance_scale": 5.0, "seed": 99, "width": 512, "height": 768, "model": "some, model"}
    Image.new("RGB", (8, 8)).save(tmp_path / "bare.png")
    (tmp_path / "text.png").write_text("not a png")
    Image.new("RGB", (8, 8)).save(tmp_path / "photo.jpg")
    assert read_metadata(tmp_path / "bare.png") is None
    assert read_metadata(tmp_path / "text.png") is None
    assert read_metadata(tmp_path / "photo.jpg") is None
    assert read_metadata(tmp_path / "missing.png") is None


# ---- the job queue ---------------------------------------------------------------------------------------

def make_queue(runner: Any, **kwargs: Any) -> JobQueue:
    return JobQueue("test", runner, EventBus(), classify, **kwargs)


def test_jobs_run_in_order_and_say_why_they_failed_or_stopped() -> None:
    order: list[str] = []
    gate = threading.Event()

    def runner(job: Job, report: Reporter) -> dict[str, Any]:
        gate.wait(10)
        order.append(job.title)
        if job.title == "crash":
            raise ZeroDivisionError("boom")
        if job.title == "bad":
            raise RequestError("`steps` must be between 1 and 500, got 0.", "steps")
        if job.title == "stop":
            report.progress(step=2, total=5)
            raise JobCancelled()
        return {"ok": job.title}

    queue = make_queue(runner, max_waiting=10)
    first = queue.submit("generate", "one", {})
    while first.state != "running":  # the worker took it, and waits at the gate
        first.done.wait(0.01)
    jobs = [first] + [queue.submit("generate", title, {}) for title in ("crash", "bad", "stop", "two", "skip")]
    assert [j.position for j in jobs[1:]] == [1, 2, 3, 4, 5]
    queue.cancel(jobs[5].id)
    gate.set()
    for job in jobs:
        assert job.done.wait(30)
    assert order == ["one", "crash", "bad", "stop", "two"]
    one, crash, bad, stop, two, skip = jobs
    assert one.state == DONE and one.result == {"ok": "one"} and two.state == DONE
    assert crash.state == FAILED and "ZeroDivisionError" in crash.message and "boom" not in crash.message
    assert crash.failure is not None and crash.failure.status == 500
    assert bad.state == FAILED and bad.failure is not None and bad.failure.status == 400
    assert bad.snapshot()["param"] == "steps"
    assert stop.state == CANCELLED and stop.message == "Cancelled at step 2/5."
    assert skip.state == CANCELLED and skip.message == "Cancelled before it started."
    json.dumps([j.snapshot() for j in jobs])
    queue.close()


def test_a_full_queue_refuses_more_and_closing_cancels_what_waits() -> None:
    gate = threading.Event()
    queue = make_queue(lambda job, report: gate.wait(10) and {}, max_waiting=2)
    first = queue.submit("generate", "first", {})
    while first.state != "running":
        first.done.wait(0.01)
    waiting = [queue.submit("generate", "w", {}) for _ in range(2)]
    with pytest.raises(QueueFull, match="2 test jobs are already waiting"):
        queue.submit("generate", "w", {})
    closer = threading.Thread(target=queue.close)
    closer.start()
    gate.set()
    closer.join(30)
    assert all(w.state == CANCELLED for w in waiting)


def test_events_reach_subscribers_on_their_loop() -> None:
    async def on_queue_bus() -> list[str]:
        gate = threading.Event()
        queue = make_queue(lambda job, report: gate.wait(10) and report.progress(step=1, total=1) or {"ok": True})
        sub = queue.bus.subscribe()
        job = queue.submit("generate", "x", {})
        gate.set()
        states: list[str] = []
        while DONE not in states:
            event = await sub.get(10)
            assert event is not None
            if event["type"] == "job" and event["job"]["id"] == job.id:
                states.append(event["job"]["state"])
        queue.close()
        return states

    states = asyncio.run(on_queue_bus())
    assert states[0] == "queued" and "running" in states and states[-1] == DONE


# ---- requests --------------------------------------------------------------------------------------------

def test_generation_requests_are_checked_field_by_field() -> None:
    req = parse_generate({"model": "org/m", "prompt": "p"})
    assert (req.steps, req.guidance_scale, req.num_images, req.seed, req.scheduler) == (25, 7.5, 1, None, "pndm")
    openai = parse_generate({"model": "org/m", "prompt": "p", "n": 3, "size": "64x64", "response_format": "url",
                             "quality": "hd", "user": "me", "seed": "7"}, openai=True)
    assert openai.num_images == 3 and openai.size == "64x64" and openai.seed == 7
    for body, param in [({"prompt": "p"}, "model"), ({"model": "org/m"}, "prompt"),
                        ({"model": "org/m", "prompt": "p", "steps": 1.5}, "steps"),
                        ({"model": "org/m", "prompt": "p", "steps": True}, "steps"),
                        ({"model": "org/m", "prompt": "p", "guidance_scale": "nan"}, "guidance_scale"),
                        ({"model": "org/m", "prompt": "p", "num_images": 9}, "num_images"),
                        ({"model": "org/m", "prompt": "p", "compute_unit": "GPU"}, "compute_unit"),
                        ({"model": "org/m", "prompt": "p", "size": "big"}, "size"),
                        ({"model": "org/m", "prompt": "p", "init_image": "../x"}, "init_image"),
                        ({"model": "org/m", "prompt": "p", "mask": "0" * 32}, "mask"),  # no init image
                        ({"model": "org/m", "prompt": "p", "controlnets": [{"name": "/x/C.mlmodelc",
                                                                            "image": "0" * 32}]}, "controlnets"),
                        ({"model": "org/m", "prompt": "p", "controlnets": [{"name": "C"}]}, "controlnets"),
                        ({"model": "org/m", "prompt": "p", "controlnets": [{"name": "C", "image": "0" * 32,
                                                                            "scale": "x"}]}, "controlnets"),
                        ({"model": "org/m", "prompt": "p", "n": 2}, "n")]:
        with pytest.raises(RequestError) as err:
            parse_generate(body)
        assert err.value.param == param, body
    with pytest.raises(RequestError, match="Unknown field"):
        parse_generate({"model": "org/m", "prompt": "p", "init_image": "0" * 32}, openai=True)  # no i2i in OpenAI's
    inpaint = parse_generate({"model": "org/m", "prompt": "p", "init_image": "0" * 32, "mask": "1" * 32,
                              "controlnets": [{"name": "org/cn:Inpaint", "scale": 0.5}]})
    assert inpaint.strength is None  # `generate` decides: 1 with a mask, as `run --mask`
    assert inpaint.controlnets == (("org/cn:Inpaint", None, 0.5),)


# ---- the guards as ASGI middleware ------------------------------------------------------------------------

async def call(app: Any, method: str, path: str, headers: dict[str, str], body: bytes = b"") -> tuple[int, dict, bytes]:
    scope = {"type": "http", "method": method, "path": path, "query_string": b"",
             "headers": [(k.lower().encode(), v.encode()) for k, v in headers.items()]}
    sent: list[dict[str, Any]] = []
    messages = [{"type": "http.request", "body": body, "more_body": False}]

    async def receive() -> dict[str, Any]:
        return messages.pop(0) if messages else {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    await app(scope, receive, send)
    start = next(m for m in sent if m["type"] == "http.response.start")
    return start["status"], {k.decode(): v.decode() for k, v in start["headers"]}, b"".join(
        m.get("body", b"") for m in sent if m["type"] == "http.response.body")


async def ok_app(scope: Any, receive: Any, send: Any) -> None:
    await receive()
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": b"ok"})


def test_crash_guard_answers_500_with_only_a_request_id(capfd: pytest.CaptureFixture[str]) -> None:
    from coreml_hub.app.guard import CrashGuard

    async def crashing(scope: Any, receive: Any, send: Any) -> None:
        raise RuntimeError("secret detail /etc/shadow")

    status, headers, body = asyncio.run(call(CrashGuard(crashing), "GET", "/api/x", {"host": "127.0.0.1"}))
    assert status == 500 and b"secret" not in body and b"RuntimeError" not in body
    request_id = headers["x-request-id"]
    assert request_id in json.loads(body)["error"]["message"]
    err = capfd.readouterr().err
    assert request_id in err and "secret detail" in err  # the log has it all


def test_host_and_origin_checks_without_a_token() -> None:
    from coreml_hub.app.guard import AccessGuard

    guard = AccessGuard(ok_app, token=None, host="127.0.0.1", login_page=lambda e: b"login")
    for host in ("127.0.0.1:7860", "localhost:7860", "[::1]:7860"):
        assert asyncio.run(call(guard, "GET", "/", {"host": host}))[0] == 200
    status, _, body = asyncio.run(call(guard, "GET", "/api/info", {"host": "attacker.example:7860"}))
    assert status == 403 and json.loads(body)["error"]["code"] == "host_not_allowed"  # DNS rebinding
    cross = {"host": "127.0.0.1:7860", "origin": "http://attacker.example"}
    assert asyncio.run(call(guard, "POST", "/api/jobs", cross))[0] == 403
    same = {"host": "127.0.0.1:7860", "origin": "http://127.0.0.1:7860"}
    assert asyncio.run(call(guard, "POST", "/api/jobs", same))[0] == 200
