"""Exact planners for small instances: optimal cache allocation (an integer program) and the jointly
optimal placement + allocation (exhaustive search), paper §1 (both problems are NP-hard) and §2.5.

They are yardsticks for the greedy planner (GBP-CR + GCA + c-search), not production planners.
Memory is counted in integer *job-blocks*: server j has room for U_j = ⌊(M_j − s_m·m_j)/s_c⌋ blocks'
worth of one job's cache, and a job on chain k uses m_ij(k) of them, so the memory constraint
Σ_k m_ij(k)·c_k ≤ U_j is exact integer arithmetic (same rounding as :func:`jobs_that_fit`).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterator, Sequence
from typing import Literal

import numpy as np
from scipy.optimize import Bounds as VariableBounds
from scipy.optimize import LinearConstraint, milp

from chainserve.analysis.bounds import mean_jobs_birth_death, slot_rates
from chainserve.model.spec import Problem
from chainserve.plan.budget import Budget
from chainserve.plan.csearch import make_plan
from chainserve.plan.types import Chain, Hop, Placement, Plan, Span, chain_time_s, jobs_that_fit

AllocationObjective = Literal["rate", "job_servers"]
Path = tuple[Hop, ...]

#: Largest cluster :func:`optimal_plan` accepts.
MAX_EXACT_SERVERS = 6


def job_block_room(problem: Problem, placement: Placement) -> dict[int, int]:
    """U_j = ⌊(M_j − s_m,j·m_j)/s_c,j⌋ for every placed server."""
    return {
        s.server: jobs_that_fit(
            problem.servers[s.server].memory_gb - problem.block_size_gb(s.server) * s.num_blocks,
            problem.cache_size_gb(s.server),
        )
        for s in placement.spans
    }


def routing_paths(problem: Problem, placement: Placement) -> tuple[Path, ...]:
    """Every source→sink path of the §2.2 routing graph: j may follow i iff a_j ≤ e_i + 1 ≤ e_j, and an
    edge is kept only if its target can hold one job (m_ij ≤ U_j). Exponential in J in the worst case.

    >>> from chainserve.model.spec import ModelSpec, Problem, Server, Workload
    >>> p = Problem((Server("a", 3, 1.0, 0.0), Server("b", 3, 1.0, 0.0), Server("c", 5, 2.0, 0.0)),
    ...             ModelSpec("toy", 2, 1.0, 1.0), Workload(0.1))
    >>> placement = Placement((Span(0, 1, 1), Span(1, 2, 1), Span(2, 1, 2)), 2)
    >>> [[(h.server, h.start_block, h.num_blocks) for h in path] for path in routing_paths(p, placement)]
    [[(0, 1, 1), (1, 2, 1)], [(0, 1, 1), (2, 2, 1)], [(2, 1, 2)]]
    """
    L = problem.model.num_blocks
    room = job_block_room(problem, placement)
    spans = sorted(placement.spans, key=lambda s: (s.end_block, s.server))

    def extend(last_block: int, hops: tuple[Hop, ...]) -> Iterator[Path]:
        if last_block == L:
            yield hops
            return
        for span in spans:
            blocks = span.end_block - last_block
            if span.start_block <= last_block + 1 and blocks >= 1 and blocks <= room[span.server]:
                yield from extend(span.end_block, (*hops, Hop(span.server, last_block + 1, blocks)))

    return tuple(extend(0, ()))


def optimal_allocation(
    problem: Problem,
    placement: Placement,
    chains: Sequence[Path] | None = None,
    objective: AllocationObjective = "rate",
    budget: Budget | None = None,
) -> Plan:
    """Optimal integer capacities c_k for given chains (default: all :func:`routing_paths`), by
    ``scipy.optimize.milp`` (HiGHS, gap 0). With a ``budget`` (the best planner's), the solve stops at
    its node and time limits with the best allocation found (``ValueError`` if none, or if the budget
    has no MILP work left). ``rate``: maximise ν = Σ c_k μ_k; ``job_servers``: minimise
    C = Σ c_k subject to ν ≥ λ/ρ̄ (up to HiGHS' feasibility tolerance, 1e-7 relative; ``ValueError``
    if no allocation reaches it). Both subject to Σ_k s_c·m_ij(k)·c_k ≤ M_j − s_m·m_j on every placed
    server. Chains left at 0 are dropped. A multidimensional knapsack: NP-hard, fine for hundreds of
    chains.

    >>> from chainserve.model.spec import ModelSpec, Problem, Server, Workload
    >>> p = Problem((Server("a", 4, 1.0, 0.0), Server("b", 4, 2.0, 0.0)),
    ...             ModelSpec("toy", 1, 1.0, 1.0), Workload(0.1))
    >>> plan = optimal_allocation(p, Placement((Span(0, 1, 1), Span(1, 1, 1)), 1))
    >>> [(ch.servers, ch.capacity) for ch in plan.chains]  # U = ⌊(4 − 1)/1⌋ = 3 jobs on each
    [((0,), 3), ((1,), 3)]
    """
    paths = routing_paths(problem, placement) if chains is None else tuple(chains)
    if objective not in ("rate", "job_servers"):
        raise ValueError(f"objective must be 'rate' or 'job_servers', got {objective!r}")
    method = f"milp-{objective.replace('_', '-')}"
    if not paths:
        if objective == "job_servers":
            raise ValueError("placement: no source→sink chain, so no allocation reaches ν ≥ λ/ρ̄")
        return make_plan(problem, placement, (), None, method)
    options = {"mip_rel_gap": 0.0} if budget is None else budget.allocation_options()
    if options is None:  # asked before the model is built (issue 32: most calls of a run come here)
        raise ValueError("budget: no MILP work left")
    room = job_block_room(problem, placement)
    servers = sorted(room)
    row = {j: r for r, j in enumerate(servers)}
    usage = np.zeros((len(servers), len(paths)))
    for k, path in enumerate(paths):
        for hop in path:
            if hop.server not in row:
                raise ValueError(f"chains[{k}]: server {hop.server} hosts no blocks")
            usage[row[hop.server], k] += hop.num_blocks
    rates = np.array([1.0 / chain_time_s(problem, path) for path in paths])
    most = np.array([min(room[h.server] // h.num_blocks for h in path) for path in paths], dtype=float)
    constraints = [LinearConstraint(usage, -np.inf, np.array([room[j] for j in servers], dtype=float))]
    if objective == "rate":
        cost = -rates
    else:
        cost = np.ones(len(paths))
        target = problem.arrival_rate_per_s / problem.workload.rho_bar
        constraints.append(LinearConstraint(rates[None, :] / target, 1.0, np.inf))  # relative tolerance
    result = milp(
        cost,
        constraints=constraints,
        integrality=np.ones(len(paths)),
        bounds=VariableBounds(0, most),
        options=options,
    )
    if budget is not None:
        budget.charge(result)
    if result.status != 0 and (budget is None or result.x is None):
        raise ValueError(f"arrival_rate: no allocation reaches ν ≥ λ/ρ̄ ({result.message})")
    chosen = tuple(
        Chain(path, chain_time_s(problem, path), int(c))
        for path, c in zip(paths, np.rint(result.x).astype(int), strict=True)
        if c > 0
    )
    return make_plan(problem, placement, chosen, None, method)


def lower_bound_s(arrival_rate: float, rates: np.ndarray, capacities: Sequence[int]) -> float:
    """The §2.5 lower bound alone (``inf`` if unstable or empty)."""
    return mean_jobs_birth_death(arrival_rate, np.cumsum(slot_rates(rates, capacities))) / arrival_rate


Needs = Sequence[Sequence[tuple[int, int]]]


def best_maximal_allocation(
    arrival_rate: float, rates: np.ndarray, needs: Needs, room: list[int], incumbent: float
) -> tuple[float, list[int]] | None:
    """Branch and bound over maximal allocations: chains (rates fastest first) take capacities from their
    largest down to 0; ``needs[k]`` lists (server slot, m_ij) of chain k, ``room`` the U_j (mutated and
    restored). A branch is cut when even giving every later chain all it could take alone cannot beat
    ``incumbent`` (more slots only lower the bound, see :func:`optimal_plan`). Returns the best allocation
    whose lower bound is below ``incumbent``, or ``None``."""
    num_chains = len(needs)
    capacities = [0] * num_chains
    best_value, best = incumbent, None

    def room_for(k: int) -> int:
        return min(room[j] // m for j, m in needs[k])

    def visit(k: int) -> None:
        nonlocal best_value, best
        if k == num_chains:
            if all(room_for(q) == 0 for q in range(num_chains)):  # maximal: nothing can grow
                value = lower_bound_s(arrival_rate, rates, capacities)
                if value < best_value:
                    best_value, best = value, list(capacities)
            return
        optimistic = capacities[:k] + [room_for(q) for q in range(k, num_chains)]
        if lower_bound_s(arrival_rate, rates, optimistic) >= best_value:
            return
        for c in range(optimistic[k], -1, -1):
            capacities[k] = c
            for j, m in needs[k]:
                room[j] -= m * c
            visit(k + 1)
            for j, m in needs[k]:
                room[j] += m * c
        capacities[k] = 0

    visit(0)
    return None if best is None else (best_value, best)


def span_options(problem: Problem, server: int) -> list[tuple[int, int] | None]:
    """Nothing, or every span (a, m) that can carry one job over all its blocks ((s_m,j + s_c,j)·m ≤ M_j,
    i.e. m ≤ m_j(1)): only such spans occur in tight placements (see :func:`optimal_plan`)."""
    L = problem.model.num_blocks
    memory = problem.servers[server].memory_gb
    s_m, s_c = problem.block_size_gb(server), problem.cache_size_gb(server)
    options: list[tuple[int, int] | None] = [None]
    for num_blocks in range(1, L + 1):
        if jobs_that_fit(memory - s_m * num_blocks, s_c * num_blocks) >= 1:
            options += [(start, num_blocks) for start in range(1, L - num_blocks + 2)]
    return options


def placements(problem: Problem) -> tuple[int, Iterator[Placement]]:
    """(count, iterator): the count of placements up to swapping identical servers (same M, τ^p, τ^c,
    s_m,j, s_c,j; a group of n identical servers with S options has C(S + n − 1, n) assignments, not S^n),
    and those of them that could be tight: some span ends at L, every span starts at block 1 or right
    after another span's end, and ends at L or inside another span that goes further."""
    groups: dict[tuple[float, ...], list[int]] = {}
    for j, s in enumerate(problem.servers):
        kind = (s.memory_gb, s.tau_p_s, s.tau_c_s, problem.block_size_gb(j), problem.cache_size_gb(j))
        groups.setdefault(kind, []).append(j)
    members = list(groups.values())
    options = [span_options(problem, group[0]) for group in members]
    count = math.prod(math.comb(len(o) + len(g) - 1, len(g)) for o, g in zip(options, members, strict=True))
    L = problem.model.num_blocks

    def chainable(spans: list[tuple[int, int, int]]) -> bool:
        ends = {0} | {a + m - 1 for _, a, m in spans}
        return L in ends and all(
            a - 1 in ends and (a + m - 1 == L or any(b <= a + m <= b + n - 1 for _, b, n in spans)) for _, a, m in spans
        )

    def generate() -> Iterator[Placement]:
        per_group = [
            itertools.combinations_with_replacement(range(len(o)), len(g))
            for o, g in zip(options, members, strict=True)
        ]
        for choice in itertools.product(*per_group):
            spans = [
                (j, *options[g][pick])
                for g, picks in enumerate(choice)
                for j, pick in zip(members[g], picks, strict=True)
                if options[g][pick] is not None
            ]
            if chainable(spans):
                yield Placement(tuple(Span(*span) for span in sorted(spans)), L)

    return count, generate()


def spans_all_used(placement: Placement, paths: Sequence[Path]) -> bool:
    """Whether every placed server starts some path's hop at its first block (its whole span is used)."""
    starts = {(h.server, h.start_block) for path in paths for h in path}
    return all((s.server, s.start_block) in starts for s in placement.spans)


def optimal_plan(problem: Problem, max_placements: int = 200_000, max_jobs_per_server: int = 64) -> Plan:
    """Jointly optimal placement and allocation for tiny clusters: least §2.5 lower bound on the mean
    response time over every placement (each server: nothing or any span that fits) and every integer
    allocation of all its routing paths. Method ``optimal``; ``c`` is ``None``.

    Why only some placements and allocations need a look:

    * *Maximal allocations suffice.* Adding one job server of rate μ to a set of slots raises every
      ν̄_n (the sum of the n fastest of a superset is no smaller) and ν. With death rates ν' ≥ ν
      pointwise, φ'_n/φ_n ∝ Π_{i≤n} ν_i/ν'_i is non-increasing in n, so the new stationary law is
      smaller in likelihood ratio, hence stochastically, and E[Z] (the bound) does not grow. So every
      allocation is dominated by a maximal one (no chain can take one more job).
    * *Tight placements suffice.* If no path uses server j's whole span, every chain through j starts
      after a_j; shrinking the span to the chains' first block (or dropping j if none uses it) keeps
      every chain feasible with more free memory and the same bound, and that placement, with a
      smaller total span length, is enumerated too. So placements where some server's whole span is on
      no path are skipped, as are spans whose whole length cannot hold one job
      (:func:`span_options`) and swaps of identical servers (:func:`placements`).
    * Branch and bound against the best plan so far: a placement whose fastest chain takes at least
      the best bound found is skipped (the bound is at least 1/μ_1: ν̄_n ≤ n·μ_1, so Z is stochastically
      above an M/M/∞ queue of rate μ_1), then :func:`best_maximal_allocation` prunes inside.

    Cost: P placements (≤ Π_groups C(S+n−1, n), S ≤ 1 + L(L+1)/2 spans per server) times the paths
    (exponential in J) times the maximal allocations (exponential in the number of paths) in the worst
    case. Raises ``ValueError`` when J > 6, P > ``max_placements``, a server could hold more than
    ``max_jobs_per_server`` jobs on one block (the allocation tree explodes), or no plan is stable.

    >>> from chainserve.model.spec import ModelSpec, Problem, Server, Workload
    >>> p = Problem((Server("a", 3, 1.0, 0.0), Server("b", 2, 1.0, 0.0)),
    ...             ModelSpec("toy", 2, 1.0, 0.5), Workload(0.5))
    >>> plan = optimal_plan(p)
    >>> [(s.server, s.start_block, s.num_blocks) for s in plan.placement.spans]
    [(0, 1, 1), (1, 2, 1)]
    >>> [(ch.servers, ch.capacity) for ch in plan.chains]
    [((0, 1), 2)]
    """
    lam = problem.arrival_rate_per_s
    if problem.num_servers > MAX_EXACT_SERVERS:
        raise ValueError(f"servers: at most {MAX_EXACT_SERVERS} for optimal_plan, got {problem.num_servers}")
    most_jobs = max(
        jobs_that_fit(s.memory_gb - problem.block_size_gb(j), problem.cache_size_gb(j))
        for j, s in enumerate(problem.servers)
    )
    if most_jobs > max_jobs_per_server:
        raise ValueError(
            f"model.cache_size_gb: a server holds up to {most_jobs} jobs per block, more than "
            f"max_jobs_per_server = {max_jobs_per_server}; too big to enumerate"
        )
    count, candidates = placements(problem)
    if count > max_placements:
        raise ValueError(f"servers: {count} placements to try, more than max_placements = {max_placements}")
    best_value, best = math.inf, None
    for placement in candidates:
        paths = routing_paths(problem, placement)
        if not paths or not spans_all_used(placement, paths):
            continue
        timed = sorted(((chain_time_s(problem, path), path) for path in paths), key=lambda tp: tp[0])
        if timed[0][0] >= best_value:
            continue  # the bound is at least the fastest chain's service time
        paths = [path for _, path in timed]
        rates = np.array([1.0 / time_s for time_s, _ in timed])
        room = job_block_room(problem, placement)
        slot = {j: i for i, j in enumerate(room)}
        needs = [[(slot[h.server], h.num_blocks) for h in path] for path in paths]
        found = best_maximal_allocation(lam, rates, needs, list(room.values()), best_value)
        if found is not None:
            best_value, best = found[0], (placement, paths, found[1])
    if best is None:
        raise ValueError(f"arrival_rate: no placement gives a stable plan for λ = {lam:g}/s")
    placement, paths, capacities = best
    chains = tuple(
        Chain(path, chain_time_s(problem, path), c) for path, c in zip(paths, capacities, strict=True) if c > 0
    )
    return make_plan(problem, placement, chains, None, "optimal")
