"""Planning time of GBP-CR + GCA (one c), of the full c-search (paper §2.1–§2.3, planner ``greedy``) and
of the best planner (``chainserve.plan.best.best_plan``) for J = 10, 40, 100, 1000 servers of the
paper's §4.1 kind: BLOOM-176B in NF4, 30 % "high" 40 GB and 70 % "low" 20 GB MIG
slices (``presets.paper_sim_cluster``).

The load is chosen to use most servers: λ = 0.8·ρ̄·ν_all, where ν_all is the largest rate GBP-CR
promises over c when it walks every server (λ so large that it never stops early). Targets on a
2-core machine: one c at J = 1000 under 1 s, the full c-search and the best planner at J = 1000 under
60 s, the best planner at J = 40 under 5 s.

    python benchmarks/planning_time.py [--sizes 10 40 100 1000] [--seed 7]
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import numpy as np
from rich.console import Console
from rich.table import Table

from chainserve.model.presets import paper_sim_cluster
from chainserve.model.spec import Problem
from chainserve.plan.best import best_plan
from chainserve.plan.csearch import max_reservation, plan_for_c, search_c
from chainserve.plan.gbp_cr import gbp_cr

HIGH_FRACTION = 0.3
LOAD_FRACTION = 0.8
TARGETS_S = {"one c": 1.0, "c-search": 60.0, "best": 60.0}  # at J = 1000
BEST_TARGET_J40_S = 5.0


def loaded_cluster(num_servers: int, seed: int) -> Problem:
    """The §4.1 cluster with λ = 0.8·ρ̄·ν_all (see the module docstring)."""
    walk_all = paper_sim_cluster(num_servers, HIGH_FRACTION, np.random.default_rng(seed), arrival_rate=1e9)
    promised = (gbp_cr(walk_all, c) for c in range(1, max_reservation(walk_all) + 1))
    nu_all = max(p.promised_rate_per_s for p in promised if p is not None)
    return walk_all.with_workload(arrival_rate_per_s=LOAD_FRACTION * walk_all.workload.rho_bar * nu_all)


def best_time_s(run: Callable[[], object], repeats: int) -> float:
    """Least wall-clock time of ``repeats`` runs."""
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        run()
        times.append(time.perf_counter() - started)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[10, 40, 100, 1000])
    parser.add_argument("--seed", type=int, default=7)
    args = parser.parse_args()
    console = Console(width=120)
    table = Table(title=f"planning time (seed {args.seed}, best of 3; c-search once at J ≥ 1000)")
    for column in (
        "J",
        "λ (1/s)",
        "c_max",
        "c*",
        "placed",
        "chains",
        "C",
        "one c (s)",
        "c-search (s)",
        "best (s)",
        "best lower / greedy",
    ):
        table.add_column(column, justify="right")
    for num_servers in args.sizes:
        problem = loaded_cluster(num_servers, args.seed)
        search_s = best_time_s(lambda p=problem: search_c(p), 1 if num_servers >= 1000 else 3)
        plan = search_c(problem)
        one_c_s = best_time_s(lambda p=problem, c=plan.c: plan_for_c(p, c), 3)
        started = time.perf_counter()
        best = best_plan(problem)
        best_s = time.perf_counter() - started
        table.add_row(
            str(num_servers),
            f"{problem.arrival_rate_per_s:.3f}",
            str(max_reservation(problem)),
            str(plan.c),
            f"{len(plan.placement.spans)}/{num_servers}",
            str(len(plan.chains)),
            str(plan.num_job_servers),
            f"{one_c_s:.3f}",
            f"{search_s:.2f}",
            f"{best_s:.2f}",
            f"{best.bounds.lower_s / plan.bounds.lower_s:.4f}",
        )
        if num_servers == 40:
            verdict = "met" if best_s < BEST_TARGET_J40_S else "MISSED"
            console.print(f"J = 40 best: {best_s:.2f} s, target < {BEST_TARGET_J40_S:g} s: {verdict}")
        if num_servers == 1000:
            for name, measured in (("one c", one_c_s), ("c-search", search_s), ("best", best_s)):
                verdict = "met" if measured < TARGETS_S[name] else "MISSED"
                console.print(f"J = 1000 {name}: {measured:.2f} s, target < {TARGETS_S[name]:g} s: {verdict}")
    console.print(table)


if __name__ == "__main__":
    main()
