"""The simulator against queueing theory and its own invariants (chainserve.sim)."""

from __future__ import annotations

import csv
import math
from datetime import datetime

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from chainserve.analysis.records import batch_means_ci, summarize
from chainserve.dispatch.base import FailureOutcome, Route, Start
from chainserve.dispatch.jffc import JFFC
from chainserve.model.catalogue import gpu_profile, model_arch, tau_c_s, tau_p_s
from chainserve.model.spec import ModelSpec, Problem, Server, Workload
from chainserve.plan.csearch import make_plan, plan_for_c
from chainserve.plan.types import Chain, Hop, Placement, Plan, Span, chain_time_s
from chainserve.sim.arrivals import GammaArrivals, PoissonArrivals, TraceArrivals, bundled_trace_path
from chainserve.sim.engine import simulate
from chainserve.sim.memory import MemoryExceeded
from chainserve.sim.service import route_cost


def parallel_plan(tau_p_s: list[float], capacities: list[int], load: float, num_blocks: int = 2) -> Plan:
    """One single-server chain per entry (τ^c = 0), memory for exactly c_k jobs, λ = load·ν."""
    model = ModelSpec("m", num_blocks, 1.0, 0.5)
    servers = tuple(
        Server(f"s{k}", num_blocks * (1.0 + 0.5 * c), t, 0.0)
        for k, (t, c) in enumerate(zip(tau_p_s, capacities, strict=True))
    )
    chains = tuple(
        Chain((Hop(k, 1, num_blocks),), num_blocks * t, c)
        for k, (t, c) in enumerate(zip(tau_p_s, capacities, strict=True))
    )
    nu = sum(c / ch.service_time_s for c, ch in zip(capacities, chains, strict=True))
    problem = Problem(servers, model, Workload(load * nu))
    placement = Placement(tuple(Span(k, 1, num_blocks) for k in range(len(chains))), num_blocks)
    plan = make_plan(problem, placement, chains, None)
    plan.check()
    return plan


def random_plan(seed: int, load: float) -> Plan:
    """GBP-CR + GCA over a random small cluster (exact binary sizes: no float borderline), λ = load·ν."""
    rng = np.random.default_rng(seed)
    num_blocks = int(rng.integers(2, 9))
    model = ModelSpec("m", num_blocks, 1.0, float(rng.choice([0.125, 0.25, 0.5])))
    while True:
        servers = tuple(
            Server(
                f"s{j}",
                float(rng.integers(2, 2 * num_blocks + 4)),
                float(rng.uniform(0.05, 0.5)),
                float(rng.choice([0.0, rng.uniform(0.0, 0.3)])),
            )
            for j in range(rng.integers(2, 9))
        )
        problem = Problem(servers, model, Workload(1e6))
        result = plan_for_c(problem, int(rng.integers(1, 4)))
        if result is not None and result[1].chains:
            plan = result[1]
            return make_plan(
                problem.with_workload(arrival_rate_per_s=load * plan.total_rate_per_s),
                plan.placement,
                plan.chains,
                plan.c,
            )


def erlang_c_wait_s(c: int, arrival_rate: float, rate: float) -> float:
    """Mean waiting time of M/M/c (Erlang C)."""
    a = arrival_rate / rate
    top = a**c / math.factorial(c) * c / (c - a)
    p_wait = top / (sum(a**k / math.factorial(k) for k in range(c)) + top)
    return p_wait / (c * rate - arrival_rate)


def test_one_chain_is_mmc_erlang_c():
    plan = parallel_plan([0.5], [4], load=0.75)  # T = 1 s, c = 4, λ = 3: Erlang C W = 0.509 s
    r = simulate(plan, JFFC(plan.chains), seed=7, num_jobs=150_000, warmup=5_000)
    expected = erlang_c_wait_s(4, 3.0, 1.0)
    ci = batch_means_ci(r.started_at[5_000:] - r.arrived_at[5_000:], num_batches=30, confidence=0.99)
    assert ci.contains(expected), (ci, expected)
    assert ci.half_width < 0.1 * expected
    assert r.summary.service.mean_s == pytest.approx(1.0, rel=0.02)
    assert r.summary.utilisation[0] == pytest.approx(0.75, rel=0.02)
    assert r.summary.throughput_per_s == pytest.approx(3.0, rel=0.02)


def test_littles_law_inside_a_window():
    plan = parallel_plan([0.2, 0.35, 0.6], [3, 2, 4], load=0.8)
    r = simulate(plan, JFFC(plan.chains), seed=3, num_jobs=60_000)
    t1, t2 = r.arrived_at[5_000], r.arrived_at[55_000]
    in_system_s = np.clip(np.minimum(r.finished_at, t2) - np.maximum(r.arrived_at, t1), 0, None).sum()
    arrived = (r.arrived_at >= t1) & (r.arrived_at < t2)
    mean_in_system = in_system_s / (t2 - t1)
    rate = arrived.sum() / (t2 - t1)
    response = (r.finished_at - r.arrived_at)[arrived].mean()
    assert mean_in_system == pytest.approx(rate * response, rel=0.02)


def test_same_seed_same_records_and_every_policy_sees_the_same_draws():
    plan = parallel_plan([0.2, 0.35, 0.6], [3, 2, 4], load=0.9)
    a = simulate(plan, JFFC(plan.chains), seed=11, num_jobs=5_000)
    b = simulate(plan, JFFC(plan.chains), seed=11, num_jobs=5_000)
    assert a.records == b.records and a.summary == b.summary
    c = simulate(plan, JFFC(plan.chains), seed=12, num_jobs=5_000)
    assert not np.array_equal(a.arrived_at, c.arrived_at)
    lazy = simulate(plan, JFFC(plan.chains, thresholds=[0, 2, 4]), seed=11, num_jobs=5_000)
    assert np.array_equal(a.arrived_at, lazy.arrived_at)
    t_a = np.array([route.service_time_s for route in a.routes])
    t_lazy = np.array([route.service_time_s for route in lazy.routes])
    assert not np.array_equal(t_a, t_lazy)  # the policies did route differently …
    service_a = (a.finished_at - a.started_at) / t_a
    service_lazy = (lazy.finished_at - lazy.started_at) / t_lazy
    np.testing.assert_allclose(service_a, service_lazy, rtol=1e-9, atol=1e-9)  # … on the same variates


def test_records_and_summary_agree():
    plan = parallel_plan([0.2, 0.6], [2, 3], load=0.7)
    r = simulate(plan, JFFC(plan.chains), seed=5, num_jobs=3_000, warmup=300)
    records = r.records
    assert len(records) == 2_700 and records[0].job_id == 300
    again = summarize(records, [ch.capacity for ch in plan.chains])
    assert again.response == r.summary.response and again.waiting == r.summary.waiting
    assert again.num_requests == r.summary.num_requests
    assert all(rec.servers == (rec.chain,) for rec in records)  # chain k runs on server k here


class Audited:
    """Wraps a dispatcher; after every call checks arrivals = departures + jobs in the system."""

    def __init__(self, inner):
        self.inner, self.name, self.paging = inner, inner.name, inner.paging
        self.arrived = self.departed = 0

    def _check(self, result):
        assert self.inner.num_waiting + self.inner.num_in_service == self.arrived - self.departed
        return result

    def submit(self, job, now):
        self.arrived += 1
        return self._check(self.inner.submit(job, now))

    def complete(self, job_id, now):
        self.departed += 1
        return self._check(self.inner.complete(job_id, now))

    def fail_server(self, server, now):
        return self._check(self.inner.fail_server(server, now))

    @property
    def num_waiting(self):
        return self.inner.num_waiting

    @property
    def num_in_service(self):
        return self.inner.num_in_service


def test_arrivals_equal_departures_plus_in_system_through_failures():
    plan = parallel_plan([0.2, 0.35, 0.6, 0.3], [3, 2, 4, 1], load=0.6)
    audited = Audited(JFFC(plan.chains))
    r = simulate(plan, audited, seed=2, num_jobs=4_000, failures=[(300.0, 0), (600.0, 2)])
    assert audited.arrived == r.num_jobs == audited.departed == r.num_finished


def test_failure_injection_loses_no_job():
    plan = parallel_plan([0.2, 0.35, 0.6, 0.3], [3, 2, 4, 2], load=0.5)
    base = simulate(plan, JFFC(plan.chains), seed=4, num_jobs=6_000)
    t_fail = float(base.arrived_at[3_000])
    r = simulate(plan, JFFC(plan.chains), seed=4, num_jobs=6_000, failures=[(t_fail, 0)])
    assert r.num_finished == r.num_jobs and r.num_restarts >= 1
    np.testing.assert_array_equal(r.arrived_at, base.arrived_at)  # restarts keep their arrival time
    on_failed = r.chain == 0
    assert np.all(r.finished_at[on_failed] < t_fail)  # nothing finishes on the dead server …
    aborted = (base.chain == 0) & (base.started_at < t_fail) & (base.finished_at > t_fail)
    assert aborted.sum() == r.num_restarts  # … and exactly its jobs in service were restarted
    assert np.all(r.started_at[aborted] >= t_fail) and np.all(r.chain[aborted] != 0)


def test_every_server_failing_leaves_jobs_waiting_not_lost():
    plan = parallel_plan([0.2, 0.35], [2, 2], load=0.5)
    dispatcher = JFFC(plan.chains)
    r = simulate(plan, dispatcher, seed=1, num_jobs=2_000, failures=[(50.0, 0), (50.0, 1)])
    assert 0 < r.num_finished < r.num_jobs
    assert dispatcher.num_waiting == r.num_jobs - r.num_finished and dispatcher.num_in_service == 0


class Sloppy:
    """A policy that may break memory: FIFO queue, a waiting job starts on a random chain with fewer
    than c_k + ``excess`` jobs, half of the time on an equal per-request route (chain ``None``).
    Logs (time, +1/-1, route) for every start and completion."""

    name = "sloppy"
    paging = None  # the paper's slots

    def __init__(self, chains, rng, excess):
        self.routes = [Route.of_chain(k, ch) for k, ch in enumerate(chains)]
        self.limit = [ch.capacity + excess for ch in chains]
        self.rng, self.excess = rng, excess
        self.busy, self.running, self.queue, self.log = [0] * len(chains), {}, [], []

    def _fill(self, now):
        starts = []
        while self.queue:
            free = [k for k, b in enumerate(self.busy) if b < self.limit[k]]
            if not free:
                break
            k = free[self.rng.integers(len(free))]
            route = self.routes[k] if self.rng.random() < 0.5 else Route(self.routes[k].hops, 1.0, None)
            job = self.queue.pop(0)
            self.busy[k] += 1
            self.running[job.job_id] = (k, route)
            self.log.append((now, 1, route))
            starts.append(Start(job, route))
        return starts

    def submit(self, job, now):
        self.queue.append(job)
        return self._fill(now)

    def complete(self, job_id, now):
        k, route = self.running.pop(job_id)
        self.busy[k] -= 1
        self.log.append((now, -1, route))
        return self._fill(now)

    def fail_server(self, server, now):
        return FailureOutcome()

    @property
    def num_waiting(self):
        return len(self.queue)

    @property
    def num_in_service(self):
        return len(self.running)


def first_violation(plan: Plan, log) -> int | None:
    """Index of the first start in ``log`` that overfills a server, by plain GB arithmetic."""
    model = plan.problem.model
    used = {s.server: model.block_size_gb * s.num_blocks for s in plan.placement.spans}
    for index, (_, sign, route) in enumerate(log):
        for hop in route.hops:
            used[hop.server] += sign * model.cache_size_gb * hop.num_blocks
            if sign > 0 and used[hop.server] > plan.problem.servers[hop.server].memory_gb + 1e-9:
                return index
    return None


def with_slack(plan: Plan, rng: np.random.Generator) -> Plan:
    """The same chains with capacities lowered at random (still ≥ 1): memory left over."""
    chains = tuple(Chain(ch.hops, ch.service_time_s, int(rng.integers(1, ch.capacity + 1))) for ch in plan.chains)
    return make_plan(plan.problem, plan.placement, chains, plan.c)


@settings(max_examples=50, deadline=None)
@given(st.integers(0, 10_000), st.floats(0.3, 2.0), st.integers(0, 2))
def test_memory_ledger_flags_exactly_the_overfilling_start(seed, load, excess):
    plan = with_slack(random_plan(seed, load), np.random.default_rng(seed))
    dispatcher = Sloppy(plan.chains, np.random.default_rng(seed), excess)
    try:
        simulate(plan, dispatcher, seed=seed, num_jobs=300)
        raised = False
    except MemoryExceeded:
        raised = True
    bad = first_violation(plan, dispatcher.log)
    assert raised == (bad is not None)
    if excess == 0:  # within capacity on a valid plan: never raises
        assert not raised
    if raised:
        assert bad == len(dispatcher.log) - 1


class Scripted:
    """Starts the i-th arriving job at once on chain ``script[i]``, whatever the capacity."""

    name = "scripted"
    paging = None  # the paper's slots

    def __init__(self, chains, script):
        self.routes = [Route.of_chain(k, ch) for k, ch in enumerate(chains)]
        self.script, self.running = list(script), set()

    def submit(self, job, now):
        self.running.add(job.job_id)
        return [Start(job, self.routes[self.script[job.job_id]])]

    def complete(self, job_id, now):
        self.running.discard(job_id)
        return []

    def fail_server(self, server, now):
        return FailureOutcome()

    num_waiting = 0

    @property
    def num_in_service(self):
        return len(self.running)


@pytest.mark.parametrize(("script", "fits"), [((0, 1, 1), True), ((0, 0, 1), True), ((0, 0, 1, 1), False)])
def test_a_start_beyond_capacity_that_fits_turns_on_exact_checks(script, fits):
    # server 0 hosts blocks 1..2 and 5 block-jobs of cache; chain A = s0 (2 blocks, c = 1),
    # chain B = s1 (block 1) → s0 (block 2, c = 2): reserved 2·1 + 1·2 = 4 of 5.
    problem = Problem(
        (Server("s0", 7.0, 0.5, 0.0), Server("s1", 4.0, 0.5, 0.0)), ModelSpec("m", 2, 1.0, 1.0), Workload(1.0)
    )
    chains = (Chain((Hop(0, 1, 2),), 1.0, 1), Chain((Hop(1, 1, 1), Hop(0, 2, 1)), 1.0, 2))
    plan = make_plan(problem, Placement((Span(0, 1, 2), Span(1, 1, 1)), 2), chains, None)
    plan.check()
    arrivals = PoissonArrivals(1e6)  # all jobs arrive long before any finishes

    def run():
        return simulate(plan, Scripted(plan.chains, script), arrivals, seed=0, num_jobs=len(script))

    if fits:
        assert run().num_finished == len(script)
    else:  # A over capacity (4 of 5), then B's 2nd job, within c_B, makes 6 of 5
        with pytest.raises(MemoryExceeded, match="job 3 .* server 0 would hold 6"):
            run()


def policies(plan: Plan, rng: np.random.Generator):
    """JFFC, a threshold-JFFC, and every policy of the registry (``POLICIES[name](chains, rng, λ)``)
    when it exists."""
    yield JFFC(plan.chains)
    yield JFFC(plan.chains, thresholds=list(range(len(plan.chains))))
    try:
        from chainserve.dispatch.registry import POLICIES
    except ImportError:
        return
    for factory in POLICIES.values():
        yield factory(plan.chains, rng, plan.problem.arrival_rate_per_s)


@settings(max_examples=15, deadline=None)
@given(st.integers(0, 10_000), st.floats(0.5, 1.3))
def test_memory_never_exceeded_and_no_job_lost(seed, load):
    plan = random_plan(seed, load)
    plan.check()
    for dispatcher in policies(plan, np.random.default_rng(seed)):
        audited = Audited(dispatcher)
        r = simulate(plan, audited, seed=seed, num_jobs=400)  # the ledger raises on any overfill
        assert r.num_finished == r.num_jobs == audited.departed, dispatcher.name


def path_routers(problem: Problem, rng: np.random.Generator):
    """(layout, dispatcher) for PETALS and BPRR (WS-RR) where their modules exist and apply."""
    try:
        from chainserve.dispatch.petals_route import PetalsRouter
        from chainserve.dispatch.ws_rr import WsRrRouter
        from chainserve.plan.baselines.bprr import bprr_placement
        from chainserve.plan.baselines.petals import petals_placement
    except ImportError:
        return
    for make_layout, router in (
        (lambda: petals_placement(problem, rng), PetalsRouter),
        (lambda: bprr_placement(problem), WsRrRouter),
    ):
        try:
            layout = make_layout()
        except ValueError:  # the baseline does not apply to this cluster
            continue
        yield layout, router(layout)


@settings(max_examples=15, deadline=None)
@given(st.integers(0, 10_000), st.floats(0.5, 1.3), st.booleans())
def test_path_routers_keep_to_their_cache_pools_and_lose_no_job(seed, load, with_failure):
    problem = random_plan(seed, load).problem
    for layout, dispatcher in path_routers(problem, np.random.default_rng(seed)):
        audited = Audited(dispatcher)
        failures = [(20.0, layout.placement.spans[0].server)] if with_failure else []
        r = simulate(layout, audited, seed=seed, num_jobs=300, failures=failures)  # pools are checked
        assert r.num_finished + dispatcher.num_waiting == r.num_jobs == audited.arrived
        assert np.all(r.chain == -1)  # per-request routes, no chains


def test_trace_replay_reads_the_bundled_trace_with_scale_and_slice():
    with open(bundled_trace_path(), newline="") as f:
        rows = list(csv.DictReader(f))[100:600]
    stamps = [datetime.fromisoformat(r["TIMESTAMP"][:26]) for r in rows]  # µs precision
    expected = np.array([(t - stamps[0]).total_seconds() * 0.5 for t in stamps])
    workload = Workload(1.0)
    arrivals = TraceArrivals(time_scale=0.5, start=100, count=500).sample(workload, None, None)
    assert len(arrivals) == 500 and arrivals.times_s[0] == 0.0
    np.testing.assert_allclose(arrivals.times_s, expected, atol=1e-6)
    assert arrivals.prompt_tokens.tolist() == [int(r["ContextTokens"]) for r in rows]
    assert arrivals.output_tokens.tolist() == [int(r["GeneratedTokens"]) for r in rows]
    first = TraceArrivals(time_scale=0.5, start=100, count=500).sample(workload, 20, None)
    np.testing.assert_array_equal(first.times_s, arrivals.times_s[:20])
    with pytest.raises(ValueError, match="num_jobs"):
        TraceArrivals(start=100, count=500).sample(workload, 501, None)
    with pytest.raises(ValueError, match="exceeds"):
        TraceArrivals(start=8_800, count=100).sample(workload, None, None)


def test_trace_replay_with_token_service():
    plan = parallel_plan([0.01, 0.02], [8, 8], load=0.5)
    r = simulate(plan, JFFC(plan.chains), TraceArrivals(time_scale=0.2, count=1_000), "token", seed=0)
    assert r.num_finished == 1_000
    # no GPU profile: τ^p_j(l_in, l_out) = t_o + (τ^p_j − t_o)·(l_in + l_out − 1)/(l̄_in + l̄_out − 1)
    w = plan.problem.workload
    tau = np.array([plan.problem.servers[route.hops[0].server].tau_p_s for route in r.routes])
    share = (r.prompt_tokens + r.output_tokens - 1) / (w.prompt_tokens + w.output_tokens - 1)
    expected = 2 * (0.001 + (tau - 0.001) * share)  # two blocks per chain, τ^c = 0
    np.testing.assert_allclose(r.finished_at - r.started_at, expected, rtol=1e-9)


@pytest.mark.parametrize("cv", [0.5, 1.0, 2.0])
def test_gamma_interarrivals_have_the_requested_mean_and_cv(cv):
    a = GammaArrivals(cv=cv, rate_per_s=4.0).sample(Workload(1.0), 200_000, np.random.default_rng(9))
    gaps = np.diff(np.concatenate(([0.0], a.times_s)))
    assert gaps.mean() == pytest.approx(0.25, rel=0.01 * max(cv, 1.0))
    assert gaps.std() / gaps.mean() == pytest.approx(cv, rel=0.03)
    assert a.prompt_tokens.tolist() == [2000] * 200_000  # the workload's means, unless told otherwise


def test_poisson_default_rate_is_the_workload_rate():
    a = PoissonArrivals().sample(Workload(2.5), 100_000, np.random.default_rng(1))
    assert len(a) / a.times_s[-1] == pytest.approx(2.5, rel=0.02)
    with pytest.raises(ValueError):
        PoissonArrivals(-1.0)


def test_token_service_reproduces_chain_time_at_mean_lengths():
    arch, spec = model_arch("bloom-176b"), model_arch("bloom-176b").spec()
    servers = tuple(
        Server(
            f"s{j}",
            gpu_profile(g).memory_gb,
            tau_p_s(gpu_profile(g), arch, spec.block_size_gb, 2000, 20),
            tau_c_s(0.02 * (j + 1), 20),
            gpu=g,
        )
        for j, g in enumerate(["a100-3g.40gb", "a100-2g.20gb", "a100-3g.40gb"])
    )
    problem = Problem(servers, spec, Workload(0.2))
    hops = (Hop(0, 1, 28), Hop(1, 29, 14), Hop(2, 43, 28))
    cost = route_cost(problem, hops)
    assert cost.time_s(2000, 20) == pytest.approx(chain_time_s(problem, hops), rel=1e-12)
    bandwidth = [gpu_profile(s.gpu).bandwidth_gb_per_s for s in servers]
    one_more_token = sum(
        h.num_blocks * spec.block_size_gb / bandwidth[h.server] + servers[h.server].tau_c_s / 20 for h in hops
    )  # s_m/b_j per block, one round trip
    assert cost.time_s(2000, 21) - cost.time_s(2000, 20) == pytest.approx(one_more_token, rel=1e-9)
    plain = Problem(tuple(Server(s.name, s.memory_gb, s.tau_p_s, s.tau_c_s) for s in servers), spec, Workload(0.2))
    assert route_cost(plain, hops).time_s(2000, 20) == pytest.approx(chain_time_s(plain, hops), rel=1e-12)


def test_summary_json_has_the_agreed_shape():
    plan = parallel_plan([0.3], [2], load=0.5)
    out = simulate(plan, JFFC(plan.chains), seed=0, num_jobs=500).summary.to_json()
    assert out["requests"] == 500 and out["throughput"] > 0
    for key in ("response", "waiting", "service"):
        assert set(out[key]) == {"mean", "p50", "p95", "p99"}
        assert out[key]["p50"] <= out[key]["p95"] <= out[key]["p99"]
