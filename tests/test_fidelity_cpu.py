"""The runtime's own CPU per job that the fidelity report takes off the torch cluster's shared host
(issue 31, :func:`chainserve.experiments.fidelity.runtime_cpu_per_job`), on a hand-checked plan."""

from __future__ import annotations

import dataclasses

import numpy as np
from tests.test_batched_core import two_servers_plan

from chainserve.experiments.fidelity import runtime_cpu_per_job
from chainserve.experiments.live import Measured
from chainserve.model.step_cost import StepCost


def measured(cpu_s: float | None, completed: int = 2) -> Measured:
    times = np.ones(completed)
    return Measured(completed, completed, times, 0 * times, times, times, times, times, 10.0, cpu_s=cpu_s)


def test_cpu_beyond_the_profiled_compute_per_job():
    # one-block hops, α = β = 0.5 s: a one-token job alone computes 1 s on its chain; no head cost
    plan = two_servers_plan(StepCost(0.5, 0.5, 0.5, 0.5))
    assert runtime_cpu_per_job(plan, measured(5.0), 1, 1) == 1.5  # 2.5 s per job, 1 s of it compute
    # the head's l_out batches of one count as compute too: 3 tokens are 3 s on the hop (a one-token
    # prefill and two decodes, 1 s each) and 3 head batches of 0.2 s
    head = dataclasses.replace(plan, problem=dataclasses.replace(plan.problem, head_cost=StepCost(0.1, 0.1, 0.1, 0.1)))
    assert runtime_cpu_per_job(head, measured(8.0), 1, 3) == 4.0 - 3.0 - 3 * 0.2


def test_no_measure_or_less_cpu_than_compute_is_zero():
    plan = two_servers_plan(StepCost(0.5, 0.5, 0.5, 0.5))
    assert runtime_cpu_per_job(plan, measured(None), 1, 1) == 0.0
    assert runtime_cpu_per_job(plan, measured(1.0), 1, 1) == 0.0  # 0.5 s per job < 1 s of compute
    assert runtime_cpu_per_job(plan, measured(5.0, completed=0), 1, 1) == 0.0
