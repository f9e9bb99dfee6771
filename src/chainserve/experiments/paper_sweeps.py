"""The paper's model-driven simulation sweeps (paper §4.1): proposed vs PETALS vs BPRR.

J ∈ {10, 20, 30, 40} at η = 0.2 and η ∈ {0.1, 0.2, 0.3, 0.4} at J = 20; λ = 0.2/s, ρ̄ = 0.7; each
point averages ``num_seeds`` replications of ``num_jobs`` requests (Poisson arrivals, exponential
service as in the paper's model), with the proposed plan's Theorem-4 bounds overlaid.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure

from chainserve.experiments.common import (
    markdown_table,
    mean_ci,
    progress_bar,
    reduction_pct,
    save_figure,
    write_report,
)
from chainserve.model.presets import paper_sim_cluster
from chainserve.sim.runs import run_method

METHODS = ("proposed", "petals", "bprr")
PAPER_REDUCTION = "8–83 %"


@dataclass(frozen=True, slots=True)
class Point:
    """One sweep point: mean response time per method over seeds, and the proposed plan's bounds."""

    num_servers: int
    eta: float
    means: dict[str, list[float]]
    bounds: list[tuple[float, float]]


def run_point(num_servers: int, eta: float, seeds: range, num_jobs: int, tick) -> Point:
    means: dict[str, list[float]] = {m: [] for m in METHODS}
    bounds = []
    for seed in seeds:
        problem = paper_sim_cluster(num_servers, eta, np.random.default_rng(seed))
        for method in METHODS:
            rep = run_method(problem, method, seed, num_jobs)
            means[method].append(rep.summary.response.mean_s)
            if rep.bounds is not None:
                bounds.append(rep.bounds)
            tick()
    return Point(num_servers, eta, means, bounds)


def _rows(points: list[Point], key: str) -> list[list[object]]:
    rows = []
    for p in points:
        ci = {m: mean_ci(p.means[m]) for m in METHODS}
        lo, up = np.mean([b[0] for b in p.bounds]), np.mean([b[1] for b in p.bounds])
        wins = sum(a < b and a < c for a, b, c in zip(*(p.means[m] for m in METHODS), strict=True))
        rows.append([getattr(p, key)]
                    + [f"{ci[m].mean:.2f} ± {ci[m].half_width:.2f}" for m in METHODS]
                    + [f"[{lo:.2f}, {up:.2f}]",
                       f"{reduction_pct(ci['proposed'].mean, ci['petals'].mean):.1f} %",
                       f"{reduction_pct(ci['proposed'].mean, ci['bprr'].mean):.1f} %",
                       f"{wins}/{len(p.means['proposed'])}"])
    return rows


def _plot(ax, points: list[Point], key: str, label: str) -> None:
    xs = [getattr(p, key) for p in points]
    for method, colour in zip(METHODS, ("tab:green", "tab:red", "tab:blue"), strict=True):
        cis = [mean_ci(p.means[method]) for p in points]
        ax.errorbar(xs, [c.mean for c in cis], yerr=[c.half_width for c in cis], marker="o", capsize=3,
                    color=colour, label=method)
    lows = [np.mean([b[0] for b in p.bounds]) for p in points]
    ups = [np.mean([b[1] for b in p.bounds]) for p in points]
    ax.fill_between(xs, lows, ups, color="tab:green", alpha=0.2, label="proposed: Theorem-4 bounds")
    ax.set_xlabel(label)
    ax.set_ylabel("mean response time (s)")
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)


def paper_sweeps(out_dir: Path, num_seeds: int = 20, num_jobs: int = 300) -> Path:
    """Run both sweeps, write ``paper_sweeps.md`` and ``paper_sweeps.png`` under ``out_dir``."""
    seeds = range(num_seeds)
    grid_j = [(j, 0.2) for j in (10, 20, 30, 40)]
    grid_eta = [(20, eta) for eta in (0.1, 0.2, 0.3, 0.4)]
    with progress_bar() as bar:
        task = bar.add_task("paper sweeps", total=(len(grid_j) + len(grid_eta)) * num_seeds * len(METHODS))
        tick = lambda: bar.advance(task)  # noqa: E731
        by_j = [run_point(j, eta, seeds, num_jobs, tick) for j, eta in grid_j]
        by_eta = [run_point(j, eta, seeds, num_jobs, tick) for j, eta in grid_eta]
    header = ["{}", *(f"{m} mean (s)" for m in METHODS), "bounds (s)", "vs PETALS", "vs BPRR", "ours lowest"]
    fig = Figure(figsize=(11, 4.2))
    axes = fig.subplots(1, 2)
    _plot(axes[0], by_j, "num_servers", "servers J (η = 0.2)")
    _plot(axes[1], by_eta, "eta", "fraction of high servers η (J = 20)")
    fig.suptitle(f"Mean response time, λ = 0.2/s, {num_seeds} seeds × {num_jobs} requests (95 % CI)")
    save_figure(fig, out_dir / "paper_sweeps.png")
    sections = [
        f"Command: `chainserve experiment paper-sweeps --seeds {num_seeds} --requests {num_jobs}`. Seeds "
        f"0..{num_seeds - 1}; mean ± 95 % CI over seeds; reductions are of the proposed method's mean response "
        f"time (the paper reports {PAPER_REDUCTION} against PETALS and BPRR). 'ours lowest' counts the seeds "
        "where the proposed method beat both baselines on the same cluster and draws.",
        "## Varying the number of servers (η = 0.2)",
        markdown_table([header[0].format("J"), *header[1:]], _rows(by_j, "num_servers")),
        "## Varying the fraction of high-performance servers (J = 20)",
        markdown_table([header[0].format("η"), *header[1:]], _rows(by_eta, "eta")),
        "![paper sweeps](paper_sweeps.png)",
    ]
    return write_report(out_dir, "paper_sweeps", "Paper §4.1 sweeps: proposed vs PETALS vs BPRR", sections)
