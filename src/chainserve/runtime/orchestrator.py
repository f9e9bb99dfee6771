"""The central orchestrator (paper §4.2): the dispatcher the simulator uses, driving real jobs.

Every request becomes a :class:`~chainserve.dispatch.base.Job` submitted to the method's dispatcher
(JFFC for the proposed method; PETALS' or WS-RR's path router for the baselines). The dispatcher's
*starts* say which route a job runs on; the orchestrator then is the job's client, as PETALS' client
is and as τ^c models it: it embeds the prompt, sends the hidden states through the route's block
servers hop by hop (prefill, then one decode step per token), applies the LM head, samples, and
streams tokens back. When the job ends its sessions close and ``complete`` frees its slot, whose
starts run next. A refused admission (a server without free block-slots) ``abort``s the start: the
job goes back to the head of the queue and retries after a short backoff; a client that leaves
``cancel``s its job. The clock and the block-server clients are injected, so tests run the same code
on a virtual clock with a fake transport.
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
from chainserve.runtime.requests import Finished, Overloaded, RequestTimes, SamplingParams, TokenEvent
from chainserve.runtime.sampling import Sampler, TextStream

log = logging.getLogger("chainserve.orchestrator")


class ServerClient(Protocol):
    """What the orchestrator needs of a block-server connection (:class:`~.client.BlockClient`)."""

    name: str

    async def forward(self, session: str, first_block: int, position: int, hidden: WireTensor, *,
                      open: bool = False, close: bool = False) -> WireTensor: ...

    def close_session(self, session: str) -> asyncio.Future: ...

    async def info(self, timeout_s: float = 10.0) -> dict[str, Any]: ...


class RequestFailed(RuntimeError):
    """A request could not be served (a block server failed); streamed to the client as an error."""


@dataclass(slots=True, eq=False)
class JobRun:
    """A request in the system: its job, prompt, sampling, event queue and current attempt."""

    job: Job
    prompt: list[int]
    params: SamplingParams
    times: RequestTimes
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    task: asyncio.Task | None = None
    route: Route | None = None
    attempt: int = 0
    num_refusals: int = 0
    done: bool = False


@dataclass(frozen=True, slots=True)
class StartRecord:
    """One start the dispatcher decided: time, job, attempt, chain (``None`` for a path) and servers."""

    at: float
    job_id: int
    attempt: int
    chain: int | None
    servers: tuple[int, ...]


class Orchestrator:
    """See the module docstring. ``clients[j]`` talks to the block server of problem server j;
    ``max_waiting`` bounds the central queue (``None``: unbounded)."""

    def __init__(self, layout: Layout, dispatcher: Dispatcher, head: ModelHead,
                 clients: Mapping[int, ServerClient], *, metrics: RuntimeMetrics | None = None,
                 clock: Callable[[], float] = time.monotonic, max_waiting: int | None = None,
                 retry_backoff_s: float = 0.05, method: str = "proposed"):
        self.layout = layout
        self.dispatcher = dispatcher
        self.head = head
        self.clients = dict(clients)
        self.metrics = metrics or RuntimeMetrics()
        self.clock = clock
        self.max_waiting = max_waiting
        self.retry_backoff_s = retry_backoff_s
        self.method = method
        self.model_id = head.model_id
        self.max_tokens = head.max_tokens
        self.names = [s.name for s in layout.problem.servers]
        self.block_slots = reserved_block_jobs(layout)
        self.used_slots = dict.fromkeys(self.block_slots, 0)
        self.alive = dict.fromkeys(self.block_slots, True)
        self.runs: dict[int, JobRun] = {}
        self.starts: deque[StartRecord] = deque(maxlen=100_000)
        state = getattr(dispatcher, "state", None)
        #: most jobs each chain ever held at once (a check that no chain exceeds c_k)
        self.peak_busy = [0] * (len(state.chains) if state is not None else 0)
        self._ids = itertools.count()
        self._health: asyncio.Task | None = None
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
            raise ValueError(f"max_tokens: prompt ({len(prompt_ids)}) + max_tokens ({params.max_tokens}) exceeds "
                             f"the {self.max_tokens} tokens a job's cache holds")
        if self.max_waiting is not None and self.dispatcher.num_waiting >= self.max_waiting:
            self.metrics.observe_failure("rejected")
            raise Overloaded(f"{self.dispatcher.num_waiting} requests are waiting (the bound is {self.max_waiting})")
        now = self.clock()
        job = Job(next(self._ids), now, len(prompt_ids), params.max_tokens)
        run = JobRun(job, list(prompt_ids), params, RequestTimes(now))
        self.runs[job.job_id] = run
        self._apply(self.dispatcher.submit(job, now))
        return self._stream(run)

    async def _stream(self, run: JobRun) -> AsyncIterator[TokenEvent | Finished]:
        try:
            while True:
                event = await run.events.get()
                if isinstance(event, Exception):
                    raise event
                yield event
                if isinstance(event, Finished):
                    return
        finally:
            if not run.done:
                self.cancel(run.job.job_id)

    def cancel(self, job_id: int) -> None:
        """The client left: stop the job wherever it is and free its place."""
        run = self.runs.get(job_id)
        if run is None or run.done:
            return
        self._end(run)
        if run.task is not None:
            run.task.cancel()
        self.metrics.observe_failure("cancelled")
        log.info("job %d cancelled", job_id)
        self._apply(self.dispatcher.cancel(job_id, self.clock()))

    # ---- dispatcher decisions -----------------------------------------------------------------
    def _apply(self, starts: Sequence[Start]) -> None:
        now = self.clock()
        for start in starts:
            run = self.runs[start.job.job_id]
            run.attempt, run.route = start.attempt, start.route
            if run.times.started_at is None:
                run.times.started_at = now
            for hop in start.route.hops:
                self.used_slots[hop.server] += hop.num_blocks
            self.starts.append(StartRecord(now, start.job.job_id, start.attempt, start.route.chain,
                                           tuple(h.server for h in start.route.hops)))
            run.task = asyncio.get_running_loop().create_task(self._serve(run, start))
        state = getattr(self.dispatcher, "state", None)
        if state is not None:
            self.peak_busy = [max(p, b) for p, b in zip(self.peak_busy, state.busy, strict=True)]
        self._update_gauges()

    def _release(self, run: JobRun) -> None:
        """The job's route no longer holds cache (its slot is about to be freed in the dispatcher)."""
        if run.route is not None:
            for hop in run.route.hops:
                self.used_slots[hop.server] -= hop.num_blocks
            run.route = None

    def _end(self, run: JobRun) -> None:
        run.done = True
        self._release(run)
        self.runs.pop(run.job.job_id, None)

    async def _serve(self, run: JobRun, start: Start) -> None:
        job_id, route, attempt = start.job.job_id, start.route, start.attempt
        session = f"j{job_id}a{attempt}"
        opened: list[ServerClient] = []
        try:
            if run.num_refusals:
                await asyncio.sleep(min(self.retry_backoff_s * 2 ** (run.num_refusals - 1), 1.0))
            finished = await self._run_route(run, route, session, opened)
        except ServerRefused as exc:
            self._close_sessions(opened, session)
            run.num_refusals += 1
            log.info("job %d attempt %d refused (%s); back to the head of the queue", job_id, attempt, exc)
            self._release(run)
            self._apply(self.dispatcher.abort(job_id, self.clock()))
            return
        except asyncio.CancelledError:
            self._close_sessions(opened, session)
            raise
        except (ServerFailed, ValueError) as exc:
            self._close_sessions(opened, session)
            log.error("job %d failed on attempt %d: %s", job_id, attempt, exc)
            self._end(run)
            self.metrics.observe_failure("error")
            run.events.put_nowait(RequestFailed(str(exc)))
            self._apply(self.dispatcher.cancel(job_id, self.clock()))
            return
        self._close_sessions(opened, session)
        self._end(run)
        log.info("job %d done: chain %s, %d tokens, %.3f s", job_id, finished.chain, finished.completion_tokens,
                 finished.e2e_s)
        tpot = ((finished.e2e_s - finished.ttft_s) / (finished.completion_tokens - 1)
                if finished.completion_tokens > 1 else None)
        self.metrics.observe_finished(finished, tpot)
        self._apply(self.dispatcher.complete(job_id, self.clock(), attempt))
        run.events.put_nowait(finished)

    def _close_sessions(self, opened: list[ServerClient], session: str) -> None:
        """Send the closes now (they reach each server before any later open); acks are not awaited."""
        for client in opened:
            client.close_session(session).add_done_callback(_ignore_result)
        opened.clear()

    async def _run_route(self, run: JobRun, route: Route, session: str, opened: list[ServerClient]) -> Finished:
        """Prefill, then decode token by token through ``route``'s hops; push a TokenEvent per token."""
        params, head = run.params, self.head
        hops = [(hop.start_block, self.clients[hop.server]) for hop in route.hops]
        sampler, stream = Sampler(params), TextStream(head.decode, params.stop)
        hidden, position, reason, generated = head.embed(run.prompt), 0, "length", []
        for n in range(1, params.max_tokens + 1):
            last = n == params.max_tokens
            for first_block, client in hops:
                is_open = position == 0
                hidden = await client.forward(session, first_block, position, hidden, open=is_open, close=last)
                if is_open:
                    opened.append(client)
            if last:
                opened.clear()  # the servers closed the session after this step
            position += hidden.shape[1]
            token = sampler(head.logits(hidden))
            generated.append(token)
            now = self.clock()
            if run.times.first_token_at is None:
                run.times.first_token_at = now
            if token in head.eos_token_ids and not params.ignore_eos:
                run.events.put_nowait(TokenEvent(token, stream.finish()))
                reason = "stop"
                break
            text = stream.push(token)
            if stream.stopped:
                run.events.put_nowait(TokenEvent(token, text))
                reason = "stop"
                break
            run.events.put_nowait(TokenEvent(token, text + (stream.finish() if last else "")))
            if not last:
                hidden = head.embed([token])
        times, now = run.times, self.clock()
        return Finished(reason, len(run.prompt), n, stream.text, route.chain,
                        tuple((self.names[h.server], h.start_block, h.end_block) for h in route.hops),
                        times.started_at - times.arrived_at, times.first_token_at - times.arrived_at,
                        now - times.arrived_at, run.num_refusals + 1, tuple(generated))

    # ---- state for /plan, /status, /metrics ---------------------------------------------------
    def plan_dict(self) -> dict[str, Any]:
        data = layout_to_dict(self.layout)
        data["method"] = self.method
        return data

    def status(self) -> dict[str, Any]:
        state = getattr(self.dispatcher, "state", None)
        chains = [] if state is None else [
            {"chain": k, "servers": [self.names[j] for j in ch.servers], "busy": state.busy[k],
             "capacity": state.capacity[k], "peak_busy": self.peak_busy[k], "alive": state.alive[k]}
            for k, ch in enumerate(state.chains)]
        return {"healthy": all(self.alive.values()), "model": self.model_id, "method": self.method,
                "num_running": self.dispatcher.num_in_service, "num_waiting": self.dispatcher.num_waiting,
                "chains": chains,
                "servers": [{"name": self.names[j], "endpoint": getattr(self.clients.get(j), "endpoint", None),
                             "alive": self.alive[j], "used_block_slots": self.used_slots[j],
                             "block_slots": self.block_slots[j]} for j in self.block_slots]}

    def _update_gauges(self) -> None:
        m = self.metrics
        m.set_queue(self.dispatcher.num_in_service, self.dispatcher.num_waiting)
        for j, total in self.block_slots.items():
            m.set_kv_usage(self.names[j], self.used_slots[j], total)
        state = getattr(self.dispatcher, "state", None)
        if state is not None:
            for k in range(len(state.chains)):
                m.set_chain(k, state.busy[k], state.capacity[k])

    # ---- lifecycle ----------------------------------------------------------------------------
    async def connect(self, timeout_s: float = 120.0) -> None:
        """Wait until every block server answers and hosts what the layout says it should."""
        deadline = self.clock() + timeout_s
        for j, client in self.clients.items():
            while True:
                try:
                    info = await client.info(timeout_s=2.0)
                    break
                except ServerFailed as exc:
                    if self.clock() > deadline:
                        raise RuntimeError(f"block server {self.names[j]} did not answer within "
                                           f"{timeout_s:g} s") from exc
            span = self.layout.placement.span_of(j)
            want = (span.start_block, span.num_blocks, self.block_slots[j])
            got = (info.get("first_block"), info.get("num_blocks"), info.get("num_block_slots"))
            if got != want:
                raise RuntimeError(f"block server {self.names[j]} hosts blocks from {got[0]}, {got[1]} blocks, "
                                   f"{got[2]} block-slots; the plan says {want}")
        self._health = asyncio.get_running_loop().create_task(self._watch_health())
        log.info("all %d block servers are up", len(self.clients))

    async def _watch_health(self, period_s: float = 2.0) -> None:
        while True:
            await asyncio.sleep(period_s)
            for j, client in self.clients.items():
                try:
                    await client.info(timeout_s=max(period_s, 5.0))
                    ok = True
                except ServerFailed:
                    ok = False
                if ok != self.alive[j]:
                    log.warning("block server %s is %s", self.names[j], "back" if ok else "not answering")
                self.alive[j] = ok

    async def close(self) -> None:
        """Cancel every job and stop watching the servers."""
        for run in list(self.runs.values()):
            self.cancel(run.job.job_id)
        if self._health is not None:
            self._health.cancel()
            await asyncio.gather(self._health, return_exceptions=True)


def _ignore_result(future: asyncio.Future) -> None:
    if not future.cancelled():
        future.exception()
