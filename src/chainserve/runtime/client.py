"""The orchestrator's side of the block-server transport: one ZeroMQ DEALER per server (§4.2).

Requests carry an id; replies resolve the waiting futures as they arrive (:mod:`.zmq_io`), so many
jobs share a connection with any number of requests in flight. Forward steps are coalesced (issue 17):
every step queued for a server during one turn of the event loop leaves in one message at the end of
that turn, so a server gets one message per iteration, not one per job. ZeroMQ keeps per-connection
order, and a ``close`` first sends the steps queued before it: a close sent before a later
``forward(open=True)`` reaches the server first, and never overtakes its session's last step.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
from collections.abc import Callable
from typing import Any

import zmq

from chainserve.runtime import protocol
from chainserve.runtime.backends.base import WireTensor
from chainserve.runtime.batching import resolve
from chainserve.runtime.zmq_io import LoopSocket

log = logging.getLogger("chainserve.client")


class ServerRefused(RuntimeError):
    """The server refused admission (``no_free_slot``): the job may retry later."""


class ServerFailed(RuntimeError):
    """The server answered with an error, or did not answer in time."""

    def __init__(self, server: str, message: str, code: str = "internal"):
        super().__init__(f"{server}: {message}")
        self.server = server
        self.code = code


class BlockClient:
    """Async requests to one block server at ``endpoint`` (``tcp://host:port``), stamped with the
    orchestrator's ``epoch`` (``None``: an operator's tool, outside epochs; :mod:`.protocol`)."""

    def __init__(
        self,
        name: str,
        endpoint: str,
        token: str = "",
        ctx: zmq.Context | None = None,
        timeout_s: float = 600.0,
        epoch: int | None = None,
    ):
        self.name, self.epoch = name, epoch
        self.endpoint = endpoint
        self.token = token
        self.timeout_s = timeout_s
        self.ctx = ctx or zmq.Context.instance()
        self._rids = itertools.count(1)
        self._pending: dict[int, list[asyncio.Future]] = {}  # rid → the futures its reply resolves
        self._outbox: list[tuple[protocol.Step, asyncio.Future[WireTensor]]] = []
        self._io: LoopSocket | None = None

    def _socket(self) -> LoopSocket:
        """The connection, opened on first use inside the running loop."""
        if self._io is None:
            sock = self.ctx.socket(zmq.DEALER)
            sock.setsockopt(zmq.LINGER, 0)
            sock.connect(self.endpoint)
            self._io = LoopSocket(sock, self._on_reply)
        return self._io

    def _on_reply(self, frames: list[bytes]) -> None:
        try:
            reply = protocol.decode_reply(frames)
        except protocol.ProtocolError as exc:
            log.error("%s: malformed reply dropped: %s", self.name, exc)
            return
        futures = self._pending.pop(reply.rid, None)
        if futures is None:
            return
        if not reply.ok:  # the whole message failed
            results: list = [self._error(reply.error, reply.message)] * len(futures)
        elif not reply.results:  # info, limit, close
            results = [reply] * len(futures)
        elif len(reply.results) != len(futures):
            results = [ServerFailed(self.name, f"{len(reply.results)} results for {len(futures)} steps")] * len(futures)
        else:
            results = [r if isinstance(r, WireTensor) else self._error(*r) for r in reply.results]
        for future, result in zip(futures, results, strict=True):
            resolve(future, result)

    def _error(self, code: str, message: str) -> Exception:
        if code == "no_free_slot":
            return ServerRefused(f"{self.name}: {message}")
        return ServerFailed(self.name, message, code)

    def _send(self, frames_of: Callable[[int], list[bytes]], futures: list[asyncio.Future]) -> int:
        io = self._socket()
        rid = next(self._rids)
        self._pending[rid] = futures
        try:
            io.send(frames_of(rid))
        except zmq.ZMQError as exc:
            del self._pending[rid]
            raise ServerFailed(self.name, f"cannot send: {exc}", "transport") from None
        return rid

    def send(self, op: str, **fields: Any) -> asyncio.Future[protocol.Reply]:
        """Queue one ``info``/``close``/``limit`` request now (after any steps queued before it); the
        future gets its reply (or the error)."""
        self._flush()
        future: asyncio.Future[protocol.Reply] = asyncio.get_running_loop().create_future()
        self._send(lambda rid: protocol.encode_request(op, rid, self.token, self.epoch, **fields), [future])
        return future

    async def request(self, op: str, timeout_s: float | None = None, **fields: Any) -> protocol.Reply:
        """Send one request and wait for its reply; raise :class:`ServerRefused` / :class:`ServerFailed`."""
        future = self.send(op, **fields)
        try:
            reply = await asyncio.wait_for(future, timeout_s or self.timeout_s)
        except TimeoutError:
            raise ServerFailed(
                self.name, f"no reply to {op} within {timeout_s or self.timeout_s:g} s", "timeout"
            ) from None
        return reply

    async def info(self, timeout_s: float = 10.0) -> dict[str, Any]:
        return (await self.request("info", timeout_s=timeout_s)).fields

    async def set_limit(self, num_block_slots: int, timeout_s: float = 10.0) -> dict[str, Any]:
        """Move the server's admission limit within its arena; returns its ``info`` after the change."""
        return (await self.request("limit", timeout_s=timeout_s, num_block_slots=num_block_slots)).fields

    async def forward(
        self,
        session: str,
        first_block: int,
        position: int,
        hidden: WireTensor,
        *,
        open: bool = False,
        close: bool = False,
        reserve: int | None = None,
    ) -> WireTensor:
        """One step of ``session`` (``reserve``: the positions an opening session holds pages for); it
        leaves with every other step queued in this turn of the loop."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[WireTensor] = loop.create_future()
        if not self._outbox:
            loop.call_soon(self._flush)
        self._outbox.append((protocol.Step(session, first_block, position, hidden, open, close, reserve), future))
        timer = loop.call_later(self.timeout_s, resolve, future, ServerFailed(
            self.name, f"no reply to forward within {self.timeout_s:g} s", "timeout"
        ))  # fmt: skip
        try:
            return await future
        finally:
            timer.cancel()

    def _flush(self) -> None:
        """Send the queued steps as one forward message (its reply resolves each step's future)."""
        outbox, self._outbox = self._outbox, []
        outbox = [(step, f) for step, f in outbox if not f.done()]
        for i in range(0, len(outbox), protocol.MAX_ITEMS):
            part = outbox[i : i + protocol.MAX_ITEMS]
            steps, futures = [s for s, _ in part], [f for _, f in part]
            try:
                self._send(
                    lambda rid, steps=steps: protocol.encode_forward(rid, self.token, steps, self.epoch), futures
                )
            except ServerFailed as exc:
                for future in futures:
                    resolve(future, exc)

    def close_session(self, session: str) -> asyncio.Future[protocol.Reply]:
        """Send a close now; the reply (ignored by callers that need not wait) arrives in the future."""
        return self.send("close", session=session)

    def fail_pending(self, message: str) -> None:
        """The server is gone: every request still waiting for it fails now (not at its timeout)."""
        pending, self._pending = self._pending, {}
        outbox, self._outbox = self._outbox, []
        error = ServerFailed(self.name, message, "transport")
        for future in [f for fs in pending.values() for f in fs] + [f for _, f in outbox]:
            resolve(future, error)

    def close(self) -> None:
        for future in [f for fs in self._pending.values() for f in fs] + [f for _, f in self._outbox]:
            if not future.done():
                future.cancel()
        if self._io is not None:
            self._io.close()


async def server_pid(name: str, endpoint: str, token: str) -> int:
    """The process id block server ``name`` at ``endpoint`` reports (``info``): what a fault injector
    kills (``benchmarks/soak.py``, :mod:`chainserve.measure.faults`)."""
    client = BlockClient(name, endpoint if "://" in endpoint else f"tcp://{endpoint}", token)
    try:
        return int((await client.info())["pid"])
    finally:
        client.close()


async def stop_servers(endpoints: dict[str, str], token: str, timeout_s: float = 5.0) -> dict[str, str]:
    """Send ``shutdown`` to each block server (``name → host:port`` or ``tcp://…``); returns the ones
    that did not confirm, with why."""
    ctx, failed = zmq.Context(), {}
    clients = {n: BlockClient(n, e if "://" in e else f"tcp://{e}", token, ctx) for n, e in endpoints.items()}
    answers = await asyncio.gather(
        *(c.request("shutdown", timeout_s=timeout_s) for c in clients.values()), return_exceptions=True
    )
    for (name, client), answer in zip(clients.items(), answers, strict=True):
        if isinstance(answer, Exception):
            failed[name] = str(answer)
        client.close()
    ctx.term()
    return failed
