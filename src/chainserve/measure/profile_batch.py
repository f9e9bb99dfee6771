"""The batched part of ``chainserve profile`` (issue 18, item 2): time decode iterations of b
sessions stepped together and prefill steps of q tokens on a live block server, and the
orchestrator's LM head over n jobs, for the fits of :mod:`.step_fit`.

b sessions share one iteration because their b forward steps are issued in one turn of the event
loop: :class:`~chainserve.runtime.client.BlockClient` sends them as one message and the block
server's batcher runs what arrived together as one iteration (:mod:`chainserve.runtime.batching`).
Decode iterations run at b = 1, 2, 4, … up to the sessions the server's free block-slots hold at m
blocks (at most ``max_batch``), at two block counts m where the span and slots allow; prefills at
the lengths of :func:`.step_fit.prefill_lengths` (one chunk each). A server whose batches and
prefills all run at one block count adds its ``close`` round trips as points at m = 0 (the
transport term alone), as the τ profile does.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from chainserve.measure.step_fit import StepFit, batch_sizes, fit_head, fit_step_cost, prefill_lengths
from chainserve.model.spec import SpecError
from chainserve.model.step_cost import StepCost
from chainserve.runtime.backends.base import WireTensor
from chainserve.runtime.client import BlockClient

#: The block servers' iteration budget when their ``info`` does not say (runtime.batching's default).
DEFAULT_MAX_BATCH_TOKENS = 512


@dataclass(frozen=True, slots=True)
class BatchPlan:
    """What one server's batched profile runs: ``decode`` (m, b) iterations on sessions holding a
    ``context``-token prompt, ``prefill`` (m, q) steps; ``zero``: also time closes (m = 0 points)."""

    decode: tuple[tuple[int, int], ...]
    prefill: tuple[tuple[int, int], ...]
    context: int
    zero: bool


def batch_plan(info: Mapping[str, Any], context: int, decode_steps: int, max_batch: int) -> BatchPlan:
    """The iterations to run on a server from its ``info`` (free block-slots, span, cache, chunk).

    >>> info = {"num_blocks": 5, "num_block_slots": 5, "used_block_slots": 0, "max_tokens": 1004}
    >>> p = batch_plan(info, 1000, 4, 16)
    >>> p.decode, p.prefill, p.zero
    (((1, 1), (1, 2), (1, 4), (1, 5), (2, 1), (2, 2)), ((1, 8), (1, 32), (1, 128), (5, 8), (5, 32), (5, 128)), False)
    """
    free = int(info.get("slot_limit", info["num_block_slots"])) - int(info["used_block_slots"])
    blocks = int(info["num_blocks"])
    top = min(blocks, max(1, free // 2))
    decode = tuple((m, b) for m in sorted({1, top}) for b in batch_sizes(min(max_batch, free // m)))
    chunk = int(info.get("max_batch_tokens", DEFAULT_MAX_BATCH_TOKENS)) // 2
    lengths = prefill_lengths(min(chunk, int(info["max_tokens"])))
    prefill = tuple((m, q) for m in sorted({1, min(blocks, free)}) for q in lengths)
    zero = len({m for m, _ in decode}) < 2 or len({m for m, _ in prefill}) < 2
    return BatchPlan(decode, prefill, min(context, int(info["max_tokens"]) - decode_steps), zero)


def plan_size(plan: BatchPlan, repeats: int) -> int:
    """Progress-bar steps of a plan: one per decode batch and prefill session, per repeat."""
    return (len(plan.decode) + len(plan.prefill)) * repeats


@dataclass(frozen=True, slots=True)
class BatchSamples:
    """``(m, b, t)`` decode iterations, ``(m, q, t)`` prefills and close round trips, in seconds."""

    decode: tuple[tuple[int, int, float], ...]
    prefill: tuple[tuple[int, int, float], ...]
    close_s: tuple[float, ...]

    def fit(self, name: str) -> StepFit:
        zero = tuple((0, 1, t) for t in self.close_s)
        return fit_step_cost(self.decode + zero, self.prefill + zero, name)


async def _timed(call) -> float:
    began = time.perf_counter()
    await call
    return time.perf_counter() - began


async def sample_batches(
    client: BlockClient,
    first_block: int,
    num_blocks: int,
    plan: BatchPlan,
    make_wire: Callable[[int], WireTensor],
    decode_steps: int,
    repeats: int,
    advance: Callable[[], None],
) -> BatchSamples:
    """Run ``plan`` ``repeats`` times on one server; every session is closed whatever happens."""
    decode, prefill, closes = [], [], []
    token, context = make_wire(1), make_wire(plan.context)
    for _ in range(repeats):
        for m, b in plan.decode:
            names = [f"profile-{client.name}-{secrets.token_hex(4)}" for _ in range(b)]
            first = first_block + num_blocks - m
            try:
                await asyncio.gather(*(client.forward(s, first, 0, context, open=True) for s in names))
                for i in range(decode_steps):
                    steps = (client.forward(s, first, plan.context + i, token) for s in names)
                    decode.append((m, b, await _timed(asyncio.gather(*steps))))
            finally:
                replies = [client.close_session(s) for s in names]
            await asyncio.gather(*replies, return_exceptions=True)
            advance()
        for m, q in plan.prefill:
            session, first = f"profile-{client.name}-{secrets.token_hex(4)}", first_block + num_blocks - m
            try:
                prefill.append((m, q, await _timed(client.forward(session, first, 0, make_wire(q), open=True))))
            finally:
                reply = client.close_session(session)
            began = time.perf_counter()
            await reply
            if plan.zero:
                closes.append(time.perf_counter() - began)
            advance()
    return BatchSamples(tuple(decode), tuple(prefill), tuple(closes))


def model_config(model: str | None, num_blocks: int | None = None) -> dict[str, Any]:
    """The torch model's ``config.json``: ``model`` is a name, a path, or the id block servers report
    (a directory of the model cache); ``num_blocks``: the layers it must have."""
    from chainserve.runtime.models import default_cache_dir, resolve_model

    if model is None:
        raise SpecError("model", "the torch backend needs --model (a name such as tiny-random, or a path)")
    cached = default_cache_dir() / model
    try:
        folder = cached if (cached / "config.json").is_file() else resolve_model(model)
    except ValueError as exc:
        raise SpecError("model", f"{exc}; give --model, the NAME|PATH the servers were started with") from None
    config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    if num_blocks is not None and config.get("num_hidden_layers") != num_blocks:
        raise SpecError(
            "model", f"{model} has {config.get('num_hidden_layers')} blocks but the cluster's model has {num_blocks}"
        )
    return config


HEAD_JOBS = (1, 2, 4, 8, 16)


def measure_head(
    backend: str, model: str | None, repeats: int = 5, device: str = "auto", jobs: tuple[int, ...] = HEAD_JOBS
) -> StepCost | None:
    """The orchestrator's batched head iteration per job (issue 18, ``head_cost``): with the torch
    backend, the LM head (``head.logits``) over n hidden states of the model's width for each n of
    ``jobs`` and one token's ``head.embed`` per job, the median of ``repeats`` timings each, fitted
    as α_h + β_h·n. The emulated head is a table lookup: ``None`` (free)."""
    if backend != "torch":
        return None
    import numpy as np

    from chainserve.runtime.backends.factory import make_head
    from chainserve.runtime.models import default_cache_dir

    config = model_config(model)
    cached = default_cache_dir() / str(model)
    where = str(cached) if (cached / "config.json").is_file() else model
    head = make_head("torch", where, "", int(config["num_hidden_layers"]), 8, device)
    hidden = int(config["hidden_size"])
    rng = np.random.default_rng(0)
    wire = WireTensor("float32", (1, 1, hidden), rng.standard_normal((1, 1, hidden), np.float32).tobytes())

    def iteration(n: int) -> float:
        began = time.perf_counter()
        head.logits([wire] * n)
        for _ in range(n):
            head.embed([7])
        return time.perf_counter() - began

    for n in jobs:  # warm-up
        iteration(n)
    rows = [(n, float(np.median([iteration(n) for _ in range(repeats)]))) for n in jobs]
    return fit_head(rows)


async def served_backend(endpoints: Mapping[str, str], token: str, model: str | None) -> tuple[str, str | None]:
    """The backend the servers at ``endpoints`` run and the model the head is (``model``, else the
    id they report), from the first server's ``info``."""
    import zmq

    ctx = zmq.Context()
    name, endpoint = next(iter(endpoints.items()))
    client = BlockClient(name, endpoint, token, ctx)
    try:
        info = await client.info()
    finally:
        client.close()
        ctx.term()
    return str(info["backend"]), model or str(info["model_id"])
