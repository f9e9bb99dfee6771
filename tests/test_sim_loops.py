"""One loop for failures, plan changes and every service model (issue 31, :mod:`chainserve.sim.loop`):
a hand-checked failure, no job lost, memory checked on every start (the loop raises otherwise), the
batched model through failures and plan changes, and the job-level fast path pinned to the general
loop (same seed, same records)."""

import dataclasses
import math
from pathlib import Path

import numpy as np
import pytest

from chainserve.adapt.controller import AdaptConfig, AdaptiveController, plan_for_rate
from chainserve.dispatch.base import Route
from chainserve.dispatch.jffc import JFFC
from chainserve.methods import build_method, dispatcher_for
from chainserve.model.cluster_file import load_cluster
from chainserve.model.spec import ModelSpec, Problem, Server, Workload
from chainserve.model.step_cost import StepCost
from chainserve.plan.csearch import make_plan
from chainserve.plan.types import Chain, Hop, Placement, Span
from chainserve.sim.arrivals import Arrivals, PiecewiseArrivals, PoissonArrivals, ReplayArrivals
from chainserve.sim.batched import BatchedService
from chainserve.sim.engine import simulate
from chainserve.sim.events import Failure
from chainserve.sim.loop import run_loop
from chainserve.sim.memory import MemoryExceeded, MemoryLedger
from chainserve.sim.service import service_model

BLOOM = load_cluster(Path(__file__).resolve().parents[1] / "examples" / "paper-sim-bloom-20.yaml")


def one_slot_plan():
    """One server, one block, cache for exactly one job, a job takes 1 s (emulated service, l_out = 1)."""
    problem = Problem((Server("a", 2.0, 1.0, 0.0),), ModelSpec("m", 1, 1.0, 1.0), Workload(0.5, output_tokens=1))
    return make_plan(problem, Placement((Span(0, 1, 1),), 1), (Chain((Hop(0, 1, 1),), 1.0, 1),), 1)


@pytest.mark.parametrize("recover", [False, True])
def test_hand_checked_failure_and_return(recover):
    # jobs at 0 and 0.5; the server dies at 0.7 (job 0 aborted, job 1 waiting) and is back at 2.7:
    # job 0 runs again 2.7–3.7, job 1 then 3.7–4.7. With recovery the plan is recomposed on the
    # return (nothing covers while it is down): job 1 starts in the new plan at once but waits for the
    # cache job 0 holds, as the runtime's hold does.
    plan = one_slot_plan()
    jobs = ReplayArrivals(Arrivals(np.array([0.0, 0.5]), np.array([1, 1]), np.array([1, 1])))
    r = simulate(plan, JFFC(plan.chains), jobs, "emulated", failures=[Failure(0.7, 0, 2.0)], recover=recover)
    np.testing.assert_allclose(r.started_at, [2.7, 3.7])
    np.testing.assert_allclose(r.finished_at, [3.7, 4.7])
    assert (r.num_restarts, r.num_retried, r.num_recomposed) == (1, 1, int(recover))


def bloom_run(failures, recover, service="exponential", seed=3, num_jobs=3_000):
    plan = plan_for_rate(BLOOM, "greedy", 0.3)
    return plan, simulate(
        plan, JFFC(plan.chains), None, service, seed=seed, num_jobs=num_jobs, failures=failures, recover=recover
    )


@pytest.mark.parametrize("service", ["exponential", "token"])
def test_recovery_loses_no_job_and_keeps_memory(service):
    plan, base = bloom_run((), False, service)
    t_fail = float(base.arrived_at[1_000])
    victim = plan.chains[0].servers[0]
    _, r = bloom_run([Failure(t_fail, victim, 600.0)], True, service)
    assert r.num_finished == r.num_jobs  # memory is checked on every start: the loop raises otherwise
    assert r.num_retried >= 1 and r.num_restarts >= r.num_retried
    assert r.num_recomposed == 2  # around the dead server, then back to the placed plan
    aborted = (base.started_at < t_fail) & (base.finished_at > t_fail) & (base.chain == 0)
    assert aborted.sum() >= 1
    assert np.all(r.started_at[aborted] >= t_fail)  # they ran again after the failure
    down = (r.started_at > t_fail) & (r.started_at < t_fail + 600.0)
    assert all(victim not in r.routes[i].servers for i in np.flatnonzero(down))  # nothing starts on it


def test_a_server_that_never_returns_is_recomposed_around():
    plan, r = bloom_run([Failure(200.0, plan_for_rate(BLOOM, "greedy", 0.3).chains[0].servers[0])], True)
    assert r.num_finished == r.num_jobs and r.num_recomposed == 1


@pytest.mark.parametrize("service", ["exponential", "token"])
def test_fast_path_equals_the_general_loop(service):
    # a failure that never returns takes the fast path; the same one "back at infinity" the general
    # loop: same seed, same records
    plan = plan_for_rate(BLOOM, "greedy", 0.3)
    victims = [(400.0, plan.chains[0].servers[0]), (900.0, plan.chains[-1].servers[-1])]
    _, fast = bloom_run(victims, False, service)
    _, loop = bloom_run([Failure(t, j, math.inf) for t, j in victims], False, service)
    assert fast.num_restarts >= 1
    assert fast.records == loop.records
    np.testing.assert_array_equal(fast.started_at, loop.started_at)
    assert (fast.num_restarts, fast.num_retried) == (loop.num_restarts, loop.num_retried)
    assert fast.summary == loop.summary


def test_failures_and_plan_changes_in_one_run():
    """Issue 31: a server fails and comes back while the controller adapts to a rate that triples
    (the runtime's rules: no decision while a server is down or a change runs; recovery recomposes
    the plan last placed); no job is lost and memory is never exceeded (the loop raises)."""
    plan = plan_for_rate(BLOOM, "greedy", 0.3)
    arrivals = PiecewiseArrivals((0.0, 1500.0), (0.3, 0.9), 5000.0)
    victim = plan.chains[0].servers[0]
    failures = [Failure(600.0, victim, 300.0), Failure(2500.0, victim, 200.0)]
    for recover in (False, True):
        r = simulate(
            plan, JFFC(plan.chains), arrivals, seed=0, num_jobs=3000, failures=failures, recover=recover,
            controller=AdaptiveController(BLOOM, plan, AdaptConfig()),
        )  # fmt: skip
        assert r.num_finished == 3000 and r.num_restarts >= 1
        assert r.transitions, "the controller must change the plan"
        assert all(not 600.0 <= t.change.time_s < 900.0 for t in r.transitions)  # never while the server is down
    during = [Failure(600.0, victim, 300.0), Failure(1530.0, 1, 40.0)]  # the first change runs 1521–1601 s
    with pytest.raises(ValueError, match="during a plan change is not simulated"):
        simulate(
            plan, JFFC(plan.chains), arrivals, seed=0, num_jobs=3000, failures=during,
            controller=AdaptiveController(BLOOM, plan, AdaptConfig()),
        )  # fmt: skip


def bloom_with_steps():
    """The BLOOM cluster with a step cost on every server (batching pays), at 0.3/s."""
    servers = tuple(
        dataclasses.replace(s, step=StepCost(s.tau_p_s / 40, s.tau_p_s / 400, s.tau_p_s / 40, s.tau_p_s / 40_000))
        for s in BLOOM.servers
    )
    return plan_for_rate(dataclasses.replace(BLOOM, servers=servers), "greedy", 0.3)


def test_batched_failure_recovers_every_job():
    plan = bloom_with_steps()
    jobs = PoissonArrivals()
    base = simulate(plan, JFFC(plan.chains), jobs, BatchedService(), seed=2, num_jobs=600)
    t_fail = float(base.arrived_at[300])
    victim = plan.chains[0].servers[-1]
    r = simulate(
        plan, JFFC(plan.chains), jobs, BatchedService(), seed=2, num_jobs=600,
        failures=[Failure(t_fail, victim, 120.0)], recover=True,
    )  # fmt: skip
    assert r.num_finished == r.num_jobs and r.num_retried >= 1 and r.num_recomposed == 2
    aborted = (base.started_at < t_fail) & (base.finished_at > t_fail) & (base.chain == 0)
    assert np.all(r.started_at[aborted] >= t_fail)
    assert np.all(r.finished_at[aborted] - r.started_at[aborted] > 0)


def test_batched_adapts():
    profile = PiecewiseArrivals((0.0, 1200.0), (0.3, 0.9), 2400.0)
    plan = plan_for_rate(BLOOM, "greedy", 0.3)
    controller = AdaptiveController(BLOOM, plan, AdaptConfig())
    r = simulate(plan, JFFC(plan.chains), profile, BatchedService(), seed=0, controller=controller)
    assert r.num_finished == r.num_jobs and len(r.transitions) >= 1


@pytest.mark.parametrize("service", ["exponential", "token"])
def test_job_level_fast_path_equals_the_general_loop_without_failures(service):
    plan = plan_for_rate(BLOOM, "greedy", 0.3)
    fast = simulate(plan, JFFC(plan.chains), None, service, seed=7, num_jobs=2_000)
    arrival_rng, service_rng = (np.random.default_rng(s) for s in np.random.SeedSequence(7).spawn(2))
    stream = PoissonArrivals().sample(plan.problem.workload, 2_000, arrival_rng)
    duration = service_model(service).sampler(plan.problem, stream, service_rng)
    loop = run_loop(plan, JFFC(plan.chains), None, lambda layout: JFFC(layout.chains), stream, duration)
    np.testing.assert_array_equal(fast.started_at, np.frombuffer(loop.started, dtype=np.float64))
    np.testing.assert_array_equal(fast.finished_at, np.frombuffer(loop.finished, dtype=np.float64))
    np.testing.assert_array_equal(fast.chain, np.frombuffer(loop.chain_of, dtype=np.int64))


@pytest.mark.parametrize("seed", range(4))
def test_overlapping_outages_lose_no_job(seed):
    """Random servers of the plan fail at random times for random durations, overlapping (at times
    nothing covers the model): every job finishes, in every service model's loop."""
    plan = plan_for_rate(BLOOM, "greedy", 0.3)
    rng = np.random.default_rng(seed)
    placed = sorted({j for ch in plan.chains for j in ch.servers})
    failures = [
        Failure(float(rng.uniform(0, 3000)), int(rng.choice(placed)), float(rng.exponential(300))) for _ in range(8)
    ]
    for service, jobs in (("exponential", 1_500), ("batched", 300)):
        model = BatchedService() if service == "batched" else service
        r = simulate(plan, JFFC(plan.chains), None, model, seed=seed, num_jobs=jobs, failures=failures, recover=True)
        assert r.num_finished == r.num_jobs, service
        assert np.all(r.finished_at >= r.started_at) and np.all(r.started_at >= r.arrived_at)


def test_paged_cache_through_failures():
    """KV cache by tokens (issue 30): the fast path (a failure that never returns) and the general loop
    give the same records, and with recovery every job finishes."""
    plan = plan_for_rate(BLOOM.with_workload(arrival_rate_per_s=0.3), "greedy", 0.3)
    problem = dataclasses.replace(plan.problem, model=dataclasses.replace(plan.problem.model, max_tokens=4096))
    plan = dataclasses.replace(plan, problem=problem)

    def paged(layout):
        return dispatcher_for("proposed", layout, np.random.default_rng(0), page_tokens=16)

    victim = plan.chains[0].servers[0]
    fast = simulate(plan, paged(plan), None, "token", seed=1, num_jobs=2_000, failures=[(500.0, victim)])
    loop = simulate(
        plan, paged(plan), None, "token", seed=1, num_jobs=2_000, failures=[Failure(500.0, victim, math.inf)]
    )
    assert fast.num_restarts >= 1 and fast.records == loop.records
    r = simulate(
        plan, paged(plan), None, "token", seed=1, num_jobs=2_000, failures=[Failure(500.0, victim, 300.0)],
        recover=True, make_dispatcher=paged,
    )  # fmt: skip
    assert r.num_finished + r.num_refused == r.num_jobs and r.num_recomposed == 2


def test_one_ledger_for_both_loops():
    """The job-level fast path and the general loop count cache in the same ledger
    (:class:`~chainserve.sim.memory.MemoryLedger`): what each server holds, whether it is alive, its
    limit and its jobs' cache; a server is reloaded only once its jobs' cache is gone."""
    plan = one_slot_plan()
    ledger = MemoryLedger(plan)
    route = Route.of_chain(0, plan.chains[0])
    assert ledger.limits == [1] and ledger.has_room(route)
    ledger.admit(0, route, 0.0)
    assert not ledger.has_room(route)
    with pytest.raises(MemoryExceeded, match="would hold 2 block-jobs"):
        ledger.admit(1, route, 0.0)
    with pytest.raises(RuntimeError, match="unloaded while its jobs hold"):
        ledger.load(0, Span(0, 1, 1))
    ledger.release(route)
    ledger.alive[0] = False
    with pytest.raises(MemoryExceeded, match="dead"):
        ledger.check(2, route, 1.0)
    ledger.load(0, Span(0, 1, 1))
    assert ledger.loaded == [Span(0, 1, 1)] and ledger.num_unsafe  # after a reload, no fast path


def test_the_batched_model_keeps_a_path_placement_in_its_pools():
    """PETALS' per-request paths under the batched model (the general loop): its cache pools bound every start."""
    problem = plan_for_rate(BLOOM, "greedy", 0.3).problem
    setup = build_method("petals", problem, np.random.default_rng(0), "greedy")
    dispatcher = setup.make_dispatcher(np.random.default_rng(1), None)
    r = simulate(setup.plan_or_placement, dispatcher, None, "batched", seed=0, num_jobs=300)
    assert r.num_finished == r.num_jobs
