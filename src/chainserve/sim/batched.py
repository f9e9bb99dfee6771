"""Iteration-level simulation of batched serving (issue 18): ``simulate(..., service="batched")``.

The job-level models of :mod:`.service` give a job one duration when it starts. Here a job is its
l_out forward steps (one prefill, l_out − 1 decodes), and each step walks its route hop by hop the way
the runtime moves it (:mod:`chainserve.runtime.jobs`): the orchestrator sends the step to the hop's
block server, the server computes it in an iteration, the reply comes back after the hop's
communication time, the next hop follows; after the last hop the orchestrator's LM head samples the
token and the next step begins.

A server with a step cost (:mod:`chainserve.model.step_cost`) batches as the block server's
:class:`~chainserve.runtime.batching.Batcher` does: steps that arrive while an iteration runs wait;
the next iteration takes the oldest waiting step and every later one within ``max_batch_tokens``
(a decode counts one token); prompts go in chunks of ``max_batch_tokens // 2`` tokens, one chunk per
iteration, and the step moves on after its last chunk. The iteration costs
``m·(max(α, α') + β·b + β'·q)`` (:meth:`StepCost.iteration_s`). A server without one serves every
step at once in ``m_ij·τ^p_j / l̄_out`` (the emulated backend's model, no batching). The orchestrator's
head batches likewise with ``Problem.head_cost`` (free without it). Communication per hop and step is
``τ^c_j / l̄_out`` plus ``hop_overhead_s``, and does not hold the server.

Dispatch is the same object the job-level engine and the runtime drive: a job's route comes from
``submit``/``complete``; it holds its chain's KV cache (checked by :class:`.memory.MemoryLedger`) from
start to its last token. Cost: O(l_out · hops) events per job.
"""

from __future__ import annotations

import math
from array import array
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from heapq import heappop, heappush
from typing import ClassVar

from chainserve.dispatch.base import Dispatcher, Job, Route, Start
from chainserve.model.spec import Problem
from chainserve.model.step_cost import MAX_BATCH_TOKENS, StepCost, prefill_chunk_tokens, take_batch
from chainserve.plan.types import Layout
from chainserve.sim.arrivals import Arrivals
from chainserve.sim.memory import MemoryLedger, demands

# event kinds, in the order they run at equal times: an iteration starts after everything else of
# its instant, so steps that reach a server together share it
_DONE, _ARRIVE, _START = 0, 1, 2


@dataclass(frozen=True, slots=True)
class BatchedService:
    """The iteration-level model (module docstring); ``hop_overhead_s`` ≥ 0 per hop and step."""

    hop_overhead_s: float = 0.0
    max_batch_tokens: int = MAX_BATCH_TOKENS
    name: ClassVar[str] = "batched"

    def __post_init__(self) -> None:
        if not self.hop_overhead_s >= 0:
            raise ValueError(f"hop_overhead_s: must be ≥ 0, got {self.hop_overhead_s}")
        if self.max_batch_tokens < 2:
            raise ValueError(f"max_batch_tokens: must be ≥ 2, got {self.max_batch_tokens}")


class _Station:
    """A batching server (or the head): its queue of (job, tokens, blocks) and whether it computes."""

    __slots__ = ("cost", "queue", "busy")

    def __init__(self, cost: StepCost | None):
        self.cost = cost
        self.queue: deque[tuple[int, int, int]] = deque()
        self.busy = False

    def take(self, budget: int) -> list[tuple[int, int, int]]:
        """The next batch by the block server's rule (:func:`~chainserve.model.step_cost.take_batch`)."""
        batch, rest = take_batch(self.queue, _tokens, budget)
        self.queue = deque(rest)
        return batch


def _tokens(item: tuple[int, int, int]) -> int:
    return item[1]


class BatchedProcess:
    """The iteration-level service of every job (module docstring) as a component of an event loop:
    the loop owns the heap and gives ``push(t, kind, who, payload)``, hands each of the component's
    events back to :meth:`handle`, calls :meth:`start` when a job's service begins and :meth:`abort`
    when a failure ends it; the component calls ``finish(job, t)`` after a job's last token.
    ``kinds``: the loop's kind numbers for an iteration's item done, a step's reply back, an
    iteration start (in that order at equal times; the last must run after the arrivals of its
    instant, so that steps that reach a server together share it)."""

    def __init__(
        self,
        problem: Problem,
        model: BatchedService,
        prompts: array,
        outputs: array,
        push: Callable[[float, int, int, int], None],
        finish: Callable[[int, float], None],
        kinds: tuple[int, int, int] = (_DONE, _ARRIVE, _START),
    ):
        servers, steps_mean = problem.servers, problem.workload.output_tokens
        self.chunk, self.budget = prefill_chunk_tokens(model.max_batch_tokens), model.max_batch_tokens
        self.comm = [s.tau_c_s / steps_mean + model.hop_overhead_s for s in servers]
        self.lone = [s.tau_p_s / steps_mean for s in servers]  # per block and step, no step cost
        self.stations = [_Station(s.step) for s in servers]
        self.stations.append(_Station(problem.head_cost))  # the orchestrator's head
        self.head_id = len(servers)
        self.prompts, self.outputs, self.push, self.finish = prompts, outputs, push, finish
        self.kind_done, self.kind_arrive, self.kind_start = kinds
        n = len(prompts)
        self.route_of: list[Route | None] = [None] * n
        self.hop_at = [0] * n  # the hop the job's current step is at
        self.steps_left = [0] * n  # forward steps still to come, the current one included
        self.tokens_left = [0] * n  # prompt tokens of the current step still to compute on this hop
        self.attempt = [0] * n  # each event carries the attempt it belongs to; an aborted one's are void

    def start(self, i: int, route: Route, now: float) -> None:
        """Job ``i``'s service begins on ``route``: its prompt goes to the first hop."""
        self.route_of[i] = route
        self.steps_left[i], self.hop_at[i], self.tokens_left[i] = int(self.outputs[i]), 0, int(self.prompts[i])
        self._send(i, now)

    def abort(self, i: int) -> None:
        """Job ``i`` lost its service: its waiting items leave their queues, its events are void."""
        self.attempt[i] += 1
        for station in self.stations:
            if any(item[0] == i for item in station.queue):
                station.queue = deque(item for item in station.queue if item[0] != i)
        self.route_of[i] = None

    def handle(self, kind: int, who: int, payload: int, now: float) -> None:
        if kind == self.kind_start:
            self._iterate(who, now)
        elif kind == self.kind_done:
            i, rest = divmod(payload, self.budget)
            a, i = divmod(i, len(self.route_of))
            if a == self.attempt[i]:
                self._done(who, i, rest, now)
        else:  # the step's reply reached the orchestrator: on to the next hop
            i = who
            if payload != self.attempt[i]:
                return
            self.hop_at[i] += 1
            self.tokens_left[i] = 1 if self.steps_left[i] < int(self.outputs[i]) else int(self.prompts[i])
            self._send(i, now)

    def _enqueue(self, j: int, item: tuple[int, int, int], now: float) -> None:
        station = self.stations[j]
        station.queue.append(item)
        if not station.busy:
            station.busy = True
            self.push(now, self.kind_start, j, 0)  # after every event of this instant: same-turn items batch

    def _send(self, i: int, now: float) -> None:
        """Job ``i``'s current step to its current hop (or to the head after the last one)."""
        route = self.route_of[i]
        h = self.hop_at[i]
        if h == len(route.hops):
            self._enqueue(self.head_id, (i, 1, 1), now)
            return
        hop = route.hops[h]
        j = hop.server
        if self.stations[j].cost is None:
            self.push(now + hop.num_blocks * self.lone[j] + self.comm[j], self.kind_arrive, i, self.attempt[i])
            self.tokens_left[i] = 0
        else:
            self._enqueue(j, (i, min(self.tokens_left[i], self.chunk), hop.num_blocks), now)

    def _iterate(self, j: int, now: float) -> None:
        station = self.stations[j]
        batch = station.take(self.budget)
        if not batch:
            station.busy = False
            return
        cost = 0.0 if station.cost is None else station.cost.iteration_s([(m, q) for _, q, m in batch])
        n, budget = len(self.route_of), self.budget
        for i, q, _ in batch:  # payload: the attempt, the job and its tokens
            self.push(now + cost, self.kind_done, j, (self.attempt[i] * n + i) * budget + q)
        self.push(now + cost, self.kind_start, j, 0)

    def _done(self, j: int, i: int, q: int, now: float) -> None:
        if j == self.head_id:
            self.steps_left[i] -= 1
            if self.steps_left[i] == 0:
                self.route_of[i] = None
                self.finish(i, now)
            else:
                self.hop_at[i], self.tokens_left[i] = 0, 1
                self._send(i, now)
            return
        self.tokens_left[i] -= q
        if self.tokens_left[i] > 0:  # the prompt's next chunk on the same server
            blocks = self.route_of[i].hops[self.hop_at[i]].num_blocks
            self._enqueue(j, (i, min(self.tokens_left[i], self.chunk), blocks), now)
        else:
            self.push(now + self.comm[j], self.kind_arrive, i, self.attempt[i])


def run_batched(
    plan: Layout, dispatcher: Dispatcher, stream: Arrivals, model: BatchedService
) -> tuple[array, array, array, list[Route | None], int]:
    """Simulate every arrival of ``stream`` to completion on one plan (a fast path, with paging; the
    general loop, :mod:`chainserve.sim.loop`, drives the same :class:`BatchedProcess` through
    failures and plan changes); returns per-job start and finish times, plan chain index (−1: none)
    and route, and the number of jobs refused on arrival (with paging, those ``dispatcher.fits``
    refuses), as :func:`chainserve.sim.engine.simulate` does."""
    times, prompts, outputs = stream.columns()
    n = len(times)
    nan = math.nan
    started, finished = array("d", [nan]) * n, array("d", [nan]) * n
    chain_of = array("q", [-1]) * n
    route_of: list[Route | None] = [None] * n
    ledger = MemoryLedger(plan, dispatcher.paging)
    num_refused = 0
    demand = demands(dispatcher.paging, prompts, outputs)
    events: list[tuple[float, int, int, int, int]] = []  # (time, kind, seq, station or job, payload)
    seq = 0

    def push(t: float, kind: int, who: int, payload: int) -> None:
        nonlocal seq
        seq += 1
        heappush(events, (t, kind, seq, who, payload))

    def begin(starts: list[Start], now: float) -> None:
        for start in starts:
            i, route = start.job.job_id, start.route
            if route_of[i] is not None:
                raise RuntimeError(f"job {i} started twice")
            ledger.admit(i, route, now, demand[i])
            route_of[i], started[i] = route, now
            chain_of[i] = -1 if route.chain is None else route.chain
            process.start(i, route, now)

    def finish(i: int, now: float) -> None:
        finished[i] = now
        ledger.release(route_of[i], demand[i])
        starts = dispatcher.complete(i, now)
        if starts:
            begin(starts, now)

    process = BatchedProcess(plan.problem, model, prompts, outputs, push, finish)
    handle = process.handle
    next_job, t_arrival = 0, times[0] if n else math.inf
    while True:
        t_event = events[0][0] if events else math.inf
        if t_arrival < t_event or (t_arrival == t_event < math.inf and events[0][1] == _START):
            i = next_job
            job = Job(i, t_arrival, prompts[i], outputs[i])
            if dispatcher.paging is None or dispatcher.fits(job):
                starts = dispatcher.submit(job, t_arrival)
                if starts:
                    begin(starts, t_arrival)
            else:
                num_refused += 1
            next_job += 1
            t_arrival = times[next_job] if next_job < n else math.inf
            continue
        if t_event == math.inf:
            break
        now, kind, _, who, payload = heappop(events)
        handle(kind, who, payload, now)
    return started, finished, chain_of, route_of, num_refused
