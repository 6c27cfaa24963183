"""`coreml-hub app`: the web app and HTTP API."""

from __future__ import annotations

import os
from pathlib import Path

import click

from .limits import connection_limits

AUTO_TOKEN = "\0make-one"


@click.command(
    "app",
    epilog="""\b
Examples:
  coreml-hub app                                   # http://127.0.0.1:7860
  coreml-hub app --open --port 8000 -o ~/Pictures/coreml-hub
  coreml-hub app --host 0.0.0.0 --token            # a LAN app: a token is made and printed
  COREML_HUB_APP_TOKEN=... coreml-hub app --host 0.0.0.0

\b
Pages: Library (pulled models, search, pull, remove), Generate (every `run` option,
live previews, cancel), Queue, Gallery (every PNG in the outputs folder with its settings).
API: POST /v1/images/generations and GET /v1/models (OpenAI-compatible), POST /api/jobs,
GET /api/jobs/ID/events (server-sent progress), GET /api/gallery. Models stay loaded
between requests. Without a token the app listens on this machine only; with one, every
request needs `Authorization: Bearer TOKEN` (browsers: open the printed ?token= link once,
or log in at /login).""",
)
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to listen on; anything but a loopback address needs --token.")
@click.option("--port", default=7860, show_default=True, type=click.IntRange(0, 65535),
              help="Port to listen on; 0 picks a free one.")
@click.option("--token", is_flag=False, flag_value=AUTO_TOKEN, default=None, metavar="[TOKEN]",
              help="Require this bearer token (alone: make one and print it). Default: $COREML_HUB_APP_TOKEN.")
@click.option("-o", "--output", "output_dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Outputs folder: images are written and served from here "
                   "(default: ./coreml-hub-outputs or $COREML_HUB_OUTPUTS).")
@click.option("--open", "open_browser", is_flag=True, help="Open the app in a browser once it is up.")
@click.option("--max-models", type=click.IntRange(0, 100), default=0, show_default=True,
              help="Most models kept loaded at once (0: as many as memory allows).")
@click.option("--preview-every", type=click.IntRange(0, 1000), default=5, show_default=True, metavar="K",
              help="Decode a preview every K steps (0: none); a request may ask for another K.")
@click.option("--max-queue", type=click.IntRange(1, 10000), default=64, show_default=True,
              help="Most jobs waiting at once; more are answered 429.")
@click.option("--allow-host", "allowed_hosts", multiple=True, metavar="NAME",
              help="Another name this machine is reached by (an /etc/hosts alias, a local proxy); without a "
                   "token only requests addressed to this machine are answered. Repeatable.")
@connection_limits(idle_help="Time a connection may wait for its next request, or stall while sending a body.",
                   max_help="Open connections at most; more are answered 503.")
def app_cmd(host: str, port: int, token: str | None, output_dir: Path | None, open_browser: bool, max_models: int,
            preview_every: int, max_queue: int, allowed_hosts: tuple[str, ...], header_timeout: float,
            idle_timeout: float, max_connections: int) -> None:
    """Serve the web app and HTTP API (OpenAI-compatible image generation) with models kept warm.

    Prints `Serving coreml-hub app at URL` on stdout once it accepts connections.
    """
    from .. import paths
    from ..app.server import TOKEN_ENV, AppSettings, check_token, new_token, serve_app

    if token is None:
        token = os.environ.get(TOKEN_ENV) or None
    made = token == AUTO_TOKEN
    if made:
        token = new_token()
    token = check_token(host, token)
    outputs = (output_dir or paths.outputs_dir()).expanduser()
    settings = AppSettings(outputs=outputs, host=host, port=port, token=token, max_models=max_models or None,
                           preview_every=preview_every, max_waiting=max_queue, allowed_hosts=allowed_hosts,
                           header_timeout=header_timeout,
                           idle_timeout=idle_timeout, max_connections=max_connections)

    if outputs.is_dir():
        from ..safeserve import links_out_of

        escaping = links_out_of(outputs)
        if escaping:  # named once, at start: the gallery and the file routes leave them out
            click.echo(f"Warning: not serving {len(escaping)} link{'s' if len(escaping) != 1 else ''} that lead "
                       f"out of {outputs}:", err=True)
            for path, target in escaping:
                click.echo(f"  {path} -> {target}", err=True)

    def ready(url: str) -> None:
        click.echo(f"Serving coreml-hub app at {url}")
        click.get_text_stream("stdout").flush()
        click.echo(f"Images go to {outputs.resolve()}. Ctrl-C stops the app.", err=True)
        link = url
        if token is not None:
            link = f"{url}/?token={token}" if made else url
            click.echo(f"Every request needs the token{f' {token}' if made else ''}: open {link} in a browser "
                       "once, or send `Authorization: Bearer TOKEN`.", err=True)
        if open_browser:
            import webbrowser

            webbrowser.open(f"{url}/?token={token}" if token else url)

    serve_app(settings, on_ready=ready)
    click.echo("Stopped.", err=True)
