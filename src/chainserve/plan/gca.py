"""GCA: Greedy Cache Allocation over a given placement (paper §2.2).

The routing graph is a DAG ordered by the servers' last blocks: j may follow i iff
a_j ≤ e_i + 1 ≤ e_j (e = a + m − 1), and the edge's cost τ^c_j + τ^p_j·(e_j − e_i) depends on i only
through e_i. So the shortest source→sink path is a dynamic programme over end blocks: D[b] = the
cheapest path ending at a server whose last block is b, for b = 0 and the distinct span ends only
(no path passes anywhere else). One round costs O(edges) with at most J·(B + 1) usable edges, B the
number of distinct ends, instead of O(J²); results (ties included) equal the plain edge-by-edge
search: at each end block the least total, then the least server index, then the least predecessor
end. Issue 32: the usable edges are found once with numpy, then the programme loops over each
span's edges in Python (a handful per span: faster than numpy calls per end block at these sizes), and
a round only drops the edges of its path's spans that no longer have room for one job. Since edges
only go, D only grows, so the next round recomputes D[b] only where its choice lost its edge or its
predecessor's D changed: otherwise the choice is still the first least total (its total is unchanged,
every other one is no smaller), and D[b] stands. With hundreds of rounds (J = 1000) most D[b] stand.
"""

from __future__ import annotations

import math
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
    # A path can only pass through block 0 or a span end, so the programme runs over those alone
    # (issue 32: the distinct ends, not all L blocks): column p is the predecessor end prev_end[p].
    distinct = np.unique(end)
    prev_end = np.concatenate(([0], distinct[distinct < L]))
    column_of = {int(b): p for p, b in enumerate(prev_end)}
    first, after = np.searchsorted(end, distinct), np.searchsorted(end, distinct, "right")
    groups = list(zip(distinct.tolist(), first.tolist(), after.tolist(), strict=True))  # end b: rows lo:hi
    blocks_all = end[:, None] - prev_end[None, :]
    cost = tau_c[:, None] + tau_p[:, None] * blocks_all  # τ^c + τ^p·(e_r − prev_end[p])
    # usable edges: inside the span, ending later, and room for one job (as :func:`jobs_that_fit`)
    with np.errstate(divide="ignore", invalid="ignore"):
        fits = np.floor(resid[:, None] / (s_c[:, None] * blocks_all) + FIT_EPS) >= 1
    usable = (blocks_all > 0) & (prev_end[None, :] >= start[:, None] - 1) & fits & (resid[:, None] >= 0)
    # Each row's usable edges (column, cost, blocks), columns ascending: a handful per row, so the
    # programme loops over them in Python (issue 32: faster than numpy calls per end block). Memory
    # only shrinks, so a round drops edges from its path's rows and never adds any.
    edges: list[list[tuple[int, float, int]]] = [[] for _ in spans]
    at, columns = np.nonzero(usable)  # row-major
    for r, p, w, m in zip(
        at.tolist(), columns.tolist(), cost[at, columns].tolist(), blocks_all[at, columns].tolist(), strict=True
    ):
        edges[r].append((p, w, m))
    free, per_block = resid.tolist(), s_c.tolist()
    chains: list[Chain] = list(reserved)
    ends = prev_end.tolist()
    best = [math.inf] * len(ends)  # D over the columns
    best[0] = 0.0
    choice: dict[int, tuple[int, int]] = {}  # end block → (row, predecessor column) of D[b]
    removed: set[tuple[int, int]] | None = None  # edges (row, column) the last round dropped; None: none yet
    changed: set[int] = set()  # columns whose D changed this round
    while True:
        for b, lo, hi in groups:  # least total, then least row, then least predecessor end
            held = choice.get(b)
            if removed is not None and (held is None or ((held not in removed) and held[1] not in changed)):
                continue  # D[b] and its choice stand (module doc: a round only removes edges)
            top, pick = math.inf, None
            for r in range(lo, hi):
                for p, w, _ in edges[r]:
                    total = best[p] + w
                    if total < top:
                        top, pick = total, (r, p)
            if pick is None:
                choice.pop(b, None)
            else:
                choice[b] = pick
            if b < L and top != best[column_of[b]]:
                best[column_of[b]] = top
                changed.add(column_of[b])
        if L not in choice:
            break
        rows, blocks, b = [], [], L
        while b > 0:
            r, p = choice[b]
            rows.append(r)
            blocks.append(b - ends[p])
            b = ends[p]
        rows.reverse()
        blocks.reverse()
        capacity = min(jobs_that_fit(free[r], per_block[r] * m) for r, m in zip(rows, blocks, strict=True))
        hops, time = [], 0.0
        removed, changed = set(), set()
        for r, m in zip(rows, blocks, strict=True):
            free[r] -= per_block[r] * m * capacity
            hops.append(Hop(int(server[r]), int(end[r]) - m + 1, m))
            time += tau_c[r] + tau_p[r] * m
            kept = [edge for edge in edges[r] if jobs_that_fit(free[r], per_block[r] * edge[2]) >= 1]
            if len(kept) < len(edges[r]):
                removed.update((r, edge[0]) for edge in edges[r] if edge not in kept)
                edges[r] = kept
        chains.append(Chain(tuple(hops), float(time), capacity))
    return tuple(chains)
