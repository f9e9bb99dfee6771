"""GCA: Greedy Cache Allocation over a given placement (paper §2.2).

The routing graph is a DAG ordered by the servers' last blocks: j may follow i iff
a_j ≤ e_i + 1 ≤ e_j (e = a + m − 1), and the edge's cost τ^c_j + τ^p_j·(e_j − e_i) depends on i only
through e_i. So the shortest source→sink path is a dynamic programme over end blocks b = 0..L:
D[b] = the cheapest path ending at a server whose last block is b. One round costs O(J·L) instead of
O(J²) edges; results (ties included) equal the plain edge-by-edge search: a predecessor is chosen by
least cost, then least end block, then least server index.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import lru_cache

import numpy as np

from chainserve.model.spec import Problem
from chainserve.plan.types import FIT_EPS, Chain, Hop, Placement, jobs_that_fit


@lru_cache(maxsize=16)
def server_columns(problem: Problem) -> tuple[np.ndarray, ...]:
    """(τ^c_j, τ^p_j, s_c,j, s_m,j, M_j) of every server as arrays, computed once per problem (pure: a
    :class:`Problem` is frozen); GCA indexes them by the placed servers."""
    servers = problem.servers
    return (
        np.array([s.tau_c_s for s in servers]),
        np.array([s.tau_p_s for s in servers]),
        np.array(problem.cache_sizes),
        np.array(problem.block_sizes),
        np.array([s.memory_gb for s in servers]),
    )


def gca(problem: Problem, placement: Placement, reserved: Sequence[Chain] = ()) -> tuple[Chain, ...]:
    """Repeatedly take the fastest feasible chain and give it all the capacity memory allows.

    ``reserved`` chains (with their capacities) hold their memory first and lead the result; GCA
    then fills what is left (used by :func:`chainserve.plan.csearch.allocate`).

    Residual memory M̃_j = M_j − s_m,j·m_j; an edge into j carrying m_ij blocks is usable while
    M̃_j ≥ s_c,j·m_ij; a chain gets c_k = min_hops ⌊M̃_j/(s_c,j·m_ij)⌋ (each server's own block and
    cache sizes). Stops when no path is left.
    Chains come out fastest first. O(rounds · J · L) with rounds ≤ number of edges.

    >>> from chainserve.model.spec import ModelSpec, Problem, Server, Workload
    >>> from chainserve.plan.types import Span
    >>> p = Problem((Server("a", 10, 1.0, 0.0), Server("b", 10, 2.0, 0.0)),
    ...             ModelSpec("toy", 3, 2.0, 1.0), Workload(0.1))
    >>> chains = gca(p, Placement((Span(0, 1, 3), Span(1, 1, 3)), 3))
    >>> [(ch.servers, ch.service_time_s, ch.capacity) for ch in chains]  # (10 − 6) / 3 = 1 job each
    [((0,), 3.0, 1), ((1,), 6.0, 1)]
    """
    L = problem.model.num_blocks
    spans = sorted(placement.spans, key=lambda s: (s.end_block, s.server))
    if not spans:
        return tuple(reserved)
    server = np.array([s.server for s in spans])
    start = np.array([s.start_block for s in spans])
    end = np.array([s.end_block for s in spans])
    tau_c, tau_p, s_c, s_m, memory = (column[server] for column in server_columns(problem))
    resid = memory - s_m * (end - start + 1)
    row_of = {int(j): r for r, j in enumerate(server)}
    for chain in reserved:
        for hop in chain.hops:
            r = row_of[hop.server]
            resid[r] -= s_c[r] * hop.num_blocks * chain.capacity
    # cost[r, b'] = τ^c + τ^p·(e_r − b') for a predecessor ending at b' (valid entries only)
    prev_end = np.arange(L + 1)
    cost = tau_c[:, None] + tau_p[:, None] * (end[:, None] - prev_end[None, :])
    first_row = np.searchsorted(end, np.arange(L + 2))  # rows ending at b: first_row[b]:first_row[b+1]

    def usable_costs(rows: np.ndarray) -> np.ndarray:
        """Costs with unusable edges set to inf: outside the span, not ending later, or no room
        for one job (same test as :func:`jobs_that_fit`)."""
        blocks = end[rows][:, None] - prev_end[None, :]
        with np.errstate(divide="ignore", invalid="ignore"):
            fits = np.floor(resid[rows][:, None] / (s_c[rows][:, None] * blocks) + FIT_EPS) >= 1
        ok = (blocks > 0) & (prev_end[None, :] >= start[rows][:, None] - 1) & fits & (resid[rows][:, None] >= 0)
        return np.where(ok, cost[rows], np.inf)

    masked = usable_costs(np.arange(len(spans)))
    chains: list[Chain] = list(reserved)
    while True:
        best = np.full(L + 1, np.inf)
        best[0] = 0.0
        best_row = np.full(L + 1, -1)
        best_prev = np.full(L + 1, -1)
        for b in range(1, L + 1):
            lo, hi = first_row[b], first_row[b + 1]
            if lo == hi:
                continue
            totals = best[None, :b] + masked[lo:hi, :b]
            flat = int(np.argmin(totals))
            r, prev = divmod(flat, b)
            if totals[r, prev] < np.inf:
                best[b], best_row[b], best_prev[b] = totals[r, prev], lo + r, prev
        if not np.isfinite(best[L]):
            break
        rows, blocks, b = [], [], L
        while b > 0:
            r, prev = best_row[b], best_prev[b]
            rows.append(r)
            blocks.append(int(b - prev))
            b = int(prev)
        rows.reverse()
        blocks.reverse()
        capacity = min(jobs_that_fit(resid[r], s_c[r] * m) for r, m in zip(rows, blocks, strict=True))
        hops, time = [], 0.0
        for r, m in zip(rows, blocks, strict=True):
            resid[r] -= s_c[r] * m * capacity
            hops.append(Hop(int(server[r]), int(end[r]) - m + 1, m))
            time += tau_c[r] + tau_p[r] * m
        chains.append(Chain(tuple(hops), float(time), capacity))
        path_rows = np.array(rows)
        masked[path_rows] = usable_costs(path_rows)
    return tuple(chains)
