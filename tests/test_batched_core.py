"""The batched model's compiled core (issue 31, :mod:`chainserve.sim.batched_core`): its twins of the
batching rule and of the iteration cost are pinned to the definitions the runtime's ``Batcher`` uses
(:func:`~chainserve.model.step_cost.take_batch`, :meth:`~chainserve.model.step_cost.StepCost.iteration_s`),
bit for bit; and processor sharing of hosts, by hand, given to the model or as the cluster's shared hosts."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from chainserve.adapt.controller import plan_for_rate
from chainserve.dispatch.jffc import JFFC
from chainserve.measure.profile import ProfileSettings, cluster_yaml, this_machine
from chainserve.model.cluster_file import load_cluster
from chainserve.model.spec import ModelSpec, Problem, Server, SharedHost, SpecError, Workload
from chainserve.model.step_cost import StepCost, take_batch
from chainserve.plan.csearch import make_plan
from chainserve.plan.gca import gca
from chainserve.plan.recovery import replace_survivors
from chainserve.plan.types import Chain, Hop, Placement, Span, chain_time_s
from chainserve.sim.arrivals import Arrivals, ReplayArrivals
from chainserve.sim.batched import BatchedService
from chainserve.sim.batched_core import iteration_s, take_batch_mask
from chainserve.sim.batched_process import BatchedProcess
from chainserve.sim.engine import simulate
from chainserve.sim.events import Failure

coefficient = st.floats(0.0, 1.0, allow_subnormal=False)


@settings(max_examples=300, deadline=None)
@given(tokens=st.lists(st.integers(0, 600), max_size=40), budget=st.integers(2, 1024))
def test_the_batching_twin_takes_the_same_batch(tokens, budget):
    items = list(enumerate(tokens))
    batch, rest = take_batch(items, lambda item: item[1], budget)
    least = min(1, min(tokens, default=1))  # the core's early stop: no waiting item has fewer tokens
    taken = np.zeros(len(tokens), np.int64)
    k = take_batch_mask(np.array(tokens, np.int64), len(tokens), budget, least, taken)
    assert k == len(batch)
    assert [i for i, _ in batch] == [x for x in range(len(tokens)) if taken[x]]
    assert [i for i, _ in rest] == [x for x in range(len(tokens)) if not taken[x]]


@settings(max_examples=300, deadline=None)
@given(
    items=st.lists(st.tuples(st.integers(1, 80), st.integers(0, 512)), min_size=1, max_size=40),
    alpha=coefficient,
    beta=coefficient,
    palpha=coefficient,
    pbeta=coefficient,
)
def test_the_cost_twin_gives_the_same_seconds(items, alpha, beta, palpha, pbeta):
    if alpha + beta <= 0:
        beta = 1e-3
    cost = StepCost(alpha, beta, palpha, pbeta)
    blocks = np.array([m for m, _ in items], np.int64)
    tokens = np.array([q for _, q in items], np.int64)
    twin = iteration_s(blocks, tokens, len(items), alpha, beta, palpha, pbeta)
    assert twin == cost.iteration_s(items)
    assert np.float64(twin).view(np.int64) == np.float64(cost.iteration_s(items)).view(np.int64)


def two_servers_plan(cost: StepCost):
    """Two one-block servers, each its own chain of capacity 1, no communication, a free head."""
    servers = (Server("a", 10, 1.0, 0.0, step=cost), Server("b", 10, 1.0, 0.0, step=cost))
    problem = Problem(servers, ModelSpec("m", 1, 1.0, 0.1), Workload(0.001, prompt_tokens=1, output_tokens=1))
    chains = tuple(Chain((Hop(j, 0, 1),), chain_time_s(problem, (Hop(j, 0, 1),)), 1) for j in range(2))
    return make_plan(problem, Placement((Span(0, 0, 1), Span(1, 0, 1)), 1), chains, 1)


def finish_times(second_at: float, model: BatchedService, hosts: tuple[SharedHost, ...] = ()) -> list[float]:
    """Two one-token jobs, at 0 and ``second_at``: each one iteration of 1 s (a decode of one block,
    α = β = 0.5 s), on its own server (``a``, ``b``), the cluster's shared ``hosts``."""
    plan = two_servers_plan(StepCost(0.5, 0.5, 0.5, 0.5))
    plan = dataclasses.replace(plan, problem=dataclasses.replace(plan.problem, hosts=hosts))
    jobs = ReplayArrivals(Arrivals(np.array([0.0, second_at]), np.array([1, 1]), np.array([1, 1])))
    r = simulate(plan, JFFC(plan.chains), jobs, model, num_jobs=2)
    assert sorted(r.chain.tolist()) == [0, 1]
    return r.finished_at.tolist()


@pytest.mark.parametrize(
    ("second_at", "shared", "apart"),
    [
        (0.0, [2.0, 2.0], [1.0, 1.0]),  # together on one core: each at half speed
        # 0.5 s alone, then both at half speed: the first's last 0.5 s of work ends at 1.5; the second
        # did 0.5 s of work by then and its last 0.5 s runs alone: 2.0
        (0.5, [1.5, 2.0], [1.0, 1.5]),
    ],
)
def test_servers_on_one_core_share_it(second_at, shared, apart):
    """Processor sharing (issue 31): both servers on one 1-core host (the head on its own)."""
    model = BatchedService()
    assert finish_times(second_at, model, (SharedHost("box", 1, ("a", "b")),)) == shared
    with_head = (SharedHost("box", 1, ("a", "b"), head=True),)  # the free head takes no share
    assert finish_times(second_at, model, with_head) == shared
    two_cores = (SharedHost("box", 2, ("a", "b")),)  # n ≤ cores: no slowdown
    assert finish_times(second_at, model, two_cores) == apart
    apart_hosts = (SharedHost("x", 1, ("a",)), SharedHost("y", 1, ("b",), head=True))
    assert finish_times(second_at, model, apart_hosts) == apart
    assert finish_times(second_at, model) == apart


def test_background_cores_come_off_the_shared_host():
    """Issue 31: work the model does not time takes cores off its host. Two cores of which the
    runtime's own CPU takes one on average leave one: the two jobs share it."""
    box = (SharedHost("box", 2, ("a", "b"), head=True),)
    busy = BatchedService(background_cores=1.0)
    plan = two_servers_plan(StepCost(0.5, 0.5, 0.5, 0.5))
    assert busy.host_model(dataclasses.replace(plan.problem, hosts=box)) == ((0, 0, 0), (1.0,))
    assert finish_times(0.0, busy, box) == [2.0, 2.0]
    assert finish_times(0.0, BatchedService(background_cores=0.5), box) == [4 / 3, 4 / 3]  # 1.5 cores


def test_background_cores_are_checked():
    with pytest.raises(ValueError, match="background_cores: must be"):
        BatchedService(background_cores=-0.1)
    with pytest.raises(ValueError, match="leaves a shared host no cores"):
        finish_times(0.0, BatchedService(background_cores=2.0), (SharedHost("box", 2, ("a", "b")),))


def bloom_with_steps():
    """The paper's BLOOM cluster with a step cost on every server, planned for 0.3/s."""
    cluster = load_cluster(Path(__file__).resolve().parents[1] / "examples" / "paper-sim-bloom-20.yaml")
    servers = tuple(
        dataclasses.replace(s, step=StepCost(s.tau_p_s / 40, s.tau_p_s / 400, s.tau_p_s / 40, s.tau_p_s / 40_000))
        for s in cluster.servers
    )
    return plan_for_rate(dataclasses.replace(cluster, servers=servers), "greedy", 0.3)


def on_hosts(plan, hosts):
    """``plan`` with its cluster's shared hosts ``hosts(server names)``."""
    names = tuple(s.name for s in plan.problem.servers)
    return dataclasses.replace(plan, problem=dataclasses.replace(plan.problem, hosts=hosts(names)))


def test_ends_that_sharing_moved_leave_room(monkeypatch):
    """Every station on one 1-core host: each change re-pushes the ends of all iterations in
    progress and leaves the old ones stale in the heap. A heap of 25 entries (the live events fit,
    the stale ones would not) is compacted when full: the same records as with room to spare."""
    plan = on_hosts(bloom_with_steps(), lambda names: (SharedHost("box", 1, names, head=True),))
    model = BatchedService()
    roomy = simulate(plan, JFFC(plan.chains), None, model, seed=2, num_jobs=400)
    grow = BatchedProcess._grow

    def small_heap(self, slots):
        grow(self, slots)
        self.heap_t, self.heap_k = self.heap_t[:25].copy(), self.heap_k[:25].copy()
        self._bind()

    monkeypatch.setattr(BatchedProcess, "_grow", small_heap)
    tight = simulate(plan, JFFC(plan.chains), None, model, seed=2, num_jobs=400)
    assert tight.num_finished == 400
    np.testing.assert_array_equal(roomy.finished_at, tight.finished_at)


def test_a_host_per_station_is_no_sharing():
    """One station per host, one core each: the records are those without hosts, float for float
    (through a failure with recovery, so aborted steps and restarts too)."""
    plan = bloom_with_steps()
    failure = [Failure(600.0, plan.chains[0].servers[-1], 120.0)]
    one_each = on_hosts(plan, lambda names: tuple(SharedHost(n, 1, (n,)) for n in names))
    runs = [
        simulate(p, JFFC(p.chains), None, BatchedService(), seed=2, num_jobs=400, failures=failure, recover=True)
        for p in (plan, one_each)
    ]
    assert runs[0].num_retried >= 1
    np.testing.assert_array_equal(runs[0].started_at, runs[1].started_at)
    np.testing.assert_array_equal(runs[0].finished_at, runs[1].finished_at)
    box = on_hosts(plan, lambda names: (SharedHost("box", 2, names, head=True),))  # one 2-core machine: slower
    slow = simulate(box, JFFC(box.chains), None, BatchedService(), seed=2, num_jobs=400, failures=failure, recover=True)
    assert slow.num_finished == 400
    assert np.nanmean(slow.finished_at - slow.arrived_at) > np.nanmean(runs[0].finished_at - runs[0].arrived_at)


def test_host_model_of_the_clusters_hosts():
    """The stations' hosts from the cluster's ``hosts`` (issue 31): the two servers on the shared
    host, the head on no host alone on one core; the runtime's CPU comes off the shared host only."""
    plan = two_servers_plan(StepCost(0.5, 0.5, 0.5, 0.5))
    problem = dataclasses.replace(plan.problem, hosts=(SharedHost("box", 1, ("a", "b")),))
    assert BatchedService().host_model(problem) == ((0, 0, 1), (1.0, 1.0))
    assert BatchedService().host_model(plan.problem) is None
    assert BatchedService(background_cores=0.25).host_model(problem) == ((0, 0, 1), (0.75, 1.0))


def test_shared_hosts_in_a_cluster_file(tmp_path):
    text = """
model: {name: m, num_blocks: 2, block_size_gb: 1.0, cache_size_gb: 0.1}
workload: {arrival_rate: 0.5}
servers:
  - {name: a, memory_gb: 10, tau_p_ms: 100, tau_c_ms: 10}
  - {name: b, memory_gb: 10, tau_p_ms: 100, tau_c_ms: 10}
hosts:
  - {name: box, cores: 2, servers: [a, b], head: true}
"""
    (tmp_path / "c.yaml").write_text(text)
    problem = load_cluster(tmp_path / "c.yaml")
    assert problem.hosts == (SharedHost("box", 2, ("a", "b"), True),)
    assert BatchedService().host_model(problem) == ((0, 0, 0), (2.0,))
    for bad, message in [
        ("  - {name: box, cores: 2, servers: [a, z]}", "'z' is not a server"),
        ("  - {name: box, cores: 2, servers: [a]}\n  - {name: other, cores: 1, servers: [a]}", "'a' is on two hosts"),
        ("  - {name: box, cores: 0, servers: [a]}", "hosts\\[0\\].cores"),
        ("  - {name: box, cores: 2}", "shares nothing"),
        ("  - {name: box, cores: 2, servers: [a], head: 1}", "true or false"),
        ("  - {name: box, cores: 2, servers: [a], gpus: 1}", "gpus"),
    ]:
        (tmp_path / "bad.yaml").write_text(text.split("hosts:")[0] + "hosts:\n" + bad + "\n")
        with pytest.raises(SpecError, match=message):
            load_cluster(tmp_path / "bad.yaml")


def test_profile_writes_this_machine_as_the_shared_host(tmp_path):
    """``chainserve profile`` of torch servers it started here names this machine their shared host;
    the cluster file it writes reads back with it."""
    problem = load_cluster(Path(__file__).resolve().parents[1] / "examples" / "fidelity-smollm2-3.yaml")
    host = this_machine(problem)
    assert host.servers == tuple(s.name for s in problem.servers) and host.head and host.cores >= 1
    settings = ProfileSettings(prompt_tokens=8, output_tokens=4)
    text = cluster_yaml(dataclasses.replace(problem, hosts=(host,)), {}, settings, "test")
    (tmp_path / "profiled.yaml").write_text(text)
    assert load_cluster(tmp_path / "profiled.yaml").hosts == (host,)


def test_a_shared_host_outlives_a_dead_server():
    """Placing the model anew on the survivors (``replace_survivors``) plans on the problem narrowed to
    them (:meth:`Problem.with_servers`): a shared host that named the dead server keeps the others."""
    p = Problem(tuple(Server(n, 5, 1.0, 0.0) for n in "abc"), ModelSpec("toy", 4, 1.0, 0.5), Workload(0.1))
    p = dataclasses.replace(p, hosts=(SharedHost("box", 2, ("a", "c"), True), SharedHost("gone", 1, ("b",))))
    narrowed = p.with_servers([0, 1])
    assert [s.name for s in narrowed.servers] == ["a", "b"]
    assert narrowed.hosts == (SharedHost("box", 2, ("a",), True), SharedHost("gone", 1, ("b",)))
    assert p.with_servers([0, 2]).hosts == (SharedHost("box", 2, ("a", "c"), True),)
    placement = Placement((Span(0, 1, 2), Span(1, 3, 2), Span(2, 1, 4)), 4)
    plan = make_plan(p, placement, gca(p, placement), None)
    new = replace_survivors(plan, {0, 1})
    assert new is not None and new.problem is p and {s.server for s in new.placement.spans} == {0, 1}
