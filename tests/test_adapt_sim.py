"""The adaptive controller driving the simulator (chainserve.sim.loop): a step in the rate is
followed by a re-plan, no job is lost, the memory invariant holds throughout (the engine raises
otherwise), and a constant rate leaves the plan alone."""

from pathlib import Path

import numpy as np

from chainserve.adapt.controller import AdaptConfig, AdaptiveController, plan_for_rate
from chainserve.dispatch.jffc import JFFC
from chainserve.model.cluster_file import load_cluster
from chainserve.sim.arrivals import PiecewiseArrivals
from chainserve.sim.engine import simulate

BLOOM = load_cluster(Path(__file__).resolve().parents[1] / "examples" / "paper-sim-bloom-20.yaml")


def run(rates, seed=0):
    profile = PiecewiseArrivals((0.0, 1200.0, 2400.0)[: len(rates)], rates, 1200.0 * len(rates))
    plan = plan_for_rate(BLOOM, "greedy", rates[0])
    controller = AdaptiveController(BLOOM, plan, AdaptConfig())
    return controller, simulate(plan, JFFC(plan.chains), profile, seed=seed, controller=controller)


def test_step_up_and_down_replans_and_loses_nothing():
    controller, result = run((0.3, 0.9, 0.3))
    assert result.num_finished == result.num_jobs
    # up at 0.9/s to a plan with more cache per block (larger c), back at 0.3/s to a smaller one; the
    # up side alarms early (asymmetric), so a short segment's overshoot may get one correction
    assert [t.change for t in result.transitions] == controller.changes
    assert 2 <= len(result.transitions) <= 4
    up = result.transitions[0]
    down = next(t for t in result.transitions if t.change.time_s > 2400)
    assert up.change.reason == "rate_up" and down.change.reason == "rate_down"
    assert 1200 < up.change.time_s < 1200 + 120  # found within two minutes
    assert 2400 < down.change.time_s < 2400 + 180
    assert up.change.new_c > up.change.old_c and up.change.kind == "replace"
    assert down.change.new_c < down.change.old_c and down.change.rate_per_s < 0.6
    # planned for the upper confidence bound of the new rate, not below the true one by much
    assert up.change.rate_per_s > 0.8
    assert 0 < up.duration_s < 300
    assert np.all(result.started_at >= result.arrived_at)


def test_constant_rate_keeps_the_plan():
    assert all(not run((0.3,), seed)[1].transitions for seed in range(3))
