"""Exact planners (chainserve.plan.exact) against brute force and against the greedy planner."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from chainserve.analysis.bounds import response_time_bounds
from chainserve.model.spec import ModelSpec, Problem, Server, Workload
from chainserve.plan.csearch import max_reservation, plan_for_c
from chainserve.plan.exact import (
    job_block_room,
    optimal_allocation,
    optimal_plan,
    placements,
    routing_paths,
    span_options,
)
from chainserve.plan.gbp_cr import gbp_cr
from chainserve.plan.types import Placement, Span, chain_time_s


@st.composite
def tiny_clusters(draw, max_servers: int = 3, max_blocks: int = 3) -> Problem:
    """J ≤ 3, L ≤ 3, a few jobs per server at most (brute force stays cheap); some servers hold
    their blocks in another format (their own s_m,j and s_c,j, issue 29)."""
    num_blocks = draw(st.integers(1, max_blocks))
    cache_gb = draw(st.sampled_from((0.5, 1.0)))
    servers = tuple(
        Server(
            f"s{j}",
            draw(st.sampled_from((1.5, 2.0, 2.5, 3.0, 4.0))),
            draw(st.sampled_from((0.5, 1.0, 1.5, 2.0))),
            draw(st.sampled_from((0.0, 0.25, 1.0))),
            block_size_gb=draw(st.sampled_from((None, 0.5, 1.0))),
            cache_size_gb=draw(st.sampled_from((None, 0.5, 1.0))),
        )
        for j in range(draw(st.integers(1, max_servers)))
    )
    arrival = draw(st.sampled_from((0.05, 0.2, 0.5, 1.0)))
    return Problem(servers, ModelSpec("tiny", num_blocks, 1.0, cache_gb), Workload(arrival, 0.7))


def allocations(paths, room: dict[int, int]):
    """Every integer allocation of ``paths`` that fits the job-block room, by plain recursion."""
    if not paths:
        yield ()
        return
    first, rest = paths[0], paths[1:]
    most = min(room[h.server] // h.num_blocks for h in first)
    for c in range(most + 1):
        left = dict(room)
        for h in first:
            left[h.server] -= c * h.num_blocks
        for tail in allocations(rest, left):
            yield (c, *tail)


def every_placement(problem: Problem):
    """All placements, no pruning: each server nothing or any span whose parameters fit."""
    L, s_m = problem.model.num_blocks, problem.block_sizes
    options = [
        [None] + [Span(j, a, m) for m in range(1, L + 1) for a in range(1, L - m + 2) if s_m[j] * m <= s.memory_gb]
        for j, s in enumerate(problem.servers)
    ]
    for choice in itertools.product(*options):
        yield Placement(tuple(span for span in choice if span is not None), L)


def lower_bound(problem: Problem, paths, capacities) -> float:
    rates = [1 / chain_time_s(problem, p) for p in paths]
    return response_time_bounds(problem.arrival_rate_per_s, rates, capacities).lower_s


def heuristic_placements(problem: Problem):
    for c in range(1, max_reservation(problem) + 1):
        placed = gbp_cr(problem, c)
        if placed is not None:
            yield placed.placement


@settings(max_examples=80, deadline=None)
@given(tiny_clusters())
def test_milp_matches_brute_force(problem):
    for placement in heuristic_placements(problem):
        paths = routing_paths(problem, placement)
        room = job_block_room(problem, placement)
        feasible = list(allocations(paths, room))
        rates = np.array([1 / chain_time_s(problem, p) for p in paths])
        best_rate = max(float(np.dot(rates, caps)) if caps else 0.0 for caps in feasible)
        plan = optimal_allocation(problem, placement)
        plan.check()
        assert plan.total_rate_per_s == pytest.approx(best_rate, rel=1e-9, abs=1e-12)
        target = problem.arrival_rate_per_s / problem.workload.rho_bar
        enough = [sum(caps) for caps in feasible if caps and np.dot(rates, caps) >= target * (1 - 1e-9)]
        if enough:
            fewest = optimal_allocation(problem, placement, objective="job_servers")
            fewest.check()
            assert fewest.num_job_servers == min(enough)
            assert fewest.total_rate_per_s >= target * (1 - 1e-9)
        else:
            with pytest.raises(ValueError):
                optimal_allocation(problem, placement, objective="job_servers")


def test_milp_on_given_chains():
    # two one-server chains on one server of room ⌊(5 − 1)/1⌋ = 4 job-blocks; only the first is offered
    p = Problem((Server("a", 5.0, 1.0, 0.0), Server("b", 5.0, 2.0, 0.0)), ModelSpec("toy", 1, 1.0, 1.0), Workload(0.1))
    placement = Placement((Span(0, 1, 1), Span(1, 1, 1)), 1)
    paths = routing_paths(p, placement)
    plan = optimal_allocation(p, placement, chains=paths[1:])
    assert [(ch.servers, ch.capacity) for ch in plan.chains] == [((1,), 4)]
    with pytest.raises(ValueError, match="objective"):
        optimal_allocation(p, placement, objective="speed")


@settings(max_examples=40, deadline=None)
@given(tiny_clusters(max_servers=3, max_blocks=2))
def test_optimal_plan_matches_unpruned_brute_force(problem):
    best = math.inf
    for placement in every_placement(problem):
        paths = routing_paths(problem, placement)
        room = job_block_room(problem, placement)
        for caps in allocations(paths, room):
            if sum(caps):
                best = min(best, lower_bound(problem, paths, caps))
    if math.isinf(best):
        with pytest.raises(ValueError, match="stable"):
            optimal_plan(problem)
        return
    plan = optimal_plan(problem)
    plan.check()
    assert plan.bounds.lower_s == pytest.approx(best, rel=1e-12)


@settings(max_examples=60, deadline=None)
@given(tiny_clusters())
def test_optimal_plan_beats_every_heuristic(problem):
    heuristic = [
        plan
        for c in range(1, max_reservation(problem) + 1)
        if (result := plan_for_c(problem, c)) is not None and (plan := result[1]).is_stable
    ]
    try:
        optimal = optimal_plan(problem)
    except ValueError:
        assert not heuristic
        return
    optimal.check()
    assert optimal.is_stable and optimal.method == "optimal"
    for plan in heuristic:
        plan.check()
        assert optimal.bounds.lower_s <= plan.bounds.lower_s * (1 + 1e-12)


def test_identical_servers_counted_once():
    servers = tuple(Server(f"s{j}", 3.0, 1.0, 0.0) for j in range(3))
    p = Problem(servers, ModelSpec("toy", 2, 1.0, 1.0), Workload(0.1))
    # (s_m + s_c)·m ≤ 3 → m = 1 only: spans (1, 1) and (2, 1), plus "nothing": S = 3 options, and
    # C(3 + 3 − 1, 3) = 10 multisets for three identical servers. Chainable ones need both spans:
    # {(1,1), (2,1), nothing}, {(1,1), (1,1), (2,1)}, {(1,1), (2,1), (2,1)}
    count, generated = placements(p)
    assert count == math.comb(3 + 3 - 1, 3) == 10
    assert sorted(tuple((s.start_block, s.num_blocks) for s in pl.spans) for pl in generated) == [
        ((1, 1), (1, 1), (2, 1)),
        ((1, 1), (2, 1)),
        ((1, 1), (2, 1), (2, 1)),
    ]


def test_servers_of_other_block_sizes_are_not_identical():
    """issue 29: servers alike but for their weight format (s_m,j, s_c,j) are placed each on its own
    (hypothesis found the optimum worse than a heuristic when they were swapped as identical)."""
    servers = (Server("s0", 2.5, 0.5, 1.0, cache_size_gb=1.0), Server("s1", 2.5, 0.5, 1.0, block_size_gb=0.5))
    p = Problem(servers, ModelSpec("tiny", 2, 1.0, 0.5), Workload(0.5))
    count, _ = placements(p)
    assert count == math.prod(len(span_options(p, j)) for j in range(2))  # no swaps to skip
    for c in range(1, max_reservation(p) + 1):
        if (result := plan_for_c(p, c)) is not None and result[1].is_stable:
            assert optimal_plan(p).bounds.lower_s <= result[1].bounds.lower_s * (1 + 1e-12)


def test_too_big_instances_are_refused():
    model = ModelSpec("toy", 3, 1.0, 0.5)
    seven = Problem(tuple(Server(f"s{j}", 4.0, 1.0, 0.0) for j in range(7)), model, Workload(0.1))
    with pytest.raises(ValueError, match="servers"):
        optimal_plan(seven)
    distinct = Problem(tuple(Server(f"s{j}", 4.0, 1.0 + j, 0.0) for j in range(4)), model, Workload(0.1))
    with pytest.raises(ValueError, match="placements"):
        optimal_plan(distinct, max_placements=100)
    roomy = Problem((Server("a", 100.0, 1.0, 0.0),), ModelSpec("toy", 2, 1.0, 0.01), Workload(0.1))
    with pytest.raises(ValueError, match="jobs per block"):
        optimal_plan(roomy)
