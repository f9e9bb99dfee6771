"""Planner comparison on the paper's sweeps (paper §4.1): the proposed method (JFFC over the chains) planned
by the paper's greedy (GBP-CR + GCA + c-search) and by the best planner (``chainserve.plan.best``).

Same clusters, seeds and draws as ``paper-sweeps`` (replication s: cluster from ``default_rng(s)``,
simulation seeded by s, :mod:`chainserve.sim.runs`); λ = 0.2/s, ρ̄ = 0.7, Poisson arrivals, exponential
service. Reported per point: mean response time of each planner (mean ± 95 % CI over seeds), the
reduction, the Theorem-4 lower bounds, and how many servers each plan leaves idle; a plot of the means.
"""

from __future__ import annotations

from dataclasses import dataclass, field
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
from chainserve.model.presets import paper_sim_cluster
from chainserve.plan.types import Plan
from chainserve.progress import progress_bar
from chainserve.sim.runs import run_method

PLANNERS = ("greedy", "best")


@dataclass(frozen=True, slots=True)
class Point:
    """One sweep point: per planner, the simulated mean response, lower bound and idle servers per seed."""

    num_servers: int
    eta: float
    means: dict[str, list[float]] = field(default_factory=lambda: {p: [] for p in PLANNERS})
    lower: dict[str, list[float]] = field(default_factory=lambda: {p: [] for p in PLANNERS})
    idle: dict[str, list[int]] = field(default_factory=lambda: {p: [] for p in PLANNERS})


def run_point(num_servers: int, eta: float, seeds: range, num_jobs: int, tick) -> Point:
    point = Point(num_servers, eta)
    for seed in seeds:
        problem = paper_sim_cluster(num_servers, eta, np.random.default_rng(seed))
        for planner in PLANNERS:
            rep = run_method(problem, "proposed", seed, num_jobs, planner=planner)
            plan = rep.setup.plan_or_placement
            assert isinstance(plan, Plan)
            point.means[planner].append(rep.summary.response.mean_s)
            point.lower[planner].append(plan.bounds.lower_s)
            point.idle[planner].append(num_servers - len(plan.placement.spans))
            tick()
    return point


def _rows(points: list[Point]) -> list[list[object]]:
    rows = []
    for p in points:
        ci = {q: mean_ci(p.means[q]) for q in PLANNERS}
        no_worse = sum(b <= g for g, b in zip(p.means["greedy"], p.means["best"], strict=True))
        rows.append(
            [
                p.num_servers,
                p.eta,
                *(f"{ci[q].mean:.2f} ± {ci[q].half_width:.2f}" for q in PLANNERS),
                pct(reduction_pct(ci["best"].mean, ci["greedy"].mean)),
                *(f"{np.mean(p.lower[q]):.2f}" for q in PLANNERS),
                *(f"{np.mean(p.idle[q]):.1f}" for q in PLANNERS),
                f"{no_worse}/{len(p.means['best'])}",
            ]
        )
    return rows


def _plot(points: list[Point], path: Path) -> None:
    fig = Figure(figsize=(7, 3.5))
    ax = fig.add_subplot()
    xs = np.arange(len(points))
    for offset, (planner, colour) in zip(
        (-0.1, 0.1), zip(PLANNERS, ("tab:green", "tab:purple"), strict=True), strict=True
    ):
        cis = [mean_ci(p.means[planner]) for p in points]
        ax.errorbar(
            xs + offset,
            [c.mean for c in cis],
            yerr=[c.half_width for c in cis],
            fmt="o",
            capsize=3,
            color=colour,
            label=planner,
        )
    ax.set_xticks(xs, [f"J={p.num_servers}\nη={p.eta:g}" for p in points])
    ax.set_ylabel("mean response time (s)")
    ax.legend()
    save_figure(fig, path)


def planner_comparison(out_dir: Path, num_seeds: int = 20, num_jobs: int = 300) -> Path:
    """Run the J and η sweeps with both planners; write ``planners.md`` under ``out_dir``."""
    seeds = range(num_seeds)
    grid = [(j, 0.2) for j in (10, 20, 30, 40)] + [(20, eta) for eta in (0.1, 0.3, 0.4)]
    with progress_bar() as bar:
        task = bar.add_task("planners", total=len(grid) * num_seeds * len(PLANNERS))
        points = [run_point(j, eta, seeds, num_jobs, lambda: bar.advance(task)) for j, eta in grid]
    header = [
        "J",
        "η",
        "greedy mean (s)",
        "best mean (s)",
        "reduction",
        "greedy lower (s)",
        "best lower (s)",
        "greedy idle servers",
        "best idle servers",
        "best ≤ greedy (seeds)",
    ]
    overall_g = np.mean([m for p in points for m in p.means["greedy"]])
    overall_b = np.mean([m for p in points for m in p.means["best"]])
    sections = [
        f"Command: `chainserve experiment planners --seeds {num_seeds} --requests {num_jobs}`. Seeds "
        f"0..{num_seeds - 1}, the clusters and draws of `paper-sweeps`; mean ± 95 % CI over seeds. `greedy`: "
        "the paper's GBP-CR + GCA + c-search; `best`: `chainserve.plan.best.best_plan` (the greedy plan "
        "improved: servers GBP-CR leaves idle, placement variants, local search, MILP), both under JFFC. "
        "'reduction' is of best's mean response time against greedy's; 'idle servers' are those a plan "
        "leaves without blocks (mean over seeds).",
        markdown_table(header, _rows(points)),
        f"Over all {len(points) * num_seeds} runs: greedy {overall_g:.2f} s, best {overall_b:.2f} s "
        f"({pct(reduction_pct(overall_b, overall_g))} lower).",
    ]
    _plot(points, out_dir / "planners.png")
    sections.append("![planners](planners.png)")
    return write_report(out_dir, "planners", "Planners on the paper's §4.1 sweeps: greedy vs best", sections)
