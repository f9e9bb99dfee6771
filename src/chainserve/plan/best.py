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
4. :attr:`~chainserve.plan.budget.WorkLimits.polish_rounds` local searches from the best plan, each
   allowed a few moves across ties (plateaus: a server added that no chain uses yet).

Only small clusters (J ≤ :data:`MAX_MILP_SERVERS`) run MILPs: the allocation MILP inside a completion
(:func:`chainserve.plan.complete.complete`), for placements near the best plan so far; on larger ones a
completion is GCA and the small branch and bound. Issue 32: on the 20-server default cluster the MILPs
were 13 of 15 s and, on its batch of 20 random clusters of 2–40 servers, the ν-maximal allocation never
beat GCA there, while more local search (steps 3 and 4) found plans as good or better by the lower bound.
The placement MILPs (joint placement + allocation over a pool of spans and chains) that once followed
step 3 were dropped for the same reason: on that batch's clusters of ≤ 12 servers and on the 20 seeds
of the 10-server §4.1 sweep they were 40–70 % of a run and never gave a better plan.

The result is tightened (unused servers dropped, spans cut to what their chains run) and checked
(:func:`chainserve.plan.types.check_plan`). Work is bounded by counts (:class:`~chainserve.plan.budget.
WorkLimits`: completions, MILP nodes), so a problem and a seed give one plan on any machine; the whole
run, c-search included, also stops at ``time_limit_s`` (a safety net every step and every MILP gets
the rest of), and the plan's :class:`~chainserve.plan.types.SearchReport` says whether it fired.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable

import numpy as np

from chainserve.model.spec import Problem, SpecError
from chainserve.plan.budget import Budget, WorkLimits
from chainserve.plan.candidates import variant_placements
from chainserve.plan.complete import complete, is_better, score, tighten
from chainserve.plan.csearch import BoundsMemo, candidate_plans, check_model_fits, search_c
from chainserve.plan.local_search import local_search
from chainserve.plan.types import Placement, Plan, SearchReport, check_plan

PLANNERS = ("greedy", "best")

#: The safety net of one run (s), c-search included: ``chainserve plan`` answers within 30 s (loading
#: and printing take the rest) on every cluster it accepts (up to 1000 servers).
TOTAL_BUDGET_S = 25.0
#: Largest cluster the allocation MILP runs on (issue 32: on larger ones it took most of a run, the
#: 20-server default cluster 13 of 15 s, and on the issue's batch it never beat GCA there).
MAX_MILP_SERVERS = 12
#: The work limits of a run unless told otherwise.
DEFAULT_LIMITS = WorkLimits()


def best_plan(
    problem: Problem, time_limit_s: float = TOTAL_BUDGET_S, seed: int = 0, limits: WorkLimits = DEFAULT_LIMITS
) -> Plan:
    """The best plan found by the steps of the module doc within ``limits``, method ``proposed``, with a
    note ``planner: best (…)`` and its :attr:`~chainserve.plan.types.Plan.search` report; ``c`` is the
    reservation level of the candidate it grew from, or ``None`` when it came from the MILP. Never worse
    than :func:`search_c` by the lower bound (then the upper) unless the safety net cut the c-search.

    Cost: c_max greedy plans (as :func:`search_c`) + O(J) variants per kept c, each one GCA
    (O(rounds·J·L)) and (J ≤ 12, near the best plan) one small allocation MILP, +
    :meth:`WorkLimits.local_search_evaluations` completions (and a quarter of them per polishing round);
    MILPs share :attr:`WorkLimits.milp_nodes`; all within ``time_limit_s``. Raises ``ValueError`` when no
    plan is stable.

    >>> from chainserve.model.spec import ModelSpec, Problem, Server, Workload
    >>> p = Problem((Server("a", 3, 1.0, 0.0), Server("b", 2, 1.0, 0.0)),
    ...             ModelSpec("toy", 2, 1.0, 0.5), Workload(0.5))
    >>> plan = best_plan(p, time_limit_s=5.0)
    >>> plan.bounds.lower_s <= search_c(p).bounds.lower_s, [(ch.servers, ch.capacity) for ch in plan.chains]
    (True, [((0, 1), 2)])
    >>> plan.search.cut_short
    False
    """
    started = time.monotonic()
    check_model_fits(problem)
    large = problem.num_servers > 200
    small = problem.num_servers <= MAX_MILP_SERVERS  # MILPs, and the allocation MILP inside the local search
    budget = Budget(limits if small else dataclasses.replace(limits, allocation_milps=0), time_limit_s)
    rng = np.random.default_rng(seed)
    evaluated: dict[Placement, Plan] = {}
    memo: BoundsMemo = {}

    def evaluate(placement: Placement, c: int | None = None, exact: bool = not large) -> Plan:
        if placement not in evaluated:
            incumbent = None if best is None else best.score_s
            evaluated[placement] = complete(problem, placement, exact, c, budget, incumbent, memo)
        return evaluated[placement]

    searched = candidate_plans(problem, stop=budget.expired)
    by_c = sorted((plan for _, plan in searched), key=lambda p: (p.score_s, p.c))
    greedy = by_c[0] if by_c else None  # = search_c(problem): least lower bound, then least c
    best = greedy
    pool: list[Plan] = list(by_c)

    def offer(plan: Plan) -> None:
        nonlocal best
        pool.append(plan)
        if is_better(plan, best):
            best = plan

    for plan in by_c[: 3 if large else len(by_c)]:
        if budget.expired():
            break
        offer(evaluate(plan.placement, plan.c))
    levels = sorted({plan.c for plan in by_c[:4] if plan.c is not None})
    for c in levels[:2] if large else levels:
        for placement in variant_placements(problem, c, levels):
            if budget.expired():
                break
            offer(evaluate(placement, c))
    starts = _distinct(sorted(pool, key=score), 3)
    evaluations = limits.local_search_evaluations(problem.num_servers)
    for plan in starts:
        if budget.expired():
            break
        found, _ = local_search(
            problem,
            plan,
            lambda pl, c=plan.c: evaluate(pl, c, exact=small),
            rng,
            evaluations // len(starts),
            budget.expired,
        )
        offer(found if large or budget.expired() else evaluate(found.placement, found.c))
    for _ in range(limits.polish_rounds):
        if best is None or budget.expired():
            break
        found, _ = local_search(
            problem,
            best,
            lambda pl, c=best.c: evaluate(pl, c, exact=small),
            rng,
            evaluations // 4,
            budget.expired,
            limits.sideways_moves,
        )
        offer(found)
    if best is None:
        raise SpecError(
            "arrival_rate",
            f"no stable plan found for λ = {problem.arrival_rate_per_s:g}/s; lower the rate or add servers",
        )
    plan = _finish(best, greedy)
    report = SearchReport(
        time.monotonic() - started, time_limit_s, budget.cut_short, len(evaluated), budget.milp_nodes_used, seed
    )
    return dataclasses.replace(plan, notes=(*plan.notes, _note(plan, greedy, report)), search=report)


def _distinct(plans: list[Plan], count: int) -> list[Plan]:
    """The first ``count`` plans with distinct placements."""
    seen: dict[Placement, Plan] = {}
    for plan in plans:
        seen.setdefault(plan.placement, plan)
        if len(seen) == count:
            break
    return list(seen.values())


def _finish(best: Plan, greedy: Plan | None) -> Plan:
    """Tightened, checked, method ``proposed``; the greedy plan itself when nothing beat it."""
    if best is greedy:
        plan = greedy
    else:
        plan = tighten(best)
        check_plan(plan)
        if greedy is not None and is_better(greedy, plan):  # tightening never changes the bounds
            plan = greedy
    return dataclasses.replace(plan, method="proposed")


def _note(plan: Plan, greedy: Plan | None, report: SearchReport) -> str:
    """``planner: best (…)``: time, gain over greedy, and whether the safety net cut the search."""
    gain = "" if greedy is None else f", lower bound {plan.bounds.lower_s / greedy.bounds.lower_s - 1:+.1%} vs greedy"
    cut = f", cut short by the {report.time_limit_s:g} s time limit: best plan so far" if report.cut_short else ""
    return f"planner: best ({report.elapsed_s:.1f} s{gain}{cut})"


def plan_with(planner: str, problem: Problem) -> Plan:
    """``greedy``: :func:`search_c` (the paper); ``best``: :func:`best_plan`."""
    planners: dict[str, Callable[[Problem], Plan]] = {"greedy": search_c, "best": best_plan}
    if planner not in planners:
        raise ValueError(f"planner must be one of {', '.join(PLANNERS)}, got {planner!r}")
    return planners[planner](problem)
