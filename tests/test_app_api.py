"""`coreml-hub app`'s HTTP API against a real app process, a real `serve` mirror and the tiny demo model:
pulls with progress, jobs with per-step progress and previews, cancel, failures, the gallery, and the
OpenAI-compatible endpoint through the official `openai` client, pixel for pixel against `coreml-hub run`."""

from __future__ import annotations

import base64
import io
import json
import os
import shutil
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pytest
from PIL import Image

from _app_fixtures import DEMO, MODEL, pull, running_app, wait_job
from coreml_hub.testing.appserver import AppServer

pytestmark = [pytest.mark.slow, pytest.mark.runtime]

PROMPT = "a photo of a red fox in the snow"


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Any, AppServer, list[dict[str, Any]]]]:
    root = tmp_path_factory.mktemp("app-api")
    with running_app(root) as (hub, app):
        events = pull(app)
        yield hub, app, events


@pytest.fixture(scope="module")
def app(env: tuple[Any, AppServer, Any]) -> AppServer:
    return env[1]


def pixels(data: bytes | Path) -> np.ndarray:
    with Image.open(io.BytesIO(data) if isinstance(data, bytes) else data) as img:
        return np.asarray(img.convert("RGB"))


def submit(app: AppServer, **fields: Any) -> dict[str, Any]:
    body = {"model": MODEL, "prompt": PROMPT, "steps": 3, "seed": 1, "disable_safety": True, **fields}
    reply = app.call("POST", "/api/jobs", json_body=body)
    assert reply.status == 202, reply.body
    return reply.json()


def test_pull_reports_byte_progress_and_lists_the_model(env: tuple[Any, AppServer, list[dict[str, Any]]]) -> None:
    hub, app, events = env
    progress = [e["job"]["progress"] for e in events if e["job"]["progress"].get("total")]
    assert progress and progress[-1]["done"] == progress[-1]["total"] > 0
    dones = [p["done"] for p in progress]
    assert dones == sorted(dones)  # bytes only grow
    final = events[-1]["job"]
    assert final["result"]["ref"] == MODEL and "Chose original/compiled" in final["result"]["note"]
    # the pull went to the mirror
    assert any(f"/{DEMO}/resolve/" in r["path"] for r in hub.requests())
    models = app.call("GET", "/api/models").json()["models"]
    assert [m["id"] for m in models] == [MODEL]
    assert models[0]["status"] == "ok" and "unet" in models[0]["components"] and models[0]["size_bytes"] > 0
    listed = app.call("GET", "/v1/models").json()
    assert listed["object"] == "list" and [m["id"] for m in listed["data"]] == [MODEL]


def test_job_streams_steps_and_previews_then_lands_in_the_gallery(app: AppServer) -> None:
    job = submit(app, steps=4, seed=7, preview_every=1, negative_prompt="blurry")
    final, events = wait_job(app, job["id"])
    assert final["state"] == "done", final
    steps = [e["job"]["progress"]["step"] for e in events if e["type"] == "job" and e["job"]["progress"].get("step")]
    assert steps == sorted(steps) and steps[-1] == final["progress"]["total"] and len(set(steps)) >= 4
    previews = [e for e in events if e["type"] == "preview"]
    assert previews and all(e["image"].startswith("data:image/jpeg;base64,") for e in previews)
    preview = Image.open(io.BytesIO(base64.b64decode(previews[0]["image"].split(",", 1)[1])))
    assert preview.size == (64, 64)
    image = final["result"]["images"][0]
    assert image["seed"] == 7 and image["url"] == f"/files/{image['name']}"
    gallery = app.call("GET", "/api/gallery").json()
    first = gallery["images"][0]
    assert first["name"] == image["name"]  # newest first
    params = first["parameters"]
    assert params["prompt"] == PROMPT and params["negative_prompt"] == "blurry" and params["seed"] == 7
    assert params["steps"] == 4 and params["scheduler"] == "pndm" and params["model"] == DEMO
    assert params["variant"] == "original/compiled" and params["width"] == 64
    served = app.call("GET", image["url"])
    assert served.status == 200 and served.headers["content-type"] == "image/png"
    assert pixels(served.body).shape == (64, 64, 3)


def test_openai_client_gives_the_pixels_of_coreml_hub_run(app: AppServer, tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    from openai import OpenAI

    from coreml_hub.cli import run_cli

    client = OpenAI(base_url=f"{app.url}/v1", api_key="unused", max_retries=0, timeout=300)
    result = client.images.generate(model=MODEL, prompt=PROMPT, n=1, size="64x64", response_format="b64_json",
                                    extra_body={"seed": 42, "steps": 5, "guidance_scale": 6.5, "scheduler": "euler",
                                                "negative_prompt": "dark", "disable_safety": True})
    ours = pixels(base64.b64decode(result.data[0].b64_json))
    monkeypatch.setenv("COREML_HUB_HOME", str(app.store))
    monkeypatch.setenv("HF_ENDPOINT", app.hub_url)
    out = tmp_path / "run"
    code = run_cli(["run", MODEL, PROMPT, "--seed", "42", "--steps", "5", "--guidance-scale", "6.5", "--scheduler",
                    "euler", "--negative-prompt", "dark", "--disable-safety", "--no-pull", "-o", str(out), "-q"])
    assert code == 0
    (reference,) = out.glob("*.png")
    expected = pixels(reference)
    assert ours.shape == expected.shape == (64, 64, 3)
    assert np.array_equal(ours, expected)
    assert ours.std() > 1  # a real image, not a blank one

    # response_format=url points at the same file, served by the app
    by_url = client.images.generate(model=MODEL, prompt=PROMPT, n=2, response_format="url",
                                    extra_body={"seed": 42, "steps": 5, "guidance_scale": 6.5, "scheduler": "euler",
                                                "negative_prompt": "dark", "disable_safety": True})
    assert len(by_url.data) == 2 and by_url.data[0].url.startswith(app.url + "/files/")
    fetched = app.call("GET", by_url.data[0].url[len(app.url):])
    assert np.array_equal(pixels(fetched.body), expected)


def test_second_request_runs_on_the_warm_model(app: AppServer) -> None:
    first, _ = wait_job(app, submit(app)["id"])
    second, _ = wait_job(app, submit(app, seed=2)["id"])
    assert second["result"]["warm"] is True and second["result"]["load_seconds"] == 0.0
    warm = app.call("GET", "/api/info").json()["warm"]
    assert [w["model"] for w in warm] == [DEMO]


def test_cancel_a_queued_and_a_running_job(app: AppServer) -> None:
    running = submit(app, steps=200, preview_every=0)
    queued = submit(app)
    # wait until the long job has made a step, then cancel both
    for event in app.events(f"/api/jobs/{running['id']}/events"):
        if event["type"] == "job" and event["job"]["progress"].get("step"):
            break
    assert app.call("POST", f"/api/jobs/{queued['id']}/cancel").json()["state"] == "cancelled"
    app.call("POST", f"/api/jobs/{running['id']}/cancel")
    final, _ = wait_job(app, running["id"])
    assert final["state"] == "cancelled" and final["message"].startswith("Cancelled at step ")
    assert final["progress"]["step"] < 200
    gone = app.call("GET", f"/api/jobs/{queued['id']}").json()
    assert gone["state"] == "cancelled" and gone["message"] == "Cancelled before it started."
    # the queue goes on
    after, _ = wait_job(app, submit(app)["id"])
    assert after["state"] == "done"


def test_bad_requests_are_4xx_json_naming_the_field(app: AppServer) -> None:
    cases = [
        ({"model": MODEL, "prompt": PROMPT, "steps": 0}, 400, "steps"),
        ({"model": MODEL, "prompt": ""}, 400, "prompt"),
        ({"model": MODEL, "prompt": PROMPT, "scheduler": "nope"}, 400, "scheduler"),
        ({"model": MODEL, "prompt": PROMPT, "strength": 1.5}, 400, "strength"),
        ({"model": MODEL, "prompt": PROMPT, "seed": "abc"}, 400, "seed"),
        ({"model": MODEL, "prompt": PROMPT, "colour": "red"}, 400, "colour"),
        ({"model": "nobody/nothing", "prompt": PROMPT}, 404, "model"),
        ({"model": "/etc", "prompt": PROMPT}, 400, "model"),
        ({"model": MODEL, "prompt": PROMPT, "init_image": "0" * 32}, 404, "init_image"),
    ]
    for body, status, param in cases:
        reply = app.call("POST", "/api/jobs", json_body=body)
        assert reply.status == status, (body, reply.body)
        error = reply.json()["error"]
        assert error["param"] == param and error["message"], error
    not_json = app.call("POST", "/api/jobs", data=b"{", headers={"Content-Type": "application/json"})
    assert not_json.status == 400 and "not valid JSON" in not_json.json()["error"]["message"]
    form = app.call("POST", "/api/jobs", data=b"prompt=x", headers={"Content-Type": "application/x-www-form-urlencoded"})
    assert form.status == 400 and "JSON" in form.json()["error"]["message"]
    unknown = app.call("GET", "/api/nothing")
    assert unknown.status == 404 and unknown.json()["error"]["type"] == "not_found_error"
    # OpenAI's endpoint: a size the model cannot make is refused with OpenAI's error shape
    wrong_size = app.call("POST", "/v1/images/generations",
                          json_body={"model": MODEL, "prompt": PROMPT, "size": "512x512", "steps": 1})
    assert wrong_size.status == 400
    assert wrong_size.json()["error"]["param"] == "size" and "64x64" in wrong_size.json()["error"]["message"]


def test_image_to_image_with_an_upload(app: AppServer) -> None:
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(buffer, "PNG")
    reply = app.call("POST", "/api/uploads", data=buffer.getvalue(), headers={"Content-Type": "image/png"})
    assert reply.status == 201, reply.body
    upload = reply.json()
    assert upload["width"] == 64 and len(upload["id"]) == 32
    final, _ = wait_job(app, submit(app, init_image=upload["id"], strength=0.5, steps=4)["id"])
    assert final["state"] == "done", final
    params = final["result"]["images"][0]["parameters"]
    assert params["strength"] == 0.5
    bad = app.call("POST", "/api/uploads", data=b"not an image", headers={"Content-Type": "image/png"})
    assert bad.status == 400 and bad.json()["error"]["param"] == "image"


def test_inpainting_with_a_mask_gives_the_pixels_of_coreml_hub_run(app: AppServer, tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    from coreml_hub.cli import run_cli

    rng = np.random.default_rng(3)
    init, mask = tmp_path / "init.png", tmp_path / "mask.png"
    Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(init)
    hole = np.zeros((64, 64), dtype=np.uint8)
    hole[16:48, 16:48] = 255
    Image.fromarray(hole).save(mask)
    ids = []
    for path in (init, mask):
        reply = app.call("POST", "/api/uploads", data=path.read_bytes(), headers={"Content-Type": "image/png"})
        assert reply.status == 201, reply.body
        ids.append(reply.json()["id"])
    final, _ = wait_job(app, submit(app, init_image=ids[0], mask=ids[1], steps=4, seed=5)["id"])
    assert final["state"] == "done", final
    image = final["result"]["images"][0]
    assert image["parameters"]["strength"] == 1.0  # the inpainting default, as `run --mask`
    assert image["parameters"]["mask_image"]
    ours = pixels(app.outputs / image["name"])
    monkeypatch.setenv("COREML_HUB_HOME", str(app.store))
    monkeypatch.setenv("HF_ENDPOINT", app.hub_url)
    out = tmp_path / "run"
    code = run_cli(["run", MODEL, PROMPT, "--seed", "5", "--steps", "4", "--image", str(init), "--mask", str(mask),
                    "--disable-safety", "--no-pull", "-o", str(out), "-q"])
    assert code == 0
    (reference,) = out.glob("*.png")
    assert np.array_equal(ours, pixels(reference))
    # a mask without an init image, and a ControlNet the model lacks, are refused naming the field
    alone = app.call("POST", "/api/jobs", json_body={"model": MODEL, "prompt": PROMPT, "mask": ids[1]})
    assert alone.status == 400 and alone.json()["error"]["param"] == "mask"
    gone = app.call("POST", "/api/jobs", json_body={"model": MODEL, "prompt": PROMPT, "init_image": ids[0],
                                                   "mask": "0" * 32})
    assert gone.status == 404 and gone.json()["error"]["param"] == "mask"
    no_net, _ = wait_job(app, submit(app, controlnets=[{"name": "Canny", "image": ids[0]}])["id"])
    assert no_net["state"] == "failed" and "ControlNet" in json.dumps(no_net), no_net


def test_a_crash_inside_a_job_fails_that_job_only(env: tuple[Any, AppServer, Any]) -> None:
    _hub, app, _ = env
    pull(app, DEMO, "split_einsum/compiled")
    broken = next(m for m in app.call("GET", "/api/models").json()["models"] if m["variant"] == "split_einsum/compiled")
    # same size, other bytes: the store still calls it complete, loading it cannot work
    weights = Path(broken["path"]) / "Unet.mlmodelc" / "weights" / "weight.bin"
    weights.write_bytes(os.urandom(weights.stat().st_size))
    final, _ = wait_job(app, submit(app, model=broken["id"])["id"])
    assert final["state"] == "failed" and final["message"], final
    assert "Traceback" not in final["message"]
    via_openai = app.call("POST", "/v1/images/generations", json_body={"model": broken["id"], "prompt": PROMPT})
    assert 400 <= via_openai.status < 600 and "error" in via_openai.json()
    ok, _ = wait_job(app, submit(app)["id"])
    assert ok["state"] == "done"
    removed = app.call("DELETE", f"/api/models/{broken['id']}")
    assert removed.status == 200, removed.body
    assert [m["id"] for m in app.call("GET", "/api/models").json()["models"]] == [MODEL]


def test_gallery_shows_images_from_run_and_deletes(app: AppServer, monkeypatch: pytest.MonkeyPatch) -> None:
    from coreml_hub.cli import run_cli

    monkeypatch.setenv("COREML_HUB_HOME", str(app.store))
    assert run_cli(["run", MODEL, "made by run", "--seed", "9", "--steps", "2", "--save-every", "1",
                    "--disable-safety", "--no-pull", "-o", str(app.outputs), "-q"]) == 0
    (app.outputs / "notes.txt").write_text("not an image")
    shutil.copy(next(app.outputs.glob("made-by-run-9.png")), app.outputs / ".hidden.png")
    images = app.call("GET", "/api/gallery").json()["images"]
    names = [i["name"] for i in images]
    assert names[0] == "made-by-run-9.png"  # newest first; the intermediate decodes are left out
    assert not any("step" in n for n in names) and "notes.txt" not in names and ".hidden.png" not in names
    assert images[0]["parameters"]["prompt"] == "made by run" and images[0]["parameters"]["seed"] == 9
    page = app.call("GET", "/api/gallery?limit=1&offset=1").json()
    assert page["total"] == len(images) and [i["name"] for i in page["images"]] == names[1:2]
    assert app.call("DELETE", "/api/gallery/made-by-run-9.png").status == 200
    assert not (app.outputs / "made-by-run-9.png").exists()
    assert app.call("DELETE", "/api/gallery/made-by-run-9.png").status == 404


def test_search_and_variants_come_from_the_mirror(app: AppServer) -> None:
    found = app.call("GET", "/api/search?q=tiny").json()["models"]
    assert [m["repo_id"] for m in found] == [DEMO]
    assert set(found[0]["variants"]) >= {"original/compiled", "split_einsum/packages"}
    variants = app.call("GET", f"/api/repos/{DEMO}/variants").json()["variants"]
    assert {v["id"] for v in variants} >= {"original/compiled", "split_einsum/compiled"}
    missing = app.call("GET", "/api/repos/nobody/nothing/variants")
    assert missing.status == 404 and "nobody/nothing" in missing.json()["error"]["message"]


def test_job_list_and_event_stream_snapshot(app: AppServer) -> None:
    jobs = app.call("GET", "/api/jobs").json()["jobs"]
    assert jobs and all({"id", "state", "kind", "title", "progress"} <= set(j) for j in jobs)
    created = [j["created"] for j in jobs]
    assert created == sorted(created, reverse=True)
    stream = app.events("/api/events")
    first = next(stream)
    stream.close()
    assert first["type"] == "snapshot" and {j["id"] for j in first["jobs"]} == {j["id"] for j in jobs}
    assert json.dumps(first)  # plain JSON all the way down
