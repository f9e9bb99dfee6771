"""The central orchestrator (paper §4.2): the dispatcher the simulator uses, driving real jobs.

Every request becomes a :class:`~chainserve.dispatch.base.Job` submitted to the method's dispatcher
(JFFC for the proposed method; PETALS' or WS-RR's path router for the baselines). The dispatcher's
*starts* say which route a job runs on; the orchestrator then is the job's client, as PETALS' client
is and as τ^c models it: it embeds the prompt, sends the hidden states through the route's block
servers hop by hop (prefill, then one decode step per token), applies the LM head, samples, and
streams tokens back. When the job ends its sessions close and ``complete`` frees its slot, whose
starts run next. A refused admission (a server without free block-slots) ``abort``s the start: the
job goes back to the head of the queue and retries after a short backoff; a client that leaves
``cancel``s its job; the central queue is bounded (``max_waiting``; past it, :class:`Overloaded`).

Failures (beyond the paper, which plans once): a block server that misses its heartbeats, exits, or
fails on the data path is marked dead and ``fail_server`` re-queues the jobs of its chains. The
chains are recomposed without it (GCA on the survivors' spans within their arenas, :mod:`.recovery`);
waiting jobs move to the new dispatcher, jobs still running on old chains finish there (drained,
never cut). An aborted job resumes on its new chain by replaying its prompt and the tokens generated
so far as one prefill, so the client's stream goes on where it stopped, with the same tokens under
greedy decoding (and the same sampler state otherwise). A server that answers again rejoins the same
way. When the survivors no longer cover the model it is placed anew on them.

Plan changes — recomposition after failures, re-placement, and adapting to load with the controller
the simulator drives (issue 9) — are the methods of :class:`~.plan_changes.PlanChanges`.

The clock and the block-server clients are injected, so tests run the same code on a virtual clock
with a fake transport.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from chainserve.dispatch.base import Dispatcher, Job, Route, Start
from chainserve.plan.plan_file import layout_to_dict
from chainserve.plan.types import Layout, reserved_block_jobs
from chainserve.runtime.backends.base import ModelHead, WireTensor
from chainserve.runtime.client import ServerFailed, ServerRefused
from chainserve.runtime.metrics import RuntimeMetrics
from chainserve.runtime.plan_changes import Controller, PlanChanges, PlanOps
from chainserve.runtime.requests import (
    Finished,
    Overloaded,
    RequestFailed,
    RequestTimes,
    SamplingParams,
    TokenEvent,
)
from chainserve.runtime.sampling import Sampler, TextStream

log = logging.getLogger("chainserve.orchestrator")

#: ServerFailed codes that mean the server itself is gone (not a bad request of ours).
DEAD_CODES = frozenset({"timeout", "transport"})


class ServerClient(Protocol):
    """What the orchestrator needs of a block-server connection (:class:`~.client.BlockClient`)."""

    name: str

    async def forward(
        self,
        session: str,
        first_block: int,
        position: int,
        hidden: WireTensor,
        *,
        open: bool = False,
        close: bool = False,
    ) -> WireTensor: ...

    def close_session(self, session: str) -> asyncio.Future: ...

    async def info(self, timeout_s: float = 10.0) -> dict[str, Any]: ...

    async def set_limit(self, num_block_slots: int, timeout_s: float = 10.0) -> dict[str, Any]: ...


@dataclass(slots=True, eq=False)
class JobRun:
    """A request in the system: its job, prompt, decoding state (kept across attempts, so a resumed
    job continues its stream), event queue, the dispatcher holding it and the start it runs."""

    job: Job
    prompt: list[int]
    params: SamplingParams
    times: RequestTimes
    sampler: Sampler
    stream: TextStream
    dispatcher: Dispatcher
    generated: list[int] = field(default_factory=list)
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    task: asyncio.Task | None = None
    start: Start | None = None
    held: tuple[tuple[int, int], ...] = ()  # (server, block-slots) this start holds (see Orchestrator._hold)
    num_refusals: int = 0
    num_resumes: int = 0
    done: bool = False


@dataclass(frozen=True, slots=True)
class StartRecord:
    """One start the dispatcher decided: time, job, attempt, chain (``None`` for a path) and servers."""

    at: float
    job_id: int
    attempt: int
    chain: int | None
    servers: tuple[int, ...]


class Orchestrator(PlanChanges):
    """See the module docstring. ``clients[j]`` talks to the block server of problem server j;
    ``max_waiting`` bounds the central queue (``None``: unbounded; with ``max_waiting_follows_plan``
    4 × C of the plan in force); ``request_timeout_s`` ends a request that has not finished in that
    time; ``plan_ops`` lets failures recompose chains and place the model anew; ``controller`` adapts
    the plan to load, asked every ``adapt_interval_s`` and after each arrival."""

    def __init__(
        self,
        layout: Layout,
        dispatcher: Dispatcher,
        head: ModelHead,
        clients: Mapping[int, ServerClient],
        *,
        metrics: RuntimeMetrics | None = None,
        clock: Callable[[], float] = time.monotonic,
        max_waiting: int | None = None,
        retry_backoff_s: float = 0.05,
        method: str = "proposed",
        request_timeout_s: float = 600.0,
        plan_ops: PlanOps | None = None,
        heartbeat_s: float = 0.5,
        heartbeat_deadline_s: float = 2.0,
        controller: Controller | None = None,
        adapt_interval_s: float = 0.5,
        max_waiting_follows_plan: bool = False,
    ):
        self.layout = layout
        self.placed = layout  # the plan in force with every server alive (failures recompose it)
        self.dispatcher = dispatcher
        self.retired: list[Dispatcher] = []  # older dispatchers whose jobs still run (drained)
        self.head = head
        self.clients = dict(clients)
        self.metrics = metrics or RuntimeMetrics()
        self.clock = clock
        self.max_waiting = max_waiting
        self.retry_backoff_s = retry_backoff_s
        self.method = method
        self.request_timeout_s = request_timeout_s
        self.plan_ops = plan_ops
        self.controller = controller
        self.adapt_interval_s = adapt_interval_s
        self.max_waiting_follows_plan = max_waiting_follows_plan
        self._replacing: asyncio.Task | None = None  # the plan change being executed (one at a time)
        self._adapting: asyncio.Task | None = None
        self.heartbeat_s = heartbeat_s
        self.heartbeat_deadline_s = heartbeat_deadline_s
        self.model_id = head.model_id
        self.max_tokens = head.max_tokens
        self.names = [s.name for s in layout.problem.servers]
        self.index = {name: j for j, name in enumerate(self.names)}
        self.block_slots = reserved_block_jobs(layout)  # admission limit per server: the plan in force's
        self.arena_slots = dict(self.block_slots)  # physical arenas, as each server reports (connect)
        self.hosted = {s.server: (s.start_block, s.num_blocks) for s in layout.placement.spans}
        self.used_slots = dict.fromkeys(self.block_slots, 0)  # block-slots of the routes started
        self.held_slots = dict.fromkeys(self.block_slots, 0)  # ... of those admitted by _hold (KV in use)
        self._freed = asyncio.Event()  # set (and replaced) when held block-slots are released or chains change
        self.server_limits = dict(self.block_slots)  # each server's own admission limit, as last set
        self._limits_lock = asyncio.Lock()  # one limit change at a time
        self._lowering: dict[int, asyncio.Task] = {}
        self._out: set[int] = set()  # servers taken out of the chains to be restarted with a new span
        self.alive = dict.fromkeys(self.block_slots, True)
        self.runs: dict[int, JobRun] = {}
        self.starts: deque[StartRecord] = deque(maxlen=100_000)
        self.plan_changes: deque[dict[str, Any]] = deque(maxlen=100)
        self._ids = itertools.count()
        self._serials = itertools.count()
        self._t0 = clock()
        self._health: asyncio.Task | None = None
        self.peak_busy: list[int] = []
        self._reset_peaks()
        for j in self.block_slots:
            self.metrics.set_server_up(self.names[j], True)
        self._update_gauges()

    # ---- the API side -------------------------------------------------------------------------
    def encode(self, text: str) -> list[int]:
        return self.head.encode(text)

    def chat_prompt(self, messages: Sequence[dict[str, str]]) -> list[int]:
        return self.head.chat_prompt(messages)

    def generate(self, prompt_ids: Sequence[int], params: SamplingParams) -> AsyncIterator[TokenEvent | Finished]:
        """Queue the request now (raises :class:`Overloaded` when the queue is full) and return the
        stream of its events; closing the stream early cancels the job."""
        if not prompt_ids:
            raise ValueError("prompt: must not be empty")
        if len(prompt_ids) + params.max_tokens > self.max_tokens:
            raise ValueError(
                f"max_tokens: prompt ({len(prompt_ids)}) + max_tokens ({params.max_tokens}) exceeds "
                f"the {self.max_tokens} tokens a job's cache holds"
            )
        waiting = self.num_waiting
        if self.max_waiting is not None and waiting >= self.max_waiting:
            self.metrics.observe_failure("rejected")
            raise Overloaded(
                f"{waiting} requests are waiting (the bound is {self.max_waiting})", self._retry_after_s(waiting)
            )
        now = self.clock()
        job = Job(next(self._ids), now, len(prompt_ids), params.max_tokens)
        run = JobRun(
            job,
            list(prompt_ids),
            params,
            RequestTimes(now),
            Sampler(params),
            TextStream(self.head.decode, params.stop),
            self.dispatcher,
        )
        self.runs[job.job_id] = run
        self._apply(self.dispatcher.submit(job, now))
        if self.controller is not None:
            self.controller.observe(now - self._t0, len(prompt_ids), params.max_tokens)
            self._maybe_adapt()
        return self._stream(run)

    @property
    def num_waiting(self) -> int:
        return self.dispatcher.num_waiting + sum(d.num_waiting for d in self.retired)

    @property
    def num_running(self) -> int:
        return self.dispatcher.num_in_service + sum(d.num_in_service for d in self.retired)

    def _retry_after_s(self, waiting: int) -> float:
        """About how long the queue ahead takes to clear at the plan's rate ν (1 s when unknown)."""
        rate = sum(ch.capacity * ch.rate_per_s for ch in self.layout.chains)
        return max(1.0, waiting / rate) if rate > 0 else 1.0

    async def _stream(self, run: JobRun) -> AsyncIterator[TokenEvent | Finished]:
        deadline = run.times.arrived_at + self.request_timeout_s
        try:
            while True:
                try:
                    event = await asyncio.wait_for(run.events.get(), max(deadline - self.clock(), 0.0))
                except TimeoutError:
                    self.cancel(run.job.job_id, "timeout")
                    raise RequestFailed(
                        f"the request did not finish within {self.request_timeout_s:g} s", 504
                    ) from None
                if isinstance(event, Exception):
                    raise event
                yield event
                if isinstance(event, Finished):
                    return
        finally:
            if not run.done:
                self.cancel(run.job.job_id)

    def cancel(self, job_id: int, reason: str = "cancelled") -> None:
        """The client left (or its time ran out): stop the job wherever it is and free its place."""
        run = self.runs.get(job_id)
        if run is None or run.done:
            return
        dispatcher = run.dispatcher
        self._end(run)
        if run.task is not None:
            run.task.cancel()
        self.metrics.observe_failure(reason)
        log.info("job %d %s", job_id, reason)
        self._apply(dispatcher.cancel(job_id, self.clock()), dispatcher)

    # ---- dispatcher decisions -----------------------------------------------------------------
    def _apply(self, starts: Sequence[Start], dispatcher: Dispatcher | None = None) -> None:
        now = self.clock()
        for start in starts:
            run = self.runs[start.job.job_id]
            run.dispatcher = dispatcher or self.dispatcher
            run.start = start
            if run.times.started_at is None:
                run.times.started_at = now
            for hop in start.route.hops:
                self.used_slots[hop.server] += hop.num_blocks
            self.starts.append(
                StartRecord(
                    now, start.job.job_id, start.attempt, start.route.chain, tuple(h.server for h in start.route.hops)
                )
            )
            run.task = asyncio.get_running_loop().create_task(self._serve(run, start))
        state = getattr(self.dispatcher, "state", None)
        if state is not None:
            self.peak_busy = [max(p, b) for p, b in zip(self.peak_busy, state.busy, strict=True)]
        self._update_gauges()

    def _release(self, run: JobRun) -> None:
        """The job's route no longer holds cache (its slot is being freed in the dispatcher)."""
        if run.start is not None:
            for hop in run.start.route.hops:
                self.used_slots[hop.server] -= hop.num_blocks
            run.start = None
        if run.held:
            for j, num in run.held:
                self.held_slots[j] -= num
            run.held = ()
            self._wake()

    def _wake(self) -> None:
        """Whoever waits for room (:meth:`_hold`) or a drain looks again."""
        self._freed.set()
        self._freed = asyncio.Event()

    async def _hold(self, run: JobRun, route: Route) -> bool:
        """Wait until every hop's server has room under its admission limit, then hold the block-slots
        (``True``). Without plan changes the dispatcher never asks for more than the limits and this
        never waits; after one, old chains' jobs may still hold what the new plan gives to other
        chains. A start of a retired dispatcher does not wait: ``False``, the job moves on."""
        need = [(h.server, h.num_blocks) for h in route.hops]
        while any(self.held_slots[j] + num > self.block_slots.get(j, 0) for j, num in need):
            if run.dispatcher is not self.dispatcher:
                return False
            await self._freed.wait()
        for j, num in need:
            self.held_slots[j] += num
        run.held = tuple(need)
        return True

    def _end(self, run: JobRun) -> None:
        run.done = True
        self._release(run)
        self.runs.pop(run.job.job_id, None)

    async def _serve(self, run: JobRun, start: Start) -> None:
        job_id, route, attempt = start.job.job_id, start.route, start.attempt
        session = f"j{job_id}s{next(self._serials)}"
        opened: list[ServerClient] = []
        try:
            if run.num_refusals:
                await asyncio.sleep(min(self.retry_backoff_s * 2 ** (run.num_refusals - 1), 1.0))
            if not await self._hold(run, route):
                self._requeue(run)  # to the current dispatcher
                return
            finished = await self._run_route(run, route, session, opened)
        except ServerRefused as exc:
            self._close_sessions(opened, session)
            if run.start is start:
                run.num_refusals += 1
                log.info("job %d attempt %d refused (%s); back to the head of the queue", job_id, attempt, exc)
                self._requeue(run)
            return
        except asyncio.CancelledError:
            self._close_sessions(opened, session)
            raise
        except ServerFailed as exc:
            self._close_sessions(opened, session)
            if run.start is not start:  # already re-queued by the failure that caused this error
                return
            if exc.code in DEAD_CODES and exc.server in self.index:
                self._server_failed(self.index[exc.server], str(exc))
            elif exc.code == "unknown_session":  # the server restarted under us: replay elsewhere or there
                log.warning("job %d lost its session on %s; resuming", job_id, exc.server)
                self._requeue(run)
            else:
                self._fail_request(run, str(exc))
            return
        except ValueError as exc:
            self._close_sessions(opened, session)
            self._fail_request(run, str(exc))
            return
        self._close_sessions(opened, session)
        dispatcher = run.dispatcher
        self._end(run)
        log.info(
            "job %d done: chain %s, %d tokens, %.3f s",
            job_id,
            finished.chain,
            finished.completion_tokens,
            finished.e2e_s,
        )
        tpot = (
            (finished.e2e_s - finished.ttft_s) / (finished.completion_tokens - 1)
            if finished.completion_tokens > 1
            else None
        )
        self.metrics.observe_finished(finished, tpot)
        self._apply(dispatcher.complete(job_id, self.clock(), attempt), dispatcher)
        self._retire_idle()
        run.events.put_nowait(finished)

    def _requeue(self, run: JobRun) -> None:
        """This start failed (refused, or its session was lost): the job goes back to the head of
        its dispatcher's queue, keeping what it generated; a retired dispatcher's job moves to the
        current one (old chains only finish what they run)."""
        dispatcher = run.dispatcher
        self._release(run)
        if dispatcher is self.dispatcher:
            self._apply(dispatcher.abort(run.job.job_id, self.clock()), dispatcher)
            return
        self._apply(dispatcher.cancel(run.job.job_id, self.clock()), dispatcher)
        run.dispatcher = self.dispatcher
        self._apply(self.dispatcher.submit(run.job, self.clock()))
        self._retire_idle()

    def _fail_request(self, run: JobRun, message: str) -> None:
        log.error("job %d failed: %s", run.job.job_id, message)
        dispatcher = run.dispatcher
        self._end(run)
        self.metrics.observe_failure("error")
        run.events.put_nowait(RequestFailed(message))
        self._apply(dispatcher.cancel(run.job.job_id, self.clock()), dispatcher)

    def _close_sessions(self, opened: list[ServerClient], session: str) -> None:
        """Send the closes now (they reach each server before any later open); acks are not awaited."""
        for client in opened:
            try:
                client.close_session(session).add_done_callback(_ignore_result)
            except ServerFailed:
                pass  # a dead server frees nothing
        opened.clear()

    async def _run_route(self, run: JobRun, route: Route, session: str, opened: list[ServerClient]) -> Finished:
        """Prefill (the prompt, plus what was generated before a failure), then decode token by token
        through ``route``'s hops; push a TokenEvent per new token."""
        params, head = run.params, self.head
        hops = [(hop.start_block, self.clients[hop.server]) for hop in route.hops]
        if run.generated:
            run.num_resumes += 1
            self.metrics.observe_resume()
            log.info("job %d resumes on chain %s after %d tokens", run.job.job_id, route.chain, len(run.generated))
        hidden, position, reason = head.embed(run.prompt + run.generated), 0, "length"
        for n in range(len(run.generated) + 1, params.max_tokens + 1):
            last = n == params.max_tokens
            for first_block, client in hops:
                is_open = position == 0
                hidden = await client.forward(session, first_block, position, hidden, open=is_open, close=last)
                if is_open:
                    opened.append(client)
            if last:
                opened.clear()  # the servers closed the session after this step
            position += hidden.shape[1]
            token = run.sampler(head.logits(hidden))
            run.generated.append(token)
            now = self.clock()
            if run.times.first_token_at is None:
                run.times.first_token_at = now
            if token in head.eos_token_ids and not params.ignore_eos:
                run.events.put_nowait(TokenEvent(token, run.stream.finish()))
                reason = "stop"
                break
            text = run.stream.push(token)
            if run.stream.stopped:
                run.events.put_nowait(TokenEvent(token, text))
                reason = "stop"
                break
            run.events.put_nowait(TokenEvent(token, text + (run.stream.finish() if last else "")))
            if not last:
                hidden = head.embed([token])
        times, now = run.times, self.clock()
        return Finished(
            reason,
            len(run.prompt),
            len(run.generated),
            run.stream.text,
            route.chain,
            tuple((self.names[h.server], h.start_block, h.end_block) for h in route.hops),
            times.started_at - times.arrived_at,
            times.first_token_at - times.arrived_at,
            now - times.arrived_at,
            run.num_refusals + run.num_resumes + 1,
            tuple(run.generated),
        )

    # ---- failures and rejoins -----------------------------------------------------------------
    def server_failed(self, name: str, reason: str) -> None:
        """A launcher saw the server's process exit (or an operator says it is gone)."""
        if name in self.index:
            self._server_failed(self.index[name], reason)

    def _server_failed(self, j: int, reason: str) -> None:
        if not self.alive.get(j, False) or j in self._out:  # dead already, or being restarted by us
            return
        self.alive[j] = False
        self.metrics.set_server_up(self.names[j], False)
        log.warning("block server %s failed: %s", self.names[j], reason)
        now = self.clock()
        current = asyncio.current_task()
        for dispatcher in (self.dispatcher, *self.retired):
            outcome = dispatcher.fail_server(j, now)
            for job in outcome.aborted:
                run = self.runs[job.job_id]
                if run.task is not None and run.task is not current:
                    run.task.cancel()
                self._release(run)
            self._apply(outcome.starts, dispatcher)
        fail_pending = getattr(self.clients[j], "fail_pending", None)
        if fail_pending is not None:
            fail_pending(f"marked dead: {reason}")
        self._recompose("server_failed", f"{self.names[j]}: {reason}")

    def _server_back(self, j: int) -> None:
        self.alive[j] = True
        self.metrics.set_server_up(self.names[j], True)
        log.warning("block server %s is back", self.names[j])
        now = self.clock()
        for dispatcher in (self.dispatcher, *self.retired):
            self._apply(dispatcher.restore_server(j, now), dispatcher)
        self._recompose("server_back", self.names[j])

    def _reset_peaks(self) -> None:
        state = getattr(self.dispatcher, "state", None)
        self.peak_busy = [0] * (len(state.chains) if state is not None else 0)

    # ---- state for /plan, /status, /metrics ---------------------------------------------------
    def plan_dict(self) -> dict[str, Any]:
        data = layout_to_dict(self.layout)
        data["method"] = self.method
        data["alive"] = {self.names[j]: up for j, up in self.alive.items()}
        data["changes"] = list(self.plan_changes)
        return data

    def status(self) -> dict[str, Any]:
        state = getattr(self.dispatcher, "state", None)
        chains = (
            []
            if state is None
            else [
                {
                    "chain": k,
                    "servers": [self.names[j] for j in ch.servers],
                    "busy": state.busy[k],
                    "capacity": state.capacity[k],
                    "peak_busy": self.peak_busy[k],
                    "alive": state.alive[k],
                }
                for k, ch in enumerate(state.chains)
            ]
        )
        return {
            "healthy": all(self.alive.values()),
            "model": self.model_id,
            "method": self.method,
            "num_running": self.num_running,
            "num_waiting": self.num_waiting,
            "plan_changed_at": self.plan_changes[-1]["at"] if self.plan_changes else None,
            "chains": chains,
            "servers": [
                {
                    "name": self.names[j],
                    "endpoint": getattr(self.clients.get(j), "endpoint", None),
                    "alive": self.alive[j],
                    "used_block_slots": self.used_slots[j],
                    "block_slots": self.block_slots[j],
                    "kv_cache_usage": self._kv_usage(j),
                }
                for j in self.block_slots
            ],
            "latency": self.metrics.recent.summary(),
        }

    def _kv_usage(self, j: int) -> float:
        """Server j's used / total block-slots, 0..1, as ``chainserve:kv_cache_usage_perc`` reports it."""
        total = self.block_slots[j]
        return min(self.used_slots[j], total) / total if total > 0 else 0.0

    def _update_gauges(self) -> None:
        m = self.metrics
        m.set_queue(self.num_running, self.num_waiting)
        for j, total in self.block_slots.items():  # starts being refused may briefly count past the arena
            m.set_kv_usage(self.names[j], min(self.used_slots[j], total), total)
        state = getattr(self.dispatcher, "state", None)
        if state is not None:
            for k in range(len(state.chains)):
                m.set_chain(k, state.busy[k], state.capacity[k])

    # ---- lifecycle ----------------------------------------------------------------------------
    async def connect(self, timeout_s: float = 120.0) -> None:
        """Wait until every block server answers and hosts what the layout says it should, then
        watch their heartbeats."""
        deadline = self.clock() + timeout_s
        for j, client in self.clients.items():
            while True:
                try:
                    info = await client.info(timeout_s=2.0)
                    break
                except ServerFailed as exc:
                    if self.clock() > deadline:
                        raise RuntimeError(
                            f"block server {self.names[j]} did not answer within {timeout_s:g} s"
                        ) from exc
            mismatch = self._mismatch(j, info)
            if mismatch:
                raise RuntimeError(mismatch)
            await self._join(j, info)
        loop = asyncio.get_running_loop()
        self._health = loop.create_task(self._watch_health())
        if self.controller is not None:
            self._adapting = loop.create_task(self._adapt_timer())
        log.info("all %d block servers are up", len(self.clients))

    def _mismatch(self, j: int, info: dict[str, Any]) -> str | None:
        """Why server j cannot serve the plan in force: another span, or an arena smaller than its
        reservation (a larger arena is fine: its admission limit is set to the reservation)."""
        want = (*self.hosted[j], self.block_slots[j])
        got = (info.get("first_block"), info.get("num_blocks"), info.get("num_block_slots"))
        if got[:2] != want[:2] or not isinstance(got[2], int) or got[2] < want[2]:
            return (
                f"block server {self.names[j]} hosts blocks from {got[0]}, {got[1]} blocks, {got[2]} block-slots; "
                f"the plan says {want}"
            )
        return None

    async def _join(self, j: int, info: dict[str, Any]) -> None:
        """Take server j's arena from its own answer and set its admission limit to the plan's."""
        self.arena_slots[j] = info["num_block_slots"]
        self.server_limits[j] = info.get("slot_limit", info["num_block_slots"])
        if self.server_limits[j] != self.block_slots[j]:
            async with self._limits_lock:
                await self._set_limit(j, self.block_slots[j])

    async def _watch_health(self) -> None:
        """Heartbeats: every ``heartbeat_s`` each server must answer ``info`` within the deadline."""
        while True:
            await asyncio.sleep(self.heartbeat_s)
            was_alive = dict(self.alive)  # a verdict reached during the round (a process exit) stands
            clients = [(j, c) for j, c in self.clients.items() if j not in self._out]
            results = await asyncio.gather(*(self._beat(j, c) for j, c in clients))
            for (j, client), info in zip(clients, results, strict=True):
                if j in self._out or self.clients.get(j) is not client:  # restarted meanwhile
                    continue
                if info is None and self.alive[j]:
                    self._server_failed(j, f"no heartbeat within {self.heartbeat_deadline_s:g} s")
                elif info is not None and not self.alive[j] and not was_alive.get(j, True):
                    mismatch = self._mismatch(j, info)
                    if mismatch:
                        log.error("block server %s answers but cannot rejoin: %s", self.names[j], mismatch)
                        continue
                    try:
                        await self._join(j, info)
                    except ServerFailed:
                        continue
                    self._server_back(j)

    async def _beat(self, j: int, client: ServerClient) -> dict[str, Any] | None:
        try:
            return await client.info(timeout_s=self.heartbeat_deadline_s)
        except ServerFailed:
            return None

    async def close(self) -> None:
        """Cancel every job and stop watching the servers."""
        for run in list(self.runs.values()):
            self.cancel(run.job.job_id)
        for task in (self._health, self._adapting, self._replacing, *self._lowering.values()):
            if task is not None:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)


def _ignore_result(future: asyncio.Future) -> None:
    if not future.cancelled():
        future.exception()
