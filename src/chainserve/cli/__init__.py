"""The ``chainserve`` command line: one module per command, registered in :func:`build_app`.

``chainserve.cli.app`` is built on first use, so that ``chainserve block-server`` imports only its
own command (no planner, simulator, scipy or matplotlib): block servers start in a fraction of a second.
"""

from __future__ import annotations

import importlib
import sys

import typer

#: command → (module, function), in the order ``--help`` lists them.
COMMANDS = {
    "plan": ("plan_cmd", "plan"),
    "simulate": ("simulate_cmd", "simulate"),
    "experiment": ("experiment_cmd", "experiment"),
    "serve": ("serve_cmd", "serve"),
    "block-server": ("block_server_cmd", "block_server"),
    "demo": ("demo_cmd", "demo"),
}


def _root() -> None:
    """Plan, simulate and serve chain-structured LLM inference over heterogeneous GPUs."""


def build_app(names: tuple[str, ...] = tuple(COMMANDS)) -> typer.Typer:
    """The typer app with the given commands."""
    app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                      help="Plan, simulate and serve chain-structured LLM inference over heterogeneous GPUs.")
    app.callback()(_root)
    for name in names:
        module, function = COMMANDS[name]
        app.command(name)(getattr(importlib.import_module(f"chainserve.cli.{module}"), function))
    return app


def __getattr__(name: str) -> typer.Typer:
    if name == "app":
        app = build_app()
        globals()["app"] = app
        return app
    raise AttributeError(name)


def main() -> None:
    """Entry point of the ``chainserve`` script."""
    light = sys.argv[1:2] == ["block-server"]
    build_app(("block-server",) if light else tuple(COMMANDS))(prog_name="chainserve")
