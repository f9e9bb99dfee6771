"""A mixed iteration (issue 30): a block server's decodes beside a prefill chunk in one packed forward
(``TorchSpan.run_steps``: :meth:`~chainserve.runtime.backends.lean.LeanLayer.packed`) against one
forward per length (the decodes, then the chunk: what an iteration ran before), interleaved, in one run
so the ratio shares the machine's state.

One span of SmolLM2 (fp32, one thread, in this process); ``--decodes`` sessions prefilled with
``--context`` + 2·r tokens (ragged), then each iteration carries one decode per session and a new
session's first chunk of ``--chunk`` tokens. Prints the iteration time of each way (min and median of
``--repeats``) and the largest difference of their outputs relative to their scale.

    python benchmarks/mixed_iteration.py                    # 30 blocks, 15 decodes + a 64-token chunk
    python benchmarks/mixed_iteration.py --decodes 7 --chunk 128 --repeats 5
"""

from __future__ import annotations

import argparse
import statistics
import time


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--blocks", type=int, default=30)
    parser.add_argument("--decodes", type=int, default=15, help="sessions decoding beside the chunk")
    parser.add_argument("--context", type=int, default=64, help="cached positions of the first session")
    parser.add_argument("--chunk", type=int, default=64, help="prompt tokens of the new session's chunk")
    parser.add_argument("--repeats", type=int, default=8, help="timed iterations per way")
    args = parser.parse_args()

    import torch

    from chainserve.runtime.backends.base import SpanInfo, SpanStep
    from chainserve.runtime.backends.torch_backend import TorchSpan
    from chainserve.runtime.backends.torch_common import torch_to_wire, wire_to_torch
    from chainserve.runtime.models import resolve_model

    torch.set_num_threads(1)
    n, b = args.blocks, args.decodes
    longest = max(args.context + 2 * b + 1, args.chunk)
    info = SpanInfo(1, n, (b + 1) * n, longest)
    span = TorchSpan(resolve_model(args.model), info)
    hidden = span.hidden_size
    gen = torch.Generator().manual_seed(0)
    slots = [info.slot_pages(range(r * n, (r + 1) * n)) for r in range(b + 1)]

    def wire(tokens: int):
        return torch_to_wire(torch.randn(1, tokens, hidden, generator=gen))

    span.run_steps([SpanStep(wire(args.context + 2 * r), 1, slots[r], 0) for r in range(b)])
    steps = [SpanStep(wire(1), 1, slots[r], args.context + 2 * r) for r in range(b)]
    steps.append(SpanStep(wire(args.chunk), 1, slots[b], 0))
    ways = {
        "packed": lambda: span.run_steps(steps),
        "per length": lambda: span.run_steps(steps[:-1]) + span.run_steps(steps[-1:]),
    }
    outs = {name: run() for name, run in ways.items()}  # also the warm-up (merged GEMMs learnt, lone-row copies)
    times: dict[str, list[float]] = {name: [] for name in ways}
    for _ in range(args.repeats):
        for name, run in ways.items():
            start = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - start)
    got, want = ([wire_to_torch(w, hidden) for w in outs[k]] for k in ways)
    error = max(float((g - w).abs().max() / w.abs().max()) for g, w in zip(got, want, strict=True))
    print(
        f"{args.model}: {n} blocks, fp32, 1 thread, {b} decodes + a {args.chunk}-token chunk, {args.repeats} iterations"
    )
    for name, ts in times.items():
        print(f"  {name:>10}: min {min(ts) * 1000:7.1f} ms, median {statistics.median(ts) * 1000:7.1f} ms")
    packed, apart = min(times["packed"]), min(times["per length"])
    print(f"  packed / per length (min): {packed / apart:.2f}; max |difference| / max |output|: {error:.1e}")


if __name__ == "__main__":
    main()
