"""Dispatch policies (dispatch/jffc.py, per_chain.py, registry.py): hand-checked decision sequences and
invariants every policy must keep (capacity, work conservation, FIFO, conservation of jobs, failures)."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from chainserve.dispatch.base import Job
from chainserve.dispatch.jffc import JFFC
from chainserve.dispatch.per_chain import JIQ, JSQ, SED, PerChainDispatcher, RandomDispatch, SpeedAwareJSQ
from chainserve.dispatch.registry import POLICIES
from chainserve.plan.types import Chain, Hop


def chain(time_s, capacity, *servers):
    return Chain(tuple(Hop(s, i + 1, 1) for i, s in enumerate(servers)), time_s, capacity)


def run(d, num_jobs, t0=0.0):
    """Submit jobs t0, t0+1, …; return {job_id: chain} of the ones that started."""
    return {s.job.job_id: s.route.chain for i in range(num_jobs) for s in d.submit(Job(int(t0) + i, t0 + i), t0 + i)}


# --- hand-checked sequences ---


def test_jffc_fastest_free_then_central_fifo():
    d = JFFC([chain(2.0, 1, 1), chain(1.0, 2, 0)])  # chain 1 is the fast one
    assert run(d, 4) == {0: 1, 1: 1, 2: 0}
    assert d.num_waiting == 1
    assert [(s.job.job_id, s.route.chain) for s in d.complete(0, 5.0)] == [(3, 1)]
    assert d.complete(2, 6.0) == [] and d.state.busy == [0, 2]


def test_threshold_jffc_keeps_slow_chain_until_queue_exceeds_threshold():
    d = JFFC([chain(1.0, 1, 0), chain(10.0, 1, 1)], thresholds=[0, 1])
    assert d.name == "threshold-jffc"
    assert run(d, 2) == {0: 0}  # queue of 1 is not > 1: job 1 waits for the fast chain
    assert [(s.job.job_id, s.route.chain) for s in d.submit(Job(2, 2.0), 2.0)] == [(1, 1)]  # queue 2 > 1
    assert [(s.job.job_id, s.route.chain) for s in d.complete(0, 3.0)] == [(2, 0)]


def test_threshold_jffc_after_the_fast_chain_dies_serves_short_queues():
    d = JFFC([chain(1.0, 1, 0), chain(10.0, 1, 1), chain(20.0, 1, 2)], thresholds=[0, 3, 5])
    assert run(d, 2) == {0: 0}
    out = d.fail_server(0, 2.0)  # job 0 aborted; queue [0, 1] is below the slow chain's threshold 3
    assert [(s.job.job_id, s.route.chain) for s in out.starts] == [(0, 1)]
    assert d.threshold_by_rank == (0, 0, 5) and d.num_waiting == 1


def test_jffc_rejects_thresholds_of_wrong_length_or_order():
    chains = [chain(1.0, 1, 0), chain(2.0, 1, 1)]
    for bad in ([0], [0, 1, 2], [0, -1], [2, 0]):
        with pytest.raises(ValueError, match="thresholds"):
            JFFC(chains, bad)


def test_sed_expected_delay_and_ties_to_fastest():
    d = SED([chain(1.0, 1, 0), chain(3.0, 2, 1)])
    # job: delay on A (T=1, c=1) vs B (T=3, c=2) → 0: 1 vs 3; 1: 2 vs 3; 2: 3 vs 3 (tie → A);
    # 3: 4 vs 3; 4: 4 vs 3; 5: 4 vs 3 + 1·3/2 = 4.5
    assert run(d, 6) == {0: 0, 3: 1, 4: 1}
    assert [len(q) for q in d.queues] == [3, 0]
    assert [(s.job.job_id, s.route.chain) for s in d.complete(0, 9.0)] == [(1, 0)]


def test_speed_aware_jsq_least_jobs_per_slot_ties_to_fastest():
    d = SpeedAwareJSQ([chain(2.0, 2, 1), chain(1.0, 1, 0)])
    # n/c on (slow c=2, fast c=1): 0: 0 vs 0 → fast; 1: 0 vs 1 → slow; 2: .5 vs 1 → slow; 3: 1 vs 1 → fast
    assert run(d, 4) == {0: 1, 1: 0, 2: 0}
    assert [len(q) for q in d.queues] == [0, 1]
    assert [(s.job.job_id, s.route.chain) for s in d.complete(0, 9.0)] == [(3, 1)]


def test_jsq_breaks_ties_uniformly():
    counts = np.zeros(3)
    for seed in range(300):
        d = JSQ([chain(1.0, 1, 0), chain(5.0, 1, 1), chain(2.0, 2, 2)], np.random.default_rng(seed))
        picks = run(d, 2)
        counts[picks[0]] += 1
        assert picks[1] != picks[0]  # the chosen chain now has n/c > 0, two others 0
    assert counts.min() > 60  # each ~100 of 300


def test_jiq_prefers_idle_chains_then_uniform():
    counts = np.zeros(2)
    for seed in range(200):
        d = JIQ([chain(1.0, 1, 0), chain(5.0, 1, 1)], np.random.default_rng(seed))
        assert sorted(run(d, 2).values()) == [0, 1]  # the second job finds the only idle chain
        assert run(d, 1, t0=2.0) == {}  # nobody idle: the job queues at a random chain
        counts += [len(q) for q in d.queues]
    assert counts.min() > 70  # each ~100 of 200


def test_random_is_uniform_over_live_chains():
    counts = np.zeros(3)
    for seed in range(300):
        d = RandomDispatch([chain(1.0, 9, 0), chain(5.0, 9, 1), chain(9.0, 9, 2)], np.random.default_rng(seed))
        d.fail_server(2, 0.0)
        counts[next(iter(run(d, 1).values()))] += 1
    assert counts[2] == 0 and counts[:2].min() > 120  # each ~150 of 300


def test_per_chain_failure_requeues_in_arrival_order_to_live_chains():
    # chain 0 through servers 0 and 2, chain 1 through server 1; both capacity 1
    d = SpeedAwareJSQ([chain(1.0, 1, 0, 2), chain(2.0, 1, 1)])
    assert run(d, 4) == {0: 0, 1: 1}  # jobs 2 (→ chain 0) and 3 (→ chain 1) queue
    out = d.fail_server(2, 5.0)
    assert [j.job_id for j in out.aborted] == [0] and out.starts == ()
    assert [[j.job_id for j in q] for q in d.queues] == [[], [0, 2, 3]]  # older jobs go first
    assert d.num_waiting == 3 and d.num_in_service == 1
    assert [(s.job.job_id, s.route.chain) for s in d.complete(1, 6.0)] == [(0, 1)]
    assert d.fail_server(1, 7.0).aborted[0].job_id == 0
    assert d.num_waiting == 3 and d.num_in_service == 0 and run(d, 1, t0=8.0) == {}
    assert [j.job_id for j in d.unassigned] == [0, 2, 3, 8]


def test_jffc_failure_puts_aborted_jobs_at_the_head():
    d = JFFC([chain(1.0, 1, 0), chain(2.0, 1, 1), chain(3.0, 1, 2)])
    assert run(d, 4) == {0: 0, 1: 1, 2: 2}
    out = d.fail_server(0, 5.0)
    assert [j.job_id for j in out.aborted] == [0] and out.starts == ()
    assert [j.job_id for j in d.queue] == [0, 3]
    assert [(s.job.job_id, s.route.chain) for s in d.complete(2, 6.0)] == [(0, 2)]


def test_registry_builds_every_policy_by_name():
    chains = [chain(1.0, 2, 0), chain(4.0, 1, 1)]
    assert set(POLICIES) == {"jffc", "threshold-jffc", "sed", "sa-jsq", "jsq", "jiq", "random"}
    for name, factory in POLICIES.items():
        d = factory(chains, np.random.default_rng(0), 0.5)
        assert d.name == name or (name == "threshold-jffc" and isinstance(d, JFFC))
        assert len(d.submit(Job(0, 0.0), 0.0)) == 1
        assert d.num_in_service == 1 and d.num_waiting == 0
    assert POLICIES["threshold-jffc"](chains, np.random.default_rng(0), 1.5).threshold_by_rank[0] == 0


# --- invariants of every policy, on random chains and event sequences ---


@st.composite
def scenarios(draw):
    num = draw(st.integers(1, 4))
    chains = [
        chain(
            draw(st.floats(0.5, 20.0)),
            draw(st.integers(1, 3)),
            *draw(st.lists(st.integers(0, 4), min_size=1, max_size=2, unique=True)),
        )
        for _ in range(num)
    ]
    events = draw(st.lists(st.tuples(st.integers(0, 23), st.integers(0, 999)), max_size=80))
    return chains, events


class Model:
    """What a driver knows about a dispatcher's jobs; checks every start it is given."""

    def __init__(self, name, d, chains):
        self.name, self.d, self.chains = name, d, chains
        self.waiting: dict[int, Job] = {}
        self.in_service: dict[int, tuple[int, Job, int]] = {}  # job id → (chain, job, attempt)
        self.num_starts: dict[int, int] = {}  # starts of each job by this dispatcher (drain resets)
        self.stale: list[tuple[int, int]] = []  # (job id, attempt) no longer in service
        self.failed: set[int] = set()
        self.done: list[int] = []
        self.cancelled: set[int] = set()
        self.num_arrived = 0

    def apply(self, starts):
        for s in starts:
            job = s.job
            assert job.job_id in self.waiting
            if self.name in ("jffc", "threshold-jffc"):  # central queue FIFO: the oldest waiting job starts
                assert (job.arrived_at, job.job_id) == min((j.arrived_at, j.job_id) for j in self.waiting.values())
            assert s.attempt == self.num_starts.get(job.job_id, 0)  # 0, then +1 per restart
            self.num_starts[job.job_id] = s.attempt + 1
            del self.waiting[job.job_id]
            self.in_service[job.job_id] = (s.route.chain, job, s.attempt)

    def leave_service(self, job_id, to_queue):
        _, job, attempt = self.in_service.pop(job_id)
        self.stale.append((job_id, attempt))
        if to_queue:
            self.waiting[job_id] = job

    def step(self, kind, pick, now):
        d, in_service = self.d, self.in_service
        if kind < 10 or (10 <= kind < 18 and not in_service):
            job = Job(self.num_arrived, now)
            self.num_arrived += 1
            self.waiting[job.job_id] = job
            self.apply(d.submit(job, now))
        elif kind < 16:  # a completion, half of the time naming its attempt
            job_id = sorted(in_service)[pick % len(in_service)]
            attempt = in_service[job_id][2] if pick % 2 else None
            self.leave_service(job_id, to_queue=False)
            self.done.append(job_id)
            self.apply(d.complete(job_id, now, attempt))
        elif kind < 18:  # abort: the job is re-queued and may start again at once
            job_id = sorted(in_service)[pick % len(in_service)]
            self.leave_service(job_id, to_queue=True)
            self.apply(d.abort(job_id, now))
        elif kind == 18:
            server = pick % 5
            self.failed.add(server)
            out = d.fail_server(server, now)
            dead = {j for j, (k, _, _) in in_service.items() if self.failed & set(self.chains[k].servers)}
            assert {j.job_id for j in out.aborted} == dead  # exactly the dead chains' jobs abort
            for job in out.aborted:
                self.leave_service(job.job_id, to_queue=True)
            self.apply(out.starts)
        elif kind == 19:
            self.failed.discard(pick % 5)
            self.apply(d.restore_server(pick % 5, now))
        elif kind == 20:  # cancel any job: waiting, in service, finished, cancelled or unknown
            job_id = pick % (self.num_arrived + 2)
            if job_id in in_service:
                self.leave_service(job_id, to_queue=False)
                self.cancelled.add(job_id)
            elif self.waiting.pop(job_id, None) is not None:
                self.cancelled.add(job_id)
            self.apply(d.cancel(job_id, now))
        elif kind == 21:  # drain, and hand the jobs back as to a new dispatcher (attempts restart at 0)
            jobs = d.drain()
            assert sorted(j.job_id for j in jobs) == sorted(self.waiting) and d.num_waiting == 0
            if self.name in ("jffc", "threshold-jffc") or isinstance(d, PerChainDispatcher):
                assert jobs == sorted(jobs, key=lambda j: (j.arrived_at, j.job_id))  # queue order
            for job in jobs:
                self.num_starts.pop(job.job_id, None)
                self.stale = [(j, a) for j, a in self.stale if j != job.job_id]
            for job in jobs:
                self.apply(d.submit(job, now))
        elif self.stale:  # a late completion of an earlier attempt is ignored
            job_id, attempt = self.stale[pick % len(self.stale)]
            assert d.complete(job_id, now, attempt) == []
        self.check()

    def check(self):
        d, chains = self.d, self.chains
        per_chain = [0] * len(chains)
        for k, _, _ in self.in_service.values():
            per_chain[k] += 1
        for k, ch in enumerate(chains):
            assert per_chain[k] <= ch.capacity  # never exceeds a capacity
            assert per_chain[k] == 0 or not self.failed & set(ch.servers)  # nobody served on a dead chain
        assert d.num_in_service == len(self.in_service)
        assert d.num_waiting == len(self.waiting)
        # arrivals = departures + cancelled + in system
        assert self.num_arrived == len(self.done) + len(self.cancelled) + d.num_waiting + d.num_in_service
        live = [k for k, ch in enumerate(chains) if not self.failed & set(ch.servers)]
        if d.name == "jffc" and d.num_waiting:  # work-conserving: no free live slot while jobs wait
            assert all(per_chain[k] == chains[k].capacity for k in live)
        if isinstance(d, JFFC) and d.num_waiting and live:  # the fastest live chain takes any queue
            fastest = min(live, key=lambda k: (chains[k].service_time_s, k))
            assert per_chain[fastest] == chains[fastest].capacity
        if isinstance(d, PerChainDispatcher):  # per-chain FIFO, and a queue only behind a full chain
            for k, q in enumerate(d.queues):
                keys = [(j.arrived_at, j.job_id) for j in q]
                assert keys == sorted(keys)
                assert not q or (k in live and per_chain[k] == chains[k].capacity)


@pytest.mark.parametrize("name", sorted(POLICIES))
@settings(max_examples=40, deadline=None)
@given(scenario=scenarios(), seed=st.integers(0, 2**16))
def test_policy_invariants(name, scenario, seed):
    """Events: arrivals, completions, aborts, failures, restores, cancels, drains, late completions."""
    chains, events = scenario
    nu = sum(ch.capacity * ch.rate_per_s for ch in chains)
    model = Model(name, POLICIES[name](chains, np.random.default_rng(seed), 0.8 * nu), chains)
    now = 0.0
    for kind, pick in events:
        now += 0.1
        model.step(kind, pick, now)
    for server in sorted(model.failed):  # restore everything, then serve: nothing is lost
        model.step(19, server, now)
    while model.in_service:
        model.step(10, 0, now)
    assert sorted(model.done + sorted(model.cancelled)) == list(range(model.num_arrived))
    assert model.d.num_waiting == 0
