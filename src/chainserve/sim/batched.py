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

The model is a service component of the simulator's one event loop (:mod:`.loop`, issue 31), which
owns dispatch (a job's route comes from ``submit``/``complete``, as in the runtime) and the KV cache
a job holds from start to its last token. Events are per server iteration, not per step: an
iteration's end is one event carrying its batch, and the replies of its steps, which all travel the
server's communication time, are one more; an iteration start is pushed only when something waits
(its place in the order of events is reserved when the previous iteration begins, :mod:`.heap`), and
runs at once when nothing else of its instant comes first, as does the end of a free head's. The
records are those of one event per step and hop (``tests/test_batch_service.py`` pins the order at
an instant). Cost: O(l_out · hops) iterations per job at most, fewer as batches grow.
"""

from __future__ import annotations

from array import array
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar

from chainserve.dispatch.base import Route
from chainserve.model.spec import Problem
from chainserve.model.step_cost import MAX_BATCH_TOKENS, StepCost, prefill_chunk_tokens, take_batch
from chainserve.sim.heap import EventHeap

#: A station's state: no iteration and none due; an iteration runs; its next iteration's start is
#: in the heap; an iteration ended with nothing waiting (its next start's place is reserved, unused).
_IDLE, _RUNNING, _CALLED, _FREE = range(4)

#: A waiting step: (job, tokens this iteration, blocks, attempt).
Item = tuple[int, int, int, int]


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
    """A batching server (or the head): its queue of waiting steps, its state, and the time and
    ``seq`` its next iteration starts at once the running one ends."""

    __slots__ = ("cost", "queue", "state", "start_t", "start_seq", "lone_s")

    def __init__(self, cost: StepCost | None):
        self.cost = cost
        self.queue: deque[Item] = deque()
        self.state = _IDLE
        self.start_t = 0.0
        self.start_seq = 0
        self.lone_s: dict[tuple[int, int], float] = {}  # (blocks, tokens) -> the time of a batch of one

    def next_batch(self, budget: int) -> tuple[list[Item], float]:
        """The next batch by the block server's rule (:func:`~chainserve.model.step_cost.take_batch`;
        a lone step goes whatever its tokens) and what its iteration costs (:meth:`StepCost.iteration_s`;
        a batch of one's looked up)."""
        queue, cost = self.queue, self.cost
        if len(queue) != 1:
            batch, rest = take_batch(queue, _tokens, budget)
            self.queue = deque(rest)
            return batch, 0.0 if cost is None else cost.iteration_s([(m, q) for _, q, m, _ in batch])
        item = queue.popleft()
        if cost is None:
            return [item], 0.0
        key = (item[2], item[1])
        seconds = self.lone_s.get(key)
        if seconds is None:
            seconds = self.lone_s[key] = cost.iteration_s((key,))
        return [item], seconds


def _tokens(item: Item) -> int:
    return item[1]


class BatchedProcess:
    """The iteration-level service of every job (module docstring) as a component of an event loop:
    the loop owns the heap ``events``, hands each of the component's events back to :meth:`handle`,
    calls :meth:`start` when a job's service begins and :meth:`abort` when a failure ends it; the
    component calls ``finish(job, t)`` after a job's last token. ``kinds``: the loop's kind numbers
    for an iteration's end, a batch's replies back, an iteration start (in that order at equal
    times; the last must run after the arrivals of its instant, so that steps that reach a server
    together share it)."""

    def __init__(
        self,
        problem: Problem,
        model: BatchedService,
        prompts: array,
        outputs: array,
        events: EventHeap,
        finish: Callable[[int, float], None],
        kinds: tuple[int, int, int],
    ):
        servers, steps_mean = problem.servers, problem.workload.output_tokens
        self.chunk, self.budget = prefill_chunk_tokens(model.max_batch_tokens), model.max_batch_tokens
        self.comm = [s.tau_c_s / steps_mean + model.hop_overhead_s for s in servers]
        self.lone = [s.tau_p_s / steps_mean for s in servers]  # per block and step, no step cost
        self.stations = [_Station(s.step) for s in servers]
        self.stations.append(_Station(problem.head_cost))  # the orchestrator's head
        self.head_id = len(servers)
        self.prompts, self.outputs, self.events, self.finish = prompts, outputs, events, finish
        self.kind_done, self.kind_reply, self.kind_start = kinds
        n = len(prompts)
        self.route_of: list[Route | None] = [None] * n
        self.hop_at = [0] * n  # the hop the job's current step is at
        self.steps_left = [0] * n  # forward steps still to come, the current one included
        self.tokens_left = [0] * n  # prompt tokens of the current step still to compute on this hop
        self.attempt = [0] * n  # each step carries the attempt it belongs to; an aborted one's are void
        self.iter_t, self.iter_seq = -1.0, 0  # the latest iteration start run: its time and seq
        self.calls: list[tuple[int, int]] = []  # (seq, station) of the starts due now, not yet pushed

    def start(self, i: int, route: Route, now: float) -> None:
        """Job ``i``'s service begins on ``route``: its prompt goes to the first hop."""
        self.route_of[i] = route
        self.steps_left[i], self.hop_at[i], self.tokens_left[i] = int(self.outputs[i]), 0, int(self.prompts[i])
        self._send(i, now)
        self._push_calls(now)

    def abort(self, i: int) -> None:
        """Job ``i`` lost its service: its waiting steps leave their queues, its events are void."""
        self.attempt[i] += 1
        for station in self.stations:
            if any(item[0] == i for item in station.queue):
                station.queue = deque(item for item in station.queue if item[0] != i)
        self.route_of[i] = None

    def handle(self, kind: int, who: int, payload: object, now: float) -> None:
        if kind == self.kind_start:
            self._iterate(who, payload, now)
        elif kind == self.kind_done:
            self._done(who, payload, now)
        else:
            self._replies(payload, now)
        calls, events = self.calls, self.events
        while calls:  # the starts due now run at once while nothing else of this instant comes first
            if not events.quiet(now):
                self._push_calls(now)
                return
            if len(calls) > 1:
                calls.sort()
            seq, j = calls.pop(0)
            self._iterate(j, seq, now)

    def _push_calls(self, now: float) -> None:
        for seq, j in self.calls:
            self.events.push_at(now, self.kind_start, seq, j, seq)
        self.calls.clear()

    def _enqueue(self, j: int, item: Item, now: float) -> None:
        """``item`` waits at station ``j``; an iteration starts after every event of this instant
        (steps that reach it together share it) unless one runs or is due."""
        station = self.stations[j]
        station.queue.append(item)
        state = station.state
        if state == _RUNNING or state == _CALLED:
            return
        if state == _FREE and now == station.start_t and not (self.iter_t == now and self.iter_seq > station.start_seq):
            seq = station.start_seq  # the start after its last iteration is still to come in this instant
        else:
            seq = self.events.reserve()
        self.calls.append((seq, j))
        station.state = _CALLED

    def _send(self, i: int, now: float) -> None:
        """Job ``i``'s current step to its current hop (or to the head after the last one)."""
        route = self.route_of[i]
        h = self.hop_at[i]
        if h == len(route.hops):
            self._enqueue(self.head_id, (i, 1, 1, self.attempt[i]), now)
            return
        hop = route.hops[h]
        j = hop.server
        if self.stations[j].cost is None:
            t = now + hop.num_blocks * self.lone[j] + self.comm[j]
            self.events.push(t, self.kind_reply, j, ((i, self.attempt[i]),))
            self.tokens_left[i] = 0
        else:
            q = self.tokens_left[i]
            self._enqueue(j, (i, q if q < self.chunk else self.chunk, hop.num_blocks, self.attempt[i]), now)

    def _iterate(self, j: int, seq: int, now: float) -> None:
        self.iter_t, self.iter_seq = now, seq
        station = self.stations[j]
        batch, seconds = station.next_batch(self.budget)
        if not batch:  # its steps were aborted
            station.state = _IDLE
            return
        end = now + seconds
        entries = self.events.entries
        if end == now and (not entries or entries[0][:2] > (now, self.kind_done)):  # a free head's: over now
            station.start_t, station.start_seq, station.state = end, self.events.reserve(), _RUNNING
            self._done(j, batch, now)
            return
        self.events.push(end, self.kind_done, j, batch)
        station.start_t, station.start_seq, station.state = end, self.events.reserve(), _RUNNING

    def _done(self, j: int, batch: list[Item], now: float) -> None:
        """Station ``j``'s iteration of ``batch`` ended: each step moves on, a prompt's next chunk
        waits for the next iteration."""
        station, attempt = self.stations[j], self.attempt
        if j == self.head_id:
            for i, _, _, a in batch:
                if a != attempt[i]:
                    continue
                self.steps_left[i] -= 1
                if self.steps_left[i] == 0:
                    self.route_of[i] = None
                    self.finish(i, now)
                else:
                    self.hop_at[i], self.tokens_left[i] = 0, 1
                    self._send(i, now)
        else:
            tokens_left, chunk = self.tokens_left, self.chunk
            replies = []
            for i, q, m, a in batch:
                if a != attempt[i]:
                    continue
                left = tokens_left[i] = tokens_left[i] - q
                if left > 0:
                    station.queue.append((i, left if left < chunk else chunk, m, a))
                else:
                    replies.append((i, a))
            if replies:
                self.events.push(now + self.comm[j], self.kind_reply, j, replies)
        if station.queue:
            self.calls.append((station.start_seq, j))
            station.state = _CALLED
        else:
            station.state = _FREE

    def _replies(self, replies: list[tuple[int, int]], now: float) -> None:
        """The replies of steps that left one server together reached the orchestrator: each step
        goes on to its next hop."""
        attempt, steps_left, outputs = self.attempt, self.steps_left, self.outputs
        for i, a in replies:
            if a != attempt[i]:
                continue
            self.hop_at[i] += 1
            self.tokens_left[i] = 1 if steps_left[i] < outputs[i] else int(self.prompts[i])
            self._send(i, now)
