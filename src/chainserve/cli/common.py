"""Shared CLI plumbing: consoles and the one-line error convention.

Every command wraps its work in :func:`user_errors`: a bad input (``SpecError`` or any other
``ValueError``, or an unreadable/unwritable path) prints ``error: <field>: <message>`` on stderr and
exits with status 2, like typer's own usage errors; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager

import typer
from rich.console import Console

#: Width used when stdout is not a terminal (pipes, files): rich would otherwise squeeze tables to 80.
PIPE_WIDTH = 140


def stdout_console() -> Console:
    console = Console()
    if not console.is_terminal and "COLUMNS" not in os.environ:
        console = Console(width=PIPE_WIDTH)
    return console


def stderr_console() -> Console:
    return Console(stderr=True, soft_wrap=True)


def fail(message: str) -> typer.Exit:
    """Print ``error: message`` (one line) on stderr; return the exit-2 exception to raise."""
    typer.echo(f"error: {' '.join(message.split())}", err=True)
    return typer.Exit(2)


@contextmanager
def user_errors() -> Iterator[None]:
    """Turn input errors into one ``error:`` line and exit status 2."""
    try:
        yield
    except ValueError as exc:  # SpecError's text is already "<field>: <message>"
        raise fail(str(exc)) from None
    except OSError as exc:
        raise fail(f"{exc.filename or 'file'}: {exc.strerror or exc}") from None
