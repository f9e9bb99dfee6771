"""Iteration-level batching (issue 17; the way vLLM and Orca schedule a model's steps): work submitted
while a batch runs waits, and when the batch ends the next one takes what is waiting, within a token
budget. An idle batcher runs a lone item on the next turn of the event loop, so items submitted in the
same turn share a batch and nothing waits for company it has no reason to expect.

No half-batches (issue 30, part 4): a block server knows which of its sessions it has just answered and,
from each one's last turnaround (the orchestrator's LM head, sampling and embedding, and the other hops'
iterations on a pipeline), when its next step is due back. Without waiting, a step that arrives while
the others are in the head starts an iteration alone, and the two cohorts then alternate for ever, each
iteration streaming every weight again. With a ``hold`` (:class:`Turnarounds`), an iteration waits for
the sessions whose turnaround is under a fraction of an iteration, and no longer than until the last of
them arrives: on one server the cohorts merge into one batch; on a pipeline, whose sessions come back
only after the other hops, nobody waits, so its micro-batches stay in flight on different servers.

A block server batches its sessions' forward steps this way (decodes of every session in one forward,
prefill chunks beside them), and the orchestrator its LM head (one matmul for every job whose hidden
state came back in the same turn).
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Awaitable, Callable, Container, Sequence
from typing import Generic, TypeVar

from chainserve.model.step_cost import MAX_BATCH_TOKENS, take_batch

#: Tokens one block-server iteration computes at most (the batched simulator uses the same budget).
DEFAULT_MAX_BATCH_TOKENS = MAX_BATCH_TOKENS
#: A session whose last turnaround is within the bound is waited for until its last return plus this
#: multiple of that turnaround, still within the bound (the orchestrator's time varies with its batch and
#: the machine's load; a session that misses the iteration waits a whole one).
TURNAROUND_MARGIN = 1.5

T = TypeVar("T")
R = TypeVar("R")


class Batcher(Generic[T, R]):
    """``await batcher.submit(item)`` → the item's result from ``run(batch)``, which returns one
    result or exception per item. ``cost(item)`` counts against ``budget`` per batch (``None``: no
    limit); the oldest waiting item is always taken, then each later one that still fits
    (:func:`~chainserve.model.step_cost.take_batch`, the simulator's rule too), so decodes (cost 1)
    join a batch beside a prefill chunk and a skipped chunk is the oldest next time.
    ``on_batch(items)`` is told each batch's items. ``hold()``, when given, is asked before each batch
    is taken (once the items just computed have been handed back) how many seconds to wait for more
    items; it is asked again at each submission, and the wait never outlasts its first answer.

    >>> async def main():
    ...     sizes = []
    ...     async def double(items):
    ...         sizes.append(len(items))
    ...         await asyncio.sleep(0)
    ...         return [2 * x for x in items]
    ...     b = Batcher(double)
    ...     first = await b.submit(1)                                # alone: runs at once
    ...     rest = await asyncio.gather(*(b.submit(x) for x in (2, 3, 4)))
    ...     return first, rest, sizes
    >>> asyncio.run(main())
    (2, [4, 6, 8], [1, 3])
    """

    def __init__(
        self,
        run: Callable[[list[T]], Awaitable[Sequence[R | BaseException]]],
        cost: Callable[[T], int] | None = None,
        budget: int | None = None,
        on_batch: Callable[[list[T]], None] | None = None,
        hold: Callable[[], float] | None = None,
    ):
        self.run, self.cost, self.budget, self.on_batch = run, cost or (lambda _: 1), budget, on_batch
        self.hold = hold
        self._waiting: deque[tuple[T, asyncio.Future[R]]] = deque()
        self._task: asyncio.Task | None = None
        self._submitted: asyncio.Event | None = None  # while a hold waits: set by each submission

    @property
    def num_waiting(self) -> int:
        return len(self._waiting)

    def submit(self, item: T) -> asyncio.Future[R]:
        """Queue ``item``; the future resolves when its batch has run (cancel it to withdraw)."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[R] = loop.create_future()
        self._waiting.append((item, future))
        if self._submitted is not None:
            self._submitted.set()
        if self._task is None:
            self._task = loop.create_task(self._iterate())
        return future

    def _take(self) -> list[tuple[T, asyncio.Future[R]]]:
        """The next batch, in arrival order: the oldest item, then each later one that still fits."""
        waiting = [entry for entry in self._waiting if not entry[1].done()]  # withdrawn ones drop out
        batch, rest = take_batch(waiting, lambda entry: self.cost(entry[0]), self.budget)
        self._waiting = deque(rest)
        return batch

    async def _hold(self) -> None:
        """Wait while ``hold()`` says more items are due, at most its first answer's seconds. One turn
        of the loop first: the callers of the batch just computed get their results and say so."""
        await asyncio.sleep(0)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.hold()
        self._submitted = asyncio.Event()
        try:
            while (left := min(deadline, loop.time() + self.hold()) - loop.time()) > 0:
                self._submitted.clear()
                await asyncio.wait_for(self._submitted.wait(), left)
        except TimeoutError:
            pass
        finally:
            self._submitted = None

    async def _iterate(self) -> None:
        try:
            while self._waiting:
                if self.hold is not None:
                    await self._hold()
                batch = self._take()
                if not batch:
                    break
                items = [item for item, _ in batch]
                if self.on_batch is not None:
                    self.on_batch(items)
                try:
                    results: Sequence[R | BaseException] = await self.run(items)
                except Exception as exc:  # the batch as a whole failed: so did each of its items
                    results = [exc] * len(items)
                for (_, future), result in zip(batch, results, strict=True):
                    resolve(future, result)
        finally:
            self._task = None


class Turnarounds:
    """When a block server's sessions are due back (issue 30, part 4): each session's step ``arrived`` and
    was ``returned``; its turnaround is the time between its last return and its next arrival (the
    orchestrator's share of a token, and the other hops' on a pipeline; a session not back yet since its
    first step is taken to turn around like the last one measured here). :meth:`hold_s` is the batcher's
    ``hold``: how long to wait for the sessions out whose turnaround is within ``fraction`` of the last
    iteration's time (``iteration_s``, set by the server), :data:`TURNAROUND_MARGIN` allowed for a late
    one, never longer than that bound — 0 once they all have arrived, or when none comes back that fast.
    Sessions that come back only after other servers' iterations (a pipeline's) are never waited for: their
    cohorts are the micro-batches that keep every server of the chain busy.

    >>> clock = iter([0.0, 0.1, 0.2, 0.25, 0.3]).__next__
    >>> r = Turnarounds(0.5, clock)
    >>> r.iteration_s = 0.4                                     # waits of up to 0.2 s
    >>> r.returned("a"); r.arrived("a"); r.returned("a")        # a's turnaround: 0.1 s, back again at 0.2
    >>> round(r.hold_s({"a"}), 3), r.hold_s(set())              # due 0.3; waited for until 0.2 + 1.5 × 0.1
    (0.1, 0.0)
    """

    def __init__(self, fraction: float, clock: Callable[[], float] = time.perf_counter):
        self.fraction, self.clock = fraction, clock
        self.iteration_s = 0.0
        self._returned_at: dict[str, float] = {}  # sessions answered whose next step has not come yet
        self._turnaround: dict[str, float] = {}
        self._latest: float | None = None  # the last turnaround measured, of any session

    def arrived(self, session: str) -> None:
        returned_at = self._returned_at.pop(session, None)
        if returned_at is not None:
            self._turnaround[session] = self._latest = self.clock() - returned_at

    def returned(self, session: str) -> None:
        self._returned_at[session] = self.clock()

    def hold_s(self, live: Container[str]) -> float:
        """Seconds to hold the next iteration for the ``live`` sessions that come back fast (others are forgotten)."""
        for gone in [s for s in self._returned_at.keys() | self._turnaround.keys() if s not in live]:
            self._turnaround.pop(gone, None)
            self._returned_at.pop(gone, None)
        now, bound = self.clock(), self.fraction * self.iteration_s
        until = (
            at + TURNAROUND_MARGIN * turnaround - now
            for s, at in self._returned_at.items()
            if (turnaround := self._turnaround.get(s, self._latest)) is not None and turnaround <= bound
        )
        return max(0.0, min(bound, max(until, default=0.0)))  # 0 too when the ones due are late past it


def resolve(future: asyncio.Future, result: object) -> None:
    """Give ``future`` its result, or raise ``result`` in it if it is an exception; nothing when it is
    done already (withdrawn, timed out)."""
    if future.done():
        return
    if isinstance(result, BaseException):
        future.set_exception(result)
    else:
        future.set_result(result)
