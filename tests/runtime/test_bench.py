"""``chainserve bench`` (issue 7): against a stub OpenAI server started here (SSE like OpenAI's, some
requests failing) and against a live emulated ``chainserve serve`` provoked into 429s and 400s; every
request is counted, none dropped, and the counts match what the servers saw."""

from __future__ import annotations

import asyncio
import json
import re
import socket
import threading
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager

import httpx
import pytest
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CollectorRegistry, Histogram, generate_latest
from tests.runtime.conftest import EMULATED_6, serving
from typer.testing import CliRunner

from chainserve.cli import app
from chainserve.measure.bench import PROMPT_ID_RANGE, BenchRequest, FailureKind, run_bench, trace_requests

FIRST_TOKEN_S, TOKEN_GAP_S, QUEUED_S = 0.03, 0.01, 0.25
#: Prompt lengths the stub fails: an HTTP 500, an error in the stream, an answer too slow.
FAIL_500, FAIL_IN_STREAM, TOO_SLOW = 7, 9, 11


def stub_app(seen: list[dict], metrics: bool) -> FastAPI:
    """An OpenAI-like server: streams ``max_tokens`` text chunks, a usage chunk and ``[DONE]``; fails
    prompts of the lengths above; ``metrics``: a vLLM queue-time histogram that already holds 3 × 9 s."""
    stub = FastAPI()
    registry = CollectorRegistry()
    queue = Histogram("vllm:request_queue_time_seconds", "queue", buckets=(0.1, 0.5, 1.0), registry=registry)
    for _ in range(3):
        queue.observe(9.0)

    @stub.get("/v1/models")
    async def models() -> dict:
        return {"object": "list", "data": [{"id": "stub-model", "object": "model"}]}

    @stub.post("/v1/completions")
    async def completions(request: Request) -> Response:
        body = await request.json()
        seen.append(body)
        n = len(body["prompt"])
        if n == FAIL_500:
            return JSONResponse({"error": {"message": "boom", "type": "server_error"}}, status_code=500)
        queue.observe(QUEUED_S)

        async def chunks() -> AsyncIterator[bytes]:
            await asyncio.sleep(FIRST_TOKEN_S if n != TOO_SLOW else 5.0)
            for i in range(body["max_tokens"]):
                if n == FAIL_IN_STREAM and i == 2:
                    yield b'data: {"error": {"message": "lost a server"}}\n\n'
                    break
                last = i == body["max_tokens"] - 1
                choice = {"index": 0, "text": f" t{i}", "finish_reason": "length" if last else None}
                yield f"data: {json.dumps({'object': 'text_completion', 'choices': [choice]})}\n\n".encode()
                await asyncio.sleep(TOKEN_GAP_S)
            usage = {"prompt_tokens": n, "completion_tokens": body["max_tokens"]}
            yield f"data: {json.dumps({'choices': [], 'usage': usage})}\n\n".encode()
            yield b"data: [DONE]\n\n"

        return StreamingResponse(chunks(), media_type="text/event-stream")

    if metrics:

        @stub.get("/metrics")
        async def render() -> Response:
            return Response(generate_latest(registry), media_type="text/plain")

    return stub


@contextmanager
def stub_server(metrics: bool = True) -> Iterator[tuple[str, list[dict]]]:
    seen: list[dict] = []
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(stub_app(seen, metrics), log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}", seen
    finally:
        server.should_exit = True
        thread.join(10)
        sock.close()


def test_stub_openai_server_failures_are_counted_and_queue_time_comes_from_its_histogram() -> None:
    lengths = [4, FAIL_500, 4, FAIL_IN_STREAM, 5, 4, FAIL_500, 6]
    requests = [BenchRequest(0.02 * i, n, 5) for i, n in enumerate(lengths)]
    with stub_server() as (url, seen):
        report = asyncio.run(run_bench(url + "/v1", requests, progress=False))
    assert (report.requests, report.completed, report.failed) == (8, 5, 3)
    assert report.errors == {"HTTP 500": FailureKind(2, "boom"), "stream": FailureKind(1, "lost a server")}
    assert [r.index for r in report.results] == list(range(8))
    assert [r.ok for r in report.results] == [n not in (FAIL_500, FAIL_IN_STREAM) for n in lengths]
    # the server saw exact prompt lengths (distinct token ids per request), max_tokens and ignore_eos
    assert sorted(len(b["prompt"]) for b in seen) == sorted(lengths)
    assert all(PROMPT_ID_RANGE[0] <= t < PROMPT_ID_RANGE[1] for b in seen for t in b["prompt"])
    assert len({tuple(b["prompt"]) for b in seen if len(b["prompt"]) == 4}) == 3
    assert all(b["model"] == "stub-model" and b["max_tokens"] == 5 and b["ignore_eos"] and b["stream"] for b in seen)
    done = [r for r in report.results if r.ok]
    assert all(r.output_tokens == 5 and r.text == " t0 t1 t2 t3 t4" and r.finish_reason == "length" for r in done)
    assert FIRST_TOKEN_S <= report.ttft.mean_s < report.response.mean_s
    assert TOKEN_GAP_S * 0.9 <= report.tpot.p50_s < TOKEN_GAP_S * 5
    assert report.response.mean_s >= FIRST_TOKEN_S + 4 * TOKEN_GAP_S
    # queue time: only this run's 6 observations (not the 3 before), mean exact, percentiles in their bucket
    assert report.waiting.mean_s == pytest.approx(QUEUED_S)
    assert 0.1 <= report.waiting.p50_s <= report.waiting.p99_s <= 0.5
    assert report.throughput == pytest.approx(5 / report.duration_s)
    out = report.to_json()
    assert {"requests", "completed", "failed", "throughput", "response", "waiting", "ttft", "tpot"} <= set(out)
    assert set(out["ttft"]) == {"mean", "p50", "p95", "p99"}


def test_cli_without_server_metrics_reports_null_waiting_and_counts_timeouts(monkeypatch) -> None:
    monkeypatch.setenv("COLUMNS", "200")
    with stub_server(metrics=False) as (url, _):
        args = [
            "bench",
            "--url",
            url,
            "--rate",
            "inf",
            "--requests",
            "3",
            "--prompt-tokens",
            "4",
            "--output-tokens",
            "3",
        ]
        result = CliRunner().invoke(app, [*args, "--json", "--quiet"])
        assert result.exit_code == 0, result.output
        out = json.loads(result.stdout)
        assert (out["requests"], out["completed"], out["failed"], out["waiting"]) == (3, 3, 0, None)
        assert out["ttft"]["mean"] > 0 and out["tpot"]["p99"] > 0
        table = CliRunner().invoke(app, args).stdout
        assert "3 sent, 3 completed, 0 failed" in table and "exports no" in table

        slow = ["bench", "--url", url, "--rate", "100", "--requests", "2", "--prompt-tokens", str(TOO_SLOW)]
        result = CliRunner().invoke(app, [*slow, "--output-tokens", "2", "--timeout-s", "0.3"])
        assert result.exit_code == 2
        assert "2 sent, 0 completed, 2 failed (2 × timeout)" in result.stdout
        assert result.stderr.strip().startswith("error: requests: none of 2 completed (first failure: timeout")
    result = CliRunner().invoke(app, ["bench", "--url", url, "--rate", "1"])
    assert result.exit_code == 2 and "error: url:" in result.stderr


def _metric(text: str, name: str) -> float:
    return sum(float(v) for v in re.findall(rf"^{re.escape(name)}(?:{{[^}}]*}})? (\S+)$", text, re.M))


#: The live server's context (``--max-tokens``): prompt + output tokens past it get a 400.
CONTEXT = 64


@pytest.fixture(scope="module")
def live(tmp_path_factory):
    args = (
        str(EMULATED_6),
        "--backend",
        "emulated",
        "--max-waiting",
        "3",
        "--max-tokens",
        str(CONTEXT),
        "--max-context",
        str(CONTEXT),
    )
    with serving(*args, tmp_path=tmp_path_factory.mktemp("live")) as served:
        yield served


def test_live_chainserve_counts_add_up_with_429s_and_400s_and_trace_lengths_are_honoured(live) -> None:
    # a trace slice (12-token prompts): each answer has the trace's output length (ignore_eos)
    trace = [BenchRequest(r.at_s, 12, r.output_tokens) for r in trace_requests("bundled", num_requests=6)]
    report = asyncio.run(run_bench(live.url, trace, progress=False, concurrency=2))
    assert (report.completed, report.failed) == (6, 0)
    assert [r.output_tokens for r in report.results] == [r.output_tokens for r in trace]
    assert all(len(r.route["token_ids"]) == r.output_tokens for r in report.results)
    assert report.waiting.mean_s == pytest.approx(
        sum(r.route["queued_s"] for r in report.results) / 6, rel=1e-6, abs=1e-9
    )

    # a burst past --max-waiting (429s) plus prompts that overflow the 64-token context (400s)
    before = httpx.get(live.url + "/metrics").text
    burst = ["bench", "--url", live.url, "--rate", "inf", "--requests", "24"]
    result = CliRunner().invoke(app, [*burst, "--prompt-tokens", "60", "--output-tokens", "8", "--json"])
    assert result.exit_code == 2 and "HTTP 400" in result.stderr  # 60 + 8 > 64: all rejected
    out = json.loads(result.stdout)
    assert (out["requests"], out["completed"], out["failed"]) == (24, 0, 24)
    assert list(out["errors"]) == ["HTTP 400"] and out["errors"]["HTTP 400"]["count"] == 24
    result = CliRunner().invoke(app, [*burst, "--prompt-tokens", "20", "--output-tokens", "8", "--json"])
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    after = httpx.get(live.url + "/metrics").text
    rejected = _metric(after, "chainserve:request_failure_total") - _metric(before, "chainserve:request_failure_total")
    served_ok = _metric(after, "chainserve:request_success_total") - _metric(before, "chainserve:request_success_total")
    print("bench vs live chainserve:", {k: out[k] for k in ("requests", "completed", "failed", "errors")})
    assert out["completed"] + out["failed"] == out["requests"] == 24
    assert out["failed"] == out["errors"]["HTTP 429"]["count"] == rejected > 0
    assert out["completed"] == served_ok > 0
    assert out["waiting"]["mean"] > 0 and out["response"]["p99"] >= out["response"]["p50"]


def test_requests_too_long_for_the_context_are_reported_with_the_servers_reason(live, tmp_path, monkeypatch) -> None:
    """A trace whose every other row overflows the context: ``--json`` and the table name the 400's message."""
    monkeypatch.setenv("COLUMNS", "250")
    trace = tmp_path / "mixed.csv"
    rows = [f"2023-11-16 18:00:00.{i}00,{20 if i % 2 == 0 else CONTEXT - 4},8" for i in range(6)]
    trace.write_text("TIMESTAMP,ContextTokens,GeneratedTokens\n" + "\n".join(rows) + "\n")
    args = ["bench", "--url", live.url, "--trace", str(trace), "--requests", "6", "--max-concurrency", "1", "--quiet"]
    result = CliRunner().invoke(app, [*args, "--json"])
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    reason = f"max_tokens: the model's context is {CONTEXT} tokens; the prompt has {CONTEXT - 4} and max_tokens is 8"
    assert (out["completed"], out["failed"]) == (3, 3)
    assert out["errors"] == {"HTTP 400": {"count": 3, "first_message": reason + " (at most 4 allowed)"}}
    table = CliRunner().invoke(app, args).stdout
    assert "3 failed (3 × HTTP 400)" in table and reason in table


def test_when_none_complete_nothing_is_claimed_about_the_servers_metrics(live, monkeypatch) -> None:
    monkeypatch.setenv("COLUMNS", "250")
    args = ["bench", "--url", live.url, "--rate", "inf", "--requests", "2", "--prompt-tokens", str(CONTEXT)]
    result = CliRunner().invoke(app, [*args, "--output-tokens", "1"])
    assert result.exit_code == 2 and "0 completed, 2 failed (2 × HTTP 400)" in result.stdout
    assert "leave no room in the model's context" in result.stdout
    assert "histogram" not in result.stdout and "exports" not in result.stdout
