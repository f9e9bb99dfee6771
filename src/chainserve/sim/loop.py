"""The simulator's general event loop (issue 31; Vidur's lesson: plan changes and pipeline stages are
event kinds, and a policy's decisions are applied by the loop): arrivals, job completions, server
failures and returns (:mod:`.events`), the adaptive controller's ticks and finished loads, in one
heap (:mod:`.heap`); the batched model's iterations and hops run in its compiled core
(:class:`~chainserve.sim.batched_process.BatchedProcess`, a service component here), which the loop
asks before each of its own events and arrivals to run what comes first and which hands back each
job at its last token. :func:`chainserve.sim.engine.simulate` runs the loop for a controller, a
failure with a return, ``recover`` and the batched model; its one fast path, the job-level loop of
:mod:`.engine` on one plan, is pinned to this loop by ``tests/test_sim_loops.py`` (same seed, same
records).

Each plan in force is a *generation* with its own dispatcher, kept in the same
:class:`~chainserve.dispatch.generations.Generations` the orchestrator keeps. Event kinds, in the
order they run at equal times: a server fails, a server is back, a server finished loading (its
re-placement done: a plan change's new plan serves there only after its blocks' modelled load time), a
job finished, the controller's tick, then the batched service's; arrivals come after every event of
their instant but the batched service's iteration starts.

* **Plan changes.** How a change is carried out — which servers load when, when the plans switch,
  when each server joins the new plan — is the pure schedule
  :class:`~chainserve.adapt.migration.Migration`, the one the serving runtime steps too; here its
  loads take their modelled seconds of virtual time. The controller sees every arrival (``observe``)
  and is asked after each arrival and at every window boundary of its detector — as the orchestrator
  asks it, never while a plan change runs or a server is down. A block server holds what its plan
  reserves there (its arena, as the runtime starts it; a server loaded by a change, the new plan's).
* **Failures** (:class:`Failure`), as the orchestrator handles them: every generation's dispatcher
  fails the server (its jobs there lose their service and wait again, keeping their arrival time);
  with ``recover`` the chains are then recomposed on the live servers within their arenas
  (:func:`~chainserve.plan.recovery.recompose`) — as the runtime serves a fixed plan, each server's
  arena and admission limit are the plan's reservation there
  (:func:`~chainserve.plan.types.reserved_block_jobs`) — and the recomposed plan takes the waiting
  jobs at once while running ones finish on the old chains; when the server comes back every
  dispatcher restores it, and with ``recover`` the chains are recomposed again (all alive: the
  placed plan itself) — the plan last placed, so after a plan change the new one. A failure while a
  plan change runs is refused (``ValueError``: the old plans' jobs and the servers already loaded
  for the new one are not modelled together). When no chain covers the model the jobs wait for a
  server to come back (the runtime may place the model anew; not simulated).

Memory is checked on every start against what each server holds *now*: the span loaded (a hop must
lie inside it), the server alive, and ``s_m·m_j + cache of all generations' jobs ≤ M_j``. A start
without room on a hop (a recomposed plan's jobs beside the old plan's) waits until each hop has
room, as the runtime's ``ServerTable.hold`` does; its service starts then.
"""

from __future__ import annotations

import math
from array import array
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from heapq import heappop

import numpy as np

from chainserve.adapt.controller import AdaptiveController, PlanChange
from chainserve.adapt.migration import Action, Join, Load, Migration, Switch
from chainserve.dispatch.base import Dispatcher, Job, Route, Start
from chainserve.dispatch.generations import Generation, Generations
from chainserve.plan.recovery import recompose
from chainserve.plan.types import Layout, Plan, reserved_block_jobs
from chainserve.sim.arrivals import Arrivals
from chainserve.sim.batched import BatchedService
from chainserve.sim.events import Failure, Transition
from chainserve.sim.heap import EventHeap
from chainserve.sim.memory import MemoryExceeded, MemoryLedger, demands
from chainserve.sim.service import Duration

#: Event kinds, in the order they run at equal times; then the batched service's own events, which
#: its compiled core keeps (:class:`~chainserve.sim.batched_process.BatchedProcess`; arrivals rank among them).
_FAIL, _BACK, _LOADED, _DONE, _TICK = range(5)
#: A job's state: not in service (yet, or aborted), started but waiting for room, in service, finished.
_IDLE, _HELD, _RUNNING, _FINISHED = 0, 1, 2, 3


@dataclass(frozen=True, slots=True)
class LoopResult:
    """Per-job start/finish/chain columns and routes, the plan changes, the restarts (aborted
    starts), the jobs restarted and the recompositions after failures and returns."""

    started: array
    finished: array
    chain_of: array
    route_of: list[Route | None]
    transitions: tuple[Transition, ...]
    num_restarts: int
    num_retried: int
    num_recomposed: int
    num_refused: int = 0


def run_loop(
    plan: Layout,
    dispatcher: Dispatcher,
    controller: AdaptiveController | None,
    make_dispatcher: Callable[[Layout], Dispatcher],
    stream: Arrivals,
    service: Duration | BatchedService,
    failures: Sequence[Failure] = (),
    recover: bool = False,
) -> LoopResult:
    """Run ``stream`` through the generations of plans that ``controller``'s changes and, with
    ``recover``, the recompositions after ``failures`` make (module docstring); raises when a job is
    lost or memory is exceeded. ``service``: each job's duration (the job-level models), or the
    iteration-level model (:class:`~chainserve.sim.batched_process.BatchedProcess` then serves every job as
    its steps, hops and batches, and a failure voids the steps in flight of the jobs it aborts)."""
    if recover and not isinstance(plan, Plan):
        raise ValueError("recover: recomposing chains needs a plan with chains")
    n = len(stream)
    problem = plan.problem
    times, prompts, outputs = stream.columns()
    times.append(math.inf)
    paging = dispatcher.paging
    if paging is not None and controller is not None:
        raise ValueError("paging: plan changes are simulated in max-length slots (the paper's model)")
    demand = demands(paging, prompts, outputs)  # cache per block: 1 slot, or its tokens in pages
    ledger = MemoryLedger(plan, paging, by_chain=False)  # what each server holds, alive or not, its jobs' cache
    placed = plan  # the plan the servers were last placed for: recover recomposes its chains
    if recover or controller is not None:  # as the runtime: each server's arena is its plan's reservation
        ledger.keep_to_reservation(plan)
    gens = Generations(plan, dispatcher)
    first = gens.current
    every: list[Generation] = [first]  # every generation ever, for the conservation check
    nan = math.nan
    started, finished = array("d", [nan]) * n, array("d", [nan]) * n
    chain_of = array("q", [-1]) * n
    route_of: list[Route | None] = [None] * n
    start_of: list[Start | None] = [None] * n
    gen_of: list[Generation | None] = [None] * n
    state = bytearray(n)
    live_seq = array("q", [0]) * n  # the seq of each job's live completion event
    held: list[int] = []  # jobs started by a dispatcher, waiting for room on a hop (oldest first)
    duration_routes: dict[int, dict[int, Route]] = {}  # id(generation) -> chain -> its timed route
    events = EventHeap()
    heap = events.entries
    transitions: list[Transition] = []
    change: PlanChange | None = None
    schedule: Migration | None = None
    num_restarts = num_recomposed = num_refused = 0
    retried: set[int] = set()

    def push(t: float, kind: int, payload: int, who: int = 0) -> int:
        return events.push(t, kind, who, payload)

    def complete(i: int, t: float) -> None:
        """Job ``i`` finished: its cache is freed, its dispatcher starts what waited for it."""
        finished[i] = t
        state[i] = _FINISHED
        gen = gen_of[i]
        release(i, gen)
        retry_held(t)  # the starts that waited for room first, as the runtime wakes its holds
        starts = gen.dispatcher.complete(i, t)
        if starts:
            begin(starts, t, gen)
        if schedule is not None and gen is not gens.newest:
            carry_out(schedule.released(gens.old_cache()), t)

    process, duration = None, service
    if isinstance(service, BatchedService):
        from chainserve.sim.batched_process import ARRIVAL, BatchedProcess  # numba loads when the model runs

        process = BatchedProcess(problem, service, prompts, outputs)

    def release(i: int, gen: Generation) -> None:
        ledger.release(start_of[i].route, demand[i])
        gen.ended(start_of[i])

    def run(i: int, now: float) -> None:
        """Job ``i``'s service begins: its cache is held and its completion scheduled."""
        start, gen = start_of[i], gen_of[i]
        ledger.hold(start.route, demand[i])  # :func:`begin` found room
        gen.started(start)  # in block-slots, as the runtime's generations count
        state[i] = _RUNNING
        started[i] = now
        route = start.route
        if process is not None:
            process.start(i, route, now)
            return
        timed = route
        if gen is not first and route.chain is not None:  # token service caches costs by chain index
            timed = duration_routes.setdefault(id(gen), {}).setdefault(
                route.chain, Route(route.hops, route.service_time_s)
            )
        live_seq[i] = push(now + duration(timed, i), _DONE, i)

    def begin(starts: Sequence[Start], now: float, gen: Generation) -> None:
        for start in starts:
            i, route = start.job.job_id, start.route
            if state[i] != _IDLE:
                raise RuntimeError(f"job {i} started while in service or finished")
            ledger.check(i, route, now)
            start_of[i], gen_of[i], route_of[i] = start, gen, route
            chain_of[i] = -1 if route.chain is None else route.chain
            if not ledger.has_room(route, demand[i]):
                if not recover:  # only a recomposed plan's starts may wait for the old plan's jobs
                    raise MemoryExceeded(ledger.overflow(i, route, demand[i], now))
                state[i] = _HELD
                held.append(i)
            else:
                run(i, now)

    def retry_held(now: float) -> None:
        """Held starts that now have room on every hop begin, oldest first; one of a plan no longer
        current that still has none moves to the current plan (the runtime's ``_requeue``)."""
        if not held:
            return
        waiting = list(held)
        held.clear()
        for i in waiting:  # the runtime's holds do not queue: whoever fits goes
            if ledger.has_room(start_of[i].route, demand[i]):
                run(i, now)
            elif gen_of[i] is not gens.current:
                state[i] = _IDLE
                old, current, job = gen_of[i], gens.current, start_of[i].job
                begin(old.dispatcher.cancel(i, now), now, old)
                for moved in (job, *gens.retire_idle()):
                    begin(current.dispatcher.submit(moved, now), now, current)
            else:
                held.append(i)

    def end(i: int) -> None:
        """Job ``i`` leaves service (finished or aborted): its cache is freed."""
        if state[i] == _RUNNING:
            release(i, gen_of[i])
        else:
            held.remove(i)

    def carry_out(actions: Sequence[Action], now: float) -> None:
        nonlocal change, schedule, placed
        new = gens.newest
        for action in actions:
            if isinstance(action, Load):
                ledger.load(action.server, action.span)
                ledger.keep_to_reservation(new.layout, (action.server,))  # restarted with the new plan's arena
                push(now + action.seconds, _LOADED, action.server)
            elif isinstance(action, Join):
                begin(new.dispatcher.restore_server(action.server, now), now, new)
            elif isinstance(action, Switch):
                for job in gens.switch():
                    begin(gens.current.dispatcher.submit(job, now), now, gens.current)
            else:
                controller.applied(change, now)
                transitions.append(Transition(change, now))
                placed, change, schedule = new.layout, None, None

    def decide(now: float) -> None:
        """The controller's decision, asked as the orchestrator asks it: never during a plan change
        nor while a server is down."""
        nonlocal change, schedule
        if schedule is not None or not all(ledger.alive):
            return
        decided = controller.decide(now)
        if decided is None:
            return
        change, layout = decided, decided.layout
        loaded, limits = dict(enumerate(ledger.loaded)), dict(enumerate(ledger.limits))
        schedule = Migration(layout, dict(decided.migration), loaded, limits)
        new = gens.bring_in(layout, make_dispatcher(layout))
        every.append(new)
        for j in schedule.servers:
            new.dispatcher.fail_server(j, now)
        in_use = {j for gen in gens if gen is not new for chain in gen.layout.chains for j in chain.servers}
        carry_out(schedule.start(gens.old_cache(), in_use), now)

    def recompose_now(now: float) -> None:
        """The orchestrator's ``PlanChanger.recompose``: chains for the live servers of the plan last
        placed, within its reservations, if any cover (never during a plan change: none starts while
        a server is down, and a failure during one is refused)."""
        nonlocal num_recomposed
        alive = {j for j in range(problem.num_servers) if ledger.alive[j]}
        new = recompose(placed, alive, reserved_block_jobs(placed))
        if new is None:
            return  # no chain covers the model: jobs wait for a server to come back
        num_recomposed += 1
        gen = Generation(new, make_dispatcher(new))
        every.append(gen)
        moved = gens.switch(gen) + gens.retire_idle()
        for job in moved:
            begin(gen.dispatcher.submit(job, now), now, gen)

    def fail(j: int, now: float) -> None:
        nonlocal num_restarts
        if not ledger.alive[j]:
            return  # dead already
        if schedule is not None:
            raise ValueError(
                f"failures: server {problem.servers[j].name} fails at {now:g} s while the plan change decided "
                f"at {change.time_s:g} s runs; a failure during a plan change is not simulated"
            )
        ledger.alive[j] = False
        for gen in list(gens):
            outcome = gen.dispatcher.fail_server(j, now)
            for job in outcome.aborted:
                i = job.job_id
                if state[i] not in (_RUNNING, _HELD):
                    raise RuntimeError(f"job {i} aborted but not in service")
                end(i)
                state[i], live_seq[i] = _IDLE, 0  # its completion event, if any, is void
                if process is not None:
                    process.abort(i)
                started[i] = nan
                num_restarts += 1
                retried.add(i)
            begin(outcome.starts, now, gen)
        if recover:
            recompose_now(now)
        retry_held(now)

    def back(j: int, now: float) -> None:
        if ledger.alive[j]:
            return
        ledger.alive[j] = True
        for gen in list(gens):
            begin(gen.dispatcher.restore_server(j, now), now, gen)
        if recover:
            recompose_now(now)
        retry_held(now)

    for failure in failures:
        push(failure.time_s, _FAIL, failure.server)
        if failure.down_s is not None:
            push(failure.time_s + failure.down_s, _BACK, failure.server)
    window = math.inf if controller is None else controller.config.window_s
    t_last = times[n - 1] if n else 0.0
    next_tick = times[0] + window if n else math.inf
    if next_tick <= t_last:
        push(next_tick, _TICK, 0)
    next_job, t_arrival = 0, times[0]
    inf = math.inf
    while True:
        t_event = heap[0][0] if heap else inf
        if process is not None:  # the batched service's events before the loop's next one
            if t_event <= t_arrival and heap:
                i, t = process.advance(t_event, heap[0][1])
            else:
                i, t = process.advance(t_arrival, ARRIVAL)
            if i >= 0:
                complete(i, t)
                continue
        if t_event <= t_arrival:
            if t_event == inf:
                break
            t, kind, s, who, payload = heappop(heap)
            if kind == _DONE:
                if s == live_seq[payload]:  # else the completion of an aborted attempt
                    complete(payload, t)
            elif kind == _FAIL:
                fail(payload, t)
            elif kind == _BACK:
                back(payload, t)
            elif kind == _LOADED:
                j = payload
                carry_out(schedule.loaded(j, ledger.limits[j], gens.old_cache()), t)
            else:
                decide(t)
                if t + window <= t_last:
                    push(t + window, _TICK, 0)
        else:
            i = next_job
            if controller is not None:
                controller.observe(t_arrival, prompts[i], outputs[i])
            job = Job(i, t_arrival, prompts[i], outputs[i])
            current = gens.current
            if paging is None or current.dispatcher.fits(job):
                begin(current.dispatcher.submit(job, t_arrival), t_arrival, current)
            else:
                num_refused += 1  # no live chain could ever hold it: the runtime answers 400
            if controller is not None:
                decide(t_arrival)
            next_job += 1
            t_arrival = times[next_job]
    unfinished = int(np.count_nonzero(np.isnan(np.frombuffer(finished, dtype=np.float64))))
    in_system = sum(g.dispatcher.num_waiting + g.dispatcher.num_in_service for g in every)
    if in_system + num_refused != unfinished:
        raise RuntimeError(
            f"conservation: {unfinished} jobs unfinished but the dispatchers hold {in_system} and {num_refused} "
            "were refused"
        )
    return LoopResult(
        started, finished, chain_of, route_of, tuple(transitions), num_restarts, len(retried), num_recomposed,
        num_refused,
    )  # fmt: skip
