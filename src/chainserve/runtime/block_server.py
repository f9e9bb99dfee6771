"""A block server: one OS process hosting one server's span of blocks and its KV arena (§4.2).

It answers the orchestrator over a ZeroMQ ROUTER socket (:mod:`.protocol`). A session is admitted
only when the arena has, for each block it runs, the KV pages of the positions it reserves (its prompt
+ output, issue 30) within the admission limit the plan in force sets (``limit`` op; else a
``no_free_slot`` refusal); a session longer than the served context, or than the whole arena, is a
``bad_request``. It runs prefill and decode steps on the hidden states it receives, never past its
reservation, and is freed when closed or idle past ``idle_timeout_s``.

Continuous batching (issue 17; iteration-level, as vLLM and Orca schedule): with a backend that
``batches`` (torch), steps that arrive while an iteration computes wait, and the next iteration takes
every waiting step — decodes of any sessions at any positions in one forward, prefill chunks of at most
``max_batch_tokens // 2`` tokens beside them within ``max_batch_tokens`` per iteration, so a prompt
never holds decodes up by more than one chunk. An iteration waits for the sessions this server has
just answered when they are due back within ``ServerKnobs.hold_fraction`` of an iteration (issue 30:
no half-batches; :class:`~.batching.Turnarounds`); otherwise it starts at once, a lone step on an idle
server too. The emulated backend does not batch (unless given a step cost): each step sleeps its own
time as it arrives (the paper's model, every session at full rate). A step's error (unknown session,
gap, refused admission) fails that session only.

Heterogeneity on one host: ``slowdown`` stretches compute by that factor (a batched iteration lasts
that much longer) and ``delay_s`` is an injected one-way network delay (both ways slept before a reply
leaves). Admission and frees happen when a message arrives, so a close always lands before a later
open sent on the same connection. Epochs (:mod:`.protocol`): a newer orchestrator's first message
frees every session of older ones; their later messages are refused. Prints one JSON ``ready``
line on stdout once bound; logs go to stderr.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import os
import signal
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import zmq

from chainserve.model.step_cost import prefill_chunk_tokens
from chainserve.runtime import protocol
from chainserve.runtime.backends.base import NoFreeSlot, SpanBackend, SpanStep, WireTensor
from chainserve.runtime.batching import DEFAULT_MAX_BATCH_TOKENS, Batcher, Turnarounds
from chainserve.runtime.kv_arena import KVArena
from chainserve.runtime.timing import SteadySleep
from chainserve.runtime.zmq_io import LoopSocket

log = logging.getLogger("chainserve.block_server")


@dataclass(frozen=True, slots=True)
class ServerKnobs:
    """``slowdown`` ≥ 1 multiplies compute; ``delay_s`` one-way injected delay; ``idle_timeout_s``
    frees a session nobody used for that long; ``token`` must match every request's (empty: none);
    ``max_batch_tokens`` bounds an iteration of a batching backend; ``hold_fraction`` is the longest
    an iteration of a batching backend waits for sessions due back (issue 30, no half-batches), as a
    fraction of the last iteration's time (0: never waits): merging two cohorts saves an iteration's
    fixed cost, every weight streamed once more."""

    slowdown: float = 1.0
    delay_s: float = 0.0
    idle_timeout_s: float = 300.0
    token: str = field(default="", repr=False)
    max_batch_tokens: int = DEFAULT_MAX_BATCH_TOKENS
    hold_fraction: float = 0.5

    def __post_init__(self) -> None:
        if not self.slowdown >= 1 or not self.delay_s >= 0 or not self.idle_timeout_s > 0:
            raise ValueError("knobs: need slowdown ≥ 1, delay_s ≥ 0, idle_timeout_s > 0")
        if not self.max_batch_tokens >= 2:
            raise ValueError(f"max_batch_tokens: must be at least 2, got {self.max_batch_tokens}")
        if not 0 <= self.hold_fraction <= 1:
            raise ValueError(f"hold_fraction: must be within 0..1, got {self.hold_fraction}")


@dataclass(slots=True)
class Session:
    """An admitted session: its pages (one tuple per block from ``first_block``) for ``reserved``
    positions; a closed one with a step still computing keeps its pages until that step is done
    (``in_flight``, ``closed``), so they never pass to another session mid-write."""

    pages: tuple[tuple[int, ...], ...]
    reserved: int
    first_block: int
    next_position: int
    last_used_at: float
    epoch: int | None = None
    in_flight: int = 0
    closed: bool = False

    def all_pages(self) -> list[int]:
        return [page for block in self.pages for page in block]


@dataclass(slots=True)
class Counters:
    """The server's own counters (reported by ``info``): steps computed, iterations run with the
    tokens they carried and how many had each batch size, admissions, refusals, expiries."""

    num_steps: int = 0
    num_batches: int = 0
    num_batch_tokens: int = 0
    batch_sizes: Counter[int] = field(default_factory=Counter)
    num_admitted: int = 0
    num_refused: int = 0
    num_expired: int = 0
    num_superseded: int = 0  # sessions freed because a newer orchestrator attached
    peak_block_slots: int = 0
    peak_pages: int = 0
    peak_sessions: int = 0
    compute_s: float = 0.0  # time spent in the backend's forward, slowdown included

    def count_batch(self, steps: Sequence[SpanStep]) -> None:
        self.num_steps += len(steps)
        self.num_batches += 1
        self.num_batch_tokens += sum(s.num_tokens for s in steps)
        self.batch_sizes[len(steps)] += 1


class BlockServer:
    """Request handling, independent of the socket (tests call :meth:`handle` directly)."""

    def __init__(
        self, server_id: str, backend: SpanBackend, knobs: ServerKnobs, backend_name: str = "", model_id: str = ""
    ):
        self.server_id = server_id
        self.backend = backend
        self.info = backend.info
        self.knobs = knobs
        self.arena = KVArena(self.info.num_block_slots, self.info.pages_per_slot)
        self.context = backend.context  # the longest session served
        self.sessions: dict[str, Session] = {}
        self.counters = Counters()
        self.backend_name = backend_name
        self.model_id = model_id
        self.sleep = SteadySleep()
        self.epoch = 0
        self.on_shutdown: Callable[[], None] | None = None  # set by serve_forever
        self.chunk_tokens = prefill_chunk_tokens(knobs.max_batch_tokens)
        self.batcher: Batcher[SpanStep, WireTensor] | None = None
        self.turnarounds = Turnarounds(knobs.hold_fraction)
        if backend.batches:
            self.batcher = Batcher(
                self._iteration,
                lambda s: s.num_tokens,
                knobs.max_batch_tokens,
                self.counters.count_batch,
                (lambda: self.turnarounds.hold_s(self.sessions)) if knobs.hold_fraction > 0 else None,
            )

    def describe(self) -> dict:
        info, c = self.info, self.counters
        return {
            "server_id": self.server_id,
            "backend": self.backend_name,
            "model_id": self.model_id,
            "device": str(getattr(self.backend, "device", "cpu")),
            "first_block": info.first_block,
            "num_blocks": info.num_blocks,
            "num_block_slots": info.num_block_slots,
            "slot_limit": self.arena.limit,
            "max_tokens": info.max_tokens,
            "page_tokens": info.page_tokens,
            "pages_per_slot": info.pages_per_slot,
            "num_pages": info.num_pages,
            "used_pages": self.arena.num_used,
            "max_context": self.context,
            "max_batch_tokens": self.knobs.max_batch_tokens,
            "used_block_slots": self.arena.used_block_slots,
            "num_sessions": len(self.sessions),
            "slowdown": self.knobs.slowdown,
            "delay_s": self.knobs.delay_s,
            "num_steps": c.num_steps,
            "num_batches": c.num_batches,
            "num_batch_tokens": c.num_batch_tokens,
            "batch_sizes": sorted(c.batch_sizes.items()),
            "num_admitted": c.num_admitted,
            "num_refused": c.num_refused,
            "num_expired": c.num_expired,
            "num_superseded": c.num_superseded,
            "epoch": self.epoch,
            "peak_block_slots": c.peak_block_slots,
            "peak_pages": c.peak_pages,
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
            if request.epoch is not None:
                self._check_epoch(request.epoch)
            if request.op == "shutdown":
                log.warning("%s: shutdown asked for", self.server_id)
                if self.on_shutdown is not None:
                    asyncio.get_running_loop().call_later(0.05, self.on_shutdown)
                return protocol.encode_reply(rid)
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
        except protocol.ProtocolError as exc:
            log.warning("%s: refused request %d: %s", self.server_id, rid, exc)
            return protocol.encode_error(rid, exc.code, str(exc))
        except Exception as exc:  # a failure must not kill the server
            log.exception("%s: request %d failed", self.server_id, rid)
            return protocol.encode_error(rid, "internal", f"{type(exc).__name__}: {exc}")

    def _check_epoch(self, epoch: int) -> None:
        """Refuse an older orchestrator; on a newer one's first message free the older ones' sessions."""
        if epoch < self.epoch:
            raise protocol.ProtocolError(f"epoch: {epoch} is older than this server's {self.epoch}", "stale_epoch")
        if epoch > self.epoch:
            old = [name for name, s in self.sessions.items() if s.epoch is not None and s.epoch < epoch]
            for name in old:
                self._close(name)
            self.counters.num_superseded += len(old)
            log.log(
                logging.INFO if self.epoch == 0 else logging.WARNING,  # the first orchestrator is routine
                "%s: orchestrator epoch %d attached (was %d); freed %d sessions of older epochs",
                self.server_id, epoch, self.epoch, len(old),
            )  # fmt: skip
            self.epoch = epoch

    async def _delay(self) -> None:
        """A round trip's injected delay (both ways)."""
        await self.sleep(2 * self.knobs.delay_s)

    def _admit(self, name: str, first_block: int, epoch: int | None, reserve: int) -> Session:
        """Admit ``name`` at ``first_block`` with the pages of ``reserve`` positions on each block, or
        refuse it."""
        info = self.info
        if not info.first_block <= first_block <= info.last_block:
            raise protocol.ProtocolError(
                f"first_block: {first_block} outside the span {info.first_block}..{info.last_block}"
            )
        session = self.sessions.get(name)
        if session is not None:
            return session
        if self.context is not None and reserve > self.context:
            raise protocol.ProtocolError(f"reserve: {reserve} positions exceed the served context of {self.context}")
        per_block, num_blocks = info.pages_for(reserve), info.last_block - first_block + 1
        if per_block * num_blocks > self.arena.num_pages:
            raise protocol.ProtocolError(
                f"reserve: {reserve} positions on {num_blocks} blocks need {per_block * num_blocks} pages, "
                f"more than the {self.arena.num_pages} this server has"
            )
        try:
            pages = self.arena.allocate(per_block * num_blocks)
        except NoFreeSlot as exc:
            self.counters.num_refused += 1
            log.info(
                "%s: refused session %s (%d of %d pages used)", self.server_id, name, self.arena.num_used,
                self.arena.limit_pages,
            )  # fmt: skip
            raise protocol.ProtocolError(str(exc), "no_free_slot") from None
        table = tuple(tuple(pages[b * per_block : (b + 1) * per_block]) for b in range(num_blocks))
        session = self.sessions[name] = Session(table, reserve, first_block, 0, time.monotonic(), epoch)
        c = self.counters
        c.num_admitted += 1
        c.peak_block_slots = max(c.peak_block_slots, self.arena.used_block_slots)
        c.peak_pages = max(c.peak_pages, self.arena.num_used)
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
        session.closed = True
        if not session.in_flight:
            self.arena.free(session.all_pages())

    async def _forward(self, request: protocol.Request) -> list[bytes]:
        """Each step is checked and admitted now, in message order; then all compute (batched by the
        backend or not) and one reply carries every session's output or error."""
        ready = [self._prepare(step, request.epoch) for step in request.steps]
        if len(ready) == 1:
            results = [await self._run(*ready[0])]
        else:
            results = await asyncio.gather(*(self._run(*r) for r in ready))
        await self._delay()
        return protocol.encode_forward_reply(request.rid, results)

    def _prepare(
        self, step: protocol.Step, epoch: int | None
    ) -> tuple[protocol.Step, Session | protocol.ProtocolError]:
        try:
            num_new = step.tensor.shape[1] if len(step.tensor.shape) >= 2 else 0
            session = self.sessions.get(step.session)
            # an opening step without a reservation takes one block-slot's max_tokens
            reserved = session.reserved if session else step.reserve or self.info.max_tokens
            if num_new < 1 or step.position + num_new > reserved:
                raise protocol.ProtocolError(
                    f"position: {num_new} tokens at {step.position} do not fit the "
                    f"{reserved} positions the session's pages hold"
                )
            if step.open:
                session = self._admit(step.session, step.first_block, epoch, reserved)
            elif session is None:
                raise protocol.ProtocolError(f"session: {step.session!r} is not open here", "unknown_session")
            if step.first_block != session.first_block:
                raise protocol.ProtocolError(f"first_block: session {step.session!r} entered at {session.first_block}")
            if step.position > session.next_position:
                raise protocol.ProtocolError(
                    f"position: {step.position} leaves a gap, the session holds {session.next_position}"
                )
        except protocol.ProtocolError as exc:
            if exc.code != "unknown_session":  # a lost session is routine after a restart; the rest is not
                log.log(logging.INFO if exc.code == "no_free_slot" else logging.WARNING, "%s: %s", self.server_id, exc)
            return step, exc
        session.next_position = step.position + num_new
        return step, session

    async def _run(
        self, step: protocol.Step, session: Session | protocol.ProtocolError
    ) -> WireTensor | protocol.ProtocolError:
        if isinstance(session, protocol.ProtocolError):
            return session
        session.in_flight += 1
        try:
            out = await self._compute(
                step.session, SpanStep(step.tensor, session.first_block, session.pages, step.position)
            )
        except ValueError as exc:
            return protocol.ProtocolError(str(exc))
        except Exception as exc:
            log.exception("%s: step of session %s failed", self.server_id, step.session)
            return protocol.ProtocolError(f"{type(exc).__name__}: {exc}", "internal")
        finally:
            session.in_flight -= 1
            if session.closed and not session.in_flight:
                self.arena.free(session.all_pages())
        session.last_used_at = time.monotonic()
        if step.close and step.session in self.sessions:
            self._close(step.session)
        return out

    async def _compute(self, session: str, step: SpanStep) -> WireTensor:
        """One step's output: through the batcher in chunks (a batching backend; ``session`` is due back
        once it is answered), else on its own."""
        if self.batcher is None:
            began = time.perf_counter()
            (out,) = await self.backend.forward([step])
            compute_s = time.perf_counter() - began
            self.counters.count_batch([step])
            self.counters.compute_s += compute_s * self.knobs.slowdown
            await self.sleep((self.knobs.slowdown - 1) * compute_s)
            if isinstance(out, Exception):
                raise out
            return out
        self.turnarounds.arrived(session)
        outs = [await self.batcher.submit(chunk) for chunk in step.chunks(self.chunk_tokens)]
        self.turnarounds.returned(session)
        return outs[0] if len(outs) == 1 else WireTensor.concat(outs)

    async def _iteration(self, steps: list[SpanStep]) -> Sequence[WireTensor | Exception]:
        """One batched forward; a slower device (``slowdown``) holds the iteration that much longer."""
        began = time.perf_counter()
        results = await self.backend.forward(steps)
        compute_s = time.perf_counter() - began
        self.counters.compute_s += compute_s * self.knobs.slowdown
        self.turnarounds.iteration_s = compute_s * self.knobs.slowdown
        await self.sleep((self.knobs.slowdown - 1) * compute_s)
        return results

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
    # a managed server (``parent_pid``) leaves SIGINT (the terminal's Ctrl-C) to its parent, which stops it
    for sig in (signal.SIGTERM,) if parent_pid is not None else (signal.SIGTERM, signal.SIGINT):
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
    server.on_shutdown = stop.set
    endpoint = f"tcp://{host}:{port}"
    print(
        json.dumps({"event": "ready", "server_id": server.server_id, "endpoint": endpoint, "pid": os.getpid()}),
        flush=True,
    )
    log.info(
        "%s: serving blocks %d..%d with %d block-slots (%d pages of %d tokens) on %s",
        server.server_id,
        server.info.first_block,
        server.info.last_block,
        server.info.num_block_slots,
        server.info.num_pages,
        server.info.page_tokens,
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
