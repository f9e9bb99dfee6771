"""Simulation with plan changes: the adaptive controller's decisions executed as events (beyond the
paper; :mod:`chainserve.adapt`). :func:`chainserve.sim.engine.simulate` calls it when given a
controller.

Each plan in force is a *generation* with its own dispatcher. How a change is carried out — which
servers load when, when the plans switch, when each server joins the new plan — is the pure schedule
:class:`~chainserve.adapt.migration.Migration`, the one the serving runtime steps too; here its
loads take their modelled seconds of virtual time. The controller sees every arrival (``observe``)
and decides after each arrival and at every window boundary of its detector. Memory is checked on
every start against what each server holds *now*: the span loaded (a hop must lie inside it) and
``s_m·m_j + cache of all generations' jobs ≤ M_j``.
"""

from __future__ import annotations

import math
from array import array
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from heapq import heappop, heappush

import numpy as np

from chainserve.adapt.controller import AdaptiveController, PlanChange
from chainserve.adapt.migration import Action, Join, Load, Migration, Switch
from chainserve.dispatch.base import Dispatcher, Job, Route, Start
from chainserve.plan.types import Layout, Span, jobs_that_fit
from chainserve.sim.arrivals import Arrivals
from chainserve.sim.memory import MemoryExceeded
from chainserve.sim.service import Duration

#: Event kinds, in the order they run at equal times.
_LOADED, _DONE, _TICK = 0, 1, 2


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
        span, problem = self.loaded[j], self.problem
        if span is None:
            return 0
        room = problem.servers[j].memory_gb - problem.block_size_gb(j) * span.num_blocks
        return jobs_that_fit(room, problem.cache_size_gb(j))

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
    """Run ``stream`` through the generations of plans ``controller`` decides, each change carried out
    by a :class:`~chainserve.adapt.migration.Migration` (module docstring); returns the
    started/finished/chain columns, the routes, the generations and the transitions."""
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
    schedule: Migration | None = None
    active = 0  # the generation that takes arrivals

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

    def old_cache() -> list[int]:
        return [sum(col) for col in zip(*(gen.used for gen in gens[:-1]), strict=True)]

    def carry_out(actions: Sequence[Action], now: float) -> None:
        nonlocal active, change, schedule
        new = len(gens) - 1
        for action in actions:
            if isinstance(action, Load):
                servers.load(action.server, action.span)
                push(now + action.seconds, _LOADED, action.server)
            elif isinstance(action, Join):
                begin(gens[new].dispatcher.restore_server(action.server, now), now, new)
            elif isinstance(action, Switch):
                waiting = gens[active].dispatcher.drain()
                active = new
                for job in waiting:
                    begin(gens[active].dispatcher.submit(job, now), now, active)
            else:
                controller.applied(change, now)
                transitions.append(Transition(change, now))
                change, schedule = None, None

    def decide(now: float) -> None:
        nonlocal change, schedule
        decided = controller.decide(now)
        if decided is None:
            return
        change, layout = decided, decided.layout
        loaded, limits = dict(enumerate(servers.loaded)), dict(enumerate(servers.limit))
        schedule = Migration(layout, dict(decided.migration), loaded, limits)
        gens.append(_Generation(layout, make_dispatcher(layout), [0] * layout.problem.num_servers, {}))
        for j in schedule.servers:
            gens[-1].dispatcher.fail_server(j, now)
        in_use = {j for gen in gens[:-1] for chain in gen.layout.chains for j in chain.servers}
        carry_out(schedule.start(dict(enumerate(old_cache())), in_use), now)

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
                if schedule is not None and gen_of[i] < len(gens) - 1:
                    carry_out(schedule.released(dict(enumerate(old_cache()))), t)
            elif kind == _LOADED:
                j = payload
                carry_out(schedule.loaded(j, servers.limit[j], dict(enumerate(old_cache()))), t)
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
