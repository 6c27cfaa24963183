"""`coreml-hub serve` as a child process, for tests and benchmarks."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

STARTUP_TIMEOUT = 30.0


def start_serving(cmd: list[str], env: dict[str, str] | None, stderr_path: Path,
                  timeout: float = STARTUP_TIMEOUT) -> tuple[subprocess.Popen[str], str]:
    """Start a coreml-hub server command; return it and its URL once it prints `Serving ... at URL`."""
    env = dict(os.environ if env is None else env)
    env.setdefault("PYTHONUNBUFFERED", "1")
    with open(stderr_path, "a") as err_file:  # a file, not a pipe: a chatty server never blocks
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=err_file, text=True, env=env)
    deadline = time.monotonic() + timeout
    line = ""
    assert proc.stdout is not None
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if line.startswith("Serving ") or not line:
            break
    if not line.startswith("Serving "):
        proc.kill()
        proc.wait(timeout=10)
        err = stderr_path.read_text()
        raise RuntimeError(f"{' '.join(cmd[2:4])} did not start: {line!r} {err[-2000:]}")
    return proc, line.rsplit(" at ", 1)[1].strip()


def stop_process(proc: subprocess.Popen[str] | None) -> None:
    """Ask a server started by `start_serving` to stop (SIGTERM), then kill it if it lingers."""
    if proc is None:
        return
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)
    if proc.stdout is not None:
        proc.stdout.close()


class HubServer:
    """A running mirror of `root`: `.url`, `.requests()`, `.clear_log()`, `.stop()`, `.start()`."""

    def __init__(self, root: Path, log_path: Path, *, port: int = 0, extra_args: tuple[str, ...] = (),
                 env: dict[str, str] | None = None) -> None:
        self.root = Path(root)
        self.log_path = Path(log_path)
        self.port = port
        self.extra_args = tuple(extra_args)
        self.env = env
        self.url = ""
        self._proc: subprocess.Popen[str] | None = None

    def start(self) -> "HubServer":
        """Start (or restart on the same port and root) and wait until it accepts connections."""
        if self._proc is not None and self._proc.poll() is None:
            return self
        cmd = [sys.executable, "-m", "coreml_hub", "serve", str(self.root), "--port", str(self.port),
               "--log-requests", str(self.log_path), *self.extra_args]
        self.stderr_path = self.log_path.with_name(self.log_path.name + ".stderr")
        self._proc, self.url = start_serving(cmd, self.env, self.stderr_path)
        self.port = int(self.url.rsplit(":", 1)[1])
        return self

    def stop(self) -> None:
        stop_process(self._proc)
        self._proc = None

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def wait_idle(self) -> None:
        """Return once the server has logged every request it received."""
        if not self.running:
            return
        with urllib.request.urlopen(f"{self.url}/_coreml_hub/idle", timeout=30) as resp:
            resp.read()

    def requests(self) -> list[dict[str, Any]]:
        """Every request logged so far (after waiting for those in flight)."""
        self.wait_idle()
        if not self.log_path.exists():
            return []
        return [json.loads(line) for line in self.log_path.read_text().splitlines() if line.strip()]

    def clear_log(self) -> None:
        self.wait_idle()
        if self.log_path.exists():
            with open(self.log_path, "r+") as f:
                f.truncate(0)

    def __enter__(self) -> "HubServer":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
