"""Runtime overhead: per-token latency through a chain of block-server processes against the servers'
own compute plus the injected network delays (paper §4.2; the serving-runtime issue's target ≤ 1.15×).

Three block servers (torch backend, the tiny random Llama, 2 blocks each) run as separate processes
with an injected one-way delay; this process is the client (as the orchestrator is): it prefills a
prompt, then sends one decode step at a time through the 3 hops. Each server reports the time its
backend spent computing (``compute_s`` / ``num_steps``, measured in-process). The ratio is

    median per-token latency / (Σ_servers compute per step + Σ_servers 2 × one-way delay)

and the per-hop overhead is what is left over, divided by the number of hops. A second run with no
injected delay and 2 servers measures the bare per-token overhead through 2 servers, to compare with
PETALS' 13–16 ms on this machine kind (ours must be ≥ 4× smaller).

    python benchmarks/runtime_overhead.py                  # 300 tokens, 5 ms one-way delay
    python benchmarks/runtime_overhead.py --delay-ms 2 --tokens 500
"""

from __future__ import annotations

import argparse
import asyncio
import secrets
import statistics
import tempfile
import time
from pathlib import Path

from chainserve.runtime.backends.base import SpanInfo
from chainserve.runtime.client import BlockClient
from chainserve.runtime.launch.local import BackendArgs, LocalLauncher
from chainserve.runtime.layout import ServerSpec
from chainserve.runtime.models import resolve_model


async def measure(num_servers: int, blocks_each: int, delay_ms: float, tokens: int) -> dict:
    """Start the chain, run ``tokens`` decode steps, return the figures."""
    from chainserve.runtime.backends.torch_head import TorchHead

    model_dir = resolve_model("tiny-random")
    head = TorchHead(model_dir, max_tokens=tokens + 64)
    token = secrets.token_hex(8)
    specs = [
        ServerSpec(j, f"b{j}", SpanInfo(1 + j * blocks_each, blocks_each, blocks_each, tokens + 64), 0.0, 0.0)
        for j in range(num_servers)
    ]
    launcher = LocalLauncher(Path(tempfile.mkdtemp(prefix="chainserve-bench-")), token)
    endpoints = await launcher.start(
        specs, BackendArgs("torch", "tiny-random"), {}, {s.name: delay_ms / 1000 for s in specs}
    )
    clients = [BlockClient(s.name, endpoints[s.index], token) for s in specs]
    try:
        prompt = head.encode("The quick brown fox jumps over the lazy dog")
        hidden = head.embed(prompt)
        for spec, client in zip(specs, clients, strict=True):
            hidden = await client.forward("bench", spec.info.first_block, 0, hidden, open=True)
        position = len(prompt)
        before = [await c.info() for c in clients]
        latencies = []
        next_token = int(head.logits([hidden])[0].argmax())
        for _ in range(tokens):
            step_in = head.embed([next_token])
            began = time.perf_counter()
            out = step_in
            for spec, client in zip(specs, clients, strict=True):
                out = await client.forward("bench", spec.info.first_block, position, out)
            latencies.append(time.perf_counter() - began)
            position += 1
            next_token = int(head.logits([out])[0].argmax())
        after = [await c.info() for c in clients]
    finally:
        for client in clients:
            client.close()
        await launcher.stop()
    compute_s = [
        (a["compute_s"] - b["compute_s"]) / (a["num_steps"] - b["num_steps"])
        for a, b in zip(after, before, strict=True)
    ]
    per_token = statistics.median(latencies)
    floor = sum(compute_s) + num_servers * 2 * delay_ms / 1000
    return {
        "servers": num_servers,
        "delay_ms": delay_ms,
        "per_token_ms": per_token * 1000,
        "compute_ms": [c * 1000 for c in compute_s],
        "floor_ms": floor * 1000,
        "ratio": per_token / floor,
        "per_hop_overhead_ms": (per_token - floor) / num_servers * 1000,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--delay-ms", type=float, default=5.0, help="one-way delay injected at each server")
    parser.add_argument("--tokens", type=int, default=300, help="decode steps to time")
    args = parser.parse_args()
    chain = asyncio.run(measure(3, 2, args.delay_ms, args.tokens))
    bare = asyncio.run(measure(2, 2, 0.0, args.tokens))
    print(f"3 servers x 2 tiny blocks, {args.delay_ms:g} ms one-way delay each, {args.tokens} tokens")
    print(f"  per-token latency (median)      {chain['per_token_ms']:.2f} ms")
    print(f"  servers' compute per token      {' + '.join(f'{c:.2f}' for c in chain['compute_ms'])} ms")
    print(f"  compute + injected delays       {chain['floor_ms']:.2f} ms")
    print(f"  ratio (target <= 1.15)          {chain['ratio']:.3f}")
    print(f"  per-hop overhead                {chain['per_hop_overhead_ms']:.3f} ms")
    print("2 servers x 2 tiny blocks, no injected delay")
    print(f"  per-token latency (median)      {bare['per_token_ms']:.2f} ms (compute {sum(bare['compute_ms']):.2f} ms)")
    print(
        f"  per-token overhead              {bare['per_token_ms'] - sum(bare['compute_ms']):.2f} ms "
        f"(PETALS: 13-16 ms; target <= 3.25 ms)"
    )
    print(f"  per-hop overhead                {bare['per_hop_overhead_ms']:.3f} ms")


if __name__ == "__main__":
    main()
