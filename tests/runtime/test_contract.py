"""One policy, two drivers: the simulator engine and the orchestrator make the same starts.

A scripted sequence of arrivals and service durations is replayed through ``sim.engine.simulate`` and
through the :class:`~chainserve.runtime.orchestrator.Orchestrator` on a virtual clock with a fake
transport (each job's first hop holds its one forward step until the script says it completes).
Both must start the same jobs at the same times on the same chains (house style: "one policy, two
drivers").
"""

from __future__ import annotations

import asyncio
import heapq
from dataclasses import dataclass

import numpy as np
import pytest

from chainserve.methods import build_method
from chainserve.model.spec import ModelSpec, Problem, Server, Workload
from chainserve.runtime.backends.emulated import EmulatedHead
from chainserve.runtime.orchestrator import Orchestrator
from chainserve.runtime.requests import SamplingParams
from chainserve.sim.arrivals import Arrivals
from chainserve.sim.engine import simulate

NUM_JOBS = 60


@dataclass(frozen=True)
class ScriptedArrivals:
    times_s: np.ndarray

    def sample(self, workload, num_jobs, rng) -> Arrivals:
        n = len(self.times_s)
        return Arrivals(self.times_s, np.full(n, 3, dtype=np.int64), np.ones(n, dtype=np.int64))


@dataclass(frozen=True)
class ScriptedService:
    durations_s: np.ndarray
    name: str = "scripted"

    def sampler(self, problem, arrivals, rng):
        return lambda route, job: float(self.durations_s[job])


class VirtualClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class FakeClient:
    """A block server that answers at once, except that a job's first hop waits for its gate (sessions
    are named ``j<job>s<serial>``; the script never aborts a job, so one gate per job)."""

    endpoint = "fake"

    def __init__(self, name: str, gates: dict[str, asyncio.Event]):
        self.name, self.gates = name, gates

    async def forward(self, session, first_block, position, hidden, *, open=False, close=False, reserve=None):
        if first_block == 1:
            await self.gates.setdefault(session.partition("s")[0], asyncio.Event()).wait()
        return hidden

    def close_session(self, session):
        future = asyncio.get_running_loop().create_future()
        future.set_result(None)
        return future

    async def info(self, timeout_s=10.0):
        return {}

    async def set_limit(self, num_block_slots, timeout_s=10.0):
        return {}

    def fail_pending(self, message):
        """Nothing is pending on a fake."""

    def close(self):
        """Nothing to close."""


def problem() -> Problem:
    servers = tuple(
        Server(f"s{j}", m, tp, tc)
        for j, (m, tp, tc) in enumerate(
            [(9.0, 0.10, 0.5), (7.0, 0.12, 0.3), (6.0, 0.2, 0.2), (5.0, 0.15, 0.6), (8.0, 0.3, 0.1)]
        )
    )
    return Problem(servers, ModelSpec("toy", 8, 0.5, 0.25), Workload(3.0, rho_bar=0.9))


async def drive_orchestrator(layout, dispatcher, times, durations) -> dict[int, tuple[float, int | None, tuple]]:
    clock, gates = VirtualClock(), {}
    clients = {j: FakeClient(s.name, gates) for j, s in enumerate(layout.problem.servers)}
    head = EmulatedHead("toy", layout.problem.model.num_blocks, 64)
    orch = Orchestrator(layout, dispatcher, head, clients, clock=clock)
    params = SamplingParams(max_tokens=1, temperature=0)
    consumers, completions, seen = [], [], 0

    async def settle() -> None:
        for _ in range(50):
            await asyncio.sleep(0)

    async def consume(stream) -> None:
        async for _ in stream:
            pass

    next_job = 0
    while next_job < len(times) or completions:
        t_arrival = times[next_job] if next_job < len(times) else np.inf
        if completions and completions[0][0] <= t_arrival:  # completions first at equal times
            clock.now, job, attempt = heapq.heappop(completions)
            assert attempt == 0
            gates.setdefault(f"j{job}", asyncio.Event()).set()
        else:
            clock.now = t_arrival
            stream = orch.generate(head.encode("the chain serves"), params)
            consumers.append(asyncio.create_task(consume(stream)))
            next_job += 1
        await settle()
        for record in list(orch.starts)[seen:]:
            heapq.heappush(completions, (record.at + durations[record.job_id], record.job_id, record.attempt))
        seen = len(orch.starts)
    await asyncio.gather(*consumers)
    assert orch.dispatcher.num_waiting == orch.dispatcher.num_in_service == 0
    return {r.job_id: (r.at, r.chain, r.servers) for r in orch.starts}


@pytest.mark.parametrize("method", ["proposed", "proposed:sa-jsq", "petals", "bprr"])
def test_simulator_and_orchestrator_make_identical_starts(method: str) -> None:
    rng = np.random.default_rng(11)
    times = np.cumsum(rng.exponential(0.15, NUM_JOBS))
    durations = rng.exponential(1.5, NUM_JOBS)
    setup = build_method(method, problem(), np.random.default_rng(0))
    sim = simulate(
        setup.plan_or_placement,
        setup.make_dispatcher(np.random.default_rng(1)),
        ScriptedArrivals(times),
        ScriptedService(durations),
        num_jobs=NUM_JOBS,
    )
    live = asyncio.run(
        drive_orchestrator(setup.plan_or_placement, setup.make_dispatcher(np.random.default_rng(1)), times, durations)
    )
    assert sorted(live) == list(range(NUM_JOBS))
    assert int(np.count_nonzero(sim.started_at > times + 1e-12)) > 5, "the script must make jobs wait"
    for job in range(NUM_JOBS):
        at, chain, servers = live[job]
        assert at == pytest.approx(sim.started_at[job], abs=1e-12), job
        assert (chain if chain is not None else -1) == sim.chain[job], job
        assert servers == tuple(h.server for h in sim.routes[job].hops), job
