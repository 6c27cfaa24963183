"""Shared setup for the app's tests: the demo repo on a `serve` mirror and `coreml-hub app` against it."""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any, Iterator

from coreml_hub.testing.appserver import AppServer
from coreml_hub.testing.hubserver import HubServer
from coreml_hub.testing.publish import demo_repos

DEMO = "demo/coreml-tiny-sd"
VARIANT = "original/compiled"  # what a pull without --variant takes here (torch runtime)
MODEL = f"{DEMO}:{VARIANT}"


@contextlib.contextmanager
def running_app(root: Path, *, token: str | None = None, extra_args: tuple[str, ...] = ()
                ) -> Iterator[tuple[HubServer, AppServer]]:
    """The demo repos served from `root/hub`, and an app with its store in `root/store`."""
    hub_dir = root / "hub"
    hub_dir.mkdir(parents=True, exist_ok=True)
    demo_repos(hub_dir)
    with HubServer(hub_dir, root / "hub-requests.jsonl") as hub:
        app = AppServer(store=root / "store", outputs=root / "outputs", hub_url=hub.url, log_dir=root / "logs",
                        token=token, extra_args=extra_args)
        with app:
            yield hub, app


def pull(app: AppServer, model: str = DEMO, variant: str | None = None) -> list[dict[str, Any]]:
    """Pull through the app's API and return the job's events (the last one is the finished job)."""
    reply = app.call("POST", "/api/pulls", json_body={"model": model, "variant": variant})
    assert reply.status == 202, reply.body
    job_id = reply.json()["id"]
    events = [e for e in app.events(f"/api/jobs/{job_id}/events") if e["type"] == "job"]
    final = events[-1]["job"]
    assert final["state"] == "done", final
    return events


def wait_job(app: AppServer, job_id: str) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Follow a job's event stream to its end: (the finished job, every event seen)."""
    events = list(app.events(f"/api/jobs/{job_id}/events"))
    jobs = [e["job"] for e in events if e["type"] == "job"]
    return jobs[-1], events
