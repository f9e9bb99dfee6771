"""The central orchestrator (paper §4.2): the dispatcher the simulator uses, driving real jobs.

Every request becomes a :class:`~chainserve.dispatch.base.Job` submitted to the method's dispatcher
(JFFC for the proposed method; PETALS' or WS-RR's path router for the baselines). The dispatcher's
*starts* say which route a job runs on; the orchestrator then is the job's client
(:func:`~.jobs.run_route`). When the job ends its sessions close and ``complete`` frees its slot,
whose starts run next. A refused admission (a server without free block-slots) ``abort``s the start:
the job goes back to the head of the queue and retries after a short backoff; a client that leaves
``cancel``s its job; the central queue is bounded (``max_waiting``; past it, :class:`Overloaded`).

Its state has two owners: the block servers (:class:`~.servers.ServerTable`: spans, arenas, limits,
held block-slots, liveness, connections) and the plans being served (:class:`~.generations.Generations`:
the dispatcher in force and retired ones whose jobs still run). Plan changes are a collaborator built
from both (:class:`~.plan_changes.PlanChanger`).

Failures (beyond the paper, which plans once): a block server that misses its heartbeats, exits, or
fails on the data path is marked dead and ``fail_server`` re-queues the jobs of its chains; the
chains are recomposed without it, or the model is placed anew on the survivors. An aborted job
resumes on its new chain by replaying its prompt and the tokens generated so far as one prefill, so
the client's stream goes on where it stopped (the same tokens under greedy decoding, the same
sampler state otherwise). A server that answers again rejoins the same way. Given ``restart`` (the
launcher's), a dead server it started is started again (:mod:`.supervision`, issue 33) and rejoins.

While no complete chain of live servers exists (issue 33), a new request gets
:class:`~.requests.Unavailable` (HTTP 503 with ``Retry-After``) at once, and the waiting ones (those a
failure sent back to the queue included) get it once ``unavailable_wait_s`` has passed without a chain:
no request waits silently for a chain that may never come back.

The clock and the block-server clients are injected, so tests run the same code on a virtual clock
with a fake transport.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from typing import Any

from chainserve.dispatch.base import Dispatcher, Job, Start
from chainserve.dispatch.generations import Generation, Generations
from chainserve.plan.plan_file import layout_to_dict
from chainserve.plan.types import Layout, chain_number, default_max_waiting, reserved_block_jobs
from chainserve.runtime.backends.base import ModelHead
from chainserve.runtime.client import ServerFailed, ServerRefused
from chainserve.runtime.constraints import Grammars
from chainserve.runtime.jobs import BatchedHead, JobRun, JobStream, StartRecord, run_route
from chainserve.runtime.metrics import RuntimeMetrics
from chainserve.runtime.plan_changes import Controller, PlanChanger, PlanOps
from chainserve.runtime.requests import (
    Finished,
    Overloaded,
    RequestFailed,
    RequestTimes,
    SamplingParams,
    TokenEvent,
    Unavailable,
)
from chainserve.runtime.sampling import Sampler, TextStream
from chainserve.runtime.servers import DEAD_CODES, ServerClient, ServerRecord, ServerTable
from chainserve.runtime.supervision import RestartPolicy, Supervisor
from chainserve.runtime.tools import Tool

log = logging.getLogger("chainserve.orchestrator")


class Orchestrator:
    """See the module docstring. ``clients[j]`` talks to the block server of problem server j;
    ``max_waiting`` bounds the central queue (``None``: unbounded; with ``max_waiting_follows_plan``
    4 × C of the plan in force); ``request_timeout_s`` ends a request that has not finished in that
    time; ``plan_ops`` lets failures recompose chains and place the model anew; ``controller`` adapts
    the plan to load, asked every ``adapt_interval_s`` and after each arrival; ``epoch`` (shown at
    ``/plan``) is what its block-server clients stamp their messages with (:mod:`.protocol`);
    ``restart(name)`` starts a dead block server again (its new connection), under ``restart_policy``;
    ``unavailable_wait_s`` bounds how long requests wait while no chain can serve."""

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
        epoch: int | None = None,
        restart: Callable[[str], Awaitable[ServerClient]] | None = None,
        restart_policy: RestartPolicy | None = None,
        unavailable_wait_s: float = 30.0,
    ):
        self.head, self.clock, self.method, self.epoch = head, clock, method, epoch
        self.metrics = metrics or RuntimeMetrics()
        self.max_waiting, self.max_waiting_follows_plan = max_waiting, max_waiting_follows_plan
        self.retry_backoff_s, self.request_timeout_s = retry_backoff_s, request_timeout_s
        self.controller, self.adapt_interval_s, self.heartbeat_s = controller, adapt_interval_s, heartbeat_s
        self.model_id, self.max_tokens, self.vocab_size = head.model_id, head.max_tokens, head.vocab_size
        self.batched_head = BatchedHead(head)
        self.grammars = Grammars(head.tokenizer, head.eos_token_ids)
        limits = reserved_block_jobs(layout)
        spans = {s.server: (s.start_block, s.num_blocks) for s in layout.placement.spans}
        names = [s.name for s in layout.problem.servers]
        records = (
            ServerRecord(j, names[j], spans.get(j), limits.get(j, 0), limits.get(j, 0), client)
            for j, client in clients.items()
        )
        self.servers = ServerTable(records, self.metrics, heartbeat_deadline_s)
        self.generations = Generations(layout, dispatcher)
        self.changer = PlanChanger(self.servers, self.generations, self, plan_ops, self.metrics, clock)
        self.supervisor = None
        if restart is not None:
            self.supervisor = Supervisor(
                self.servers, restart, restart_policy or RestartPolicy(), self.metrics, clock,
                lambda j: self._server_back(j, "server_restarted"), self._restart_given_up,
            )  # fmt: skip
        self.unavailable_wait_s = unavailable_wait_s
        self.unavailable_since: float | None = None  # no complete chain of live servers since then
        self.runs: dict[int, JobRun] = {}
        self.starts: deque[StartRecord] = deque(maxlen=100_000)
        self._ids, self._serials = itertools.count(), itertools.count()
        self._t0 = clock()
        self._tasks: list[asyncio.Task] = []  # heartbeats, the adaptation timer
        self._update_gauges()

    @property
    def layout(self) -> Layout:
        """The plan in force (the current generation's)."""
        return self.generations.current.layout

    @property
    def dispatcher(self) -> Dispatcher:
        return self.generations.current.dispatcher

    @property
    def placed(self) -> Layout:
        return self.changer.placed

    # ---- the API side -------------------------------------------------------------------------
    def encode(self, text: str) -> list[int]:
        return self.head.encode(text)

    def decode(self, token_ids: Sequence[int]) -> str:
        return self.head.decode(token_ids)

    def chat_prompt(self, messages: Sequence[dict[str, Any]], tools: tuple[Tool, ...] = ()) -> list[int]:
        return self.head.chat_prompt(messages, tools)

    def generate(self, prompt_ids: Sequence[int], params: SamplingParams) -> AsyncIterator[TokenEvent | Finished]:
        """Queue the request now (raises :class:`Overloaded` when the queue is full) and return the
        stream of its events; closing the stream early (even before its first event) cancels the job."""
        if not prompt_ids:
            raise ValueError("prompt: must not be empty")
        if len(prompt_ids) + params.max_tokens > self.max_tokens:
            raise ValueError(
                f"max_tokens: prompt ({len(prompt_ids)}) + max_tokens ({params.max_tokens}) exceeds "
                f"the served context of {self.max_tokens} tokens"
            )
        self._check_fits(len(prompt_ids), params.max_tokens)
        if not self.is_serving:
            self.metrics.observe_failure("unavailable")
            raise Unavailable(f"no chain of live block servers can serve now ({self._unavailable_detail()})",
                              self._unavailable_retry_s())  # fmt: skip
        constraint = None if params.grammar is None else self.grammars.constraint(params.grammar)
        waiting = self.num_waiting
        if self.max_waiting is not None and waiting >= self.max_waiting:
            self.metrics.observe_failure("rejected")
            raise Overloaded(
                f"{waiting} requests are waiting (the bound is {self.max_waiting})", self._retry_after_s(waiting)
            )
        now = self.clock()
        job = Job(next(self._ids), now, len(prompt_ids), max(params.max_tokens, 1))
        gen = self.generations.current
        stream = TextStream(self.head.decode, params.stop)
        sampler = Sampler(params, prompt_ids, self.head.eos_token_ids, constraint)
        run = JobRun(job, list(prompt_ids), params, RequestTimes(now), sampler, stream, gen)
        self.runs[job.job_id] = run
        self.apply(gen.dispatcher.submit(job, now), gen)
        if self.controller is not None:
            self.controller.observe(now - self._t0, len(prompt_ids), params.max_tokens)
            self._maybe_adapt()
        return JobStream(run, self.cancel, self.clock, self.request_timeout_s)

    @property
    def num_waiting(self) -> int:
        return self.generations.num_waiting

    @property
    def num_running(self) -> int:
        return self.generations.num_running

    @property
    def is_serving(self) -> bool:
        """A chain of the plan in force (a covering path, for PETALS / WS-RR) has every server alive: a
        job can run now, or as soon as a plan change in progress admits it (a server it reloads counts)."""
        if self.dispatcher.state is None:
            return self.servers.cover(self.layout.problem.model.num_blocks)
        alive = {r.index for r in self.servers if r.is_alive}
        return any(ch.capacity > 0 and alive.issuperset(ch.servers) for ch in self.layout.chains)

    def _unavailable_detail(self) -> str:
        dead = [r.name for r in self.servers if not r.is_alive]
        restarting = [r.name for r in self.servers if r.is_restarting]
        text = f"dead: {', '.join(dead) or 'none'}"
        return text + (f"; restarting: {', '.join(restarting)}" if restarting else "")

    def _unavailable_retry_s(self) -> float:
        """When to ask again: the chain may be back any moment (a restart takes seconds), at most when
        the waiting requests' bound ends."""
        since = self.unavailable_since if self.unavailable_since is not None else self.clock()
        return max(1.0, min(5.0, since + self.unavailable_wait_s - self.clock()))

    def _retry_after_s(self, waiting: int) -> float:
        """About how long the queue ahead takes to clear at the plan's rate ν (1 s when unknown)."""
        rate = sum(ch.capacity * ch.rate_per_s for ch in self.layout.chains)
        return max(1.0, waiting / rate) if rate > 0 else 1.0

    def cancel(self, job_id: int, reason: str = "cancelled") -> None:
        """The client left (or its time ran out): stop the job wherever it is and free its place."""
        run = self.runs.get(job_id)
        if run is None or run.done:
            return
        gen = run.gen
        self._end(run)
        if run.task is not None:
            run.task.cancel()
        self.metrics.observe_failure(reason)
        log.info("job %d %s", job_id, reason)
        self.apply(gen.dispatcher.cancel(job_id, self.clock()), gen)

    # ---- dispatcher decisions (the JobHost of plan changes) -----------------------------------
    def apply(self, starts: Sequence[Start], gen: Generation) -> None:
        """Run the starts ``gen``'s dispatcher made: each job's attempt becomes a task."""
        now = self.clock()
        for start in starts:
            run = self.runs[start.job.job_id]
            run.gen, run.start = gen, start
            if run.times.started_at is None:
                run.times.started_at = now
            gen.started(start)
            route = start.route
            self.starts.append(StartRecord(now, start.job.job_id, start.attempt, route.chain, route.servers))
            run.task = asyncio.get_running_loop().create_task(self._serve(run, start))
        self.generations.current.note_peaks()
        self._update_gauges()

    def move(self, jobs: Sequence[Job]) -> None:
        """Waiting jobs of another generation join the current one's queue (in this order)."""
        gen = self.generations.current
        for job in jobs:
            self.runs[job.job_id].gen = gen
            self.apply(gen.dispatcher.submit(job, self.clock()), gen)

    def plan_changed(self) -> None:
        if self.max_waiting_follows_plan:
            self.max_waiting = default_max_waiting(self.layout)
        self._update_gauges()

    def _release(self, run: JobRun) -> None:
        """The job's route no longer holds cache (its slot is being freed in the dispatcher)."""
        if run.start is not None:
            run.gen.ended(run.start)
            run.start = None
        self.servers.release(run.held)
        run.held = ()
        self.servers.wake()

    @property
    def max_job_tokens(self) -> int:
        """The most tokens (prompt + output) one job may reserve: the served context, within the
        largest live chain's cache when the KV is paged (issue 30)."""
        longest = getattr(self.dispatcher.state, "max_job_tokens", None)
        return min(self.max_tokens, longest) if longest else self.max_tokens

    def _check_fits(self, prompt_tokens: int, max_tokens: int) -> None:
        """A 400 (``ValueError``) now for a job no chain (or path) of the plan could ever hold: its KV
        pages exceed every chain's cache (issue 30), rather than a wait until it times out."""
        dispatcher = self.dispatcher
        if dispatcher.fits(Job(-1, 0.0, prompt_tokens, max(max_tokens, 1))):
            return
        longest = getattr(dispatcher.state, "max_job_tokens", None)
        most = f" (at most {longest} tokens in all)" if longest else ""
        raise ValueError(
            f"max_tokens: prompt ({prompt_tokens}) + max_tokens ({max_tokens}) needs more KV cache than any "
            f"chain of the plan holds{most}"
        )

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
            reserve = run.job.prompt_tokens + run.job.output_tokens
            held = await self.servers.hold(route, reserve, lambda: run.gen is self.generations.current)
            if held is None:  # a retired plan's start does not wait for room: on to the current plan
                self._requeue(run)
                return
            run.held = held
            if run.generated:
                run.num_resumes += 1
                self.metrics.observe_resume()
                where = "a path" if route.chain is None else f"chain {chain_number(route.chain)}"
                log.info("job %d resumes on %s after %d tokens", job_id, where, len(run.generated))
            clients = {j: self.servers[j].client for j in route.servers}
            names = {j: self.servers[j].name for j in route.servers}
            finished = await run_route(
                run, route, session, self.batched_head, clients, names, opened, self.clock,
                self.metrics.observe_generated,
            )  # fmt: skip
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
            j = self.servers.index_of(exc.server)
            if exc.code in DEAD_CODES and j is not None:
                self._server_failed(j, str(exc))
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
        gen = run.gen
        self._end(run)
        log.info(
            "job %d done: chain %s, %d tokens, %.3f s", job_id, finished.chain, finished.completion_tokens,
            finished.e2e_s,
        )  # fmt: skip
        tpot = (
            (finished.e2e_s - finished.ttft_s) / (finished.completion_tokens - 1)
            if finished.completion_tokens > 1
            else None
        )
        self.metrics.observe_finished(finished, tpot)
        self.apply(gen.dispatcher.complete(job_id, self.clock(), attempt), gen)
        self.move(self.generations.retire_idle())
        run.events.put_nowait(finished)

    def _requeue(self, run: JobRun) -> None:
        """This start failed (refused, or its session was lost): the job goes back to the head of
        its dispatcher's queue, keeping what it generated; a retired generation's job moves to the
        current one (old chains only finish what they run)."""
        gen = run.gen
        self._release(run)
        if gen is self.generations.current:
            self.apply(gen.dispatcher.abort(run.job.job_id, self.clock()), gen)
            return
        self.apply(gen.dispatcher.cancel(run.job.job_id, self.clock()), gen)
        self.move([run.job])
        self.move(self.generations.retire_idle())

    def _fail_request(self, run: JobRun, message: str, error: RequestFailed | None = None) -> None:
        log.error("job %d failed: %s", run.job.job_id, message)
        gen = run.gen
        self._end(run)
        self.metrics.observe_failure("unavailable" if isinstance(error, Unavailable) else "error")
        run.events.put_nowait(error or RequestFailed(message))
        self.apply(gen.dispatcher.cancel(run.job.job_id, self.clock()), gen)

    def _close_sessions(self, opened: list[ServerClient], session: str) -> None:
        """Send the closes now (they reach each server before any later open); acks are not awaited."""
        for client in opened:
            try:
                client.close_session(session).add_done_callback(_ignore_result)
            except ServerFailed:
                pass  # a dead server frees nothing
        opened.clear()

    # ---- failures and rejoins -----------------------------------------------------------------
    def server_failed(self, name: str, reason: str) -> None:
        """A launcher saw the server's process exit (or an operator says it is gone)."""
        j = self.servers.index_of(name)
        if j is not None:
            self._server_failed(j, reason, exited=True)

    def _server_failed(self, j: int, reason: str, exited: bool = False) -> None:
        """Server j is gone (``exited``: its process ended, as its launcher saw)."""
        if not self.servers.mark_dead(j, reason):  # dead already, or being restarted by a plan change
            if exited and self.supervisor is not None and not self.servers[j].is_out:
                self.supervisor.server_died(j, exited)
            return
        if self.supervisor is not None:
            self.supervisor.server_died(j, exited)
        now, current = self.clock(), asyncio.current_task()
        for gen in list(self.generations):
            outcome = gen.dispatcher.fail_server(j, now)
            for job in outcome.aborted:
                run = self.runs[job.job_id]
                if run.task is not None and run.task is not current:
                    run.task.cancel()
                self._release(run)
            self.apply(outcome.starts, gen)
        self.changer.recompose("server_failed", f"{self.servers[j].name}: {reason}")

    def _server_back(self, j: int, reason: str = "server_back") -> None:
        now = self.clock()
        for gen in list(self.generations):
            self.apply(gen.dispatcher.restore_server(j, now), gen)
        self.changer.recompose(reason, self.servers[j].name)

    def _restart_given_up(self, j: int, reason: str) -> None:
        """The launcher could not start server j again: recompose without it (a new placement may follow)."""
        self.changer.recompose("restart_failed", f"{self.servers[j].name}: {reason}")

    # ---- bounded waiting while no chain can serve (issue 33) ----------------------------------
    async def _watch_availability(self, interval_s: float) -> None:
        """Note when the service stops (and starts again) being able to serve; once no chain has
        existed for ``unavailable_wait_s``, every waiting request gets a 503."""
        while True:
            await asyncio.sleep(interval_s)
            now = self.clock()
            if self.is_serving:
                if self.unavailable_since is not None:
                    log.warning("a complete chain serves again after %.1f s", now - self.unavailable_since)
                self.unavailable_since = None
                continue
            if self.unavailable_since is None:
                self.unavailable_since = now
                log.warning("no complete chain of live block servers (%s): requests wait at most %g s",
                            self._unavailable_detail(), self.unavailable_wait_s)  # fmt: skip
            elif now - self.unavailable_since >= self.unavailable_wait_s:
                self._fail_waiting()

    def _fail_waiting(self) -> None:
        waiting = [run for run in self.runs.values() if run.start is None]
        if not waiting:
            return
        message = f"no chain of live block servers for {self.unavailable_wait_s:g} s ({self._unavailable_detail()})"
        log.error("%d waiting requests get 503: %s", len(waiting), message)
        for run in waiting:
            self._fail_request(run, message, Unavailable(message, self._unavailable_retry_s()))

    # ---- adapting to load (issue 9) -----------------------------------------------------------
    def _maybe_adapt(self) -> None:
        """Ask the controller; execute the change it returns (one at a time, never while degraded)."""
        if self.controller is None or self.changer.is_busy or any(not r.is_alive for r in self.servers):
            return
        change = self.controller.decide(self.clock() - self._t0)
        if change is not None:
            self.changer.start(lambda: self.changer.execute(change, self.controller, self._t0))

    async def _adapt_timer(self) -> None:
        while True:
            await asyncio.sleep(self.adapt_interval_s)
            self._maybe_adapt()

    # ---- state for /plan, /status, /metrics ---------------------------------------------------
    def plan_dict(self) -> dict[str, Any]:
        data = layout_to_dict(self.layout)
        data["method"], data["epoch"] = self.method, self.epoch
        data["alive"] = {r.name: r.is_alive for r in self.servers}
        data["changes"] = list(self.changer.changes)
        return data

    def status(self) -> dict[str, Any]:
        """``healthy``: every block server answers; ``serving``: a complete chain (a covering path,
        for PETALS / WS-RR) of live servers can take a job now — what ``/health`` reports."""
        names = {r.index: r.name for r in self.servers}
        changes = self.changer.changes
        return {
            "healthy": all(r.is_alive for r in self.servers),
            "serving": self.is_serving,
            "dead": [r.name for r in self.servers if not r.is_alive],
            "model": self.model_id,
            "method": self.method,
            "num_running": self.num_running,
            "num_waiting": self.num_waiting,
            "plan_changed_at": changes[-1]["at"] if changes else None,
            "chains": self.generations.current.chain_rows(names),
            "servers": [
                {
                    "name": r.name,
                    "endpoint": getattr(r.client, "endpoint", None),
                    "alive": r.is_alive,
                    "restarting": r.is_restarting,
                    "restarts": self.supervisor.restarts.get(r.name, 0) if self.supervisor else 0,
                    "used_block_slots": self.generations.used_on(r.index),
                    "block_slots": r.limit,
                    "used_pages": r.held,
                    "pages": r.pages(r.limit),
                    "kv_cache_usage": min(r.held, r.pages(r.limit)) / max(r.pages(r.limit), 1),
                }
                for r in self.servers
            ],
            "latency": self.metrics.recent.summary(),
        }

    def _update_gauges(self) -> None:
        m = self.metrics
        m.set_queue(self.num_running, self.num_waiting)
        for r in self.servers:  # starts being refused may briefly count past the limit
            m.set_kv_usage(r.name, min(r.held, r.pages(r.limit)), r.pages(r.limit))
        state = self.dispatcher.state
        if state is not None:
            for k in range(len(state.chains)):
                m.set_chain(k, state.busy[k], state.capacity[k])

    # ---- lifecycle ----------------------------------------------------------------------------
    async def connect(self, timeout_s: float = 120.0) -> None:
        """Wait until every block server answers and hosts what the layout says it should, then
        watch their heartbeats."""
        limits = reserved_block_jobs(self.layout)
        await self.servers.connect(limits, timeout_s, self.clock)
        loop = asyncio.get_running_loop()
        watch = self.servers.watch(self.heartbeat_s, self._server_failed, self._server_back)
        self._tasks.append(loop.create_task(watch))
        self._tasks.append(loop.create_task(self._watch_availability(min(self.heartbeat_s, 0.25))))
        if self.controller is not None:
            self._tasks.append(loop.create_task(self._adapt_timer()))
        log.info("all %d block servers are up", len(self.servers.records))

    async def close(self) -> None:
        """Cancel every job and stop watching the servers."""
        for run in list(self.runs.values()):
            self.cancel(run.job.job_id)
        for task in (*self._tasks, self.changer.task):
            if task is not None:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
        if self.supervisor is not None:
            await self.supervisor.close()
        await self.servers.close()
        self.batched_head.close()


def _ignore_result(future: asyncio.Future) -> None:
    if not future.cancelled():
        future.exception()
