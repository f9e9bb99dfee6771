"""Theorem 4 (paper §2.5) against simulation: on random plans, JFFC's simulated mean response time
lies between the birth–death lower and upper bounds.

Statistics: each plan gets one long run (Poisson arrivals, exponential service, load ρ in
[0.5, 0.8], 10 % warm-up dropped) and a batch-means interval for its mean response time. The
intervals are Bonferroni-corrected so that all of them hold together with probability 99 %: the
whole test is a 99 % statement, not 99 % per plan (with ~60 plans and JFFC often close to the lower
bound, per-plan 99 % intervals would miss somewhere far too often). Seeds are fixed: no flakiness.
"""

from __future__ import annotations

import numpy as np
import pytest

from chainserve.analysis.records import batch_means_ci
from chainserve.dispatch.jffc import JFFC
from chainserve.model.spec import ModelSpec, Problem, Server, Workload
from chainserve.plan.csearch import make_plan, plan_for_c
from chainserve.plan.types import Plan
from chainserve.sim.engine import simulate

NUM_PLANS = 60
NUM_JOBS = 40_000
WARMUP = 4_000
FAMILY_CONFIDENCE = 0.99


def random_plan(seed: int) -> Plan:
    """GBP-CR(c) + GCA over a random heterogeneous cluster, λ = ρ·ν with ρ ~ U(0.5, 0.8)."""
    rng = np.random.default_rng(seed)
    num_blocks = int(rng.integers(2, 13))
    model = ModelSpec("m", num_blocks, 1.0, float(rng.choice([0.1, 0.25, 0.5])))
    while True:
        servers = tuple(
            Server(
                f"s{j}",
                float(rng.uniform(1.5, 2.5 * num_blocks)),
                float(rng.uniform(0.02, 0.6)),
                float(rng.uniform(0.0, 0.5)),
            )
            for j in range(int(rng.integers(2, 13)))
        )
        problem = Problem(servers, model, Workload(1e6))  # place every server GBP-CR reaches
        result = plan_for_c(problem, int(rng.integers(1, 5)))
        if result is not None and result[1].chains:
            plan = result[1]
            load = rng.uniform(0.5, 0.8)
            busy = problem.with_workload(arrival_rate_per_s=load * plan.total_rate_per_s)
            return make_plan(busy, plan.placement, plan.chains, plan.c)


@pytest.mark.slow
def test_simulated_jffc_mean_lies_between_the_theorem_4_bounds():
    per_plan = 1 - (1 - FAMILY_CONFIDENCE) / NUM_PLANS
    gaps = []
    for seed in range(NUM_PLANS):
        plan = random_plan(seed)
        r = simulate(plan, JFFC(plan.chains), seed=1_000 + seed, num_jobs=NUM_JOBS, warmup=WARMUP)
        response = r.finished_at[WARMUP:] - r.arrived_at[WARMUP:]
        ci = batch_means_ci(response, num_batches=30, confidence=per_plan)
        low, high = plan.bounds.lower_s, plan.bounds.upper_s
        assert low - ci.half_width <= ci.mean <= high + ci.half_width, (seed, low, ci, high)
        assert ci.half_width < 0.2 * ci.mean, (seed, ci)  # the runs are long enough to say something
        gaps.append((high - low) / low)
    assert np.median(gaps) > 0.01  # heterogeneous chains: the bounds are not all equal
