"""The best planner: the paper's greedy plan (GBP-CR + GCA + c-search, spec §2.1–§2.3), improved, scored by
the Theorem-4 lower bound on the mean response time (spec §2.5) and never worse than greedy on it.

Steps, each keeping the best plan so far (:func:`chainserve.plan.complete.is_better`):

1. the greedy plan (:func:`chainserve.plan.csearch.search_c`), and GBP-CR's placement for every c
   completed by GCA *and* by the optimal allocation over the chains found
   (:func:`chainserve.plan.complete.complete`);
2. for the best few c: the variants of :func:`chainserve.plan.candidates.variant_placements` (server
   orders, walking the servers GBP-CR leaves idle, trimmed chain ends, per-server reservation levels),
   each completed likewise;
3. a local search (:mod:`chainserve.plan.local_search`) from the best few plans;
4. for J ≤ :data:`~chainserve.plan.milp_placement.MAX_MILP_SERVERS`: time-limited MILPs on placement +
   allocation over the heuristic plans' spans and chains (:mod:`chainserve.plan.milp_placement`), each
   result completed and polished by another local search.

The result is tightened (unused servers dropped, spans cut to what their chains run) and checked
(:func:`chainserve.plan.types.check_plan`). Work is bounded by evaluation counts (deterministic for a
seed) and by ``time_limit_s`` (a safety net; the MILP's own time limit makes step 4 machine-dependent).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable

import numpy as np

from chainserve.model.spec import Problem, SpecError
from chainserve.plan.candidates import variant_placements
from chainserve.plan.complete import complete, is_better, score, tighten
from chainserve.plan.csearch import candidate_plans, check_model_fits, search_c
from chainserve.plan.local_search import local_search
from chainserve.plan.milp_placement import MAX_MILP_SERVERS, milp_placements
from chainserve.plan.types import Placement, Plan, check_plan

PLANNERS = ("greedy", "best")


#: With the default limit, the whole planning (c-search included) aims to end within this (s), so that
#: the CLI answers within its 30 s promise at the largest cluster it accepts (1000 servers).
TOTAL_BUDGET_S = 25.0


def default_time_limit_s(problem: Problem, spent_s: float = 0.0) -> float:
    """Planning time allowed beyond the greedy c-search (which took ``spent_s``): 3 s up to 40 servers,
    growing to 25 s at 1000, but at least 1 s and no more than what keeps the total within
    :data:`TOTAL_BUDGET_S`."""
    wanted = 3.0 if problem.num_servers <= 40 else min(25.0, 3.0 + 0.022 * problem.num_servers)
    return min(wanted, max(1.0, TOTAL_BUDGET_S - spent_s))


def best_plan(problem: Problem, time_limit_s: float | None = None, seed: int = 0) -> Plan:
    """The best plan found by the steps of the module doc, method ``proposed`` with a note
    ``planner: best (…)``; ``c`` is the reservation level of the candidate it grew from, or ``None``
    when it came from the MILP. Never worse than :func:`search_c` by the lower bound (then the upper).

    Cost: c_max greedy plans (as :func:`search_c`) + O(J) variants per kept c, each one GCA
    (O(rounds·J·L)) and one small allocation MILP, + a budget of 40·J local-search completions (at most
    2000), + for J ≤ 36 a few MILPs, all within ``time_limit_s`` after the
    c-search (default :func:`default_time_limit_s`). Raises ``ValueError`` when no plan is stable.

    >>> from chainserve.model.spec import ModelSpec, Problem, Server, Workload
    >>> p = Problem((Server("a", 3, 1.0, 0.0), Server("b", 2, 1.0, 0.0)),
    ...             ModelSpec("toy", 2, 1.0, 0.5), Workload(0.5))
    >>> plan = best_plan(p, time_limit_s=0.5)
    >>> plan.bounds.lower_s <= search_c(p).bounds.lower_s, [(ch.servers, ch.capacity) for ch in plan.chains]
    (True, [((0, 1), 2)])
    """
    started = time.monotonic()
    check_model_fits(problem)
    rng = np.random.default_rng(seed)
    large = problem.num_servers > 200
    small = problem.num_servers <= 12  # exact allocation inside the local search too
    evaluated: dict[Placement, Plan] = {}

    def expired() -> bool:
        return time.monotonic() >= deadline

    def evaluate(placement: Placement, c: int | None = None, exact: bool = not large) -> Plan:
        if placement not in evaluated:
            evaluated[placement] = complete(problem, placement, exact, c)
        return evaluated[placement]

    by_c = sorted((plan for _, plan in candidate_plans(problem)), key=lambda p: (p.bounds.lower_s, p.c))
    greedy = by_c[0] if by_c else None  # = search_c(problem): least lower bound, then least c
    limit = default_time_limit_s(problem, time.monotonic() - started) if time_limit_s is None else time_limit_s
    deadline = time.monotonic() + limit
    best = greedy
    pool: list[Plan] = list(by_c)

    def offer(plan: Plan) -> None:
        nonlocal best
        pool.append(plan)
        if is_better(plan, best):
            best = plan

    for plan in by_c[: 3 if large else len(by_c)]:
        if expired():
            break
        offer(evaluate(plan.placement, plan.c))
    levels = sorted({plan.c for plan in by_c[:4] if plan.c is not None})
    for c in levels[:2] if large else levels:
        for placement in variant_placements(problem, c, levels):
            if expired():
                break
            offer(evaluate(placement, c))
    starts = _distinct(sorted(pool, key=score), 3)
    budget = min(2000, 40 * problem.num_servers)
    for plan in starts:
        if expired():
            break
        found, _ = local_search(
            problem, plan, lambda pl, c=plan.c: evaluate(pl, c, exact=small), rng, budget // len(starts), deadline
        )
        offer(found if large or expired() else evaluate(found.placement, found.c))
    if problem.num_servers <= MAX_MILP_SERVERS and best is not None and not expired():
        milp_deadline = deadline - 0.25 * (deadline - time.monotonic())
        for placement in milp_placements(problem, _distinct(sorted(pool, key=score), 5), milp_deadline):
            plan = evaluate(placement)
            found, _ = local_search(problem, plan, lambda pl: evaluate(pl, exact=small), rng, budget // 4, deadline)
            offer(found)
    if best is None:
        raise SpecError(
            "arrival_rate",
            f"no stable plan found for λ = {problem.arrival_rate_per_s:g}/s; lower the rate or add servers",
        )
    return _finish(best, greedy, time.monotonic() - started)


def _distinct(plans: list[Plan], count: int) -> list[Plan]:
    """The first ``count`` plans with distinct placements."""
    seen: dict[Placement, Plan] = {}
    for plan in plans:
        seen.setdefault(plan.placement, plan)
        if len(seen) == count:
            break
    return list(seen.values())


def _finish(best: Plan, greedy: Plan | None, elapsed_s: float) -> Plan:
    """Tightened, checked, with its note; the greedy plan itself when nothing beat it."""
    if best is greedy:
        plan = greedy
    else:
        plan = tighten(best)
        check_plan(plan)
        if greedy is not None and is_better(greedy, plan):  # tightening never changes the bounds
            plan = greedy
    gain = "" if greedy is None else f", lower bound {plan.bounds.lower_s / greedy.bounds.lower_s - 1:+.1%} vs greedy"
    note = f"planner: best ({elapsed_s:.1f} s{gain})"
    return dataclasses.replace(plan, method="proposed", notes=(*plan.notes, note))


def plan_with(planner: str, problem: Problem) -> Plan:
    """``greedy``: :func:`search_c` (the paper); ``best``: :func:`best_plan`."""
    planners: dict[str, Callable[[Problem], Plan]] = {"greedy": search_c, "best": best_plan}
    if planner not in planners:
        raise ValueError(f"planner must be one of {', '.join(PLANNERS)}, got {planner!r}")
    return planners[planner](problem)
