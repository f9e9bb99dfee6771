"""The cost model of a plan change (chainserve.adapt.cost) on hand-worked examples."""

import pytest

from chainserve.adapt.cost import REALLOCATE, REPLACE, migration, predicted_response_s, price_move
from chainserve.model.spec import ModelSpec, Problem, Server, Workload
from chainserve.plan.csearch import make_plan
from chainserve.plan.types import Chain, Hop, Placement, Span

# two servers of 10 GB; the model: 2 blocks of 1 GB, 1 GB of cache per job per block; loads at 0.5 GB/s
PROBLEM = Problem(
    (Server("a", 10, 0.5, 0.0), Server("b", 10, 1.0, 0.0)),
    ModelSpec("toy", 2, 1.0, 1.0),
    Workload(3.0),
    load_bandwidth_gb_per_s=0.5,
)
ON_A = Placement((Span(0, 1, 2),), 2)
ON_AB = Placement((Span(0, 1, 2), Span(1, 1, 2)), 2)
CHAIN_A, CHAIN_B = (Hop(0, 1, 2),), (Hop(1, 1, 2),)  # T = 2 × 0.5 = 1 s, and 2 × 1.0 = 2 s


def plan(placement, *chains):
    return make_plan(PROBLEM, placement, tuple(Chain(h, t, c) for h, t, c in chains), 1)


OLD = plan(ON_A, (CHAIN_A, 1.0, 2))  # ν = 2/s


def test_reallocation_by_hand():
    """Same placement, chain a from 2 to 4 jobs (its memory holds (10 − 2)/2 = 4) at λ = 3/s, H = 100 s.

    Old: ν = 2 < λ, fluid: C/ν + (λ − ν)·H/(2ν) = 1 + 25 = 26 s. New: M/M/4 with μ = 1, λ = 3:
    1/P0 = 1 + 3 + 4.5 + 4.5 + (81/24)·4 = 26.5, Erlang C = 13.5/26.5, E[T] = 1 + C/(4 − 3) = 1.50943 s.
    Gain = λ·H·(26 − 1.50943) = 7347.17 s. Cost: drain D = 1 s (the old chain's T), ν = 4:
    ½·λ·D²·ν/(ν − λ) = ½·3·1·4/1 = 6 s."""
    new = plan(ON_A, (CHAIN_A, 1.0, 4))
    assert predicted_response_s(OLD, 3.0, 100.0) == pytest.approx(26.0)
    assert predicted_response_s(new, 3.0, 100.0) == pytest.approx(1 + 13.5 / 26.5)
    move = price_move(OLD, new, 3.0, 100.0)
    assert (move.kind, move.migration, move.transition_s) == (REALLOCATE, (), 1.0)
    assert move.gain_s == pytest.approx(3 * 100 * (26 - (1 + 13.5 / 26.5)))
    assert move.cost_s == pytest.approx(6.0)


def test_replacement_by_hand():
    """Server b joins with both blocks: out of service s_m·2/0.5 = 4 s; D = 1 + 4 = 5 s; the new
    chains a (4 jobs, μ = 1) and b (4 jobs, μ = 1/2) give ν = 6, so the cost is ½·3·25·6/3 = 75 s."""
    new = plan(ON_AB, (CHAIN_A, 1.0, 4), (CHAIN_B, 2.0, 4))
    assert migration(OLD, new) == ((1, 4.0),)
    move = price_move(OLD, new, 3.0, 100.0)
    assert (move.kind, move.transition_s) == (REPLACE, 5.0)
    assert move.cost_s == pytest.approx(75.0)
    assert move.gain_s > move.cost_s


def test_migration_loads_only_new_blocks_fastest_chain_first():
    """b moves from blocks 1..2 to 2..2 and a 3rd server c joins on block 1: b loads nothing new (0 s),
    c one block; a keeps its span (not listed). Both movers serve the second-fastest chain (after a's),
    so they come in server order."""
    problem = Problem((*PROBLEM.servers, Server("c", 10, 0.1, 0.0)), ModelSpec("toy", 2, 1.0, 1.0), Workload(1.0))
    old = make_plan(problem, ON_AB, (Chain(CHAIN_B, 2.0, 1),), 1)
    new_placement = Placement((Span(0, 1, 2), Span(1, 2, 1), Span(2, 1, 1)), 2)
    fast = (Hop(2, 1, 1), Hop(1, 2, 1))  # T = 0.1 + 1.0
    new = make_plan(problem, new_placement, (Chain(fast, 1.1, 1), Chain(CHAIN_A, 1.0, 1)), 1)
    moves = migration(old, new)
    assert [j for j, _ in moves] == [1, 2]
    assert dict(moves) == {2: 0.5, 1: 0.0}  # c loads 1 GB at 2 GB/s (the default bandwidth)


def test_new_plan_that_cannot_keep_up_costs_its_lost_service():
    """ν = 3 = λ: the 1-second drain's backlog ν·D = 3 jobs never clears, so over H = 100 s it adds
    ½·3·1 + 3·1·99 = 298.5 s of waiting (finite: the move still beats a plan that is worse)."""
    new = plan(ON_A, (CHAIN_A, 1.0, 3))
    assert price_move(OLD, new, 3.0, 100.0).cost_s == pytest.approx(298.5)
