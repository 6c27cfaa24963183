"""`coreml-hub app` as a child process, for tests and benchmarks, with a small JSON client."""

from __future__ import annotations

import json
import os
import sys
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from .hubserver import start_serving, stop_process


@dataclass
class Reply:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


class AppServer:
    """A running app: `.url`, `.token`, `.call(...)`, `.events(...)`, `.stop()`, `.start()`.

    The app's store is `store`, its outputs folder `outputs`, and it pulls from `hub_url`.
    """

    def __init__(self, *, store: Path, outputs: Path, hub_url: str, log_dir: Path, token: str | None = None,
                 host: str = "127.0.0.1", extra_args: tuple[str, ...] = (), env: dict[str, str] | None = None) -> None:
        self.store, self.outputs, self.hub_url = Path(store), Path(outputs), hub_url
        self.log_dir = Path(log_dir)
        self.token, self.host, self.extra_args = token, host, tuple(extra_args)
        self.env = env
        self.url = ""
        self._proc = None

    def start(self) -> "AppServer":
        if self._proc is not None and self._proc.poll() is None:
            return self
        self.log_dir.mkdir(parents=True, exist_ok=True)
        env = {k: v for k, v in (os.environ if self.env is None else self.env).items()
               if k not in ("HF_HUB_OFFLINE", "COREML_HUB_APP_TOKEN")}
        env.update(COREML_HUB_HOME=str(self.store), HF_ENDPOINT=self.hub_url)
        cmd = [sys.executable, "-m", "coreml_hub", "app", "--host", self.host, "--port", "0",
               "-o", str(self.outputs), *self.extra_args]
        if self.token is not None:
            cmd += ["--token", self.token]
        self.stderr_path = self.log_dir / "app.stderr"
        self._proc, self.url = start_serving(cmd, env, self.stderr_path, timeout=120)
        return self

    def stop(self) -> None:
        stop_process(self._proc)
        self._proc = None

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def log(self) -> str:
        return self.stderr_path.read_text() if self.stderr_path.exists() else ""

    def __enter__(self) -> "AppServer":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- requests --------------------------------------------------------------------------------------

    def _request(self, method: str, path: str, *, json_body: Any = None, data: bytes | None = None,
                 headers: dict[str, str] | None = None, token: str | None | bool = True) -> urllib.request.Request:
        sent = dict(headers or {})
        if json_body is not None:
            data = json.dumps(json_body).encode()
            sent.setdefault("Content-Type", "application/json")
        bearer = self.token if token is True else (token or None)
        if bearer:
            sent.setdefault("Authorization", f"Bearer {bearer}")
        return urllib.request.Request(self.url + path, data=data, method=method, headers=sent)

    def call(self, method: str, path: str, *, json_body: Any = None, data: bytes | None = None,
             headers: dict[str, str] | None = None, token: str | None | bool = True, timeout: float = 300) -> Reply:
        """One request; any status comes back as a Reply (no exception for 4xx/5xx)."""
        req = self._request(method, path, json_body=json_body, data=data, headers=headers, token=token)
        opener = urllib.request.build_opener(_NoRedirect)
        try:
            with opener.open(req, timeout=timeout) as resp:
                return Reply(resp.status, {k.lower(): v for k, v in resp.headers.items()}, resp.read())
        except urllib.error.HTTPError as err:
            return Reply(err.code, {k.lower(): v for k, v in err.headers.items()}, err.read())

    def events(self, path: str, *, timeout: float = 300) -> Iterator[dict[str, Any]]:
        """The server-sent events of `path`, parsed, until the stream ends."""
        req = self._request("GET", path)
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            for raw in resp:
                line = raw.decode().rstrip("\n")
                if line.startswith("data: "):
                    yield json.loads(line[6:])


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args: Any, **kwargs: Any) -> None:
        return None
