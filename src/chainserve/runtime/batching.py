"""Iteration-level batching (issue 17; the way vLLM and Orca schedule a model's steps): work submitted
while a batch runs waits, and when the batch ends the next one takes what is waiting, within a token
budget. There is no timer: an idle batcher runs a lone item on the next turn of the event loop, so
items submitted in the same turn share a batch and nothing ever waits for company.

A block server batches its sessions' forward steps this way (decodes of every session in one forward,
prefill chunks beside them), and the orchestrator its LM head (one matmul for every job whose hidden
state came back in the same turn).
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from typing import Generic, TypeVar

from chainserve.model.step_cost import MAX_BATCH_TOKENS

#: Tokens one block-server iteration computes at most (the batched simulator uses the same budget).
DEFAULT_MAX_BATCH_TOKENS = MAX_BATCH_TOKENS

T = TypeVar("T")
R = TypeVar("R")


class Batcher(Generic[T, R]):
    """``await batcher.submit(item)`` → the item's result from ``run(batch)``, which returns one
    result or exception per item. ``cost(item)`` counts against ``budget`` per batch (``None``: no
    limit); the oldest waiting item is always taken, then each later one that still fits, so decodes
    (cost 1) join a batch beside a prefill chunk and a skipped chunk is the oldest next time.
    ``on_batch(items)`` is told each batch's items.

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
    ):
        self.run, self.cost, self.budget, self.on_batch = run, cost or (lambda _: 1), budget, on_batch
        self._waiting: deque[tuple[T, asyncio.Future[R]]] = deque()
        self._task: asyncio.Task | None = None

    @property
    def num_waiting(self) -> int:
        return len(self._waiting)

    def submit(self, item: T) -> asyncio.Future[R]:
        """Queue ``item``; the future resolves when its batch has run (cancel it to withdraw)."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[R] = loop.create_future()
        self._waiting.append((item, future))
        if self._task is None:
            self._task = loop.create_task(self._iterate())
        return future

    def _take(self) -> list[tuple[T, asyncio.Future[R]]]:
        """The next batch, in arrival order: the oldest item, then each later one that still fits."""
        waiting = [entry for entry in self._waiting if not entry[1].done()]  # withdrawn ones drop out
        self._waiting.clear()
        batch, used = [], 0
        for entry in waiting:
            cost = self.cost(entry[0])
            if not batch or self.budget is None or used + cost <= self.budget:
                batch.append(entry)
                used += cost
            else:
                self._waiting.append(entry)
        return batch

    async def _iterate(self) -> None:
        try:
            while batch := self._take():
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


def resolve(future: asyncio.Future, result: object) -> None:
    """Give ``future`` its result, or raise ``result`` in it if it is an exception; nothing when it is
    done already (withdrawn, timed out)."""
    if future.done():
        return
    if isinstance(result, BaseException):
        future.set_exception(result)
    else:
        future.set_result(result)
