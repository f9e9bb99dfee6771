"""Greedy planner (GBP-CR + GCA + c-search, paper §2.1–§2.3) and the best planner
(``chainserve.plan.best.best_plan``) against the jointly optimal plan (``chainserve.plan.exact.optimal_plan``)
on random small clusters, scored by the §2.5 lower bound. Targets for ``best``: within 5 % of the optimum
on ≥ 95 % of the instances, mean ratio ≤ 1.02, never worse than greedy.

Instances mimic the paper's two GPU types (§4.1) at toy scale: s_m = 1 (one block's parameters),
s_c ∈ {0.25, 0.5}; "high" servers hold about 0.6–1.2 copies of the model with a few jobs, "low" ones
half that, τ^p ≈ 0.109 / 0.175 s per block (±10 %), τ^c uniform in 0.02–0.3 s per server; λ is a
random fraction of a rough cluster capacity, redrawn until the greedy planner finds a stable plan.

    python benchmarks/greedy_vs_optimal.py [--instances 200] [--seed 2026]
"""

from __future__ import annotations

import argparse
import time

import numpy as np
from rich.console import Console
from rich.progress import track

from chainserve.model.spec import ModelSpec, Problem, Server, Workload
from chainserve.plan.best import best_plan
from chainserve.plan.csearch import search_c
from chainserve.plan.exact import optimal_plan

MATCH_TOLERANCE = 1e-9


def random_cluster(rng: np.random.Generator) -> Problem:
    """J 2..4 servers, L 2..4 blocks, mixed high/low servers, λ not yet tuned (see :func:`instance`)."""
    num_blocks, num_servers = int(rng.integers(2, 5)), int(rng.integers(2, 6))
    cache_gb = float(rng.choice([0.25, 0.5]))
    high_fraction = rng.uniform(0.2, 0.5)
    servers = []
    for j in range(num_servers):
        is_high = rng.random() < high_fraction
        copies = rng.uniform(0.6, 1.2) if is_high else rng.uniform(0.3, 0.6)
        memory_gb = max(copies * 1.6 * num_blocks, 1.0 + cache_gb)
        tau_p = (0.109 if is_high else 0.175) * rng.uniform(0.9, 1.1)
        servers.append(Server(f"s{j}", float(memory_gb), float(tau_p), float(rng.uniform(0.02, 0.3))))
    return Problem(tuple(servers), ModelSpec("toy", num_blocks, 1.0, cache_gb), Workload(1.0))


def instance(rng: np.random.Generator) -> tuple[Problem, float]:
    """A cluster and a λ for which the greedy planner is stable, with the greedy plan's lower bound."""
    while True:
        cluster = random_cluster(rng)
        L, s_c = cluster.model.num_blocks, cluster.model.cache_size_gb
        jobs = max((sum(s.memory_gb for s in cluster.servers) - L) / (s_c * L), 1.0)
        service_s = 0.14 * L + 0.3
        problem = cluster.with_workload(arrival_rate_per_s=float(rng.uniform(0.05, 0.6)) * jobs / service_s)
        try:
            return problem, search_c(problem).bounds.lower_s
        except ValueError:
            continue


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--instances", type=int, default=200)
    parser.add_argument("--seed", type=int, default=2026)
    args = parser.parse_args()
    console = Console()
    console.print(f"seed = {args.seed}, instances = {args.instances}")
    rng = np.random.default_rng(args.seed)
    ratios: dict[str, list[float]] = {"greedy": [], "best": []}
    started = time.perf_counter()
    for _ in track(range(args.instances), description="greedy and best vs optimal", console=console):
        problem, greedy_s = instance(rng)
        optimal_s = optimal_plan(problem).bounds.lower_s
        ratios["greedy"].append(greedy_s / optimal_s)
        ratios["best"].append(best_plan(problem).bounds.lower_s / optimal_s)
    for name, values in ratios.items():
        r = np.array(values)
        console.print(
            f"{name} / optimal lower bound: mean {r.mean():.4f}, worst {r.max():.4f}, median "
            f"{np.median(r):.4f}; optimum matched on {int(np.sum(r <= 1 + MATCH_TOLERANCE))}, within 5 % "
            f"on {int(np.sum(r <= 1.05))} of {len(r)} instances"
        )
    greedy, best = np.array(ratios["greedy"]), np.array(ratios["best"])
    worse = int(np.sum(best > greedy * (1 + MATCH_TOLERANCE)))
    met = np.mean(best <= 1.05) >= 0.95 and best.mean() <= 1.02 and worse == 0
    console.print(
        f"best worse than greedy on {worse} instances; targets (≥ 95 % within 5 %, mean ≤ 1.02, never "
        f"worse): {'met' if met else 'MISSED'} ({time.perf_counter() - started:.1f} s)"
    )
    if min(greedy.min(), best.min()) < 1 - MATCH_TOLERANCE:
        raise SystemExit("error: a heuristic plan beat the 'optimal' one")


if __name__ == "__main__":
    main()
