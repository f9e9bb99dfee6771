"""Simulation with plan changes: the adaptive controller's decisions executed as events (beyond the
paper; :mod:`chainserve.adapt`). :func:`chainserve.sim.engine.simulate` calls it when given a
controller.

Each plan in force is a *generation* with its own dispatcher. A change decided at t:

* servers of the new placement that no chain in use runs on (idle ones) load their new span at
  once (``PlanChange.migration`` gives each load time) while the old plan keeps serving;
* once they are loaded (at once if there are none) the plans switch: the old dispatcher's waiting
  jobs move, in queue order, to a fresh dispatcher over the new chains, which also takes every later
  arrival; the jobs in service finish on their old chains (drained, never cut);
* every other server of the new placement joins the new dispatcher when it can: one whose span
  changes once the old jobs on it have finished (then it unloads) and its load time has passed; one
  whose span stays once the old jobs' cache leaves room for its whole new reservation;
* once every server has joined, ``controller.applied(change, t)`` is called.

The controller sees every arrival (``observe``) and decides after each arrival and at every window
boundary of its detector. Memory is checked on every start against what each server holds *now*:
the span loaded (a hop must lie inside it) and ``s_m·m_j + cache of all generations' jobs ≤ M_j``.
"""

from __future__ import annotations

import math
from array import array
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from heapq import heappop, heappush

import numpy as np

from chainserve.adapt.controller import AdaptiveController, PlanChange
from chainserve.dispatch.base import Dispatcher, Job, Route, Start
from chainserve.plan.types import Layout, Span, jobs_that_fit, reserved_block_jobs
from chainserve.sim.arrivals import Arrivals
from chainserve.sim.memory import MemoryExceeded
from chainserve.sim.service import Duration

#: Event kinds, in the order they run at equal times.
_LOADED, _DONE, _SWITCH, _TICK = 0, 1, 2, 3


@dataclass(frozen=True, slots=True)
class Transition:
    """One executed plan change: the decision and when its last server joined the new plan."""

    change: PlanChange
    finished_s: float

    @property
    def duration_s(self) -> float:
        """Time spent migrating: from the decision until every server serves the new plan."""
        return self.finished_s - self.change.time_s


@dataclass(slots=True)
class _Generation:
    layout: Layout
    dispatcher: Dispatcher
    used: list[int]  # block-jobs of cache its jobs hold, per server
    duration_routes: dict[int, Route]


class _Servers:
    """What each server holds now: its loaded span and the cache in block-jobs (all generations)."""

    def __init__(self, layout: Layout):
        problem = layout.problem
        self.problem = problem
        self.loaded: list[Span | None] = [layout.placement.span_of(j) for j in range(problem.num_servers)]
        self.used = [0] * problem.num_servers
        self.limit = [self._limit(j) for j in range(problem.num_servers)]

    def _limit(self, j: int) -> int:
        span, model = self.loaded[j], self.problem.model
        if span is None:
            return 0
        room = self.problem.servers[j].memory_gb - model.block_size_gb * span.num_blocks
        return jobs_that_fit(room, model.cache_size_gb)

    def load(self, j: int, span: Span) -> None:
        """Unload server ``j`` (it must hold no job) and give it ``span``."""
        if self.used[j]:
            raise RuntimeError(f"server {j} unloaded while its jobs hold {self.used[j]} block-jobs of cache")
        self.loaded[j] = span
        self.limit[j] = self._limit(j)

    def admit(self, job: int, route: Route, gen: _Generation, now: float) -> None:
        for hop in route.hops:
            j, span = hop.server, self.loaded[hop.server]
            if span is None or hop.start_block < span.start_block or hop.end_block > span.end_block:
                raise MemoryExceeded(f"job {job} at t={now}: server {j} does not hold blocks of {hop}")
            if self.used[j] + hop.num_blocks > self.limit[j]:
                raise MemoryExceeded(
                    f"job {job} at t={now}: server {j} would hold {self.used[j] + hop.num_blocks} block-jobs "
                    f"of cache, {self.limit[j]} fit"
                )
        for hop in route.hops:
            self.used[hop.server] += hop.num_blocks
            gen.used[hop.server] += hop.num_blocks

    def release(self, route: Route, gen: _Generation) -> None:
        for hop in route.hops:
            self.used[hop.server] -= hop.num_blocks
            gen.used[hop.server] -= hop.num_blocks


def simulate_adaptive(
    plan: Layout,
    dispatcher: Dispatcher,
    controller: AdaptiveController,
    make_dispatcher: Callable[[Layout], Dispatcher],
    stream: Arrivals,
    duration: Duration,
) -> tuple[array, array, array, list[Route | None], list[_Generation], tuple[Transition, ...]]:
    """Run ``stream`` through the generations of plans ``controller`` decides (module docstring);
    returns the started/finished/chain columns, the routes, the generations and the transitions."""
    n = len(stream)
    times, prompts, outputs = stream.columns()
    times.append(math.inf)
    servers = _Servers(plan)
    gens = [_Generation(plan, dispatcher, [0] * plan.problem.num_servers, {})]
    nan = math.nan
    started, finished = array("d", [nan]) * n, array("d", [nan]) * n
    chain_of = array("q", [-1]) * n
    route_of: list[Route | None] = [None] * n
    gen_of = array("q", [0]) * n
    heap: list[tuple[float, int, int, int]] = []  # (time, kind, seq, payload)
    seq = 0
    transitions: list[Transition] = []
    change: PlanChange | None = None
    active = 0  # the generation that takes arrivals
    joining: set[int] = set()  # servers of the new plan not yet in service
    to_load: dict[int, float] = {}  # servers still to unload and load, with their load time
    loading: set[int] = set()  # servers loading now
    reservation: dict[int, int] = {}

    def push(t: float, kind: int, payload: int) -> None:
        nonlocal seq
        seq += 1
        heappush(heap, (t, kind, seq, payload))

    def begin(starts: Sequence[Start], now: float, g: int) -> None:
        gen = gens[g]
        for start in starts:
            i, route = start.job.job_id, start.route
            if not math.isnan(started[i]):
                raise RuntimeError(f"job {i} started twice")
            servers.admit(i, route, gen, now)
            started[i], route_of[i], gen_of[i] = now, route, g
            chain_of[i] = -1 if route.chain is None else route.chain
            timed = route
            if g and route.chain is not None:  # a fresh route: token service caches costs by chain index
                timed = gen.duration_routes.setdefault(route.chain, Route(route.hops, route.service_time_s))
            push(now + duration(timed, i), _DONE, i)

    def old_cache(j: int) -> int:
        return sum(gen.used[j] for gen in gens[:-1])

    def admit_servers(now: float) -> None:
        """Bring into the new plan every joining server that can join now (module docstring)."""
        nonlocal change
        new, g = gens[-1], len(gens) - 1
        for j in sorted(joining - loading):
            span = new.layout.placement.span_of(j)
            if j in to_load:
                if old_cache(j) == 0:
                    servers.load(j, span)
                    loading.add(j)
                    push(now + to_load.pop(j), _LOADED, j)
            elif servers.loaded[j] == span and old_cache(j) + reservation[j] <= servers.limit[j]:
                joining.discard(j)
                begin(new.dispatcher.restore_server(j, now), now, g)
        if change is not None and not joining:
            controller.applied(change, now)
            transitions.append(Transition(change, now))
            change = None

    def start_transition(decided: PlanChange, now: float) -> None:
        nonlocal change
        change = decided
        layout = decided.layout
        new = _Generation(layout, make_dispatcher(layout), [0] * layout.problem.num_servers, {})
        gens.append(new)
        reservation.clear()
        reservation.update(reserved_block_jobs(layout))
        seconds = dict(decided.migration)
        to_load.clear()
        for span in layout.placement.spans:
            if servers.loaded[span.server] != span:
                to_load[span.server] = seconds.get(span.server, 0.0)
        joining.clear()
        joining.update(span.server for span in layout.placement.spans)
        for j in joining:
            new.dispatcher.fail_server(j, now)
        in_use = {j for gen in gens[:-1] for chain in gen.layout.chains for j in chain.servers}
        idle = [j for j in to_load if j not in in_use and old_cache(j) == 0]
        for j in idle:
            servers.load(j, layout.placement.span_of(j))
            loading.add(j)
            push(now + to_load[j], _LOADED, j)
        wait = max((to_load.pop(j) for j in idle), default=0.0)
        if wait > 0:
            push(now + wait, _SWITCH, 0)
        else:
            switch(now)

    def switch(now: float) -> None:
        """The new plan takes the waiting jobs and every later arrival."""
        nonlocal active
        waiting = gens[active].dispatcher.drain()
        active = len(gens) - 1
        admit_servers(now)
        for job in waiting:
            begin(gens[active].dispatcher.submit(job, now), now, active)

    def decide(now: float) -> None:
        decided = controller.decide(now)
        if decided is not None:
            start_transition(decided, now)

    window = controller.config.window_s
    t_last = times[n - 1] if n else 0.0
    next_tick = times[0] + window if n else math.inf
    if next_tick <= t_last:
        push(next_tick, _TICK, 0)
    next_job, t_arrival = 0, times[0]
    while True:
        t_event = heap[0][0] if heap else math.inf
        if t_event <= t_arrival:
            if t_event == math.inf:
                break
            t, kind, _, payload = heappop(heap)
            if kind == _DONE:
                i = payload
                finished[i] = t
                gen = gens[gen_of[i]]
                servers.release(route_of[i], gen)
                starts = gen.dispatcher.complete(i, t)
                if starts:
                    begin(starts, t, gen_of[i])
                if change is not None and active == len(gens) - 1 and gen_of[i] < active:
                    admit_servers(t)
            elif kind == _LOADED:
                loading.discard(payload)
                joining.discard(payload)
                begin(gens[-1].dispatcher.restore_server(payload, t), t, len(gens) - 1)
                if active == len(gens) - 1:
                    admit_servers(t)
            elif kind == _SWITCH:
                switch(t)
            else:
                decide(t)
                if t + window <= t_last:
                    push(t + window, _TICK, 0)
        else:
            i = next_job
            controller.observe(t_arrival, prompts[i], outputs[i])
            job = Job(i, t_arrival, prompts[i], outputs[i])
            begin(gens[active].dispatcher.submit(job, t_arrival), t_arrival, active)
            decide(t_arrival)
            next_job += 1
            t_arrival = times[next_job]
    unfinished = int(np.count_nonzero(np.isnan(np.frombuffer(finished, dtype=np.float64))))
    held = sum(g.dispatcher.num_waiting + g.dispatcher.num_in_service for g in gens)
    if held != unfinished:
        raise RuntimeError(f"conservation: {unfinished} jobs unfinished but the dispatchers hold {held}")
    return started, finished, chain_of, route_of, gens, tuple(transitions)
