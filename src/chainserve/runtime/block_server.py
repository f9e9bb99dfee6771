"""A block server: one OS process hosting one server's span of blocks and its KV arena (§4.2).

It answers the orchestrator over a ZeroMQ ROUTER socket (:mod:`.protocol`). A session is admitted
only when the arena has a block-slot for each block it runs within the admission limit the plan in
force sets (``limit`` op; else a ``no_free_slot`` refusal), runs
prefill and decode steps on the hidden states it receives, and is freed when closed or idle past
``idle_timeout_s``. Heterogeneity on one host: ``slowdown`` stretches every step's compute by that
factor and ``delay_s`` is an injected one-way network delay. A reply leaves after the compute plus
one sleep of the slowdown's extra time and both ways' delay (one timer, so its overshoot counts once);
the client sees the same latency as with a delay on each way, but a step computes on arrival.
Admission and frees happen when a message arrives, so a close always lands before a later open
sent on the same connection. Prints one JSON ``ready`` line on stdout once bound;
logs go to stderr.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import os
import signal
import time
from dataclasses import dataclass, field

import zmq

from chainserve.runtime import protocol
from chainserve.runtime.backends.base import NoFreeSlot, SpanBackend
from chainserve.runtime.kv_arena import KVArena
from chainserve.runtime.timing import SteadySleep
from chainserve.runtime.zmq_io import LoopSocket

log = logging.getLogger("chainserve.block_server")


@dataclass(frozen=True, slots=True)
class ServerKnobs:
    """``slowdown`` ≥ 1 multiplies compute; ``delay_s`` one-way injected delay; ``idle_timeout_s``
    frees a session nobody used for that long; ``token`` must match every request's (empty: none)."""

    slowdown: float = 1.0
    delay_s: float = 0.0
    idle_timeout_s: float = 300.0
    token: str = field(default="", repr=False)

    def __post_init__(self) -> None:
        if not self.slowdown >= 1 or not self.delay_s >= 0 or not self.idle_timeout_s > 0:
            raise ValueError("knobs: need slowdown ≥ 1, delay_s ≥ 0, idle_timeout_s > 0")


@dataclass(slots=True)
class Session:
    slots: list[int]
    first_block: int
    next_position: int
    last_used_at: float


@dataclass(slots=True)
class Counters:
    """The server's own counters (reported by ``info``)."""

    num_steps: int = 0
    num_admitted: int = 0
    num_refused: int = 0
    num_expired: int = 0
    peak_block_slots: int = 0
    peak_sessions: int = 0
    compute_s: float = 0.0  # time spent in the backend's forward, slowdown included


class BlockServer:
    """Request handling, independent of the socket (tests call :meth:`handle` directly)."""

    def __init__(
        self, server_id: str, backend: SpanBackend, knobs: ServerKnobs, backend_name: str = "", model_id: str = ""
    ):
        self.server_id = server_id
        self.backend = backend
        self.info = backend.info
        self.knobs = knobs
        self.arena = KVArena(self.info.num_block_slots)
        self.sessions: dict[str, Session] = {}
        self.counters = Counters()
        self.backend_name = backend_name
        self.model_id = model_id
        self.sleep = SteadySleep()

    def describe(self) -> dict:
        info, c = self.info, self.counters
        return {
            "server_id": self.server_id,
            "backend": self.backend_name,
            "model_id": self.model_id,
            "first_block": info.first_block,
            "num_blocks": info.num_blocks,
            "num_block_slots": info.num_block_slots,
            "slot_limit": self.arena.limit,
            "max_tokens": info.max_tokens,
            "used_block_slots": self.arena.num_used,
            "num_sessions": len(self.sessions),
            "slowdown": self.knobs.slowdown,
            "delay_s": self.knobs.delay_s,
            "num_steps": c.num_steps,
            "num_admitted": c.num_admitted,
            "num_refused": c.num_refused,
            "num_expired": c.num_expired,
            "peak_block_slots": c.peak_block_slots,
            "peak_sessions": c.peak_sessions,
            "compute_s": c.compute_s,
            "pid": os.getpid(),
        }

    async def handle(self, frames: list[bytes]) -> list[bytes]:
        rid = 0
        try:
            request = protocol.decode_request(frames)
            rid = request.rid
            if self.knobs.token and not hmac.compare_digest(request.token.encode(), self.knobs.token.encode()):
                raise protocol.ProtocolError("token: missing or wrong", "unauthorized")
            if request.op == "info":
                return protocol.encode_reply(rid, **self.describe())
            if request.op == "limit":
                self._set_limit(request.num_block_slots)
                return protocol.encode_reply(rid, **self.describe())
            if request.op == "close":
                self._close(request.session)
                await self._delay()
                return protocol.encode_reply(rid)
            return await self._forward(request)
        except protocol.ProtocolError as exc:  # a lost session is routine after a restart; the rest is not
            log.log(
                logging.INFO if exc.code == "unknown_session" else logging.WARNING,
                "%s: refused request %d: %s",
                self.server_id,
                rid,
                exc,
            )
            return protocol.encode_error(rid, exc.code, str(exc))
        except NoFreeSlot as exc:
            await self._delay()
            return protocol.encode_error(rid, "no_free_slot", str(exc))
        except Exception as exc:  # a backend failure must not kill the server
            log.exception("%s: request %d failed", self.server_id, rid)
            return protocol.encode_error(rid, "internal", f"{type(exc).__name__}: {exc}")

    async def _delay(self) -> None:
        """A round trip's injected delay (both ways), for replies without compute."""
        await self.sleep(2 * self.knobs.delay_s)

    def _admit(self, name: str, first_block: int) -> Session:
        info = self.info
        if not info.first_block <= first_block <= info.last_block:
            raise protocol.ProtocolError(
                f"first_block: {first_block} outside the span {info.first_block}..{info.last_block}"
            )
        session = self.sessions.get(name)
        if session is not None:
            return session
        try:
            slots = self.arena.allocate(info.last_block - first_block + 1)
        except NoFreeSlot:
            self.counters.num_refused += 1
            log.info(
                "%s: refused session %s (%d of %d block-slots used)",
                self.server_id,
                name,
                self.arena.num_used,
                self.arena.limit,
            )
            raise
        session = self.sessions[name] = Session(slots, first_block, 0, time.monotonic())
        c = self.counters
        c.num_admitted += 1
        c.peak_block_slots = max(c.peak_block_slots, self.arena.num_used)
        c.peak_sessions = max(c.peak_sessions, len(self.sessions))
        log.debug("%s: admitted session %s at block %d", self.server_id, name, first_block)
        return session

    def _set_limit(self, limit: int) -> None:
        try:
            self.arena.set_limit(limit)
        except ValueError as exc:
            raise protocol.ProtocolError(f"num_block_slots: {exc}") from None
        log.info("%s: admission limit %d of %d block-slots", self.server_id, limit, self.info.num_block_slots)

    def _close(self, name: str) -> None:
        session = self.sessions.pop(name, None)
        if session is None:
            raise protocol.ProtocolError(f"session: {name!r} is not open here", "unknown_session")
        self.arena.free(session.slots)

    async def _forward(self, request: protocol.Request) -> list[bytes]:
        name, tensor = request.session, request.tensor
        num_new = tensor.shape[1] if len(tensor.shape) >= 2 else 0
        if num_new < 1 or request.position + num_new > self.info.max_tokens:
            raise protocol.ProtocolError(
                f"position: {num_new} tokens at {request.position} do not fit the "
                f"{self.info.max_tokens} positions the cache holds"
            )
        if request.open:
            session = self._admit(name, request.first_block)
        else:
            session = self.sessions.get(name)
            if session is None:
                raise protocol.ProtocolError(f"session: {name!r} is not open here", "unknown_session")
        if request.first_block != session.first_block:
            raise protocol.ProtocolError(f"first_block: session {name!r} entered at {session.first_block}")
        if request.position > session.next_position:
            raise protocol.ProtocolError(
                f"position: {request.position} leaves a gap, the session holds {session.next_position}"
            )
        session.next_position = request.position + num_new
        began = time.perf_counter()
        try:
            out = await self.backend.forward(tensor, session.first_block, session.slots, request.position)
        except ValueError as exc:
            raise protocol.ProtocolError(str(exc)) from None
        compute_s = time.perf_counter() - began
        self.counters.compute_s += compute_s * self.knobs.slowdown
        self.counters.num_steps += 1
        session.last_used_at = time.monotonic()
        if request.close and name in self.sessions:
            self._close(name)
        # slowdown and both ways of the network delay in one sleep (one timer's overshoot, not three)
        await self.sleep((self.knobs.slowdown - 1) * compute_s + 2 * self.knobs.delay_s)
        return protocol.encode_reply(request.rid, out)

    def expire_idle(self, now: float) -> None:
        """Free the sessions idle for longer than ``idle_timeout_s``."""
        for name, session in list(self.sessions.items()):
            if now - session.last_used_at > self.knobs.idle_timeout_s:
                self._close(name)
                self.counters.num_expired += 1
                log.info("%s: session %s expired after %.0f s idle", self.server_id, name, self.knobs.idle_timeout_s)


async def serve_forever(server: BlockServer, host: str, port: int, parent_pid: int | None = None) -> None:
    """Bind, print the ready line, answer requests until SIGTERM/SIGINT (or the parent dies)."""
    ctx = zmq.Context()
    sock = ctx.socket(zmq.ROUTER)
    sock.setsockopt(zmq.LINGER, 0)
    if port:
        sock.bind(f"tcp://{host}:{port}")
    else:
        port = sock.bind_to_random_port(f"tcp://{host}")
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    tasks: set[asyncio.Task] = set()

    async def answer(identity: bytes, frames: list[bytes]) -> None:
        reply = await server.handle(frames)
        try:
            io.send([identity, *reply])
        except zmq.ZMQError as exc:  # the client's queue is full or gone: it will time out
            log.warning("%s: reply dropped: %s", server.server_id, exc)

    def receive(frames: list[bytes]) -> None:
        task = loop.create_task(answer(frames[0], frames[1:]))
        tasks.add(task)
        task.add_done_callback(tasks.discard)

    io = LoopSocket(sock, receive)
    endpoint = f"tcp://{host}:{port}"
    print(
        json.dumps({"event": "ready", "server_id": server.server_id, "endpoint": endpoint, "pid": os.getpid()}),
        flush=True,
    )
    log.info(
        "%s: serving blocks %d..%d with %d block-slots on %s",
        server.server_id,
        server.info.first_block,
        server.info.last_block,
        server.info.num_block_slots,
        endpoint,
    )

    async def housekeeping() -> None:
        while True:
            await asyncio.sleep(1.0)
            server.expire_idle(time.monotonic())
            if parent_pid is not None and os.getppid() != parent_pid:
                log.warning("%s: parent %d is gone, shutting down", server.server_id, parent_pid)
                stop.set()

    keeper = asyncio.create_task(housekeeping())
    await stop.wait()
    for task in [keeper, *tasks]:
        task.cancel()
    await asyncio.gather(keeper, *tasks, return_exceptions=True)
    io.close()
    ctx.term()
    server.backend.close()
    log.info("%s: stopped", server.server_id)
