"""An efficient step (issue 30, item 3): one block server's decode iteration on prepared weights
(:mod:`chainserve.runtime.backends.prepared`: oneDNN-reordered GEMMs, q/k/v and gate/up merged) against
the model's own ``nn.Linear`` modules, in one run so the ratio shares the machine's state; with
``--kernels`` a third span, prepared and on the fused CPU kernels (:mod:`~.backends.cpu_kernels`).

Two spans of the same blocks of SmolLM2 (fp32, one thread, in this process), each session prefilled
with ``--context`` tokens; then B sessions decode one token each in one batched iteration
(``TorchSpan.run_steps``, as the server runs it), the two spans interleaved, ``--repeats`` times per B.
Prints each span's iteration time per B (median, and min: the least disturbed by other processes
on a shared machine), the speedup, the added cost per session (t_B − t_1)/(B − 1), the least-squares
slope over every B, and the largest difference of the two spans' outputs relative to their scale.

    python benchmarks/step.py                       # 30 blocks, B = 1, 4, 8, 16, 64 cached positions
    python benchmarks/step.py --sessions 1,8 --blocks 10 --repeats 5
    python benchmarks/step.py --sessions 1,8,16 --kernels   # + prepared on the fused kernels
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--blocks", type=int, default=30)
    parser.add_argument("--context", type=int, default=64, help="cached positions per session")
    parser.add_argument("--sessions", default="1,4,8,16", help="batch sizes B, comma-separated")
    parser.add_argument("--repeats", type=int, default=9, help="timed iterations per span per B")
    parser.add_argument("--kernels", action="store_true", help="a third span: prepared, on the fused CPU kernels")
    args = parser.parse_args()

    import torch

    from chainserve.runtime.backends.base import SpanInfo, SpanStep
    from chainserve.runtime.backends.torch_backend import TorchSpan
    from chainserve.runtime.backends.torch_common import torch_to_wire, wire_to_torch
    from chainserve.runtime.models import resolve_model

    torch.set_num_threads(1)
    sizes = [int(b) for b in args.sessions.split(",")]
    n, most = args.blocks, max(sizes)
    info = SpanInfo(1, n, most * n, args.context + 2)
    path = resolve_model(args.model)
    spans = {
        "plain": TorchSpan(path, info, prepare=False, kernels=False),
        "prepared": TorchSpan(path, info, kernels=False),
    }
    if args.kernels:
        spans["kernels"] = TorchSpan(path, info)
        if not all(layer.fused_decode for layer in spans["kernels"].lean):
            parser.error("the fused CPU kernels could not be built here (see the log)")
    hidden = spans["plain"].hidden_size
    gen = torch.Generator().manual_seed(0)
    prompts = [torch.randn(1, args.context, hidden, generator=gen) for _ in range(most)]
    slots = [info.slot_pages(range(r * n, (r + 1) * n)) for r in range(most)]
    for span in spans.values():  # the prefill; the prepared span learns its merged siblings here
        span.run_steps([SpanStep(torch_to_wire(p), 1, s, 0) for p, s in zip(prompts, slots, strict=True)])
    new = [torch_to_wire(torch.randn(1, 1, hidden, generator=gen)) for _ in range(most)]

    def iteration(name: str, b: int) -> tuple[float, list]:
        steps = [SpanStep(new[r], 1, slots[r], args.context) for r in range(b)]
        start = time.perf_counter()
        out = spans[name].run_steps(steps)
        return time.perf_counter() - start, out

    outs = {name: torch.cat([wire_to_torch(w, hidden) for w in iteration(name, most)[1]]) for name in spans}
    want = outs["plain"]
    errors = {name: float((got - want).abs().max() / want.abs().max()) for name, got in outs.items()}
    stats = {"median": statistics.median, "min": min}  # min: the least disturbed by other processes
    ms: dict[str, dict[str, dict[int, float]]] = {stat: {name: {} for name in spans} for stat in stats}
    for b in sizes:
        times: dict[str, list[float]] = {name: [] for name in spans}
        for name in spans:  # warm
            iteration(name, b)
        for _ in range(args.repeats):
            for name in spans:
                times[name].append(iteration(name, b)[0])
        for stat, f in stats.items():
            for name in spans:
                ms[stat][name][b] = f(times[name]) * 1000

    print(f"{args.model}: {n} blocks, fp32, 1 thread, {args.context} cached positions, {args.repeats} iterations per B")
    first, others = sizes[0], [name for name in spans if name != "plain"]
    for stat in stats:
        t = ms[stat]
        head = "".join(f"{name + ' ms':>13}{'speedup':>9}" for name in others)
        print(f"{stat}:\n   B   plain ms{head}   added ms/session: " + "  ".join(spans))
        for b in sizes:
            row = "".join(f"{t[name][b]:13.1f}{t['plain'][b] / t[name][b]:8.2f}x" for name in others)
            added = "" if b == first else "".join(f"{(t[n][b] - t[n][first]) / (b - first):9.2f}" for n in spans)
            print(f"{b:4d} {t['plain'][b]:10.1f}{row}   {added}")
        if len(sizes) > 1:
            slopes = {n: np.polyfit(sizes, [t[n][b] for b in sizes], 1)[0] for n in spans}
            print("least-squares added ms/session over B: " + ", ".join(f"{n} {v:.2f}" for n, v in slopes.items()))
    for name in others:
        print(f"max |{name} − plain| / max |plain| at B = {most}: {errors[name]:.1e}")


if __name__ == "__main__":
    main()
