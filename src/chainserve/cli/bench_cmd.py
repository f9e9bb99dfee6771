"""``chainserve bench``: replay requests against any OpenAI-compatible server and report its times the
way ``vllm bench serve`` does (issue 7; §4.2's live measurements; definitions in
:mod:`chainserve.measure.bench`).

Arrivals replay an Azure-format trace (``--trace``, its prompt and output lengths included) or are
Poisson at ``--rate`` with ``--prompt-tokens``/``--output-tokens`` each; with ``--trace`` those two
replace the trace's lengths. The run prints its report (failed requests by kind, each with the first
one's message, e.g. the server's reason for a 400) and exits 2 (one ``error:`` line) when no request
completed.
"""

from __future__ import annotations

import asyncio
import json
import math
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from chainserve.cli.common import fail, fmt_s, stdout_console, user_errors
from chainserve.measure.bench import BUNDLED_TRACE, BenchReport, BenchRequest, rate_requests, run_bench, trace_requests
from chainserve.model import limits
from chainserve.model.spec import SpecError

#: Most requests one run sends; ``--time-scale`` range (as ``simulate``'s).
MAX_REQUESTS = 1_000_000
TIME_SCALE_RANGE = (1e-3, 1e3)


def bench(
    url: Annotated[str, typer.Option(help="The server's root, e.g. http://127.0.0.1:8000 (a /v1 suffix is dropped).")],
    trace: Annotated[
        str | None,
        typer.Option(
            metavar="FILE|bundled",
            help="Replay an Azure-format trace (TIMESTAMP,ContextTokens,GeneratedTokens); 'bundled': the shipped "
            "Azure code trace 2023.",
        ),
    ] = None,
    time_scale: Annotated[
        float | None,
        typer.Option(help="Multiply the trace's inter-arrival times, 0.001..1000 (0.5 replays twice as fast)."),
    ] = None,
    trace_start: Annotated[int | None, typer.Option(help="First trace row to replay \\[default: 0]")] = None,
    rate: Annotated[
        float | None, typer.Option(help="Poisson arrivals at this many requests/s (inf: all at once).")
    ] = None,
    requests: Annotated[int, typer.Option(help=f"Number of requests to send, 1..{MAX_REQUESTS}.")] = 1000,
    prompt_tokens: Annotated[
        int | None,
        typer.Option(help="Prompt tokens per request (with --rate: default 1024; with --trace: the trace's)."),
    ] = None,
    output_tokens: Annotated[
        int | None,
        typer.Option(help="Output tokens per request (with --rate: default 128; with --trace: the trace's)."),
    ] = None,
    model: Annotated[str | None, typer.Option(help="Model name to send \\[default: the first of /v1/models]")] = None,
    api_key: Annotated[
        str | None, typer.Option(help="Send 'Authorization: Bearer KEY'.", envvar="CHAINSERVE_API_KEY")
    ] = None,
    max_concurrency: Annotated[
        int | None, typer.Option(help="At most this many requests in flight (later ones wait) \\[default: no limit]")
    ] = None,
    timeout_s: Annotated[
        float, typer.Option(help="A request not answered in full within this many seconds fails.")
    ] = 600.0,
    seed: Annotated[int, typer.Option(help="Seed of the Poisson arrivals.")] = 0,
    as_json: Annotated[bool, typer.Option("--json", help="Print the results as one JSON object.")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", help="No progress bar on stderr.")] = False,
) -> None:
    """Benchmark an OpenAI-compatible server: throughput, response, waiting, TTFT and TPOT."""
    with user_errors():
        reqs, arrivals = _requests(trace, time_scale, trace_start, rate, requests, prompt_tokens, output_tokens, seed)
        if max_concurrency is not None:
            limits.check_count("max-concurrency", max_concurrency, MAX_REQUESTS)
        limits.check_range("timeout-s", timeout_s, limits.TIME_S, "s")
        report = asyncio.run(
            run_bench(url, reqs, model=model, api_key=api_key, progress=not quiet, timeout_s=timeout_s,
                      concurrency=max_concurrency)
        )  # fmt: skip
    if as_json:
        typer.echo(json.dumps({"url": url, "arrivals": arrivals, **report.to_json()}, indent=2))
    else:
        _print_report(report, url, arrivals, stdout_console())
    if report.completed == 0:
        first = next(r.error for r in report.results if r.error is not None)
        raise fail(f"requests: none of {report.requests} completed (first failure: {first})")


def _requests(
    trace: str | None, time_scale: float | None, trace_start: int | None, rate: float | None, num: int,
    prompt_tokens: int | None, output_tokens: int | None, seed: int,
) -> tuple[list[BenchRequest], str]:  # fmt: skip
    """The requests to send and their description in words."""
    limits.check_count("requests", num, MAX_REQUESTS)
    for field, value in (("prompt-tokens", prompt_tokens), ("output-tokens", output_tokens)):
        if value is not None:
            limits.check_count(field, value, limits.MAX_TOKENS)
    if (trace is None) == (rate is None):
        raise SpecError("trace", "give exactly one of --trace FILE|bundled and --rate R")
    if rate is not None:
        if time_scale is not None or trace_start is not None:
            raise SpecError("time-scale" if time_scale is not None else "trace-start", "applies only with --trace")
        return _poisson(rate, num, prompt_tokens or 1024, output_tokens or 128, seed)
    return _replay(str(trace), time_scale, trace_start or 0, num, prompt_tokens, output_tokens)


def _poisson(
    rate: float, num: int, prompt_tokens: int, output_tokens: int, seed: int
) -> tuple[list[BenchRequest], str]:
    if not math.isinf(rate):
        limits.check_range("rate", rate, limits.RATE_PER_S, "requests/s")
    text = f"Poisson, λ = {rate:g}/s" if math.isfinite(rate) else "all at once"
    reqs = rate_requests(rate, num, prompt_tokens, output_tokens, seed=seed)
    return reqs, f"{text}, {prompt_tokens} → {output_tokens} tokens"


def _replay(
    trace: str, time_scale: float | None, first: int, num: int, prompt_tokens: int | None, output_tokens: int | None
) -> tuple[list[BenchRequest], str]:
    path = None if trace == BUNDLED_TRACE else Path(trace)
    if path is not None and not path.is_file():
        raise SpecError("trace", f"{trace}: no such file")
    scale = 1.0 if time_scale is None else limits.check_range("time-scale", time_scale, TIME_SCALE_RANGE)
    if first < 0:
        raise SpecError("trace-start", f"must be a non-negative row number, got {first}")
    reqs = trace_requests(path, time_scale=scale, num_requests=num, start=first)
    if prompt_tokens is not None or output_tokens is not None:
        reqs = [BenchRequest(r.at_s, prompt_tokens or r.prompt_tokens, output_tokens or r.output_tokens) for r in reqs]
    name = "Azure code trace 2023" if path is None else path.name
    return reqs, f"{name}, rows {first}–{first + num - 1}, time ×{scale:g}"


def _print_report(report: BenchReport, url: str, arrivals: str, out: Console) -> None:
    times = Table(title=f"Times (seconds, {report.completed} completed requests)", title_justify="left")
    for header in ("metric", "mean", "p50", "p95", "p99"):
        times.add_column(header, justify="left" if header == "metric" else "right")
    rows = (
        ("response (end-to-end)", report.response),
        ("waiting (server queue)", report.waiting),
        ("time to first token", report.ttft),
        ("time per output token", report.tpot),
    )
    for label, stats in rows:
        values = ("–",) * 4 if stats is None else (stats.mean_s, stats.p50_s, stats.p95_s, stats.p99_s)
        times.add_row(label, *(v if isinstance(v, str) else fmt_s(v) for v in values))
    info = Table(title="Benchmark", title_justify="left", show_header=False)
    info.add_column(style="bold")
    info.add_column()
    failures = sorted(report.errors.items())
    counts = ", ".join(f"{failure.count} × {kind}" for kind, failure in failures)
    for key, value in (
        ("server", url),
        ("arrivals", arrivals),
        ("requests", f"{report.requests} sent, {report.completed} completed, {report.failed} failed"
         + (f" ({counts})" if counts else "")),
        *((f"first {kind}", failure.first_message) for kind, failure in failures),
        ("duration", f"{report.duration_s:.2f} s"),
        ("request throughput", f"{report.throughput:.4g} requests/s"),
        ("output throughput", f"{report.output_throughput:.4g} tokens/s"),
    ):  # fmt: skip
        info.add_row(key, value)
    out.print(info)
    out.print(times)
    if report.completed and not report.has_queue_histogram:  # none completed: nothing to say about waiting
        out.print("waiting: the server exports no *:request_queue_time_seconds histogram")
