"""`coreml-hub serve --upstream`: a pull-through mirror between clients and another `serve` on 127.0.0.1.

Two real servers: an "upstream" `serve` of a folder and a pull-through `serve` that starts with
an empty ROOT. The upstream's request log proves what crossed from upstream, and when.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Iterator

import pytest

from coreml_hub.cli import run_cli
from coreml_hub.testing.hubrepo import make_repo
from coreml_hub.testing.hubserver import HubServer
from coreml_hub.testing.publish import publish

TINY = "demo/coreml-tiny-sd"
VARIANT = "original/compiled"
BIG = "demo/big-file"
BIG_SIZE = 96 << 20  # large enough that a transfer on loopback can be caught half-way
GATED = "demo/gated-model"
UPSTREAM_TOKEN = "upstream-secret"
TEAM_TOKEN = "team-token"

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def upstream_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("upstream")
    publish(root, TINY, attentions=("original",), formats=("compiled",), chunks=False)
    make_repo(root, BIG, {"weights.bin": BIG_SIZE, "config.json": '{"a": 1}'},
              meta={"likes": 3, "tags": ["coreml", "big"], "library_name": "coreml"})
    make_repo(root, GATED, {"model.bin": 4096, "README.md": "gated"}, meta={"gated": "manual"})
    (root / ".tokens").write_text(UPSTREAM_TOKEN + "\n")
    return root


@pytest.fixture(scope="module")
def upstream(upstream_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[HubServer]:
    server = HubServer(upstream_root, tmp_path_factory.mktemp("uplog") / "upstream.jsonl").start()
    try:
        yield server
    finally:
        server.stop()


def mirror_of(upstream: HubServer, root: Path, log: Path, *extra: str) -> HubServer:
    return HubServer(root, log, extra_args=("--upstream", upstream.url, *extra)).start()


@pytest.fixture
def mirror(upstream: HubServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[HubServer]:
    server = mirror_of(upstream, tmp_path / "mirror", tmp_path / "mirror.jsonl")
    monkeypatch.setenv("HF_ENDPOINT", server.url)
    upstream.clear_log()
    try:
        yield server
    finally:
        server.stop()


def upstream_files(upstream: HubServer) -> list[dict[str, Any]]:
    return [r for r in upstream.requests() if "/resolve/" in r["path"] and r["method"] == "GET"]


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def pull(args: list[str], capsys: pytest.CaptureFixture[str], expect: int = 0) -> str:
    code = run_cli(["pull", *args])
    out, err = capsys.readouterr()
    assert code == expect, f"exit {code}\n{out}\n{err}"
    return out + err


def get_json(url: str, token: str | None = None) -> tuple[int, dict[str, str], Any]:
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"} if token else {})
    try:
        with urllib.request.urlopen(request, timeout=60) as resp:
            return resp.status, dict(resp.headers), json.loads(resp.read() or b"null")
    except urllib.error.HTTPError as err:
        return err.code, dict(err.headers), json.loads(err.read() or b"null")


# ---- the client gets upstream's files, commits and metadata ---------------------------------------


def test_huggingface_hub_and_pull_get_upstream_bytes(upstream: HubServer, upstream_root: Path, mirror: HubServer,
                                                      store_home: Path, tmp_path: Path,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    from huggingface_hub import HfApi, hf_hub_download, snapshot_download

    upstream_info = HfApi(endpoint=upstream.url).model_info(BIG, files_metadata=True)
    info = HfApi(endpoint=mirror.url).model_info(BIG, files_metadata=True)
    assert info.sha == upstream_info.sha  # upstream's commit, not one computed by the mirror
    assert (info.likes, sorted(info.tags), info.library_name) == (3, ["big", "coreml"], "coreml")
    assert {(s.rfilename, s.size, s.blob_id, s.lfs.sha256 if s.lfs else None) for s in info.siblings} == \
        {(s.rfilename, s.size, s.blob_id, s.lfs.sha256 if s.lfs else None) for s in upstream_info.siblings}

    folder = Path(snapshot_download(BIG, cache_dir=tmp_path / "hf-cache", endpoint=mirror.url))
    for name in ("weights.bin", "config.json"):
        assert (folder / name).read_bytes() == (upstream_root / BIG / name).read_bytes()
    one = hf_hub_download(BIG, "config.json", revision=info.sha, cache_dir=tmp_path / "hf-cache-2",
                          endpoint=mirror.url)
    assert Path(one).read_bytes() == (upstream_root / BIG / "config.json").read_bytes()

    out = pull([TINY, "--variant", VARIANT], capsys)
    from coreml_hub import find_pulled

    pulled = find_pulled(f"{TINY}:{VARIANT}")
    upstream_sha = HfApi(endpoint=upstream.url).model_info(TINY).sha
    assert pulled.commit == upstream_sha, out
    published = upstream_root / TINY / VARIANT
    for path in published.rglob("*"):
        if path.is_file():
            rel = path.relative_to(published)
            assert sha256(Path(pulled.path) / rel) == sha256(path), rel

    # everything crossed once; a second client gets it all from ROOT
    first = upstream_files(upstream)
    assert sorted(r["path"] for r in first) == sorted({r["path"] for r in first})
    upstream.clear_log()
    out = pull([TINY, "--variant", VARIANT, "--force"], capsys)
    snapshot_download(BIG, cache_dir=tmp_path / "hf-cache-3", endpoint=mirror.url)
    assert upstream_files(upstream) == []
    hits = [r for r in mirror.requests() if r.get("cache") == "hit"]
    assert hits and all(r["status"] in (200, 206) for r in hits)

    mirror.stop()  # the counters are on disk once it stops
    code = run_cli(["serve", "--stats", str(mirror.root), "--json"])
    stats = json.loads(capsys.readouterr().out)
    assert code == 0
    big = stats["repos"][BIG]
    assert big["bytes_from_upstream"] == BIG_SIZE + len('{"a": 1}')
    assert big["bytes_saved"] >= BIG_SIZE and big["hits"] >= 2 and big["misses"] >= 2
    code = run_cli(["serve", "--stats", str(mirror.root)])
    table = capsys.readouterr().out
    assert code == 0 and "SAVED" in table and BIG in table and "(all)" in table


def test_three_concurrent_pulls_fetch_each_byte_once(upstream: HubServer, upstream_root: Path, mirror: HubServer,
                                                     tmp_path: Path) -> None:
    env = {**os.environ, "HF_ENDPOINT": mirror.url}
    procs = []
    for i in range(3):
        env_i = {**env, "COREML_HUB_HOME": str(tmp_path / f"store-{i}")}
        procs.append(subprocess.Popen([sys.executable, "-m", "coreml_hub", "pull", TINY, "--variant", VARIANT],
                                      env=env_i, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    for proc in procs:
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err[-3000:]
    content = {p.relative_to(upstream_root / TINY).as_posix(): sha256(p)
               for p in (upstream_root / TINY / VARIANT).rglob("*") if p.is_file()}
    sizes = {content[p.relative_to(upstream_root / TINY).as_posix()]: p.stat().st_size
             for p in (upstream_root / TINY / VARIANT).rglob("*") if p.is_file()}
    sent: dict[str, int] = {}  # per content: files with the same bytes share one blob, fetched once
    for record in upstream_files(upstream):
        rel = record["path"].split("/resolve/", 1)[1].split("/", 1)[1]
        if rel in content:
            sent[content[rel]] = sent.get(content[rel], 0) + record["bytes"]
    assert sent == sizes  # each byte once
    info_requests = [r for r in upstream.requests() if r["path"].startswith(f"/api/models/{TINY}")]
    assert len(info_requests) == 1  # one revision lookup for the three clients
    # the three stores hold the same bytes
    digests = set()
    for i in range(3):
        files = sorted((tmp_path / f"store-{i}").rglob("*.bin"))
        digests.add(tuple(sha256(f) for f in files))
    assert len(digests) == 1


def test_restart_mid_transfer_resumes(upstream: HubServer, upstream_root: Path, tmp_path: Path,
                                      monkeypatch: pytest.MonkeyPatch) -> None:
    root = tmp_path / "mirror"
    mirror = mirror_of(upstream, root, tmp_path / "mirror.jsonl")
    upstream.clear_log()
    url = f"{mirror.url}/{BIG}/resolve/main/weights.bin"
    staging = root / ".coreml-hub-mirror" / "staging"
    reader = threading.Thread(target=_read_quietly, args=(url,), daemon=True)
    assert upstream.pid is not None
    try:
        reader.start()
        deadline = time.monotonic() + 60
        part: Path | None = None
        while time.monotonic() < deadline:
            parts = list(staging.glob("*.part"))
            if parts and parts[0].stat().st_size >= 4 << 20:
                part = parts[0]
                break
            time.sleep(0.002)
        assert part is not None, "the transfer never started"
        os.kill(upstream.pid, signal.SIGSTOP)  # freeze upstream mid-transfer, then kill the mirror outright
        try:
            os.kill(mirror.pid, signal.SIGKILL)  # type: ignore[arg-type]
            mirror.stop()
        finally:
            os.kill(upstream.pid, signal.SIGCONT)
        kept = part.stat().st_size
        assert 0 < kept < BIG_SIZE
        mirror.start()
        with urllib.request.urlopen(url, timeout=120) as resp:
            body = resp.read()
        assert hashlib.sha256(body).hexdigest() == sha256(upstream_root / BIG / "weights.bin")
        ranged = [r for r in upstream_files(upstream) if r["path"].endswith("/weights.bin") and r["range"]]
        assert ranged, upstream_files(upstream)
        resumed_at = int(ranged[-1]["range"].split("=")[1].split("-")[0])
        assert resumed_at > 0 and ranged[-1]["bytes"] == BIG_SIZE - resumed_at
        assert not list(staging.glob("*.part"))
    finally:
        mirror.stop()


def _read_quietly(url: str) -> None:
    try:
        with urllib.request.urlopen(url, timeout=120) as resp:
            while resp.read(1 << 20):
                pass
    except Exception:  # the mirror is killed under this reader on purpose
        pass


def test_upstream_down_cached_served_others_fail_clearly(upstream: HubServer, upstream_root: Path,
                                                          tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError

    mirror = mirror_of(upstream, tmp_path / "mirror", tmp_path / "mirror.jsonl", "--refresh", "0")
    monkeypatch.setenv("HF_ENDPOINT", mirror.url)
    monkeypatch.setenv("COREML_HUB_HOME", str(tmp_path / "store-a"))
    try:
        pull([TINY, "--variant", VARIANT], capsys)
        upstream.stop()
        try:
            # a fresh client still gets the pulled repo (main as ROOT last saw it) ...
            monkeypatch.setenv("COREML_HUB_HOME", str(tmp_path / "store-b"))
            pull([TINY, "--variant", VARIANT], capsys)
            # ... and anything else fails in the Hub's error shape, naming the upstream
            status, headers, body = get_json(f"{mirror.url}/api/models/{BIG}")
            assert status == 502 and headers["X-Error-Code"] == "UpstreamUnavailable"
            assert upstream.url in body["error"]
            with pytest.raises(HfHubHTTPError, match="upstream"):  # (hf_hub_download retries a 502 first)
                HfApi(endpoint=mirror.url).model_info(BIG)
            output = pull([BIG], capsys, expect=1)
            assert "Error:" in output and upstream.url in output and "Traceback" not in output
        finally:
            upstream.start()
    finally:
        mirror.stop()
    # --offline: only ROOT, never upstream
    upstream.clear_log()
    offline = HubServer(tmp_path / "mirror", tmp_path / "offline.jsonl",
                        extra_args=("--upstream", upstream.url, "--offline")).start()
    try:
        monkeypatch.setenv("HF_ENDPOINT", offline.url)
        monkeypatch.setenv("COREML_HUB_HOME", str(tmp_path / "store-c"))
        pull([TINY, "--variant", VARIANT], capsys)
        status, headers, _ = get_json(f"{offline.url}/api/models/{BIG}")
        assert status == 404 and headers["X-Error-Code"] == "RepoNotFound"
        assert upstream.requests() == []
    finally:
        offline.stop()


def test_gated_upstream_repo_needs_the_token(upstream: HubServer, upstream_root: Path, tmp_path: Path) -> None:
    url = f"/{GATED}/resolve/main/model.bin"
    plain = mirror_of(upstream, tmp_path / "plain", tmp_path / "plain.jsonl")
    try:
        (tmp_path / "plain" / ".tokens").write_text(TEAM_TOKEN)
        status, headers, body = get_json(plain.url + url.replace("model.bin", "README.md"), TEAM_TOKEN)
        assert status in (401, 403) and headers["X-Error-Code"] == "GatedRepo", body
    finally:
        plain.stop()
    with_token = mirror_of(upstream, tmp_path / "tok", tmp_path / "tok.jsonl", "--upstream-token", UPSTREAM_TOKEN)
    try:
        (tmp_path / "tok" / ".tokens").write_text(TEAM_TOKEN)
        status, headers, _ = get_json(with_token.url + url)  # the mirror keeps the gate for its own clients
        assert status == 401 and headers["X-Error-Code"] == "GatedRepo"
        request = urllib.request.Request(with_token.url + url, headers={"Authorization": f"Bearer {TEAM_TOKEN}"})
        with urllib.request.urlopen(request, timeout=60) as resp:
            assert resp.read() == (upstream_root / GATED / "model.bin").read_bytes()
    finally:
        with_token.stop()


def test_branches_resolve_to_upstream_commits_and_old_commits_stay(upstream: HubServer, upstream_root: Path,
                                                                  tmp_path: Path) -> None:
    repo = "demo/moving"
    make_repo(upstream_root, repo, {"notes.txt": "first\n"})
    mirror = mirror_of(upstream, tmp_path / "mirror", tmp_path / "mirror.jsonl", "--refresh", "0")
    try:
        _, _, first = get_json(f"{upstream.url}/api/models/{repo}")
        with urllib.request.urlopen(f"{mirror.url}/{repo}/resolve/main/notes.txt", timeout=30) as resp:
            assert resp.read() == b"first\n" and resp.headers["X-Repo-Commit"] == first["sha"]
        (upstream_root / repo / "notes.txt").write_text("second\n")
        _, _, second = get_json(f"{upstream.url}/api/models/{repo}")
        assert second["sha"] != first["sha"]
        with urllib.request.urlopen(f"{mirror.url}/{repo}/resolve/main/notes.txt", timeout=30) as resp:
            assert resp.read() == b"second\n" and resp.headers["X-Repo-Commit"] == second["sha"]
        # upstream no longer has the first commit; ROOT still does, under its id
        with urllib.request.urlopen(f"{mirror.url}/{repo}/resolve/{first['sha']}/notes.txt", timeout=30) as resp:
            assert resp.read() == b"first\n"
        status, headers, _ = get_json(f"{mirror.url}/api/models/{repo}/revision/{'0' * 40}")
        assert status == 404 and headers["X-Error-Code"] == "RevisionNotFound"
    finally:
        mirror.stop()
