"""A server of files must not be turned against its host (issue 18): `coreml-hub serve` as an attacker sees it.

Most tests here take `served`, a running server of a folder, described by `Served`, so the same
tests can run against any server of the project that serves files from a root:

- `SERVERS` maps a name to a `ServerKind`: `layout(tmp)` makes the root folder and the folder
  (inside it) whose files requests can name; `start(root, folder, limits)` starts the server and
  returns a `Served` (its URL, how a file's path becomes a request target, what it lists, an
  endpoint that reads a request body and its limit, its stderr).
- To run these tests against the web app's file routes, write an `app` ServerKind and add it to
  `SERVERS`. Tests that need something only `serve` has (a Hugging Face cache folder as ROOT,
  an injected disk error) are plain functions below the parametrized ones.

Every request that could be normalized by an HTTP client (`..`, `%2e`, NULs) is sent byte for
byte on a raw socket.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import select
import socket
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator
from urllib.parse import quote

import httpx2
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from coreml_hub.testing.hubrepo import make_repo
from coreml_hub.testing.hubserver import HubServer

SECRET = f"TOP-SECRET-{uuid.uuid4().hex}".encode()  # the content of every file outside the root
OUTSIDE_NAME = f"outside-only-{uuid.uuid4().hex[:8]}.txt"  # a name that exists only outside the root


# --- what a server of files is, for these tests ------------------------------------------------------------


@dataclass
class Served:
    """A running server of `root`, seen from outside."""

    url: str
    root: Path  # nothing outside it may be served
    folder: Path  # files under it are named by `target(path)`
    target: Callable[[str], str]  # a path under `folder` -> the request target that fetches it
    listed: Callable[[], set[str]]  # every path under `folder` the server lists, however it lists files
    prefixes: tuple[str, ...]  # request-target prefixes under which the server reads file paths
    body_target: str  # an endpoint that reads a JSON request body
    body_limit: int  # ... and the most bytes it takes
    stderr: Callable[[], str]
    alive: Callable[[], bool]
    stop: Callable[[], None]
    host: str = field(init=False)
    port: int = field(init=False)

    def __post_init__(self) -> None:
        hostport = self.url.split("//", 1)[1]
        self.host, port = hostport.rsplit(":", 1)
        self.port = int(port)


@dataclass(frozen=True)
class ServerKind:
    layout: Callable[[Path], tuple[Path, Path]]
    start: Callable[[Path, Path, dict[str, float]], Served]
    slow_clients: bool = True  # the tests of section 3 (slow and idle clients, the connection cap) apply


def _serve_layout(tmp: Path) -> tuple[Path, Path]:
    root = tmp / "hub"
    folder = make_repo(root, "org/repo", {"README.md": "# a repo\n"})
    return root, folder


def _serve_start(root: Path, folder: Path, limits: dict[str, float]) -> Served:
    args: list[str] = []
    for name, value in limits.items():
        args += [f"--{name.replace('_', '-')}", str(value)]
    server = HubServer(root, root.parent / f"requests-{uuid.uuid4().hex[:6]}.jsonl", extra_args=tuple(args)).start()
    api = f"{server.url}/api/models/org/repo"

    def listed() -> set[str]:
        tree = httpx2.get(f"{api}/tree/main", params={"recursive": "true"}, timeout=30).json()
        info = httpx2.get(api, params={"blobs": "true"}, timeout=30).json()
        files = {e["path"] for e in tree if e["type"] == "file"}
        return files | {s["rfilename"] for s in info["siblings"]}

    return Served(
        url=server.url, root=root, folder=folder,
        target=lambda path: f"/org/repo/resolve/main/{quote(path)}",
        listed=listed,
        prefixes=("/org/repo/resolve/main/", "/api/models/org/repo/tree/main/", "/org/repo/resolve/", "/org/"),
        body_target="/api/models/org/repo/paths-info/main", body_limit=1 << 20,
        stderr=lambda: server.stderr_path.read_text(errors="replace"),
        alive=lambda: server.running, stop=server.stop,
    )


def _app_layout(tmp: Path) -> tuple[Path, Path]:
    outputs = tmp / "outputs"
    outputs.mkdir()
    return outputs, outputs


def _app_start(root: Path, folder: Path, limits: dict[str, float]) -> Served:
    """`coreml-hub app` with `root` as its outputs folder: its file routes and JSON body limits.

    Its connection handling is uvicorn's (with a header timeout added), tested in test_app_security.py.
    """
    from coreml_hub.testing.appserver import AppServer

    args = ["--allow-host", "x"]  # the Host these tests send
    for name, value in limits.items():
        args += [f"--{name.replace('_', '-')}", str(value)]
    app = AppServer(store=root.parent / "store", outputs=root, hub_url="http://127.0.0.1:9",
                    log_dir=root.parent / f"app-logs-{uuid.uuid4().hex[:6]}", extra_args=tuple(args)).start()

    def listed() -> set[str]:
        return {f["path"] for f in httpx2.get(f"{app.url}/api/files", timeout=30).json()["files"]}

    return Served(
        url=app.url, root=root, folder=folder, target=lambda path: f"/files/{quote(path)}", listed=listed,
        prefixes=("/files/", "/api/gallery/", "/api/files/"), body_target="/api/files/info", body_limit=1 << 20,
        stderr=app.log, alive=lambda: app.running, stop=app.stop,
    )


SERVERS = {"serve": ServerKind(_serve_layout, _serve_start), "app": ServerKind(_app_layout, _app_start, False)}


# --- raw HTTP ---------------------------------------------------------------------------------------------------


@dataclass
class Answer:
    status: int
    head: str
    body: bytes
    raw: bytes


def raw_request(served: Served, data: bytes, timeout: float = 20.0) -> Answer:
    """Send `data` as is and read until the server closes (requests carry `Connection: close`)."""
    with socket.create_connection((served.host, served.port), timeout=timeout) as conn:
        conn.sendall(data)
        raw = _read_all(conn)
    return _parse(raw)


def _read_all(conn: socket.socket) -> bytes:
    raw = b""
    try:
        while chunk := conn.recv(65536):
            raw += chunk
    except ConnectionResetError:
        pass
    return raw


def _parse(raw: bytes) -> Answer:
    head, _, body = raw.partition(b"\r\n\r\n")
    match = re.match(rb"HTTP/1\.[01] (\d{3})", head)
    return Answer(int(match.group(1)) if match else 0, head.decode("latin-1"), body, raw)


def get(served: Served, target: str | bytes, method: str = "GET", headers: str = "") -> Answer:
    line = target if isinstance(target, bytes) else target.encode()
    return raw_request(served, method.encode() + b" " + line + b" HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
                       + headers.encode() + b"\r\n")


def post(served: Served, body: bytes, headers: str) -> Answer:
    return raw_request(served, f"POST {served.body_target} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
                               f"Content-Type: application/json\r\n{headers}\r\n".encode() + body)


# --- the folder: files, and links in and out of the root -----------------------------------------------------

INSIDE = {"inside.txt": b"inside the root\n", "sub/deep.txt": b"deeper inside\n"}
# path in folder -> the file whose bytes it must serve
SERVED_LINKS = {
    "in-link.txt": "inside.txt",  # relative, inside
    "in-abs-link.txt": "inside.txt",  # absolute, inside
    "in-dir/deep.txt": "sub/deep.txt",  # a folder link inside
    "in-chain.txt": "inside.txt",  # link -> link -> file, all inside
    "out-and-back.txt": "inside.txt",  # leaves the root and comes back: judged by where it ends
}
REFUSED = ("out-abs.txt", "out-rel.txt", "out-chain.txt", "out-dir", "out-dir-rel", "up", "hidden-link.txt",
           "dangling.txt")


def plant(root: Path, folder: Path, outside: Path) -> None:
    """Files inside `folder`, and every kind of link the issue names."""
    outside.mkdir(parents=True, exist_ok=True)
    (outside / "secret.txt").write_bytes(SECRET)
    (outside / OUTSIDE_NAME).write_bytes(SECRET)
    for path, data in INSIDE.items():
        (folder / path).parent.mkdir(parents=True, exist_ok=True)
        (folder / path).write_bytes(data)
    (root / ".hidden-secret").write_bytes(SECRET)  # inside the root, but hidden
    (outside / "back.txt").symlink_to(folder / "inside.txt")

    def link(name: str, to: str | Path) -> None:
        (folder / name).symlink_to(to)

    link("in-link.txt", "inside.txt")
    link("in-abs-link.txt", folder / "inside.txt")
    link("in-dir", "sub")
    link("in-chain-hop.txt", "inside.txt")
    link("in-chain.txt", "in-chain-hop.txt")
    link("out-and-back.txt", outside / "back.txt")
    link("out-abs.txt", outside / "secret.txt")
    link("out-rel.txt", os.path.relpath(outside / "secret.txt", folder))
    link("out-chain-hop.txt", outside / "secret.txt")
    link("out-chain.txt", "out-chain-hop.txt")
    link("out-dir", outside)
    link("out-dir-rel", os.path.relpath(outside, folder))
    link("up", os.path.relpath(root.parent, folder))  # a folder above the root
    link("loop", ".")  # a folder link back to itself must not make listings endless
    link("hidden-link.txt", os.path.relpath(root / ".hidden-secret", folder))
    link("dangling.txt", "no-such-file")


@pytest.fixture(scope="module", params=sorted(SERVERS))
def served(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    """A server of a folder full of links, started after they were made (so it warns about them)."""
    kind = SERVERS[request.param]
    tmp = tmp_path_factory.mktemp(f"served-{request.param}")
    root, folder = kind.layout(tmp)
    plant(root, folder, tmp / "outside")
    server = kind.start(root, folder, {})
    yield server
    server.stop()


# --- 1. nothing whose real path is outside the root ----------------------------------------------------------


def test_links_inside_the_root_are_served_and_listed(served: Served) -> None:
    listed = served.listed()
    for path, data in {**INSIDE, **{p: INSIDE[t] for p, t in SERVED_LINKS.items()}}.items():
        assert path in listed, path
        answer = get(served, served.target(path))
        assert answer.status == 200 and answer.body == data, (path, answer.head)


def test_links_out_of_the_root_are_neither_served_nor_listed(served: Served) -> None:
    listed = served.listed()
    assert not any(p == name or p.startswith(f"{name}/") for p in listed for name in REFUSED), listed
    assert not any(p.startswith("loop/") for p in listed)  # the folder link to itself was not followed
    targets = [*REFUSED, "out-dir/secret.txt", "out-dir-rel/secret.txt", f"out-dir/{OUTSIDE_NAME}", "out-chain-hop.txt",
               f"up/outside/{OUTSIDE_NAME}", f"up/{served.root.name}/.hidden-secret"]
    for path in targets:
        for method in ("GET", "HEAD"):
            answer = get(served, served.target(path), method)
            assert answer.status == 404, (path, method, answer.head)
            assert SECRET not in answer.raw
    assert OUTSIDE_NAME not in json.dumps(sorted(listed))


def test_links_out_are_named_once_at_start(served: Served) -> None:
    served.listed()
    served.listed()  # listing again does not warn again
    log = served.stderr()
    assert log.count("Warning: not serving") == 1, log
    warned = {line.strip().split(" -> ")[0].rsplit("/", 1)[-1] for line in log.splitlines() if " -> " in line}
    assert {"out-abs.txt", "out-rel.txt", "out-chain-hop.txt", "out-dir", "out-dir-rel", "up",
            "hidden-link.txt"} <= warned
    assert not warned & {"in-link.txt", "in-dir", "in-chain.txt", "out-and-back.txt", "loop", "dangling.txt"}


# Pieces of request paths an attacker would try: dot segments in every encoding, slashes and
# backslashes, NULs, overlong UTF-8, names of links out, and long names.
PIECES = ["..", ".", "%2e%2e", "%2E%2E", ".%2e", "%2e.", "%252e%252e", "%c0%ae%c0%ae", "%2f", "%2F", "%5c", "\\",
          "%00", "%0d%0a", "%ef%bc%8f", "", "~", "..;", "%", "%zz", "%ff", "%e9", "é", "..%2f..%2f", "%2e%2e%2f",
          "inside.txt", "in-dir", "out-abs.txt", "out-rel.txt", "out-dir", "out-dir-rel", "up", "outside",
          "secret.txt", "loop", ".hidden-secret", "hidden-link.txt", "org", "repo", "resolve", "main", "tree",
          "hub", "x" * 300, "é" * 200]
RAW_BYTES = [b"\x00", b"\xff", b"\x7f", b"\x01"]


@st.composite
def request_targets(draw: st.DrawFn, prefixes: tuple[str, ...]) -> bytes:
    piece = st.one_of(
        st.sampled_from(PIECES).map(str.encode),
        st.sampled_from(RAW_BYTES),
        st.text(st.characters(blacklist_categories=("Cs", "Zs", "Cc")), max_size=12).map(
            lambda t: quote(t, safe="").encode()),
    )
    pieces = draw(st.lists(piece, max_size=10))
    prefix = draw(st.sampled_from(("/", "//", *prefixes))).encode()
    return prefix + b"/".join(pieces)


@pytest.mark.slow
def test_no_request_path_reads_outside_the_root(served: Served) -> None:
    """Property: whatever the path, no byte of a file outside the root, nor its name, comes back."""

    @settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(target=request_targets(served.prefixes), method=st.sampled_from(["GET", "HEAD", "POST"]))
    def check(target: bytes, method: str) -> None:
        if method == "POST":  # the same path inside a body that names files
            paths = [target.decode("utf-8", "replace"), target.decode("latin-1").split("/")[-1]]
            answer = post(served, json.dumps({"paths": paths}).encode(), "Content-Length: "
                          f"{len(json.dumps({'paths': paths}).encode())}\r\n")
        else:
            answer = get(served, target, method)
        assert answer.status in (200, 206, 400, 401, 404, 405, 408, 414, 416), (target, answer.head)
        assert SECRET not in answer.raw, target
        assert OUTSIDE_NAME.encode() not in answer.raw, target

    check()
    assert served.alive()


def test_request_text_cannot_forge_a_header(served: Served) -> None:
    for tail in ("x%0d%0aSet-Cookie:%20stolen=1", "x%0aSet-Cookie:%20stolen=1", "%E2%82%AC", "%ff%fe"):
        answer = get(served, served.prefixes[0].replace("/resolve/main/", "/resolve/") + tail + "/inside.txt")
        assert answer.status in (400, 404), answer.head
        assert not re.search(r"^Set-Cookie", answer.head, re.MULTILINE | re.IGNORECASE), answer.head


# --- 2. request bodies ---------------------------------------------------------------------------------------


def test_a_huge_content_length_is_refused_before_reading(served: Served) -> None:
    started = time.monotonic()
    with socket.create_connection((served.host, served.port), timeout=10) as conn:
        # headers only: a server that tried to read 10^11 bytes would never answer
        conn.sendall(f"POST {served.body_target} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     f"Content-Length: {10**11}\r\n\r\n".encode())
        answer = _parse(_read_all(conn))
    elapsed = time.monotonic() - started
    assert answer.status == 413, answer.head
    assert elapsed < 1.0, f"413 took {elapsed:.2f} s"
    assert "connection: close" in answer.head.lower()


def test_a_body_over_the_limit_is_refused(served: Served) -> None:
    body = b'{"paths": ["' + b"a" * ((2 << 20) - 15) + b'"]}'
    assert len(body) == 2 << 20 and json.loads(body) and len(body) > served.body_limit
    r = httpx2.post(served.url + served.body_target, content=body, headers={"Content-Type": "application/json"},
                    timeout=30)
    assert r.status_code == 413  # the whole body went out, and the answer still arrived
    small = json.dumps({"paths": ["inside.txt"]}).encode()
    r = httpx2.post(served.url + served.body_target, content=small, headers={"Content-Type": "application/json"})
    assert r.status_code == 200


def test_expect_100_continue_only_for_a_body_within_the_limit(served: Served) -> None:
    head = (f"POST {served.body_target} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
            "Content-Type: application/json\r\nExpect: 100-continue\r\n")
    answer = raw_request(served, f"{head}Content-Length: {10**11}\r\n\r\n".encode())
    assert answer.status == 413, answer.head  # and no "100 Continue" invited the body first
    small = json.dumps({"paths": ["inside.txt"]}).encode()
    with socket.create_connection((served.host, served.port), timeout=20) as conn:
        conn.sendall(f"{head}Content-Length: {len(small)}\r\n\r\n".encode())
        interim = b""
        while b"\r\n\r\n" not in interim:
            interim += conn.recv(1)
        assert interim.startswith(b"HTTP/1.1 100 Continue")
        conn.sendall(small)
        answer = _parse(_read_all(conn))
    assert answer.status == 200 and b"inside.txt" in answer.body


@pytest.mark.parametrize("length", ["abc", "-1", "+5", "0x10", "1.5", "5, 6", ""])
def test_a_malformed_content_length_is_a_400(served: Served, length: str) -> None:
    answer = post(served, b"{}", f"Content-Length: {length}\r\n")
    assert answer.status == 400, (length, answer.head)


def test_chunked_and_missing_lengths(served: Served) -> None:
    small = json.dumps({"paths": ["inside.txt"]}).encode()
    chunked = f"{len(small):x}\r\n".encode() + small + b"\r\n0\r\n\r\n"
    answer = post(served, chunked, "Transfer-Encoding: chunked\r\n")
    assert answer.status == 200 and b"inside.txt" in answer.body, answer.head
    # a chunked body over the limit is cut off once it passes it
    piece = 64 * 1024
    over = (f"{piece:x}\r\n".encode() + b"x" * piece + b"\r\n") * (served.body_limit // piece + 2) + b"0\r\n\r\n"
    assert post(served, over, "Transfer-Encoding: chunked\r\n").status == 413
    assert post(served, b"zz\r\nxx\r\n0\r\n\r\n", "Transfer-Encoding: chunked\r\n").status == 400
    assert post(served, chunked, f"Transfer-Encoding: chunked\r\nContent-Length: {len(chunked)}\r\n").status == 400
    assert post(served, chunked, "Transfer-Encoding: gzip, chunked\r\n").status == 501
    # no length and no chunks: an empty body, which names no paths
    answer = post(served, b"", "")
    assert answer.status == 200 and json.loads(answer.body) == [], answer.head
    # a GET with a body it does not read is answered, then the connection closes
    answer = get(served, served.target("inside.txt"), headers="Content-Length: 5\r\n")
    assert answer.status == 200 and answer.body.startswith(INSIDE["inside.txt"])


# --- 3. slow and idle clients --------------------------------------------------------------------------------

TIGHT = {"header_timeout": 3.0, "idle_timeout": 1.5, "max_connections": 40}


@pytest.fixture(scope="module", params=sorted(k for k, kind in SERVERS.items() if kind.slow_clients))
def tight(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    """A server with short timeouts and few connections, so the slow-client tests stay quick."""
    kind = SERVERS[request.param]
    root, folder = kind.layout(tmp_path_factory.mktemp(f"tight-{request.param}"))
    for path, data in INSIDE.items():
        (folder / path).parent.mkdir(parents=True, exist_ok=True)
        (folder / path).write_bytes(data)
    server = kind.start(root, folder, TIGHT)
    yield server
    server.stop()


def _fetch_ok(served: Served) -> int:
    try:
        return httpx2.get(served.url + served.target("inside.txt"), timeout=30).status_code
    except httpx2.HTTPError:
        return 0


@pytest.mark.slow
def test_a_client_sending_headers_slowly_is_dropped_and_delays_no_one(tight: Served) -> None:
    request = f"GET {tight.target('inside.txt')} HTTP/1.1\r\nHost: x\r\nUser-Agent: {'slow' * 8}\r\n\r\n".encode()
    started: dict[int, float] = {}
    dropped: dict[int, float] = {}
    answers: dict[int, bytes] = {}

    def slow_client(n: int) -> None:
        with socket.create_connection((tight.host, tight.port), timeout=30) as conn:
            start = started[n] = time.monotonic()
            for byte in request:
                try:
                    conn.sendall(bytes([byte]))
                except OSError:
                    break
                # one byte a second, unless the server answers or hangs up first
                if select.select([conn], [], [], 1.0)[0]:
                    break
            answers[n] = _read_all(conn)
            dropped[n] = time.monotonic()

    slow = [threading.Thread(target=slow_client, args=(n,)) for n in range(3)]
    for t in slow:
        t.start()
    with httpx2.Client(timeout=30) as client:
        statuses = [client.get(tight.url + tight.target("inside.txt")).status_code for _ in range(10)]
    others_done = time.monotonic()
    for t in slow:
        t.join(timeout=30)
    assert statuses == [200] * 10
    limit = TIGHT["header_timeout"]
    for n in range(3):
        took = dropped[n] - started[n]
        assert limit * 0.9 <= took < limit + 3, took  # cut off at the header timeout, not before
        assert answers[n] == b"" or answers[n].startswith(b"HTTP/1.1 408"), answers[n][:100]
        assert others_done < dropped[n]  # everyone else was served while the slow ones were still sending


@pytest.mark.slow
def test_idle_connections_leave_the_server_answering(tight: Served) -> None:
    idle = [socket.create_connection((tight.host, tight.port), timeout=30) for _ in range(300)]
    try:
        statuses = [_fetch_ok(tight) for _ in range(10)]
        assert set(statuses) <= {200, 503} and 200 in statuses, statuses
    finally:
        for conn in idle:
            conn.close()
    assert tight.alive() and _fetch_ok(tight) == 200
    # an idle connection is closed by the server after the idle timeout
    with socket.create_connection((tight.host, tight.port), timeout=30) as conn:
        start = time.monotonic()
        assert select.select([conn], [], [], TIGHT["idle_timeout"] + 5)[0]
        assert conn.recv(1) == b"" and time.monotonic() - start >= TIGHT["idle_timeout"] * 0.9


@pytest.mark.slow
def test_503_when_every_connection_is_working(tight: Served) -> None:
    # connections that began a request (and are slow to finish it) cannot be displaced
    busy = []
    for _ in range(int(TIGHT["max_connections"])):
        conn = socket.create_connection((tight.host, tight.port), timeout=30)
        conn.sendall(b"GET / HTTP/1.1\r\n")
        busy.append(conn)
    try:
        r = httpx2.get(tight.url + tight.target("inside.txt"), timeout=30)
        assert r.status_code == 503 and r.headers["Retry-After"] == "1" and r.headers["X-Request-Id"], r.headers
        assert "too many connections" in r.json()["error"]
    finally:
        for conn in busy:
            conn.close()
    # their slots come back: closed ones at once, and cut-off ones at the header timeout
    deadline = time.monotonic() + TIGHT["header_timeout"] + 5
    while _fetch_ok(tight) != 200:
        assert time.monotonic() < deadline, "the server did not recover its connection slots"
    assert tight.alive()


# --- serve only --------------------------------------------------------------------------------------------------


def test_a_500_says_only_that_and_a_request_id(hub_root: Path, monkeypatch: pytest.MonkeyPatch,
                                                capfd: pytest.CaptureFixture[str]) -> None:
    """A disk error while hashing a file: the client gets a request id, the log gets the exception."""
    from coreml_hub.server import make_server
    from coreml_hub.server.repos import RepoStore

    make_repo(hub_root, "org/repo", {"weights.bin": 1000})

    def failing_digest(self: RepoStore, entry: object) -> None:
        raise OSError(5, "Input/output error", "/very/private/disk/path/weights.bin")

    monkeypatch.setattr(RepoStore, "digest", failing_digest)
    server = make_server(hub_root, remember_digests=False)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        r = httpx2.get(f"{server.url}/org/repo/resolve/main/weights.bin", timeout=30)
        again = httpx2.get(f"{server.url}/api/models/org/repo", timeout=30)  # the server answers on
    finally:
        server.shutdown()
        server.server_close()
    assert r.status_code == 500 and again.status_code == 500
    request_id = r.headers["X-Request-Id"]
    assert r.json() == {"error": f"Internal error (request id {request_id}); the server's log has the details."}
    for leak in ("private", "Input/output", "OSError", "Traceback", "weights.bin"):
        assert leak not in r.text and leak not in r.headers.get("X-Error-Message", ""), leak
    err = capfd.readouterr().err
    assert f"request {request_id} (GET /org/repo/resolve/main/weights.bin) failed" in err
    assert "OSError: [Errno 5] Input/output error: '/very/private/disk/path/weights.bin'" in err


def test_a_hugging_face_cache_folder_as_root(hub_server: HubServer, tmp_path: Path) -> None:
    """huggingface_hub's own cache (snapshots link to ../../blobs/<sha>) served as a mirror."""
    from huggingface_hub import snapshot_download

    files = {"README.md": "# cached\n", "unet/weights.bin": 200_000, "unet/config.json": '{"a": 1}'}
    source = make_repo(hub_server.root, "org/cached", files)
    cache = tmp_path / "hf-cache"
    snapshot_download("org/cached", cache_dir=cache, endpoint=hub_server.url, token=False)
    snapshot = next((cache / "models--org--cached" / "snapshots").iterdir())
    assert (snapshot / "unet" / "weights.bin").is_symlink()  # the layout the cache really has

    with HubServer(cache, tmp_path / "cache-requests.jsonl") as mirror:
        assert "Warning" not in mirror.stderr_path.read_text()  # its links stay inside ROOT
        listed = {m["id"] for m in httpx2.get(f"{mirror.url}/api/models").json()}
        assert listed == {"org/cached"}
        out = snapshot_download("org/cached", endpoint=mirror.url, local_dir=tmp_path / "again", token=False)
        got = {p.relative_to(out).as_posix(): p.read_bytes() for p in Path(out).rglob("*")
               if p.is_file() and ".cache" not in p.parts}
        assert got == {path: (source / path).read_bytes() for path in files}
        head = httpx2.head(f"{mirror.url}/org/cached/resolve/main/unet/weights.bin")
        assert head.headers["X-Linked-Etag"].strip('"') == hashlib.sha256((source / "unet/weights.bin")
                                                                          .read_bytes()).hexdigest()


# --- the rules module itself (what the app calls) ----------------------------------------------------------------


def test_resolve_under_and_walk_under_agree(tmp_path: Path) -> None:
    from coreml_hub.safeserve import links_out_of, resolve_under, walk_under

    root = tmp_path / "root"
    folder = root / "files"
    folder.mkdir(parents=True)
    plant(root, folder, tmp_path / "outside")
    os.mkfifo(folder / "pipe")  # not content: a reader of it would hang
    walked = {f.path: f for f in walk_under(root, "files")}
    assert set(walked) == set(INSIDE) | set(SERVED_LINKS) | {"in-chain-hop.txt"}
    for path, found in walked.items():
        assert resolve_under(root, f"files/{path}") == found.real
        assert found.real.read_bytes() == found.real.resolve().read_bytes() and found.size == found.real.stat().st_size
    for path in [*REFUSED, "pipe/x", "out-dir/secret.txt", "../outside/secret.txt", "/etc/passwd", "inside.txt\0",
                 "sub/../inside.txt", "./inside.txt", "sub//deep.txt", "%2e%2e/inside.txt", "sub\\deep.txt",
                 "x" * 256, "sub/" * 1100 + "deep.txt", "\udcff.txt"]:
        assert resolve_under(folder, path) is None, path
    assert resolve_under(folder, "inside.txt") == (folder / "inside.txt").resolve()
    assert resolve_under(folder, "") == folder.resolve()
    assert resolve_under(root, ".hidden-secret") is None and resolve_under(root, ".hidden-secret", allow_hidden=True)
    escaped = {path for path, _target in links_out_of(root)}
    assert escaped == {f"files/{n}" for n in ("out-abs.txt", "out-rel.txt", "out-chain-hop.txt", "out-chain.txt",
                                               "out-dir", "out-dir-rel", "up", "hidden-link.txt")}


@pytest.mark.parametrize("length, transfer, expected", [
    (None, None, 0), ("0", None, 0), ("512", None, 512), (["7", "7"], None, 7), ("7, 7", None, 7),
    (None, "chunked", None), (None, " Chunked ", None),
])
def test_body_limit_check_accepts(length: str | list[str] | None, transfer: str | None, expected: int | None) -> None:
    from coreml_hub.safeserve import body_limit_check

    assert body_limit_check(length, 1024, transfer_encoding=transfer) == expected


@pytest.mark.parametrize("length, transfer, status", [
    ("1025", None, 413), (str(10**11), None, 413), ("9" * 5000, None, 413),
    ("abc", None, 400), ("-1", None, 400), ("", None, 400), (["1", "2"], None, 400), ("5", "chunked", 400),
    (None, "gzip, chunked", 501), (None, "identity", 501),
])
def test_body_limit_check_refuses(length: str | list[str] | None, transfer: str | None, status: int) -> None:
    from coreml_hub.safeserve import Refused, body_limit_check, body_size_check

    with pytest.raises(Refused) as refused:
        body_limit_check(length, 1024, transfer_encoding=transfer)
    assert refused.value.status == status and refused.value.message
    body_size_check(1024, 1024)
    with pytest.raises(Refused) as over:
        body_size_check(1025, 1024)
    assert over.value.status == 413
