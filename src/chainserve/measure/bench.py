"""Benchmark any OpenAI-compatible server the way ``vllm bench serve`` does (issue 7; the paper's
live measurements, §4.2): replay timed requests, stream each answer, report the times.

Requests are sent open-loop at their ``at_s`` offsets (a trace replay, or Poisson arrivals), each as a
streamed ``POST /v1/completions`` with ``max_tokens`` = its output length and ``ignore_eos: true`` (a
vLLM extension chainserve honours), so every answer has the requested length. The prompt is a list of
``prompt_tokens`` token ids (OpenAI's completions API, vLLM, SGLang and chainserve all accept token-id
prompts), so the server sees exactly that many prompt tokens whatever its tokenizer: ids are drawn
per request from :data:`PROMPT_ID_RANGE`, ordinary tokens of every vocabulary we target (the emulated
model's words, Llama and SmolLM2 tokens), and differ between requests so no prefix cache shortens a
prefill. Definitions, per request (client clock):

* response (end-to-end) = last byte of the stream − send time; TTFT = first chunk with text − send
  time; TPOT = (response − TTFT) / (output tokens − 1), for ≥ 2 output tokens (vLLM's definitions);
* output tokens = the server's ``usage.completion_tokens`` (asked with ``stream_options``);
* waiting = the server's queue time, from its Prometheus histogram ``*:request_queue_time_seconds``
  (``chainserve:`` or ``vllm:``) scraped before and after the run (:mod:`.queue_metrics`): the mean is
  Δsum / Δcount, percentiles are interpolated inside its buckets; ``None`` when the server has no such
  histogram. It counts every request the server queued meanwhile, ours or not;
* throughput = completed requests / duration (scheduled start → last answer).

A request fails on a non-200 status, a connection error, an in-band error chunk, a stream without a
finish reason, or its ``timeout_s``; it is counted in ``failed`` and kept in ``results``, never dropped.
Failures are grouped by kind (``HTTP 400``, ``stream``, ``timeout``, ``ConnectError``, …), each with its
count and the first such request's message (for an HTTP error, the server's own ``error.message``).
"""

from __future__ import annotations

import asyncio
import json
import math
import time
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np
from rich.progress import Progress, TextColumn

from chainserve.analysis.records import Stats
from chainserve.measure.queue_metrics import queue_time_stats, scrape_queue_histogram
from chainserve.model.spec import SpecError
from chainserve.progress import progress_bar
from chainserve.sim.arrivals import read_azure_trace

#: Token ids of synthetic prompts: ordinary (non-special) tokens of every vocabulary we target (the
#: emulated model has 168 ids, tiny-random 384, SmolLM2 and Llama tens of thousands).
PROMPT_ID_RANGE = (20, 160)
BUNDLED_TRACE = "bundled"


@dataclass(frozen=True, slots=True)
class BenchRequest:
    """One request: sent ``at_s`` seconds after the start, with ``prompt_tokens`` synthetic prompt
    tokens (or the text ``prompt`` when given) and ``output_tokens`` tokens to generate."""

    at_s: float
    prompt_tokens: int
    output_tokens: int
    prompt: str | None = None


@dataclass(frozen=True, slots=True)
class RequestResult:
    """One request's outcome; times in seconds on the client's clock (``None`` when it failed).

    ``status``: HTTP status (0 when no response came); ``text``: the streamed text; ``route``: the
    server's own per-request fields when it returns them (chainserve: chain, hops, ``queued_s``,
    ``ttft_s``, ``e2e_s``, ``num_attempts``, ``token_ids``); ``elapsed_s``: send → end or failure."""

    index: int
    sent_at_s: float
    ttft_s: float | None
    e2e_s: float | None
    output_tokens: int
    error: str | None
    tpot_s: float | None = None
    status: int = 0
    text: str = ""
    finish_reason: str | None = None
    route: Mapping[str, Any] | None = None
    elapsed_s: float = 0.0

    @property
    def ok(self) -> bool:
        return self.error is None

    @property
    def num_attempts(self) -> int:
        """Chains the server ran it on (> 1: resumed after a server failure)."""
        return int((self.route or {}).get("num_attempts", 1))


@dataclass(frozen=True, slots=True)
class FailureKind:
    """The failed requests of one kind: ``count`` and ``first_message``, the first one's (in request order)
    message without its kind, e.g. the server's reason for an ``HTTP 400``."""

    count: int
    first_message: str

    def to_json(self) -> dict[str, Any]:
        return {"count": self.count, "first_message": self.first_message}


def failure_kinds(errors: Sequence[str]) -> dict[str, FailureKind]:
    """Errors (``"KIND: message"``, in request order) grouped by kind.

    >>> kinds = failure_kinds(["HTTP 400: max_tokens: too many", "timeout: 1 s", "HTTP 400: prompt: empty"])
    >>> kinds["HTTP 400"], kinds["timeout"].count
    (FailureKind(count=2, first_message='max_tokens: too many'), 1)
    """
    counts = Counter(error.split(":")[0] for error in errors)
    firsts: dict[str, str] = {}
    for error in errors:
        kind, _, message = error.partition(":")
        firsts.setdefault(kind, message.strip())
    return {kind: FailureKind(counts[kind], firsts[kind]) for kind in counts}


@dataclass(frozen=True, slots=True)
class BenchReport:
    """A run: counts, ``duration_s``, ``throughput`` (completed/s), ``output_throughput`` (tokens/s),
    stats of response, server-side waiting, TTFT and TPOT (``None`` when nothing to measure), results;
    ``has_queue_histogram``: the server exports a ``*:request_queue_time_seconds`` histogram."""

    requests: int
    completed: int
    failed: int
    duration_s: float
    throughput: float
    output_throughput: float
    response: Stats | None
    waiting: Stats | None
    ttft: Stats | None
    tpot: Stats | None
    results: tuple[RequestResult, ...]
    has_queue_histogram: bool = False

    @property
    def errors(self) -> dict[str, FailureKind]:
        """Failed requests by kind (``HTTP 429``, ``timeout``, ``ConnectError``, …): count and first message."""
        return failure_kinds([r.error for r in self.results if r.error is not None])

    def to_json(self) -> dict[str, Any]:
        def stats(s: Stats | None) -> dict[str, float] | None:
            return None if s is None else s.to_json()

        return {
            "requests": self.requests,
            "completed": self.completed,
            "failed": self.failed,
            "duration_s": self.duration_s,
            "throughput": self.throughput,
            "output_throughput": self.output_throughput,
            "response": stats(self.response),
            "waiting": stats(self.waiting),
            "ttft": stats(self.ttft),
            "tpot": stats(self.tpot),
            "errors": {kind: failure.to_json() for kind, failure in self.errors.items()},
        }


# --- requests ------------------------------------------------------------------------------------------


def trace_requests(
    path: str | Path | None, *, time_scale: float = 1.0, num_requests: int | None = None, start: int = 0
) -> list[BenchRequest]:
    """Rows ``start ..`` of an Azure-format trace (``None`` / ``"bundled"``: the shipped code trace),
    times shifted to start at 0 and multiplied by ``time_scale``; ``num_requests`` rows (``None``: all).

    >>> [(round(r.at_s, 3), r.prompt_tokens, r.output_tokens) for r in trace_requests(None, num_requests=2)]
    [(0.0, 4808, 10), (0.052, 3180, 8)]
    """
    if not (math.isfinite(time_scale) and time_scale > 0):
        raise SpecError("time-scale", f"must be a positive number, got {time_scale!r}")
    trace = read_azure_trace(None if path in (None, BUNDLED_TRACE) else path)
    end = len(trace) if num_requests is None else start + num_requests
    if not 0 <= start < len(trace) or (num_requests is not None and num_requests < 1) or end > len(trace):
        raise SpecError("requests", f"rows {start}..{end - 1} do not fit the trace's {len(trace)} rows")
    times = trace.times_s[start:end]
    rows = zip(
        (times - times[0]) * time_scale, trace.prompt_tokens[start:end], trace.output_tokens[start:end], strict=True
    )
    return [BenchRequest(float(t), int(p), int(o)) for t, p, o in rows]


def rate_requests(
    rate_per_s: float, num_requests: int, prompt_tokens: int, output_tokens: int, seed: int = 0
) -> list[BenchRequest]:
    """Poisson arrivals of rate ``rate_per_s`` (``inf``: all at once), every request the same lengths.

    >>> rs = rate_requests(4.0, 20_000, 8, 4)
    >>> round(len(rs) / rs[-1].at_s, 1), rs[0].prompt_tokens
    (4.0, 8)
    """
    if not rate_per_s > 0:
        raise SpecError("rate", f"must be a positive number or inf, got {rate_per_s!r}")
    if num_requests < 1 or prompt_tokens < 1 or output_tokens < 1:
        raise SpecError("requests", "need at least one request of ≥ 1 prompt and ≥ 1 output token")
    gaps = np.random.default_rng(seed).exponential(1.0 / rate_per_s, num_requests)
    times = np.zeros(num_requests) if math.isinf(rate_per_s) else np.cumsum(gaps)
    return [BenchRequest(float(t), prompt_tokens, output_tokens) for t in times]


def synthetic_prompt(index: int, num_tokens: int, seed: int = 0) -> list[int]:
    """``num_tokens`` token ids for request ``index``: random in :data:`PROMPT_ID_RANGE`, its own per request."""
    return np.random.default_rng((seed, index)).integers(*PROMPT_ID_RANGE, num_tokens).tolist()


def completion_body(index: int, request: BenchRequest, model: str | None) -> dict[str, Any]:
    """The streamed ``/v1/completions`` body of ``request``."""
    prompt = request.prompt if request.prompt is not None else synthetic_prompt(index, request.prompt_tokens)
    body = {
        "prompt": prompt,
        "max_tokens": request.output_tokens,
        "ignore_eos": True,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    return body if model is None else {"model": model, **body}


# --- one request ---------------------------------------------------------------------------------------


async def stream_request(
    http: httpx.AsyncClient, body: Mapping[str, Any], index: int = 0, sent_at_s: float = 0.0,
    timeout_s: float = 600.0,
) -> RequestResult:  # fmt: skip
    """POST ``body`` to ``/v1/completions`` (streamed) and time its answer; never raises on a failure."""
    began = time.monotonic()
    status, text, finish, route, error = 0, "", None, None, None
    first_s: float | None = None
    usage_tokens: int | None = None
    num_chunks = 0
    try:
        async with asyncio.timeout(timeout_s), http.stream("POST", "/v1/completions", json=body) as response:
            status = response.status_code
            if status != 200:
                message = (await response.aread()).decode(errors="replace")
                error = f"HTTP {status}: {_error_message(message)}"
            else:
                async for line in response.aiter_lines():
                    if not line.startswith("data:") or line.strip() == "data: [DONE]":
                        continue
                    chunk = json.loads(line[len("data:") :])
                    if not isinstance(chunk, dict):
                        error = f"stream: a chunk is not a JSON object: {line[:100]}"
                        continue
                    if "error" in chunk:
                        problem = chunk["error"]
                        error = f"stream: {problem.get('message') if isinstance(problem, dict) else problem}"
                    for choice in chunk.get("choices") or ():
                        piece = choice.get("text") or ""
                        if piece and first_s is None:
                            first_s = time.monotonic() - began
                        num_chunks += bool(piece)
                        text += piece
                        finish = choice.get("finish_reason") or finish
                    usage_tokens = (chunk.get("usage") or {}).get("completion_tokens", usage_tokens)
                    route = chunk.get("chainserve", route)
                if error is None and finish is None:
                    error = "stream: ended without a finish_reason"
    except TimeoutError:
        error = f"timeout: no complete answer in {timeout_s:g} s"
    except (httpx.HTTPError, json.JSONDecodeError) as exc:
        error = f"{type(exc).__name__}: {exc}"
    elapsed = time.monotonic() - began
    tokens = usage_tokens if usage_tokens is not None else len((route or {}).get("token_ids", ())) or num_chunks
    ok = error is None
    tpot = (elapsed - first_s) / (tokens - 1) if ok and first_s is not None and tokens > 1 else None
    return RequestResult(
        index, sent_at_s, first_s if ok else None, elapsed if ok else None, tokens, error, tpot, status, text,
        finish, route, elapsed,
    )  # fmt: skip


def _error_message(body: str) -> str:
    try:
        return str(json.loads(body)["error"]["message"])[:200]
    except (ValueError, KeyError, TypeError):
        return body[:200]


# --- a run ---------------------------------------------------------------------------------------------


async def run_bench(
    url: str,
    requests: Sequence[BenchRequest],
    *,
    model: str | None = None,
    api_key: str | None = None,
    progress: bool = True,
    timeout_s: float = 600.0,
    concurrency: int | None = None,
    on_start: Callable[[float], None] | None = None,
) -> BenchReport:
    """Send every request at its ``at_s`` (``concurrency``: at most that many in flight, later ones
    wait), stream the answers and report; ``on_start`` gets the run's start (``time.monotonic()``, the
    zero of every ``at_s``). ``url``: the server's root (``http://host:port``; a trailing
    ``/v1`` is dropped); ``model``: default the first of ``/v1/models``. A server that does not answer
    ``/v1/models`` is a :class:`SpecError` on ``url`` before anything is sent."""
    if not requests:
        raise SpecError("requests", "nothing to send")
    root = url.rstrip("/").removesuffix("/v1")
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=64)
    timeout = httpx.Timeout(timeout_s, connect=min(timeout_s, 30.0))
    async with httpx.AsyncClient(base_url=root, headers=headers, timeout=timeout, limits=limits) as http:
        model = model or await _first_model(http)
        before = await scrape_queue_histogram(http)
        gate = asyncio.Semaphore(concurrency) if concurrency else None
        with _progress(progress) as bar:
            task = bar.add_task("bench", total=len(requests), failed=0)
            failed = 0
            began = time.monotonic()
            if on_start is not None:
                on_start(began)

            async def one(index: int, request: BenchRequest) -> RequestResult:
                nonlocal failed
                await asyncio.sleep(max(0.0, began + request.at_s - time.monotonic()))
                async with gate or nullcontext():
                    sent_at = time.monotonic() - began
                    body = completion_body(index, request, model)
                    result = await stream_request(http, body, index, sent_at, timeout_s)
                failed += not result.ok
                bar.update(task, advance=1, failed=failed)
                return result

            results = await asyncio.gather(*(one(i, r) for i, r in enumerate(requests)))
        after = await scrape_queue_histogram(http)
    return make_report(results, queue_time_stats(before, after), has_queue_histogram=after is not None)


def make_report(
    results: Sequence[RequestResult], waiting: Stats | None = None, has_queue_histogram: bool = False
) -> BenchReport:
    """The report of ``results`` (``waiting``: the server's queue-time stats, when known;
    ``has_queue_histogram``: whether the server exports the histogram they come from)."""
    done = [r for r in results if r.ok]
    duration = max((r.sent_at_s + r.elapsed_s for r in results), default=0.0)

    def stats(values: Sequence[float | None]) -> Stats | None:
        measured = [v for v in values if v is not None]
        return Stats.of(np.array(measured)) if measured else None

    return BenchReport(
        requests=len(results),
        completed=len(done),
        failed=len(results) - len(done),
        duration_s=duration,
        throughput=len(done) / duration if duration > 0 else 0.0,
        output_throughput=sum(r.output_tokens for r in done) / duration if duration > 0 else 0.0,
        response=stats([r.e2e_s for r in done]),
        waiting=waiting,
        ttft=stats([r.ttft_s for r in done]),
        tpot=stats([r.tpot_s for r in done]),
        results=tuple(results),
        has_queue_histogram=has_queue_histogram,
    )


async def _first_model(http: httpx.AsyncClient) -> str:
    try:
        response = await http.get("/v1/models")
    except httpx.HTTPError as exc:
        raise SpecError("url", f"{http.base_url} does not answer: {type(exc).__name__}: {exc}") from None
    if response.status_code != 200:
        detail = _error_message(response.text)
        raise SpecError("url", f"GET {http.base_url}/v1/models answered {response.status_code}: {detail}")
    try:
        return str(response.json()["data"][0]["id"])
    except (ValueError, KeyError, IndexError, TypeError):
        raise SpecError("url", f"GET {http.base_url}/v1/models lists no model; give --model") from None


def _progress(show: bool) -> Progress:
    return progress_bar(TextColumn("[red]{task.fields[failed]} failed"), show=show)
