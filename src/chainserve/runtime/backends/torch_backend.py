"""Torch backend of a block server (paper §4.2): real Llama blocks of one span, KV cache in a fixed arena.

:class:`TorchSpan` builds ``LlamaDecoderLayer`` only for its span (global 1-based block b is HF layer
b − 1 and local layer b − ``info.first_block``) and loads only those weights, on its device (``cpu``,
``cuda:N``; :mod:`.devices`). The KV memory is one tensor allocated at construction,
``[num_block_slots, 2 (K, V), kv_heads, max_tokens, head_dim]``; a block-slot is one block's K and V of
one session (s_c).

A server's iteration (:meth:`TorchSpan.forward`, issue 17) runs, in a worker thread so the server's
event loop keeps receiving: every decode step (one new token) of sessions entering at the same block
in **one** batched forward, and each prefill chunk in its own. The batch's :class:`ArenaCache` writes
each row's new K/V at its own absolute positions into its own block-slots and returns the rows' cached
K/V gathered up to the longest, with a boolean mask that hides each row's padding (ragged positions).

Masking of one session's q > 1 new tokens: at position 0 plain causal (sdpa's ``is_causal``); at
position p > 0 (replay, chunked prefill) an explicit mask — sdpa's ``is_causal`` with more keys than
queries would *drop* the cached keys.

:class:`~.torch_head.TorchHead` (the orchestrator's half) is re-exported here.
"""

from __future__ import annotations

import asyncio
import inspect
from collections import defaultdict
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
from transformers.cache_utils import Cache
from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRotaryEmbedding

from chainserve.runtime.backends.base import SpanInfo, SpanStep, WireTensor
from chainserve.runtime.backends.torch_common import FROM_WIRE, load_config, load_tensors, torch_to_wire, wire_to_torch
from chainserve.runtime.backends.torch_head import TorchHead

__all__ = ["ArenaCache", "TorchHead", "TorchSpan"]

#: The layer's cache keyword: ``cache`` from transformers 5.24, ``past_key_values`` before.
CACHE_KWARG = "cache" if "cache" in inspect.signature(LlamaDecoderLayer.forward).parameters else "past_key_values"


class ArenaCache(Cache):
    """A transformers ``Cache`` over the arena for one forward of B rows (sessions) of q new tokens
    each: local layer ``i`` of row r uses block-slot ``slots[r, i − offset]``; ``update`` writes row r's
    positions ``positions[r]..positions[r]+q−1`` and returns every row's K/V for ``0..length−1``
    (``length`` = the longest row's end; one session: views, no copy)."""

    def __init__(self, arena: torch.Tensor, slots: torch.Tensor, offset: int, positions: torch.Tensor, length: int):
        try:
            super().__init__(layers=[])
        except TypeError:  # transformers before 5.x took no layers
            super().__init__()
        self.arena, self.slots, self.offset, self.positions, self.length = arena, slots, offset, positions, length

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs
    ) -> tuple[torch.Tensor, torch.Tensor]:
        slots = self.slots[:, layer_idx - self.offset]
        rows, q = key_states.shape[0], key_states.shape[2]
        if rows == 1:
            kv, start = self.arena[slots[0]], int(self.positions[0])
            kv[0, :, start : start + q] = key_states[0]
            kv[1, :, start : start + q] = value_states[0]
            return kv[0, :, : self.length].unsqueeze(0), kv[1, :, : self.length].unsqueeze(0)
        # q = 1 per row: arena[slot_r, K|V, :, position_r] = row r's new K|V
        self.arena[slots, 0, :, self.positions] = key_states[:, :, 0]
        self.arena[slots, 1, :, self.positions] = value_states[:, :, 0]
        kv = self.arena[slots, :, :, : self.length]  # gathered: [rows, 2, kv_heads, length, head_dim]
        return kv[:, 0], kv[:, 1]

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return int(self.positions.min())


class TorchSpan:
    """SpanBackend running blocks ``info.first_block..info.last_block`` of the model in ``model_dir``
    on ``device`` in ``dtype`` (weights, arena and compute)."""

    #: The block server schedules iterations: one :meth:`forward` at a time over a batch of steps.
    batches = True

    def __init__(
        self,
        model_dir: Path,
        info: SpanInfo,
        dtype: torch.dtype = torch.float32,
        device: str | torch.device = "cpu",
    ):
        config = load_config(model_dir)
        if config.model_type != "llama":
            raise ValueError(f"model_dir: {model_dir} holds a {config.model_type!r} model; TorchSpan runs Llama blocks")
        if info.first_block < 1 or info.last_block > config.num_hidden_layers or info.num_blocks < 1:
            raise ValueError(
                f"info: blocks {info.first_block}..{info.last_block} are not within the model's "
                f"1..{config.num_hidden_layers}"
            )
        if info.num_block_slots < 1 or info.max_tokens < 1:
            raise ValueError(f"info: need num_block_slots >= 1 and max_tokens >= 1, got {info}")
        if info.max_tokens > config.max_position_embeddings:
            raise ValueError(
                f"info.max_tokens: {info.max_tokens} exceeds the model's "
                f"max_position_embeddings {config.max_position_embeddings}"
            )
        if dtype not in FROM_WIRE.values() or not dtype.is_floating_point:
            raise ValueError(f"dtype: {dtype} is not float32, float16 or bfloat16")
        self.info, self.dtype, self.config, self.device = info, dtype, config, torch.device(device)
        self.hidden_size = config.hidden_size
        self.layers = self._load_layers(Path(model_dir))
        self.rotary = LlamaRotaryEmbedding(config).to(self.device)
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        # Bounded KV memory: allocated once, never grows (s_c per block-slot).
        self.arena = torch.zeros(
            info.num_block_slots, 2, config.num_key_value_heads, info.max_tokens, head_dim, dtype=dtype,
            device=self.device,
        )  # fmt: skip
        self._worker = ThreadPoolExecutor(1, thread_name_prefix="span")

    def _load_layers(self, model_dir: Path) -> torch.nn.ModuleList:
        first, last = self.info.first_block, self.info.last_block

        def rename(key: str) -> str | None:
            parts = key.split(".", 3)  # model.layers.{g}.rest
            if len(parts) == 4 and parts[:2] == ["model", "layers"] and first <= int(parts[2]) + 1 <= last:
                return f"{int(parts[2]) + 1 - first}.{parts[3]}"
            return None

        with torch.device("meta"):
            layers = torch.nn.ModuleList(
                LlamaDecoderLayer(self.config, layer_idx=i) for i in range(self.info.num_blocks)
            )
        weights = {k: v.to(self.device) for k, v in load_tensors(model_dir, rename, self.dtype).items()}
        layers.load_state_dict(weights, strict=True, assign=True)
        return layers.eval()

    async def forward(self, steps: Sequence[SpanStep]) -> list[WireTensor | ValueError]:
        """See :meth:`~.base.SpanBackend.forward`: one iteration, in the worker thread."""
        if self.layers is None:
            raise RuntimeError("TorchSpan is closed")
        return await asyncio.get_running_loop().run_in_executor(self._worker, self.run_steps, list(steps))

    def run_steps(self, steps: Sequence[SpanStep]) -> list[WireTensor | ValueError]:
        """The synchronous iteration: decodes grouped by entry block into one forward each, every
        other step alone; a step that fails its checks fails alone (its ``ValueError``)."""
        results: list[WireTensor | ValueError | None] = [None] * len(steps)
        decodes: defaultdict[int, list[tuple[int, torch.Tensor]]] = defaultdict(list)
        for i, step in enumerate(steps):
            try:
                x = wire_to_torch(step.hidden, self.hidden_size)
                offset = self._check(x, step.first_block, step.slots, step.position)
            except ValueError as exc:
                results[i] = exc
                continue
            if x.shape[1] == 1:
                decodes[offset].append((i, x))
            else:
                results[i] = torch_to_wire(self.run(x, step.first_block, [step.slots], [step.position]).to(x.dtype))
        for offset, rows in decodes.items():
            first_block = self.info.first_block + offset
            x = torch.cat([x for _, x in rows])
            out = self.run(x, first_block, [steps[i].slots for i, _ in rows], [steps[i].position for i, _ in rows])
            for (i, _), row in zip(rows, out.to(x.dtype).cpu(), strict=True):
                results[i] = torch_to_wire(row.unsqueeze(0))
        return results  # type: ignore[return-value]

    def run(
        self, hidden: torch.Tensor, first_block: int, slots: Sequence[Sequence[int]], positions: Sequence[int]
    ) -> torch.Tensor:
        """The synchronous forward on [B, q, hidden] (B rows: q = 1 each, or one row of any q) entering
        at ``first_block``; row r's block-slots ``slots[r]``, its first new position ``positions[r]``.
        Returns the span's dtype, on its device."""
        offset = first_block - self.info.first_block
        rows, q = hidden.shape[0], hidden.shape[1]
        dev = self.device
        with torch.inference_mode():
            h = hidden.to(dev, self.dtype)
            starts = torch.tensor(list(positions), device=dev)
            pos = starts[:, None] + torch.arange(q, device=dev)[None, :]
            cos_sin = self.rotary(h, pos)
            length = int(starts.max()) + q
            mask = None
            if rows > 1:  # each row sees its own cached positions (ragged lengths)
                mask = (torch.arange(length, device=dev)[None, :] <= starts[:, None])[:, None, None, :]
            elif q > 1 and positions[0] > 0:  # cached prefix visible to all, causal among the new tokens
                mask = torch.ones(q, length, dtype=torch.bool, device=dev).tril(diagonal=positions[0])[None, None]
            table = torch.tensor([list(s) for s in slots], device=dev)
            cache = ArenaCache(self.arena, table, offset, starts, length)
            for layer in self.layers[offset:]:
                h = layer(
                    h, attention_mask=mask, position_ids=pos, use_cache=True, position_embeddings=cos_sin,
                    **{CACHE_KWARG: cache},
                )  # fmt: skip
        return h

    def _check(self, hidden: torch.Tensor, first_block: int, slots: Sequence[int], position: int) -> int:
        info = self.info
        if self.layers is None:
            raise RuntimeError("TorchSpan is closed")
        if not info.first_block <= first_block <= info.last_block:
            raise ValueError(f"first_block: {first_block} is outside this span {info.first_block}..{info.last_block}")
        need = info.last_block - first_block + 1
        if len(slots) != need or any(not 0 <= s < info.num_block_slots for s in slots):
            raise ValueError(f"slots: need {need} block-slots in 0..{info.num_block_slots - 1}, got {list(slots)}")
        if len(set(slots)) != len(slots):
            raise ValueError(f"slots: must be distinct, got {list(slots)}")
        q = hidden.shape[1]
        if position < 0 or position + q > info.max_tokens:
            raise ValueError(f"position: {position} + {q} tokens exceeds max_tokens {info.max_tokens}")
        return first_block - info.first_block

    def close(self) -> None:
        """Drop the weights and the arena; stop the worker thread."""
        self._worker.shutdown(wait=True)
        self.layers = None
        self.arena = None
