"""Torch ModelHead for the orchestrator (paper §4.2): tokenizer and chat template, token embeddings,
final RMSNorm and LM head, loaded alone from safetensors (tied embeddings reuse ``embed_tokens``), on
its device; the LM head runs over a batch of jobs' hidden states in one matmul (issue 17)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from transformers import AutoTokenizer, GenerationConfig
from transformers.models.llama.modeling_llama import LlamaRMSNorm

from chainserve.runtime.backends.base import WireTensor
from chainserve.runtime.backends.torch_common import load_config, load_tensors, torch_to_wire, wire_to_torch
from chainserve.runtime.models import model_name
from chainserve.runtime.tools import Tool, for_template

HEAD_TENSORS = {"model.embed_tokens.weight": "embed", "model.norm.weight": "norm", "lm_head.weight": "lm_head"}


class TorchHead:
    """ModelHead of the Llama-style model in ``model_dir``; ``max_tokens`` caps the context below
    ``max_position_embeddings`` (``None``: the model's own limit); weights live on ``device``."""

    in_thread = True  # a 49k-word LM head takes milliseconds: off the event loop

    def __init__(
        self,
        model_dir: Path,
        dtype: torch.dtype = torch.float32,
        max_tokens: int | None = None,
        device: str | torch.device = "cpu",
    ):
        model_dir = Path(model_dir)
        config = load_config(model_dir)
        if max_tokens is not None and (not isinstance(max_tokens, int) or max_tokens < 1):
            raise ValueError(f"max_tokens: must be a positive integer, got {max_tokens!r}")
        self.model_id = model_name(model_dir)
        self.num_blocks = config.num_hidden_layers
        self.max_tokens = min(config.max_position_embeddings, max_tokens or config.max_position_embeddings)
        self.hidden_size, self.dtype, self.device = config.hidden_size, dtype, torch.device(device)
        self.tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
        self.eos_token_ids = _eos_ids(model_dir, config, self.tokenizer)
        weights = {k: v.to(self.device) for k, v in load_tensors(model_dir, HEAD_TENSORS.get, dtype).items()}
        self.embed_weight = weights["embed"]
        self.lm_head_weight = weights.get("lm_head", self.embed_weight)  # tied: same matrix
        self.norm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps).to(self.device, dtype)
        self.norm.load_state_dict({"weight": weights["norm"]})
        self.vocab_size = self.embed_weight.shape[0]

    def encode(self, text: str) -> list[int]:
        return list(self.tokenizer(text)["input_ids"])

    def decode(self, token_ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(token_ids), skip_special_tokens=True)

    def chat_prompt(self, messages: Sequence[dict[str, Any]], tools: tuple[Tool, ...] = ()) -> list[int]:
        """Token ids of the chat (and the tools it offers) through its template, the assistant's turn
        opened; a template that knows no tools gets them in the ``<tool_call>`` convention (:mod:`..tools`)."""
        template = self.tokenizer.chat_template
        if template is None:
            raise ValueError(f"messages: model {self.model_id!r} has no chat template")
        chat, tool_specs = for_template(template, messages, tools)
        text = self.tokenizer.apply_chat_template(chat, tools=tool_specs, tokenize=False, add_generation_prompt=True)
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def embed(self, token_ids: Sequence[int]) -> WireTensor:
        """[1, len(token_ids), hidden] in the head's dtype."""
        ids = list(token_ids)
        if not ids or any(not isinstance(t, int | np.integer) or not 0 <= t < self.vocab_size for t in ids):
            raise ValueError(f"token_ids: need at least one id in 0..{self.vocab_size - 1}")
        with torch.inference_mode():
            return torch_to_wire(self.embed_weight[torch.tensor(ids, device=self.device)].unsqueeze(0))

    def logits(self, hiddens: Sequence[WireTensor], num_positions: Sequence[int] | None = None) -> np.ndarray:
        """float32 [Σ num_positions, vocab] logits of each one's last ``num_positions[i]`` positions
        (default: 1), in one matmul."""
        counts = num_positions or [1] * len(hiddens)
        with torch.inference_mode():
            rows = [wire_to_torch(h, self.hidden_size)[0, -n:] for h, n in zip(hiddens, counts, strict=True)]
            out = self.norm(torch.cat(rows).to(self.device, self.dtype)) @ self.lm_head_weight.T
            return out.float().cpu().numpy()


def _eos_ids(model_dir: Path, config, tokenizer) -> tuple[int, ...]:
    """End-of-sequence ids from generation_config.json, config.json and the tokenizer, in that order."""
    found: list[int | list[int] | None] = []
    if (model_dir / "generation_config.json").is_file():
        found.append(GenerationConfig.from_pretrained(model_dir, local_files_only=True).eos_token_id)
    found += [getattr(config, "eos_token_id", None), tokenizer.eos_token_id]
    ids: list[int] = []
    for item in found:
        for i in item if isinstance(item, list | tuple) else [item]:
            if i is not None and int(i) not in ids:
                ids.append(int(i))
    return tuple(ids)
