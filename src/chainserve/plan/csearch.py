"""Assemble plans and choose the cache-reservation level c (paper §2.3)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import replace
from typing import Literal

from chainserve.analysis.bounds import Bounds, response_time_bounds
from chainserve.model.spec import Problem, SpecError
from chainserve.plan.gbp_cr import GbpCrResult, blocks_with_reservation, gbp_cr
from chainserve.plan.gca import gca
from chainserve.plan.loaded import loaded_bounds
from chainserve.plan.types import Chain, Placement, Plan, chain_time_s, jobs_that_fit

Objective = Literal["lower", "surrogate"]


#: Bounds already computed in one planning run, by (chain rates, capacities) fastest first: many
#: placements give chains of the same rates and capacities (issue 32: half of the best planner's on
#: the default cluster), and the §2.5 bounds depend on nothing else for one problem.
BoundsMemo = dict[tuple[tuple[float, ...], tuple[int, ...]], Bounds]


def make_plan(
    problem: Problem,
    placement: Placement,
    chains: tuple[Chain, ...],
    c: int | None,
    method: str = "proposed",
    memo: BoundsMemo | None = None,
) -> Plan:
    """A plan with chains sorted fastest first and its §2.5 bounds (batch-aware ones and the
    load-dependent estimate when the problem has step costs: :mod:`.loaded`); ``memo``: bounds of
    this problem computed before, looked up and filled in."""
    chains = tuple(sorted(chains, key=lambda ch: ch.service_time_s))
    if problem.batch_aware or problem.head_cost is not None:
        bounds, estimate = loaded_bounds(problem, chains)
        return Plan(problem, placement, chains, c, bounds, method, estimate_s=estimate)
    key = (tuple(ch.rate_per_s for ch in chains), tuple(ch.capacity for ch in chains))
    bounds = None if memo is None else memo.get(key)
    if bounds is None:
        bounds = response_time_bounds(problem.arrival_rate_per_s, list(key[0]), list(key[1]))
        if memo is not None:
            memo[key] = bounds
    return Plan(problem, placement, chains, c, bounds, method)


def capped_plans(plan: Plan) -> Iterator[Plan]:
    """With step costs (issue 18): the plan with every chain's capacity capped at 1, 2, 4, … below
    its largest. A batching server slows every job it holds, and JFFC fills the fastest chain first,
    so running fewer jobs per chain can beat filling memory; the stable ones are yielded."""
    most = max((ch.capacity for ch in plan.chains), default=0)
    cap = 1
    while cap < most:
        chains = tuple(replace(ch, capacity=min(ch.capacity, cap)) for ch in plan.chains)
        capped = make_plan(plan.problem, plan.placement, chains, plan.c, plan.method)
        if capped.is_stable:
            yield capped
        cap *= 2


def max_reservation(problem: Problem) -> int:
    """c_max = max_j ⌊(M_j − s_m,j)/s_c,j⌋: more than this and no server can hold one block."""
    return max(
        jobs_that_fit(s.memory_gb - problem.block_size_gb(j), problem.cache_size_gb(j))
        for j, s in enumerate(problem.servers)
    )


def allocate(problem: Problem, placed: GbpCrResult, greedy: tuple[Chain, ...]) -> tuple[Chain, ...]:
    """GCA's chains ``greedy`` for GBP-CR's placement — unless their ν falls below the rate GBP-CR
    promised. §2.2 argues that cannot happen, but GCA is greedy and it can (a 3-server case in
    tests/test_planner_hand.py: the fastest path takes memory two of GBP-CR's chains needed). Then
    GBP-CR's own K(c) chains keep capacity c and GCA fills the memory they leave, so ν never falls
    below the promise.
    """
    if sum(ch.capacity * ch.rate_per_s for ch in greedy) >= placed.promised_rate_per_s * (1 - 1e-12):
        return greedy
    own = tuple(Chain(hops, chain_time_s(problem, hops), placed.c) for hops in placed.chains)
    return gca(problem, placed.placement, reserved=own)


def plan_for_c(problem: Problem, c: int) -> tuple[GbpCrResult, Plan] | None:
    """GBP-CR for this c, then GCA on its placement (see :func:`allocate`); ``None`` if c is
    infeasible."""
    placed = gbp_cr(problem, c)
    if placed is None:
        return None
    chains = allocate(problem, placed, gca(problem, placed.placement))
    return placed, make_plan(problem, placed.placement, chains, c)


#: The c-search tries c = 1..min(c_max, C_SEARCH_LIMIT). c_max is memory over the cache of one job
#: per block, so a tiny cache (``max_tokens: 1``) makes it millions; past a few thousand jobs reserved
#: per block the placement no longer changes with c (every server already holds what it can), so the
#: work is bounded by this range, not by the token count. ``plan --c N`` still takes any c ≤ c_max.
C_SEARCH_LIMIT = 2048


def searched_reservations(problem: Problem) -> int:
    """The largest c the search tries: min(c_max, :data:`C_SEARCH_LIMIT`)."""
    return min(max_reservation(problem), C_SEARCH_LIMIT)


def candidate_plans(
    problem: Problem, progress: Callable[[int, int], None] | None = None, stop: Callable[[], bool] | None = None
) -> Iterator[tuple[GbpCrResult, Plan]]:
    """Stable plans for c = 1..min(c_max, C_SEARCH_LIMIT) (unstable ones, λ ≥ ν, are skipped), ending
    early once one has been found and ``stop()`` says so (the best planner's safety net). GCA
    depends on the placement alone, so a placement GBP-CR repeats for another c (m_j(c) takes few
    distinct values) reuses its chains, and chains already scored reuse their bounds: same plans as
    :func:`plan_for_c`, computed once."""
    c_max = searched_reservations(problem)
    chains_of: dict[Placement, tuple[Chain, ...]] = {}
    plan_of: dict[tuple[Placement, tuple[Chain, ...]], Plan] = {}
    found = False
    for c in range(1, c_max + 1):
        if found and stop is not None and stop():
            return
        if progress is not None:
            progress(c, c_max)
        placed = gbp_cr(problem, c)
        if placed is None:
            continue
        if placed.placement not in chains_of:
            chains_of[placed.placement] = gca(problem, placed.placement)
        chains = allocate(problem, placed, chains_of[placed.placement])
        key = (placed.placement, chains)
        if key not in plan_of:
            plan_of[key] = make_plan(problem, placed.placement, chains, c)
        plan = replace(plan_of[key], c=c)
        if plan.is_stable:
            found = True
            yield placed, plan
        if plan.estimate_s is not None:
            for capped in capped_plans(plan):
                yield placed, capped


def check_model_fits(problem: Problem) -> None:
    """Raise ``SpecError`` (field ``model``) when the servers cannot hold the model even with cache
    for a single job (GBP-CR infeasible at c = 1)."""
    held = sum(blocks_with_reservation(problem, 1))
    if held < problem.model.num_blocks:
        raise SpecError(
            "model",
            f"{problem.model.name} needs {problem.model.num_blocks} blocks, but with cache "
            f"for one job the servers hold at most {held}; add servers or quantise",
        )


def search_c(
    problem: Problem, objective: Objective = "lower", progress: Callable[[int, int], None] | None = None
) -> Plan:
    """The best stable plan over c. ``lower``: least lower bound on mean response time (the paper's
    choice; with step costs, the least load-dependent estimate, :mod:`.loaded`); ``surrogate``: most
    job servers c·K(c) promised by GBP-CR (our reading of the §2.3
    surrogate: more parallel job servers, less queueing), ties by the lower bound, then smaller c.

    Raises ``ValueError`` when no c gives a stable plan.
    """

    def score(item: tuple[GbpCrResult, Plan]) -> tuple[float, ...]:
        placed, plan = item
        if objective == "lower":
            return (plan.score_s, placed.c)
        return (-placed.num_job_servers, plan.score_s, placed.c)

    if objective not in ("lower", "surrogate"):
        raise ValueError(f"objective must be 'lower' or 'surrogate', got {objective!r}")
    check_model_fits(problem)
    best = min(candidate_plans(problem, progress), key=score, default=None)
    if best is None:
        raise SpecError(
            "arrival_rate",
            f"no cache reservation c in 1..{searched_reservations(problem)} gives a stable plan "
            f"for λ = {problem.arrival_rate_per_s:g}/s; lower the rate or add servers",
        )
    return best[1]
