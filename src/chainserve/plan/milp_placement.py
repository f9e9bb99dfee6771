"""Joint placement + cache allocation as a node-limited MILP (HiGHS through ``scipy.optimize.milp``), over a
pool of candidate spans and chains: the best planner's last step for clusters of a few dozen servers.

Spec §1: server j hosts one span; chain k may run hop (j, b+1..e) only if j's span ends at e and starts
at or before b + 1; memory s_m,j·m_j + s_c,j·Σ_k m_ij(k)·c_k ≤ M_j. Variables: y_s ∈ {0,1} for every pool span
s, c_k ∈ ℕ for every pool chain k. Constraints: Σ_{s of j} y_s ≤ 1; c_k ≤ U_k·Σ_{s serving hop h} y_s for
every hop h of k (U_k: the most jobs k could take alone); memory s_c,j·Σ_k m_ij(k)·c_k ≤ Σ_{s of j}
(M_j − s_m,j·m_s)·y_s (the §1 row, and no cache without a span: a tighter relaxation). Objective: the
largest ν = Σ_k c_k/T_k (linear, since each column has a fixed T_k), among chains no slower than a
threshold T — :func:`milp_plans` solves one MILP per threshold (the §2.5 lower bound rewards fast
chains at light load and ν at heavy load), each completed and scored by the caller.

Like Helix (placement as a MILP with a max-flow objective) the model is path-free in placement and
flow-like in capacity; unlike it, columns are explicit chains, so T_k (hence ν) stays linear. The pool
comes from the heuristic plans (their spans and chains are in it, so the MILP can always return the
incumbent: that is its warm start, as ``scipy.optimize.milp`` takes no initial solution), plus spans
between the incumbent's span boundaries.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np
from scipy.optimize import Bounds as VariableBounds
from scipy.optimize import LinearConstraint, milp

from chainserve.analysis.bounds import response_time_bounds
from chainserve.model.spec import Problem
from chainserve.plan.budget import Budget
from chainserve.plan.complete import Path, fastest_paths
from chainserve.plan.local_search import most_blocks
from chainserve.plan.types import Placement, Plan, Span, chain_time_s, jobs_that_fit

#: Largest cluster the MILPs run on (this step and the allocation MILP of every completion). Issue 32:
#: on larger ones they took most of a run (the 20-server default cluster: 13 of 15 s) and, on the issue's
#: batch of 20 random clusters of 2–40 servers, local search from the best plan did as well or better.
MAX_MILP_SERVERS = 12


def span_pool(problem: Problem, plans: Sequence[Plan], max_spans: int = 240) -> list[Span]:
    """The spans of ``plans`` plus, per server, spans from just after a boundary of the first plan to
    one of its boundaries (b, e ∈ {0, span ends, L}), longest first, at most max(2, ``max_spans``/J)
    (a MILP's root work grows with its size, and no limit bounds it), each able to hold one job on all
    its blocks."""
    max_per_server = max(2, max_spans // problem.num_servers)
    L = problem.model.num_blocks
    pool = {s for plan in plans for s in plan.placement.spans}
    ends = sorted({s.end_block for s in plans[0].placement.spans} | {L})
    starts = sorted({0} | {e for e in ends if e < L})
    for j in range(problem.num_servers):
        most = most_blocks(problem, j)
        options = sorted({(b + 1, e - b) for b in starts for e in ends if 0 < e - b <= most}, key=lambda am: -am[1])
        pool.update(Span(j, a, m) for a, m in options[:max_per_server])
    return sorted(pool, key=lambda s: (s.server, s.start_block, s.num_blocks))


def solve(
    problem: Problem,
    pool: Sequence[Span],
    paths: Sequence[Path],
    budget: Budget,
    weights: np.ndarray | None = None,
) -> Placement | None:
    """One MILP of the module doc over ``pool`` and ``paths``, maximising Σ_k w_k·c_k (``weights``;
    default w_k = μ_k, i.e. ν), within :attr:`WorkLimits.placement_nodes` nodes and what ``budget``
    has left: the chosen spans, or ``None`` if HiGHS found no solution (or no MILP may run)."""
    options = budget.milp_options(budget.limits.placement_nodes, 1e-3)
    if options is None:
        return None
    s_m, s_c = problem.block_sizes, problem.cache_sizes
    num_spans, num_paths = len(pool), len(paths)
    serving: dict[tuple[int, int], list[int]] = {}  # (server, end block) → pool spans ending there
    for x, span in enumerate(pool):
        serving.setdefault((span.server, span.end_block), []).append(x)
    rows, lower, upper = [], [], []
    for j in sorted({s.server for s in pool}):  # one span per server, and its memory
        pick = np.zeros(num_spans + num_paths)
        memory = np.zeros(num_spans + num_paths)
        for x, span in enumerate(pool):
            if span.server == j:
                pick[x] = 1.0
                memory[x] = s_m[j] * span.num_blocks - problem.servers[j].memory_gb  # no span, no cache
        for k, path in enumerate(paths):
            memory[num_spans + k] = s_c[j] * sum(h.num_blocks for h in path if h.server == j)
        rows += [pick, memory]
        lower += [-np.inf, -np.inf]
        upper += [1.0, 0.0]
    most = np.zeros(num_paths)
    for k, path in enumerate(paths):
        most[k] = min(
            jobs_that_fit(problem.servers[j].memory_gb - s_m[j] * m, s_c[j] * m)
            for j, m in ((h.server, h.num_blocks) for h in path)
        )
        for h in path:
            row = np.zeros(num_spans + num_paths)
            row[num_spans + k] = 1.0
            for x in serving.get((h.server, h.end_block), ()):
                if pool[x].start_block <= h.start_block:
                    row[x] = -most[k]
            rows.append(row)
            lower.append(-np.inf)
            upper.append(0.0)
    rates = np.array([1.0 / chain_time_s(problem, path) for path in paths]) if weights is None else weights
    cost = np.concatenate((np.full(num_spans, 1e-9), -rates))  # ties: fewer spans
    result = milp(
        cost,
        constraints=[LinearConstraint(np.array(rows), lower, upper)],
        integrality=np.ones(num_spans + num_paths),
        bounds=VariableBounds(0, np.concatenate((np.ones(num_spans), most))),
        options=options,
    )
    budget.charge(result)
    if result.x is None:
        return None
    chosen = [pool[x] for x in range(num_spans) if result.x[x] > 0.5]
    return Placement(tuple(chosen), problem.model.num_blocks) if chosen else None


def marginal_gains(problem: Problem, plan: Plan, times_s: np.ndarray) -> np.ndarray:
    """For every chain time T_k: how much one more job server of rate 1/T_k would lower ``plan``'s
    §2.5 lower bound (≥ 0): a linearisation of the bound around ``plan``."""
    rates = [ch.rate_per_s for ch in plan.chains]
    capacities = [ch.capacity for ch in plan.chains]
    base = plan.bounds.lower_s
    gains = [
        base - response_time_bounds(problem.arrival_rate_per_s, [*rates, 1.0 / t], [*capacities, 1]).lower_s
        for t in times_s
    ]
    return np.maximum(np.array(gains), 0.0)


def milp_placements(
    problem: Problem, plans: Sequence[Plan], budget: Budget, max_paths: int = 60, num_thresholds: int = 1
) -> Iterator[Placement]:
    """Placements from :func:`solve`: the objective linearised around the best plan
    (:func:`marginal_gains`), the largest ν over every path and over the fastest paths only (thresholds
    at quantiles of the pool's chain times), while ``budget`` allows. ``plans``: the heuristic plans,
    best first. Each solve is NP-hard; its node limit bounds it."""
    pool = span_pool(problem, plans)
    room = {
        s: jobs_that_fit(
            problem.servers[s.server].memory_gb - problem.block_size_gb(s.server) * s.num_blocks,
            problem.cache_size_gb(s.server),
        )
        for s in pool
    }
    found = fastest_paths(problem, pool, room.__getitem__, max_paths)
    incumbent = [ch.hops for plan in plans for ch in plan.chains]
    paths = list(dict.fromkeys([*incumbent, *found]))
    if not paths:
        return
    times = np.array([chain_time_s(problem, p) for p in paths])
    runs: list[tuple[list[Path], np.ndarray | None]] = [
        (paths, marginal_gains(problem, plans[0], times)),
        (paths, None),
    ]
    for threshold in np.quantile(times, np.linspace(0.5, 0.0, num_thresholds + 1)[:num_thresholds]):
        runs.append(([p for p, t in zip(paths, times, strict=True) if t <= threshold], None))
    for chosen, weights in runs:
        if budget.expired():
            return
        placement = solve(problem, pool, chosen, budget, weights)
        if placement is not None:
            yield placement
