"""Parts of any Hugging Face decoder-only causal LM, loaded alone (issue 29, item 1; paper §4.2).

A block server holds blocks ``first..last`` of the model and the orchestrator its embedding side and
its LM head. Both are cut from **the model's own classes**: :func:`skeleton` builds the whole
``…ForCausalLM`` from ``config.json`` with its parameters on the meta device (no memory; buffers such as
rotary frequencies real), and :func:`load_parts` loads only the checkpoint tensors of the parts kept,
through transformers' own key renaming and conversions (MoE checkpoints keep one tensor per expert;
transformers 5 fuses them at load time). Layers keep their **global** indices, so everything a family
decides by layer index (Gemma2/3 and gpt-oss sliding and full layers, DeepSeek-V3's dense first
layers, Qwen-MoE's sparse steps) stays as in the full model.

What is family-specific lives here, one adapter per trap (:func:`check_supported`): attention only
(recurrent and hybrid layers are refused), no chunked attention, and no fp16 for Gemma3 (NaN).
"""

from __future__ import annotations

import json
import re
import warnings
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig, PreTrainedModel

#: ``layer_types`` entries of attention layers whose span runner builds the mask (full or windowed).
SUPPORTED_LAYER_TYPES = frozenset({"full_attention", "sliding_attention", "attention"})
#: model_type → dtypes it must not run in, with why (measured, issue 29).
REFUSED_DTYPES = {"gemma3_text": {torch.float16: "fp16 overflows to NaN in Gemma 3"}}


def load_config(model_dir: Path) -> PretrainedConfig:
    """The model directory's config, read offline (``ValueError`` "model: ..." when unreadable)."""
    try:
        config = AutoConfig.from_pretrained(str(model_dir), local_files_only=True)
    except (OSError, ValueError, KeyError) as exc:
        raise ValueError(f"model: cannot read {model_dir}/config.json as a transformers config: {exc}") from None
    return config


def check_supported(config: PretrainedConfig, dtype: torch.dtype) -> None:
    """``ValueError`` naming why the span runner cannot serve this model in ``dtype``."""
    text = config.get_text_config()
    kinds = set(getattr(text, "layer_types", None) or ()) - SUPPORTED_LAYER_TYPES
    if kinds:
        raise ValueError(
            f"model: {config.model_type!r} has {', '.join(sorted(kinds))} layers; chainserve serves decoders "
            "whose layers are full or sliding-window attention (hybrid, recurrent and chunked layers are not)"
        )
    why = REFUSED_DTYPES.get(config.model_type, {}).get(dtype)
    if why:
        raise ValueError(f"dtype: {config.model_type!r} cannot run in {dtype}: {why}")


def context_limit(text: PretrainedConfig) -> int | None:
    """The longest sequence the family states it takes (``None``: none stated, as with BLOOM's ALiBi)."""
    return getattr(text, "max_position_embeddings", None) or getattr(text, "max_seq_len", None)


def layer_windows(text: PretrainedConfig) -> list[int | None]:
    """Each layer's sliding window (``None``: full attention): from ``layer_types`` where the family
    has them (Gemma 2/3, gpt-oss, Qwen 2), else ``sliding_window`` for every layer (Mistral, Phi 3,
    StarCoder 2) unless ``use_sliding_window`` is off. Key k is seen from position p when
    p − window < k ≤ p (transformers' ``sliding_window_overlay``)."""
    window = getattr(text, "sliding_window", None)
    types = getattr(text, "layer_types", None)
    if types:
        return [window if t == "sliding_attention" else None for t in types]
    if getattr(text, "use_sliding_window", True) is False:
        window = None
    return [window] * text.num_hidden_layers


def skeleton(config: PretrainedConfig, dtype: torch.dtype) -> PreTrainedModel:
    """The whole causal LM with its parameters on the meta device and real buffers, built in ``dtype``
    (as ``from_pretrained`` builds it: buffers such as rotary frequencies keep their own dtype)."""
    from accelerate import init_empty_weights

    with init_empty_weights(include_buffers=False), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            model = AutoModelForCausalLM.from_config(config, dtype=dtype)
        except ValueError as exc:
            raise ValueError(f"model: transformers builds no causal LM for {config.model_type!r}: {exc}") from None
    return model.eval()


def layer_list(model: torch.nn.Module) -> tuple[str, torch.nn.ModuleList]:
    """The name and the module of the model's decoder-layer list: the outermost ``ModuleList`` of
    ``num_hidden_layers`` modules (``model.layers``, ``transformer.h``, ``gpt_neox.layers``, …)."""
    num = model.config.get_text_config().num_hidden_layers
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.ModuleList) and len(module) == num:
            return name, module
    raise ValueError(f"model: {type(model).__name__} has no list of its {num} decoder layers")


@dataclass(frozen=True, slots=True)
class KvShape:
    """One block's cache of one token: keys ``[k_heads, k_dim]`` and values ``[v_heads, v_dim]``
    (measured: GQA, Falcon's all-heads cache and DeepSeek's MLA differ from ``2·kv_heads·head_dim``)."""

    k_heads: int
    k_dim: int
    v_heads: int
    v_dim: int

    @property
    def elements(self) -> int:
        """K and V elements per token."""
        return self.k_heads * self.k_dim + self.v_heads * self.v_dim


@dataclass(frozen=True, slots=True)
class DryRun:
    """What a one-token forward of the model on the meta device shows: each layer's :class:`KvShape`
    and whether its layers return a tuple (BLOOM, Falcon) rather than a tensor."""

    kv: tuple[KvShape, ...]
    layers_return_tuple: bool


def dry_run(config: PretrainedConfig) -> DryRun:
    """:class:`DryRun` of ``config``'s causal LM: one token embedded as zeros (no token id that a
    family may check as padding), in bf16 (grouped MoE kernels need it on meta). ``ValueError`` when
    it cannot run or a layer caches no keys and values (a hybrid or recurrent model): no formula guesses."""
    from transformers import DynamicCache

    text = config.get_text_config()
    seen: list[bool] = []
    try:
        with torch.device("meta"), torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            dry = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
            _, layers = layer_list(dry)
            layers[0].register_forward_hook(lambda _m, _a, out: seen.append(isinstance(out, tuple)))
            cache = DynamicCache(config=config)
            embeds = torch.zeros((1, 1, text.hidden_size), dtype=torch.bfloat16)
            dry(inputs_embeds=embeds, past_key_values=cache, use_cache=True)
    except (RuntimeError, NotImplementedError, TypeError) as exc:
        raise ValueError(
            f"model: the dry run of {config.model_type!r} on the meta device failed, so its KV size per token "
            f"cannot be measured: {type(exc).__name__}: {exc}"
        ) from None
    cached = [
        layer for layer in getattr(cache, "layers", ())
        if getattr(layer, "keys", None) is not None and getattr(layer, "values", None) is not None
    ]  # fmt: skip
    if len(cached) != text.num_hidden_layers or not seen:
        raise ValueError(
            f"model: {config.model_type!r} cached keys and values for {len(cached)} of its "
            f"{text.num_hidden_layers} layers (a hybrid or recurrent model?); chainserve serves attention-only decoders"
        )
    kv = tuple(KvShape(c.keys.shape[1], c.keys.shape[3], c.values.shape[1], c.values.shape[3]) for c in cached)
    return DryRun(kv, seen[0])


def _checkpoint_files(model_dir: Path) -> list[Path]:
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        return [model_dir / f for f in sorted(set(weight_map.values()))]
    single = model_dir / "model.safetensors"
    if not single.is_file():
        raise ValueError(f"model: {model_dir} holds no model.safetensors (nor an index of shards)")
    return [single]


def checkpoint_layer(key: str, layers_attr: str) -> int | None:
    """The 0-based layer a checkpoint tensor belongs to (``None``: not a layer's), by the last name of
    the layer list (``layers``, ``h``), with or without the base model's prefix.

    >>> checkpoint_layer("model.layers.12.mlp.experts.3.w1.weight", "layers")
    12
    >>> checkpoint_layer("lm_head.weight", "layers") is None
    True
    >>> checkpoint_layer("h.3.attn.c_attn.weight", "h")
    3
    """
    match = re.search(rf"(?:^|\.){re.escape(layers_attr)}\.(\d+)\.", key)
    return None if match is None else int(match.group(1))


def load_parts(
    model: PreTrainedModel, model_dir: Path, layers: Iterable[int] | None, dtype: torch.dtype, device: torch.device
) -> None:
    """Load into ``model`` the checkpoint tensors of layers ``layers`` (0-based; ``None``: none, only the
    tensors outside the layer list: embeddings, final norm, LM head), converted as ``from_pretrained``
    converts them, cast to ``dtype`` (except what the model keeps in fp32) on ``device``. Raises
    ``ValueError`` when a parameter of a part asked for stays unloaded."""
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import convert_and_load_state_dict_in_model
    from transformers.modeling_utils import LoadStateDictConfig

    list_name, _ = layer_list(model)
    attr = list_name.rsplit(".", 1)[-1]
    wanted = None if layers is None else set(layers)
    handles, tensors = [], {}
    for file in _checkpoint_files(Path(model_dir)):
        handle = safe_open(file, framework="pt")
        handles.append(handle)
        for key in handle.keys():
            layer = checkpoint_layer(key, attr)
            if (layer is None and wanted is None) or (layer is not None and wanted is not None and layer in wanted):
                tensors[key] = handle.get_slice(key)
    config = LoadStateDictConfig(
        pretrained_model_name_or_path=str(model_dir),
        device_map={"": device},
        dtype=dtype,
        dtype_plan=model._get_dtype_plan(dtype),
        weight_mapping=get_model_conversion_mapping(model, None, None),
    )
    info, _ = convert_and_load_state_dict_in_model(model, tensors, config)
    if info.error_msgs or info.conversion_errors:
        raise ValueError(f"model: loading {model_dir} failed: {info.error_msgs or info.conversion_errors}")
    prefix = f"{list_name}."
    missing = sorted(
        k for k in info.missing_keys
        if (wanted is None and not k.startswith(prefix))
        or (wanted is not None and k.startswith(prefix) and int(k[len(prefix):].split(".", 1)[0]) in wanted)
    )  # fmt: skip
    if model.config.get_text_config().tie_word_embeddings:  # tied to the embeddings after loading
        missing = [k for k in missing if k not in (getattr(model, "_tied_weights_keys", None) or ())]
    if missing:
        raise ValueError(f"model: {model_dir} lacks {len(missing)} tensors of the parts asked for, e.g. {missing[:3]}")
