"""``chainserve simulate``: one method on a cluster, simulated job by job (paper §1, §2.4, §3, §4).

Arrivals are Poisson at the cluster's λ (or ``--rate``), a Gamma renewal process when ``--burstiness``
(the inter-arrival CV) is not 1, or a replay of an Azure-format trace (``--trace``; ``bundled`` is the
shipped Azure code trace, §4.2). A replayed trace sets λ to its own mean rate, (n − 1)/span over the
replayed rows, so the method is planned, and its Theorem-4 bounds computed, for the load it will see.
Seeds follow :mod:`chainserve.sim.runs`: ``--seed s`` is replication s of the experiments.
"""

from __future__ import annotations

import json
import math
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import Annotated

import numpy as np
import typer
from rich.console import Console
from rich.table import Table

from chainserve.cli.common import stderr_console, stdout_console, user_errors
from chainserve.cli.plan_cmd import DEFAULT_CLUSTER
from chainserve.dispatch.registry import POLICIES
from chainserve.methods import METHODS, check_method_name
from chainserve.model.cluster_file import load_cluster
from chainserve.model.spec import Problem, SpecError
from chainserve.plan.types import Plan
from chainserve.sim.arrivals import ArrivalProcess, GammaArrivals, PoissonArrivals, TraceArrivals, read_azure_trace
from chainserve.sim.runs import Replication, run_method
from chainserve.sim.service import SERVICE_MODELS, service_model

BUNDLED_TRACE = "bundled"


def simulate(
    cluster: Annotated[Path | None, typer.Argument(
        metavar="[CLUSTER]", help="Cluster file (YAML or raw JSON); default: the embedded paper cluster "
                                  "(BLOOM-176B on 20 MIG slices, η = 0.2).")] = None,
    method: Annotated[str, typer.Option(help=f"Method: {', '.join(METHODS)}, or proposed:<policy>.")
                      ] = "proposed",
    policy: Annotated[str | None, typer.Option(help="Dispatch policy of the proposed chains: "
                                                    f"{', '.join(POLICIES)} (default jffc).")] = None,
    requests: Annotated[int, typer.Option(help="Number of requests to simulate.")] = 1000,
    rate: Annotated[float | None, typer.Option(help="Override the arrival rate λ (requests/s).")] = None,
    trace: Annotated[str | None, typer.Option(
        metavar="FILE|bundled", help="Replay an Azure-format trace (TIMESTAMP,ContextTokens,GeneratedTokens); "
                                     "'bundled': the shipped Azure code trace 2023.")] = None,
    time_scale: Annotated[float | None, typer.Option(
        help="Multiply the trace's inter-arrival times (0.5 replays twice as fast; default 1).")] = None,
    trace_start: Annotated[int | None, typer.Option(help="First trace row to replay (default 0).")] = None,
    burstiness: Annotated[float | None, typer.Option(
        metavar="CV", help="Coefficient of variation of Gamma inter-arrival times (1: Poisson).")] = None,
    service: Annotated[str, typer.Option(metavar="|".join(SERVICE_MODELS),
                                         help="Service-time model.")] = "exponential",
    seed: Annotated[int, typer.Option(help="Seed of the placement, dispatch and simulation streams.")] = 0,
    warmup: Annotated[int, typer.Option(help="Leave the first N requests out of the statistics.")] = 0,
    as_json: Annotated[bool, typer.Option("--json", help="Print the results as one JSON object.")] = False,
) -> None:
    """Simulate one method on a cluster and report response, waiting and service times."""
    err = stderr_console()
    with user_errors():
        name = method_name(method, policy)
        _check_counts(requests, warmup, seed)
        service_model(service)
        problem = load_cluster(cluster or DEFAULT_CLUSTER)
        problem, arrivals, arrivals_text = _arrivals(problem, requests, rate, trace, time_scale, trace_start,
                                                     burstiness)
        with _spinner(err, f"simulating {requests} requests of {name} …"):
            run = run_method(problem, name, seed, requests, arrivals, service, warmup)
    plan = run.setup.plan_or_placement
    if as_json:
        typer.echo(json.dumps(_to_json(run, name, problem, arrivals_text, service, warmup), indent=2))
    else:
        _print_run(run, name, problem, arrivals_text, service, warmup, stdout_console())
    if isinstance(plan, Plan) and not plan.is_stable:
        err.print(f"[bold red]warning:[/] unstable plan: λ = {problem.arrival_rate_per_s:g}/s ≥ "
                  f"ν = {plan.total_rate_per_s:.4g}/s; waiting grows with the number of requests")


def method_name(method: str, policy: str | None) -> str:
    """The :func:`chainserve.methods.build_method` name for ``--method``/``--policy``.

    >>> method_name("proposed", "sed"), method_name("proposed:jsq", None), method_name("petals", None)
    ('proposed:sed', 'proposed:jsq', 'petals')
    """
    check_method_name(method)
    if policy is None:
        return method
    if method != "proposed":
        raise SpecError("policy", f"--policy applies only to --method proposed, got --method {method}")
    check_method_name(f"proposed:{policy}")
    return f"proposed:{policy}"


def _check_counts(requests: int, warmup: int, seed: int) -> None:
    if requests < 1:
        raise SpecError("requests", f"must be at least 1, got {requests}")
    if not 0 <= warmup < requests:
        raise SpecError("warmup", f"must lie in 0..{requests - 1} (fewer than --requests), got {warmup}")
    if seed < 0:
        raise SpecError("seed", f"must be a non-negative integer, got {seed}")


def _arrivals(problem: Problem, num_jobs: int, rate: float | None, trace: str | None, time_scale: float | None,
              trace_start: int | None, burstiness: float | None) -> tuple[Problem, ArrivalProcess, str]:
    """The problem with λ set as asked, the arrival process, and its description in words."""
    if trace is None:
        if time_scale is not None or trace_start is not None:
            raise SpecError("time-scale" if time_scale is not None else "trace-start", "applies only with --trace")
        return _generated(problem if rate is None else problem.with_workload(arrival_rate_per_s=rate),
                          burstiness)
    if rate is not None:
        raise SpecError("rate", "--rate and --trace are mutually exclusive (a trace brings its own rate)")
    if burstiness is not None:
        raise SpecError("burstiness", "applies to generated arrivals, not to a --trace replay")
    return _replayed(problem, num_jobs, trace, 1.0 if time_scale is None else time_scale, trace_start or 0)


def _generated(problem: Problem, cv: float | None) -> tuple[Problem, ArrivalProcess, str]:
    lam = problem.arrival_rate_per_s
    if cv is None or cv == 1:
        return problem, PoissonArrivals(), f"Poisson, λ = {lam:g}/s"
    if not (math.isfinite(cv) and cv > 0):
        raise SpecError("burstiness", f"must be a positive number, got {cv!r}")
    return problem, GammaArrivals(cv), f"Gamma renewal, CV = {cv:g}, λ = {lam:g}/s"


def _replayed(problem: Problem, num_jobs: int, trace: str, scale: float, first: int
              ) -> tuple[Problem, ArrivalProcess, str]:
    """Rows ``first ..`` of the trace; λ becomes their mean rate (n − 1)/span, after ``scale``."""
    path = None if trace == BUNDLED_TRACE else Path(trace)
    if path is not None and not path.is_file():
        raise SpecError("trace", f"{trace}: no such file")
    if not (math.isfinite(scale) and scale > 0):
        raise SpecError("time-scale", f"must be a positive number, got {scale!r}")
    num_rows = len(read_azure_trace(path))
    if not 0 <= first < num_rows:
        raise SpecError("trace-start", f"must lie in 0..{num_rows - 1} (the trace's rows), got {first}")
    if first + num_jobs > num_rows:
        raise SpecError("requests", f"the trace has {num_rows - first} rows from row {first}, got {num_jobs}")
    process = TraceArrivals(path, scale, first)
    replay = process.sample(problem.workload, num_jobs, np.random.default_rng(0))  # a replay draws nothing
    span_s = float(replay.times_s[-1])
    if span_s <= 0:
        raise SpecError("requests", "the replayed requests all arrive at once, so the trace has no rate; "
                                    "replay more of them")
    problem = problem.with_workload(arrival_rate_per_s=(num_jobs - 1) / span_s)
    text = (f"{'Azure code trace 2023' if path is None else path.name}, rows {first}–{first + num_jobs - 1}, "
            f"time ×{scale:g}, λ = {problem.arrival_rate_per_s:.4g}/s")
    return problem, process, text


def _spinner(err: Console, text: str) -> AbstractContextManager[object]:
    """A spinner on stderr while the method is built and simulated (the engine reports no progress)."""
    return err.status(text) if err.is_terminal else nullcontext()


def _to_json(run: Replication, name: str, problem: Problem, arrivals_text: str, service: str,
             warmup: int) -> dict[str, object]:
    data: dict[str, object] = {
        "method": name, "description": run.setup.description, "seed": run.seed, "cluster": problem.name,
        "arrivals": arrivals_text, "arrival_rate": problem.arrival_rate_per_s, "service_model": service,
        "warmup": warmup, **run.summary.to_json()}
    plan = run.setup.plan_or_placement
    if isinstance(plan, Plan):
        data["bounds"] = {"lower": plan.bounds.lower_s, "upper": plan.bounds.upper_s} if plan.is_stable else None
    return data


def _print_run(run: Replication, name: str, problem: Problem, arrivals_text: str, service: str, warmup: int,
               out: Console) -> None:
    summary = run.summary
    times = Table(title=f"Simulated times (seconds, {summary.num_requests} requests)", title_justify="left")
    for header in ("metric", "mean", "p50", "p95", "p99"):
        times.add_column(header, justify="left" if header == "metric" else "right")
    for label, stats in (("response", summary.response), ("waiting", summary.waiting),
                         ("service", summary.service)):
        times.add_row(label, *(f"{v:.3f}" for v in (stats.mean_s, stats.p50_s, stats.p95_s, stats.p99_s)))
    info = Table(title="Run", title_justify="left", show_header=False)
    info.add_column(style="bold")
    info.add_column()
    rows = [
        ("cluster", f"{problem.name}: {problem.model.name}, {problem.num_servers} servers"),
        ("method", f"{name}: {run.setup.description}"),
        ("arrivals", arrivals_text),
        ("service model", service),
        ("seed", str(run.seed)),
        ("requests", f"{summary.num_requests} measured" + (f" after {warmup} warm-up" if warmup else "")),
        ("throughput", f"{summary.throughput_per_s:.4g}/s over {summary.window_s:.1f} s"),
    ]
    ci = summary.response_mean_ci
    if ci is not None:
        rows.append(("mean response", f"{ci.mean:.3f} s ± {ci.half_width:.3f} s "
                                      f"({ci.confidence:.0%} batch-means interval)"))
    plan = run.setup.plan_or_placement
    if isinstance(plan, Plan):
        bounds = (f"{plan.bounds.lower_s:.3f} s ≤ E[T] ≤ {plan.bounds.upper_s:.3f} s" if plan.is_stable
                  else "[bold red]UNSTABLE: λ ≥ ν, unbounded[/]")
        rows.append(("Theorem-4 bounds", f"{bounds} (JFFC); simulated mean {summary.response.mean_s:.3f} s"))
    for key, value in rows:
        info.add_row(key, value)
    out.print(times)
    out.print(info)
