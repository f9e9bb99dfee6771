"""Batching (issue 17): what continuous batching in the block servers, coalesced messages and the batched
LM head buy, measured in one run so the ratios share the machine's state.

(a) One block server's decode tokens/s on real SmolLM2 weights (10 blocks, one span, in this process,
    one thread): n sessions with ``--context`` cached positions each decode one token per session per
    iteration, batched (every session's step in one forward, as the server now runs them) against the
    old serial path (one session's step after another). Targets here: ≥ 2.5× at 8, ≥ 3× at 16.
(b) End to end: ``chainserve serve`` (SmolLM2, three block-server processes, two chains sharing the
    first server; benchmarks/data/batching-smollm2.yaml), output tokens/s of streamed requests at
    concurrency 1 and 8. Target: ≥ 3× at 8 over 1.
(c) Orchestrator scaling: emulated servers whose step takes τ ≈ 1 ms (so the orchestrator is the
    work; benchmarks/data/batching-emulated.yaml), output tokens/s of non-streamed requests at
    concurrency 1 and 64. Target: ≥ 12×.
(d) No half-batches (issue 30, part 4): ``chainserve serve`` with one block server holding all 30 SmolLM2
    blocks (benchmarks/data/batching-smollm2-one.yaml), output tokens/s of streamed requests at
    concurrency 1, 4 and 8, and the server's batch-size histogram over each run (sessions per
    iteration: iterations, from its own ``info`` counters). Target: full batches at 4 and 8 — at least
    80 % of the sessions' steps computed in iterations that carry every running session, not in two
    cohorts taking turns (the share of iterations is printed too; a split round counts twice there).

    python benchmarks/batching.py                 # all four (~6 min; SmolLM2 converts once, ~30 s)
    python benchmarks/batching.py --only a        # a, b, c or d
"""

from __future__ import annotations

import argparse
import asyncio
import secrets
import statistics
import sys
import time
from collections import Counter
from pathlib import Path

import httpx
import numpy as np

from chainserve.measure.bench import BenchRequest, run_bench
from chainserve.runtime.client import BlockClient
from chainserve.runtime.serve_process import serve_process

DATA = Path(__file__).parent / "data"
SESSIONS = (1, 2, 4, 8, 16)
#: (d): the concurrencies measured, and the share of steps that must run in full iterations at 4 and 8.
HISTOGRAM_CONCURRENCY = (1, 4, 8)
FULL_BATCH_SHARE = 0.8


def server_decode(
    context: int, iterations: int, model: str = "smollm2-135m", device: str = "cpu"
) -> list[tuple[int, float, float]]:
    """(a): (sessions, batched tokens/s, serial tokens/s) on 10 blocks of ``model`` on ``device``."""
    import torch

    from chainserve.runtime.backends.base import SpanInfo, SpanStep
    from chainserve.runtime.backends.devices import default_dtype, resolve_device
    from chainserve.runtime.backends.torch_backend import TorchHead, TorchSpan
    from chainserve.runtime.models import resolve_model

    torch.set_num_threads(1)
    path, where = resolve_model(model), resolve_device(device)
    head = TorchHead(path, default_dtype(where), device=where)
    blocks = min(10, head.num_blocks)
    info = SpanInfo(1, blocks, blocks * max(SESSIONS), context + 2 * iterations + 8)
    span = TorchSpan(path, info, default_dtype(where), where)
    slots = [span.info.slot_pages(range(blocks * k, blocks * (k + 1))) for k in range(max(SESSIONS))]
    prompt = head.embed([(7 * i) % 1000 + 10 for i in range(context)])
    for k in range(max(SESSIONS)):
        span.run_steps([SpanStep(prompt, 1, slots[k], 0)])
    token = head.embed([42])
    rows = []
    for n in SESSIONS:
        position = context

        def iteration(batched: bool, n: int = n) -> float:
            nonlocal position
            steps = [SpanStep(token, 1, slots[k], position) for k in range(n)]
            began = time.perf_counter()
            if batched:
                span.run_steps(steps)
            else:
                for step in steps:
                    span.run_steps([step])
            if where.type == "cuda":
                torch.cuda.synchronize()
            position += 1
            return time.perf_counter() - began

        batched, serial = [], []
        for _ in range(iterations):  # interleaved, so both see the same machine
            batched.append(iteration(True))
            serial.append(iteration(False))
            position -= 2  # the same positions again: the context stays the same
        rows.append((n, n / statistics.median(batched), n / statistics.median(serial)))
    return rows


async def served_tokens_per_s(url: str, concurrency: int, num_requests: int, output_tokens: int) -> float:
    """Output tokens/s of ``num_requests`` streamed requests, ``concurrency`` at a time."""
    requests = [BenchRequest(0.0, 24, output_tokens) for _ in range(num_requests)]
    began = time.perf_counter()
    report = await run_bench(url, requests, progress=False, concurrency=concurrency)
    wall = time.perf_counter() - began
    results = report.results
    if not all(r.ok for r in results):
        raise SystemExit(f"requests failed: {[r.error for r in results if not r.ok][:3]}")
    return sum(r.output_tokens for r in results) / wall


async def non_streamed_tokens_per_s(url: str, concurrency: int, num_requests: int, output_tokens: int) -> float:
    """Output tokens/s of ``num_requests`` non-streamed completions sent by ``concurrency`` clients,
    each sending its next request when its last is answered."""
    body = {"prompt": "the chain serves a job", "max_tokens": output_tokens, "temperature": 0, "ignore_eos": True}
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as c:
        body["model"] = (await c.get("/v1/models")).json()["data"][0]["id"]
        left, tokens = concurrency, []

        async def client() -> None:
            nonlocal left
            while left > 0:
                left -= 1
                r = await c.post("/v1/completions", json=body)
                r.raise_for_status()
                tokens.append(r.json()["usage"]["completion_tokens"])

        await asyncio.gather(*(client() for _ in range(concurrency)))  # warm up: every connection opens
        left, tokens = num_requests, []
        began = time.perf_counter()
        await asyncio.gather(*(client() for _ in range(concurrency)))
        return sum(tokens) / (time.perf_counter() - began)


def end_to_end(tmp: Path, model: str = "smollm2-135m", device: str | None = None) -> tuple[float, float]:
    """(b): tokens/s at concurrency 1 and 8 through three block servers of ``model`` (on ``device``;
    default ``serve``'s own: a GPU if any, else the CPU)."""
    args = [str(DATA / "batching-smollm2.yaml"), "--backend", "torch", "--model", model, "--port", "0"]
    args += ["--device", device] if device else []
    with serve_process([*args, "--planner", "greedy", "--log-level", "warning"], tmp / "b.log", 600) as served:
        asyncio.run(served_tokens_per_s(served.url, 1, 1, 8))  # warm up
        one = asyncio.run(served_tokens_per_s(served.url, 1, 4, 32))
        eight = asyncio.run(served_tokens_per_s(served.url, 8, 16, 32))
    return one, eight


async def server_batch_sizes(url: str, token: str) -> Counter[int]:
    """The batch-size counts (sessions per iteration: iterations) of the first block server of the
    ``chainserve serve`` at ``url``, from the server's own ``info``."""
    async with httpx.AsyncClient(base_url=url, timeout=30) as c:
        endpoint = (await c.get("/status")).json()["servers"][0]["endpoint"]
    client = BlockClient("bench", endpoint, token)
    try:
        return Counter({int(n): int(count) for n, count in (await client.info())["batch_sizes"]})
    finally:
        client.close()


def batch_histograms(
    tmp: Path, concurrencies: tuple[int, ...] = HISTOGRAM_CONCURRENCY, model: str = "smollm2-135m"
) -> list[tuple[int, float, Counter[int]]]:
    """(d): (concurrency, output tokens/s, the block server's batch sizes over that run) through one
    block server holding every block of ``model``; 2 × concurrency requests of 32 tokens each."""
    token_file = tmp / "d.token"
    token_file.write_text(secrets.token_hex(16))
    args = [str(DATA / "batching-smollm2-one.yaml"), "--backend", "torch", "--model", model, "--port", "0"]
    args += ["--token-file", str(token_file), "--planner", "greedy", "--log-level", "warning"]
    rows = []
    with serve_process(args, tmp / "d.log", 600) as served:
        asyncio.run(served_tokens_per_s(served.url, 1, 1, 8))  # warm up
        for concurrency in concurrencies:
            before = asyncio.run(server_batch_sizes(served.url, token_file.read_text()))
            tokens_per_s = asyncio.run(served_tokens_per_s(served.url, concurrency, 2 * concurrency, 32))
            after = asyncio.run(server_batch_sizes(served.url, token_file.read_text()))
            rows.append((concurrency, tokens_per_s, after - before))
    return rows


def orchestrator_scaling(tmp: Path) -> tuple[float, float]:
    """(c): non-streamed tokens/s at concurrency 1 and 64, emulated servers of τ ≈ 1 ms a step."""
    args = [str(DATA / "batching-emulated.yaml"), "--backend", "emulated", "--planner", "greedy", "--port", "0"]
    with serve_process([*args, "--log-level", "warning", "--max-waiting", "10000"], tmp / "c.log", 120) as served:
        one = asyncio.run(non_streamed_tokens_per_s(served.url, 1, 16, 128))
        many = asyncio.run(non_streamed_tokens_per_s(served.url, 64, 256, 128))
    return one, many


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", choices=("a", "b", "c", "d"), default=None)
    parser.add_argument("--context", type=int, default=256, help="(a) cached positions per session")
    parser.add_argument("--iterations", type=int, default=15, help="(a) iterations per point")
    args = parser.parse_args()
    import tempfile

    tmp = Path(tempfile.mkdtemp(prefix="chainserve-batching-"))
    ok = True
    if args.only in (None, "a"):
        print(f"(a) one block server, 10 SmolLM2 blocks, {args.context} cached positions, decode tokens/s")
        print(f"{'sessions':>8} {'batched':>9} {'serial':>9} {'gain':>6}")
        for n, batched, serial in server_decode(args.context, args.iterations):
            print(f"{n:>8} {batched:>9.1f} {serial:>9.1f} {batched / serial:>5.2f}x")
            ok &= n != 8 or batched / serial >= 2.5
            ok &= n != 16 or batched / serial >= 3.0
    if args.only in (None, "b"):
        one, eight = end_to_end(tmp)
        print(f"(b) chainserve serve, SmolLM2 on 3 block servers: {one:.1f} tok/s at 1, {eight:.1f} at 8 "
              f"({eight / one:.2f}x; target >= 3x)")  # fmt: skip
        ok &= eight / one >= 3.0
    if args.only in (None, "c"):
        one, many = orchestrator_scaling(tmp)
        print(f"(c) orchestrator, emulated servers (tau ~ 1 ms): {one:.0f} tok/s at 1, {many:.0f} at 64 "
              f"({many / one:.1f}x; target >= 12x)")  # fmt: skip
        ok &= many / one >= 12.0
    if args.only in (None, "d"):
        print("(d) chainserve serve, SmolLM2 on one block server: tokens/s and its batch sizes (sessions: iterations)")
        for concurrency, tokens_per_s, sizes in batch_histograms(tmp):
            steps = sum(n * count for n, count in sizes.items())
            full_steps = concurrency * sizes[concurrency] / max(steps, 1)
            full_iterations = sizes[concurrency] / max(sizes.total(), 1)
            histogram = ", ".join(f"{n}: {count}" for n, count in sorted(sizes.items()))
            print(f"{concurrency:>8} {tokens_per_s:>7.1f} tok/s  {{{histogram}}}  "
                  f"in full batches: {full_steps:.0%} of steps, {full_iterations:.0%} of iterations")  # fmt: skip
            ok &= concurrency == 1 or full_steps >= FULL_BATCH_SHARE
    print("all targets met" if ok else "a target was missed")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    np.set_printoptions(precision=3)
    main()
