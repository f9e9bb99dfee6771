"""No half-batches (issue 30, part 4): a block server's iteration waits, within a bound, for the sessions
it has just answered and expects back, so the sessions of concurrent requests share its iterations
instead of splitting into cohorts that take turns; on a pipeline, where they come back only after the
other hops, it does not wait, and the micro-batches stay in flight on different servers."""

from __future__ import annotations

import asyncio

from tests.runtime.test_block_server import TOKEN, LoopbackClient

from chainserve.dispatch.jffc import JFFC
from chainserve.model.spec import ModelSpec, Problem, Server, Workload
from chainserve.model.step_cost import StepCost
from chainserve.plan.csearch import make_plan
from chainserve.plan.types import Chain, Hop, Placement, Span
from chainserve.runtime.backends.base import SpanInfo
from chainserve.runtime.backends.emulated import EmulatedHead, EmulatedSpan
from chainserve.runtime.batching import Batcher, Turnarounds
from chainserve.runtime.block_server import BlockServer, ServerKnobs
from chainserve.runtime.orchestrator import Orchestrator
from chainserve.runtime.requests import SamplingParams

#: An emulated iteration: 10 ms per block for the batch plus 1 ms per block per decode.
COST = StepCost(0.010, 0.001, 0.010, 0.0001)


def serve_staggered(
    num_servers: int, num_jobs: int, hold_fraction: float, max_tokens: int = 12
) -> tuple[list[BlockServer], list[list[float]]]:
    """``num_jobs`` greedy requests through one chain of ``num_servers`` emulated batching servers (two
    blocks each), the first alone and the rest while its prefill computes (so, left to themselves, they
    form two cohorts); the servers and the holds each server's batcher was given."""
    blocks = 2 * num_servers
    problem = Problem(
        tuple(Server(f"s{j}", 10, 0.01, 0.0) for j in range(num_servers)),
        ModelSpec("m", blocks, 1.0, 1.0),
        Workload(1.0),
    )
    spans = tuple(Span(j, 2 * j + 1, 2) for j in range(num_servers))
    hops = tuple(Hop(j, 2 * j + 1, 2) for j in range(num_servers))
    plan = make_plan(problem, Placement(spans, blocks), (Chain(hops, 1.0, num_jobs),), num_jobs)
    knobs = ServerKnobs(token=TOKEN, hold_fraction=hold_fraction)
    servers = [
        BlockServer(f"s{j}", EmulatedSpan(SpanInfo(2 * j + 1, 2, 2 * num_jobs, 64), 0.0, COST), knobs)
        for j in range(num_servers)
    ]
    holds: list[list[float]] = [[] for _ in servers]
    for srv, given in zip(servers, holds, strict=True):
        if srv.batcher is not None and srv.batcher.hold is not None:
            srv.batcher.hold = lambda asked=srv.batcher.hold, given=given: given.append(asked()) or given[-1]
    head = EmulatedHead("m", blocks, 64)

    async def run() -> list[list]:
        orch = Orchestrator(plan, JFFC(plan.chains), head, {j: LoopbackClient(s) for j, s in enumerate(servers)})
        params = SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True)

        async def one(delay_s: float) -> list:
            await asyncio.sleep(delay_s)
            return [event async for event in orch.generate(head.encode("the chain serves a job"), params)]

        return await asyncio.gather(one(0.0), *(one(0.005) for _ in range(num_jobs - 1)))

    results = asyncio.run(run())
    assert all(events[-1].completion_tokens == max_tokens for events in results)
    assert all(s.arena.num_used == 0 for s in servers)
    return servers, holds


def test_concurrent_sessions_share_every_iteration_instead_of_alternating_cohorts() -> None:
    """Six requests on one server: without waiting (``hold_fraction`` 0) the first request's session
    and the five that arrived during its prefill take turns to the end (iterations of 1 and of 5); with
    the default, after one round trip that measures their turnaround, the decode iterations hold all six."""
    (alone,), _ = serve_staggered(1, 6, hold_fraction=0.0)
    sizes = alone.counters.batch_sizes  # 12 tokens: 24 iterations when the cohorts never merge
    assert sizes[1] + sizes[5] >= 20 and sizes[6] <= 2, sizes

    (merged,), holds = serve_staggered(1, 6, hold_fraction=ServerKnobs().hold_fraction, max_tokens=24)
    sizes = merged.counters.batch_sizes  # the prefills and first decodes apart, 22 iterations of all six
    assert sizes[6] >= 20 and sizes[6] >= 0.8 * sizes.total(), sizes
    assert 0 < max(holds[0]) < 0.1  # half an iteration (~30 ms) at most, however loaded the machine


def test_a_pipeline_keeps_its_micro_batches_in_flight() -> None:
    """Three servers in a chain: a session comes back to the first only after the other two servers'
    iterations, longer than half of the first's own, so it is not waited for, and the two cohorts stay
    in flight through the pipeline."""
    servers, holds = serve_staggered(3, 6, hold_fraction=ServerKnobs().hold_fraction)
    for srv, asked in zip(servers, holds, strict=True):
        assert srv.counters.batch_sizes[1] >= 10 and srv.counters.batch_sizes[5] >= 10
        assert sum(h > 0 for h in asked) <= len(asked) // 10  # only for a session late past its turnaround


def test_a_hold_takes_what_arrives_and_never_outlasts_its_first_answer() -> None:
    """The batcher asks ``hold`` before each batch: an item due and submitted while it waits joins the
    batch, which starts as soon as ``hold`` says nothing more is due; and the wait ends at its first
    answer even when ``hold`` keeps asking for more."""
    batches: list[list[str]] = []

    async def run(items: list[str]) -> list[str]:
        batches.append(items)
        await asyncio.sleep(0.01)
        return items

    async def main() -> tuple[float, float]:
        loop = asyncio.get_running_loop()
        due = {"b"}
        joins = Batcher(run, hold=lambda: 0.5 if due else 0.0)
        began = loop.time()
        first = joins.submit("a")
        await asyncio.sleep(0.02)
        due.clear()
        await asyncio.gather(first, joins.submit("b"))
        joined_s = loop.time() - began
        bounded = Batcher(run, hold=lambda: 0.05)  # always "one more is due": the wait still ends
        began = loop.time()
        await bounded.submit("c")
        return joined_s, loop.time() - began

    joined_s, bounded_s = asyncio.run(main())
    assert batches == [["a", "b"], ["c"]]
    assert joined_s < 0.25 and 0.06 <= bounded_s < 0.3


def test_turnarounds_wait_only_for_live_sessions_that_come_back_within_the_bound() -> None:
    """A session whose turnaround is within ``fraction`` of the last iteration is waited for (until its
    margin), a slower one is not (a pipeline's), a closed one is forgotten, one that arrived or is late
    past its margin no longer counts, and a new one is taken to turn around like the last one measured."""
    now = [0.0]
    r = Turnarounds(0.5, lambda: now[0])
    r.iteration_s = 0.1  # waits of up to 50 ms
    for session, turnaround in (("near", 0.01), ("far", 0.08)):
        now[0] = 0.0
        r.returned(session)
        now[0] = turnaround
        r.arrived(session)
        now[0] = 1.0
        r.returned(session)
    now[0] = 1.001
    assert abs(r.hold_s({"near", "far"}) - (1.0 + 1.5 * 0.01 - 1.001)) < 1e-9
    assert r.hold_s({"far"}) == 0.0  # near is closed: forgotten; far's 80 ms are past the bound
    r.returned("new")  # like far, the last measured: past the bound too
    assert r.hold_s({"far", "new"}) == 0.0
    r.iteration_s = 0.2  # a bound of 100 ms: both waited for, until 1.12 s but 100 ms at most
    assert r.hold_s({"far", "new"}) == 0.1
    r.arrived("far")  # far turned around in 1 ms; new, like it, is due until 1.0025 s
    assert abs(r.hold_s({"far", "new"}) - 0.0015) < 1e-9
    r.arrived("new")
    assert r.hold_s({"far", "new"}) == 0.0
    r.returned("far")
    now[0] = 1.5  # far is late past its margin: no longer waited for
    assert r.hold_s({"far", "new"}) == 0.0
