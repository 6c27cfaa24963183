"""The `coreml-hub` command line: a thin layer over the library.

Commands are imported only when invoked, so `coreml-hub --help` and `coreml-hub list`
never import torch, diffusers, transformers or coremltools.
"""

from __future__ import annotations

import importlib
import os
import sys
import time
import traceback
from typing import Any

IMPORTED = time.perf_counter()
STARTED = IMPORTED  # when the current command began, for the wall times it reports (see run_cli)
_commands_run = 0

import click

from ..version import __version__
from ..errors import translate
from ..paths import debug

INTERRUPTED = 130  # run_cli's status for Ctrl-C (128 + SIGINT); the process itself ends by SIGINT

# command name -> "module:attribute", relative to coreml_hub.cli
COMMANDS: dict[str, str] = {
    "list": "catalog:list_cmd",
    "show": "catalog:show_cmd",
    "pull": "store_cmds:pull_cmd",
    "ls": "store_cmds:ls_cmd",
    "rm": "store_cmds:rm_cmd",
    "cache": "store_cmds:cache_group",
    "du": "store_cmds:du_cmd",
    "verify": "verify_cmds:verify_cmd",
    "inspect": "verify_cmds:inspect_cmd",
    "convert": "convert_cmd:convert_cmd",
    "run": "run_cmd:run_cmd",
    "batch": "batch_cmd:batch_cmd",
    "predict": "predict_cmd:predict_cmd",
    "serve": "serve_cmd:serve_cmd",
    "app": "app_cmd:app_cmd",
    "plugins": "plugins_cmd:plugins_cmd",
    "demo": "demo_cmd:demo_cmd",
}

SHORT_HELP: dict[str, str] = {
    "list": "Search the Hub for Core ML diffusion models (or --local).",
    "show": "Show a repo's variants, sizes and pull commands.",
    "pull": "Download one variant into the local store.",
    "ls": "List pulled models.",
    "rm": "Remove pulled models.",
    "cache": "Manage the local store.",
    "du": "Disk space by model, and what `cache prune` would free.",
    "verify": "Check that a variant or bundle is complete and consistent.",
    "inspect": "Show a bundle's inputs, outputs, ops and weights.",
    "convert": "Convert a diffusers pipeline to Core ML packages.",
    "run": "Run a model with its task: images from a prompt, labels, depth, segments, embeddings, text.",
    "batch": "Run a file of run/predict jobs, here or on a Ray cluster.",
    "predict": "Run any Core ML model (ML Program) on given inputs.",
    "serve": "Serve a folder of repos as a read-only Hub mirror.",
    "app": "Serve the web app and HTTP API, with models kept warm.",
    "plugins": "List installed plugins.",
    "demo": "Run the offline demo on a bundled tiny model.",
}


class LazyGroup(click.Group):
    """A group whose built-in commands load on first use; plugins add theirs via a hook."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._plugin_commands_loaded = False

    def _load_plugin_commands(self) -> None:
        if self._plugin_commands_loaded:
            return
        self._plugin_commands_loaded = True
        from ..plugins import load_plugins, pm

        load_plugins()
        pm.hook.register_commands(cli=self)

    def list_commands(self, ctx: click.Context) -> list[str]:
        self._load_plugin_commands()
        return sorted(set(COMMANDS) | set(self.commands))

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        if name in self.commands:
            return self.commands[name]
        if name in COMMANDS:
            module_name, attr = COMMANDS[name].split(":")
            module = importlib.import_module(f"{__name__}.{module_name}")
            command = getattr(module, attr)
            self.commands[name] = command
            return command
        self._load_plugin_commands()
        return self.commands.get(name)

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        # Help lists short descriptions without importing each command's module.
        self._load_plugin_commands()
        rows = []
        for name in self.list_commands(ctx):
            if name in self.commands:
                cmd = self.commands[name]
                if cmd.hidden:
                    continue
                rows.append((name, cmd.get_short_help_str(limit=formatter.width - 20)))
            else:
                rows.append((name, SHORT_HELP.get(name, "")))
        if rows:
            with formatter.section("Commands"):
                formatter.write_dl(rows)


@click.group(
    cls=LazyGroup,
    context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100},
    epilog="""\b
Examples:
  coreml-hub list --filter library=coreml
  coreml-hub show apple/coreml-stable-diffusion-v1-5
  coreml-hub pull apple/coreml-stable-diffusion-v1-5 --variant split_einsum/compiled
  coreml-hub run apple/coreml-stable-diffusion-v1-5 "a photo of an astronaut riding a horse"

Environment: HF_ENDPOINT, HF_TOKEN, HF_HUB_OFFLINE, COREML_HUB_HOME, COREML_HUB_PLUGINS,
COREML_HUB_DEBUG=1 (full tracebacks).""",
)
@click.version_option(__version__, prog_name="coreml-hub")
def cli() -> None:
    """Find, pull, verify, convert and run Core ML models (Stable Diffusion, classifiers, depth, segmentation,
    CLIP encoders, LLMs) from the Hugging Face Hub."""


def _fail(message: str, hint: str | None, code: int) -> int:
    click.echo(f"Error: {message}", err=True)
    if hint:
        click.echo(f"Hint: {hint}", err=True)
    return code


def run_cli(argv: list[str] | None = None) -> int:
    """Run the CLI and return its exit code: the single place errors become messages."""
    global STARTED, _commands_run
    # the first command of a process counts from this module's import (its own imports included)
    STARTED = IMPORTED if _commands_run == 0 else time.perf_counter()
    _commands_run += 1
    try:
        result = cli.main(args=argv, prog_name="coreml-hub", standalone_mode=False)
        # without standalone mode click returns (not raises) the code of `ctx.exit(n)` / `Exit(n)`
        return result if isinstance(result, int) and not isinstance(result, bool) else 0
    except click.exceptions.Exit as exc:
        return exc.exit_code
    except click.exceptions.Abort as exc:
        if isinstance(exc.__cause__, KeyboardInterrupt):  # click turns Ctrl-C into Abort
            click.echo("Interrupted.", err=True)
            return INTERRUPTED
        click.echo("Aborted.", err=True)  # a prompt answered "no" or closed
        return 1
    except click.ClickException as exc:
        exc.show()
        return exc.exit_code
    except KeyboardInterrupt:
        click.echo("Interrupted.", err=True)
        return INTERRUPTED
    except BrokenPipeError:
        return 0
    except Exception as exc:  # the one exit point for every failure
        if debug():
            traceback.print_exc()
        known = translate(exc, endpoint=_endpoint())
        if known is not None:
            return _fail(known.message, known.hint, known.exit_code)
        return _fail(
            f"{type(exc).__name__}: {exc}",
            "This is a bug in coreml-hub. Run again with COREML_HUB_DEBUG=1 for the traceback and report it.",
            1,
        )


def _endpoint() -> str | None:
    """The Hub endpoint as set now, for messages about a failure that does not name its URL."""
    try:
        from ..hub import endpoint

        return endpoint()
    except Exception:  # a message must never fail for want of an endpoint
        return None


def main(argv: list[str] | None = None) -> None:
    # Large tensors in transparent huge pages, when the kernel offers them on request (torch reads
    # this once, before its first allocation, so only a process of our own can set it): placing a
    # model's weights in float32 takes a quarter of the time, as 2 MB pages fault in 512x less often.
    os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")
    code = run_cli(argv)
    if code == INTERRUPTED:
        _exit_by_sigint()
    sys.exit(code)


def _exit_by_sigint() -> None:
    """End the process by SIGINT, as shells expect of an interrupted program (a loop calling it stops too).

    Python does the same for an uncaught KeyboardInterrupt, and on 3.11 also for one that merely
    passed through `exec` of a string (an import in progress): doing it always keeps the status one.
    """
    import os
    import signal

    if os.name != "posix":
        return
    sys.stdout.flush()
    sys.stderr.flush()
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    os.kill(os.getpid(), signal.SIGINT)
