"""``chainserve simulate``: one method on a cluster, simulated job by job (paper §1, §2.4, §3, §4).

Arrivals are Poisson at the cluster's λ (or ``--rate``), a Gamma renewal process when ``--burstiness``
(the inter-arrival CV) is not 1, or a replay of an Azure-format trace (``--trace``; ``bundled`` is the
shipped Azure code trace, §4.2). A replayed trace sets λ to its own mean rate, (n − 1)/span over the
replayed rows, so the method is planned, and its Theorem-4 bounds computed, for the load it will see;
the plan and the bounds keep the cluster file's mean lengths, which the output names beside the
replayed rows' own (``bound lengths``; ``--json``: ``bounds_lengths``, ``trace_mean_lengths``).
Seeds follow :mod:`chainserve.sim.runs`: ``--seed s`` is replication s of the experiments.

``--page-tokens N`` models the paged KV cache of the runtime (issue 30): each chain holds c_k ×
``max_tokens`` tokens in pages of N and a job reserves its own prompt + output tokens, so short jobs
pack beyond c_k and long ones take more; a job no chain could ever hold is refused on arrival (the
runtime's 400; ``refused``). Without it, the paper's model: one max-length slot per job.

``--rate-profile T0:R0,T1:R1,…`` makes the arrivals Poisson with a piecewise-constant rate (R_i
requests/s from second T_i on, T0 = 0); the plan is still made once, for the cluster file's rate.
``--adapt`` re-plans online with :class:`chainserve.adapt.controller.AdaptiveController` (beyond the
paper); ``--json`` then lists the plan changes.

``--fail NAME@T[+DURATION]`` (repeatable) kills server NAME at second T and brings it back DURATION
seconds later; without ``+DURATION`` the runtime's supervisor restarts it
(:class:`~chainserve.plan.recovery.RestartPolicy`: at once, then with back-off, plus loading its
span at the cluster's load bandwidth). Recovery is the runtime's: the chains are recomposed on the live
servers and the dead server's jobs run again; ``--json`` counts them (``retried``).
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Annotated

import numpy as np
import typer
from rich.console import Console
from rich.table import Table

from chainserve.adapt.controller import AdaptConfig
from chainserve.cli.common import (
    ClusterArgument,
    PlannerOption,
    fmt_s,
    native_stdout_to_stderr,
    renamed,
    stderr_console,
    stdout_console,
    stdout_errors,
    user_errors,
)
from chainserve.cli.plan_cmd import DEFAULT_CLUSTER
from chainserve.dispatch.registry import POLICIES
from chainserve.methods import METHODS, check_method_name
from chainserve.model import limits
from chainserve.model.cluster_file import load_cluster
from chainserve.model.spec import Problem, SpecError
from chainserve.plan.best import PLANNERS
from chainserve.plan.types import Plan
from chainserve.progress import spinner
from chainserve.runtime.models import measured_model
from chainserve.sim.arrivals import (
    ArrivalProcess,
    GammaArrivals,
    PiecewiseArrivals,
    PoissonArrivals,
    TraceArrivals,
    read_azure_trace,
)
from chainserve.sim.events import Failure, Transition
from chainserve.sim.runs import Replication, run_method
from chainserve.sim.service import SERVICE_MODELS, service_model

BUNDLED_TRACE = "bundled"
#: Most requests one run simulates.
MAX_REQUESTS = 10_000_000
#: ``--burstiness`` (inter-arrival CV) and ``--time-scale`` ranges.
CV_RANGE = (0.01, 10.0)
TIME_SCALE_RANGE = (1e-3, 1e3)
#: Simulated clocks are floats: the run's span may be at most this many shortest service times, so
#: that a service time keeps ~7 significant digits next to the clock (2^-52 × 1e9 ≈ 2e-7).
MAX_SPAN_IN_SERVICE_TIMES = 1e9


def simulate(
    cluster: ClusterArgument = None,
    method: Annotated[str, typer.Option(help=f"Method: {', '.join(METHODS)}, or proposed:<policy>.")] = "proposed",
    policy: Annotated[
        str | None, typer.Option(help=f"Dispatch policy of the proposed chains: {', '.join(POLICIES)} (default jffc).")
    ] = None,
    requests: Annotated[int, typer.Option(help=f"Number of requests to simulate, 1..{MAX_REQUESTS}.")] = 1000,
    rate: Annotated[
        float | None, typer.Option(help="Arrival rate λ in requests/s, 1e-06..1e+06 \\[default: the cluster file's]")
    ] = None,
    trace: Annotated[
        str | None,
        typer.Option(
            metavar="FILE|bundled",
            help="Replay an Azure-format trace (TIMESTAMP,ContextTokens,GeneratedTokens); "
            "'bundled': the shipped Azure code trace 2023 \\[default: none, Poisson "
            "arrivals]",
        ),
    ] = None,
    time_scale: Annotated[
        float | None,
        typer.Option(
            help="Multiply the trace's inter-arrival times, 0.001..1000 (0.5 replays twice as fast) \\[default: 1]"
        ),
    ] = None,
    trace_start: Annotated[int | None, typer.Option(help="First trace row to replay \\[default: 0]")] = None,
    burstiness: Annotated[
        float | None,
        typer.Option(
            metavar="CV",
            help="Coefficient of variation of Gamma inter-arrival times, 0.01..10 (1: Poisson) \\[default: 1]",
        ),
    ] = None,
    service: Annotated[str, typer.Option(metavar="|".join(SERVICE_MODELS), help="Service-time model.")] = "exponential",
    seed: Annotated[int, typer.Option(help="Seed of the placement, dispatch and simulation streams.")] = 0,
    warmup: Annotated[int, typer.Option(help="Leave the first N requests out of the statistics, 0..requests-1.")] = 0,
    planner: PlannerOption = "best",
    rate_profile: Annotated[
        str | None,
        typer.Option(
            metavar="T0:R0,T1:R1,…",
            help="Poisson arrivals at R_i requests/s from second T_i on (T0 = 0, times increasing); the plan "
            r"is made for the cluster file's rate \[default: none]",
        ),
    ] = None,
    adapt: Annotated[
        bool, typer.Option("--adapt", help="Re-plan online when the arrival rate changes (proposed method).")
    ] = False,
    page_tokens: Annotated[
        int | None,
        typer.Option(
            help="KV cache by tokens in pages of N tokens, as the runtime (chains hold c_k × max_tokens tokens, a "
            r"job its own prompt + output) \[default: the paper's model, one max-length slot per job]",
            min=1,
        ),
    ] = None,
    fail: Annotated[
        list[str] | None,
        typer.Option(
            "--fail",
            metavar="NAME@T[+DURATION]",
            help="Kill server NAME at second T, back after DURATION seconds (default: restarted by the runtime's "
            r"supervisor); repeatable \[default: none]",
        ),
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the results as one JSON object.")] = False,
) -> None:
    """Simulate one method on a cluster and report response, waiting and service times."""
    err = stderr_console()
    with user_errors():
        name = method_name(method, policy)
        if planner not in PLANNERS:
            raise SpecError("planner", f"unknown planner {planner!r}; known: {', '.join(PLANNERS)}")
        _check_counts(requests, warmup, seed)
        service_model(service)
        if adapt and not name.startswith("proposed"):
            raise SpecError("adapt", f"only the proposed method re-plans online, got --method {method}")
        if adapt and page_tokens is not None:
            raise SpecError("page-tokens", "--adapt simulates the paper's max-length slots; leave out --page-tokens")
        profile = None if rate_profile is None else parse_rate_profile(rate_profile)
        if profile is not None and (rate is not None or trace is not None or burstiness is not None):
            raise SpecError("rate-profile", "excludes --rate, --trace and --burstiness (it sets the arrivals)")
        problem = load_cluster(cluster or DEFAULT_CLUSTER, measured_model)
        failures = [parse_failure(text, problem) for text in fail or ()]
        if page_tokens is not None and problem.model.max_tokens is None:
            raise SpecError("page-tokens", "needs the model's max_tokens (the tokens s_c holds); add max_tokens")
        if profile is None:
            problem, arrivals, arrivals_text, trace_lengths = _arrivals(
                problem, requests, rate, trace, time_scale, trace_start, burstiness
            )
        else:
            arrivals, arrivals_text, trace_lengths = profile, f"Poisson, rate profile {rate_profile}", None
        rate_field = "rate" if rate is not None else "trace" if trace is not None else "arrival_rate"
        _check_span(problem, requests, rate_field)
        with (
            spinner(err, f"simulating {requests} requests of {name} …"),
            renamed("arrival_rate", rate_field),
            native_stdout_to_stderr(),
        ):
            try:
                run = run_method(
                    problem,
                    name,
                    seed,
                    requests,
                    arrivals,
                    service,
                    warmup,
                    planner,
                    AdaptConfig() if adapt else None,
                    page_tokens,
                    failures,
                )
            except SpecError as exc:
                if exc.field != "arrival_rate" or trace is None:
                    raise
                raise SpecError(
                    "arrival_rate",
                    f"{str(exc).removeprefix('arrival_rate: ')} (the trace's own rate; "
                    "replay it slower with --time-scale, or use a larger cluster such as "
                    "examples/paper-testbed-llama2-7b.yaml)",
                ) from None
    plan = run.setup.plan_or_placement
    with stdout_errors():
        if as_json:
            data = _to_json(run, name, problem, arrivals_text, service, warmup, trace_lengths)
            if adapt or profile is not None:
                data["plan_changes"] = len(run.transitions)
                data["changes"] = [_change_json(t) for t in run.transitions]
            if failures:
                data["failures"] = [_failure_json(f, problem) for f in run.failures]
                data["retried"] = run.num_retried
                data["restarts"] = run.num_restarts
                data["recomposed"] = run.num_recomposed
            typer.echo(json.dumps(data, indent=2))
        else:
            _print_run(run, name, problem, arrivals_text, service, warmup, trace_lengths, stdout_console())
            if adapt:
                _print_changes(run, stdout_console())
    if isinstance(plan, Plan) and not plan.is_stable:
        err.print(
            f"[bold red]warning:[/] unstable plan: λ = {problem.arrival_rate_per_s:g}/s ≥ "
            f"ν = {plan.total_rate_per_s:.4g}/s; waiting grows with the number of requests"
        )


def parse_rate_profile(text: str) -> PiecewiseArrivals:
    """``T0:R0,T1:R1,…`` as a rate profile; a one-line :class:`SpecError` on a malformed one.

    >>> parse_rate_profile("0:0.2,600:0.6").rates_per_s
    (0.2, 0.6)
    >>> parse_rate_profile("0:0.2,600")
    Traceback (most recent call last):
    ...
    chainserve.model.spec.SpecError: rate-profile: '600' is not T:R (seconds:requests per second)
    """
    starts: list[float] = []
    rates: list[float] = []
    for item in text.split(","):
        t_text, sep, r_text = item.strip().partition(":")
        try:
            t, r = float(t_text), float(r_text)
        except ValueError:
            t = r = math.nan
        if not sep or math.isnan(t) or math.isnan(r):
            raise SpecError("rate-profile", f"{item.strip()!r} is not T:R (seconds:requests per second)")
        if not math.isfinite(t) or t < 0:
            raise SpecError("rate-profile", f"time {t_text} must be a non-negative number of seconds")
        limits.check_range("rate-profile", r, limits.RATE_PER_S, "requests/s")
        starts.append(t)
        rates.append(r)
    if starts[0] != 0:
        raise SpecError("rate-profile", f"must start at second 0, got {starts[0]:g}")
    if any(b <= a for a, b in zip(starts, starts[1:], strict=False)):
        raise SpecError("rate-profile", f"times must increase, got {', '.join(f'{t:g}' for t in starts)}")
    return PiecewiseArrivals(tuple(starts), tuple(rates))


def parse_failure(text: str, problem: Problem) -> tuple[float, int, float | None]:
    """``NAME@T[+DURATION]`` as (time, server index, seconds down or ``None``: restarted by the
    supervisor); a one-line :class:`SpecError` on a malformed one.

    >>> from chainserve.model.spec import ModelSpec, Server, Workload
    >>> p = Problem((Server("a", 10, 1.0, 0.0), Server("b@1", 10, 1.0, 0.0)), ModelSpec("m", 1, 1.0, 1.0),
    ...             Workload(0.5))
    >>> parse_failure("b@1@60+30", p), parse_failure("a@5", p)
    ((60.0, 1, 30.0), (5.0, 0, None))
    >>> parse_failure("c@5", p)
    Traceback (most recent call last):
    ...
    chainserve.model.spec.SpecError: fail: no server named 'c' (servers: a, b@1)
    """
    name, sep, when = text.strip().rpartition("@")
    at_text, plus, down_text = when.partition("+")
    try:
        at, down = float(at_text), float(down_text) if plus else None
    except ValueError:
        at = down = math.nan
    if not sep or not name or math.isnan(at) or (plus and (down is None or math.isnan(down))):
        raise SpecError("fail", f"{text.strip()!r} is not NAME@T[+DURATION] (seconds)")
    if not (math.isfinite(at) and at >= 0) or (down is not None and not (math.isfinite(down) and down >= 0)):
        raise SpecError("fail", f"{text.strip()!r}: T and DURATION must be non-negative seconds")
    names = [s.name for s in problem.servers]
    if name not in names:
        raise SpecError("fail", f"no server named {name!r} (servers: {', '.join(names)})")
    return at, names.index(name), down


def _failure_json(failure: Failure, problem: Problem) -> dict[str, object]:
    return {"server": problem.servers[failure.server].name, "at": failure.time_s, "down_s": failure.down_s}


def _change_json(transition: Transition) -> dict[str, object]:
    change = transition.change
    return {
        "time": change.time_s,
        "reason": change.reason,
        "kind": change.kind,
        "old_c": change.old_c,
        "new_c": change.new_c,
        "rate": change.rate_per_s,
        "migrating_s": transition.duration_s,
        "gain_s": change.gain_s,
        "cost_s": change.cost_s,
    }


def _print_changes(run: Replication, out: Console) -> None:
    table = Table(title=f"Plan changes ({len(run.transitions)})", title_justify="left")
    for header in ("time (s)", "reason", "kind", "c", "rate (/s)", "migrating (s)"):
        table.add_column(header, justify="left" if header in ("reason", "kind") else "right")
    for t in run.transitions:
        c = t.change
        table.add_row(
            f"{c.time_s:.1f}", c.reason, c.kind, f"{c.old_c} → {c.new_c}", f"{c.rate_per_s:.4g}", f"{t.duration_s:.1f}"
        )
    out.print(table)


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
    limits.check_count("requests", requests, MAX_REQUESTS)
    if not 0 <= warmup < requests:
        raise SpecError("warmup", f"must lie in 0..{requests - 1} (fewer than --requests), got {warmup}")
    if seed < 0:
        raise SpecError("seed", f"must be a non-negative integer, got {seed}")


def _arrivals(
    problem: Problem,
    num_jobs: int,
    rate: float | None,
    trace: str | None,
    time_scale: float | None,
    trace_start: int | None,
    burstiness: float | None,
) -> tuple[Problem, ArrivalProcess, str, TraceLengths | None]:
    """The problem with λ set as asked, the arrival process, its description in words and, for a
    trace, the replayed rows' mean lengths."""
    if trace is None:
        if time_scale is not None or trace_start is not None:
            raise SpecError("time-scale" if time_scale is not None else "trace-start", "applies only with --trace")
        if rate is not None:
            limits.check_range("rate", rate, limits.RATE_PER_S, "requests/s")
        problem, process, text = _generated(
            problem if rate is None else problem.with_workload(arrival_rate_per_s=rate), burstiness
        )
        return problem, process, text, None
    if rate is not None:
        raise SpecError("rate", "--rate and --trace are mutually exclusive (a trace brings its own rate)")
    if burstiness is not None:
        raise SpecError("burstiness", "applies to generated arrivals, not to a --trace replay")
    return _replayed(problem, num_jobs, trace, 1.0 if time_scale is None else time_scale, trace_start or 0)


@dataclass(frozen=True, slots=True)
class TraceLengths:
    """Mean prompt and output tokens of the replayed trace rows."""

    prompt_tokens: float
    output_tokens: float


def _generated(problem: Problem, cv: float | None) -> tuple[Problem, ArrivalProcess, str]:
    lam = problem.arrival_rate_per_s
    if cv is None or cv == 1:
        return problem, PoissonArrivals(), f"Poisson, λ = {lam:g}/s"
    limits.check_range("burstiness", cv, CV_RANGE)
    return problem, GammaArrivals(cv), f"Gamma renewal, CV = {cv:g}, λ = {lam:g}/s"


def _replayed(
    problem: Problem, num_jobs: int, trace: str, scale: float, first: int
) -> tuple[Problem, ArrivalProcess, str, TraceLengths]:
    """Rows ``first ..`` of the trace; λ becomes their mean rate (n − 1)/span, after ``scale``; the
    rows' mean lengths (the plan and its bounds keep the cluster file's)."""
    path = None if trace == BUNDLED_TRACE else Path(trace)
    if path is not None and path.is_dir():
        raise SpecError("trace", f"{trace} is a folder; give a trace file (CSV) or 'bundled'")
    if path is not None and not path.is_file():
        raise SpecError("trace", f"{trace}: no such file")
    limits.check_range("time-scale", scale, TIME_SCALE_RANGE)
    num_rows = len(read_azure_trace(path))
    if not 0 <= first < num_rows:
        raise SpecError("trace-start", f"must lie in 0..{num_rows - 1} (the trace's rows), got {first}")
    if first + num_jobs > num_rows:
        raise SpecError("requests", f"the trace has {num_rows - first} rows from row {first}, got {num_jobs}")
    process = TraceArrivals(path, scale, first)
    replay = process.sample(problem.workload, num_jobs, np.random.default_rng(0))  # a replay draws nothing
    span_s = float(replay.times_s[-1])
    if span_s <= 0:
        raise SpecError(
            "requests", "the replayed requests all arrive at once, so the trace has no rate; replay more of them"
        )
    rate = (num_jobs - 1) / span_s
    if not limits.RATE_PER_S[0] <= rate <= limits.RATE_PER_S[1]:
        raise SpecError(
            "time-scale" if scale != 1 else "trace",
            f"the replayed rows' rate {rate:.3g}/s lies outside 1e-06..1e+06 requests/s",
        )
    problem = problem.with_workload(arrival_rate_per_s=rate)
    text = (
        f"{'Azure code trace 2023' if path is None else path.name}, rows {first}–{first + num_jobs - 1}, "
        f"time ×{scale:g}, λ = {problem.arrival_rate_per_s:.4g}/s"
    )
    lengths = TraceLengths(float(replay.prompt_tokens.mean()), float(replay.output_tokens.mean()))
    return problem, process, text, lengths


def _check_span(problem: Problem, num_jobs: int, field: str) -> None:
    """Refuse runs whose clock would lose a service time's precision (see MAX_SPAN_IN_SERVICE_TIMES):
    the requests span about n/λ seconds, a service time is at least L·min τ^p."""
    shortest_s = problem.model.num_blocks * min(s.tau_p_s for s in problem.servers)
    span_s = num_jobs / problem.arrival_rate_per_s
    if span_s > MAX_SPAN_IN_SERVICE_TIMES * shortest_s:
        need = num_jobs / (MAX_SPAN_IN_SERVICE_TIMES * shortest_s)
        raise SpecError(
            field,
            f"{num_jobs} requests at λ = {problem.arrival_rate_per_s:g}/s span ~{span_s:.3g} s, "
            f"more than 1e9 service times ({shortest_s:.3g} s each): the simulated clock "
            f"would round service times away; use λ ≥ {need:.3g}/s or fewer requests",
        )


def _to_json(
    run: Replication, name: str, problem: Problem, arrivals_text: str, service: str, warmup: int,
    trace_lengths: TraceLengths | None,
) -> dict[str, object]:  # fmt: skip
    data: dict[str, object] = {
        "method": name,
        "description": run.setup.description,
        "seed": run.seed,
        "cluster": problem.name,
        "arrivals": arrivals_text,
        "arrival_rate": problem.arrival_rate_per_s,
        "service_model": service,
        "warmup": warmup,
        "page_tokens": run.page_tokens,
        "refused": run.num_refused,
        **run.summary.to_json(),
    }
    plan = run.setup.plan_or_placement
    if isinstance(plan, Plan):
        data["bounds"] = {"lower": plan.bounds.lower_s, "upper": plan.bounds.upper_s} if plan.is_stable else None
        w = problem.workload
        data["bounds_lengths"] = {"prompt_tokens": w.prompt_tokens, "output_tokens": w.output_tokens}
    if trace_lengths is not None:
        data["trace_mean_lengths"] = asdict(trace_lengths)
    return data


def _cache_text(run: Replication, problem: Problem) -> str:
    """How the run held KV cache: the paper's slots, or pages by tokens and the jobs refused."""
    if run.page_tokens is None:
        return "one max-length slot per job (the paper's model)"
    refused = f"; {run.num_refused} refused (too long for every chain)" if run.num_refused else ""
    return (
        f"pages of {run.page_tokens} tokens, each job its own prompt + output; each of c_k's slots holds "
        f"max_tokens = {problem.model.max_tokens}{refused}"
    )


def _print_run(
    run: Replication, name: str, problem: Problem, arrivals_text: str, service: str, warmup: int,
    trace_lengths: TraceLengths | None, out: Console,
) -> None:  # fmt: skip
    summary = run.summary
    times = Table(title=f"Simulated times (seconds, {summary.num_requests} requests)", title_justify="left")
    for header in ("metric", "mean", "p50", "p95", "p99"):
        times.add_column(header, justify="left" if header == "metric" else "right")
    for label, stats in (("response", summary.response), ("waiting", summary.waiting), ("service", summary.service)):
        times.add_row(label, *(fmt_s(v) for v in (stats.mean_s, stats.p50_s, stats.p95_s, stats.p99_s)))
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
        ("KV cache", _cache_text(run, problem)),
        ("throughput", f"{summary.throughput_per_s:.4g}/s over {summary.window_s:.1f} s"),
    ]
    if run.failures:
        names = ", ".join(
            f"{problem.servers[f.server].name} at {f.time_s:g} s, "
            + ("never back" if f.down_s is None else f"back after {f.down_s:.3g} s")
            for f in run.failures
        )
        rows.append((
            "failures",
            f"{names}; {run.num_retried} jobs ran again ({run.num_restarts} aborted starts), chains "
            f"recomposed {run.num_recomposed} times",
        ))  # fmt: skip
    ci = summary.response_mean_ci
    if ci is not None:
        rows.append(
            ("mean response", f"{ci.mean:.3f} s ± {ci.half_width:.3f} s ({ci.confidence:.0%} batch-means interval)")
        )
    plan = run.setup.plan_or_placement
    if isinstance(plan, Plan):
        bounds = (
            f"{fmt_s(plan.bounds.lower_s)} s ≤ E[T] ≤ {fmt_s(plan.bounds.upper_s)} s"
            if plan.is_stable
            else "[bold red]UNSTABLE: λ ≥ ν, unbounded[/]"
        )
        poisson = (
            "JFFC, Poisson arrivals"
            if arrivals_text.startswith("Poisson")
            else "JFFC, assuming Poisson arrivals at this mean rate; these arrivals are not Poisson"
        )
        rows.append(("Theorem-4 bounds", f"{bounds} ({poisson}); simulated mean {fmt_s(summary.response.mean_s)} s"))
        if trace_lengths is not None:
            w = problem.workload
            rows.append((
                "bound lengths",
                f"the plan and its bounds use the cluster file's mean lengths, {w.prompt_tokens} prompt + "
                f"{w.output_tokens} output tokens; the replayed rows' mean lengths are "
                f"{trace_lengths.prompt_tokens:.0f} + {trace_lengths.output_tokens:.0f}",
            ))  # fmt: skip
    for key, value in rows:
        info.add_row(key, value)
    out.print(times)
    out.print(info)
