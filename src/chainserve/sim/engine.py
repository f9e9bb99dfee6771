"""Discrete-event simulation of a plan under any :class:`~chainserve.dispatch.base.Dispatcher`.

The driver owns the clock and the event order; the dispatcher owns every decision (paper §2.4's
central queue lives in it). Events are arrivals (a pre-drawn sorted stream), completions (a heap) and
optional server failures (a sorted list), merged in time order; at equal times a failure comes first,
then a completion, then an arrival. Randomness: ``SeedSequence(seed).spawn(2)`` (or a Generator's
``spawn(2)``) gives the arrival and the service streams, so every policy run with the same seed sees
the same arrivals and the same per-job service variates.

Invariants checked on every event (a violation raises, it is a dispatcher bug):

* memory: each job in service holds s_c·m_ij of cache on every server j of its route (with the
  dispatcher's paging, s_c·m_ij·d/T: its own tokens d, issue 30), and ``s_m·m_j + cache ≤ M_j`` on
  every server, with m_j from the plan's placement (paper §1);
* a job is never started twice at once, and only aborted jobs are ever restarted;
* conservation: at the end, every job that did not finish is waiting or in service in the dispatcher.
"""

from __future__ import annotations

import math
from array import array
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from heapq import heappop, heappush

import numpy as np

from chainserve.adapt.controller import AdaptiveController
from chainserve.analysis.records import JobRecord, Summary, summarize_arrays
from chainserve.dispatch.base import Dispatcher, Job, Route, Start
from chainserve.methods import dispatcher_for
from chainserve.plan.types import Layout
from chainserve.sim.arrivals import ArrivalProcess, Arrivals, PoissonArrivals
from chainserve.sim.batched import BatchedService
from chainserve.sim.events import Failure, Transition
from chainserve.sim.loop import run_loop
from chainserve.sim.memory import MemoryLedger, demands
from chainserve.sim.service import Duration, ServiceModel, service_model


@dataclass(frozen=True, slots=True)
class SimResult:
    """Per-job columns in arrival order (``nan`` where a job never started or finished; ``chain``
    -1 where it has none), the final route of each job, and the summary of the finished jobs among
    ``warmup:`` (``None`` when none finished, e.g. every server failed); ``transitions``: the plan
    changes an adaptive controller made (chain indices then refer to the plan each job ran on);
    ``num_refused``: jobs refused on arrival because no chain could ever hold their tokens (paging);
    ``num_restarts``: starts aborted by a failure (the job ran again); ``num_retried``: jobs that
    were; ``num_recomposed``: plans recomposed after failures and returns."""

    summary: Summary | None
    warmup: int
    arrived_at: np.ndarray
    started_at: np.ndarray
    finished_at: np.ndarray
    chain: np.ndarray
    prompt_tokens: np.ndarray
    output_tokens: np.ndarray
    routes: tuple[Route | None, ...]
    num_restarts: int
    transitions: tuple[Transition, ...] = ()
    num_refused: int = 0
    num_retried: int = 0
    num_recomposed: int = 0

    @property
    def num_jobs(self) -> int:
        return len(self.arrived_at)

    @property
    def num_finished(self) -> int:
        return int(np.count_nonzero(~np.isnan(self.finished_at)))

    @property
    def records(self) -> tuple[JobRecord, ...]:
        """Records of the measured jobs that finished (built on each access: cheap arrays, costly
        objects)."""
        return tuple(
            JobRecord(
                i,
                float(self.arrived_at[i]),
                float(self.started_at[i]),
                float(self.finished_at[i]),
                None if self.chain[i] < 0 else int(self.chain[i]),
                tuple(h.server for h in route.hops),
                int(self.prompt_tokens[i]),
                int(self.output_tokens[i]),
            )
            for i, route in enumerate(self.routes)
            if i >= self.warmup and route is not None and not math.isnan(self.finished_at[i])
        )


def simulate(
    plan: Layout,
    dispatcher: Dispatcher,
    arrivals: ArrivalProcess | None = None,
    service: str | ServiceModel = "exponential",
    *,
    seed: int | np.random.SeedSequence | np.random.Generator = 0,
    num_jobs: int | None = None,
    warmup: int = 0,
    failures: Sequence[tuple[float, int] | Failure] = (),
    recover: bool = False,
    controller: AdaptiveController | None = None,
    make_dispatcher: Callable[[Layout], Dispatcher] | None = None,
) -> SimResult:
    """Run ``num_jobs`` arrivals of ``arrivals`` (default Poisson at the plan's λ) through
    ``dispatcher`` on ``plan`` (its placement bounds memory, its chains give the utilisation; a
    ``PathPlacement`` for the per-request routers: its cache pools bound memory), with
    ``service`` times, until no event is left. ``failures``: (time, server) pairs or
    :class:`~chainserve.sim.events.Failure` events (a server back after ``down_s``), passed to
    ``dispatcher.fail_server`` (and ``restore_server``); aborted jobs lose their service and restart
    whenever the dispatcher starts them again, keeping their arrival time. ``recover``: recompose the
    chains after every failure and return, as the runtime does (:mod:`chainserve.sim.loop`;
    each recomposed plan gets ``make_dispatcher(plan)``). Jobs ``0 .. warmup-1`` are not summarised.
    ``controller``: an :class:`~chainserve.adapt.controller.AdaptiveController` whose plan changes are
    executed as events (:mod:`chainserve.sim.loop`; each new plan gets ``make_dispatcher(plan)``,
    default the proposed method's, JFFC; the paper's slots only; with ``failures`` too, by the
    orchestrator's rules — a failure during a plan change raises ``ValueError``); without one the plan stays (and a
    job-level model runs in the loop below; so it does for failures that never return, without
    ``recover`` — a fast path that ``tests/test_sim_loops.py`` pins to the general loop, which runs
    everything else, the ``"batched"`` model included). The dispatcher's ``paging``
    (issue 30) sets what each job holds; with it, a job that ``dispatcher.fits`` refuses (no live
    chain or path could ever hold it) is refused on arrival, as the runtime refuses it (400), and
    counted in ``num_refused``.

    O(events · (dispatcher cost + log jobs in service)): the memory check is O(1) per start while
    the dispatcher keeps to the chains' capacities (:mod:`chainserve.sim.memory`), O(hops) otherwise.

    >>> from chainserve.dispatch.jffc import JFFC
    >>> from chainserve.plan.csearch import make_plan
    >>> from chainserve.model.spec import ModelSpec, Problem, Server, Workload
    >>> from chainserve.plan.types import Chain, Hop, Placement, Span
    >>> p = Problem((Server("a", 10, 0.25, 0.0),), ModelSpec("m", 2, 1.0, 1.0), Workload(1.0))
    >>> plan = make_plan(p, Placement((Span(0, 1, 2),), 2), (Chain((Hop(0, 1, 2),), 0.5, 4),), 1)
    >>> r = simulate(plan, JFFC(plan.chains), seed=1, num_jobs=10_000)
    >>> r.num_finished, round(r.summary.response.mean_s, 1)  # M/M/4, μ = 2, λ = 1: E[T] ≈ 0.5
    (10000, 0.5)
    """
    if isinstance(seed, np.random.Generator):
        arrival_rng, service_rng = seed.spawn(2)
    else:
        seq = seed if isinstance(seed, np.random.SeedSequence) else np.random.SeedSequence(seed)
        arrival_rng, service_rng = (np.random.default_rng(s) for s in seq.spawn(2))
    stream = (arrivals or PoissonArrivals()).sample(plan.problem.workload, num_jobs, arrival_rng)
    n = len(stream)
    if not 0 <= warmup < n:
        raise ValueError(f"warmup: must lie in 0..{n - 1}, got {warmup}")
    model = service_model(service)
    events = [f if isinstance(f, Failure) else Failure(*f) for f in failures]
    batched = isinstance(model, BatchedService)
    if controller is not None or recover or any(f.down_s is not None for f in events) or batched:
        timing = model if batched else model.sampler(plan.problem, stream, service_rng)
        return _simulate_plans(plan, dispatcher, controller, make_dispatcher, stream, timing, warmup, events, recover)
    duration = model.sampler(plan.problem, stream, service_rng)
    # per-job columns live in typed arrays: list-speed access, numpy views at the end, no boxing churn
    times, prompts, outputs = stream.columns()
    times.append(math.inf)  # a sentinel after the last arrival
    ledger = MemoryLedger(plan, dispatcher.paging)
    demand = demands(dispatcher.paging, prompts, outputs)  # cache per block: 1 slot, or its tokens
    known, in_service, capacity = ledger.known, ledger.in_service, ledger.capacity
    admit, release = ledger.admit, ledger.release
    nan = math.nan
    started, finished = array("d", [nan]) * n, array("d", [nan]) * n
    route_of: list[Route | None] = [None] * n
    chain_of = array("q", [-1]) * n  # plan chain index of each job's route, -1 for none
    attempt = [0] * n
    state = bytearray(n)  # 0: not in service (yet, or aborted), 1: in service, 2: finished
    heap: list[tuple[float, int, int]] = []
    submit, complete = dispatcher.submit, dispatcher.complete

    def begin(starts: Sequence[Start], now: float) -> None:
        for start in starts:
            i, route = start.job.job_id, start.route
            if state[i]:
                raise RuntimeError(f"job {i} started while {('in service', 'finished')[state[i] - 1]}")
            state[i] = 1
            k = route.chain
            d = demand[i]
            if known.get(k) is route and not ledger.num_unsafe and in_service[k] + d <= capacity[k]:
                in_service[k] += d  # the ledger's fast path: Z_k < c_k (within budget) on a plan that fits
                chain_of[i] = k
            else:
                admit(i, route, now, d)
                chain_of[i] = -1 if k is None else k
            route_of[i] = route
            started[i] = now
            heappush(heap, (now + duration(route, i), i, attempt[i]))

    fail_events = sorted((f.time_s, f.server) for f in events)
    next_fail, t_fail = 0, fail_events[0][0] if fail_events else math.inf
    next_job, t_arrival = 0, times[0]
    num_restarts = num_refused = 0
    paging = dispatcher.paging
    fits = None if paging is None else dispatcher.fits
    inf = math.inf
    while True:
        t_done = heap[0][0] if heap else inf
        if t_fail <= t_done and t_fail <= t_arrival and t_fail < inf:
            outcome = dispatcher.fail_server(fail_events[next_fail][1], t_fail)
            for job in outcome.aborted:
                i = job.job_id
                if state[i] != 1:
                    raise RuntimeError(f"job {i} aborted but not in service")
                state[i] = 0
                release(route_of[i], demand[i])
                attempt[i] += 1
                started[i] = nan
                num_restarts += 1
            begin(outcome.starts, t_fail)
            next_fail += 1
            t_fail = fail_events[next_fail][0] if next_fail < len(fail_events) else inf
        elif t_done <= t_arrival:
            if t_done == inf:
                break
            _, i, a = heappop(heap)
            if a != attempt[i]:
                continue  # completion of an aborted attempt
            finished[i] = t_done
            state[i] = 2
            route = route_of[i]
            k = route.chain
            if known.get(k) is route and in_service[k] <= capacity[k]:
                in_service[k] -= demand[i]  # the ledger's fast path
            else:
                release(route, demand[i])
            starts = complete(i, t_done)
            if starts:
                begin(starts, t_done)
        else:
            i = next_job
            job = Job(i, t_arrival, prompts[i], outputs[i])
            if fits is None or fits(job):
                starts = submit(job, t_arrival)
                if starts:
                    begin(starts, t_arrival)
            else:
                num_refused += 1  # no live chain or path could ever hold it: the runtime answers 400
            next_job += 1
            t_arrival = times[next_job]

    num_held = dispatcher.num_waiting + dispatcher.num_in_service
    result = _result(plan, num_held, stream, warmup, started, finished, chain_of, route_of, num_restarts, num_refused)
    return replace(result, num_retried=sum(a > 0 for a in attempt)) if num_restarts else result


def _simulate_plans(
    plan: Layout,
    dispatcher: Dispatcher,
    controller: AdaptiveController | None,
    make_dispatcher: Callable[[Layout], Dispatcher] | None,
    stream: Arrivals,
    timing: Duration | BatchedService,
    warmup: int,
    failures: Sequence[Failure],
    recover: bool,
) -> SimResult:
    """:func:`simulate` over changing plans: :func:`chainserve.sim.loop.run_loop`."""
    if recover and dispatcher.paging is not None and make_dispatcher is None:
        raise ValueError("make_dispatcher: recomposed plans need the paged dispatcher's maker")
    run = run_loop(
        plan, dispatcher, controller, make_dispatcher or _proposed_dispatcher, stream, timing, failures, recover
    )
    one_plan = controller is None and not recover
    result = _result(
        plan, None, stream, warmup, run.started, run.finished, run.chain_of, run.route_of, run.num_restarts,
        run.num_refused, per_chain=one_plan,
    )  # fmt: skip
    return replace(result, transitions=run.transitions, num_retried=run.num_retried, num_recomposed=run.num_recomposed)


def _proposed_dispatcher(layout: Layout) -> Dispatcher:
    """The proposed method's dispatcher over a new plan (JFFC draws no random numbers)."""
    return dispatcher_for("proposed", layout, np.random.default_rng(0))


def _result(
    plan: Layout,
    num_held: int | None,
    stream: Arrivals,
    warmup: int,
    started: array,
    finished: array,
    chain_of: array,
    route_of: list[Route | None],
    num_restarts: int,
    num_refused: int,
    per_chain: bool | None = None,
) -> SimResult:
    """Check conservation (``num_held``: jobs the dispatcher still holds; ``None``: checked by the
    caller; ``num_refused``: jobs refused on arrival), then summarise the finished jobs among ``warmup:``
    (per-chain utilisation only for a run on one plan: ``per_chain``, default when ``num_held`` is given)."""
    finished_at = np.frombuffer(finished, dtype=np.float64).copy()
    num_unfinished = int(np.count_nonzero(np.isnan(finished_at)))
    if num_held is not None and num_held + num_refused != num_unfinished:
        raise RuntimeError(
            f"conservation: {num_unfinished} jobs unfinished but the dispatcher holds {num_held} waiting or in "
            f"service and refused {num_refused}"
        )
    started_at = np.frombuffer(started, dtype=np.float64).copy()
    chain = np.frombuffer(chain_of, dtype=np.int64).copy()
    keep = np.flatnonzero(~np.isnan(finished_at))  # at the end, started ⇔ finished
    num_warm = int(np.sum(keep < warmup))
    summary = (
        None
        if num_warm == keep.size
        else summarize_arrays(
            stream.times_s[keep],
            started_at[keep],
            finished_at[keep],
            chain[keep],
            [ch.capacity for ch in plan.chains] if (num_held is not None if per_chain is None else per_chain) else (),
            warmup=num_warm,
        )
    )
    return SimResult(
        summary,
        warmup,
        stream.times_s,
        started_at,
        finished_at,
        chain,
        stream.prompt_tokens,
        stream.output_tokens,
        tuple(route_of),
        num_restarts,
        num_refused=num_refused,
    )
