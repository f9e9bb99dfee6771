"""The batch-aware service model (issue 18): step costs, the iteration-level simulator, planning."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from chainserve.dispatch.jffc import JFFC
from chainserve.methods import dispatcher_for
from chainserve.model.catalogue import gpu_profile, roofline_step_cost
from chainserve.model.cluster_file import problem_from_dict
from chainserve.model.spec import ModelSpec, Problem, Server, SpecError, Workload
from chainserve.model.step_cost import StepCost
from chainserve.plan.csearch import capped_plans, make_plan, search_c
from chainserve.plan.loaded import batch_one_times_s, full_load_times_s
from chainserve.plan.plan_file import layout_from_dict, layout_to_dict
from chainserve.plan.types import Chain, Hop, Placement, Span, chain_time_s
from chainserve.sim.arrivals import Arrivals, ReplayArrivals
from chainserve.sim.batched import BatchedService
from chainserve.sim.engine import simulate
from chainserve.sim.service import EmulatedService

COST = StepCost(0.01, 0.002, 0.012, 0.0005)


def jobs_at(times, prompts, outputs) -> ReplayArrivals:
    """An arrival process that returns the given jobs."""
    return ReplayArrivals(Arrivals(np.array(times, float), np.array(prompts), np.array(outputs)))


def one_server_plan(step: StepCost | None, capacity: int = 4, head: StepCost | None = None):
    server = Server("a", 10, 0.1, 0.2, step=step)
    problem = Problem((server,), ModelSpec("m", 2, 1.0, 0.1), Workload(0.001, prompt_tokens=600, output_tokens=4))
    problem = dataclasses.replace(problem, head_cost=head)
    chain = Chain((Hop(0, 1, 2),), chain_time_s(problem, (Hop(0, 1, 2),)), capacity)
    return make_plan(problem, Placement((Span(0, 1, 2),), 2), (chain,), capacity)


def test_two_jobs_by_hand():
    """Job 0 (600-token prompt: chunks of 256, 256, 88) and job 1 (1 token) arrive together on a
    2-block server, α 10, β 2, α' 12, β' 0.5 ms, τ^c/l_out = 50 ms per step (worked in the comments)."""
    plan = one_server_plan(COST)
    jobs = jobs_at([0.0, 0.0], [600, 1], [4, 4])
    r = simulate(plan, JFFC(plan.chains), jobs, BatchedService(), num_jobs=2)
    # iteration 1 (0 → 0.284): chunk 256 + job 1; 2 (→ 0.564): chunk 256; 3 (→ 0.68): chunk 88 + job 1's
    # 2nd step; then both decode together (28 ms + 50 ms comm each) and job 0's last step alone (24 ms)
    assert r.finished_at.tolist() == pytest.approx([0.96, 0.886])


@pytest.mark.parametrize("second_at", [0.5, 0.25])
def test_an_iteration_start_keeps_its_place_in_its_instant(second_at):
    """One 2-block server, every iteration 0.5 s whatever its batch, no communication, a free head. Job
    0's first step ends at 0.5 s; job 1 reaches the server then (or waits since 0.25 s). The server's
    next start was due at 0.5 s before the head's, whose zero-time iteration sends job 0's second step
    on at 0.5 s too: it waits for the iteration after job 1's (issue 31: the start is pushed only when
    something waits, at its reserved place in the order of the instant)."""
    server = Server("a", 10, 0.1, 0.0, step=StepCost(0.25, 0.0, 0.25, 0.0))
    problem = Problem((server,), ModelSpec("m", 2, 1.0, 0.1), Workload(0.001, prompt_tokens=1, output_tokens=2))
    chain = Chain((Hop(0, 1, 2),), chain_time_s(problem, (Hop(0, 1, 2),)), 4)
    plan = make_plan(problem, Placement((Span(0, 1, 2),), 2), (chain,), 4)
    r = simulate(plan, JFFC(plan.chains), jobs_at([0.0, second_at], [1, 1], [2, 1]), BatchedService(), num_jobs=2)
    assert r.finished_at.tolist() == [1.5, 1.0]


def test_without_step_costs_it_is_the_emulated_model():
    plan = one_server_plan(None, capacity=2)
    jobs = jobs_at([0.0, 0.1, 0.2, 0.25], [5, 500, 5, 5], [4, 8, 2, 4])
    batched = simulate(plan, JFFC(plan.chains), jobs, BatchedService(0.001), num_jobs=4)
    emulated = simulate(plan, JFFC(plan.chains), jobs, EmulatedService(0.001), num_jobs=4)
    assert batched.finished_at.tolist() == pytest.approx(emulated.finished_at.tolist())


def test_the_head_batches_and_adds_its_cost():
    head = StepCost(0.005, 0.001, 0.005, 0.001)
    plain = simulate(
        one_server_plan(COST), JFFC(one_server_plan(COST).chains), jobs_at([0.0], [1], [3]), "batched", num_jobs=1
    )
    plan = one_server_plan(COST, head=head)
    headed = simulate(plan, JFFC(plan.chains), jobs_at([0.0], [1], [3]), "batched", num_jobs=1)
    assert headed.finished_at[0] - plain.finished_at[0] == pytest.approx(3 * 0.006)


@settings(max_examples=25, deadline=None)
@given(
    alpha=st.floats(0.0, 0.02),
    beta=st.floats(0.0005, 0.01),
    prefill_beta=st.floats(0.0, 0.001),
    rate=st.floats(0.5, 20.0),
    seed=st.integers(0, 100),
)
def test_every_job_finishes_no_faster_than_alone(alpha, beta, prefill_beta, rate, seed):
    """Memory is checked on every start by the simulator's ledger; here: every job finishes, and no
    job's service is shorter than its time alone on the chain (batching never speeds one job up)."""
    step = StepCost(alpha, beta, alpha, prefill_beta)
    servers = (Server("a", 12, 0.1, 0.05, step=step), Server("b", 12, 0.1, 0.05, step=step))
    problem = Problem(servers, ModelSpec("m", 4, 1.0, 0.5), Workload(rate, prompt_tokens=50, output_tokens=6))
    try:
        plan = search_c(problem)
    except SpecError:  # no stable plan at this rate for these step costs (hypothesis found λ = 20/s)
        assume(False)
    rng = np.random.default_rng(seed)
    n = 60
    prompts, outputs = rng.integers(1, 700, n), rng.integers(1, 10, n)
    jobs = jobs_at(np.cumsum(rng.exponential(1 / rate, n)), prompts, outputs)
    r = simulate(plan, dispatcher_for("proposed", plan, rng), jobs, "batched", num_jobs=n)
    assert r.num_finished == n
    for i, route in enumerate(r.routes):
        alone = simulate(plan, JFFC(plan.chains), jobs_at([0.0], [prompts[i]], [outputs[i]]), "batched", num_jobs=1)
        if route.hops == alone.routes[0].hops:
            assert r.finished_at[i] - r.started_at[i] >= alone.finished_at[0] * (1 - 1e-9)


def cpu_like(rate: float, step: dict | None):
    """Two A100-80GB and two 3g.40gb slices, LLaMA-2-7B, 2048-token prompts: memory for dozens of jobs
    per server, and a per-session cost β that batching does not amortise (a CPU-like server)."""
    servers = [{"gpu": "a100-80gb", "count": 2, "rtt_ms": 1}, {"gpu": "a100-3g.40gb", "count": 2, "rtt_ms": 1}]
    for entry in servers:
        if step is not None:
            entry["step_cost"] = step
    return problem_from_dict(
        {
            "model": "llama-2-7b",
            "workload": {"arrival_rate": rate, "prompt_tokens": 2048, "output_tokens": 28},
            "servers": servers,
        }
    )


CPU_STEP = {"alpha_ms": 0.5, "beta_ms": 0.6, "prefill_beta_ms": 0.015}


def test_bounds_stay_bounds_and_the_table_times_bracket():
    """Batch-1 times ≤ full-load times; lower bound ≤ score ≤ upper bound; and no simulated job's service
    beats the fastest chain alone (Theorem 4 itself brackets exponential service, not these fixed lengths)."""
    problem = cpu_like(0.5, CPU_STEP)
    plan = search_c(problem)
    one, full = batch_one_times_s(problem, plan.chains), full_load_times_s(problem, plan.chains)
    assert all(a <= b for a, b in zip(one, full, strict=True))
    assert plan.bounds.lower_s <= plan.estimate_s <= plan.bounds.upper_s
    r = simulate(plan, dispatcher_for("proposed", plan, np.random.default_rng(0)), service="batched", num_jobs=800)
    assert np.nanmin(r.finished_at - r.started_at) >= min(one) * (1 - 1e-9)


def test_the_batch_aware_plan_caps_what_the_blind_plan_fills():
    """On the CPU-like cluster the blind plan fills memory with jobs; the batch-aware one caps them,
    and the batched simulator agrees it is faster."""
    aware_problem = cpu_like(0.5, CPU_STEP)
    aware = search_c(aware_problem)
    blind = search_c(cpu_like(0.5, None))
    blind = make_plan(aware_problem, blind.placement, blind.chains, blind.c)  # the same plan, costed
    assert max(ch.capacity for ch in aware.chains) < max(ch.capacity for ch in blind.chains)

    def mean(plan):
        rng = np.random.default_rng(0)
        return simulate(plan, dispatcher_for("proposed", plan, rng), service="batched", num_jobs=800).summary

    assert mean(aware).response.mean_s < 0.5 * mean(blind).response.mean_s


def test_capped_plans_only_lower_capacities():
    plan = search_c(cpu_like(0.5, CPU_STEP))
    for capped in capped_plans(plan):
        assert capped.placement == plan.placement
        assert all(a.capacity <= b.capacity for a, b in zip(capped.chains, plan.chains, strict=True))


def test_cluster_file_step_costs():
    p = cpu_like(1.0, {"alpha_ms": 1, "beta_ms": 0.2, "prefill_alpha_ms": 1.5, "prefill_beta_ms": 0.01, "r2": 0.98})
    assert p.servers[0].step == StepCost(0.001, 0.0002, 0.0015, 0.00001, 0.98)
    assert p.servers[0].tau_p_s == pytest.approx(p.servers[0].step.job_s(2048, 28))
    roofed = cpu_like(1.0, "roofline")
    model = roofed.model
    assert roofed.servers[0].step == roofline_step_cost(
        gpu_profile("a100-80gb"), model.block_size_gb, model.flops_per_token_per_block
    )
    assert cpu_like(1.0, None).servers[0].step is None
    for bad, field in (({"beta_ms": 1}, "alpha_ms"), ({"alpha_ms": 1, "beta_ms": -1}, "beta_ms"), ("x", "step_cost")):
        with pytest.raises(SpecError, match=field):
            cpu_like(1.0, bad)
    with pytest.raises(SpecError, match="roofline"):
        problem_from_dict(
            {
                "model": {"num_blocks": 2, "block_size_gb": 1, "cache_size_gb": 0.1},
                "workload": {"arrival_rate": 1},
                "servers": [{"name": "a", "memory_gb": 9, "tau_c_ms": 1, "step_cost": "roofline"}],
            }
        )


def test_plan_files_keep_step_and_head_costs():
    problem = dataclasses.replace(cpu_like(0.5, CPU_STEP), head_cost=StepCost(0.01, 0.001, 0.01, 0.001))
    plan = search_c(problem)
    back = layout_from_dict(json.loads(json.dumps(layout_to_dict(plan))))
    assert back.problem.servers == problem.servers and back.problem.head_cost == problem.head_cost
    assert back.estimate_s == pytest.approx(plan.estimate_s)
