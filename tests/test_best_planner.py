"""The best planner (``chainserve.plan.best``): valid and never worse than the paper's greedy plan by the
Theorem-4 lower bound (spec §2.5) on random clusters, and its building blocks on small hand cases."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings

from chainserve.methods import build_method
from chainserve.model.spec import ModelSpec, Problem, Server, SpecError, Workload
from chainserve.plan.best import best_plan, plan_with
from chainserve.plan.budget import Budget, WorkLimits
from chainserve.plan.candidates import variant_placements, walk
from chainserve.plan.complete import ALLOCATION_MARGIN, complete, fastest_paths, tighten
from chainserve.plan.csearch import search_c
from chainserve.plan.exact import job_block_room, routing_paths
from chainserve.plan.local_search import _swaps, local_search
from chainserve.plan.types import Placement, Span, check_placement, check_plan
from test_planner_properties import clusters


def toy() -> Problem:
    """Two fast servers that GBP-CR's walk leaves idle at λ = 1 and one slow one that it uses."""
    servers = (
        Server("a", 6.0, 0.2, 0.05),
        Server("b", 6.0, 0.2, 0.05),
        Server("c", 4.0, 0.4, 0.3),
        Server("d", 3.0, 0.5, 0.1),
    )
    return Problem(servers, ModelSpec("toy", 4, 1.0, 0.25), Workload(1.0))


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(clusters())
def test_best_is_valid_and_never_worse_than_greedy(problem):
    try:
        greedy = search_c(problem)
    except ValueError:
        return
    best = best_plan(problem, time_limit_s=0.3)
    check_plan(best)
    assert best.is_stable
    assert best.bounds.lower_s <= greedy.bounds.lower_s * (1 + 1e-12)
    assert best.method == "proposed" and best.notes[-1].startswith("planner: best")


@settings(max_examples=15, deadline=None)
@given(clusters())
def test_every_variant_placement_is_valid(problem):
    for placement in variant_placements(problem, 2, (1, 3)):
        check_placement(problem, placement)
        complete(problem, placement, exact=False).check()


def test_best_improves_on_greedy_here():
    problem = toy()
    greedy, best = search_c(problem), best_plan(problem)
    assert best.bounds.lower_s < greedy.bounds.lower_s
    check_plan(best)


def test_walk_trims_the_completing_server():
    problem = toy()
    shifted = walk(problem, [1] * 4, [0, 1, 2, 3], stop_early=False, trim=False)
    trimmed = walk(problem, [1] * 4, [0, 1, 2, 3], stop_early=False, trim=True)
    assert shifted is not None and trimmed is not None
    assert sum(s.num_blocks for s in trimmed.spans) <= sum(s.num_blocks for s in shifted.spans)
    for placement in (shifted, trimmed):
        check_placement(problem, placement)


def test_fastest_paths_are_the_routing_paths_in_time_order():
    problem = toy()
    placement = Placement((Span(0, 1, 2), Span(1, 3, 2), Span(2, 1, 4), Span(3, 2, 3)), 4)
    room = job_block_room(problem, placement)
    found = fastest_paths(problem, placement.spans, lambda span: room[span.server], 100)
    assert set(found) == set(routing_paths(problem, placement))
    times = [
        sum(problem.servers[h.server].tau_c_s + problem.servers[h.server].tau_p_s * h.num_blocks for h in p)
        for p in found
    ]
    assert times == sorted(times)


def test_tighten_keeps_bounds_and_frees_memory():
    problem = toy()
    placement = Placement((Span(0, 1, 3), Span(1, 3, 2), Span(2, 1, 4)), 4)
    plan = complete(problem, placement)
    tight = tighten(plan)
    check_plan(tight)
    assert tight.bounds == plan.bounds
    assert all(tight.free_memory_gb()[j] >= plan.free_memory_gb()[j] for j in tight.free_memory_gb())


def test_local_search_never_returns_worse():
    problem = toy()
    start = search_c(problem)
    found, used = local_search(
        problem, start, lambda pl: complete(problem, pl, exact=False), np.random.default_rng(0), 50, lambda: False
    )
    check_plan(found)
    assert used <= 50 and found.bounds.lower_s <= start.bounds.lower_s


def test_swap_moves_by_hand():
    # placed 0: blocks 1..2, 1: 3..4, 2: 1..2 (same span as 0), idle 3; server 2 holds at most 1 block.
    # Pairs in loop order: (0, 1) yes; (0, 2) no, same span; (0, 3) yes; (1, 2) no, 2 cannot hold 1's
    # two blocks; (1, 3) yes; (2, 3) yes.
    spans = {0: (1, 2), 1: (3, 2), 2: (1, 2)}
    xs, ys, partners = _swaps(spans, [0, 1, 2], [3], [4, 4, 1, 4])
    assert partners == [0, 1, 2, 3]
    assert list(zip(xs, ys, strict=True)) == [(0, 1), (0, 3), (1, 3), (2, 3)]


def test_allocation_milp_only_near_the_incumbent():
    """The allocation MILP runs for a placement whose GCA plan is within ALLOCATION_MARGIN of the best
    lower bound so far, and not for one far above it (issue 32); the plan is valid either way."""
    problem = toy()
    placement = search_c(problem).placement
    gca_plan = complete(problem, placement, exact=False)
    for incumbent, milps_run in (
        (None, 1),
        (gca_plan.bounds.lower_s, 1),
        (gca_plan.bounds.lower_s / (1 + ALLOCATION_MARGIN) * 1.001, 1),
        (gca_plan.bounds.lower_s / (1 + ALLOCATION_MARGIN) * 0.999, 0),
    ):
        budget = Budget(WorkLimits(), 60.0)
        plan = complete(problem, placement, budget=budget, incumbent_s=incumbent)
        check_plan(plan)
        assert plan.bounds.lower_s <= gca_plan.bounds.lower_s
        assert WorkLimits().allocation_milps - budget.allocation_milps_left == milps_run


def test_planner_choice_reaches_build_method():
    problem = toy()
    rng = np.random.default_rng(0)
    greedy = build_method("proposed", problem, rng).plan_or_placement
    best = build_method("proposed:sed", problem, rng, planner="best").plan_or_placement
    assert greedy.bounds == search_c(problem).bounds
    assert best.bounds.lower_s <= greedy.bounds.lower_s
    assert plan_with("greedy", problem).bounds == greedy.bounds
    with pytest.raises(SpecError, match="planner"):
        build_method("proposed", problem, rng, planner="fastest")


def test_cli_plan_and_simulate_default_to_best():
    import json

    from typer.testing import CliRunner

    from chainserve.cli import app
    from chainserve.cli.plan_cmd import DEFAULT_CLUSTER
    from chainserve.model.cluster_file import load_cluster

    greedy = search_c(load_cluster(DEFAULT_CLUSTER))
    planned = CliRunner().invoke(app, ["plan", "--json"])
    assert planned.exit_code == 0, planned.output
    assert json.loads(planned.stdout)["bounds"]["lower"] <= greedy.bounds.lower_s
    simulated = CliRunner().invoke(app, ["simulate", "--requests", "50", "--json"])
    assert simulated.exit_code == 0, simulated.output
    assert "best planner" in json.loads(simulated.stdout)["description"]
    wrong = CliRunner().invoke(app, ["simulate", "--planner", "fastest"])
    assert wrong.exit_code == 2 and "planner" in wrong.stderr
