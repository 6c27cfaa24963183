"""`coreml-hub app` as an attacker sees it: binding beyond this machine, tokens, the outputs folder's
files (traversal, links out), request bodies, a burst of API requests. Requests that an HTTP client
would normalize are sent byte for byte on a raw socket."""

from __future__ import annotations

import io
import json
import os
import re
import select
import socket
import subprocess
import sys
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator
from urllib.parse import quote

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from _app_fixtures import MODEL, pull, running_app
from coreml_hub.testing.appserver import AppServer

pytestmark = [pytest.mark.slow, pytest.mark.runtime]

TOKEN = "t0ken-" + uuid.uuid4().hex
SECRET = f"TOP-SECRET-{uuid.uuid4().hex}".encode()
OUTSIDE_NAME = f"outside-only-{uuid.uuid4().hex[:8]}.png"


# ---- starting ------------------------------------------------------------------------------------

def start_app(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    environ = {k: v for k, v in os.environ.items() if k != "COREML_HUB_APP_TOKEN"}
    return subprocess.run([sys.executable, "-m", "coreml_hub", "app", "--port", "0", *args], capture_output=True,
                          text=True, timeout=120, env={**environ, **(env or {})})


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "192.0.2.10"])
def test_a_non_local_address_without_a_token_is_refused_at_start(host: str) -> None:
    result = start_app("--host", host)
    assert result.returncode == 2, result.stderr
    assert f"Error: Listening on {host} lets other machines use this app, so it needs a token." in result.stderr
    assert "Hint: Add --token" in result.stderr and "Serving" not in result.stdout


def test_a_short_token_is_refused_at_start() -> None:
    result = start_app("--token", "short")
    assert result.returncode == 2 and "at least 16" in result.stderr, result.stderr
    from_env = start_app("--host", "0.0.0.0", env={"COREML_HUB_APP_TOKEN": "short"})
    assert from_env.returncode == 2 and "at least 16" in from_env.stderr  # the variable counts as --token


# ---- a running app with a token --------------------------------------------------------------------

@dataclass
class Answer:
    status: int
    head: str
    body: bytes
    raw: bytes


def raw(app: AppServer, data: bytes, timeout: float = 30.0) -> Answer:
    host, port = app.url.split("//", 1)[1].rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=timeout) as conn:
        # in pieces, stopping once the server answers: a refused body is never read, only answered
        for start in range(0, len(data), 65536):
            if select.select([conn], [], [], 0)[0]:
                break
            try:
                conn.sendall(data[start:start + 65536])
            except (BrokenPipeError, ConnectionResetError):
                break
        received = b""
        try:
            while chunk := conn.recv(65536):
                received += chunk
        except ConnectionResetError:
            pass
    head, _, body = received.partition(b"\r\n\r\n")
    match = re.match(rb"HTTP/1\.[01] (\d{3})", head)
    return Answer(int(match.group(1)) if match else 0, head.decode("latin-1"), body, received)


def request(app: AppServer, target: bytes | str, method: str = "GET", headers: str = "", body: bytes = b"",
            token: str | None = TOKEN) -> Answer:
    line = target if isinstance(target, bytes) else target.encode()
    auth = f"Authorization: Bearer {token}\r\n" if token else ""
    return raw(app, method.encode() + b" " + line + b" HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n"
               + (auth + headers).encode() + b"\r\n" + body)


def png_bytes(color: tuple[int, int, int] = (10, 20, 30)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), color).save(buffer, "PNG")
    return buffer.getvalue()


INSIDE = png_bytes()
SERVED_LINKS = ("in-link.png", "in-abs-link.png", "in-chain.png", "out-and-back.png")
REFUSED = ("out-abs.png", "out-rel.png", "out-chain.png", "out-chain-hop.png", "out-dir", "out-dir-rel", "up",
           "hidden-link.png", "dangling.png", ".hidden.png")


def plant(outputs: Path, outside: Path) -> None:
    """An outputs folder with a real image and every kind of link, in and out of it."""
    outputs.mkdir(parents=True, exist_ok=True)
    outside.mkdir(parents=True, exist_ok=True)
    (outside / "secret.png").write_bytes(SECRET)
    (outside / OUTSIDE_NAME).write_bytes(SECRET)
    (outputs / "inside.png").write_bytes(INSIDE)
    (outputs / ".hidden.png").write_bytes(SECRET)
    (outside / "back.png").symlink_to(outputs / "inside.png")

    def link(name: str, to: str | Path) -> None:
        (outputs / name).symlink_to(to)

    link("in-link.png", "inside.png")
    link("in-abs-link.png", outputs / "inside.png")
    link("in-chain-hop.png", "inside.png")
    link("in-chain.png", "in-chain-hop.png")
    link("out-and-back.png", outside / "back.png")
    link("out-abs.png", outside / "secret.png")
    link("out-rel.png", os.path.relpath(outside / "secret.png", outputs))
    link("out-chain-hop.png", outside / "secret.png")
    link("out-chain.png", "out-chain-hop.png")
    link("out-dir", outside)
    link("out-dir-rel", os.path.relpath(outside, outputs))
    link("up", os.path.relpath(outputs.parent, outputs))
    link("hidden-link.png", ".hidden.png")
    link("dangling.png", "no-such-file.png")


@pytest.fixture(scope="module")
def app(tmp_path_factory: pytest.TempPathFactory) -> Iterator[AppServer]:
    root = tmp_path_factory.mktemp("app-security")
    plant(root / "outputs", root / "outside")
    with running_app(root, token=TOKEN) as (_hub, app):
        pull(app)
        yield app


def test_every_request_needs_the_token(app: AppServer) -> None:
    for method, target in [("GET", "/api/info"), ("GET", "/v1/models"), ("POST", "/v1/images/generations"),
                           ("GET", "/files/inside.png"), ("GET", "/api/events"), ("GET", "/api/gallery"),
                           ("POST", "/api/jobs"), ("DELETE", "/api/gallery/inside.png")]:
        for token in (None, "wrong-" + TOKEN, TOKEN[:-1], TOKEN + "x"):
            headers = "Content-Type: application/json\r\nContent-Length: 2\r\n" if method == "POST" else ""
            answer = request(app, target, method, headers, b"{}" if method == "POST" else b"", token=token)
            assert answer.status == 401, (method, target, token, answer.head)
            assert "www-authenticate: bearer" in answer.head.lower()
            assert json.loads(answer.body)["error"]["type"] == "authentication_error"
    page = request(app, "/nothing", token=None)  # a page: the login form, not the content
    assert page.status == 401 and b"<form" in page.body
    assert (app.outputs / "inside.png").exists()
    ok = app.call("GET", "/api/info")
    assert ok.status == 200 and ok.json()["token_required"] is True


def test_browsers_log_in_with_a_cookie(app: AppServer) -> None:
    page = app.call("GET", "/", token=None)
    assert page.status == 401 and b'<form method="post" action="/login">' in page.body
    wrong = app.call("GET", "/?token=nope", token=None)
    assert wrong.status == 401 and b"not right" in wrong.body
    right = app.call("GET", f"/?token={TOKEN}", token=None)
    assert right.status == 303 and right.headers["location"] == "/"
    cookie = right.headers["set-cookie"]
    assert cookie.startswith(f"coreml_hub_token={TOKEN};") and "HttpOnly" in cookie and "SameSite=Strict" in cookie
    jar = {"Cookie": cookie.split(";", 1)[0]}
    assert app.call("GET", "/", headers=jar, token=None).status == 200
    assert app.call("GET", "/api/gallery", headers=jar, token=None).status == 200
    form = {"Content-Type": "application/x-www-form-urlencoded", "Origin": app.url}
    posted = app.call("POST", "/login", data=f"token={TOKEN}".encode(), headers=form, token=None)
    assert posted.status == 303 and posted.headers["set-cookie"].startswith(f"coreml_hub_token={TOKEN};")
    refused = app.call("POST", "/login", data=b"token=nope", headers=form, token=None)
    assert refused.status == 401
    stale = app.call("GET", "/api/gallery", headers={"Cookie": "coreml_hub_token=nope"}, token=None)
    assert stale.status == 401


def test_links_out_are_named_once_at_start(app: AppServer) -> None:
    log = app.log()
    assert log.count("Warning: not serving") == 1, log
    warned = {line.strip().split(" -> ")[0] for line in log.splitlines() if " -> " in line}
    assert {"out-abs.png", "out-rel.png", "out-chain-hop.png", "out-dir", "out-dir-rel", "up"} <= warned
    assert not warned & {"inside.png", "in-link.png", "in-chain.png", "out-and-back.png", "dangling.png"}


def test_links_inside_the_folder_are_served_and_listed(app: AppServer) -> None:
    listed = {i["name"] for i in app.call("GET", "/api/gallery").json()["images"]}
    for name in ("inside.png", *SERVED_LINKS):
        assert name in listed, listed
        answer = request(app, f"/files/{name}")
        assert answer.status == 200 and answer.body == INSIDE, (name, answer.head)


def test_links_out_and_traversal_are_404(app: AppServer) -> None:
    listed = json.dumps(app.call("GET", "/api/gallery").json())
    assert not any(f'"{name}"' in listed for name in REFUSED), listed
    assert OUTSIDE_NAME not in listed
    targets = [f"/files/{quote(name)}" for name in REFUSED] + [
        "/files/out-dir/secret.png", f"/files/out-dir/{OUTSIDE_NAME}", "/files/up/outside/secret.png",
        "/files/../outside/secret.png", "/files/%2e%2e/outside/secret.png", "/files/..%2foutside%2fsecret.png",
        "/files/%2E%2E%2Foutside%2Fsecret.png", "/files/%252e%252e/outside/secret.png", "//files/../../etc/passwd",
        "/files//etc/passwd", "/files/%2fetc%2fpasswd", "/files/..\\outside\\secret.png", "/files/inside.png%00.txt",
        "/files/" + "x" * 300, "/files/", "/files/.", "/files/..",
    ]
    for target in targets:
        for method in ("GET", "HEAD"):
            answer = request(app, target, method)
            assert answer.status in (400, 404), (target, method, answer.head)
            assert SECRET not in answer.raw and b"root:" not in answer.raw
    for name in (*REFUSED, "../outside/secret.png", "%2e%2e%2foutside%2fsecret.png", "out-dir/secret.png"):
        answer = request(app, f"/api/gallery/{name}", "DELETE")
        assert answer.status in (400, 404), (name, answer.head)
    assert (app.outputs.parent / "outside" / "secret.png").read_bytes() == SECRET
    assert (app.outputs / ".hidden.png").exists()


PIECES = ["..", ".", "%2e%2e", "%2E%2E", ".%2e", "%2e.", "%252e%252e", "%c0%ae%c0%ae", "%2f", "%2F", "%5c", "\\",
          "%00", "%0d%0a", "%ef%bc%8f", "", "~", "%", "%zz", "%ff", "..%2f..%2f", "inside.png", "out-abs.png",
          "out-rel.png", "out-dir", "out-dir-rel", "up", "outside", "secret.png", ".hidden.png", "hidden-link.png",
          "files", "x" * 300]


@st.composite
def targets(draw: st.DrawFn) -> bytes:
    piece = st.one_of(st.sampled_from(PIECES).map(str.encode), st.sampled_from([b"\x00", b"\xff", b"\x7f"]),
                      st.text(st.characters(blacklist_categories=("Cs", "Zs", "Cc")), max_size=10).map(
                          lambda t: quote(t, safe="").encode()))
    prefix = draw(st.sampled_from(["/files/", "/files//", "//files/", "/api/gallery/", "/"])).encode()
    return prefix + b"/".join(draw(st.lists(piece, max_size=8)))


def test_no_request_path_reads_outside_the_folder(app: AppServer) -> None:
    """Property: whatever the path and method, no byte or name of a file outside the outputs folder comes back."""

    @settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(target=targets(), method=st.sampled_from(["GET", "HEAD", "DELETE"]))
    def check(target: bytes, method: str) -> None:
        answer = request(app, target, method)
        assert answer.status in (200, 400, 401, 404, 405), (target, answer.head)
        assert SECRET not in answer.raw and OUTSIDE_NAME.encode() not in answer.raw, target

    check()
    assert (app.outputs.parent / "outside" / "secret.png").exists() and app.running


@pytest.mark.parametrize("target, limit", [("/api/jobs", 1 << 20), ("/v1/images/generations", 1 << 20),
                                           ("/api/uploads", 20 << 20), ("/api/pulls", 1 << 20)])
def test_a_huge_content_length_is_refused_before_reading(app: AppServer, target: str, limit: int) -> None:
    started = time.monotonic()
    answer = request(app, target, "POST", f"Content-Type: application/json\r\nContent-Length: {10**11}\r\n")
    assert answer.status == 413 and time.monotonic() - started < 5, answer.head
    assert f"at most {limit} bytes" in json.loads(answer.body)["error"]["message"]
    assert "connection: close" in answer.head.lower()


def test_bodies_over_the_limit_malformed_or_chunked(app: AppServer) -> None:
    big = b'{"prompt": "' + b"a" * (2 << 20) + b'"}'
    answer = request(app, "/api/jobs", "POST", f"Content-Type: application/json\r\nContent-Length: {len(big)}\r\n", big)
    assert answer.status == 413, answer.head
    piece = 64 * 1024
    chunked = (f"{piece:x}\r\n".encode() + b"x" * piece + b"\r\n") * 20 + b"0\r\n\r\n"
    answer = request(app, "/api/jobs", "POST", "Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n", chunked)
    assert answer.status == 413, answer.head
    upload = png_bytes() + b"\0" * (21 << 20)
    chunks = b"".join(f"{len(c):x}\r\n".encode() + c + b"\r\n" for c in (upload[i:i + piece] for i in
                                                                         range(0, len(upload), piece)))
    answer = request(app, "/api/uploads", "POST", "Content-Type: image/png\r\nTransfer-Encoding: chunked\r\n",
                     chunks + b"0\r\n\r\n")
    assert answer.status == 413, answer.head
    for length in ("abc", "-1", "1.5", "5, 6"):
        answer = request(app, "/api/jobs", "POST", f"Content-Type: application/json\r\nContent-Length: {length}\r\n", b"{}")
        assert answer.status == 400, (length, answer.head)
    small = json.dumps({"model": MODEL, "prompt": "x", "steps": 0}).encode()
    body = f"{len(small):x}\r\n".encode() + small + b"\r\n0\r\n\r\n"
    answer = request(app, "/api/jobs", "POST", "Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n", body)
    assert answer.status == 400 and json.loads(answer.body)["error"]["param"] == "steps"  # read, then checked
    assert app.call("GET", "/api/info").status == 200


@pytest.mark.extended  # extended tier: 20 generations
def test_twenty_concurrent_api_requests_are_all_answered(app: AppServer) -> None:
    answers: dict[int, Any] = {}

    def one(n: int) -> None:
        answers[n] = app.call("POST", "/v1/images/generations", timeout=600, json_body={
            "model": MODEL, "prompt": f"image {n}", "seed": n, "steps": 1, "guidance_scale": 1.0,
            "disable_safety": True, "preview_every": 0})

    threads = [threading.Thread(target=one, args=(n,)) for n in range(20)]
    for t in threads:
        t.start()
    # while they wait in line, the app keeps answering everything else
    assert app.call("GET", "/api/info").status == 200
    for t in threads:
        t.join(timeout=600)
    assert sorted(answers) == list(range(20))
    for n, reply in answers.items():
        assert reply.status == 200, (n, reply.body[:300])
        data = reply.json()["data"]
        assert len(data) == 1 and Image.open(io.BytesIO(__import__("base64").b64decode(data[0]["b64_json"]))).size == (64, 64)
    jobs = [j for j in app.call("GET", "/api/jobs").json()["jobs"] if j["title"].startswith("image ")]
    assert len(jobs) == 20 and {j["state"] for j in jobs} == {"done"}
    assert app.running and app.call("GET", "/api/info").status == 200


def test_slow_and_silent_clients_are_dropped_and_delay_no_one(tmp_path: Path) -> None:
    """uvicorn waits for headers forever; the app gives them --header-timeout seconds."""
    limit = 2.0
    app = AppServer(store=tmp_path / "store", outputs=tmp_path / "outputs", hub_url="http://127.0.0.1:9",
                    log_dir=tmp_path / "logs", extra_args=("--header-timeout", str(limit))).start()
    host, port = app.url.split("//", 1)[1].rsplit(":", 1)
    head = b"GET /api/info HTTP/1.1\r\nHost: 127.0.0.1\r\nUser-Agent: " + b"slow" * 8 + b"\r\n\r\n"
    took: dict[int, float] = {}
    answers: dict[int, bytes] = {}

    def slow(n: int) -> None:
        with socket.create_connection((host, int(port)), timeout=30) as conn:
            start = time.monotonic()
            for byte in head if n else b"":  # client 0 connects and says nothing
                try:
                    conn.sendall(bytes([byte]))
                except OSError:
                    break
                if select.select([conn], [], [], 1.0)[0]:
                    break
            received = b""
            try:
                while chunk := conn.recv(65536):
                    received += chunk
            except ConnectionResetError:
                pass
            took[n], answers[n] = time.monotonic() - start, received

    try:
        threads = [threading.Thread(target=slow, args=(n,)) for n in range(3)]
        for t in threads:
            t.start()
        statuses = [app.call("GET", "/api/info").status for _ in range(10)]
        for t in threads:
            t.join(30)
        assert statuses == [200] * 10
        for n in range(3):
            assert answers[n] == b"" and limit * 0.9 <= took[n] < limit + 3, (n, took[n], answers[n][:80])
        assert app.running and app.call("GET", "/api/info").status == 200
    finally:
        app.stop()
