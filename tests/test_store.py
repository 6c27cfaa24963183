"""The store's own parts: references, locks that die with their holder, prune, atomic helpers."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from coreml_hub import paths, store
from coreml_hub.errors import ModelNotPulled, UsageError

KEY = store.EntryKey("apple/coreml-stable-diffusion-v1-5", "a" * 40, "split_einsum/compiled")

HOLD_LOCK = """
import sys, time
from coreml_hub import store
key = store.EntryKey("apple/coreml-stable-diffusion-v1-5", "a" * 40, "split_einsum/compiled")
with store.entry_lock(key):
    print("locked", flush=True)
    time.sleep(600)
"""


def _holder(env_home: Path) -> subprocess.Popen:
    env = dict(os.environ, COREML_HUB_HOME=str(env_home))
    proc = subprocess.Popen([sys.executable, "-c", HOLD_LOCK], stdout=subprocess.PIPE, text=True, env=env)
    assert proc.stdout is not None
    assert proc.stdout.readline().strip() == "locked"
    return proc


def _fake_entry(key: store.EntryKey, files: dict[str, bytes], *, validation: str = "ok",
                pulled_at: str = "2024-05-01T10:00:00+00:00") -> Path:
    """An entry laid out as a pull leaves it (tests of scanning only; pulls are tested in test_pull.py)."""
    entry = key.path()
    entry.mkdir(parents=True)
    listed = []
    for rel, data in files.items():
        (entry / rel).parent.mkdir(parents=True, exist_ok=True)
        (entry / rel).write_bytes(data)
        listed.append({"path": rel, "size": len(data), "sha256": None})
    store.write_json_atomic(entry / store.MANIFEST_NAME, {
        "repo": key.repo, "commit": key.commit, "revision": "main", "pulled_at": pulled_at,
        "variant": {"id": key.variant, "attention": key.variant.split("/")[0], "format": key.variant.split("/")[1],
                    "tags": [], "resolution": None, "root": key.variant, "unet_form": key.unet_form},
        "layout": "apple", "validation": {"status": validation, "problems": []}, "files": listed})
    store.set_ref(key.repo, "main", key.commit)
    return entry


@pytest.mark.parametrize("text, expected", [
    ("apple/sd", store.ModelRef("apple/sd")),
    ("apple/sd:split_einsum/compiled", store.ModelRef("apple/sd", None, "split_einsum/compiled")),
    ("apple/sd@v2:original/compiled@512x768+6bit", store.ModelRef("apple/sd", "v2", "original/compiled@512x768+6bit")),
    ("apple/sd@abc1234", store.ModelRef("apple/sd", "abc1234", None)),
])
def test_parse_ref(text, expected):
    assert store.parse_ref(text) == expected


def test_parse_ref_rejects_conflicts_and_garbage():
    with pytest.raises(UsageError):
        store.parse_ref("apple/sd:original/compiled", variant="split_einsum/compiled")
    with pytest.raises(UsageError):
        store.parse_ref("a/b/c")
    assert store.parse_ref("apple/sd", variant="original/packages").variant == "original/packages"


def test_lock_of_a_killed_holder_is_released(store_home):
    proc = _holder(store_home)
    try:
        with pytest.raises(store.StoreBusy):
            with store.entry_lock(KEY, timeout=0.2):
                pass
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
    started = time.monotonic()
    with store.entry_lock(KEY, timeout=5):
        pass
    assert time.monotonic() - started < 2


def test_prune_keeps_staging_a_live_pull_holds_and_removes_the_rest(store_home):
    live = KEY.staging() / "files"
    live.mkdir(parents=True)
    (live / "weight.bin.part").write_bytes(b"x" * 1000)
    dead_key = store.EntryKey("org/other", "b" * 40, "original/packages")
    (dead_key.staging() / "files").mkdir(parents=True)
    (dead_key.staging() / "files" / "w.bin.part").write_bytes(b"y" * 500)
    proc = _holder(store_home)
    try:
        dry = store.prune(dry_run=True)
        assert [i.path for i in dry.items] == [dead_key.staging()] and dry.bytes_freed == 500
        assert dead_key.staging().exists()
        result = store.prune()
        assert KEY.staging() in result.skipped_locked
        assert not dead_key.staging().exists() and live.exists()
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
    store.prune()
    assert not KEY.staging().exists()


def test_prune_removes_orphan_refs_and_empty_folders_but_never_entries(store_home):
    entry = _fake_entry(KEY, {"vocab.json": b"{}"})
    store.set_ref(KEY.repo, "v1", "c" * 40)  # a ref to a commit that is not in the store
    empty = paths.models_dir() / "org--gone" / ("d" * 40)
    empty.mkdir(parents=True)
    result = store.prune()
    kinds = {(i.kind, i.path.name) for i in result.items}
    assert ("orphan-ref", "v1") in kinds and ("empty-dir", "d" * 40) in kinds and ("empty-dir", "org--gone") in kinds
    assert entry.is_dir() and store.resolve_ref(KEY.repo, "main") == KEY.commit
    assert store.resolve_ref(KEY.repo, "v1") is None
    assert not (paths.models_dir() / "org--gone").exists()


def test_list_and_find_report_status(store_home):
    ok = _fake_entry(KEY, {"vocab.json": b"{}", "merges.txt": b"#v\n"})
    other = store.EntryKey(KEY.repo, KEY.commit, "original/compiled")
    broken = _fake_entry(other, {"vocab.json": b"{}", "merges.txt": b"#v\n"})
    (broken / "merges.txt").unlink()
    bad_key = store.EntryKey("org/bad", "e" * 40, "original/packages")
    _fake_entry(bad_key, {"a.bin": b"123"}, validation="invalid")
    by_variant = {(p.repo, p.variant): p for p in store.list_pulled()}
    assert by_variant[(KEY.repo, "split_einsum/compiled")].status == "ok"
    assert by_variant[(KEY.repo, "original/compiled")].status == "incomplete"
    assert by_variant[("org/bad", "original/packages")].status == "invalid"
    assert by_variant[(KEY.repo, "split_einsum/compiled")].size == 5
    (ok / "vocab.json").write_bytes(b"{...}")  # changed size: no longer what was pulled
    assert store.load_entry(ok).status == "invalid"

    found = store.find_pulled(f"{KEY.repo}:original/compiled")
    assert found.path == broken and found.status == "incomplete"
    with pytest.raises(ModelNotPulled, match="split_einsum/compiled, original/compiled|original/compiled"):
        store.find_pulled(f"{KEY.repo}:split_einsum_v2/compiled")
    with pytest.raises(ModelNotPulled):
        store.find_pulled("org/never")
    from coreml_hub.errors import InvalidBundle

    with pytest.raises(InvalidBundle):
        store.find_pulled(f"{KEY.repo}:original/compiled", require_ok=True)


def test_remove_is_whole_entries_and_reports_bytes(store_home):
    _fake_entry(KEY, {"vocab.json": b"{}" * 10})
    other = store.EntryKey(KEY.repo, KEY.commit, "original/compiled")
    _fake_entry(other, {"vocab.json": b"{}"})
    dry = store.remove(f"{KEY.repo}:original/compiled", dry_run=True)
    assert [p.variant for p in dry.entries] == ["original/compiled"] and other.path().exists()
    done = store.remove(f"{KEY.repo}:original/compiled")
    assert done.bytes_freed >= 2 and not other.path().exists() and KEY.path().exists()
    store.remove(KEY.repo)
    assert store.list_pulled() == []
    assert not (paths.models_dir() / store.repo_folder(KEY.repo)).exists()  # refs and folders went too
    assert not any(p.name.startswith(".trash-") for p in paths.staging_dir().iterdir())


def test_write_json_atomic_leaves_no_temp_files(tmp_path):
    target = tmp_path / "m.json"
    store.write_json_atomic(target, {"a": 1})
    store.write_json_atomic(target, {"a": 2})
    assert json.loads(target.read_text()) == {"a": 2}
    assert [p.name for p in tmp_path.iterdir()] == ["m.json"]


def test_manifests_are_readable_by_other_users_of_a_shared_store(tmp_path: Path) -> None:
    from coreml_hub import atomic

    target = tmp_path / "manifest.json"
    atomic.write_json_atomic(target, {"a": 1})
    # not mkstemp's private 0600: the mode any file made under this umask gets
    assert target.stat().st_mode & 0o777 == 0o666 & ~atomic._UMASK
