"""The ``chainserve`` command line: one module per command, registered below (one line each)."""

from __future__ import annotations

import typer

from chainserve.cli import experiment_cmd, plan_cmd, simulate_cmd

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="Plan, simulate and serve chain-structured LLM inference over heterogeneous GPUs.",
)


@app.callback()
def _root() -> None:
    """Plan, simulate and serve chain-structured LLM inference over heterogeneous GPUs."""


app.command("plan")(plan_cmd.plan)
app.command("simulate")(simulate_cmd.simulate)
app.command("experiment")(experiment_cmd.experiment)


def main() -> None:
    """Entry point of the ``chainserve`` script."""
    app(prog_name="chainserve")
