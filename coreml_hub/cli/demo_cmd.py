"""`coreml-hub demo`: the whole flow, offline, on a bundled tiny model served from this machine."""

from __future__ import annotations

import os
import shlex
import tempfile
from pathlib import Path

import click

DEMO_PROMPT = "a photo of an astronaut riding a horse"


@click.command(
    "demo",
    epilog="""\b
Examples:
  coreml-hub demo
  coreml-hub demo --root ./demo-hub --keep

\b
The demo builds a tiny random-weight Stable Diffusion model, converts it to Core ML,
lays it out like an Apple repo, serves it with `coreml-hub serve` on 127.0.0.1 and runs
`list`, `show`, `pull` and `run` against that mirror. Nothing touches the internet.
The image it makes is noise-like: the weights are random.""",
)
@click.option("--root", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Folder for the demo repos and store (default: a temporary folder).")
@click.option("--keep", is_flag=True, help="Keep the demo folder (always kept with --root).")
@click.option("--steps", type=click.IntRange(1, 100), default=10, show_default=True)
@click.option("-o", "--output", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Folder for the image (default: ./coreml-hub-outputs).")
def demo_cmd(root: Path | None, keep: bool, steps: int, output: Path | None) -> None:
    """Run the offline demo: serve a bundled tiny model, then list, show, pull and run it."""
    from ..testing.hubserver import HubServer
    from ..testing.publish import demo_repos
    from . import run_cli

    temp = None
    if root is None:
        temp = tempfile.TemporaryDirectory(prefix="coreml-hub-demo-")
        root = Path(temp.name)
    hub_dir, store_dir = root / "hub", root / "store"
    hub_dir.mkdir(parents=True, exist_ok=True)
    click.echo("Building the bundled demo repo (tiny random-weight model; cached after the first run)...", err=True)
    repo = demo_repos(hub_dir)[0]

    server = HubServer(hub_dir, root / "requests.jsonl").start()
    saved = {k: os.environ.get(k) for k in ("HF_ENDPOINT", "COREML_HUB_HOME", "HF_HUB_OFFLINE")}
    os.environ["HF_ENDPOINT"] = server.url
    os.environ.setdefault("COREML_HUB_HOME", str(store_dir))
    os.environ.pop("HF_HUB_OFFLINE", None)
    click.echo(f"Serving {hub_dir} at {server.url} (HF_ENDPOINT={server.url})", err=True)
    # The tiny model's safety checker has random weights too: its verdicts mean nothing.
    run_args = ["run", repo, DEMO_PROMPT, "--steps", str(steps), "--seed", "42", "--disable-safety"]
    if output is not None:
        run_args += ["-o", str(output)]
    try:
        for args in (["list"], ["show", repo], ["pull", repo], run_args):
            click.echo(f"\n$ coreml-hub {shlex.join(args)}", err=True)
            code = run_cli(args)
            if code != 0:
                raise click.exceptions.Exit(code)
    finally:
        server.stop()
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        if temp is not None and not keep:
            temp.cleanup()
    click.echo(
        "\nThat image comes from a tiny model with random weights, so it looks like noise.\n"
        "With network access, the same commands run a real model:\n"
        f'  coreml-hub run apple/coreml-stable-diffusion-v1-5 "{DEMO_PROMPT}"',
        err=True,
    )
