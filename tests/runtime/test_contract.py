"""One policy, two drivers: the simulator engine and the orchestrator make the same starts.

A scripted sequence of arrivals and service durations is replayed through ``sim.engine.simulate`` and
through the :class:`~chainserve.runtime.orchestrator.Orchestrator` on a virtual clock with a fake
transport (each job's first hop holds its one forward step until the script says it completes).
Both must start the same jobs at the same times on the same chains (house style: "one policy, two
drivers"). A second script adds a server failure and its return (issue 31): the orchestrator is told
the server died and is back, the simulator gets the same :class:`~chainserve.sim.events.Failure`;
the aborted jobs run again at the same times on the same chains in both. A third adds, after the
failure, an adaptive plan change that both drivers ask the same scripted controller for
(:class:`ScriptedChange`) and carry out by the same migration schedule.
"""

from __future__ import annotations

import asyncio
import heapq
import math
from dataclasses import dataclass
from types import SimpleNamespace

import numpy as np
import pytest

from chainserve.adapt.controller import PlanChange
from chainserve.adapt.cost import REALLOCATE
from chainserve.methods import build_method, dispatcher_for
from chainserve.model.spec import ModelSpec, Problem, Server, Workload
from chainserve.plan.csearch import make_plan
from chainserve.runtime.backends.emulated import EmulatedHead
from chainserve.runtime.orchestrator import Orchestrator
from chainserve.runtime.requests import SamplingParams
from chainserve.sim.arrivals import Arrivals
from chainserve.sim.engine import simulate
from chainserve.sim.events import Failure

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
    """A block server that answers at once, except that a job's first hop — its service beginning,
    after any wait for room — is noted in ``began`` and waits for its gate: one per start, (job, n)
    for the job's n-th first hop (sessions are named ``j<job>s<serial>``; a job makes one forward
    step, so each start makes one first hop)."""

    endpoint = "fake"

    def __init__(self, name: str, gates: dict[tuple[int, int], asyncio.Event], began: list[tuple[int, int]]):
        self.name, self.gates, self.began = name, gates, began

    async def forward(self, session, first_block, position, hidden, *, open=False, close=False, reserve=None):
        if first_block == 1:
            job = int(session[1:].partition("s")[0])
            n = sum(1 for k, _ in self.began if k == job)
            self.began.append((job, n))
            await self.gates.setdefault((job, n), asyncio.Event()).wait()
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


class Recompose:
    """The service's plan operations for the orchestrator's recovery: a fresh dispatcher per plan; no
    new placement, no reloads."""

    can_reload = False

    def __init__(self, make_dispatcher):
        self.make_dispatcher = make_dispatcher

    def dispatcher(self, layout):
        return self.make_dispatcher(layout)

    def place(self, placed, alive):
        return None

    async def reload(self, server, layout):
        raise AssertionError("no reloads in the script")


async def drive_orchestrator(
    layout, dispatcher, times, durations, failures=(), plan_ops=None, controller=None
) -> dict[int, tuple[float, int | None, tuple]]:
    """Replay the script; ``failures``: (time, server, seconds down); ``plan_ops``: recompose the
    chains (:class:`Recompose`); ``controller``: plan changes (:class:`ScriptedChange`). Returns each
    job's last start."""
    clock, gates, began = VirtualClock(), {}, []
    clients = {j: FakeClient(s.name, gates, began) for j, s in enumerate(layout.problem.servers)}
    head = EmulatedHead("toy", layout.problem.model.num_blocks, 64)
    orch = Orchestrator(layout, dispatcher, head, clients, clock=clock, plan_ops=plan_ops, controller=controller)
    params = SamplingParams(max_tokens=1, temperature=0)
    consumers, completions, seen = [], [], 0

    async def settle() -> None:
        for _ in range(50):
            await asyncio.sleep(0)

    async def consume(stream) -> None:
        async for _ in stream:
            pass

    service_at: dict[int, float] = {}  # when each job's (last) service began
    outages = sorted([(t, 0, j) for t, j, _ in failures] + [(t + d, 1, j) for t, j, d in failures])
    next_job = 0
    while next_job < len(times) or completions:
        t_arrival = times[next_job] if next_job < len(times) else np.inf
        t_done = completions[0][0] if completions else np.inf
        if outages and outages[0][0] <= min(t_done, t_arrival):  # the simulator's order at equal times
            clock.now, back, j = outages.pop(0)
            if back:
                orch.servers.mark_back(j)
                orch._server_back(j)
            else:
                orch.server_failed(layout.problem.servers[j].name, "scripted")
        elif completions and t_done <= t_arrival:  # completions before arrivals at equal times
            clock.now, job, n = heapq.heappop(completions)
            gates.setdefault((job, n), asyncio.Event()).set()  # an aborted start's: nobody waits
        else:
            clock.now = t_arrival
            stream = orch.generate(head.encode("the chain serves"), params)
            consumers.append(asyncio.create_task(consume(stream)))
            next_job += 1
        await settle()
        for job, n in began[seen:]:  # services that began: each completes after its scripted duration
            service_at[job] = clock.now
            heapq.heappush(completions, (clock.now + durations[job], job, n))
        seen = len(began)
    await asyncio.gather(*consumers)
    assert orch.generations.num_waiting == orch.generations.num_running == 0
    return {r.job_id: (service_at[r.job_id], r.chain, r.servers) for r in orch.starts}


def assert_same_starts(live: dict[int, tuple[float, int | None, tuple]], sim) -> None:
    """Every job's last start: the same time, chain and servers in both drivers."""
    assert sorted(live) == list(range(NUM_JOBS))
    for job in range(NUM_JOBS):
        at, chain, servers = live[job]
        assert at == pytest.approx(sim.started_at[job], abs=1e-12), job
        assert (chain if chain is not None else -1) == sim.chain[job], job
        assert servers == tuple(h.server for h in sim.routes[job].hops), job


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
    assert int(np.count_nonzero(sim.started_at > times + 1e-12)) > 5, "the script must make jobs wait"
    assert_same_starts(live, sim)


@pytest.mark.parametrize("recover", [False, True])
def test_a_failure_and_a_return_make_identical_starts(recover: bool) -> None:
    """Without recovery the dispatcher fails the server's chains over and restores them; with it the
    chains are recomposed around the dead server and back (a plan change in both drivers)."""
    rng = np.random.default_rng(11)
    times = np.cumsum(rng.exponential(0.15, NUM_JOBS))
    durations = rng.exponential(1.5, NUM_JOBS)
    setup = build_method("proposed", problem(), np.random.default_rng(0))
    plan = setup.plan_or_placement
    victim, t_fail, down_s = plan.chains[0].servers[0], float(times[25]) + 0.01, 2.0
    sim = simulate(
        plan, setup.make_dispatcher(np.random.default_rng(1)), ScriptedArrivals(times), ScriptedService(durations),
        num_jobs=NUM_JOBS, failures=[Failure(t_fail, victim, down_s)], recover=recover,
        make_dispatcher=lambda layout: dispatcher_for("proposed", layout, np.random.default_rng(1)),
    )  # fmt: skip
    ops = Recompose(lambda layout: dispatcher_for("proposed", layout, np.random.default_rng(1))) if recover else None
    live = asyncio.run(
        drive_orchestrator(
            plan, setup.make_dispatcher(np.random.default_rng(1)), times, durations, [(t_fail, victim, down_s)], ops
        )
    )
    assert sim.num_restarts >= 1 and sim.num_finished == NUM_JOBS
    assert sim.num_recomposed == 2 * recover
    assert_same_starts(live, sim)


class ScriptedChange:
    """An adaptive controller (the object both drivers ask after each arrival) that decides one plan
    change, at the first arrival at or after ``at_s``: a re-allocation to ``layout`` (the same
    placement, so no block server reloads)."""

    def __init__(self, layout, at_s: float):
        self.layout, self.at_s = layout, at_s
        self.config = SimpleNamespace(window_s=math.inf)  # no window ticks: decisions at arrivals only
        self.decided_at = self.applied_at = None

    def observe(self, t: float, prompt_tokens: int, output_tokens: int) -> None:
        """Arrivals do not matter to the script."""

    def decide(self, t: float) -> PlanChange | None:
        if self.decided_at is not None or t < self.at_s:
            return None
        self.decided_at = t
        return PlanChange(t, "rate_down", REALLOCATE, self.layout.c, self.layout.c, 1.0, self.layout, (), 1.0, 0.0, 0.0)

    def applied(self, change: PlanChange, t: float) -> None:
        self.applied_at = t


def test_a_failure_and_a_plan_change_make_identical_starts() -> None:
    """Issue 31's script: arrivals, completions, a server failure and its return (the chains
    recomposed around it and back), then an adaptive plan change (a re-allocation that drops the
    plan's last chain while jobs wait) replayed through both drivers: the same starts, at the same
    times, on the same chains and servers; the waiting jobs move to the new plan at once, the
    running ones finish on the old chains."""
    rng = np.random.default_rng(11)
    times = np.cumsum(rng.exponential(0.15, NUM_JOBS))
    durations = rng.exponential(1.5, NUM_JOBS)
    setup = build_method("proposed", problem(), np.random.default_rng(0))
    plan = setup.plan_or_placement
    smaller = make_plan(plan.problem, plan.placement, plan.chains[:-1], plan.c)
    victim, t_fail, down_s = plan.chains[0].servers[0], float(times[10]) + 0.01, 1.0
    t_change = float(times[40])  # jobs wait then

    def make_dispatcher(layout):
        return dispatcher_for("proposed", layout, np.random.default_rng(1))

    sim_controller, live_controller = ScriptedChange(smaller, t_change), ScriptedChange(smaller, t_change)
    sim = simulate(
        plan, setup.make_dispatcher(np.random.default_rng(1)), ScriptedArrivals(times), ScriptedService(durations),
        num_jobs=NUM_JOBS, failures=[Failure(t_fail, victim, down_s)], recover=True, controller=sim_controller,
        make_dispatcher=make_dispatcher,
    )  # fmt: skip
    live = asyncio.run(
        drive_orchestrator(
            plan, setup.make_dispatcher(np.random.default_rng(1)), times, durations, [(t_fail, victim, down_s)],
            Recompose(make_dispatcher), live_controller,
        )
    )  # fmt: skip
    assert sim.num_finished == NUM_JOBS and sim.num_restarts >= 1 and sim.num_recomposed == 2
    assert sim_controller.decided_at == live_controller.decided_at == t_change
    assert sim_controller.applied_at == live_controller.applied_at > t_change  # the old plan's jobs drained
    waited = [job for job in range(NUM_JOBS) if times[job] < t_change < sim.started_at[job]]
    assert len(waited) >= 2, "the script must move waiting jobs to the new plan"
    dropped = len(plan.chains) - 1
    assert all(sim.chain[job] != dropped for job in range(NUM_JOBS) if times[job] >= t_change)
    assert_same_starts(live, sim)
