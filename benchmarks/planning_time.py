"""Planning time of GBP-CR + GCA (one c), of the full c-search (paper §2.1–§2.3, planner ``greedy``) and
of the best planner (``chainserve.plan.best.best_plan``) for J = 10, 40, 100, 1000 servers of the
paper's §4.1 kind: BLOOM-176B in NF4, 30 % "high" 40 GB and 70 % "low" 20 GB MIG
slices (``presets.paper_sim_cluster``).

The load is chosen to use most servers: λ = 0.8·ρ̄·ν_all, where ν_all is the largest rate GBP-CR
promises over c when it walks every server (λ so large that it never stops early). Targets on a
2-core machine: one c at J = 1000 under 1 s, the full c-search at J = 1000 under 60 s, the best
planner at J = 40 under 5 s and, on every instance, within its 25 s safety net (``TOTAL_BUDGET_S``)
without the net firing (work limits, not the clock, end the search: issue 19).

Then a random batch (``--random N``, default 20): J uniform on 2..40, half of them the §4.1 kind and
half raw instances like issue 19's (L = 32, s_m = 0.24 GB, s_c = 0.03 GB, 1–3 GB servers), λ a
random fraction 0.05..0.9 of ρ̄·ν_all; it prints the worst best-planner time and how often the
safety net fired.

    python benchmarks/planning_time.py [--sizes 10 40 100 1000] [--seed 7] [--random 20]
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import numpy as np
from rich.console import Console
from rich.table import Table

from chainserve.model.presets import paper_sim_cluster
from chainserve.model.spec import ModelSpec, Problem, Server, Workload
from chainserve.plan.best import TOTAL_BUDGET_S, best_plan
from chainserve.plan.csearch import max_reservation, plan_for_c, search_c
from chainserve.plan.gbp_cr import gbp_cr

HIGH_FRACTION = 0.3
LOAD_FRACTION = 0.8
TARGETS_S = {"one c": 1.0, "c-search": 60.0, "best": TOTAL_BUDGET_S}  # at J = 1000
BEST_TARGET_J40_S = 5.0


def loaded(walk_all: Problem, fraction: float) -> Problem:
    """``walk_all`` (λ so large that GBP-CR walks every server) at λ = fraction·ρ̄·ν_all."""
    promised = (gbp_cr(walk_all, c) for c in range(1, max_reservation(walk_all) + 1))
    nu_all = max(p.promised_rate_per_s for p in promised if p is not None)
    return walk_all.with_workload(arrival_rate_per_s=fraction * walk_all.workload.rho_bar * nu_all)


def loaded_cluster(num_servers: int, seed: int) -> Problem:
    """The §4.1 cluster with λ = 0.8·ρ̄·ν_all (see the module docstring)."""
    walk_all = paper_sim_cluster(num_servers, HIGH_FRACTION, np.random.default_rng(seed), arrival_rate=1e9)
    return loaded(walk_all, LOAD_FRACTION)


def raw_cluster(num_servers: int, rng: np.random.Generator) -> Problem:
    """A raw instance like issue 19's: L = 32 blocks of 0.24 GB, 0.03 GB of cache per job and block,
    servers of 1–3 GB with τ^p 0.25–1 s and τ^c 0.01–0.1 s, at λ = 10⁹ (walks every server)."""
    servers = tuple(
        Server(f"s{j}", float(rng.choice([1.0, 1.5, 2.0, 2.5, 3.0])), rng.uniform(0.25, 1.0), rng.uniform(0.01, 0.1))
        for j in range(num_servers)
    )
    return Problem(servers, ModelSpec("raw", 32, 0.24, 0.03), Workload(1e9), f"raw-{num_servers}")


def random_batch(count: int, seed: int) -> list[Problem]:
    """``count`` random instances of the module doc (those that cannot hold the model are redrawn)."""
    rng = np.random.default_rng(seed)
    problems: list[Problem] = []
    while len(problems) < count:
        num_servers = int(rng.integers(2, 41))
        if len(problems) % 2:
            walk_all = raw_cluster(num_servers, rng)
        else:
            walk_all = paper_sim_cluster(num_servers, float(rng.uniform(0.1, 0.9)), rng, arrival_rate=1e9)
        if gbp_cr(walk_all, 1) is not None:
            problems.append(loaded(walk_all, float(rng.uniform(0.05, 0.9))))
    return problems


def random_batch_report(count: int, seed: int, console: Console) -> None:
    """Best-planner times over :func:`random_batch`: a table, the worst time and the safety-net count."""
    table = Table(title=f"best planner on {count} random instances (seed {seed})")
    for column in ("kind", "J", "L", "λ (1/s)", "c*", "best (s)", "evaluations", "MILP nodes", "cut short"):
        table.add_column(column, justify="right")
    worst, cut = (0.0, ""), 0
    for problem in random_batch(count, seed):
        greedy = search_c(problem)
        plan = best_plan(problem)
        report = plan.search
        assert report is not None
        kind = "raw" if problem.model.name == "raw" else "§4.1"
        label = f"{kind} J = {problem.num_servers}, λ = {problem.arrival_rate_per_s:.3g}/s"
        worst = max(worst, (report.elapsed_s, label))
        cut += report.cut_short
        table.add_row(
            kind,
            str(problem.num_servers),
            str(problem.model.num_blocks),
            f"{problem.arrival_rate_per_s:.3g}",
            str(greedy.c),
            f"{report.elapsed_s:.2f}",
            str(report.num_evaluations),
            str(report.num_milp_nodes),
            "yes" if report.cut_short else "no",
        )
    console.print(table)
    verdict = "met" if worst[0] < TOTAL_BUDGET_S and not cut else "MISSED"
    console.print(
        f"random batch: worst best-planner time {worst[0]:.2f} s ({worst[1]}); safety net fired on {cut} of "
        f"{count}; target < {TOTAL_BUDGET_S:g} s, never fired: {verdict}"
    )


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
    parser.add_argument("--random", type=int, default=20, help="random instances after the sizes (0: none)")
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
        "cut short",
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
            "yes" if best.search is not None and best.search.cut_short else "no",
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
    if args.random:
        random_batch_report(args.random, args.seed, console)


if __name__ == "__main__":
    main()
