"""The orchestrator's side of the block-server transport: one ZeroMQ DEALER per server (§4.2).

Requests carry an id; replies resolve the waiting futures as they arrive (:mod:`.zmq_io`), so many
jobs share a connection with any number of requests in flight. ZeroMQ keeps per-connection order: a
``close`` sent before a later ``forward(open=True)`` reaches the server first.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
from typing import Any

import zmq

from chainserve.runtime import protocol
from chainserve.runtime.backends.base import WireTensor
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
    """Async requests to one block server at ``endpoint`` (``tcp://host:port``)."""

    def __init__(
        self, name: str, endpoint: str, token: str = "", ctx: zmq.Context | None = None, timeout_s: float = 600.0
    ):
        self.name = name
        self.endpoint = endpoint
        self.token = token
        self.timeout_s = timeout_s
        self.ctx = ctx or zmq.Context.instance()
        self._rids = itertools.count(1)
        self._pending: dict[int, asyncio.Future[protocol.Reply]] = {}
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
        future = self._pending.pop(reply.rid, None)
        if future is not None and not future.done():
            future.set_result(reply)

    def send(self, op: str, tensor: WireTensor | None = None, **fields: Any) -> asyncio.Future[protocol.Reply]:
        """Queue one request on the socket now (so requests leave in call order); the future gets
        its reply."""
        return self._send(op, tensor, fields)[1]

    def _send(
        self, op: str, tensor: WireTensor | None, fields: dict[str, Any]
    ) -> tuple[int, asyncio.Future[protocol.Reply]]:
        io = self._socket()
        rid = next(self._rids)
        future: asyncio.Future[protocol.Reply] = asyncio.get_running_loop().create_future()
        self._pending[rid] = future
        try:
            io.send(protocol.encode_request(op, rid, self.token, tensor, **fields))
        except zmq.ZMQError as exc:
            del self._pending[rid]
            raise ServerFailed(self.name, f"cannot send {op}: {exc}", "transport") from None
        return rid, future

    async def request(
        self, op: str, tensor: WireTensor | None = None, timeout_s: float | None = None, **fields: Any
    ) -> protocol.Reply:
        """Send one request and wait for its reply; raise :class:`ServerRefused` / :class:`ServerFailed`."""
        rid, future = self._send(op, tensor, fields)
        try:
            reply = await asyncio.wait_for(future, timeout_s or self.timeout_s)
        except TimeoutError:
            raise ServerFailed(
                self.name, f"no reply to {op} within {timeout_s or self.timeout_s:g} s", "timeout"
            ) from None
        finally:
            self._pending.pop(rid, None)
        if reply.ok:
            return reply
        if reply.error == "no_free_slot":
            raise ServerRefused(f"{self.name}: {reply.message}")
        raise ServerFailed(self.name, reply.message, reply.error)

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
    ) -> WireTensor:
        reply = await self.request(
            "forward", hidden, session=session, first_block=first_block, position=position, open=open, close=close
        )
        if reply.tensor is None:
            raise ServerFailed(self.name, "forward reply without a tensor")
        return reply.tensor

    def close_session(self, session: str) -> asyncio.Future[protocol.Reply]:
        """Send a close now; the reply (ignored by callers that need not wait) arrives in the future."""
        return self.send("close", session=session)

    def fail_pending(self, message: str) -> None:
        """The server is gone: every request still waiting for it fails now (not at its timeout)."""
        pending, self._pending = self._pending, {}
        for future in pending.values():
            if not future.done():
                future.set_exception(ServerFailed(self.name, message, "transport"))

    def close(self) -> None:
        for future in self._pending.values():
            if not future.done():
                future.cancel()
        if self._io is not None:
            self._io.close()
