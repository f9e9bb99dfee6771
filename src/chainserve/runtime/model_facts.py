"""L, s_m and s_c of any Hugging Face decoder-only model, measured on the meta device (issue 29, item 2).

The model is built with ``AutoModelForCausalLM.from_config`` under ``torch.device("meta")`` (no weights,
no memory) and measured rather than counted by a formula:

- L: the length of the model's decoder-layer list (the outermost ``ModuleList`` of
  ``num_hidden_layers`` modules: ``model.layers``, GPT-2's ``transformer.h``, GPT-NeoX's ``gpt_neox.layers``);
- parameters per block: the numel of each layer's parameters, **the largest layer** (DeepSeek-V3's dense
  first layers and its MoE layers differ): the planner gives every block one size s_m, and the largest
  one means a server's memory is never exceeded;
- of that layer, the numel of its ``nn.Linear`` weights and their output rows: what torchao's int8
  weight-only quantisation (``quantize_(m, Int8WeightOnlyConfig())``) stores in int8 with one scale and
  zero point per row; it touches only ``nn.Linear``, so the rest (norms, biases, transformers 5's fused
  3-D MoE expert parameters) stays in the compute dtype;
- active parameters per block (for F = 2 × active parameters per token): an MoE layer's routed experts
  (the module named ``experts``, not ``shared_experts``) count ``num_experts_per_tok`` of their number;
  the largest layer again;
- KV elements per token per block: a dry run of the whole model on one meta token with a
  ``DynamicCache`` (:func:`~.backends.hf_parts.dry_run`), reading the shapes of each layer's cached keys
  and values (right for GQA, Falcon's all-heads cache and DeepSeek's MLA latent, whose K and V differ
  in size). A sliding-window layer counts like a full one: one token's K and V per token, the planner's
  worst case of a sequence inside its window.

Hybrid or recurrent models (Mamba-style, linear attention) keep no KV per token: a ``ValueError``.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, PretrainedConfig

from chainserve.runtime.backends.hf_parts import dry_run, layer_list, load_config

#: ``layer_types`` entries that are attention with a per-token KV cache.
ATTENTION_LAYER_TYPES = frozenset({"full_attention", "sliding_attention", "chunked_attention", "attention"})
#: Config keys that give an MoE layer's number of routed experts, by family.
EXPERT_COUNT_KEYS = ("num_local_experts", "n_routed_experts", "num_experts")


@dataclasses.dataclass(frozen=True, slots=True)
class ModelFacts:
    """What the planner needs of a model, measured (counts of elements, not bytes: any dtype applies)."""

    model_type: str
    num_blocks: int
    params_per_block: int
    active_params_per_block: int
    kv_elements_per_token_per_block: int
    linear_params_per_block: int = 0  # of the largest layer: the numel of its nn.Linear weights
    linear_rows_per_block: int = 0  # and their output rows (one int8 scale and zero point each)


def measure_dir(model_dir: Path) -> ModelFacts:
    """:func:`measure` of a local directory's ``config.json`` (``ValueError`` "model: ..." when unreadable)."""
    return measure(load_config(model_dir))


def measure(config: PretrainedConfig) -> ModelFacts:
    """Build ``config``'s causal LM on the meta device and measure its layers and its KV cache."""
    text = config.get_text_config()
    _refuse_recurrent(text)
    with torch.device("meta"):
        try:
            model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
        except ValueError as exc:
            raise ValueError(f"model: transformers builds no causal LM for {config.model_type!r}: {exc}") from None
    _, layers = layer_list(model)
    params = [sum(p.numel() for p in layer.parameters()) for layer in layers]
    active = [_active_params(layer, text) for layer in layers]
    kv = [shape.elements for shape in dry_run(config).kv]
    largest = layers[params.index(max(params))]
    linear = [m.weight for m in largest.modules() if isinstance(m, torch.nn.Linear)]
    return ModelFacts(
        config.model_type,
        len(layers),
        max(params),
        max(active),
        max(kv),
        sum(w.numel() for w in linear),
        sum(w.shape[0] for w in linear),
    )


def _refuse_recurrent(text: PretrainedConfig) -> None:
    kinds = set(getattr(text, "layer_types", None) or ()) - ATTENTION_LAYER_TYPES
    if kinds:
        raise ValueError(
            f"model: {text.model_type!r} has {', '.join(sorted(kinds))} layers that keep no KV cache per token "
            "(a hybrid or recurrent model); chainserve serves attention-only decoders"
        )


def _active_params(layer: torch.nn.Module, text: PretrainedConfig) -> int:
    """Parameters one token passes: routed experts count ``num_experts_per_tok`` out of their number."""
    experts = sum(p.numel() for name, p in layer.named_parameters() if "experts" in name.split("."))
    total = sum(p.numel() for p in layer.parameters())
    num_experts = next((getattr(text, k) for k in EXPERT_COUNT_KEYS if getattr(text, k, None)), None)
    top_k = getattr(text, "num_experts_per_tok", None)
    if not experts or not num_experts or not top_k:
        return total
    return total - experts + experts * top_k // num_experts
