"""Table 1 of the paper (§4.2) in simulation: the MIG testbed, 1000 requests of the Azure code trace,
in two memory regimes.

3× 3g.40gb + 6× 2g.20gb MIG slices, token-level service (each job's own prompt/output lengths),
arrivals replayed from the bundled Azure LLM code trace (first ``num_jobs`` requests).

* **memory-loose** — the paper's model, LLaMA-2-7B fp16 (13 GB): it fits on every slice with room for
  cache, so the c-search rightly picks whole-model chains (the JFFC-only layout);
* **memory-tight** — the same shape with LLaMA-2-13B fp16 (25.4 GB): it does not fit on a 20 GB slice,
  so the low slices can serve only inside multi-server chains, and chain composition is a real decision.

Our τ model gives a mean service of about 2–3 s where the paper measured 6.7–8.5 s on its PETALS-based
testbed, so the trace replayed at its own timestamps is a light load for us; the trace compressed 4× in
time (``time_scale = 0.25``) gives about the paper's offered load λ·E[S]. Both are reported.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from matplotlib.figure import Figure

from chainserve.experiments.common import (
    markdown_table,
    mean_ci,
    pct,
    reduction_pct,
    save_figure,
    write_report,
)
from chainserve.model.presets import paper_testbed
from chainserve.plan.csearch import search_c
from chainserve.plan.types import Plan
from chainserve.progress import progress_bar
from chainserve.sim.arrivals import TraceArrivals
from chainserve.sim.runs import run_method

METHODS = ("petals", "bprr", "jffc-only", "proposed")
PAPER = {
    "petals": (31.4, 68.5, 89.3, 24.2, 7.2),
    "bprr": (19.8, 44.2, 61.7, 12.6, 7.2),
    "jffc-only": (10.0, 22.1, 29.6, 1.5, 8.5),
    "proposed": (7.3, 15.2, 21.4, 0.6, 6.7),
}
#: The paper's reductions of the proposed method's mean response time (Table 1: 1 − 7.3/31.4 …).
PAPER_REDUCTION = {m: reduction_pct(PAPER["proposed"][0], PAPER[m][0]) for m in ("petals", "bprr", "jffc-only")}
REGIMES = (
    ("memory-loose", "llama-2-7b", "LLaMA-2-7B fp16, the paper's model (fits on every slice)"),
    ("memory-tight", "llama-2-13b", "LLaMA-2-13B fp16 (too large for a 20 GB slice)"),
)
#: The Azure code trace's mean arrival rate (paper §4.2), requests/s.
TRACE_RATE_PER_S = 2.57
SETTINGS = (
    ("trace ×4 speed", 0.25, "trace compressed 4× (about the paper's offered load)"),
    ("trace as recorded", 1.0, "trace at its own timestamps (light load in our τ model)"),
)


WHY = """* **Reproduced:** PETALS is by far the worst in every setting, and the proposed method's waiting
  time is a small part of its response time. In the memory-tight regime at the paper's offered load
  (trace ×4), the proposed method is the lowest of the four and beats JFFC-only (by more than the
  paper's 27 %), because it composes chains; see the 'order' lines above for each setting.
  **Not reproduced:** the absolute times (our τ model gives 1.5–3.5 s of service where the paper
  measured 6.7–8.5 s), the paper's c* = 35, its gain over JFFC-only in the memory-loose regime (there the planner
  picks the JFFC-only layout, so the two coincide), its gain over BPRR (63 %; ours is far smaller, and
  BPRR is lower than the proposed method where the load is light and its per-request fastest path wins),
  and its gain over PETALS (ours is far larger, next point).
* **Memory-loose: JFFC-only = proposed.** LLaMA-2-7B (12.96 GB) fits on every slice with room for cache,
  and the c-search's best plan (c* = 1) is one whole-model chain per server — the JFFC-only layout. The
  paper's testbed chose c* = 35 with multi-server chains; its cache sizes and measured per-block times
  are not given, so its memory regime cannot be rebuilt from the paper.
* **Memory-tight: what chain composition adds.** With LLaMA-2-13B only the three 40 GB slices hold the
  model; JFFC-only serves on them alone (ν = 9.45/s, below the ×4 trace's 10.28/s), while the proposed
  plan also builds chains of two 20 GB slices (and of a 20 GB and a 40 GB slice), adding job servers.
  At the paper's offered load this is the difference between a stable and an overloaded system.
* **PETALS is far worse than in the paper.** PETALS sets aside its autograd reserve and cache for 4096
  tokens per block, room for one 2076-token session per block (4096/2076 = 1.97); a request waits at the server
  it was routed to (no central queue), and when every server is busy the min-latency route sends the
  whole burst to the fastest server (+10 s penalty everywhere), where it queues while other servers free
  up. The Azure trace is bursty, so the queue at that server explodes. Real PETALS clients time out
  (alloc timeout) and retry with backoff, which would spread such bursts; that retry loop is not modelled.
* **BPRR is close to the proposed method when memory is loose**: with whole-model spans, WS-RR's
  expected-wait routing behaves like a central queue at this load."""


def _plot(measured: dict[str, dict[str, dict[str, float]]], path: Path, num_jobs: int, num_seeds: int) -> None:
    """Grouped bars (linear axis) of the mean response time per method: one panel per regime with our
    two settings, and the paper's testbed. Bars taller than the panel are cut and labelled."""
    panels = {
        **{f"{regime} (simulated)": groups for regime, groups in measured.items()},
        "paper (testbed)": {"LLaMA-2-7B": {m: PAPER[m][0] for m in METHODS}},
    }
    fig = Figure(figsize=(12, 4.2))
    axes = fig.subplots(1, len(panels))
    for ax, (title, groups) in zip(axes, panels.items(), strict=True):
        values = [v for means in groups.values() for v in means.values()]
        usual = [v for v in values if v <= 5 * float(np.median(values))]
        top = max(values) * 1.15 if len(usual) == len(values) else max(usual) * 1.5  # cut runaway bars
        width = 0.8 / len(groups)
        for g, (label, means) in enumerate(groups.items()):
            xs = [i + (g - (len(groups) - 1) / 2) * width for i in range(len(METHODS))]
            heights = [means[m] for m in METHODS]
            bars = ax.bar(xs, [min(h, top) for h in heights], width, label=label)
            ax.bar_label(bars, labels=[f"{h:.1f}" + ("↑" if h > top else "") for h in heights], fontsize=7)
        ax.set_xticks(range(len(METHODS)), METHODS, fontsize=8)
        ax.set(ylim=(0, top * 1.1), title=title, ylabel="mean response time (s)")
        ax.grid(alpha=0.3, axis="y")
        ax.legend(fontsize=7)
    fig.suptitle(f"Table 1: MIG testbed, {num_jobs} Azure code requests, {num_seeds} seed(s) (↑: bar cut, value above)")
    save_figure(fig, path)


def _avg(summaries, metric) -> float:
    return sum(metric(x) for x in summaries) / len(summaries)


def _table(problem, time_scale: float, num_seeds: int, num_jobs: int, tick) -> tuple[list, dict[str, float]]:
    rows, means = [], {}
    for method in METHODS:
        reps = []
        for seed in range(num_seeds):
            reps.append(run_method(problem, method, seed, num_jobs, TraceArrivals(time_scale=time_scale), "token"))
            tick()
        s = [r.summary for r in reps]
        response = mean_ci([x.response.mean_s for x in s])
        means[method] = response.mean
        rows.append(
            [
                method,
                f"{response.mean:.2f} ± {response.half_width:.2f}",
                f"{_avg(s, lambda x: x.response.p95_s):.2f} / {_avg(s, lambda x: x.response.p99_s):.2f}",
                _avg(s, lambda x: x.waiting.mean_s),
                _avg(s, lambda x: x.service.mean_s),
                "{:.1f} / {:.1f} / {:.1f} / {:.1f} / {:.1f}".format(*PAPER[method]),
            ]
        )
    return rows, means


def _plan_section(problem, plan: Plan) -> list[str]:
    chains = [
        [k, " → ".join(problem.servers[s].name for s in ch.servers), ch.service_time_s, ch.capacity]
        for k, ch in enumerate(plan.chains)
    ]
    return [
        f"Proposed plan (λ = {problem.arrival_rate_per_s:.2f}/s): c* = {plan.c}, {len(plan.chains)} chains, "
        f"{plan.num_job_servers} job servers, ν = {plan.total_rate_per_s:.2f}/s.",
        markdown_table(["chain", "servers", "T_k (s)", "c_k"], chains),
    ]


def _reductions(means: dict[str, float]) -> str:
    ranked = sorted(METHODS, key=lambda m: means[m])
    order = ranked[0] + "".join(
        (" = " if means[b] == means[a] else " < ") + b for a, b in zip(ranked, ranked[1:], strict=False)
    )
    return (
        "Reduction of the proposed method's mean response time: "
        + "; ".join(
            f"vs {m}: {pct(reduction_pct(means['proposed'], means[m]))} (paper {pct(PAPER_REDUCTION[m])})"
            for m in ("petals", "bprr", "jffc-only")
        )
        + f". Order of mean response (lowest first): {order} "
        "(paper: proposed < jffc-only < bprr < petals)."
    )


def table1(out_dir: Path, num_seeds: int = 5, num_jobs: int = 1000) -> Path:
    """Write ``table1.md`` and ``table1.png``."""
    header = [
        "method",
        "mean response (s)",
        "P95 / P99 (s)",
        "mean waiting (s)",
        "mean service (s)",
        "paper: mean / P95 / P99 / waiting / service",
    ]
    sections = [
        f"Command: `chainserve experiment table1 --seeds {num_seeds} --requests {num_jobs}`. "
        f"Seeds 0..{num_seeds - 1} vary PETALS' join order and the dispatchers' coins (the trace and "
        "token-level service are deterministic); mean ± 95 % CI over seeds. Reductions are "
        "1 − proposed/baseline of the mean response time (positive: the proposed method is lower). "
        "Two memory regimes of the same testbed shape (3× 3g.40gb + 6× 2g.20gb): "
        + "; ".join(f"**{short}**: {text}" for short, _, text in REGIMES)
        + "."
    ]
    measured: dict[str, dict[str, dict[str, float]]] = {}
    with progress_bar() as bar:
        task = bar.add_task("table 1", total=len(REGIMES) * len(SETTINGS) * len(METHODS) * num_seeds)
        for short, model, text in REGIMES:
            measured[short] = {}
            sections.append(f"## {short}: {text}")
            for label, time_scale, long in SETTINGS:
                # every method plans for the rate it will see: the trace's mean rate, scaled
                problem = paper_testbed(arrival_rate=TRACE_RATE_PER_S / time_scale, model=model)
                rows, means = _table(problem, time_scale, num_seeds, num_jobs, lambda: bar.advance(task))
                measured[short][label] = means
                sections += [
                    f"### {long}",
                    *_plan_section(problem, search_c(problem)),
                    markdown_table(header, rows),
                    _reductions(means),
                ]
    _plot(measured, out_dir / "table1.png", num_jobs, num_seeds)
    sections += ["![table 1](table1.png)", "## What is and is not reproduced, and why", WHY]
    return write_report(
        out_dir, "table1", "Table 1 in simulation: MIG testbed, Azure code trace, two memory regimes", sections
    )
