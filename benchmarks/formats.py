"""Weight formats on SmolLM2 (issue 29): what fp32, bf16, fp16 and torchao int8 weight-only cost and buy,
measured in one run so the figures share the machine's state.

Per format:
(a) bytes per block: the planner's s_m (measured on the meta device, ``model_spec_of``) and the bytes a
    span's blocks really hold once loaded (every tensor's storage: int8 data, scales and zero points);
(b) decode tokens/s of one server holding all 30 blocks (one span in this process, one thread), at 1 and
    8 sessions decoding together (``--context`` cached positions each);
(c) the plan for a fixed cluster memory (``--servers`` servers of ``--memory-gb`` each, every server in
    that format; the best planner, λ = 1/s): ν = Σ c_k μ_k, the Theorem-4 lower bound on E[T] and the
    servers per chain;
(d) quality against fp32: over ``--prompts`` chat prompts × ``--tokens`` greedy tokens, a chain of
    three spans (blocks 1–10 fp32, 11–20 bf16, 21–30 int8, like the mixed cluster of
    examples/smollm2-formats.yaml) and each format alone: how many prompts give fp32's greedy tokens,
    and the mean per-token KL(fp32 ‖ format) on fp32's greedy continuation (teacher-forced);
(e) served: ``chainserve serve examples/smollm2-formats.yaml --backend torch`` (three block-server
    processes: fp32, bf16, int8), the same prompts over its chat API, against Hugging Face ``generate``
    on the fp32 model: how many answers have the same greedy tokens.

    python benchmarks/formats.py                  # all (~12 min on 2 cores; SmolLM2 converts once, ~30 s)
    python benchmarks/formats.py --only a,b       # some of a, b, c, d, e
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import numpy as np

FORMATS = ("fp32", "bf16", "fp16", "int8")
PROMPTS = (
    "What is the capital of France?", "Write a haiku about the sea.", "Explain what a CPU does.",
    "List three primary colours.", "How do plants make food?", "What is 12 times 7?",
    "Name a famous painter.", "Why is the sky blue?", "Give me a synonym for happy.",
    "What does a compiler do?", "Describe a cat in one sentence.", "What is the boiling point of water?",
    "Who wrote Romeo and Juliet?", "What is machine learning?", "Suggest a name for a dog.",
    "How many days are in a leap year?", "What is the largest planet?", "Translate 'hello' to Spanish.",
    "What is photosynthesis?", "Tell me a fun fact about octopuses.",
)  # fmt: skip


def stored_bytes(module) -> int:
    """Bytes of every parameter's storage, tensor subclasses (torchao) by their inner tensors."""
    total = 0
    for p in module.parameters():
        t = p.data if hasattr(p, "data") else p
        if hasattr(t, "__tensor_flatten__"):
            names, _ = t.__tensor_flatten__()
            total += sum(getattr(t, n).numel() * getattr(t, n).element_size() for n in names)
        else:
            total += t.numel() * t.element_size()
    return total


def block_bytes(path) -> list[tuple[str, float, float]]:
    """(a): (format, planner's bytes per block, loaded bytes per block)."""
    from chainserve.runtime.backends.base import SpanInfo
    from chainserve.runtime.backends.torch_backend import TorchSpan
    from chainserve.runtime.models import model_spec_of

    spec = model_spec_of(path, "fp32", 512)
    rows = []
    for fmt in FORMATS:
        planned, _ = spec.sizes_for(fmt)
        span = TorchSpan(path, SpanInfo(1, 3, 1, 16), weights=fmt)  # three blocks: all alike in SmolLM2
        rows.append((fmt, planned * 1e9, stored_bytes(span.layers) / 3))
        span.close()
    return rows


def decode_rates(path, context: int, iterations: int) -> list[tuple[str, float, float]]:
    """(b): (format, tokens/s at 1 session, at 8) of one span of all 30 blocks."""
    from chainserve.runtime.backends.base import SpanInfo, SpanStep
    from chainserve.runtime.backends.torch_backend import TorchHead, TorchSpan

    head = TorchHead(path)
    prompt = head.embed([(7 * i) % 1000 + 10 for i in range(context)])
    rows = []
    for fmt in FORMATS:
        span = TorchSpan(path, SpanInfo(1, 30, 30 * 8, context + iterations + 8), weights=fmt)
        slots = [span.info.slot_pages(range(30 * k, 30 * (k + 1))) for k in range(8)]
        for k in range(8):
            span.run_steps([SpanStep(prompt, 1, slots[k], 0)])
        token = head.embed([42], context)
        rates = []
        for n in (1, 8):
            times = []
            for _ in range(iterations):
                steps = [SpanStep(token, 1, slots[k], context) for k in range(n)]
                began = time.perf_counter()
                span.run_steps(steps)
                times.append(time.perf_counter() - began)
            rates.append(n / statistics.median(times))
        rows.append((fmt, *rates))
        span.close()
    return rows


def plans(path, servers: int, memory_gb: float) -> list[tuple[str, float, float, int, str]]:
    """(c): (format, ν, Theorem-4 lower bound, Σ c_k, servers per chain) of the best plan for the same
    memory (the planner minimises the lower bound: a format that fits the model on fewer servers may buy
    shorter chains, fewer network hops, rather than more jobs)."""
    from chainserve.model.spec import Problem, Server, Workload
    from chainserve.plan.best import best_plan
    from chainserve.runtime.models import model_spec_of

    model = model_spec_of(path, "fp32", 512)
    rows = []
    for fmt in FORMATS:
        block, cache = model.sizes_for(fmt)
        cluster = tuple(
            Server(f"s{j}", memory_gb, 0.05, 0.024, weights=fmt, block_size_gb=block, cache_size_gb=cache)
            for j in range(servers)
        )
        plan = best_plan(Problem(cluster, model, Workload(1.0, 0.7, 40, 24), name=f"smollm2-{fmt}"))
        hops = "+".join(str(len(chain.hops)) for chain in plan.chains)
        rows.append((fmt, plan.total_rate_per_s, plan.bounds.lower_s, plan.num_job_servers, hops))
    return rows


def quality(path, num_prompts: int, num_tokens: int) -> list[tuple[str, int, float]]:
    """(d): (chain, prompts whose greedy tokens equal fp32's, mean per-token KL(fp32 ‖ chain))."""
    import torch

    from chainserve.runtime.backends.base import SpanInfo
    from chainserve.runtime.backends.torch_backend import TorchHead, TorchSpan
    from chainserve.runtime.backends.torch_common import torch_to_wire, wire_to_torch

    head = TorchHead(path)
    info = SpanInfo(1, 30, 30, 512)
    chains = {"fp32": [TorchSpan(path, info)]}
    chains |= {fmt: [TorchSpan(path, info, weights=fmt)] for fmt in FORMATS[1:]}
    chains["mixed fp32|bf16|int8"] = [
        TorchSpan(path, SpanInfo(first, 10, 10, 512), weights=fmt)
        for first, fmt in ((1, "fp32"), (11, "bf16"), (21, "int8"))
    ]

    def logits_of(chain, ids: list[int]) -> np.ndarray:
        x = wire_to_torch(head.embed(ids), head.hidden_size)
        for span in chain:
            x = span.run(x, span.info.first_block, [list(range(span.info.num_blocks))], [0])
        return head.logits([torch_to_wire(x.float())], [len(ids)])

    def greedy(chain, prompt: list[int]) -> list[int]:
        """Decoded with the spans' KV cache, one session (block-slots 0..m−1, rewritten per prompt)."""
        out, ids, position = [], list(prompt), 0
        for _ in range(num_tokens):
            x = wire_to_torch(head.embed(ids, position), head.hidden_size)
            for span in chain:
                x = span.run(x, span.info.first_block, [list(range(span.info.num_blocks))], [position])
            position += len(ids)
            ids = [int(head.logits([torch_to_wire(x.float())])[0].argmax())]
            out.append(ids[0])
        return out

    prompts = [head.chat_prompt([{"role": "user", "content": p}]) for p in PROMPTS[:num_prompts]]
    reference = [greedy(chains["fp32"], p) for p in prompts]
    rows = []
    for name, chain in chains.items():
        if name == "fp32":
            continue
        same, kls = 0, []
        for prompt, ref in zip(prompts, reference, strict=True):
            same += greedy(chain, prompt) == ref
            ids = prompt + ref[:-1]
            p = torch.log_softmax(torch.from_numpy(logits_of(chains["fp32"], ids)[-num_tokens:]), -1)
            q = torch.log_softmax(torch.from_numpy(logits_of(chain, ids)[-num_tokens:]), -1)
            kls.append(float((p.exp() * (p - q)).sum(-1).mean()))
        rows.append((name, same, statistics.fmean(kls)))
    return rows


def served(path, num_prompts: int, num_tokens: int) -> tuple[int, int, str]:
    """(e): (answers equal to fp32 ``generate``, answers, the chain's servers and formats)."""
    import tempfile
    from pathlib import Path

    import httpx
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from chainserve.runtime.serve_process import serve_process

    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    chats = [[{"role": "user", "content": p}] for p in PROMPTS[:num_prompts]]
    want = []
    for chat in chats:
        ids = tokenizer.apply_chat_template(chat, add_generation_prompt=True, return_tensors="pt", return_dict=True)
        with torch.inference_mode():
            out = model.generate(**ids, max_new_tokens=num_tokens, do_sample=False)
        want.append(out[0, ids["input_ids"].shape[1] :].tolist())
    del model
    example = Path(__file__).parents[1] / "src" / "chainserve" / "examples" / "smollm2-formats.yaml"
    log = Path(tempfile.mkdtemp(prefix="chainserve-formats-")) / "serve.err"
    with serve_process([str(example), "--backend", "torch", "--port", "0"], log, ready_s=600) as proc:
        plan = httpx.get(proc.url + "/plan", timeout=30).json()
        weights = {s["name"]: s["weights"] for s in plan["servers"]}
        chain = " → ".join(f"{name} ({weights[name]})" for name in plan["chains"][0]["servers"])
        same = 0
        for chat, tokens in zip(chats, want, strict=True):
            body = {"model": "smollm2-135m", "messages": chat, "max_tokens": num_tokens, "temperature": 0}
            answer = httpx.post(proc.url + "/v1/chat/completions", json=body, timeout=300).json()
            same += answer["chainserve"]["token_ids"] == tokens
    return same, len(chats), chain


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", default="a,b,c,d,e", help="which of a, b, c, d, e (comma-separated)")
    parser.add_argument("--context", type=int, default=64, help="(b) cached positions per session")
    parser.add_argument("--iterations", type=int, default=20, help="(b) timed decode steps per figure")
    parser.add_argument("--servers", type=int, default=3, help="(c) servers in the fixed cluster")
    parser.add_argument("--memory-gb", type=float, default=0.25, help="(c) memory of each server")
    parser.add_argument("--prompts", type=int, default=20, help="(d) chat prompts")
    parser.add_argument("--tokens", type=int, default=24, help="(d) greedy tokens per prompt")
    args = parser.parse_args()
    import torch

    from chainserve.runtime.models import resolve_model

    torch.set_num_threads(1)
    path = resolve_model("smollm2-135m")
    only = set(args.only.split(","))
    if "a" in only:
        print("(a) bytes per block            planner (s_m)    loaded      ratio to fp32 (loaded)")
        rows = block_bytes(path)
        for fmt, planned, loaded in rows:
            print(f"    {fmt:<6} {planned / 1e6:>27.3f} MB {loaded / 1e6:>8.3f} MB  {loaded / rows[0][2]:.3f}")
    if "b" in only:
        print(f"(b) decode tokens/s, one server of 30 blocks, {args.context} cached positions")
        for fmt, one, eight in decode_rates(path, args.context, args.iterations):
            print(f"    {fmt:<6} 1 session {one:7.1f}   8 sessions {eight:7.1f}")
    if "c" in only:
        print(f"(c) best plan, {args.servers} servers × {args.memory_gb} GB, every server in the format")
        for fmt, nu, lower, jobs, hops in plans(path, args.servers, args.memory_gb):
            print(
                f"    {fmt:<6} ν = {nu:6.3f}/s   Σ c_k = {jobs:3d}   E[T] ≥ {lower:.3f} s (Theorem 4)"
                f"   servers per chain {hops}"
            )
    if "d" in only:
        print(f"(d) against fp32, {args.prompts} chat prompts × {args.tokens} greedy tokens")
        for name, same, kl in quality(path, args.prompts, args.tokens):
            print(f"    {name:<22} same greedy tokens on {same:2d}/{args.prompts}   mean per-token KL {kl:.2e}")
    if "e" in only:
        same, total, chain = served(path, args.prompts, args.tokens)
        print(f"(e) served by {chain}: {same}/{total} answers have fp32 generate's {args.tokens} greedy tokens")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
