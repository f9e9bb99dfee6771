"""Executing a plan change in the orchestrator (issue 9, part 4) with hand-made PlanChanges: in-process
block servers (the real request handler and KV arena, no sockets) and a scripted controller.

A re-allocation moves every server's admission limit within its arena; a re-placement restarts the
servers whose span changes, each only once its jobs have finished, in the order of the schedule the
simulator steps too (:mod:`chainserve.adapt.migration`). Every request ends with all its tokens, no
server ever refuses an admission (the orchestrator starts a job only where there is room) and no
server holds more KV than its arena.
"""

from __future__ import annotations

import asyncio

import numpy as np
from aiotools import VirtualClock
from tests.runtime.conftest import DATA
from tests.runtime.test_block_server import TOKEN, LoopbackClient

from chainserve.adapt.controller import PlanChange, plan_for_rate
from chainserve.adapt.cost import migration
from chainserve.dispatch.jffc import JFFC
from chainserve.model.cluster_file import load_cluster
from chainserve.plan.best import plan_with
from chainserve.plan.csearch import make_plan
from chainserve.plan.recovery import arena_block_slots
from chainserve.plan.types import Layout, Plan, reserved_block_jobs
from chainserve.runtime.backends.base import SpanInfo
from chainserve.runtime.backends.emulated import EmulatedHead, EmulatedSpan
from chainserve.runtime.block_server import BlockServer, ServerKnobs
from chainserve.runtime.orchestrator import Orchestrator
from chainserve.runtime.requests import Finished, SamplingParams

MAX_TOKENS = 4
STEP_S = 0.004  # emulated compute per block per step


def block_server(layout: Layout, j: int) -> BlockServer:
    """Server j as an adaptive service starts it: an arena of its whole cache memory, the plan's limit."""
    span = layout.placement.span_of(j)
    info = SpanInfo(span.start_block, span.num_blocks, arena_block_slots(layout.problem, span), 32)
    srv = BlockServer(f"s{j}", EmulatedSpan(info, STEP_S), ServerKnobs(token=TOKEN))
    srv.arena.set_limit(reserved_block_jobs(layout)[j])
    return srv


class Ops:
    """The service's side (:class:`~chainserve.runtime.plan_changes.PlanOps`), in process; records
    each restart and whether the server it replaced still held a session."""

    can_reload = True

    def __init__(self, servers: dict[int, BlockServer]):
        self.servers = servers
        self.restarts: list[tuple[int, int]] = []  # (server, sessions its old process still held)

    def dispatcher(self, layout: Layout) -> JFFC:
        return JFFC(layout.chains)

    def place(self, placed: Layout, alive: frozenset[int]) -> None:
        return None

    async def reload(self, server: int, layout: Layout) -> LoopbackClient:
        old = self.servers.get(server)
        self.restarts.append((server, len(old.sessions) if old is not None else 0))
        await asyncio.sleep(0.05)  # a process start
        self.servers[server] = block_server(layout, server)
        return LoopbackClient(self.servers[server])


class Scripted:
    """A controller that returns ``change`` at the first ``decide`` after ``after`` arrivals."""

    def __init__(self, change: PlanChange, after: int):
        self.change, self.after = change, after
        self.num_arrivals, self.decided, self.applied_at = 0, False, None

    def observe(self, t: float, prompt_tokens: int, output_tokens: int) -> None:
        self.num_arrivals += 1

    def decide(self, t: float) -> PlanChange | None:
        if self.decided or self.num_arrivals < self.after:
            return None
        self.decided = True
        return self.change

    def applied(self, change: PlanChange, t: float) -> None:
        assert change is self.change
        self.applied_at = t


def change_to(old: Plan, new: Plan, reason: str) -> PlanChange:
    moves = migration(old, new)
    kind = "replace" if moves else "reallocate"
    return PlanChange(0.0, reason, kind, old.c, new.c, new.problem.arrival_rate_per_s, new, moves, 1.0, 0.5, 0.3)


async def serve(old: Plan, change: PlanChange, num_requests: int) -> tuple[list[Finished], Orchestrator, Ops, dict]:
    """Stream ``num_requests`` requests (one every 15 ms) through ``old``; the change comes at the 8th.
    Returns the finished events, the orchestrator, the ops and each server's peak KV use. Runs on a
    virtual clock (every sleep returns at once, time jumps to the next timer), so its timing is exact."""
    with VirtualClock().patch_loop():
        return await _serve(old, change, num_requests)


async def _serve(old: Plan, change: PlanChange, num_requests: int) -> tuple[list[Finished], Orchestrator, Ops, dict]:
    ops = Ops({j: block_server(old, j) for j in old.placement.servers})
    head = EmulatedHead("toy", old.problem.model.num_blocks, 32)
    controller = Scripted(change, after=8)
    orch = Orchestrator(
        old,
        JFFC(old.chains),
        head,
        {j: LoopbackClient(s) for j, s in ops.servers.items()},
        plan_ops=ops,
        clock=asyncio.get_running_loop().time,
        controller=controller,
        adapt_interval_s=0.02,
    )
    await orch.connect()
    peaks: dict[int, int] = {}
    running = True

    async def watch() -> None:
        while running:
            for j, srv in ops.servers.items():
                peaks[j] = max(peaks.get(j, 0), srv.arena.num_used)
            await asyncio.sleep(0.001)

    async def consume(stream) -> Finished:
        return [event async for event in stream][-1]

    watcher = asyncio.create_task(watch())
    params = SamplingParams(max_tokens=MAX_TOKENS, temperature=0)
    jobs = []
    for _ in range(num_requests):
        jobs.append(asyncio.create_task(consume(orch.generate(head.encode("the chain serves"), params))))
        await asyncio.sleep(0.015)
    finished = await asyncio.wait_for(asyncio.gather(*jobs), 30)
    while orch.changer.is_busy:
        await asyncio.sleep(0.01)
    running = False
    await watcher
    await orch.close()
    assert controller.applied_at is not None
    return finished, orch, ops, peaks


def problem():
    return load_cluster(DATA / "adaptive-step.yaml")


def test_a_reallocation_moves_the_limits_and_loses_nothing() -> None:
    high = plan_for_rate(problem(), "greedy", 12.0)
    chains = tuple(
        type(ch)(ch.hops, ch.service_time_s, cap)
        for ch, cap in zip(high.chains, (4, 0, 3), strict=True)
        if cap  # fewer block-slots on s0, s1, s4; more on s5
    )
    new = make_plan(high.problem, high.placement, chains, high.c)
    old_slots, new_slots = reserved_block_jobs(high), reserved_block_jobs(new)
    assert any(new_slots.get(j, 0) < n for j, n in old_slots.items())
    assert any(n > old_slots[j] for j, n in new_slots.items())
    change = change_to(high, new, "rate_down")
    assert change.kind == "reallocate"

    finished, orch, ops, peaks = asyncio.run(serve(high, change, 40))

    assert all(f.completion_tokens == MAX_TOKENS for f in finished)
    assert ops.restarts == []
    assert orch.layout is new and orch.dispatcher.num_in_service == orch.num_waiting == 0
    for j, srv in ops.servers.items():
        assert srv.arena.limit == new_slots.get(j, 0) == orch.servers[j].limit
        assert srv.counters.num_refused == 0  # the orchestrator started jobs only where there was room
        assert peaks[j] <= srv.info.num_block_slots
    record = orch.changer.changes[-1]
    assert (record["reason"], record["kind"], record["old_c"], record["new_c"]) == ("rate_down", "reallocate", 3, 3)
    assert b'chainserve:plan_changes_total{reason="rate_down"} 1.0' in orch.metrics.render()[0]
    assert orch.plan_dict()["changes"][-1]["reason"] == "rate_down"


def test_a_replacement_loads_idle_servers_first_and_restarts_the_others_once_drained() -> None:
    low = plan_with("greedy", problem())
    high = plan_for_rate(problem(), "greedy", 12.0)
    change = change_to(low, high, "rate_up")
    assert change.kind == "replace" and len(low.placement.spans) == 2 and len(high.placement.spans) == 6

    finished, orch, ops, peaks = asyncio.run(serve(low, change, 60))

    assert all(f.completion_tokens == MAX_TOKENS for f in finished)
    restarted = [j for j, _ in ops.restarts]
    assert sorted(restarted) == sorted(high.placement.servers)  # every span changes or is new
    assert all(sessions == 0 for _, sessions in ops.restarts)  # drained first: nothing was cut
    fresh = [j for j in restarted if j not in low.placement.servers]
    assert restarted[: len(fresh)] == fresh  # the idle servers load first, while the old chain serves
    assert orch.layout is high and orch.placed is high
    want = reserved_block_jobs(high)
    for j, srv in ops.servers.items():
        span = high.placement.span_of(j)
        assert (srv.info.first_block, srv.info.num_blocks) == (span.start_block, span.num_blocks)
        assert srv.arena.limit == want[j] and srv.counters.num_refused == 0
    routes = {tuple(h[0] for h in f.hops) for f in finished}
    assert len(routes) > 1  # served on the old chain and the new ones
    record = orch.changer.changes[-1]
    assert (record["reason"], record["kind"], record["old_c"], record["new_c"]) == ("rate_up", "replace", 2, 3)
    assert np.isfinite(record["took_s"])
