"""Planning time of GBP-CR + GCA (one c), of the full c-search (paper §2.1–§2.3, planner ``greedy``) and
of the best planner (``chainserve.plan.best.best_plan``) for J = 10, 40, 100, 1000 servers of the
paper's §4.1 kind: BLOOM-176B in NF4, 30 % "high" 40 GB and 70 % "low" 20 GB MIG
slices (``presets.paper_sim_cluster``).

The load is chosen to use most servers: λ = 0.8·ρ̄·ν_all, where ν_all is the largest rate GBP-CR
promises over c when it walks every server (λ so large that it never stops early). Targets on a
2-core machine: one c at J = 1000 under 1 s, the full c-search at J = 1000 under 60 s, the best
planner at J = 40 under 5 s and, on every instance, within its 25 s safety net (``TOTAL_BUDGET_S``)
without the net firing (work limits, not the clock, end the search: issue 19).

Then the embedded default cluster (``chainserve plan`` with no file) and a random batch (``--random N``,
default 20): J uniform on 2..40, half of them the §4.1 kind and half raw instances like issue 19's
(L = 32, s_m = 0.24 GB, s_c = 0.03 GB, 1–3 GB servers), λ a random fraction 0.05..0.9 of ρ̄·ν_all.
Each row shows ``best`` against ``greedy`` (wall time, lower bound); issue 32's targets: ``best`` at
most 4 s on the default cluster and at most 8× greedy's time, never the safety net. ``--record FILE``
writes the lower bounds per instance (run it once against an older checkout), ``--baseline FILE``
prints them beside this run's and says where the plan got worse. ``benchmarks/data/planning-time-main-
lower.json``: main's before issue 32 (commit c7d13a9, run to its work limits with no safety net).

    python benchmarks/planning_time.py [--sizes 10 40 100 1000] [--seed 7] [--random 20]
                                       [--record lower.json | --baseline lower.json]
    python benchmarks/planning_time.py --sizes --baseline benchmarks/data/planning-time-main-lower.json
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.table import Table

from chainserve.cli.plan_cmd import DEFAULT_CLUSTER
from chainserve.model.cluster_file import load_cluster
from chainserve.model.presets import paper_sim_cluster
from chainserve.model.spec import ModelSpec, Problem, Server, Workload
from chainserve.plan.best import TOTAL_BUDGET_S, best_plan
from chainserve.plan.csearch import max_reservation, plan_for_c, search_c
from chainserve.plan.gbp_cr import gbp_cr

HIGH_FRACTION = 0.3
LOAD_FRACTION = 0.8
TARGETS_S = {"one c": 1.0, "c-search": 60.0, "best": TOTAL_BUDGET_S}  # at J = 1000
BEST_TARGET_J40_S = 5.0
DEFAULT_TARGET_S = 4.0
TIMES_GREEDY = 8.0


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


def batch_report(count: int, seed: int, baseline: dict[str, float], console: Console) -> dict[str, float]:
    """``best`` against ``greedy`` on the default cluster and :func:`random_batch`: a table, the targets
    of the module doc and, with a ``baseline``, the instances whose lower bound got worse. Returns the
    lower bounds by instance."""
    table = Table(title=f"best vs greedy: default cluster and {count} random instances (seed {seed})")
    for column in ("instance", "J", "λ (1/s)", "greedy (s)", "best (s)", "× greedy", "evaluations", "MILP nodes"):
        table.add_column(column, justify="right")
    for column in ("cut short", "greedy lower", "best lower", "baseline lower"):
        table.add_column(column, justify="right")
    named = [("default", load_cluster(DEFAULT_CLUSTER))]
    named += [(f"random-{i}", problem) for i, problem in enumerate(random_batch(count, seed))]
    lowers: dict[str, float] = {}
    worst_ratio, cut, worse = (0.0, ""), 0, []
    for name, problem in named:
        greedy_s = best_time_s(lambda p=problem: search_c(p), 3)
        greedy = search_c(problem)
        started = time.perf_counter()
        plan = best_plan(problem)
        best_s = time.perf_counter() - started
        report = plan.search
        assert report is not None
        lowers[name] = plan.bounds.lower_s
        old = baseline.get(name)
        if old is not None and plan.bounds.lower_s > old * (1 + 1e-9):
            worse.append(name)
        if name == "default":
            verdict = "met" if best_s <= DEFAULT_TARGET_S else "MISSED"
            console.print(f"default cluster best: {best_s:.2f} s, target ≤ {DEFAULT_TARGET_S:g} s: {verdict}")
        worst_ratio = max(worst_ratio, (best_s / greedy_s, name))
        cut += report.cut_short
        table.add_row(
            name,
            str(problem.num_servers),
            f"{problem.arrival_rate_per_s:.3g}",
            f"{greedy_s:.3f}",
            f"{best_s:.2f}",
            f"{best_s / greedy_s:.0f}",
            str(report.num_evaluations),
            str(report.num_milp_nodes),
            "yes" if report.cut_short else "no",
            f"{greedy.bounds.lower_s:.6f}",
            f"{plan.bounds.lower_s:.6f}",
            "" if old is None else f"{old:.6f}",
        )
    console.print(table)
    verdict = "met" if worst_ratio[0] <= TIMES_GREEDY else "MISSED"
    console.print(
        f"worst best/greedy time: {worst_ratio[0]:.0f}× ({worst_ratio[1]}), target ≤ {TIMES_GREEDY:g}×: {verdict}"
    )
    console.print(f"safety net fired on {cut} of {len(named)} (target: never)")
    if baseline:
        console.print(f"lower bound worse than the baseline on: {', '.join(worse) or 'none'}")
    return lowers


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
    parser.add_argument("--sizes", type=int, nargs="*", default=[10, 40, 100, 1000])
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--random", type=int, default=20, help="random instances after the sizes (0: none)")
    parser.add_argument("--record", type=Path, help="write the batch's lower bounds (JSON) here")
    parser.add_argument("--baseline", type=Path, help="lower bounds (JSON) of --record to compare with")
    args = parser.parse_args()
    console = Console(width=170)
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
    if args.sizes:
        console.print(table)
    baseline = json.loads(args.baseline.read_text(encoding="utf-8")) if args.baseline else {}
    lowers = batch_report(args.random, args.seed, baseline, console)
    if args.record:
        args.record.write_text(json.dumps(lowers, indent=1) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
