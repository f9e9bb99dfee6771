"""Response time and bounds versus the cache reservation c, and the chosen c versus λ (paper §2.3).

Cluster: the paper's simulated cluster, J = 20, η = 0.2 (``examples/paper-sim-bloom-20.yaml``).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from matplotlib.figure import Figure

from chainserve.dispatch.jffc import JFFC
from chainserve.experiments.common import markdown_table, mean_ci, save_figure, write_report
from chainserve.model.presets import paper_sim_cluster
from chainserve.plan.csearch import max_reservation, plan_for_c, search_c
from chainserve.progress import progress_bar
from chainserve.sim.engine import simulate


def c_sweep(out_dir: Path, num_seeds: int = 5, num_jobs: int = 5000, num_rates: int = 12) -> Path:
    """Write ``c_sweep.md`` and ``c_sweep.png``."""
    problem = paper_sim_cluster(20, 0.2, np.random.default_rng(2026))
    c_max = max_reservation(problem)
    rows, cs, sims, lows, ups = [], [], [], [], []
    with progress_bar() as bar:
        task = bar.add_task("c sweep", total=c_max + num_rates)
        for c in range(1, c_max + 1):
            bar.advance(task)
            result = plan_for_c(problem, c)
            if result is None:
                continue
            placed, plan = result
            if not plan.is_stable:
                rows.append([c, placed.num_chains, len(plan.chains), plan.num_job_servers, "unstable", "–", "–"])
                continue
            means = [
                simulate(
                    plan, JFFC(plan.chains), seed=s, num_jobs=num_jobs, warmup=num_jobs // 10
                ).summary.response.mean_s
                for s in range(num_seeds)
            ]
            ci = mean_ci(means)
            cs.append(c)
            sims.append(ci)
            lows.append(plan.bounds.lower_s)
            ups.append(plan.bounds.upper_s)
            rows.append(
                [
                    c,
                    placed.num_chains,
                    len(plan.chains),
                    plan.num_job_servers,
                    plan.bounds.lower_s,
                    plan.bounds.upper_s,
                    f"{ci.mean:.2f} ± {ci.half_width:.2f}",
                ]
            )
        chosen = {"lower": search_c(problem, "lower").c, "surrogate": search_c(problem, "surrogate").c}
        saturated = problem.with_workload(arrival_rate_per_s=1e6)  # GBP-CR then places every server
        top = 0.95 * max(
            r[1].total_rate_per_s for c in range(1, c_max + 1) if (r := plan_for_c(saturated, c)) is not None
        )
        rate_grid = np.linspace(0.05, top, num_rates)
        by_rate = []
        for rate in rate_grid:
            bar.advance(task)
            p = problem.with_workload(arrival_rate_per_s=float(rate))
            try:
                by_rate.append([float(rate), search_c(p, "lower").c, search_c(p, "surrogate").c])
            except ValueError:
                by_rate.append([float(rate), "none stable", "none stable"])
    fig = Figure(figsize=(11, 4.2))
    ax, bx = fig.subplots(1, 2)
    ax.errorbar(
        cs,
        [c.mean for c in sims],
        yerr=[c.half_width for c in sims],
        marker="o",
        capsize=3,
        label="simulated JFFC (95 % CI)",
    )
    ax.fill_between(cs, lows, ups, alpha=0.25, label="Theorem-4 bounds")
    ax.axvline(chosen["lower"], color="k", ls="--", label=f"chosen c* = {chosen['lower']} (lower bound)")
    ax.set(
        xlabel="cache reservation c", ylabel="mean response time (s)", yscale="log", title="λ = 0.2/s, J = 20, η = 0.2"
    )
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    numeric = [r for r in by_rate if isinstance(r[1], int)]
    bx.step([r[0] for r in numeric], [r[1] for r in numeric], where="mid", marker="o", label="lower bound")
    bx.step([r[0] for r in numeric], [r[2] for r in numeric], where="mid", marker="x", label="surrogate c·K(c)")
    bx.set(xlabel="arrival rate λ (1/s)", ylabel="chosen c", title="chosen c versus load")
    bx.legend(fontsize=8)
    bx.grid(alpha=0.3)
    save_figure(fig, out_dir / "c_sweep.png")
    sections = [
        f"Command: `chainserve experiment c-sweep --seeds {num_seeds} --requests {num_jobs}`. Paper cluster "
        f"J = 20, η = 0.2 (seed 2026), λ = 0.2/s; simulated JFFC mean ± 95 % CI over seeds 0..{num_seeds - 1} "
        f"(first {num_jobs // 10} jobs discarded). The c-search picks c* = {chosen['lower']} (lower bound) "
        f"and c = {chosen['surrogate']} (surrogate).",
        markdown_table(["c", "K(c) GBP-CR", "GCA chains", "C", "lower (s)", "upper (s)", "simulated (s)"], rows),
        "## Chosen c versus λ",
        markdown_table(["λ (1/s)", "c* (lower bound)", "c (surrogate)"], by_rate),
        "![c sweep](c_sweep.png)",
    ]
    return write_report(out_dir, "c_sweep", "Response time versus c, and c* versus λ", sections)
