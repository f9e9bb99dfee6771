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
from chainserve.cli.simulate_cmd import TIME_SCALE_RANGE
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
    time_scale: Annotated[
        float | None,
        typer.Option(
            help="Live experiments: multiply the trace's gaps by this (0.5 replays twice as fast) "
            "\\[default: the experiment's]."
        ),
    ] = None,
    methods: Annotated[
        str | None,
        typer.Option(
            help="Live experiments: comma-separated methods (petals,bprr,jffc-only,proposed) \\[default: all]."
        ),
    ] = None,
    clusters: Annotated[
        str | None,
        typer.Option(
            help="fidelity: comma-separated clusters to run (testbed,bloom-20,smollm2-3,testbed-fail); the "
            "report keeps the others' sections from the run before \\[default: all]."
        ),
    ] = None,
) -> None:
    """Run an experiment; prints the path of its report."""
    with user_errors():
        if name not in EXPERIMENTS:
            raise SpecError("name", f"unknown experiment {name!r}; known: {', '.join(EXPERIMENTS)}")
        spec = EXPERIMENTS[name]
        num_seeds = spec.num_seeds if seeds is None else limits.check_count("seeds", seeds, MAX_SEEDS)
        num_jobs = spec.num_jobs if requests is None else limits.check_count("requests", requests, MAX_REQUESTS)
        if name in ("table1", "table1-live"):
            _check_trace_rows(num_jobs)
        options = _live_options(name, spec.options, time_scale, methods, clusters)
        check_out_folder("out", out)
        from chainserve import progress

        progress.SHOW_PROGRESS = not quiet
        report = spec.load()(out, num_seeds, num_jobs, **options)
    typer.echo(str(report))


def _check_trace_rows(num_jobs: int) -> None:
    """Table 1 replays the bundled trace from its first row: at most its rows."""
    from chainserve.sim.arrivals import read_azure_trace

    rows = len(read_azure_trace(None))
    if num_jobs > rows:
        raise SpecError("requests", f"table1 replays the bundled trace, which has {rows} rows; got {num_jobs}")


def _live_options(
    name: str, accepted: frozenset[str], time_scale: float | None, methods: str | None, clusters: str | None
) -> dict:
    """``--time-scale``, ``--methods`` and ``--clusters`` for the experiments that take them (checked
    before the run)."""
    given = {"time_scale": time_scale, "methods": methods, "clusters": clusters}
    options = {}
    for key, value in given.items():
        if value is None:
            continue
        if key not in accepted:
            raise SpecError(key.replace("_", "-"), f"experiment {name} does not take it")
        if key == "time_scale":
            options[key] = limits.check_range("time-scale", value, TIME_SCALE_RANGE)
        else:
            options[key] = tuple(m.strip() for m in value.split(",") if m.strip())
    return options
