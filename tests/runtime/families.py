"""A zoo of tiny random decoder models, one per architecture family, as local Hugging Face directories.

``build_family(name, out)`` writes ``config.json``, ``model.safetensors``, ``generation_config.json`` and a
byte-level BPE tokenizer (:func:`~chainserve.runtime.models.tiny_tokenizer`, ``tiny-random``'s, shared by
every family) into ``out``: 6 layers (spans of 2+2+2), hidden 64, random weights with std 0.2 so that
greedy tokens vary. Built from transformers' own config classes, never the hub; deterministic per seed.
Test support for issue 29 (a model is a directory); torch and transformers are imported only when building.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from chainserve.runtime.models import tiny_tokenizer

LAYERS = 6
HIDDEN = 64
#: Sliding windows small enough to matter within ~40 tokens.
WINDOW = 8
_ALTERNATING = ["sliding_attention", "full_attention"] * (LAYERS // 2)

#: Shapes most families share: 4 query heads of 16, 2 KV heads, an MLP of 128.
_BASE: dict[str, Any] = {
    "hidden_size": HIDDEN,
    "intermediate_size": 2 * HIDDEN,
    "num_hidden_layers": LAYERS,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 512,
}

#: name → (config class in transformers, its keyword arguments beyond vocabulary and special tokens).
#: Word embeddings are tied or not as each config class decides by default (its family's habit).
_SPECS: dict[str, tuple[str, dict[str, Any]]] = {
    "llama": ("LlamaConfig", _BASE),
    "mistral": ("MistralConfig", {**_BASE, "sliding_window": WINDOW}),
    "qwen2": ("Qwen2Config", _BASE),
    "qwen3": ("Qwen3Config", {**_BASE, "head_dim": 16}),
    "qwen3_moe": (
        "Qwen3MoeConfig",
        {**_BASE, "head_dim": 16, "num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 32},
    ),
    "mixtral": ("MixtralConfig", {**_BASE, "num_local_experts": 4, "num_experts_per_tok": 2}),
    "gemma2": (
        "Gemma2Config",
        {**_BASE, "head_dim": 16, "query_pre_attn_scalar": 16, "sliding_window": WINDOW, "layer_types": _ALTERNATING},
    ),
    "gemma3": (
        "Gemma3TextConfig",
        {**_BASE, "head_dim": 16, "query_pre_attn_scalar": 16, "sliding_window": WINDOW, "layer_types": _ALTERNATING},
    ),
    "phi3": ("Phi3Config", _BASE),
    "phi": ("PhiConfig", _BASE),
    "gpt2": (
        "GPT2Config",
        {"n_embd": HIDDEN, "n_layer": LAYERS, "n_head": 4, "n_inner": 2 * HIDDEN, "n_positions": 512},
    ),
    "gpt_neox": ("GPTNeoXConfig", {k: v for k, v in _BASE.items() if k != "num_key_value_heads"}),
    # new_decoder_architecture=True (Falcon-40B/180B style: grouped KV heads, two layer norms); the
    # 7B style (False: multi-query, parallel attention) also builds and generates here.
    "falcon": (
        "FalconConfig",
        {
            "hidden_size": HIDDEN,
            "ffn_hidden_size": 2 * HIDDEN,
            "num_hidden_layers": LAYERS,
            "num_attention_heads": 4,
            "num_kv_heads": 2,
            "new_decoder_architecture": True,
            "max_position_embeddings": 512,
        },
    ),
    "bloom": ("BloomConfig", {"hidden_size": HIDDEN, "n_layer": LAYERS, "n_head": 4}),
    "starcoder2": ("Starcoder2Config", {**_BASE, "sliding_window": 4096}),
    "deepseek_v3": (
        "DeepseekV3Config",
        {
            **_BASE,
            "num_key_value_heads": 4,
            "moe_intermediate_size": 32,
            "n_routed_experts": 4,
            "n_shared_experts": 1,
            "num_experts_per_tok": 2,
            "n_group": 2,
            "topk_group": 1,
            "first_k_dense_replace": 1,
            "q_lora_rank": 32,
            "kv_lora_rank": 16,
            "qk_rope_head_dim": 8,
            "qk_nope_head_dim": 8,
            "v_head_dim": 16,
        },
    ),
    "gpt_oss": (
        "GptOssConfig",
        {
            **_BASE,
            "intermediate_size": HIDDEN,
            "head_dim": 16,
            "num_local_experts": 4,
            "num_experts_per_tok": 2,
            "sliding_window": WINDOW,
            "layer_types": _ALTERNATING,
            "rope_parameters": {
                "rope_type": "yarn",
                "rope_theta": 150000.0,
                "factor": 4.0,
                "beta_fast": 32.0,
                "beta_slow": 1.0,
                "truncate": False,
                "original_max_position_embeddings": 128,
            },
        },
    ),
    "olmo2": ("Olmo2Config", _BASE),
    "granite": ("GraniteConfig", _BASE),
    "cohere": ("CohereConfig", _BASE),
    "gemma": ("GemmaConfig", {**_BASE, "head_dim": 16}),
    "qwen2_moe": (
        "Qwen2MoeConfig",
        {
            **_BASE,
            "num_experts": 4,
            "num_experts_per_tok": 2,
            "moe_intermediate_size": 32,
            "shared_expert_intermediate_size": 64,
        },
    ),
    "stablelm": ("StableLmConfig", _BASE),
    "smollm3": ("SmolLM3Config", _BASE),
    "glm": ("GlmConfig", {**_BASE, "head_dim": 16}),
    "gptj": ("GPTJConfig", {"n_embd": HIDDEN, "n_layer": LAYERS, "n_head": 4, "rotary_dim": 8, "n_positions": 512}),
    "gpt_bigcode": (
        "GPTBigCodeConfig",
        {"n_embd": HIDDEN, "n_layer": LAYERS, "n_head": 4, "n_inner": 2 * HIDDEN, "n_positions": 512},
    ),
    "mpt": (
        "MptConfig",
        {"d_model": HIDDEN, "n_heads": 4, "n_layers": LAYERS, "expansion_ratio": 2, "max_seq_len": 512},
    ),
    "opt": (
        "OPTConfig",
        {
            "hidden_size": HIDDEN,
            "ffn_dim": 2 * HIDDEN,
            "num_hidden_layers": LAYERS,
            "num_attention_heads": 4,
            "word_embed_proj_dim": HIDDEN,
            "max_position_embeddings": 512,
            "dropout": 0.0,
        },
    ),
}

FAMILIES: tuple[str, ...] = tuple(_SPECS)
#: The families built with a sliding window of :data:`WINDOW` (all layers or every other one).
WINDOWED: tuple[str, ...] = tuple(n for n in FAMILIES if _SPECS[n][1].get("sliding_window") == WINDOW)

#: Gemma multiplies its (tied) embeddings by sqrt(hidden): at std 0.2 the input token dominates the last
#: hidden state and greedy decoding repeats it forever; std 0.05 leaves room for the layers.
_EMBED_STD = {"gemma": 0.05, "gemma2": 0.05, "gemma3": 0.05}


def family_config(name: str, vocab_size: int, bos: int, eos: int, pad: int):
    """The config of family ``name`` (``ValueError`` for one not in :data:`FAMILIES`)."""
    import transformers

    if name not in _SPECS:
        raise ValueError(f"family: {name!r} is not one of {', '.join(FAMILIES)}")
    cls_name, kwargs = _SPECS[name]
    ids = {"bos_token_id": bos, "eos_token_id": eos, "pad_token_id": pad}
    return getattr(transformers, cls_name)(vocab_size=vocab_size, **ids, **kwargs)


def build_family(name: str, out: Path, seed: int = 0) -> Path:
    """A tiny random ``…ForCausalLM`` of family ``name`` saved into ``out`` (created); returns ``out``."""
    import torch
    from transformers import AutoModelForCausalLM, GenerationConfig

    tokenizer = tiny_tokenizer()
    ids = [tokenizer.convert_tokens_to_ids(t) for t in ("<|im_start|>", "<|im_end|>", "<|endoftext|>")]
    config = family_config(name, len(tokenizer), *ids)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config)
        for p in model.parameters():  # larger than the 0.02 default so that greedy tokens vary
            if p.dim() > 1:
                torch.nn.init.normal_(p, std=0.2)
        if name in _EMBED_STD:
            torch.nn.init.normal_(model.get_input_embeddings().weight, std=_EMBED_STD[name])
    model.generation_config = GenerationConfig(
        bos_token_id=config.bos_token_id, eos_token_id=config.eos_token_id, pad_token_id=config.pad_token_id
    )
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out
