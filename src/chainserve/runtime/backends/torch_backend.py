"""Torch backend of a block server (paper §4.2): real Llama blocks of one span, KV cache in a fixed arena.

:class:`TorchSpan` builds ``LlamaDecoderLayer`` only for its span (global 1-based block b is HF layer
b − 1 and local layer b − ``info.first_block``) and loads only those weights. The KV memory is one
tensor allocated at construction, ``[num_block_slots, 2 (K, V), kv_heads, max_tokens, head_dim]``; a
block-slot is one block's K and V of one session (s_c). A forward hands the layers an
:class:`ArenaCache` that writes the new K/V at their absolute positions into the session's block-slots
and returns the valid prefix, so attention sees cached positions ``< position`` plus the new ones.

Masking: q = 1 needs none; q > 1 at position 0 is plain causal (sdpa's ``is_causal``); q > 1 at
position p > 0 (replay, chunked prefill) gets an explicit boolean mask — sdpa's ``is_causal`` with
more keys than queries would *drop* the cached keys in transformers 5.24.

:class:`~.torch_head.TorchHead` (the orchestrator's half) is re-exported here.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from transformers.cache_utils import Cache
from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRotaryEmbedding

from chainserve.runtime.backends.base import SpanInfo, WireTensor
from chainserve.runtime.backends.torch_common import FROM_WIRE, load_config, load_tensors, torch_to_wire, wire_to_torch
from chainserve.runtime.backends.torch_head import TorchHead

__all__ = ["ArenaCache", "TorchHead", "TorchSpan"]


class ArenaCache(Cache):
    """A transformers ``Cache`` over the arena for one forward of one session: local layer ``i`` uses
    block-slot ``slots[i − offset]``; ``update`` writes positions ``position..position+q−1`` and returns
    K/V for ``0..position+q−1`` (views, no copy)."""

    def __init__(self, arena: torch.Tensor, slots: Sequence[int], offset: int, position: int):
        super().__init__(layers=[])
        self.arena, self.slots, self.offset, self.position = arena, slots, offset, position

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs
    ) -> tuple[torch.Tensor, torch.Tensor]:
        kv = self.arena[self.slots[layer_idx - self.offset]]
        end = self.position + key_states.shape[2]
        kv[0, :, self.position : end] = key_states[0]
        kv[1, :, self.position : end] = value_states[0]
        return kv[0, :, :end].unsqueeze(0), kv[1, :, :end].unsqueeze(0)

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.position


class TorchSpan:
    """SpanBackend running blocks ``info.first_block..info.last_block`` of the model in ``model_dir``."""

    def __init__(self, model_dir: Path, info: SpanInfo, dtype: torch.dtype = torch.float32):
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
        self.info, self.dtype, self.config = info, dtype, config
        self.hidden_size = config.hidden_size
        self.layers = self._load_layers(Path(model_dir))
        self.rotary = LlamaRotaryEmbedding(config)
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        # Bounded KV memory: allocated once, never grows (s_c per block-slot).
        self.arena = torch.zeros(
            info.num_block_slots, 2, config.num_key_value_heads, info.max_tokens, head_dim, dtype=dtype
        )

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
        layers.load_state_dict(load_tensors(model_dir, rename, self.dtype), strict=True, assign=True)
        return layers.eval()

    async def forward(self, hidden: WireTensor, first_block: int, slots: Sequence[int], position: int) -> WireTensor:
        """See :meth:`~.base.SpanBackend.forward`. Runs inline: the server computes one step at a time."""
        x = wire_to_torch(hidden, self.hidden_size)
        return torch_to_wire(self.run(x, first_block, slots, position).to(x.dtype))

    def run(self, hidden: torch.Tensor, first_block: int, slots: Sequence[int], position: int) -> torch.Tensor:
        """The synchronous forward on a [1, q, hidden] tensor; returns the span's dtype."""
        offset = self._check(hidden, first_block, slots, position)
        q = hidden.shape[1]
        with torch.inference_mode():
            h = hidden.to(self.dtype)
            pos = torch.arange(position, position + q).unsqueeze(0)
            cos_sin = self.rotary(h, pos)
            mask = None
            if q > 1 and position > 0:  # cached prefix visible to all, causal among the new tokens
                mask = torch.ones(q, position + q, dtype=torch.bool).tril(diagonal=position)[None, None]
            cache = ArenaCache(self.arena, slots, offset, position)
            for layer in self.layers[offset:]:
                h = layer(
                    h, attention_mask=mask, position_ids=pos, cache=cache, use_cache=True, position_embeddings=cos_sin
                )
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
        """Drop the weights and the arena."""
        self.layers = None
        self.arena = None
