"""Failures a user meets: one `Error:` line, one `Hint:` line, the right exit code, no traceback."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from huggingface_hub import hf_hub_download

from coreml_hub import errors, hub
from coreml_hub.cli import run_cli
from coreml_hub.testing.hubrepo import apple_sd_files, make_repo
from coreml_hub.testing.hubserver import HubServer

SECRET = "hf_do_not_print_me_123"


def run(args: list[str], **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "coreml_hub", *args], capture_output=True, text=True,
                          env={**os.environ, **env}, timeout=120)


def assert_clean_failure(result: subprocess.CompletedProcess[str], code: int, *needles: str) -> list[str]:
    lines = result.stderr.splitlines()
    assert result.returncode == code, result.stderr
    assert len(lines) == 2 and lines[0].startswith("Error: ") and lines[1].startswith("Hint: "), result.stderr
    assert "Traceback" not in result.stderr and result.stdout == ""
    for needle in needles:
        assert needle in result.stderr, (needle, result.stderr)
    return lines


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # nothing listens once the socket is closed


def test_unknown_repo(hub_server: HubServer) -> None:
    make_repo(hub_server.root, "org/exists", {"a.txt": "x"})
    missing = run(["show", "org/missing"], HF_TOKEN=SECRET)
    assert_clean_failure(missing, 1, "org/missing", hub_server.url, "coreml-hub list --search")
    assert SECRET not in missing.stderr
    assert_clean_failure(run(["show", "org/exists", "--revision", "v2"]), 1, "'v2'", "org/exists", "--revision")


def test_unreachable_endpoint() -> None:
    endpoint = f"http://127.0.0.1:{closed_port()}"
    for args in (["list"], ["show", "apple/coreml-stable-diffusion-v1-5"], ["list", "--search", "sd"]):
        result = run(args, HF_ENDPOINT=endpoint, HF_TOKEN=SECRET)
        assert_clean_failure(result, 1, f"Cannot reach {endpoint}", "HF_ENDPOINT", "HF_HUB_OFFLINE")
        assert SECRET not in result.stderr


def test_offline_mode_is_honoured_at_call_time(hub_server: HubServer, monkeypatch: pytest.MonkeyPatch,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    make_repo(hub_server.root, "org/x", {"a.txt": "x"})
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # set after huggingface_hub was imported
    assert run_cli(["list"]) == 1 and run_cli(["show", "org/x"]) == 1
    err = capsys.readouterr().err
    assert err.count("Error: HF_HUB_OFFLINE is set") == 2 and "Hint: " in err
    assert hub_server.requests() == []  # nothing was sent


def test_gated_repo_without_token(hub_server: HubServer, tmp_path: Path) -> None:
    make_repo(hub_server.root, "org/gated-sd", apple_sd_files(attentions=("original",)),
              meta={"gated": True, "library_name": "coreml"})
    (hub_server.root / ".tokens").write_text(f"{SECRET}\n")
    # the library layer names the repo and the fix
    with pytest.raises(errors.GatedRepo) as caught:
        with hub.hub_errors("org/gated-sd"):
            hf_hub_download("org/gated-sd", "original/compiled/vocab.json", endpoint=hub_server.url,
                            cache_dir=tmp_path, token=False)
    assert "org/gated-sd is gated" in caught.value.message and "HF_TOKEN" in (caught.value.hint or "")
    # and so does the command that downloads
    home = str(tmp_path / "store")
    result = run(["pull", "org/gated-sd", "--variant", "original/compiled"], COREML_HUB_HOME=home)
    assert_clean_failure(result, 1, "HF_TOKEN")
    assert "restricted" in result.stderr or "gated" in result.stderr
    wrong = run(["pull", "org/gated-sd", "--variant", "original/compiled"], COREML_HUB_HOME=home,
                HF_TOKEN="hf_not_on_the_list")
    assert_clean_failure(wrong, 1, "HF_TOKEN")
    assert "hf_not_on_the_list" not in wrong.stderr


@pytest.mark.parametrize("bad", ["foo", "library", "=coreml", "library=", "color=red"])
def test_bad_filter_syntax_is_a_usage_error(bad: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert run_cli(["list", "--filter", bad]) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 2 and err[0].startswith("Error: ") and bad in err[0]
    assert err[1].startswith("Hint: ") and "library" in err[1]


def test_bad_filter_in_a_subprocess_exits_2() -> None:
    assert_clean_failure(run(["list", "--filter", "foo"], HF_ENDPOINT="http://127.0.0.1:9"), 2, "KEY=VALUE")
    assert_clean_failure(run(["list", "--filter", "author=a", "--filter", "author=b"]), 2, "one author")


def test_invalid_repo_id_is_a_usage_error() -> None:
    assert_clean_failure(run(["show", "not a repo id"]), 2, "org/name")


def test_debug_shows_the_traceback() -> None:
    endpoint = f"http://127.0.0.1:{closed_port()}"
    result = run(["show", "org/x"], HF_ENDPOINT=endpoint, COREML_HUB_DEBUG="1")
    assert result.returncode == 1 and "Traceback" in result.stderr
    assert result.stderr.rstrip().splitlines()[-2].startswith("Error: Cannot reach")
