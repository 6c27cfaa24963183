"""Helpers shared by the end-to-end tests: the CLI in-process, and what a mirror served."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from coreml_hub.cli import run_cli


def cli(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    """Run `coreml-hub ARGS` in this process: (exit code, stdout, stderr)."""
    capsys.readouterr()
    code = run_cli(list(args))
    out, err = capsys.readouterr()
    return code, out, err


def fetched(server: Any, repo: str) -> list[str]:
    """The files of `repo` the mirror sent (GET) since its log was last cleared."""
    return sorted(r["file"] for r in server.requests()
                  if r["method"] == "GET" and "/resolve/" in r["path"] and r["path"].strip("/").startswith(repo))


def repo_files(server: Any, repo: str, prefix: str) -> list[str]:
    """The files of `repo` in the mirror's ROOT whose path starts with `prefix`."""
    folder = Path(server.root) / repo
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*")
                  if p.is_file() and p.relative_to(folder).as_posix().startswith(prefix))


def default_sigint() -> None:
    """`preexec_fn` for a child that a test interrupts: SIGINT at its default action and unblocked, as a
    shell starts a command. A child inherits an ignored or blocked SIGINT from its parent (Python then
    installs no KeyboardInterrupt handler), and the parent here is a test worker whose earlier tests
    may have started servers or clusters that change it."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})
