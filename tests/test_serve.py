"""`coreml-hub serve` against the unmodified huggingface_hub client: every call the project relies on."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
from pathlib import Path

import httpx2
import pytest
from huggingface_hub import HfApi, get_hf_file_metadata, hf_hub_download, hf_hub_url, snapshot_download
from huggingface_hub.errors import (
    EntryNotFoundError,
    GatedRepoError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from huggingface_hub.file_download import http_get
from huggingface_hub.hf_api import RepoFile, RepoFolder

from coreml_hub.testing.hubrepo import filler, make_repo
from coreml_hub.testing.hubserver import HubServer

REPO = "apple/coreml-stable-diffusion-v1-5"
SMALL = {
    "README.md": "# Core ML Stable Diffusion\n",
    "original/compiled/merges.txt": "#version: 0.2\nh e\n",
    "original/compiled/vocab.json": '{"h": 0, "e": 1}',
    "original/compiled/Unet.mlmodelc/model.mil": "program(1.0)\n",
    "original/compiled/Unet.mlmodelc/coremldata.bin": 1234,
    "original/compiled/Unet.mlmodelc/weights/weight.bin": 300_000,
    "original/compiled/TextEncoder.mlmodelc/weights/weight.bin": 70_000,
    "split_einsum/packages/Stable_Diffusion_version_runwayml_stable-diffusion-v1-5_unet.mlpackage/Manifest.json": "{}",
}


def catalog(root: Path) -> None:
    """Four repos with distinct metadata, for search tests."""
    make_repo(root, REPO, SMALL, meta={
        "likes": 500, "downloads": 9000, "library_name": "coreml", "pipeline_tag": "text-to-image",
        "tags": ["stable-diffusion", "core-ml"], "lastModified": "2024-01-10T00:00:00.000Z"})
    make_repo(root, "apple/coreml-stable-diffusion-xl-base", {"compiled/vocab.json": "{}"}, meta={
        "likes": 900, "downloads": 100, "library_name": "coreml", "pipeline_tag": "text-to-image",
        "tags": ["stable-diffusion-xl"], "lastModified": "2023-08-01T00:00:00.000Z"})
    make_repo(root, "coreml-community/coreml-anything-v3.0", {"README.md": "x"}, meta={
        "likes": 20, "downloads": 5000, "library_name": "coreml", "tags": ["stable-diffusion"],
        "lastModified": "2024-06-01T00:00:00.000Z"})
    make_repo(root, "someone/pytorch-model", {"model.safetensors": 100}, meta={
        "likes": 1, "downloads": 1, "library_name": "diffusers", "lastModified": "2022-01-01T00:00:00.000Z"})


def api_for(server: HubServer, token: str | bool | None = False) -> HfApi:
    return HfApi(endpoint=server.url, token=token)


# --- list_models ---------------------------------------------------------------------------------


def test_list_models_filters_author_search_pipeline(hub_server: HubServer) -> None:
    catalog(hub_server.root)
    api = api_for(hub_server)
    ids = lambda **kw: sorted(m.id for m in api.list_models(**kw))  # noqa: E731
    assert ids(filter="coreml") == ["apple/coreml-stable-diffusion-v1-5", "apple/coreml-stable-diffusion-xl-base",
                                    "coreml-community/coreml-anything-v3.0"]
    assert ids(filter=["coreml", "stable-diffusion"]) == [REPO, "coreml-community/coreml-anything-v3.0"]
    assert ids(filter="diffusers") == ["someone/pytorch-model"]
    assert ids(author="apple") == [REPO, "apple/coreml-stable-diffusion-xl-base"]
    assert ids(search="XL") == ["apple/coreml-stable-diffusion-xl-base"]
    assert ids(pipeline_tag="text-to-image") == [REPO, "apple/coreml-stable-diffusion-xl-base"]
    assert ids(author="apple", search="v1-5") == [REPO]
    assert ids(filter="no-such-tag") == []


@pytest.mark.parametrize("sort, expected", [
    ("likes", ["apple/coreml-stable-diffusion-xl-base", REPO, "coreml-community/coreml-anything-v3.0"]),
    ("downloads", [REPO, "coreml-community/coreml-anything-v3.0", "apple/coreml-stable-diffusion-xl-base"]),
    ("last_modified", ["coreml-community/coreml-anything-v3.0", REPO, "apple/coreml-stable-diffusion-xl-base"]),
])
def test_list_models_sort_and_limit(hub_server: HubServer, sort: str, expected: list[str]) -> None:
    catalog(hub_server.root)
    api = api_for(hub_server)
    assert [m.id for m in api.list_models(filter="coreml", sort=sort)] == expected
    assert [m.id for m in api.list_models(filter="coreml", sort=sort, limit=2)] == expected[:2]
    hub_server.clear_log()
    list(api.list_models(filter="coreml", sort=sort, limit=2))
    (req,) = hub_server.requests()
    assert "limit=2" in req["query"]


def test_list_models_direction_and_library_params(hub_server: HubServer) -> None:
    catalog(hub_server.root)
    r = httpx2.get(f"{hub_server.url}/api/models", params={"filter": "coreml", "sort": "likes", "direction": "1"})
    assert [m["id"] for m in r.json()] == ["coreml-community/coreml-anything-v3.0", REPO,
                                           "apple/coreml-stable-diffusion-xl-base"]
    # the Hub's `library=` query parameter (the client sends libraries as `filter=` values)
    r = httpx2.get(f"{hub_server.url}/api/models", params={"library": "diffusers"})
    assert [m["id"] for m in r.json()] == ["someone/pytorch-model"]


def test_list_models_full_expand_and_default_fields(hub_server: HubServer) -> None:
    catalog(hub_server.root)
    api = api_for(hub_server)
    (plain,) = api.list_models(search="v1-5")
    assert plain.siblings is None and plain.likes == 500 and plain.downloads == 9000
    assert {"coreml", "text-to-image", "stable-diffusion"} <= set(plain.tags)

    (full,) = api.list_models(search="v1-5", full=True)
    assert sorted(s.rfilename for s in full.siblings) == sorted(SMALL)
    assert len(full.sha) == 40 and full.last_modified.year == 2024 and full.author == "apple"

    (expanded,) = api.list_models(search="v1-5", expand=["siblings", "likes"])
    assert sorted(s.rfilename for s in expanded.siblings) == sorted(SMALL)
    assert expanded.likes == 500
    assert expanded.downloads is None and expanded.tags is None  # only what was asked for


def test_list_models_paginates_by_link_header(hub_root: Path, tmp_path: Path) -> None:
    for i in range(5):
        make_repo(hub_root, f"org/model-{i}", {"a.txt": str(i)}, meta={"likes": i, "library_name": "coreml"})
    with HubServer(hub_root, tmp_path / "log.jsonl", extra_args=("--page-size", "2")) as server:
        models = list(api_for(server).list_models(filter="coreml", sort="likes"))
        assert [m.id for m in models] == [f"org/model-{i}" for i in (4, 3, 2, 1, 0)]
        pages = [r for r in server.requests() if r["path"] == "/api/models"]
        assert len(pages) == 3 and "cursor=2" in pages[1]["query"] and "cursor=4" in pages[2]["query"]
        assert len(list(api_for(server).list_models(filter="coreml", limit=3))) == 3


# --- model_info, tree, paths-info ------------------------------------------------------------------


def test_model_info_files_metadata(hub_server: HubServer) -> None:
    folder = make_repo(hub_server.root, REPO, SMALL, meta={"likes": 5, "library_name": "coreml"})
    info = api_for(hub_server).model_info(REPO, files_metadata=True)
    by_name = {s.rfilename: s for s in info.siblings}
    assert set(by_name) == set(SMALL)  # .hub.json is not a repo file
    for path, sibling in by_name.items():
        data = (folder / path).read_bytes()
        assert sibling.size == len(data)
        if path.endswith(".bin"):  # LFS by extension, like the Hub's default .gitattributes
            assert sibling.lfs is not None and sibling.lfs.sha256 == hashlib.sha256(data).hexdigest()
            assert sibling.lfs.size == len(data)
        else:
            assert sibling.lfs is None
            assert sibling.blob_id == hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()
    assert info.likes == 5 and info.library_name == "coreml" and len(info.sha) == 40


def test_commit_sha_follows_content(hub_server: HubServer) -> None:
    folder = make_repo(hub_server.root, REPO, SMALL)
    api = api_for(hub_server)
    first = api.model_info(REPO).sha
    assert api.model_info(REPO).sha == first
    assert api.model_info(REPO, revision=first).sha == first  # the sha is a valid revision
    (folder / "README.md").write_text("changed\n")
    second = api.model_info(REPO).sha
    assert second != first
    with pytest.raises(RevisionNotFoundError):
        api.model_info(REPO, revision=first)  # the old commit is gone, as after a force-push


@pytest.mark.skipif(shutil.which("git") is None, reason="needs the git binary as the reference for object ids")
def test_object_ids_match_git(hub_server: HubServer, tmp_path: Path) -> None:
    files = {"README.md": "hello\n", "a/b/c.txt": "deep\n", "a/z.json": "{}", "a-b.txt": "sorts before a/"}
    folder = make_repo(hub_server.root, "org/plain", files)
    work = tmp_path / "git"
    shutil.copytree(folder, work, ignore=shutil.ignore_patterns(".*"))
    git = ["git", "-c", "init.defaultBranch=main", "-C", str(work)]
    subprocess.run([*git, "init", "-q"], check=True)
    subprocess.run([*git, "add", "."], check=True)
    tree_of = lambda rev: subprocess.run([*git, "rev-parse", rev], check=True, capture_output=True,  # noqa: E731
                                         text=True).stdout.strip()
    subprocess.run([*git, "write-tree"], check=True, capture_output=True)
    entries = {e.path: e for e in api_for(hub_server).list_repo_tree("org/plain", recursive=True)}
    for path in files:
        assert entries[path].blob_id == tree_of(f":{path}")
    root_tree = subprocess.run([*git, "write-tree"], check=True, capture_output=True, text=True).stdout.strip()
    assert entries["a"].tree_id == tree_of(f"{root_tree}:a")
    assert entries["a/b"].tree_id == tree_of(f"{root_tree}:a/b")


def test_list_repo_tree_recursive_and_paginated(hub_root: Path, tmp_path: Path) -> None:
    make_repo(hub_root, REPO, SMALL)
    with HubServer(hub_root, tmp_path / "log.jsonl", extra_args=("--page-size", "3")) as server:
        api = api_for(server)
        everything = list(api.list_repo_tree(REPO, recursive=True))
        files = {e.path: e for e in everything if isinstance(e, RepoFile)}
        folders = {e.path for e in everything if isinstance(e, RepoFolder)}
        assert set(files) == set(SMALL)
        assert {"original", "original/compiled", "original/compiled/Unet.mlmodelc", "split_einsum"} <= folders
        weight = files["original/compiled/Unet.mlmodelc/weights/weight.bin"]
        assert weight.size == 300_000 and weight.lfs.sha256 == hashlib.sha256(filler(300_000, f"{REPO}/{weight.path}")).hexdigest()
        tree_pages = [r for r in server.requests() if "/tree/" in r["path"]]
        assert len(tree_pages) == -(-len(everything) // 3)  # followed every Link header

        top = list(api.list_repo_tree(REPO))
        assert {e.path for e in top} == {"README.md", "original", "split_einsum"}
        sub = list(api.list_repo_tree(REPO, path_in_repo="original/compiled/Unet.mlmodelc"))
        assert {e.path for e in sub} == {"original/compiled/Unet.mlmodelc/model.mil",
                                         "original/compiled/Unet.mlmodelc/coremldata.bin",
                                         "original/compiled/Unet.mlmodelc/weights"}
        with_commits = list(api.list_repo_tree(REPO, expand=True))
        assert all(e.last_commit is not None for e in with_commits)
        with pytest.raises(EntryNotFoundError):
            list(api.list_repo_tree(REPO, path_in_repo="no/such/folder"))
        sha = api.model_info(REPO).sha
        assert len(list(api.list_repo_tree(REPO, recursive=True, revision=sha))) == len(everything)


def test_get_paths_info(hub_server: HubServer) -> None:
    make_repo(hub_server.root, REPO, SMALL)
    infos = api_for(hub_server).get_paths_info(REPO, ["README.md", "original/compiled", "missing.txt", ".hub.json"])
    assert [(type(i).__name__, i.path) for i in infos] == [("RepoFile", "README.md"),
                                                          ("RepoFolder", "original/compiled")]


@pytest.mark.parametrize("body", [b"{not json", b'["README.md"]'])
def test_paths_info_rejects_a_malformed_body(hub_server: HubServer, body: bytes) -> None:
    make_repo(hub_server.root, REPO, SMALL)
    response = httpx2.post(f"{hub_server.url}/api/models/{REPO}/paths-info/main", content=body,
                           headers={"Content-Type": "application/json"})
    assert response.status_code == 400 and response.headers["X-Error-Code"] == "BadRequest"


# --- downloads -------------------------------------------------------------------------------------


def test_hf_hub_download_head_then_get(hub_server: HubServer, tmp_path: Path) -> None:
    folder = make_repo(hub_server.root, REPO, SMALL)
    name = "original/compiled/Unet.mlmodelc/weights/weight.bin"
    hub_server.clear_log()
    path = hf_hub_download(REPO, name, endpoint=hub_server.url, cache_dir=tmp_path / "cache", token=False)
    assert Path(path).read_bytes() == (folder / name).read_bytes()
    reqs = hub_server.requests()
    assert [(r["method"], r["status"], r.get("file")) for r in reqs] == [("HEAD", 200, name), ("GET", 200, name)]
    assert reqs[1]["bytes"] == 300_000 and reqs[0]["bytes"] == 0
    assert reqs[1]["range"] is None and reqs[1]["path"] == f"/{REPO}/resolve/main/{name}"
    # a second call is answered from the cache with one HEAD
    hub_server.clear_log()
    hf_hub_download(REPO, name, endpoint=hub_server.url, cache_dir=tmp_path / "cache", token=False)
    assert [r["method"] for r in hub_server.requests()] == ["HEAD"]


def test_file_metadata_headers(hub_server: HubServer) -> None:
    folder = make_repo(hub_server.root, REPO, SMALL)
    sha = api_for(hub_server).model_info(REPO).sha
    lfs_name = "original/compiled/Unet.mlmodelc/weights/weight.bin"
    meta = get_hf_file_metadata(hf_hub_url(REPO, lfs_name, endpoint=hub_server.url))
    assert meta.commit_hash == sha and meta.size == 300_000
    assert meta.etag == hashlib.sha256((folder / lfs_name).read_bytes()).hexdigest()
    r = httpx2.head(hf_hub_url(REPO, lfs_name, endpoint=hub_server.url))
    assert r.headers["X-Linked-Size"] == "300000" and r.headers["Accept-Ranges"] == "bytes"
    assert r.headers["X-Linked-Etag"].strip('"') == meta.etag and r.headers["ETag"].strip('"') == meta.etag

    small = get_hf_file_metadata(hf_hub_url(REPO, "README.md", revision=sha, endpoint=hub_server.url))
    data = (folder / "README.md").read_bytes()
    assert small.etag == hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()
    assert small.size == len(data) and small.commit_hash == sha
    assert "X-Linked-Etag" not in httpx2.head(hf_hub_url(REPO, "README.md", endpoint=hub_server.url)).headers


def test_range_requests(hub_server: HubServer, tmp_path: Path) -> None:
    folder = make_repo(hub_server.root, REPO, SMALL)
    name = "original/compiled/Unet.mlmodelc/weights/weight.bin"
    data = (folder / name).read_bytes()
    url = hf_hub_url(REPO, name, endpoint=hub_server.url)
    r = httpx2.get(url, headers={"Range": "bytes=100-199"})
    assert r.status_code == 206 and r.content == data[100:200]
    assert r.headers["Content-Range"] == f"bytes 100-199/{len(data)}" and r.headers["Content-Length"] == "100"
    r = httpx2.get(url, headers={"Range": "bytes=-10"})
    assert r.status_code == 206 and r.content == data[-10:]
    r = httpx2.get(url, headers={"Range": f"bytes={len(data)}-"})
    assert r.status_code == 416 and r.headers["Content-Range"] == f"bytes */{len(data)}"

    # the client's own resume path: http_get continues a partial file with a Range request
    partial = tmp_path / "partial"
    partial.write_bytes(data[:123_456])
    hub_server.clear_log()
    with open(partial, "ab") as f:
        http_get(url, f, resume_size=123_456, expected_size=len(data))
    assert partial.read_bytes() == data
    (req,) = hub_server.requests()
    assert req["status"] == 206 and req["range"] == "bytes=123456-" and req["bytes"] == len(data) - 123_456


def test_snapshot_download_allow_patterns_fetches_only_matches(hub_server: HubServer, tmp_path: Path) -> None:
    folder = make_repo(hub_server.root, REPO, SMALL)
    hub_server.clear_log()
    out = snapshot_download(REPO, allow_patterns=["original/compiled/Unet.mlmodelc/*", "original/compiled/*.txt"],
                            endpoint=hub_server.url, local_dir=tmp_path / "snap", token=False)
    got = sorted(p.relative_to(out).as_posix() for p in Path(out).rglob("*")
                 if p.is_file() and ".cache" not in p.parts)
    wanted = sorted(p for p in SMALL if p.startswith("original/compiled/Unet.mlmodelc/") or p.endswith("merges.txt"))
    assert got == wanted
    for p in wanted:
        assert (Path(out) / p).read_bytes() == (folder / p).read_bytes()
    fetched = sorted(r["file"] for r in hub_server.requests() if r["method"] == "GET" and "file" in r)
    assert fetched == wanted
    sha = api_for(hub_server).model_info(REPO).sha
    revs = {r["path"].split("/tree/")[1] for r in hub_server.requests() if "/tree/" in r["path"]}
    assert revs == {sha}  # resolved `main` once, then listed and fetched at the commit


def test_missing_repo_revision_and_file(hub_server: HubServer, tmp_path: Path) -> None:
    make_repo(hub_server.root, REPO, SMALL)
    api = api_for(hub_server)
    with pytest.raises(RepositoryNotFoundError):
        api.model_info("apple/nope")
    with pytest.raises(RevisionNotFoundError):
        api.model_info(REPO, revision="v9")
    with pytest.raises(RevisionNotFoundError):
        hf_hub_download(REPO, "README.md", revision="0" * 40, endpoint=hub_server.url, cache_dir=tmp_path, token=False)
    with pytest.raises(EntryNotFoundError):
        hf_hub_download(REPO, "nope.bin", endpoint=hub_server.url, cache_dir=tmp_path, token=False)
    (hub_server.root / "secret.txt").write_text("outside every repo")
    for bad in (".hub.json", "../../secret.txt", "original/../README.md", "%2e%2e/%2e%2e/secret.txt"):
        # sent byte for byte: an HTTP client would normalize the dot segments away
        with socket.create_connection(("127.0.0.1", hub_server.port)) as raw:
            raw.sendall(f"GET /{REPO}/resolve/main/{bad} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
            answer = b""
            while chunk := raw.recv(65536):
                answer += chunk
        head = answer.decode(errors="replace")
        assert head.startswith("HTTP/1.1 404") and "X-Error-Code: EntryNotFound" in head, bad
        assert "outside every repo" not in head
    r = httpx2.head(f"{hub_server.url}/{REPO}/resolve/main/nope.bin")
    assert r.headers["X-Error-Code"] == "EntryNotFound" and len(r.headers["X-Repo-Commit"]) == 40


# --- gated and private repos ---------------------------------------------------------------------------


def test_gated_repo_needs_an_accepted_token(hub_server: HubServer, tmp_path: Path,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    make_repo(hub_server.root, "org/gated", {"weights.bin": 1000}, meta={"gated": True})
    (hub_server.root / ".tokens").write_text("# tokens that may read gated repos\nhf_good\n")
    # the repo's card and file list stay public, as on the Hub
    info = api_for(hub_server).model_info("org/gated", files_metadata=True)
    assert info.gated == "auto" and [s.rfilename for s in info.siblings] == ["weights.bin"]
    with pytest.raises(GatedRepoError) as no_token:
        hf_hub_download("org/gated", "weights.bin", endpoint=hub_server.url, cache_dir=tmp_path / "a", token=False)
    assert no_token.value.response.status_code == 401
    with pytest.raises(GatedRepoError) as bad_token:
        hf_hub_download("org/gated", "weights.bin", endpoint=hub_server.url, cache_dir=tmp_path / "b",
                        token="hf_wrong")
    assert bad_token.value.response.status_code == 403
    path = hf_hub_download("org/gated", "weights.bin", endpoint=hub_server.url, cache_dir=tmp_path / "c",
                           token="hf_good")
    assert os.path.getsize(path) == 1000


def test_tokens_from_environment(hub_root: Path, tmp_path: Path) -> None:
    make_repo(hub_root, "org/gated", {"weights.bin": 10}, meta={"gated": True})
    env = {**os.environ, "COREML_HUB_SERVE_TOKENS": "hf_a, hf_b"}
    with HubServer(hub_root, tmp_path / "log.jsonl", env=env) as server:
        url = hf_hub_url("org/gated", "weights.bin", endpoint=server.url)
        assert httpx2.get(url, headers={"Authorization": "Bearer hf_b"}).status_code == 200
        assert httpx2.get(url).headers["X-Error-Code"] == "GatedRepo"


def test_private_repo_is_invisible_without_token(hub_server: HubServer) -> None:
    make_repo(hub_server.root, "org/secret", {"a.txt": "x"}, meta={"private": True, "library_name": "coreml"})
    make_repo(hub_server.root, "org/open", {"a.txt": "y"}, meta={"library_name": "coreml"})
    (hub_server.root / ".tokens").write_text("hf_good\n")
    assert [m.id for m in api_for(hub_server).list_models(filter="coreml")] == ["org/open"]
    with pytest.raises(RepositoryNotFoundError):
        api_for(hub_server).model_info("org/secret")
    assert [m.id for m in api_for(hub_server, "hf_good").list_models(filter="coreml")] == ["org/open", "org/secret"]
    assert api_for(hub_server, "hf_good").model_info("org/secret").private is True


# --- serving ---------------------------------------------------------------------------------------------


def test_concurrent_clients_and_a_stalled_one(hub_server: HubServer, tmp_path: Path) -> None:
    files = {f"part-{i}.bin": 2_000_000 + i for i in range(6)}
    folder = make_repo(hub_server.root, "org/many", files)
    # a client that asks for a file and never reads must not hold up the others
    stalled = socket.create_connection(("127.0.0.1", hub_server.port))
    stalled.sendall("GET /org/many/resolve/main/part-0.bin HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    errors: list[BaseException] = []

    def fetch(name: str) -> None:
        try:
            path = hf_hub_download("org/many", name, endpoint=hub_server.url, cache_dir=tmp_path / name, token=False)
            assert Path(path).read_bytes() == (folder / name).read_bytes()
        except BaseException as exc:  # surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=fetch, args=(n,)) for n in files]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    stalled.close()
    assert not errors and not any(t.is_alive() for t in threads)


def test_streams_without_buffering_the_file(hub_server: HubServer) -> None:
    size = 200 * 1024 * 1024
    folder = hub_server.root / "org" / "big"
    folder.mkdir(parents=True)
    with open(folder / "model.bin", "wb") as f:  # sparse: no disk space, same bytes on the wire
        f.truncate(size)
    url = hf_hub_url("org/big", "model.bin", endpoint=hub_server.url)
    received = 0
    with httpx2.stream("GET", url, timeout=120) as r:
        etag = r.headers["X-Linked-Etag"].strip('"')
        for chunk in r.iter_bytes(1 << 20):
            received += len(chunk)
    assert received == size
    zeros = hashlib.sha256()
    for _ in range(200):
        zeros.update(bytes(1024 * 1024))
    assert etag == zeros.hexdigest()
    status = Path(f"/proc/{hub_server.pid}/status")
    if status.exists():
        peak_kb = int(next(line for line in status.read_text().splitlines() if line.startswith("VmHWM")).split()[1])
        assert peak_kb < 120 * 1024, f"server peaked at {peak_kb} kB while sending {size} bytes"


def test_request_log_and_restart(hub_server: HubServer) -> None:
    make_repo(hub_server.root, REPO, SMALL)
    api_for(hub_server).model_info(REPO)
    httpx2.get(hf_hub_url(REPO, "README.md", endpoint=hub_server.url), headers={"Range": "bytes=0-3"})
    reqs = hub_server.requests()
    assert [(r["method"], r["path"], r["status"]) for r in reqs] == [
        ("GET", f"/api/models/{REPO}", 200), ("GET", f"/{REPO}/resolve/main/README.md", 206)]
    assert reqs[1]["range"] == "bytes=0-3" and reqs[1]["bytes"] == 4
    assert set(reqs[0]) >= {"method", "path", "query", "status", "range", "bytes", "time", "duration_ms"}
    url, port = hub_server.url, hub_server.port
    hub_server.stop()
    with pytest.raises(httpx2.ConnectError):
        httpx2.get(f"{url}/api/models")
    hub_server.start()
    assert (hub_server.url, hub_server.port) == (url, port)
    hub_server.clear_log()
    assert api_for(hub_server).model_info(REPO).id == REPO
    assert len(hub_server.requests()) == 1


def test_serve_cli_errors(tmp_path: Path) -> None:
    missing = subprocess.run([sys.executable, "-m", "coreml_hub", "serve", str(tmp_path / "nope"), "--port", "0"],
                             capture_output=True, text=True, timeout=60)
    assert missing.returncode == 2 and missing.stderr.startswith("Error: ") and "Hint: " in missing.stderr
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen(1)
    try:
        taken = subprocess.run([sys.executable, "-m", "coreml_hub", "serve", str(tmp_path), "--port",
                                str(busy.getsockname()[1])], capture_output=True, text=True, timeout=60)
    finally:
        busy.close()
    assert taken.returncode == 1 and "Cannot listen" in taken.stderr and "Traceback" not in taken.stderr
    for bad in (["--header-timeout", "0"], ["--idle-timeout", "-1"], ["--max-connections", "0"]):
        refused = subprocess.run([sys.executable, "-m", "coreml_hub", "serve", str(tmp_path), "--port", "0", *bad],
                                 capture_output=True, text=True, timeout=60)
        assert refused.returncode == 2 and bad[0] in refused.stderr and "Traceback" not in refused.stderr


@pytest.mark.parametrize("warm", [True, False])
def test_first_request_while_hashing(hub_root: Path, tmp_path: Path, warm: bool) -> None:
    make_repo(hub_root, "org/a", {"x.bin": 20_000_000, "y.bin": 20_000_000})
    args = () if warm else ("--no-warm",)
    with HubServer(hub_root, tmp_path / "log.jsonl", extra_args=args) as server:
        # asked at once: the answer waits for the (shared) hashing work, and is right
        r = httpx2.head(hf_hub_url("org/a", "x.bin", endpoint=server.url), timeout=60)
        assert r.status_code == 200 and len(r.headers["X-Repo-Commit"]) == 40
        assert r.headers["ETag"].strip('"') == hashlib.sha256((hub_root / "org/a/x.bin").read_bytes()).hexdigest()


def test_digests_are_remembered_across_restarts(hub_root: Path, tmp_path: Path) -> None:
    folder = make_repo(hub_root, "org/a", {"x.bin": 3_000, "notes.txt": "hi"})
    cache_file = hub_root / ".coreml-hub-digests.json"
    with HubServer(hub_root, tmp_path / "log.jsonl") as server:
        first = api_for(server).model_info("org/a", files_metadata=True)
    assert cache_file.exists()
    rows = {Path(row[0]).name: row for row in json.loads(cache_file.read_text())}
    assert rows["x.bin"][5] == hashlib.sha256((folder / "x.bin").read_bytes()).hexdigest()
    with HubServer(hub_root, tmp_path / "log.jsonl") as server:
        again = api_for(server).model_info("org/a", files_metadata=True)
        assert again.sha == first.sha
        assert [s.rfilename for s in again.siblings] == ["notes.txt", "x.bin"]  # the cache file is not served
    cache_file.write_text("not json")  # a damaged cache only costs a rehash
    with HubServer(hub_root, tmp_path / "log.jsonl", extra_args=("--no-digest-cache",)) as server:
        assert api_for(server).model_info("org/a").sha == first.sha
    assert cache_file.read_text() == "not json"
