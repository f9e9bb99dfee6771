"""The ``emulated`` backend: no torch, no weights; a step sleeps the server's profiled time (§4.2).

It lets the paper's clusters (BLOOM-176B on 20-40 servers, LLaMA-2-7B on 9 MIG slices) run as real
processes on a small CPU machine, with every API path, metric and transport message of the torch
backend. The timing model (our reading of §1 and §4.1): a job on hop (i, j) takes τ^c_j + τ^p_j·m_ij
in total over its ``steps`` = l_out forward steps (one prefill, l_out − 1 decodes), so each step costs
``m_ij · τ^p_j / steps`` of compute (slept by the span) and ``τ^c_j / steps`` of communication (slept
by the block server as its injected delay). A job with the workload's mean l_out thus takes exactly
T_k = Σ (τ^c_j + τ^p_j·m_ij), the plan's service time, plus the real overhead of the system.

A server with a step cost (issue 18, :mod:`chainserve.model.step_cost`) batches instead, as the GPU
it stands for does: the block server hands it every step that waited (continuous batching, chunked
prefill) and it sleeps the iteration's cost once for all of them, ``m·(α + β·b)`` for b decodes plus
``m·β'·q`` per prefill chunk of q tokens.

The emulated model speaks a small built-in vocabulary: the hidden state is the token ids themselves
and the next token is a fixed pseudo-random function of the last one, so greedy output is
deterministic. It never emits EOS, so a request runs to ``max_tokens`` (as l_out does in the model).
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Sequence
from typing import Any

import numpy as np

from chainserve.model.step_cost import StepCost
from chainserve.runtime.backends.base import SpanInfo, SpanStep, WireTensor
from chainserve.runtime.timing import SteadySleep
from chainserve.runtime.tools import Tool, fallback_messages

WORDS = tuple(
    """
the of and to in is that for it as with was on be by at this are from or have an they which one you
had not but what all were when we there can been has more if will would their so about out up into
them some could time these two may then do first any like now my over such our man me even most made
after also did many before must through back years where much your way well down should because each
just those people how too little state good very make world still own see men work long get here
between both life being under never day same another know while last might us great old year off come
since against go came right used take three chain server block cache job queue plan model token fast
slow memory place route serve load time wait start end light river stone cloud green quiet music road
""".split()
)
EOS_TOKEN = "<eos>"
CHAT_TOKENS = ("<|system|>", "<|user|>", "<|assistant|>", "<|end|>")
VOCAB = (EOS_TOKEN, "<unk>", *CHAT_TOKENS, *WORDS)


class EmulatedSpan:
    """A span whose step sleeps ``num_blocks × step_s_per_block`` and returns its input (the block
    server applies slowdown and injected delays, the same for every backend). Without a ``step_cost``
    it does not batch: each step sleeps on its own, so every session runs at the full rate the plan
    assumes; with one, an iteration of steps sleeps their batch cost once (module docstring).

    >>> import asyncio
    >>> span = EmulatedSpan(SpanInfo(1, 4, 8, 64), step_s_per_block=0.0)
    >>> x = WireTensor("int32", (1, 2, 1), np.array([5, 6], dtype=np.int32).tobytes())
    >>> asyncio.run(span.forward([SpanStep(x, 2, ((0,), (1,), (2,)), 0)])) == [x]
    True
    """

    def __init__(self, info: SpanInfo, step_s_per_block: float, step_cost: StepCost | None = None):
        if not step_s_per_block >= 0:
            raise ValueError(f"step_s_per_block: must be ≥ 0, got {step_s_per_block}")
        self.info = info
        self.context = info.max_context  # no window of its own
        self.step_s_per_block = step_s_per_block
        self.step_cost = step_cost
        self.batches = step_cost is not None
        self.sleep = SteadySleep()

    async def forward(self, steps: Sequence[SpanStep]) -> list[WireTensor | Exception]:
        if self.step_cost is not None:
            return await self._iteration(steps, self.step_cost)
        if len(steps) == 1:
            return [await self._step(steps[0])]
        return list(await asyncio.gather(*(self._step(s) for s in steps), return_exceptions=True))

    async def _iteration(self, steps: Sequence[SpanStep], cost: StepCost) -> list[WireTensor | Exception]:
        """Every valid step of the batch in one sleep of the iteration's cost."""
        results = [self._check(step) for step in steps]
        items = [(self._num_blocks(s), s.num_tokens) for s, r in zip(steps, results, strict=True) if r is None]
        if items:
            await self.sleep(cost.iteration_s(items))
        return [s.hidden if r is None else r for s, r in zip(steps, results, strict=True)]

    async def _step(self, step: SpanStep) -> WireTensor | ValueError:
        error = self._check(step)
        if error is not None:
            return error
        await self.sleep(self._num_blocks(step) * self.step_s_per_block)
        return step.hidden

    def _num_blocks(self, step: SpanStep) -> int:
        return self.info.last_block - step.first_block + 1

    def _check(self, step: SpanStep) -> ValueError | None:
        hidden = step.hidden
        if hidden.dtype != "int32" or len(hidden.shape) != 3 or hidden.shape[0] != 1 or hidden.shape[2] != 1:
            return ValueError(f"hidden: the emulated model takes int32 [1, q, 1], got {hidden.dtype} {hidden.shape}")
        if len(step.pages) != self._num_blocks(step):
            return ValueError(f"pages: {len(step.pages)} blocks' pages for {self._num_blocks(step)} blocks")
        return None

    def close(self) -> None:
        """Nothing to release."""


class EmulatedHead:
    """Tokenizer and "LM head" of the emulated model (see the module docstring).

    >>> head = EmulatedHead("llama-2-7b", num_blocks=32, max_tokens=4096)
    >>> ids = head.encode("the chain serves a job")
    >>> head.decode(ids), head.model_id
    ('the chain <unk> <unk> job', 'emulated/llama-2-7b')
    """

    in_thread = False  # a table lookup: cheaper than a thread hop
    tokenizer = None  # a toy vocabulary: no structured output

    def __init__(self, model_name: str, num_blocks: int, max_tokens: int):
        self.model_id = f"emulated/{model_name}"
        self.num_blocks = num_blocks
        self.max_tokens = max_tokens
        self.index = {word: i for i, word in enumerate(VOCAB)}
        self.vocab_size = len(VOCAB)
        self.eos_token_ids = (self.index[EOS_TOKEN],)
        rng = np.random.default_rng(2026)
        self.table = rng.standard_normal((len(VOCAB), len(VOCAB))).astype(np.float32) * 3
        self.table[:, : 2 + len(CHAT_TOKENS)] = -1e9  # never EOS, <unk> or a chat token

    def encode(self, text: str) -> list[int]:
        unk = self.index["<unk>"]
        return [self.index.get(word, unk) for word in re.findall(r"<\|\w+\|>|[^\s<]+|<", text.lower())]

    def decode(self, token_ids: Sequence[int]) -> str:
        return " ".join(VOCAB[i] for i in token_ids if 0 <= i < len(VOCAB) and VOCAB[i] not in CHAT_TOKENS)

    def chat_prompt(self, messages: Sequence[dict[str, Any]], tools: tuple[Tool, ...] = ()) -> list[int]:
        text = " ".join(f"<|{m['role']}|> {m['content']} <|end|>" for m in fallback_messages(messages, tools))
        return self.encode(text + " <|assistant|>")

    def embed(self, token_ids: Sequence[int], position: int = 0) -> WireTensor:
        return WireTensor("int32", (1, len(token_ids), 1), np.asarray(token_ids, dtype=np.int32).tobytes())

    def greedy_text(self, prompt: str, max_tokens: int) -> str:
        """What greedy decoding of ``prompt`` streams (the emulated model in one process: a fault-free
        reference for tests and the soak)."""
        ids, out = self.encode(prompt), []
        for _ in range(max_tokens):
            out.append(int(np.argmax(self.table[(ids + out)[-1]])))
        return self.decode(out)

    def logits(self, hiddens: Sequence[WireTensor], num_positions: Sequence[int] | None = None) -> np.ndarray:
        counts = num_positions or [1] * len(hiddens)
        ids = [np.frombuffer(h.data, dtype=np.int32)[-n:] for h, n in zip(hiddens, counts, strict=True)]
        last = np.concatenate(ids)
        if not np.all((0 <= last) & (last < len(VOCAB))):
            raise ValueError(f"hidden: a token id of {last.tolist()} is outside the emulated vocabulary")
        return self.table[last]
