"""The ``chainserve`` command line: one module per command, registered in :func:`build_app`.

``chainserve.cli.app`` is built on first use, so that ``chainserve block-server`` imports only its
own command (no planner, simulator, scipy or matplotlib): block servers start in a fraction of a second.
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import os
import sys
from typing import Annotated, Any, NoReturn

import typer
from typer.core import TyperCommand, TyperGroup

#: command → (module, function), in the order ``--help`` lists them.
COMMANDS = {
    "plan": ("plan_cmd", "plan"),
    "simulate": ("simulate_cmd", "simulate"),
    "experiment": ("experiment_cmd", "experiment"),
    "serve": ("serve_cmd", "serve"),
    "profile": ("profile_cmd", "profile"),
    "bench": ("bench_cmd", "bench"),
    "block-server": ("block_server_cmd", "block_server"),
    "stop": ("stop_cmd", "stop"),
    "demo": ("demo_cmd", "demo"),
}
#: Commands that run server processes: they end without the interpreter's teardown (see :func:`main`).
SERVER_COMMANDS = ("serve", "block-server", "demo")


class _Flags:
    """On/off flags show as flags in ``--help`` (no ``<bool>`` value) with their default."""

    params: list[Any]

    def _plain_flags(self) -> None:
        for param in self.params:
            if getattr(param, "is_flag", False) and not param.secondary_opts:
                param.metavar, param.show_default = "", False
                param.help = f"{param.help or ''} \\[default: {'on' if param.default else 'off'}]".strip()

    def get_help_option(self, ctx: Any) -> Any:
        option = super().get_help_option(ctx)  # type: ignore[misc]
        if option is not None:
            option.metavar = ""
        return option


class _Group(_Flags, TyperGroup):
    """The root command: usage errors of any command print one ``error: <field>: …`` line, exit 2."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._plain_flags()

    def main(
        self,
        args: Any = None,
        prog_name: Any = None,
        complete_var: Any = None,
        standalone_mode: bool = True,
        **extra: Any,
    ) -> Any:
        from chainserve.cli.common import run_one_line

        return run_one_line(super().main, args, prog_name, complete_var, standalone_mode, **extra)


class _Command(_Flags, TyperCommand):
    """One command (see :class:`_Flags`)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._plain_flags()


def _version(value: bool) -> None:
    if value:
        from importlib.metadata import version

        typer.echo(f"chainserve {version('chainserve')}")
        raise typer.Exit()


def _root(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit.")
    ] = False,
) -> None:
    """Plan, simulate and serve chain-structured LLM inference over heterogeneous GPUs."""


def build_app(names: tuple[str, ...] = tuple(COMMANDS)) -> typer.Typer:
    """The typer app with the given commands."""
    app = typer.Typer(
        add_completion=False,
        no_args_is_help=True,
        pretty_exceptions_enable=False,
        cls=_Group,
        help="Plan, simulate and serve chain-structured LLM inference over heterogeneous GPUs.",
    )
    app.callback(cls=_Group)(_root)
    for name in names:
        module, function = COMMANDS[name]
        app.command(name, cls=_Command)(getattr(importlib.import_module(f"chainserve.cli.{module}"), function))
    return app


def __getattr__(name: str) -> typer.Typer:
    if name == "app":
        app = build_app()
        globals()["app"] = app
        return app
    raise AttributeError(name)


def main() -> None:
    """Entry point of the ``chainserve`` script.

    A server command (:data:`SERVER_COMMANDS`) has closed its sockets, children and backend by the time
    it returns; its process then ends with ``os._exit`` once logs and output are flushed. The
    interpreter's own teardown would add nothing but a last garbage collection over the module graph
    of torch and transformers: 1.5 s for one process alone, past the launcher's 5 s SIGTERM grace when
    five block servers stop at once on two cores (issue 28).
    """
    command = sys.argv[1:2]
    app = build_app(("block-server",) if command == ["block-server"] else tuple(COMMANDS))
    if not command or command[0] not in SERVER_COMMANDS:
        app(prog_name="chainserve")
        return
    try:
        app(prog_name="chainserve")
    except SystemExit as exc:
        _exit_now(exc.code)
    _exit_now(0)


def _exit_now(code: object) -> NoReturn:
    """Flush logs and output, then end the process with ``code`` (as ``sys.exit`` reads it)."""
    if isinstance(code, str):
        print(code, file=sys.stderr)
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):  # a closed pipe: nothing left to say
            stream.flush()
    os._exit(code if isinstance(code, int) else 0 if code is None else 1)
