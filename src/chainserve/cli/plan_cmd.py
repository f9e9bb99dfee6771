"""``chainserve plan``: GBP-CR + GCA on a cluster file, c chosen by search or given (paper §2.1–2.3, §2.5)."""

from __future__ import annotations

import json
from contextlib import nullcontext
from enum import StrEnum
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from chainserve.cli.common import (
    ClusterArgument,
    check_image_path,
    fmt_s,
    native_stdout_to_stderr,
    renamed,
    stderr_console,
    stdout_console,
    stdout_errors,
    user_errors,
)
from chainserve.model import limits
from chainserve.model.cluster_file import load_cluster
from chainserve.model.spec import ModelSpec, Problem, SpecError
from chainserve.plan.best import best_plan
from chainserve.plan.csearch import plan_for_c, search_c, searched_reservations
from chainserve.plan.export import jobs_per_server, petals_commands
from chainserve.plan.loaded import batch_one_times_s, full_load_times_s
from chainserve.plan.plan_file import layout_to_dict
from chainserve.plan.types import Plan, SearchReport, chain_number
from chainserve.progress import progress_bar, spinner
from chainserve.runtime.models import measured_model

#: The embedded default cluster (a copy of examples/paper-sim-bloom-20.yaml).
DEFAULT_CLUSTER = Path(__file__).resolve().parents[1] / "data" / "default-cluster.yaml"


class Objective(StrEnum):
    lower = "lower"
    surrogate = "surrogate"


class Planner(StrEnum):
    best = "best"
    greedy = "greedy"


class Export(StrEnum):
    petals = "petals"


def parse_c(value: str) -> int | None:
    """``auto`` → ``None`` (search), else a positive integer."""
    if value.strip().lower() == "auto":
        return None
    try:
        c = int(value)
    except ValueError:
        c = 0
    if c < 1:
        raise typer.BadParameter(f"expected a positive integer or 'auto', got {value!r}", param_hint="'--c'")
    return c


def plan(
    cluster: ClusterArgument = None,
    rate: Annotated[
        float | None,
        typer.Option("--rate", help="Arrival rate λ in requests/s, 1e-06..1e+06 \\[default: the cluster file's]"),
    ] = None,
    rho_bar: Annotated[
        float | None,
        typer.Option(
            "--rho-bar",
            help="Design load ρ̄ (GBP-CR places servers until "
            "ν ≥ λ/ρ̄), 0.001..0.999 \\[default: the "
            "cluster file's, else 0.7]",
        ),
    ] = None,
    c: Annotated[
        str, typer.Option("--c", metavar="N|auto", help="Cache reservation c: a positive integer, or 'auto' to search.")
    ] = "auto",
    objective: Annotated[
        Objective,
        typer.Option(
            help="Score of the c search: least lower bound on the mean response time, or most job servers c·K(c)."
        ),
    ] = Objective.lower,
    planner: Annotated[
        Planner,
        typer.Option(
            help="best: the greedy plan improved (more placements, local "
            "search, MILP; never worse by the lower bound); greedy: the "
            "paper's GBP-CR + GCA + c-search. --c N and --objective "
            "surrogate plan greedily."
        ),
    ] = Planner.best,
    as_json: Annotated[bool, typer.Option("--json", help="Print the plan as one JSON object.")] = False,
    export: Annotated[
        Export | None, typer.Option(help="Also print one PETALS run_server command per placed server \\[default: none]")
    ] = None,
    plot: Annotated[
        Path | None,
        typer.Option(help="Draw the placement and chains to this image file (.png, .pdf, .svg, …) \\[default: none]"),
    ] = None,
) -> None:
    """Place blocks and allocate cache for a cluster, and bound the mean response time under JFFC."""
    c_value = parse_c(c)
    err = stderr_console()
    with user_errors():
        if plot is not None:
            check_image_path("plot", plot)
        problem = _with_overrides(load_cluster(cluster or DEFAULT_CLUSTER, measured_model), rate, rho_bar)
        with renamed("arrival_rate", "rate") if rate is not None else nullcontext(), native_stdout_to_stderr():
            result = _make_plan(problem, c_value, objective.value, err, planner.value)
        commands = petals_commands(result) if export is Export.petals else None
        if plot is not None:
            from chainserve.plan.plot import plot_plan  # matplotlib only when asked for

            plot_plan(result, plot)
    with stdout_errors():
        if as_json:
            data = layout_to_dict(result)  # a plan file: chainserve serve --plan / block-server --plan
            if commands is not None:
                data["export"] = {"petals": commands}
            typer.echo(json.dumps(data, indent=2))
        else:
            _print_plan(result, stdout_console())
            if commands is not None:
                typer.echo("\n".join(commands))
    if result.search is not None and result.search.cut_short:
        err.print(
            f"[bold yellow]warning:[/] the best planner's {result.search.time_limit_s:g} s time limit cut its "
            "search short: this is the best plan found so far, and another machine may find another"
        )
    if not result.is_stable:
        err.print(
            f"[bold red]warning:[/] unstable plan: λ = {problem.arrival_rate_per_s:g}/s ≥ "
            f"ν = {result.total_rate_per_s:.4g}/s; the queue would grow without bound"
        )
    if plot is not None:
        err.print(f"plot written to {plot}", markup=False, highlight=False)


def _with_overrides(problem: Problem, rate: float | None, rho_bar: float | None) -> Problem:
    """The problem with ``--rate`` / ``--rho-bar`` applied (each checked against its range)."""
    if rate is not None:
        limits.check_range("rate", rate, limits.RATE_PER_S, "requests/s")
    if rho_bar is not None:
        limits.check_range("rho-bar", rho_bar, limits.RHO_BAR)
    changes = {k: v for k, v in (("arrival_rate_per_s", rate), ("rho_bar", rho_bar)) if v is not None}
    return problem.with_workload(**changes) if changes else problem


def _make_plan(problem: Problem, c: int | None, objective: str, err: Console, planner: str = "greedy") -> Plan:
    """``best_plan`` (planner ``best``, c searched, objective ``lower``), else ``search_c`` with a progress
    bar (on a terminal), or ``plan_for_c`` for a given c."""
    if planner == "best" and c is None and objective == "lower":
        with spinner(err, "planning (best) …"):
            return best_plan(problem)
    if c is not None:
        result = plan_for_c(problem, c)
        if result is None:
            raise SpecError(
                "c",
                f"c = {c} is infeasible: reserving cache for {c} jobs per block, the "
                f"servers hold fewer than the model's {problem.model.num_blocks} blocks",
            )
        return result[1]
    with progress_bar(console=err, elapsed=False) as progress:
        task = progress.add_task("searching c", total=searched_reservations(problem))
        return search_c(problem, objective, lambda done, total: progress.update(task, completed=done, total=total))


def _print_plan(result: Plan, out: Console) -> None:
    problem = result.problem
    cache, free, jobs = result.reservation_by_server(), result.free_memory_gb(), jobs_per_server(result)
    servers = Table(
        title=f"Servers ({len(result.placement.spans)} of {problem.num_servers} placed)", title_justify="left"
    )
    formats = any(s.weights is not None for s in problem.servers)  # issue 29: a column when any sets one
    headers = ("server", "gpu", *(("weights",) if formats else ()), "memory GB", "blocks", "m_j", "cache GB")
    for header in (*headers, "free GB", "jobs"):
        servers.add_column(header, justify="left" if header in ("server", "gpu", "weights", "blocks") else "right")
    for span in sorted(result.placement.spans, key=lambda s: (s.start_block, s.server)):
        s = problem.servers[span.server]
        servers.add_row(
            s.name,
            s.gpu or "—",
            *((s.weights or problem.model.dtype or "—",) if formats else ()),
            f"{s.memory_gb:g}",
            f"{span.start_block}–{span.end_block}",
            str(span.num_blocks),
            f"{cache[span.server]:.2f}",
            f"{free[span.server]:.2f}",
            str(jobs[span.server]),
        )
    out.print(servers)
    unplaced = [j for j in range(problem.num_servers) if j not in cache]
    if unplaced:
        out.print(_idle_servers(result, unplaced), highlight=False)
    out.print(chains_table(result))
    out.print(summary_table(result))
    out.print(LEGEND, highlight=False)


def chains_table(result: Plan) -> Table:
    """The chains, fastest first: servers, blocks per hop, T_k, μ_k and c_k (numbered from 1)."""
    problem = result.problem
    names = [s.name for s in problem.servers]
    chains = Table(title=f"Chains (fastest first, {len(result.chains)})", title_justify="left")
    loaded = result.estimate_s is not None  # step costs: T_k at batch 1 and at full load (issue 18)
    headers = ("k", "servers", "blocks per hop", "T_k s", *(("T_k s, batch 1", "T_k s, full load") if loaded else ()))
    for header in (*headers, "μ_k /s", "c_k"):
        chains.add_column(header, justify="left" if header in ("servers", "blocks per hop") else "right")
    one, full = (
        (batch_one_times_s(problem, result.chains), full_load_times_s(problem, result.chains)) if loaded else ((), ())
    )
    for k, ch in enumerate(result.chains):
        chains.add_row(
            str(chain_number(k)),
            " → ".join(names[h.server] for h in ch.hops),
            " + ".join(str(h.num_blocks) for h in ch.hops),
            fmt_s(ch.service_time_s),
            *((fmt_s(one[k]), fmt_s(full[k])) if loaded else ()),
            f"{ch.rate_per_s:.4f}",
            str(ch.capacity),
        )
    return chains


LEGEND = """\
Key: m_j = blocks server j hosts; cache GB = KV cache reserved on it for the jobs of its chains; jobs = Σ c_k over
the chains through it. T_k = mean service time of chain k (its servers' τ^c + τ^p × blocks); μ_k = 1/T_k; c_k = jobs
chain k runs at once. With step costs (issue 18), T_k at batch 1 adds the head's time to one job alone and T_k at
full load has every c_k of the plan in service (batched iterations, others' prefills beside each step); the
bounds then use batch-1 speeds (lower) and full-load speeds (upper). c is GBP-CR's reservation while placing (cache
for c jobs on every block); GCA then gives each chain all the capacity the remaining memory allows, so c_k can
exceed c. ν = Σ c_k μ_k is the total service rate, ρ = λ/ν the load, ρ̄ the design load. E[T] bounds: Sun, He,
Hou (2026), Theorem 4, under JFFC dispatch."""


def _idle_servers(result: Plan, unplaced: list[int]) -> str:
    """Why servers host nothing: too little memory for one block, or not needed for λ/ρ̄."""
    from chainserve.plan.gbp_cr import blocks_with_reservation

    problem = result.problem
    names = [s.name for s in problem.servers]
    blocks = blocks_with_reservation(problem, result.c) if result.c is not None else [1] * problem.num_servers
    small = [names[j] for j in unplaced if blocks[j] == 0]
    spare = [names[j] for j in unplaced if blocks[j] > 0]
    lines = []
    if spare:
        target = problem.arrival_rate_per_s / problem.workload.rho_bar
        if any(note.startswith("planner: best") for note in result.notes):
            lines.append(
                f"not placed (not needed): {', '.join(spare)} — no plan found with them had a lower "
                "bound on the mean response time"
            )
        else:
            lines.append(
                f"not placed (not needed): {', '.join(spare)} — GBP-CR stops adding servers once its "
                f"chains promise c·Σ 1/T ≥ λ/ρ̄ = {target:.4g}/s"
            )
    if small:
        lines.append(
            f"not placed (too little memory): {', '.join(small)} — cannot hold one block with cache for "
            f"c = {result.c} jobs"
        )
    return "\n".join(lines)


def _search_line(search: SearchReport) -> str:
    """The best planner's work and time, and whether its safety net cut it short."""
    line = (
        f"best planner: {search.num_evaluations} placements completed, {search.num_milp_nodes} MILP nodes, "
        f"{search.elapsed_s:.1f} s of {search.time_limit_s:g} s, seed {search.seed}"
    )
    if search.cut_short:
        return f"{line}; [bold yellow]cut short by the time limit: best plan found so far[/]"
    return f"{line}; ended by its work limits (the same plan on any machine)"


def model_line(model: ModelSpec) -> str:
    r"""L, s_m and the KV bytes per token per block (s_c ÷ max_tokens), and where they came from.

    >>> print(model_line(ModelSpec("m", 30, 0.00708, 0.0031, max_tokens=2048, kv_bytes_per_token_per_block=1536,
    ...                            measured_from="/models/m")).replace("; ", ";\n"))
    L = 30 blocks of 0.00708 GB, KV 1536 bytes per token per block (s_c = 0.0031 GB for 2048 tokens);
    measured from /models/m (meta-device build and dry run)
    """
    kv = model.kv_bytes_per_token_per_block
    if kv is None and model.max_tokens is not None:
        kv = model.cache_size_gb * 1e9 / model.max_tokens
    line = f"L = {model.num_blocks} blocks of {model.block_size_gb:.4g} GB"
    if kv is not None:
        line += f", KV {kv:.6g} bytes per token per block"
        line += f" (s_c = {model.cache_size_gb:.4g} GB for {model.max_tokens} tokens)"
    else:
        line += f", s_c = {model.cache_size_gb:.4g} GB per job per block"
    if model.measured_from is not None:
        line += f"; measured from {model.measured_from} (meta-device build and dry run)"
    return line


def summary_table(result: Plan) -> Table:
    """The plan at a glance: cluster, workload, c, K, C, ν, ρ and the Theorem-4 bounds on E[T]."""
    problem = result.problem
    w = problem.workload
    table = Table(title="Summary", title_justify="left", show_header=False)
    table.add_column(style="bold")
    table.add_column()
    rows = [
        (
            "cluster",
            f"{problem.name}: {problem.model.name}, L = {problem.model.num_blocks} blocks, "
            f"{problem.num_servers} servers",
        ),
        (
            "workload",
            f"λ = {w.arrival_rate_per_s:g}/s, ρ̄ = {w.rho_bar:g}"
            + (
                f", {w.prompt_tokens} prompt + {w.output_tokens} output tokens"
                if problem.model.flops_per_token_per_block is not None
                else ""
            ),
        ),
        ("model", model_line(problem.model)),
        ("c (reservation)", "—" if result.c is None else str(result.c)),
        ("K (chains)", str(len(result.chains))),
        ("C = Σ c_k", str(result.num_job_servers)),
        ("ν = Σ c_k μ_k", f"{result.total_rate_per_s:.4g}/s"),
        ("ρ = λ/ν", f"{result.load:.3f}"),
    ]
    if result.is_stable:
        rows.append(
            (
                "mean response",
                f"{fmt_s(result.bounds.lower_s)} s ≤ E[T] ≤ {fmt_s(result.bounds.upper_s)} s "
                "(JFFC, Poisson arrivals; Theorem-4 bounds"
                + (", batch-1 / full-load speeds)" if result.estimate_s is not None else ")"),
            )
        )
        if result.estimate_s is not None:
            rows.append(("batch-aware", f"E[T] ≈ {fmt_s(result.estimate_s)} s at the load's concurrency (the score)"))
    else:
        rows.append(("mean response", "[bold red]UNSTABLE: λ ≥ ν, unbounded[/]"))
    if result.search is not None:
        rows.append(("search", _search_line(result.search)))
    for key, value in rows:
        table.add_row(key, value)
    return table
