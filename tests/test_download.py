"""The resumable downloader against `coreml-hub serve`: Range resume, ETag changes, retries, errors."""

from __future__ import annotations

import hashlib
import json
import threading
import time
from pathlib import Path

import pytest
from huggingface_hub import hf_hub_url

from coreml_hub.download import Downloader, DownloadJob, meta_path, part_path
from coreml_hub.errors import DownloadError, EntryNotFound
from coreml_hub.hub import repo_files
from coreml_hub.testing.hubrepo import make_repo

REPO = "org/files"
SIZES = {"big/weights/weight.bin": 40_000_000, "mid.bin": 3_000_000, "small.json": '{"a": 1}'}


def _jobs(server, dest: Path, only: str | None = None) -> list[DownloadJob]:
    snap = repo_files(REPO)
    return [DownloadJob(name=f.path, url=hf_hub_url(REPO, f.path, revision=snap.sha, endpoint=server.url),
                        dest=dest / f.path, size=f.size, sha256=f.sha256)
            for f in snap.files if only is None or f.path == only]


def _gets(server, path_suffix: str) -> list[dict]:
    return [r for r in server.requests() if r["method"] == "GET" and r["path"].endswith(path_suffix)]


@pytest.fixture
def repo(hub_server, hub_root):
    folder = make_repo(hub_root, REPO, SIZES)
    return folder


def test_fetch_all_hashes_and_second_run_transfers_nothing(hub_server, repo, tmp_path):
    jobs = _jobs(hub_server, tmp_path / "out")
    seen = []
    with Downloader(workers=3) as dl:
        results = dl.fetch_all(jobs, seen.append)
    for result in results:
        expected = hashlib.sha256((repo / result.name).read_bytes()).hexdigest()
        assert result.sha256 == expected
        assert (tmp_path / "out" / result.name).read_bytes() == (repo / result.name).read_bytes()
        assert not part_path(result.dest).exists() and not meta_path(result.dest).exists()
    assert sum(seen) == sum(r.size for r in results)

    hub_server.clear_log()
    with Downloader(workers=3) as dl:
        again = dl.fetch_all(jobs)
    assert all(r.skipped and r.transferred == 0 for r in again)
    assert hub_server.requests() == []


def test_resume_from_part_uses_range(hub_server, repo, tmp_path):
    [job] = _jobs(hub_server, tmp_path / "out", only="big/weights/weight.bin")
    content = (repo / job.name).read_bytes()
    job.dest.parent.mkdir(parents=True)
    part_path(job.dest).write_bytes(content[:5_000_000])
    meta_path(job.dest).write_text(json.dumps({"etag": None, "size": job.size, "sha256": job.sha256}))
    hub_server.clear_log()
    with Downloader() as dl:
        result = dl.fetch(job)
    assert result.resumed_from == 5_000_000 and result.transferred == len(content) - 5_000_000
    assert job.dest.read_bytes() == content
    [get] = _gets(hub_server, job.name)
    assert get["range"] == "bytes=5000000-" and get["status"] == 206
    assert get["bytes"] == len(content) - 5_000_000


def test_corrupt_part_restarts_and_ends_with_right_bytes(hub_server, repo, tmp_path):
    [job] = _jobs(hub_server, tmp_path / "out", only="mid.bin")
    content = (repo / job.name).read_bytes()
    job.dest.parent.mkdir(parents=True)
    part_path(job.dest).write_bytes(b"\0" * 1_000_000)  # not the file's first megabyte
    meta_path(job.dest).write_text(json.dumps({"etag": None, "size": job.size, "sha256": job.sha256}))
    hub_server.clear_log()
    with Downloader() as dl:
        result = dl.fetch(job)
    assert job.dest.read_bytes() == content and result.sha256 == job.sha256
    gets = _gets(hub_server, job.name)
    assert [g["range"] for g in gets] == ["bytes=1000000-", None]  # resumed, hash failed, started over


def test_part_without_its_sidecar_is_not_trusted(hub_server, repo, tmp_path):
    [job] = _jobs(hub_server, tmp_path / "out", only="mid.bin")
    job.dest.parent.mkdir(parents=True)
    part_path(job.dest).write_bytes(b"\0" * 1_000_000)
    hub_server.clear_log()
    with Downloader() as dl:
        result = dl.fetch(job)
    assert result.sha256 == job.sha256
    assert [g["range"] for g in _gets(hub_server, job.name)] == [None]


def test_changed_etag_restarts_the_file(hub_server, repo, tmp_path):
    [job] = _jobs(hub_server, tmp_path / "out", only="mid.bin")
    content = (repo / job.name).read_bytes()
    job.dest.parent.mkdir(parents=True)
    part_path(job.dest).write_bytes(content[:1_000_000])
    meta_path(job.dest).write_text(json.dumps({"etag": '"an-older-version"', "size": job.size}))
    hub_server.clear_log()
    with Downloader() as dl:
        dl.fetch(job)
    assert job.dest.read_bytes() == content
    gets = _gets(hub_server, job.name)
    assert gets[0]["range"] == "bytes=1000000-" and gets[-1]["range"] is None
    assert gets[-1]["bytes"] == len(content)


def test_missing_file_is_entry_not_found_naming_it(hub_server, repo, tmp_path):
    job = DownloadJob(name="nope.bin", url=hf_hub_url(REPO, "nope.bin", endpoint=hub_server.url),
                      dest=tmp_path / "nope.bin", size=10)
    with Downloader() as dl, pytest.raises(EntryNotFound, match="nope.bin"):
        dl.fetch(job)


def test_failure_of_one_file_cancels_the_rest(hub_server, repo, tmp_path):
    jobs = _jobs(hub_server, tmp_path / "out")
    jobs.append(DownloadJob(name="gone.bin", url=hf_hub_url(REPO, "gone.bin", endpoint=hub_server.url),
                            dest=tmp_path / "out" / "gone.bin", size=20_000_000))  # largest: fetched first
    with Downloader(workers=2) as dl, pytest.raises(EntryNotFound, match="gone.bin"):
        dl.fetch_all(jobs)


def test_server_stopping_mid_file_is_retried_then_reported_then_resumed(hub_server, repo, tmp_path):
    [job] = _jobs(hub_server, tmp_path / "out", only="big/weights/weight.bin")
    got = []
    stopped = threading.Event()

    def slow(n: int) -> None:  # pace the transfer so the server can be stopped half-way
        got.append(n)
        time.sleep(0.02)
        if sum(got) >= 8_000_000 and not stopped.is_set():
            stopped.set()
            hub_server.stop()

    with Downloader(retries=2, backoff=0.05) as dl:
        with pytest.raises(DownloadError, match="big/weights/weight.bin") as info:
            dl.fetch(job, slow)
    assert "2 retries" in str(info.value)
    on_disk = part_path(job.dest).stat().st_size
    assert 8_000_000 <= on_disk < job.size
    assert not job.dest.exists()

    hub_server.start()
    hub_server.clear_log()
    with Downloader() as dl:
        result = dl.fetch(job)
    assert result.sha256 == job.sha256 and result.resumed_from == on_disk
    [get] = _gets(hub_server, job.name)
    assert get["range"] == f"bytes={on_disk}-" and get["bytes"] == job.size - on_disk


LARGE = 80_000_000  # over 2 x SEGMENT_MIN: fetched as parallel byte ranges


def test_large_file_comes_in_parallel_ranges_and_resumes_each(hub_server, hub_root, tmp_path):
    make_repo(hub_root, "org/large", {"unet/weight.bin": LARGE})
    snap = repo_files("org/large")
    [f] = snap.files
    job = DownloadJob(name=f.path, url=hf_hub_url("org/large", f.path, revision=snap.sha, endpoint=hub_server.url),
                      dest=tmp_path / "out" / f.path, size=f.size, sha256=f.sha256)
    got = []

    def interrupt(n: int) -> None:  # stop every range part-way, like a killed process would
        got.append(n)
        if sum(got) >= LARGE // 2:
            raise KeyboardInterrupt

    with Downloader(segments=3) as dl, pytest.raises(KeyboardInterrupt):
        dl.fetch(job, interrupt)
    sidecar = json.loads(meta_path(job.dest).read_text())
    ranges = sidecar["segments"]
    assert len(ranges) == 3 and ranges[0][0] == 0 and ranges[-1][1] == LARGE
    done = sum(d for _s, _e, d in ranges)
    assert 0 < done < LARGE
    first = _gets(hub_server, f.path)
    assert len(first) == 3 and all(g["range"] and g["status"] == 206 for g in first)

    hub_server.clear_log()
    with Downloader(segments=3) as dl:
        result = dl.fetch(job)
    assert result.sha256 == f.sha256 == hashlib.sha256((hub_root / "org/large" / f.path).read_bytes()).hexdigest()
    again = _gets(hub_server, f.path)
    assert sum(g["bytes"] for g in again) == LARGE - done == result.transferred
    starts = sorted(int(g["range"].split("=")[1].split("-")[0]) for g in again)
    assert starts == sorted(s + d for s, e, d in ranges if d < e - s)
    assert not meta_path(job.dest).exists() and not part_path(job.dest).exists()
