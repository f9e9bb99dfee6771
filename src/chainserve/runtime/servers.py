"""The orchestrator's view of its block servers (§4.2): one record per server and the one owner of
them, :class:`ServerTable`.

A record holds what the orchestrator knows of one block server: the span it hosts, its arena (the
block-slots it allocated) and its pages (issue 30: a block-slot is ``pages_per_slot`` pages of
``page_tokens`` positions), its own admission limit as last set, the pages the jobs started on it
hold (a job reserves the pages of its prompt + output on each block it runs there), whether it
answers, and its connection. The table does the verbs on them: ``hold`` /
``release`` / ``wake`` (a start waits until every hop has room under its server's limit, so the
orchestrator never sends a server more sessions than it admits), limits (``set_limit``,
``lower_when_fits``), and liveness (``connect``, heartbeats, ``mark_dead`` / ``mark_back``).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from chainserve.dispatch.base import Route
from chainserve.runtime.backends.base import WireTensor
from chainserve.runtime.client import ServerFailed
from chainserve.runtime.metrics import RuntimeMetrics

log = logging.getLogger("chainserve.orchestrator")

#: ServerFailed codes that mean the server itself is gone (not a bad request of ours).
DEAD_CODES = frozenset({"timeout", "transport"})


class ServerClient(Protocol):
    """What the orchestrator needs of a block-server connection (:class:`~.client.BlockClient`)."""

    name: str
    endpoint: str

    async def forward(
        self, session: str, first_block: int, position: int, hidden: WireTensor, *, open: bool = False,
        close: bool = False, reserve: int | None = None,
    ) -> WireTensor: ...  # fmt: skip

    def close_session(self, session: str) -> asyncio.Future: ...

    async def info(self, timeout_s: float = 10.0) -> dict[str, Any]: ...

    async def set_limit(self, num_block_slots: int, timeout_s: float = 10.0) -> dict[str, Any]: ...

    def fail_pending(self, message: str) -> None: ...

    def close(self) -> None: ...


@dataclass(slots=True, eq=False)
class ServerRecord:
    """One block server: problem index and name, the span it hosts ((first block, blocks); ``None``:
    none), its arena and own admission ``limit`` (block-slots), its pages (``page_tokens``: ``None``
    until it has answered ``info``, while a job counts one block-slot per block), the pages ``held``
    by the jobs started on it, ``is_alive`` (answers its heartbeats) and ``is_out`` (being restarted by
    a plan change: no heartbeat verdicts), and its ``client``."""

    index: int
    name: str
    span: tuple[int, int] | None
    arena: int
    limit: int
    client: ServerClient | None
    held: int = 0
    is_alive: bool = True
    is_out: bool = False
    page_tokens: int | None = None
    pages_per_slot: int = 1

    def pages(self, block_slots: int) -> int:
        """``block_slots`` in pages."""
        return block_slots * self.pages_per_slot

    def need(self, num_blocks: int, num_tokens: int) -> int:
        """Pages a session of ``num_tokens`` positions on ``num_blocks`` blocks reserves here."""
        return num_blocks * (-(-num_tokens // self.page_tokens) if self.page_tokens else 1)

    def take_info(self, info: Mapping[str, Any]) -> None:
        """Arena, limit and pages from the server's own ``info`` answer."""
        self.arena, self.limit = info["num_block_slots"], info.get("slot_limit", info["num_block_slots"])
        self.page_tokens, self.pages_per_slot = info.get("page_tokens"), info.get("pages_per_slot", 1)

    @property
    def is_live(self) -> bool:
        """Answers and is not being restarted: it may serve."""
        return self.is_alive and not self.is_out


class ServerTable:
    """The block servers of one orchestrator (module docstring), keyed by problem server index."""

    def __init__(self, records: Iterable[ServerRecord], metrics: RuntimeMetrics, deadline_s: float = 2.0):
        self.records = {r.index: r for r in records}
        self.metrics = metrics
        self.deadline_s = deadline_s
        self._freed = asyncio.Event()  # set (and replaced) when block-slots are released or chains change
        self._limits = asyncio.Lock()  # one limit change at a time
        self._lowering: dict[int, asyncio.Task] = {}
        for r in self.records.values():
            metrics.set_server_up(r.name, True)

    def __getitem__(self, j: int) -> ServerRecord:
        return self.records[j]

    def __iter__(self):
        return iter(self.records.values())

    def index_of(self, name: str) -> int | None:
        return next((r.index for r in self.records.values() if r.name == name), None)

    def live(self) -> frozenset[int]:
        return frozenset(j for j, r in self.records.items() if r.is_live)

    def cover(self, num_blocks: int) -> bool:
        """The live servers' spans together hold blocks 1..``num_blocks`` (a path can be composed)."""
        held = {b for r in self.records.values() if r.is_live and r.span for b in range(r.span[0], sum(r.span))}
        return held >= set(range(1, num_blocks + 1))

    # ---- hold / release / wake ----------------------------------------------------------------
    async def hold(
        self, route: Route, num_tokens: int, may_wait: Callable[[], bool]
    ) -> tuple[tuple[int, int], ...] | None:
        """Wait until every hop's server has room under its limit for the pages of ``num_tokens``
        positions, then hold them and return them as (server, pages); ``None`` as soon as
        ``may_wait()`` is false while waiting."""
        need = tuple((h.server, self.records[h.server].need(h.num_blocks, num_tokens)) for h in route.hops)
        while any(self.records[j].held + num > self.records[j].pages(self.records[j].limit) for j, num in need):
            if not may_wait():
                return None
            await self._freed.wait()
        for j, num in need:
            self.records[j].held += num
        return need

    def release(self, held: Sequence[tuple[int, int]]) -> None:
        for j, num in held:
            self.records[j].held -= num
        if held:
            self.wake()

    def wake(self) -> None:
        """Whoever waits for room (:meth:`hold`, :meth:`lower_when_fits`) looks again."""
        self._freed.set()
        self._freed = asyncio.Event()

    async def freed(self) -> None:
        await self._freed.wait()

    # ---- limits -------------------------------------------------------------------------------
    async def set_limit(self, j: int, limit: int) -> None:
        """Server j's own admission limit; a dead server, or one being restarted, keeps its own."""
        async with self._limits:
            await self._set_limit(j, limit)

    async def _set_limit(self, j: int, limit: int, *, answered: bool = False) -> None:
        r = self.records[j]
        if (r.is_live or answered) and r.limit != limit:
            await r.client.set_limit(limit, timeout_s=self.deadline_s)
            r.limit = limit
            self.wake()

    def lower_when_fits(self, limits: Mapping[int, int]) -> None:
        """Lower each server's limit to ``limits[j]`` once the block-slots held there fit it (nothing
        new is admitted past it meanwhile only if the dispatcher in force keeps to it)."""
        for j, limit in limits.items():
            if limit < self.records[j].limit and (j not in self._lowering or self._lowering[j].done()):
                self._lowering[j] = asyncio.get_running_loop().create_task(self._lower(j, limit))

    async def _lower(self, j: int, limit: int) -> None:
        r = self.records[j]
        while r.held > r.pages(limit) and not r.is_out:
            await self._freed.wait()
        try:
            async with self._limits:
                if limit < r.limit:
                    await self._set_limit(j, limit)
        except ServerFailed as exc:
            log.warning("could not lower the admission limit of %s: %s", r.name, exc)

    # ---- liveness -----------------------------------------------------------------------------
    def mark_dead(self, j: int, reason: str) -> bool:
        """Server j stopped answering; ``False`` when it was dead already or is being restarted."""
        r = self.records[j]
        if not r.is_live:
            return False
        r.is_alive = False
        self.metrics.set_server_up(r.name, False)
        log.warning("block server %s failed: %s", r.name, reason)
        r.client.fail_pending(f"marked dead: {reason}")
        return True

    def mark_back(self, j: int) -> None:
        r = self.records[j]
        r.is_alive = True
        self.metrics.set_server_up(r.name, True)
        log.warning("block server %s is back", r.name)

    def replace(self, j: int, client: ServerClient, info: Mapping[str, Any]) -> None:
        """Server j was (re)started with a new span: take its connection and what it reports."""
        r = self.records.get(j)
        if r is None:
            r = self.records[j] = ServerRecord(j, client.name, None, 0, 0, None)
        elif r.client is not None and r.client is not client:
            r.client.close()
        r.client, r.span = client, (info["first_block"], info["num_blocks"])
        r.take_info(info)
        r.is_alive = True
        self.metrics.set_server_up(r.name, True)
        log.info("block server %s restarted with blocks %d..+%d", r.name, *r.span)

    def mismatch(self, j: int, info: Mapping[str, Any], limit: int) -> str | None:
        """Why server j cannot serve: another span, or an arena smaller than ``limit`` (a larger one
        is fine: its admission limit is set to ``limit``)."""
        r = self.records[j]
        got = (info.get("first_block"), info.get("num_blocks"), info.get("num_block_slots"))
        if got[:2] != r.span or not isinstance(got[2], int) or got[2] < limit:
            return f"block server {r.name} hosts blocks from {got[0]}, {got[1]} blocks, {got[2]} block-slots; " \
                f"the plan says {(*r.span, limit)}"  # fmt: skip
        return None

    async def attach(self, j: int, info: Mapping[str, Any], limit: int) -> None:
        """Take server j's arena and limit from its own answer and set its limit to ``limit``."""
        r = self.records[j]
        r.take_info(info)
        async with self._limits:
            await self._set_limit(j, limit, answered=True)

    async def connect(self, limits: Mapping[int, int], timeout_s: float, clock: Callable[[], float]) -> None:
        """Wait until every server answers and hosts its span, and set its limit to ``limits[j]``."""
        deadline = clock() + timeout_s
        for j, r in self.records.items():
            while True:
                try:
                    info = await r.client.info(timeout_s=2.0)
                    break
                except ServerFailed as exc:
                    if clock() > deadline:
                        raise RuntimeError(f"block server {r.name} did not answer within {timeout_s:g} s") from exc
            problem = self.mismatch(j, info, limits[j])
            if problem:
                raise RuntimeError(problem)
            await self.attach(j, info, limits[j])

    async def watch(
        self,
        interval_s: float,
        on_dead: Callable[[int, str], None],
        on_back: Callable[[int], Awaitable[None] | None],
    ) -> None:
        """Heartbeats: every ``interval_s`` each server must answer ``info`` within the deadline; a
        dead one that answers again and still hosts its span gets its limit back and is reported."""
        while True:
            await asyncio.sleep(interval_s)
            was_alive = {j: r.is_alive for j, r in self.records.items()}  # a verdict reached meanwhile stands
            polled = [(r, r.client) for r in self.records.values() if not r.is_out]
            answers = await asyncio.gather(*(self._beat(client) for _, client in polled))
            for (r, client), info in zip(polled, answers, strict=True):
                if r.is_out or r.client is not client:  # restarted meanwhile
                    continue
                if info is not None:
                    self.metrics.set_server_batches(r.name, info)
                if info is None and r.is_alive:
                    on_dead(r.index, f"no heartbeat within {self.deadline_s:g} s")
                elif info is not None and not r.is_alive and not was_alive[r.index]:
                    limit = r.limit
                    problem = self.mismatch(r.index, info, limit)
                    if problem:
                        log.error("block server %s answers but cannot rejoin: %s", r.name, problem)
                        continue
                    try:
                        await self.attach(r.index, info, limit)
                    except ServerFailed:
                        continue
                    self.mark_back(r.index)
                    back = on_back(r.index)
                    if back is not None:
                        await back

    async def _beat(self, client: ServerClient) -> dict[str, Any] | None:
        try:
            return await client.info(timeout_s=self.deadline_s)
        except ServerFailed:
            return None

    async def close(self) -> None:
        for task in self._lowering.values():
            task.cancel()
        await asyncio.gather(*self._lowering.values(), return_exceptions=True)
