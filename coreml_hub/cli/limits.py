"""The connection limits `serve` and `app` share (issue: a server must not be turned against its host)."""

from __future__ import annotations

from typing import Callable, TypeVar

import click

from ..safeserve import DEFAULT_HEADER_TIMEOUT, DEFAULT_IDLE_TIMEOUT, DEFAULT_MAX_CONNECTIONS  # stdlib only

F = TypeVar("F", bound=Callable[..., object])


def connection_limits(*, idle_help: str, max_help: str) -> Callable[[F], F]:
    """`--header-timeout`, `--idle-timeout` and `--max-connections`, with the defaults of `safeserve`;
    each server says in its own words what idling and the cap mean for it."""

    def decorate(command: F) -> F:
        for option in reversed((
            click.option("--header-timeout", default=DEFAULT_HEADER_TIMEOUT, show_default=True,
                         type=click.FloatRange(min=0, min_open=True), metavar="SECONDS",
                         help="Time a client has to send a request's line and headers."),
            click.option("--idle-timeout", default=DEFAULT_IDLE_TIMEOUT, show_default=True,
                         type=click.FloatRange(min=0, min_open=True), metavar="SECONDS", help=idle_help),
            click.option("--max-connections", default=DEFAULT_MAX_CONNECTIONS, show_default=True,
                         type=click.IntRange(min=1), help=max_help),
        )):
            command = option(command)
        return command

    return decorate
