"""One request as the orchestrator runs it (paper §4.2, the client side of a chain, as PETALS' client is
and as τ^c models it): :class:`JobRun` is its state across attempts; :func:`run_route` serves one
attempt on one route — embed the prompt, send the hidden states through the route's block servers
hop by hop (prefill, then one decode step per token), apply the LM head, sample, stream tokens, which
the API reads from its :class:`JobStream`. Each job is its own coroutine; the batching is underneath
(issue 17): its steps leave with every other job's in one message per server
(:class:`~.client.BlockClient`), and its LM head runs in one batch with every job whose hidden state
came back at the same moment (:class:`BatchedHead`). With echo and logprobs (issue 20) the head also
runs over every prompt position of the prefill's output, in the same batch, and each token's
log-probability comes from the very logits its sampler was given.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np

from chainserve.dispatch.base import Job, Route, Start
from chainserve.dispatch.generations import Generation
from chainserve.plan.types import chain_number
from chainserve.runtime.backends.base import ModelHead, WireTensor
from chainserve.runtime.batching import Batcher
from chainserve.runtime.logprobs import prompt_logprobs, token_logprob
from chainserve.runtime.requests import (
    Finished,
    RequestFailed,
    RequestTimes,
    SamplingParams,
    TokenEvent,
    TokenLogprob,
)
from chainserve.runtime.sampling import Sampler, TextStream
from chainserve.runtime.servers import ServerClient


@dataclass(slots=True, eq=False)
class JobRun:
    """A request in the system: its job, prompt, decoding state (kept across attempts, so a resumed
    job continues its stream: tokens, their log-probabilities, the prompt's), event queue, the
    generation holding it, the start it runs and the block-slots that start holds (``ServerTable.hold``)."""

    job: Job
    prompt: list[int]
    params: SamplingParams
    times: RequestTimes
    sampler: Sampler
    stream: TextStream
    gen: Generation
    generated: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    prompt_logprobs: tuple[TokenLogprob | None, ...] | None = None
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    task: asyncio.Task | None = None
    start: Start | None = None
    held: tuple[tuple[int, int], ...] = ()
    num_refusals: int = 0
    num_resumes: int = 0
    done: bool = False


class JobStream:
    """The events of one job (:meth:`~.orchestrator.Orchestrator.generate`): a :class:`RequestFailed`
    (504) once ``timeout_s`` has passed since arrival; closing it, or cancelling its reader, before the
    end cancels the job (``cancel(job_id, reason)``; an iterator object, not a generator: a stream
    closed before its first read still cancels, which a request of n jobs refused at the k-th needs)."""

    def __init__(self, run: JobRun, cancel: Callable[[int, str], None], clock: Callable[[], float], timeout_s: float):
        self.run, self.cancel, self.clock, self.timeout_s, self.ended = run, cancel, clock, timeout_s, False

    def __aiter__(self) -> JobStream:
        return self

    async def __anext__(self) -> TokenEvent | Finished:
        if self.ended:
            raise StopAsyncIteration
        run = self.run
        deadline = run.times.arrived_at + self.timeout_s
        try:
            event = await asyncio.wait_for(run.events.get(), max(deadline - self.clock(), 0.0))
        except TimeoutError:
            self.ended = True
            self.cancel(run.job.job_id, "timeout")
            raise RequestFailed(f"the request did not finish within {self.timeout_s:g} s", 504) from None
        except asyncio.CancelledError:  # the reader was cancelled (client gone): so is the job
            await self.aclose()
            raise
        if isinstance(event, Exception):
            self.ended = True
            raise event
        self.ended = isinstance(event, Finished)
        return event

    async def aclose(self) -> None:
        self.ended = True
        if not self.run.done:
            self.cancel(self.run.job.job_id, "cancelled")


class BatchedHead:
    """``head`` as jobs use it: its LM head runs over every job whose last hidden state is ready in the
    same turn of the loop, one ``head.logits`` call (one matmul) per batch — in a worker thread when the
    head says it is long (``head.in_thread``: torch, which releases the GIL), so HTTP, heartbeats and
    dispatch keep answering while it computes."""

    def __init__(self, head: ModelHead):
        self.head, self.embed, self.eos_token_ids = head, head.embed, head.eos_token_ids
        self._worker = ThreadPoolExecutor(1, thread_name_prefix="head") if head.in_thread else None
        self._batcher: Batcher[tuple[WireTensor, int], np.ndarray] = Batcher(self._run)

    async def _run(self, items: list[tuple[WireTensor, int]]) -> list[np.ndarray]:
        hiddens, counts = [h for h, _ in items], [n for _, n in items]
        if self._worker is None:
            rows = self.head.logits(hiddens, counts)
        else:
            loop = asyncio.get_running_loop()
            rows = await loop.run_in_executor(self._worker, self.head.logits, hiddens, counts)
        return np.split(rows, np.cumsum(counts)[:-1])

    async def logits(self, hidden: WireTensor, all_positions: bool = False) -> np.ndarray:
        """Next-token logits (float32) after each of ``hidden``'s positions ([q, vocab]) with
        ``all_positions``, else after its last ([vocab])."""
        rows = await self._batcher.submit((hidden, hidden.shape[1] if all_positions else 1))
        return rows if all_positions else rows[0]

    def close(self) -> None:
        if self._worker is not None:
            self._worker.shutdown(wait=False, cancel_futures=True)


@dataclass(frozen=True, slots=True)
class StartRecord:
    """One start the dispatcher decided: time, job, attempt, chain index (0-based, the dispatcher's;
    ``None`` for a path) and servers."""

    at: float
    job_id: int
    attempt: int
    chain: int | None
    servers: tuple[int, ...]


async def run_route(
    run: JobRun,
    route: Route,
    session: str,
    head: BatchedHead,
    clients: Mapping[int, ServerClient],
    names: Mapping[int, str],
    opened: list[ServerClient],
    clock: Callable[[], float],
    on_token: Callable[[], None],
) -> Finished:
    """Prefill (the prompt, plus what was generated before a failure), then decode token by token
    through ``route``'s hops, the LM head after the last; push a :class:`TokenEvent` per new token.
    ``max_tokens`` 0 (echo): the prefill alone, for the prompt's log-probabilities. ``opened``
    collects the clients whose session is open (the caller closes them if this attempt ends early);
    ``on_token`` is called once per token generated, as it is."""
    params = run.params
    hops: Sequence[tuple[int, ServerClient]] = [(hop.start_block, clients[hop.server]) for hop in route.hops]
    hidden, position, reason = head.embed(run.prompt + run.generated), 0, "length"
    num_steps = max(params.max_tokens, 1)
    reserve = run.job.prompt_tokens + run.job.output_tokens  # the KV positions its sessions hold (issue 30)
    for n in range(len(run.generated) + 1, num_steps + 1):
        last = n == num_steps
        for first_block, client in hops:
            is_open = position == 0
            hidden = await client.forward(
                session, first_block, position, hidden, open=is_open, close=last, reserve=reserve
            )
            if is_open:
                opened.append(client)
        if last:
            opened.clear()  # the servers closed the session after this step
        position += hidden.shape[1]
        logits = await _next_logits(run, head, hidden)
        if params.max_tokens == 0:
            break
        token = run.sampler(logits, run.generated)
        run.generated.append(token)
        on_token()
        logprob = None if params.logprobs is None else token_logprob(logits, token, params.logprobs)
        if logprob is not None:
            run.logprobs.append(logprob)
        if run.times.first_token_at is None:
            run.times.first_token_at = clock()
        first = (run.prompt_logprobs or ()) if len(run.generated) == 1 else ()
        if token in head.eos_token_ids and not params.ignore_eos:
            run.events.put_nowait(TokenEvent(token, run.stream.finish(), logprob, first))
            reason = "stop"
            break
        text = run.stream.push(token)
        done = run.stream.stopped or run.sampler.is_done  # a stop string, or the grammar is complete
        run.events.put_nowait(TokenEvent(token, text + (run.stream.finish() if done or last else ""), logprob, first))
        if done:
            reason = "stop"
            break
        if not last:
            hidden = head.embed([token], position)
    times, now = run.times, clock()
    if times.first_token_at is None:  # echo alone: the prompt's scores are the first answer
        times.first_token_at = now
    return Finished(
        reason,
        len(run.prompt),
        len(run.generated),
        run.stream.text,
        None if route.chain is None else chain_number(route.chain),
        tuple((names[h.server], h.start_block, h.end_block) for h in route.hops),
        times.started_at - times.arrived_at,
        times.first_token_at - times.arrived_at,
        now - times.arrived_at,
        run.num_refusals + run.num_resumes + 1,
        tuple(run.generated),
        tuple(run.logprobs),
        run.prompt_logprobs or (),
    )


async def _next_logits(run: JobRun, head: BatchedHead, hidden: WireTensor) -> np.ndarray:
    """Logits after ``hidden``'s last position; on the first prefill of a request that asks for the
    prompt's log-probabilities, those of every position too (kept in ``run``)."""
    if not run.params.prompt_logprobs or run.prompt_logprobs is not None:
        return await head.logits(hidden)
    rows = await head.logits(hidden, all_positions=True)
    run.prompt_logprobs = prompt_logprobs(rows, run.prompt, run.params.logprobs or 0)
    return rows[-1]
