"""Torch backend of a block server (paper §4.2): real blocks of one span of any decoder-only causal LM
that transformers ships (issue 29), KV cache in a fixed pool of pages (issue 30).

:class:`TorchSpan` cuts its blocks from the model's own classes (:mod:`.hf_parts`: the whole model
built on the meta device, only the span's layers loaded, global 1-based block b = layer b − 1 keeping
its index) and runs them as the model's own forward would: the base model's rotary module (one per
layer type where the family has several, Gemma 3), ALiBi where the layers take it (BLOOM, Falcon-RW, MPT),
a mask per layer (full or sliding window) in the format of the model's attention implementation
(boolean for sdpa, additive for eager: Gemma 2 softcapping and gpt-oss sinks run eager), and each layer
called with the keyword arguments its ``forward`` accepts. The KV memory is allocated once at
construction in the measured shapes of one block's cache per token (:class:`~.hf_parts.KvShape`):
keys ``[num_pages, page_tokens, k_heads, k_dim]`` and values likewise; a page is one block's K and V
of ``page_tokens`` positions of one session (``pages_per_slot`` pages make the plan's s_c).
``weights="int8"`` quantizes the span's linear layers with
torchao (weight-only int8; compute and cache stay in ``dtype``).

A server's iteration (:meth:`TorchSpan.forward`, issue 17) runs, in a worker thread so the server's
event loop keeps receiving: the steps of as many new tokens (every decode; prefill chunks of one
length) of sessions entering at the same block in **one** batched forward. The batch's
:class:`PagedCache` writes each row's new K/V at its own absolute positions into its own pages and
returns the rows' cached K/V gathered up to the longest, with a mask (built once per window per
iteration) that hides each row's padding (ragged positions) and what lies outside a sliding window.

:class:`~.torch_head.TorchHead` (the orchestrator's half) is re-exported here.
"""

from __future__ import annotations

import asyncio
import inspect
import sys
import time
from collections import defaultdict
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers.cache_utils import Cache

from chainserve.model.formats import WEIGHT_FORMATS
from chainserve.runtime.backends.base import SpanInfo, SpanStep, WireTensor
from chainserve.runtime.backends.hf_parts import (
    check_supported,
    context_limit,
    dry_run,
    layer_list,
    layer_windows,
    load_config,
    load_parts,
    skeleton,
)
from chainserve.runtime.backends.lean import lean_layer
from chainserve.runtime.backends.prepared import prepare_linears
from chainserve.runtime.backends.torch_common import FROM_WIRE, torch_to_wire, wire_to_torch
from chainserve.runtime.backends.torch_head import TorchHead

__all__ = ["PagedCache", "TorchHead", "TorchSpan"]

#: What a layer's ``forward`` may call its cache, newest first.
CACHE_KWARGS = ("cache", "past_key_values", "layer_past", "past_key_value")
#: The torch dtype of each float weight format (int8 weight-only, torchao, computes in the span's dtype).
WEIGHT_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
#: Families whose base model also folds ALiBi (÷ √head_dim) into the additive mask.
ALIBI_IN_MASK = frozenset({"falcon"})
#: Families whose layers take the mask as booleans marking the keys *hidden* (MPT casts its additive mask).
MASK_MARKS_HIDDEN = frozenset({"mpt"})


class PagedCache(Cache):
    """A transformers ``Cache`` over the page pool for one forward of B rows (sessions) of q new
    tokens each (issue 30). ``table[r, i]``: row r's pages for layer ``first_layer + i`` (global index),
    the first ``ceil(length / page_tokens)`` of them; ``update`` writes row r's positions
    ``positions[r]..positions[r]+q−1`` into its pages and returns every row's K/V for ``0..length−1``
    (``length`` = the longest row's end): one gather of the rows' pages (the cheapest copy torch offers
    on CPU, one per layer), or, for a lone row whose pages are consecutive, views without a copy.
    Pages are ``[page_tokens, heads, dim]``, so a row's pages read in order are its positions in order."""

    def __init__(
        self, keys: torch.Tensor, values: torch.Tensor, table: torch.Tensor, first_layer: int,
        positions: torch.Tensor, q: int, length: int, runs: Sequence[int | None] = (),
    ):  # fmt: skip
        try:
            super().__init__(layers=[])
        except TypeError:  # transformers before 5.x took no layers
            super().__init__()
        self.keys, self.values, self.table, self.first_layer = keys, values, table, first_layer
        self.positions, self.length, self.runs = positions, length, runs
        page_tokens = keys.shape[1]
        written = positions[:, None] + torch.arange(q, device=positions.device)[None, :]  # [B, q]
        column, self.offset = written // page_tokens, written % page_tokens
        rows, blocks, _ = table.shape
        # Once for every layer (issue 30): the page of each new position [blocks, B, q], each layer's pages flat
        self.written = table.gather(2, column[:, None, :].expand(rows, blocks, -1)).transpose(0, 1)
        self.flat = table.transpose(0, 1).reshape(blocks, -1)

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs
    ) -> tuple[torch.Tensor, torch.Tensor]:
        i = layer_idx - self.first_layer
        at = (self.written[i], self.offset)
        self.keys.index_put_(at, key_states.transpose(1, 2))  # [B, q, heads, dim]
        self.values.index_put_(at, value_states.transpose(1, 2))
        rows, n = self.table.shape[0], self.table.shape[2]
        start = self.runs[i] if self.runs else None
        if start is not None:  # one row, consecutive pages: a view
            k, v = self.keys[start : start + n], self.values[start : start + n]
        else:  # index_select: ~7x faster than ``keys[flat]`` on the CPU (issue 30)
            k, v = self.keys.index_select(0, self.flat[i]), self.values.index_select(0, self.flat[i])
        k = k.view(rows, -1, *k.shape[2:])[:, : self.length].transpose(1, 2)
        v = v.view(rows, -1, *v.shape[2:])[:, : self.length].transpose(1, 2)
        return k, v

    def attend_decode(
        self, kernels, qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, layer_idx: int, q_heads: int,
        scale: float,
    ) -> torch.Tensor:  # fmt: skip
        """The fused CPU kernel (:mod:`.cpu_kernels`) for decode rows (q = 1): RoPE on ``qkv``'s [B, (q_heads
        + 2 kv) · dim] q and k heads, the new k and v written into each row's page, and each q head's
        attention over its row's positions 0..p read from the pages in place; returns [B, q_heads · dim]."""
        i = layer_idx - self.first_layer
        rows = self.table.shape[0]
        return kernels.paged_decode_attention(
            qkv, cos, sin, self.keys, self.values, self.flat[i].view(rows, -1), self.positions,
            q_heads, self.keys.shape[2], scale,
        )  # fmt: skip

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return int(self.positions.min())


@dataclass(slots=True)
class _Forward:
    """One part of an iteration (rows of one length entering at one block): its hidden states [B, q, H]
    in the span's dtype, masks and RoPE per window / layer type, cache, the model layers' keyword
    arguments, and the lean layers' RoPE (unsqueezed) and additive masks."""

    h: torch.Tensor
    masks: dict
    rotary: dict
    cache: PagedCache
    given: dict
    heads: dict
    added: dict


class TorchSpan:
    """SpanBackend running blocks ``info.first_block..info.last_block`` of the model in ``model_dir``
    on ``device``, computing and caching in ``dtype``; ``weights``: the format its weights are held in
    (one of :data:`~chainserve.model.formats.WEIGHT_FORMATS`; ``None``: ``dtype``); ``prepare``: its
    linears on prepared weights (:mod:`.prepared`); ``kernels``: its lean layers on the fused CPU kernels
    where they apply (:mod:`.cpu_kernels`)."""

    #: The block server schedules iterations: one :meth:`forward` at a time over a batch of steps.
    batches = True

    def __init__(
        self,
        model_dir: Path,
        info: SpanInfo,
        dtype: torch.dtype = torch.float32,
        device: str | torch.device = "cpu",
        weights: str | None = None,
        prepare: bool = True,
        kernels: bool = True,
    ):
        config = load_config(model_dir)
        text = config.get_text_config()
        if weights is not None and weights not in WEIGHT_FORMATS:
            raise ValueError(f"weights: {weights!r} is not one of {', '.join(WEIGHT_FORMATS)}")
        dtype = WEIGHT_DTYPES.get(weights or "", dtype)
        if info.first_block < 1 or info.last_block > text.num_hidden_layers or info.num_blocks < 1:
            raise ValueError(
                f"info: blocks {info.first_block}..{info.last_block} are not within the model's "
                f"1..{text.num_hidden_layers}"
            )
        if info.num_block_slots < 1 or info.max_tokens < 1 or info.page_tokens < 1:
            raise ValueError(f"info: need num_block_slots, max_tokens and page_tokens >= 1, got {info}")
        limit = context_limit(text)
        for name in ("max_tokens", "max_context"):
            value = getattr(info, name)
            if limit is not None and value is not None and value > limit:
                raise ValueError(f"info.{name}: {value} exceeds the model's context of {limit} tokens")
        caps = [c for c in (limit, info.max_context) if c is not None]
        self.context = min(caps) if caps else None  # the longest session: the model's window or the cap
        if dtype not in FROM_WIRE.values() or not dtype.is_floating_point:
            raise ValueError(f"dtype: {dtype} is not float32, float16 or bfloat16")
        check_supported(config, dtype)
        self.info, self.dtype, self.config, self.device = info, dtype, text, torch.device(device)
        self.hidden_size = text.hidden_size
        model = skeleton(config, dtype)
        first = info.first_block - 1  # the span's first layer, 0-based global index
        load_parts(model, Path(model_dir), range(first, info.last_block), dtype, self.device)
        _, layers = layer_list(model)
        self.layers = torch.nn.ModuleList(layers[first : info.last_block]).to(self.device).eval()
        if weights == "int8":
            _quantize_int8(self.layers)
        if prepare:  # packed (panels or oneDNN's layout) and merged GEMMs on the CPU (issue 30)
            prepare_linears(self.layers, kernels)
        base = model.base_model
        self.rotary = getattr(base, "rotary_emb", None)
        if self.rotary is not None:
            self.rotary = self.rotary.to(self.device)
        self.rotary_per_type = self.rotary is not None and "layer_type" in _kwargs_of(self.rotary)
        self.num_heads = text.num_attention_heads
        self.alibi = None
        if "alibi" in _kwargs_of(self.layers[0]) and getattr(text, "alibi", True):  # Falcon: alibi or rotary
            self.alibi = _alibi_builder(base)
        self.alibi_in_mask = self.alibi is not None and text.model_type in ALIBI_IN_MASK
        self.position_bias = None  # MPT's ALiBi: one tensor for every length, relative to the last key
        if "position_bias" in _kwargs_of(self.layers[0]):
            self.position_bias = base.build_mpt_alibi_tensor(self.num_heads, text.max_seq_len, device=self.device)
        self.attention = "eager" if self.alibi_in_mask else model.config._attn_implementation
        windows = layer_windows(text)
        types = getattr(text, "layer_types", None)
        self.windows = windows[first : info.last_block]
        self.types = list(types[first : info.last_block]) if types else [None] * info.num_blocks
        self.calls = [_call_plan(layer) for layer in self.layers]
        plain_rotary = self.rotary is not None and not self.rotary_per_type
        self.lean = [
            lean_layer(layer, self.attention, window, kernels) if plain_rotary else None
            for layer, window in zip(self.layers, self.windows, strict=True)
        ]
        shape = dry_run(config).kv[first]
        # Bounded KV memory: allocated once, never grows (pages_per_slot pages make one s_c).
        pages = (info.num_pages, info.page_tokens)
        self.keys = torch.zeros(*pages, shape.k_heads, shape.k_dim, dtype=dtype, device=self.device)
        self.values = torch.zeros(*pages, shape.v_heads, shape.v_dim, dtype=dtype, device=self.device)
        self._worker = ThreadPoolExecutor(1, thread_name_prefix="span")

    async def forward(self, steps: Sequence[SpanStep]) -> list[WireTensor | ValueError]:
        """See :meth:`~.base.SpanBackend.forward`: one iteration, in the worker thread."""
        if self.layers is None:
            raise RuntimeError("TorchSpan is closed")
        return await asyncio.get_running_loop().run_in_executor(self._worker, self.run_steps, list(steps))

    def run_steps(self, steps: Sequence[SpanStep]) -> list[WireTensor | ValueError]:
        """The synchronous iteration: the steps entering at the same block in one forward each (issue
        30: decodes and prefill chunks together, rows of one length side by side, :meth:`run_parts`);
        a step that fails its checks fails alone (its ``ValueError``)."""
        results: list[WireTensor | ValueError | None] = [None] * len(steps)
        groups: defaultdict[int, defaultdict[int, list[tuple[int, torch.Tensor]]]] = defaultdict(
            lambda: defaultdict(list)
        )
        for i, step in enumerate(steps):
            try:
                x = wire_to_torch(step.hidden, self.hidden_size)
                offset = self._check(x, step.first_block, step.pages, step.position)
            except ValueError as exc:
                results[i] = exc
                continue
            groups[offset][x.shape[1]].append((i, x))
        for offset, by_length in groups.items():
            parts = []
            for rows in by_length.values():
                hidden = torch.cat([x for _, x in rows])
                parts.append((hidden, [steps[i].pages for i, _ in rows], [steps[i].position for i, _ in rows]))
            outs = self.run_parts(self.info.first_block + offset, parts)
            for rows, (hidden, _, _), out in zip(by_length.values(), parts, outs, strict=True):
                for (i, _), row in zip(rows, out.to(hidden.dtype).cpu(), strict=True):
                    results[i] = torch_to_wire(row.unsqueeze(0))
        return results  # type: ignore[return-value]

    def run(
        self,
        hidden: torch.Tensor,
        first_block: int,
        pages: Sequence[Sequence[Sequence[int]]],
        positions: Sequence[int],
    ) -> torch.Tensor:
        """The synchronous forward on [B, q, hidden] (B rows of q new tokens each) entering at
        ``first_block``; row r's pages ``pages[r]`` (one sequence per block), its first new position
        ``positions[r]``. Returns the span's dtype, on its device."""
        return self.run_parts(first_block, [(hidden, pages, positions)])[0]

    def run_parts(
        self,
        first_block: int,
        parts: Sequence[tuple[torch.Tensor, Sequence[Sequence[Sequence[int]]], Sequence[int]]],
    ) -> list[torch.Tensor]:
        """:meth:`run` on each ``(hidden, pages, positions)`` part (its rows of one length); where every
        layer from ``first_block`` is lean, in one packed forward (:meth:`.LeanLayer.packed`: the
        weights streamed once for all of them), else one forward per part."""
        offset = first_block - self.info.first_block
        with torch.inference_mode():
            forwards = [self._prepare(hidden, first_block, pages, positions) for hidden, pages, positions in parts]
            if not all(self.lean[offset:]):
                return [self._through(f, offset) for f in forwards]
            h = torch.cat([f.h.reshape(-1, self.hidden_size) for f in forwards])
            for i in range(offset, self.info.num_blocks):
                window, kind = self.windows[i], self.types[i]
                h = self.lean[i].packed(
                    h, [(f.h.shape[:2], f.added[window], *f.heads[kind], f.cache) for f in forwards]
                )
            sizes = [f.h.shape[0] * f.h.shape[1] for f in forwards]
            return [out.view(f.h.shape) for f, out in zip(forwards, h.split(sizes), strict=True)]

    def _prepare(
        self, hidden: torch.Tensor, first_block: int, pages: Sequence[Sequence[Sequence[int]]], positions: Sequence[int]
    ) -> _Forward:
        """A part's masks, RoPE and cache, built once for every layer of its forward."""
        offset = first_block - self.info.first_block
        rows, q = hidden.shape[0], hidden.shape[1]
        dev = self.device
        h = hidden.to(dev, self.dtype)
        starts = torch.tensor(list(positions), device=dev)
        pos = starts[:, None] + torch.arange(q, device=dev)[None, :]
        length = int(starts.max()) + q
        alibi = None
        if self.alibi is not None:
            alibi = self.alibi(torch.ones(rows, length, device=dev), self.num_heads, self.dtype)
        masks = {w: self._mask(starts, q, length, w, alibi) for w in set(self.windows[offset:])}
        rotary = self._rotary(h, pos, set(self.types[offset:]))
        table, runs = self._table(pages, length)
        cache = PagedCache(self.keys, self.values, table, first_block - 1, starts, q, length, runs)
        given = {
            "position_ids": pos, "use_cache": True, "alibi": alibi, "position_bias": self.position_bias, "cache": cache,
        }  # fmt: skip
        # lean layers': RoPE unsqueezed once, boolean masks as the additive ones sdpa makes of them per call
        heads = {t: (cos.unsqueeze(1), sin.unsqueeze(1)) for t, (cos, sin) in rotary.items()}
        added = {w: _additive(m, self.dtype) for w, m in masks.items()} if any(self.lean) else {}
        return _Forward(h, masks, rotary, cache, given, heads, added)

    def _through(self, f: _Forward, offset: int) -> torch.Tensor:
        """A part's own forward through the layers from ``offset`` (a lean one where there is one)."""
        h, given = f.h, f.given
        for i in range(offset, self.info.num_blocks):
            if self.lean[i] is not None:
                h = self.lean[i](h, f.added[self.windows[i]], *f.heads[self.types[i]], f.cache)
                continue
            given["attention_mask"] = f.masks[self.windows[i]]
            given["position_embeddings"] = f.rotary.get(self.types[i])
            out = self.layers[i](h, **{name: given[key] for name, key in self.calls[i]})
            h = out[0] if isinstance(out, tuple) else out
        return h

    def _mask(
        self, starts: torch.Tensor, q: int, length: int, window: int | None, alibi: torch.Tensor | None
    ) -> torch.Tensor | None:
        """Row r's query i (position starts[r] + i) sees keys k ≤ its position (and > position − window);
        ``None`` where sdpa's own causal mask is exact (every row from position 0, no window). Falcon's
        ALiBi is the additive mask's value where a key is seen (as its base model builds it)."""
        if self.attention == "sdpa" and window is None and int(starts.max()) == 0:
            return None
        at = starts[:, None, None] + torch.arange(q, device=self.device)[None, :, None]  # [B, q, 1]
        keys = torch.arange(length, device=self.device)[None, None, :]
        seen = keys <= at
        if window is not None:
            seen &= keys > at - window
        seen = seen[:, None]  # [B, 1, q, length]
        if self.attention == "sdpa":
            return seen
        if self.config.model_type in MASK_MARKS_HIDDEN:
            return ~seen
        if self.alibi_in_mask:
            head_dim = self.hidden_size // self.num_heads
            bias = alibi.reshape(len(starts), -1, 1, length) / head_dim**0.5
            return bias.expand(-1, -1, q, -1).masked_fill(~seen, torch.finfo(self.dtype).min)
        return torch.zeros(seen.shape, dtype=self.dtype, device=self.device).masked_fill(
            ~seen, torch.finfo(self.dtype).min
        )

    def _rotary(self, h: torch.Tensor, pos: torch.Tensor, types: set[str | None]) -> dict:
        """The base model's rotary embedding (cos, sin) at ``pos``, per layer type where it takes one."""
        if self.rotary is None:
            return {}
        if self.rotary_per_type:
            return {t: self.rotary(h, pos, layer_type=t) for t in types}
        both = self.rotary(h, pos)
        return dict.fromkeys(types, both)

    def _table(self, pages: Sequence[Sequence[Sequence[int]]], length: int) -> tuple[torch.Tensor, list[int | None]]:
        """The rows' page tables ``[B, blocks, n]`` for positions ``0..length−1`` (a shorter row is
        padded with its own first page: masked), and for a lone row the first page of each block's
        pages where they are consecutive (read as a view), else ``None``."""
        n = self.info.pages_for(length)
        rows = [[list(block[:n]) + [block[0]] * (n - len(block[:n])) for block in row] for row in pages]
        table = torch.tensor(rows, device=self.device)
        if int(table.min()) < 0 or int(table.max()) >= self.info.num_pages:
            raise ValueError(f"pages: must lie in 0..{self.info.num_pages - 1}")
        runs: list[int | None] = []
        if len(rows) == 1:
            runs = [b[0] if b == list(range(b[0], b[0] + n)) else None for b in rows[0]]
        return table, runs

    def _check(self, hidden: torch.Tensor, first_block: int, pages: Sequence[Sequence[int]], position: int) -> int:
        info = self.info
        if self.layers is None:
            raise RuntimeError("TorchSpan is closed")
        if not info.first_block <= first_block <= info.last_block:
            raise ValueError(f"first_block: {first_block} is outside this span {info.first_block}..{info.last_block}")
        need = info.last_block - first_block + 1
        q = hidden.shape[1]
        if position < 0:
            raise ValueError(f"position: must be non-negative, got {position}")
        if self.context is not None and position + q > self.context:
            raise ValueError(f"position: {position} + {q} tokens exceeds the context of {self.context}")
        held = info.pages_for(position + q)
        if len(pages) != need or any(len(block) < held for block in pages):
            raise ValueError(f"pages: need {need} blocks of at least {held} pages for {position + q} positions")
        return first_block - info.first_block

    def warm_up(self, rows: Sequence[int] = (1, 4)) -> float:
        """Run a prefill of a few tokens and a decode of each of ``rows`` sessions (as many as the pool
        holds) on the pool's first pages before the server takes a session, so the one-time work (the
        merged GEMMs learnt and reordered, oneDNN's kernels for these shapes) is not paid by the first
        requests (issue 30: the first decode after a prefill took 497 ms, later ones 34, SmolLM2 at one
        row). The pages are free: a session reads only positions it has written. Returns the seconds."""
        started, info = time.perf_counter(), self.info
        fits = [r for r in rows if r * info.num_blocks <= info.num_block_slots]
        tokens = min(4, info.pages_per_slot * info.page_tokens - 1, (self.context or 5) - 1)  # then one decode
        if fits and tokens >= 1 and self.layers is not None:
            n = info.num_blocks
            pages = [info.slot_pages(range(r * n, (r + 1) * n)) for r in range(max(fits))]
            prompt, token = (torch_to_wire(torch.zeros(1, q, self.hidden_size, dtype=self.dtype)) for q in (tokens, 1))
            waves = [[SpanStep(prompt, info.first_block, p, 0) for p in pages]]
            waves += [[SpanStep(token, info.first_block, p, tokens) for p in pages[:r]] for r in fits]
            for wave in waves:
                failed = [out for out in self.run_steps(wave) if isinstance(out, ValueError)]
                if failed:
                    raise failed[0]
        return time.perf_counter() - started

    def close(self) -> None:
        """Drop the weights and the arena; stop the worker thread."""
        self._worker.shutdown(wait=True)
        self.layers = None
        self.keys = self.values = None


def _additive(mask: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    """A boolean sdpa mask as the additive one (0 seen, −inf hidden) sdpa converts it to on every call:
    the same values, converted once per iteration, not once per layer (issue 30: 232 against 266 µs
    per attention call at 16 rows of 96 positions on this machine)."""
    if mask is None or mask.dtype != torch.bool:
        return mask
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(~mask, float("-inf"))


def _kwargs_of(module: torch.nn.Module) -> set[str]:
    return set(inspect.signature(module.forward).parameters)


def _call_plan(layer: torch.nn.Module) -> list[tuple[str, str]]:
    """(keyword, what it gets) for each input this layer's ``forward`` names: the mask, positions,
    rotary embeddings, ALiBi (BLOOM's ``alibi``, MPT's ``position_bias``), ``use_cache`` and its cache
    by whichever name it uses."""
    names = _kwargs_of(layer)
    given = ("attention_mask", "position_ids", "position_embeddings", "use_cache", "alibi", "position_bias")
    plan = [(k, k) for k in given if k in names]
    cache = next((k for k in CACHE_KWARGS if k in names), None)
    if cache is None:
        raise ValueError(f"model: {type(layer).__name__}.forward takes no cache argument")
    return [*plan, (cache, "cache")]


def _alibi_builder(base: torch.nn.Module):
    """The family's own ALiBi builder, ``(mask [B, length], num_heads, dtype) -> [B·heads, 1, length]``."""
    module = sys.modules[type(base).__module__]
    build = getattr(base, "build_alibi_tensor", None) or getattr(module, "build_alibi_tensor", None)
    if build is None:
        raise ValueError(f"model: {type(base).__name__}'s layers take ALiBi but it has no build_alibi_tensor")
    return build


def _quantize_int8(layers: torch.nn.Module) -> None:
    """torchao weight-only int8 on every ``nn.Linear`` (one scale per output row)."""
    from torchao.quantization import Int8WeightOnlyConfig, quantize_

    quantize_(layers, Int8WeightOnlyConfig())
