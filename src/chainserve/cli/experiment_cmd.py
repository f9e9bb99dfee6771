"""``chainserve experiment NAME``: run one of the paper's experiments and write its report (paper §4)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from chainserve.cli.common import fail, user_errors
from chainserve.experiments.registry import EXPERIMENTS


def experiment(
    name: Annotated[str, typer.Argument(metavar="NAME", help=f"One of: {', '.join(EXPERIMENTS)}.")],
    out: Annotated[Path, typer.Option(help="Folder for the markdown report and PNG plots.")] = Path("results"),
    seeds: Annotated[int | None, typer.Option(help="Replications (default: the experiment's).")] = None,
    requests: Annotated[int | None, typer.Option(help="Requests per replication (default: the experiment's).")
                        ] = None,
) -> None:
    """Run an experiment; prints the path of its report."""
    if name not in EXPERIMENTS:
        raise fail(f"name: unknown experiment {name!r}; known: {', '.join(EXPERIMENTS)}")
    spec = EXPERIMENTS[name]
    num_seeds, num_jobs = seeds or spec.num_seeds, requests or spec.num_jobs
    if num_seeds < 1 or num_jobs < 1:
        raise fail("seeds/requests: must be positive integers")
    with user_errors():
        report = spec.load()(out, num_seeds, num_jobs)
    typer.echo(str(report))
