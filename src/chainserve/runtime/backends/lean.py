"""A lean forward for Llama's decoder layer (issue 30: per-iteration Python overhead of a block server).

A 30-block decode iteration of SmolLM2 at one row spent about 40 % of its time outside the GEMMs,
much of it in Python: a dozen module calls per layer, transformers' keyword plumbing and wrappers,
its attention dispatch, the per-member bookkeeping of merged GEMMs (:class:`~.prepared._Merged`)
and the copies that make each member's slice contiguous. :func:`lean_layer` runs the same tensor
operations, in the same order and on the same values, as ``LlamaDecoderLayer.forward`` with sdpa
attention (so the output is bit-identical: ``tests/runtime/test_lean.py``), in one Python function:
the input norm, q/k/v from their merged GEMM as views (RoPE applied once to q and k side by side: the
same elementwise operations on the same values), the cache's ``update``, transformers' own
``sdpa_attention_forward``, the output projection, the post-attention norm and the gated MLP with
gate/up merged. It applies only to that class (any other layer, or a Llama layer under another
attention implementation, keeps the model's forward).

On fp32 CPU weights, where :func:`~.cpu_kernels.cpu_kernels` are built, the same arithmetic runs in
fused passes instead (equal up to float rounding, no longer bit for bit): a part of decode rows (one
new token each, a layer without a sliding window) has RoPE, its page writes and attention over its
pages in one kernel (:meth:`~.torch_backend.PagedCache.attend_decode`), the input norm is one, the
MLP's SiLU·mul is one, and the residual add with the post-attention norm is one (issue 30: a SmolLM2
decode iteration of 8 sessions, 30 blocks, one thread, 53 → 43 ms on this machine, medians of
``benchmarks/step.py --kernels``; 26 ms once the span's GEMMs ran on panels, :mod:`.prepared`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn

from chainserve.runtime.backends.cpu_kernels import cpu_kernels
from chainserve.runtime.backends.prepared import merged_output

__all__ = ["LeanLayer", "Part", "lean_layer"]

#: One part of a packed forward: its ``(rows, q)``, additive mask, RoPE ``cos``/``sin`` (unsqueezed at
#: dim 1) and its :class:`~.torch_backend.PagedCache`.
Part = tuple[tuple[int, int], "torch.Tensor | None", "torch.Tensor", "torch.Tensor", object]

#: The layer classes whose forward :class:`LeanLayer` reproduces (transformers 5.x, Llama with sdpa).
LEAN_CLASSES = frozenset({"LlamaDecoderLayer"})


def lean_layer(layer: nn.Module, attention: str, window: int | None = None, kernels: bool = True) -> LeanLayer | None:
    """A :class:`LeanLayer` over ``layer`` (its attention limited to ``window`` keys, or none; the fused
    CPU kernels where ``kernels`` and they apply) where it reproduces the layer's own forward, else ``None``."""
    if type(layer).__name__ not in LEAN_CLASSES or attention != "sdpa":
        return None
    attn, mlp = layer.self_attn, layer.mlp
    if getattr(attn, "training", True) or type(mlp.act_fn).__name__ != "SiLUActivation":
        return None
    return LeanLayer(layer, window, kernels)


class LeanLayer:
    """``LlamaDecoderLayer.forward`` (sdpa, inference) as one function over the layer's own modules;
    ``kernels``: the fused CPU kernels where its weights are fp32 on the CPU and they are built."""

    def __init__(self, layer: nn.Module, window: int | None = None, kernels: bool = True):
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        self.attn, self.mlp = layer.self_attn, layer.mlp
        self.sdpa: Callable = sdpa_attention_forward
        self.head_dim, self.scaling = self.attn.head_dim, self.attn.scaling
        self.norms = [(n.weight, n.variance_epsilon) for n in (layer.input_layernorm, layer.post_attention_layernorm)]
        self.qkv = (self.attn.q_proj, self.attn.k_proj, self.attn.v_proj)
        self.qk = self.attn.q_proj.out_features + self.attn.k_proj.out_features  # q and k's columns
        self.q_heads = self.attn.q_proj.out_features // self.head_dim
        self.gate_up = (self.mlp.gate_proj, self.mlp.up_proj)
        self.gate_size = self.mlp.gate_proj.out_features
        norm = layer.input_layernorm.weight
        fp32_cpu = norm.dtype == torch.float32 and norm.device.type == "cpu"
        self.kernels = cpu_kernels() if kernels and fp32_cpu else None
        self.fused_decode = self.kernels is not None and window is None and self.head_dim % 2 == 0

    def __call__(
        self, hidden: torch.Tensor, mask: torch.Tensor | None, cos: torch.Tensor, sin: torch.Tensor, cache
    ) -> torch.Tensor:
        """``hidden`` [B, q, H] through the layer; ``cos``/``sin`` already unsqueezed at dim 1 (heads)."""
        flat = self.packed(hidden.reshape(-1, hidden.shape[-1]), [(hidden.shape[:-1], mask, cos, sin, cache)])
        return flat.view(hidden.shape)

    def packed(self, hidden: torch.Tensor, parts: Sequence[Part]) -> torch.Tensor:
        """``hidden`` [T, H]: the tokens of every part one after another, part p's ``(B, q)`` rows of q
        tokens each, with its own mask, RoPE and cache (issue 30: decodes and prefill chunks of other
        lengths in one forward, so an iteration streams the weights once). The norms, the projections
        and the MLP run over all T tokens at once; RoPE, the cache and attention per part."""
        attn, mlp = self.attn, self.mlp
        x = _rms_norm(hidden, *self.norms[0]) if self.kernels is None else self.kernels.rms_norm(hidden, *self.norms[0])
        y = merged_output(self.qkv, x)
        if y is None:  # not merged (yet: the first forward learns the siblings); the same values side by side
            y = torch.cat([linear(x) for linear in self.qkv], dim=-1)
        outs, start = [], 0
        for (rows, q), mask, cos, sin, cache in parts:
            end = start + rows * q
            shape = (rows, q, -1, self.head_dim)
            part = y[start:end]
            if q == 1 and self.fused_decode:  # RoPE, page writes and attention over the pages: one kernel
                args = (self.kernels, part, cos, sin, attn.layer_idx, self.q_heads, self.scaling)
                outs.append(cache.attend_decode(*args))
                start = end
                continue
            qk = _rope(part[:, : self.qk].view(shape).transpose(1, 2), cos, sin)  # RoPE once for q and k
            k, v = cache.update(qk[:, self.q_heads :], part[:, self.qk :].view(shape).transpose(1, 2), attn.layer_idx)
            out, _ = self.sdpa(attn, qk[:, : self.q_heads], k, v, mask, dropout=0.0, scaling=self.scaling)
            outs.append(out.reshape(end - start, -1))
            start = end
        out = attn.o_proj(outs[0].contiguous() if len(outs) == 1 else torch.cat(outs))
        if self.kernels is not None:
            hidden, x = self.kernels.add_rms_norm(hidden, out, *self.norms[1])
        else:
            hidden = hidden + out
            x = _rms_norm(hidden, *self.norms[1])
        y = merged_output(self.gate_up, x)
        if y is None:  # not merged (yet): the same values side by side, so the activation is the same
            y = torch.cat([linear(x) for linear in self.gate_up], dim=-1)
        if self.kernels is not None:
            act = self.kernels.silu_mul(y)
        else:
            act = nn.functional.silu(y[..., : self.gate_size]) * y[..., self.gate_size :]
        return hidden + mlp.down_proj(act)


def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """``LlamaRMSNorm.forward``'s operations: on float32 CPU tensors torch's own ``rms_norm``, one call
    that computes the same values bit for bit (checked by ``tests/runtime/test_lean.py``) and is cheaper
    than the six calls it replaces."""
    if x.dtype == weight.dtype == torch.float32 and x.device.type == "cpu":
        return nn.functional.rms_norm(x, (x.shape[-1],), weight, eps)
    dtype = x.dtype
    x = x.to(torch.float32)
    x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x.to(dtype)


def _rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """``apply_rotary_pos_emb``'s operations on one tensor of heads."""
    return (x * cos) + (_rotate_half(x) * sin)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)
