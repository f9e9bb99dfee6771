"""Property tests of the planner on random clusters (paper §2.1–§2.3, §2.5).

GCA is compared with a plain reference implementation written here: an explicit edge list and a
shortest path per round over the DAG, with the tie rule documented in ``chainserve.plan.gca``.
"""

from __future__ import annotations

import math

from hypothesis import given, settings
from hypothesis import strategies as st

from chainserve.model.spec import ModelSpec, Problem, Server, Workload
from chainserve.plan.csearch import make_plan, max_reservation, plan_for_c, search_c
from chainserve.plan.gca import gca
from chainserve.plan.types import Chain, Hop, Placement, chain_time_s, jobs_that_fit, reserved_block_jobs

#: τ values drawn from a small grid as well as continuously, so that ties between paths happen.
TAU_GRID = (0.0, 0.25, 0.5, 1.0, 1.5)


@st.composite
def clusters(draw) -> Problem:
    """J 1..12 servers with random M, τ^p, τ^c; L 2..20; s_m, s_c, and on some servers their own s_m,j
    and s_c,j (a weight format, issue 29); λ within reach of the cluster."""
    num_blocks = draw(st.integers(2, 20))
    block_gb = draw(st.sampled_from((0.5, 1.0, 1.3)))
    cache_gb = block_gb * draw(st.one_of(st.sampled_from((0.1, 0.25, 0.5, 1.0)), st.floats(0.08, 2.0)))
    servers = []
    for j in range(draw(st.integers(1, 12))):
        memory_gb = block_gb * draw(st.one_of(st.sampled_from((1.0, 2.0, 5.0, 10.0)), st.floats(0.5, 12.0)))
        tau_p = draw(st.one_of(st.sampled_from(TAU_GRID[1:]), st.floats(0.01, 2.0)))
        tau_c = draw(st.one_of(st.sampled_from(TAU_GRID), st.floats(0.0, 1.0)))
        own = draw(st.one_of(st.none(), st.tuples(st.sampled_from((0.25, 0.5, 2.0)), st.sampled_from((0.5, 1.0, 2.0)))))
        sizes = {} if own is None else {"block_size_gb": block_gb * own[0], "cache_size_gb": cache_gb * own[1]}
        servers.append(Server(f"s{j}", memory_gb, tau_p, tau_c, **sizes))
    arrival = draw(st.floats(0.001, 2.0))
    rho_bar = draw(st.sampled_from((0.5, 0.7, 0.9)))
    return Problem(tuple(servers), ModelSpec("m", num_blocks, block_gb, cache_gb), Workload(arrival, rho_bar))


def own_sizes(problem: Problem) -> tuple[list[float], list[float]]:
    """s_m,j and s_c,j of every server read from its own fields (the model's where it sets none)."""
    m = problem.model
    return (
        [m.block_size_gb if s.block_size_gb is None else s.block_size_gb for s in problem.servers],
        [m.cache_size_gb if s.cache_size_gb is None else s.cache_size_gb for s in problem.servers],
    )


def assert_memory_kept(plan) -> None:
    """s_m,j·m_j + s_c,j·Σ_k m_ij(k)·c_k ≤ M_j on every server, each with its own sizes (paper §1)."""
    s_m, s_c = own_sizes(plan.problem)
    used = {span.server: s_m[span.server] * span.num_blocks for span in plan.placement.spans}
    for ch in plan.chains:
        for hop in ch.hops:
            used[hop.server] += s_c[hop.server] * hop.num_blocks * ch.capacity
    for j, gb in used.items():
        assert gb <= plan.problem.servers[j].memory_gb * (1 + 1e-9) + 1e-9


def reference_gca(problem: Problem, placement: Placement) -> tuple[Chain, ...]:
    """GCA (§2.2) the plain way: edges (i, j, m_ij) listed once; every round drops edges whose target
    cannot hold one job, then runs a shortest path over the DAG in order of end block. Ties: least
    cost, then least predecessor end block, then least server index (the source has end block 0);
    at the sink least cost, then least server index."""
    L = problem.model.num_blocks
    s_m, s_c = own_sizes(problem)
    span = {s.server: s for s in placement.spans}
    resid = {j: problem.servers[j].memory_gb - s_m[j] * s.num_blocks for j, s in span.items()}
    end = {j: s.end_block for j, s in span.items()} | {None: 0}
    edges = [
        (i, j, span[j].end_block - end[i])
        for i in [None, *span]
        for j in span
        if span[j].start_block <= end[i] + 1 <= span[j].end_block
    ]
    chains = []
    while True:
        usable = [(i, j, m) for i, j, m in edges if resid[j] >= 0 and jobs_that_fit(resid[j], s_c[j] * m) >= 1]
        dist: dict[int | None, float] = {None: 0.0}
        pred: dict[int, tuple[int | None, int]] = {}
        for j in sorted(span, key=lambda j: end[j]):
            server = problem.servers[j]
            options = [
                (dist[i] + (server.tau_c_s + server.tau_p_s * m), end[i], -1 if i is None else i, i, m)
                for i, jj, m in usable
                if jj == j and i in dist
            ]
            if options:
                cost, _, _, i, m = min(options, key=lambda o: o[:3])
                dist[j], pred[j] = cost, (i, m)
        finals = [j for j in span if end[j] == L and j in dist]
        if not finals:
            return tuple(chains)
        node: int | None = min(finals, key=lambda j: (dist[j], j))
        hops = []
        while node is not None:
            prev, m = pred[node]
            hops.append(Hop(node, end[node] - m + 1, m))
            node = prev
        hops.reverse()
        capacity = min(jobs_that_fit(resid[h.server], s_c[h.server] * h.num_blocks) for h in hops)
        for h in hops:
            resid[h.server] -= s_c[h.server] * h.num_blocks * capacity
        chains.append(Chain(tuple(hops), chain_time_s(problem, tuple(hops)), capacity))


def feasible_plans(problem: Problem):
    for c in range(1, max_reservation(problem) + 1):
        result = plan_for_c(problem, c)
        if result is not None:
            yield result


@settings(max_examples=150, deadline=None)
@given(clusters())
def test_every_c_gives_a_valid_plan(problem):
    for placed, plan in feasible_plans(problem):
        plan.check()  # memory never exceeded, chains cover 1..L, hops inside spans, T_k right
        assert_memory_kept(plan)
        assert plan.bounds.lower_s <= plan.bounds.upper_s * (1 + 1e-12)
        if not plan.is_stable:
            assert math.isinf(plan.bounds.lower_s)
        # GBP-CR's own chains at capacity c fit together and keep its promise ...
        walk = tuple(Chain(hops, chain_time_s(problem, hops), placed.c) for hops in placed.chains)
        assert len(walk) == placed.num_chains
        promised = make_plan(problem, placed.placement, walk, placed.c)
        promised.check()
        assert promised.total_rate_per_s >= placed.promised_rate_per_s * (1 - 1e-12)
        # ... and so does the allocated plan (GCA, or GBP-CR's chains + GCA fill when GCA falls short)
        assert plan.total_rate_per_s >= placed.promised_rate_per_s * (1 - 1e-12)
        # its reservation in block-jobs is exactly Σ_k m_ij(k)·c_k (the GB sum's round-off is harmless)
        exact = {span.server: 0 for span in plan.placement.spans}
        for ch in plan.chains:
            for hop in ch.hops:
                exact[hop.server] += hop.num_blocks * ch.capacity
        assert reserved_block_jobs(plan) == exact


@settings(max_examples=150, deadline=None)
@given(clusters())
def test_gca_equals_reference(problem):
    for _, plan in feasible_plans(problem):
        # servers, blocks, capacities and times, bit for bit
        assert gca(problem, plan.placement) == reference_gca(problem, plan.placement)


@settings(max_examples=150, deadline=None)
@given(clusters())
def test_search_c_never_returns_an_unstable_plan(problem):
    try:
        best = search_c(problem)
    except ValueError:
        assert not any(plan.is_stable for _, plan in feasible_plans(problem))
        return
    assert best.is_stable
    best.check()
    assert_memory_kept(best)
    assert best.bounds.lower_s == min(plan.bounds.lower_s for _, plan in feasible_plans(problem))
