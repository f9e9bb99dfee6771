"""GBP-CR: Greedy Block Placement with Cache Reservation (paper §2.1)."""

from __future__ import annotations

from dataclasses import dataclass

from chainserve.model.spec import Problem
from chainserve.plan.types import Hop, Placement, Span, jobs_that_fit


@dataclass(frozen=True, slots=True)
class GbpCrResult:
    """GBP-CR's placement for one c, with the K(c) chains it closed and their promised rate.

    ``chains``: the hops of each closed chain in walk order (a hop runs the blocks its predecessor
    did not, so the left-shifted server runs fewer blocks than it hosts); each fits capacity c.
    """

    c: int
    placement: Placement
    num_chains: int
    promised_rate_per_s: float  # c · Σ_{closed chains} 1/T
    chains: tuple[tuple[Hop, ...], ...] = ()

    @property
    def num_job_servers(self) -> int:
        """c · K(c), the surrogate objective of §2.3."""
        return self.c * self.num_chains


def blocks_with_reservation(problem: Problem, c: int) -> list[int]:
    """m_j(c) = min(⌊M_j / (s_m,j + s_c,j·c)⌋, L) for every server (its own block and cache sizes)."""
    L = problem.model.num_blocks
    return [
        min(jobs_that_fit(s.memory_gb, problem.block_size_gb(j) + problem.cache_size_gb(j) * c), L)
        for j, s in enumerate(problem.servers)
    ]


def gbp_cr(problem: Problem, c: int) -> GbpCrResult | None:
    """Place blocks greedily, fastest amortised server first, reserving cache for c jobs per block.

    Returns ``None`` when c is infeasible (Σ_j m_j(c) < L). Servers are taken in increasing order
    of t̃_j(c) = (τ^c_j + τ^p_j·m_j(c))/m_j(c) (ties: lower index first); each starts at the first
    uncovered block, the one completing a chain is shifted left to end at L. The walk stops once
    the closed chains promise c·Σ 1/T ≥ λ/ρ̄. Servers never reached are not placed. O(J log J).

    >>> from chainserve.model.spec import ModelSpec, Problem, Server, Workload
    >>> p = Problem((Server("a", 10, 1.0, 0.0), Server("b", 10, 2.0, 0.0)),
    ...             ModelSpec("toy", 3, 2.0, 1.0), Workload(0.1))
    >>> r = gbp_cr(p, 1)   # m = ⌊10/3⌋ = 3 on both; a alone closes a chain of rate 1/3
    >>> [(s.server, s.start_block, s.num_blocks) for s in r.placement.spans], r.num_chains
    ([(0, 1, 3)], 1)
    """
    if c < 1:
        raise ValueError(f"c must be a positive integer, got {c}")
    L = problem.model.num_blocks
    blocks = blocks_with_reservation(problem, c)
    if sum(blocks) < L:
        return None
    times = [s.tau_c_s + s.tau_p_s * m for s, m in zip(problem.servers, blocks, strict=True)]
    order = sorted((j for j, m in enumerate(blocks) if m > 0), key=lambda j: (times[j] / blocks[j], j))
    target = problem.arrival_rate_per_s / (problem.workload.rho_bar * c)
    spans: list[Span] = []
    chains: list[tuple[Hop, ...]] = []
    hops: list[Hop] = []
    next_block, chain_time, rate = 1, 0.0, 0.0
    for j in order:
        start = min(next_block, L - blocks[j] + 1)
        spans.append(Span(j, start, blocks[j]))
        hops.append(Hop(j, next_block, start + blocks[j] - next_block))
        chain_time += times[j]
        next_block = start + blocks[j]
        if next_block > L:
            rate += 1.0 / chain_time
            chains.append(tuple(hops))
            next_block, chain_time, hops = 1, 0.0, []
            if rate >= target:
                break
    return GbpCrResult(c, Placement(tuple(spans), L), len(chains), c * rate, tuple(chains))
