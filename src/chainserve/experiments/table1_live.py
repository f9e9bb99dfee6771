"""Table 1 of the paper (§4.2) on the live runtime: the MIG testbed as block-server processes on the
emulated backend, the Azure code trace replayed by the benchmark client, next to the simulator's
prediction for the same layouts and requests and next to the paper's numbers.

The testbed (issue 7): 3× 3g.40gb ("high") + 6× 2g.20gb ("low") slices serving LLaMA-2-7B fp16, τ^p
from the catalogue, per-server one-way delays RTT/2 + 18 ms (netem in the paper) with RTTs spread over
20–120 ms, so τ^c_j = (RTT_j + 36 ms)·l̄_out. **Memory regime**: every request of the trace must fit
its KV slot, so the cache per job s_c is sized for 8192 tokens (the trace's longest request has 7841);
the slices' full memory is usable. A 20 GB slice then holds the whole model with cache for one job and
a 40 GB slice for six: the c-search's choice between whole-model replicas and chains of two 20 GB
slices (six jobs each instead of one per slice) depends on the load — a real decision.
PETALS' cache per block (``--attn_cache_tokens``) is 32768 tokens, four of these jobs: with the 4096
of the paper's PETALS no 8192-token session fits at all, and with 8192 (one per server) its
min-latency routing queues every request at the fastest server and a run takes over 13 minutes (simulated).
"""

from __future__ import annotations

import asyncio
import math
import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure

from chainserve.analysis.records import Stats, Summary
from chainserve.experiments.common import markdown_table, pct, reduction_pct, save_figure, write_report
from chainserve.experiments.live import (
    Measured,
    chain_rows,
    error_cell,
    measure_layout,
    method_layout,
    simulate_layout,
    within_target,
)
from chainserve.experiments.table1 import PAPER, PAPER_REDUCTION
from chainserve.measure.bench import BenchRequest, trace_requests
from chainserve.model import presets
from chainserve.model.spec import Problem, SpecError
from chainserve.plan.csearch import plan_for_c, search_c
from chainserve.plan.types import Layout, Plan
from chainserve.progress import progress_bar
from chainserve.sim.service import EmulatedService

METHODS = ("petals", "bprr", "jffc-only", "proposed")
#: Defaults: 500 trace requests replayed 1/0.3 ≈ 3.3× faster than recorded (λ ≈ 7.1/s).
NUM_REQUESTS = 500
TIME_SCALE = 0.3
#: KV positions per job slot: the bundled trace's longest request (7841 tokens) fits.
MAX_TOKENS = 8192
PETALS_CACHE_TOKENS = 32768
#: RTTs (ms) of the high and low slices: 20–120 ms in 9 even steps, interleaved between the two kinds.
TESTBED_RTTS_MS = {"high": (20.0, 57.5, 95.0), "low": (32.5, 45.0, 70.0, 82.5, 107.5, 120.0)}
#: netem's extra one-way delay per hop (paper §4.2: RTT/2 + 18 ms each way).
NETEM_ONE_WAY_S = 0.018
#: The paper's c* on its testbed (§4.2).
PAPER_C = 35


def live_testbed(arrival_rate: float, max_tokens: int = MAX_TOKENS) -> Problem:
    """The issue-7 testbed: LLaMA-2-7B fp16 on 3 high + 6 low MIG slices, s_c for ``max_tokens``
    tokens, τ^c_j = (RTT_j + 2·18 ms)·28, 2048 prompt / 28 output tokens, ρ̄ = 0.7.

    >>> p = live_testbed(2.0)
    >>> p.num_servers, round(p.servers[0].tau_c_s, 3), p.model.max_tokens
    (9, 1.568, 8192)
    """
    base = presets.paper_testbed(arrival_rate, max_tokens=max_tokens)
    rtts_s = [r / 1000 for name in ("high", "low") for r in TESTBED_RTTS_MS[name]]
    l_out = base.workload.output_tokens
    servers = tuple(
        replace(s, tau_c_s=(rtt + 2 * NETEM_ONE_WAY_S) * l_out, rtt_s=rtt)
        for s, rtt in zip(base.servers, rtts_s, strict=True)
    )
    return replace(base, servers=servers, name="paper-testbed-live")


@dataclass(frozen=True, slots=True)
class MethodResult:
    method: str
    layout: Layout
    measured: Measured
    model: Summary  # the simulator, emulated-backend timing without overhead
    calibrated: Summary | None  # … with the measured per-hop-step overhead
    load_avg: float  # the machine's 1-minute load average at the end of the run


def run_live(
    problem: Problem,
    requests: list[BenchRequest],
    methods: tuple[str, ...],
    work_dir: Path,
    tick: Callable[[], None],
    petals_cache_tokens: int | None = PETALS_CACHE_TOKENS,
    planner: str = "greedy",
) -> tuple[list[MethodResult], float]:
    """Every method live and simulated; returns the results and the fitted overhead per hop and step."""
    runs = []
    for method in methods:
        layout = method_layout(method, problem, planner=planner, petals_cache_tokens=petals_cache_tokens)
        model_summary = simulate_layout(layout, method, requests, EmulatedService())
        measured = asyncio.run(measure_layout(layout, method, requests, work_dir / method))
        runs.append((method, layout, measured, model_summary, os.getloadavg()[0]))
        tick()
    overhead = hop_overhead_s([r[2] for r in runs])
    results = [
        MethodResult(
            method,
            layout,
            measured,
            summary,
            simulate_layout(layout, method, requests, EmulatedService(overhead)) if overhead > 0 else None,
            load,
        )
        for method, layout, measured, summary, load in runs
    ]
    return results, overhead


def hop_overhead_s(runs: list[Measured]) -> float:
    """The runtime's own time per hop and step beyond the emulated sleeps, over all completed
    requests: Σ(measured service − modelled service) / Σ(hops × output tokens) (0 when negative)."""
    extra = sum(float(np.sum(m.service_s - m.model_service_s)) for m in runs)
    steps = sum(float(np.sum(m.hop_steps)) for m in runs)
    return max(extra / steps, 0.0) if steps > 0 else 0.0


def _stats_cells(s: Stats) -> str:
    return f"{s.mean_s:.2f} / {s.p95_s:.2f} / {s.p99_s:.2f}"


def results_table(results: list[MethodResult]) -> str:
    header = [
        "method",
        "live: mean / P95 / P99 response (s)",
        "live: waiting / service (s)",
        "completed",
        "sim: mean / P95 / P99 response (s)",
        "sim: waiting / service (s)",
        "sim − live (mean)",
        "sim + overhead: mean (s)",
        "sim + overhead − live",
        "paper: mean / P95 / P99 / waiting / service",
    ]
    rows = []
    for r in results:
        m, s, c = r.measured, r.model, r.calibrated
        row = [
            r.method,
            _stats_cells(m.stats("response")),
            f"{m.stats('waiting').mean_s:.2f} / {m.stats('service').mean_s:.2f}",
            f"{m.num_completed}/{m.num_requests}",
            _stats_cells(s.response),
            f"{s.waiting.mean_s:.2f} / {s.service.mean_s:.2f}",
            error_cell(s.response.mean_s, m.stats("response").mean_s),
            "–" if c is None else f"{c.response.mean_s:.2f}",
            "–" if c is None else error_cell(c.response.mean_s, m.stats("response").mean_s),
            "{:.1f} / {:.1f} / {:.1f} / {:.1f} / {:.1f}".format(*PAPER[r.method]),
        ]
        rows.append(row)
    return markdown_table(header, rows)


def targets(results: list[MethodResult]) -> list[str]:
    """The issue's targets, each with the numbers."""
    means = {r.method: r.measured.stats("response").mean_s for r in results}
    lines = []
    if "proposed" in means:
        for base, goal in (("petals", 60.0), ("bprr", 30.0), ("jffc-only", None)):
            if base in means:
                red = reduction_pct(means["proposed"], means[base])
                verdict = "" if goal is None else (" — met" if red >= goal else " — **not met**")
                target = "" if goal is None else f", target ≥ {goal:.0f} %"
                lines.append(
                    f"* proposed vs {base}: mean response {pct(red)} lower live "
                    f"(paper {pct(PAPER_REDUCTION[base])}{target}){verdict}"
                )
    for r in results:
        live = r.measured.stats("response").mean_s
        sims = [("model", r.model.response.mean_s)] + (
            [] if r.calibrated is None else [("model + overhead", r.calibrated.response.mean_s)]
        )
        errs = ", ".join(f"{name} {error_cell(v, live)}" for name, v in sims)
        ok = any(within_target(v, live) for _, v in sims)
        lines.append(
            f"* simulator vs live, {r.method}: {errs} (target within ±15 %){' — met' if ok else ' — **not met**'}"
        )
    return lines


def paper_c_section() -> str:
    """What the paper's c* = 35 implies, computed on the paper's own regime (s_c for the trace's mean
    2076 tokens, full slices, λ = 2.57/s) with this testbed's τ."""
    problem = live_testbed(2.57, max_tokens=2076)
    best = search_c(problem)
    at35 = plan_for_c(problem, PAPER_C)
    model = problem.model
    per_block = model.block_size_gb + PAPER_C * model.cache_size_gb
    tight_gb = model.cache_size_gb * MAX_TOKENS / 2076
    lines = [
        f"**What c* = {PAPER_C} implies.** At c = {PAPER_C}, GBP-CR reserves s_m + {PAPER_C}·s_c per block; with "
        f"s_c sized for the trace's mean sequence (2076 tokens, {model.cache_size_gb * 1000:.1f} MB per block per "
        f"job) that is {per_block:.2f} GB, so a 40 GB slice holds {math.floor(40 / per_block)} blocks and a 20 GB "
        f"slice {math.floor(20 / per_block)}: every chain spans 2–3 slices. With s_c for 8192 tokens instead, "
        f"{PAPER_C} jobs need {PAPER_C * tight_gb:.1f} GB of cache per block and a 40 GB slice holds "
        f"{math.floor(40 / (model.block_size_gb + PAPER_C * tight_gb))} blocks, so chains would need 7 or more "
        "slices. So c* = 35 implies that the paper sized the cache per job for about the "
        "mean sequence (the memory-loose regime of `docs/results/table1.md`) on nearly the slices' full memory.",
    ]
    if at35 is not None:
        _, plan35 = at35
        lines.append(
            f"In that regime, with this testbed's τ (each extra hop costs (RTT + 36 ms)·28 ≈ 1.6–4.4 s), the "
            f"c-search picks c* = {best.c} ({len(best.chains)} chains, lower bound {best.bounds.lower_s:.2f} s); "
            f"c = {PAPER_C} would give {len(plan35.chains)} chain(s) "
            f"({', '.join(' → '.join(problem.servers[h.server].name for h in ch.hops) for ch in plan35.chains)}) "
            f"with lower bound {plan35.bounds.lower_s:.2f} s. The paper's choice of c = 35 therefore also implies "
            "hops far cheaper relative to compute than our τ model makes them (its measured service, 6.7–8.5 s, "
            "is mostly compute). We cannot rebuild that regime from the paper, so the live table uses the "
            "memory-tight regime above, where the decision is real in our τ model."
        )
    return "\n\n".join(lines)


def _plot(results: list[MethodResult], path: Path, title: str) -> None:
    methods = [r.method for r in results]
    series = {
        "live (emulated runtime)": [r.measured.stats("response").mean_s for r in results],
        "simulator": [r.model.response.mean_s for r in results],
        "paper testbed": [PAPER[m][0] for m in methods],
    }
    fig = Figure(figsize=(8, 4))
    ax = fig.subplots()
    width = 0.8 / len(series)
    for g, (label, values) in enumerate(series.items()):
        xs = [i + (g - (len(series) - 1) / 2) * width for i in range(len(methods))]
        bars = ax.bar(xs, values, width, label=label)
        ax.bar_label(bars, labels=[f"{v:.1f}" for v in values], fontsize=7)
    ax.set_xticks(range(len(methods)), methods)
    ax.set(ylabel="mean response time (s)", title=title)
    ax.grid(alpha=0.3, axis="y")
    ax.legend(fontsize=8)
    save_figure(fig, path)


def check_methods(methods: tuple[str, ...]) -> tuple[str, ...]:
    unknown = [m for m in methods if m not in METHODS]
    if unknown or not methods:
        raise SpecError("methods", f"choose among {', '.join(METHODS)}, got {', '.join(methods) or 'none'}")
    return methods


def table1_live(
    out_dir: Path,
    num_seeds: int = 1,
    num_jobs: int = NUM_REQUESTS,
    *,
    time_scale: float = TIME_SCALE,
    methods: tuple[str, ...] = METHODS,
) -> Path:
    """Write ``table1_live.md`` and ``table1_live.png`` (``num_seeds`` is unused: one live run each)."""
    methods = check_methods(methods)
    requests = trace_requests(None, time_scale=time_scale, num_requests=num_jobs)
    span_s = requests[-1].at_s
    rate = (len(requests) - 1) / span_s if span_s > 0 else len(requests)
    problem = live_testbed(rate)
    plan = search_c(problem)
    with progress_bar() as bar, tempfile.TemporaryDirectory(prefix="chainserve-table1-live-") as tmp:
        task = bar.add_task("table 1 live", total=len(methods))
        results, overhead = run_live(problem, requests, methods, Path(tmp), lambda: bar.advance(task))
    layouts = {r.method: r.layout for r in results}
    sections = [
        f"Command: `chainserve experiment table1-live --requests {num_jobs} --time-scale {time_scale:g} "
        f"--methods {','.join(methods)}`. Each method is served by `chainserve serve --plan FILE --backend "
        "emulated` (an orchestrator process and 9 block-server processes, steps sleeping the servers' τ) and "
        f"receives the first {num_jobs} requests of the bundled Azure code trace (prompt and output lengths "
        f"of the trace, `max_tokens` with ignore-EOS) replayed at {time_scale:g}× their recorded gaps "
        f"({span_s:.0f} s of arrivals, λ = {rate:.2f}/s) by the benchmark client (`chainserve.measure.bench`). "
        "Response: the client's end-to-end time; waiting: the server's queue time of each request; service: "
        "the server's end-to-end time minus its queue time. The simulator replays the same requests on the same "
        "layouts with the emulated backend's timing (`--service emulated`, `chainserve.sim.service`): "
        "'sim' without any runtime overhead, 'sim + overhead' adding the measured "
        f"{overhead * 1000:.2f} ms per hop per step (the orchestrator's and transport's own time, fitted "
        "as Σ(measured − modelled service)/Σ(hops × tokens) over all runs). Planner: the paper's greedy one.",
        "## Cluster and memory regime",
        (__doc__ or "").split("\n\n", 1)[1].strip(),
        f"Proposed plan (λ = {rate:.2f}/s): c* = {plan.c}, {len(plan.chains)} chains, {plan.num_job_servers} "
        f"job servers, ν = {plan.total_rate_per_s:.2f}/s, Theorem-4 bounds on the mean response "
        f"{plan.bounds.lower_s:.2f}–{plan.bounds.upper_s:.2f} s (Poisson at λ).",
        markdown_table(["chain", "servers", "blocks per hop", "T_k (s)", "c_k"], chain_rows(plan)),
    ]
    for method in ("jffc-only", "petals", "bprr"):
        if method in layouts:
            layout = layouts[method]
            extra = "" if isinstance(layout, Plan) else f" ({'; '.join(layout.notes)})"
            sections += [
                f"{method}{extra}:",
                markdown_table(["chain", "servers", "blocks", "T_k (s)", "c_k"], chain_rows(layout)),
            ]
    sections += [paper_c_section(), "## Results", results_table(results), "## Targets", "\n".join(targets(results))]
    loads = ", ".join(f"{r.method} {r.load_avg:.1f}" for r in results)
    sections.append(
        f"Machine: {os.cpu_count()} cores shared with other work; 1-minute load average at the end of each run: "
        f"{loads}. The emulated servers sleep rather than compute, so contention shows up only as the "
        "orchestrator's per-hop overhead."
    )
    _plot(results, out_dir / "table1_live.png", f"Table 1 live: {num_jobs} Azure code requests, emulated testbed")
    sections.append("![table 1 live](table1_live.png)")
    return write_report(
        out_dir, "table1_live", "Table 1 on the live runtime: emulated MIG testbed, Azure code trace", sections
    )
