"""``chainserve experiment NAME``: run one of the paper's experiments and write its report (paper §4).

Everything is checked before the run starts (name, sizes, the output folder), so a long run never
fails at its end; a progress bar on stderr shows how far it is (off with ``--quiet`` or when stderr is
not a terminal).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from chainserve.cli.common import check_out_folder, user_errors
from chainserve.experiments.registry import EXPERIMENTS
from chainserve.model import limits
from chainserve.model.spec import SpecError

#: Most replications and requests per replication one experiment takes.
MAX_SEEDS = 1000
MAX_REQUESTS = 1_000_000

_DEFAULTS = "; ".join(f"{name} {spec.num_seeds}" for name, spec in EXPERIMENTS.items())
_DEFAULT_REQUESTS = "; ".join(f"{name} {spec.num_jobs}" for name, spec in EXPERIMENTS.items())


def experiment(
    name: Annotated[str, typer.Argument(metavar="NAME", help=f"One of: {', '.join(EXPERIMENTS)}.")],
    out: Annotated[
        Path, typer.Option(help="Folder for the markdown report and PNG plots (created if missing).")
    ] = Path("results"),
    seeds: Annotated[int | None, typer.Option(help=f"Replications, 1..{MAX_SEEDS} \\[default: {_DEFAULTS}]")] = None,
    requests: Annotated[
        int | None,
        typer.Option(
            help=f"Requests per replication, 1..{MAX_REQUESTS} (table1: at most the trace's rows) "
            f"\\[default: {_DEFAULT_REQUESTS}]"
        ),
    ] = None,
    quiet: Annotated[bool, typer.Option("--quiet", help="No progress bar on stderr.")] = False,
) -> None:
    """Run an experiment; prints the path of its report."""
    with user_errors():
        if name not in EXPERIMENTS:
            raise SpecError("name", f"unknown experiment {name!r}; known: {', '.join(EXPERIMENTS)}")
        spec = EXPERIMENTS[name]
        num_seeds = spec.num_seeds if seeds is None else limits.check_count("seeds", seeds, MAX_SEEDS)
        num_jobs = spec.num_jobs if requests is None else limits.check_count("requests", requests, MAX_REQUESTS)
        if name == "table1":
            _check_trace_rows(num_jobs)
        check_out_folder("out", out)
        from chainserve.experiments import common

        common.SHOW_PROGRESS = not quiet
        report = spec.load()(out, num_seeds, num_jobs)
    typer.echo(str(report))


def _check_trace_rows(num_jobs: int) -> None:
    """Table 1 replays the bundled trace from its first row: at most its rows."""
    from chainserve.sim.arrivals import read_azure_trace

    rows = len(read_azure_trace(None))
    if num_jobs > rows:
        raise SpecError("requests", f"table1 replays the bundled trace, which has {rows} rows; got {num_jobs}")
