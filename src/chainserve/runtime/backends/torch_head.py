"""Torch ModelHead for the orchestrator (paper §4.2): tokenizer and chat template, and what any
decoder-only causal LM does before its first block and after its last (issue 29), run by the model's
own code on a batch of jobs (issue 17).

The head is the whole ``…ForCausalLM`` (:mod:`.hf_parts`: built on the meta device, only the tensors
outside the layer list loaded, tied embeddings tied) with its layer list replaced by one stand-in:
- :meth:`TorchHead.embed` runs the base model on the tokens at their positions; the stand-in stops it
  where the first layer would start and hands back what would enter it (token embeddings plus whatever
  the family adds: GPT-2 and OPT learned positions, Gemma's √hidden scale, BLOOM's embedding norm);
  where that equals the embedding module's output (checked at start on sample tokens and positions:
  Llama, Mistral, Qwen, …) the embedding module alone runs;
- :meth:`TorchHead.logits` runs the causal LM with the stand-in returning the hidden states that left
  the last block: the final norm, the LM head and any logit scaling or softcapping (Gemma 2/3, Cohere,
  Granite) are the model's own; the LM head's GEMM runs on prepared weights of its own (issue 30,
  :func:`~.prepared.prepare_alone`: fp32 in panels where the fused CPU kernels are built, else a
  transposed copy for a lone row and oneDNN's layout for more; a tied head keeps the embedding's weight
  for the embedding), measured on this machine at one thread for SmolLM2's 49,152 × 576 head: on
  oneDNN 6.7 ms against 13 unprepared for one row, 9.5 against 25 for eight; on panels 6.1 against
  oneDNN's 9.2 for eight; where the logits are just the final norm and the LM head (checked at start,
  bit for bit) only those two run.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from transformers import AutoTokenizer, GenerationConfig

from chainserve.runtime.backends.base import WireTensor
from chainserve.runtime.backends.hf_parts import (
    check_supported,
    context_limit,
    dry_run,
    layer_list,
    load_config,
    load_parts,
    skeleton,
)
from chainserve.runtime.backends.prepared import prepare_alone
from chainserve.runtime.backends.torch_common import torch_to_wire, wire_to_torch
from chainserve.runtime.models import model_name
from chainserve.runtime.tools import Tool, for_template

#: Context length assumed for a family that states none (ALiBi models such as BLOOM).
DEFAULT_CONTEXT = 2048


class _Entered(Exception):  # noqa: N818 - control flow, not an error
    """Raised by :class:`_StandIn` with the hidden states about to enter the first layer."""

    def __init__(self, hidden: torch.Tensor):
        super().__init__("entered the first layer")
        self.hidden = hidden


class _StandIn(torch.nn.Module):
    """Takes the place of the decoder layers: stops the forward at the first layer (``given`` None)
    or returns ``given``, the hidden states after the last one, in the layers' own return form."""

    def __init__(self, like: torch.nn.Module, returns_tuple: bool):
        super().__init__()
        for key, value in vars(like).items():  # attention_type, is_sliding, layer_idx, …: read by some loops
            if not key.startswith("_") and isinstance(value, str | int | float | bool | type(None)):
                setattr(self, key, value)
        self.returns_tuple, self.given = returns_tuple, None

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        if self.given is None:
            raise _Entered(hidden_states)
        return (self.given,) if self.returns_tuple else self.given


class TorchHead:
    """ModelHead of the causal LM in ``model_dir``; ``max_tokens`` caps the context below the model's
    own (``None``: the model's own limit); weights live on ``device``."""

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
        text = config.get_text_config()
        if max_tokens is not None and (not isinstance(max_tokens, int) or max_tokens < 1):
            raise ValueError(f"max_tokens: must be a positive integer, got {max_tokens!r}")
        check_supported(config, dtype)
        self.model_id = model_name(model_dir)
        self.num_blocks = text.num_hidden_layers
        limit = context_limit(text) or max_tokens or DEFAULT_CONTEXT
        self.max_tokens = min(limit, max_tokens or limit)
        self.hidden_size, self.dtype, self.device = text.hidden_size, dtype, torch.device(device)
        self.tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
        self.eos_token_ids = _eos_ids(model_dir, config, self.tokenizer)
        model = skeleton(config, dtype)
        load_parts(model, model_dir, None, dtype, self.device)
        model.tie_weights()
        name, layers = layer_list(model)
        parent, attr = name.rsplit(".", 1) if "." in name else ("", name)
        self.stand_in = _StandIn(layers[0], dry_run(config).layers_return_tuple)
        setattr(model.get_submodule(parent), attr, torch.nn.ModuleList([self.stand_in]))
        self.model = model.to(self.device).eval()
        output = model.get_output_embeddings()
        if output is not None:
            model.set_output_embeddings(prepare_alone(output))
        self.embedding = model.get_input_embeddings()
        self.vocab_size = self.embedding.weight.shape[0]
        self.embeds_alone = self._embedding_is_entry()
        self.norm_then_head = self._logits_are_norm_then_head()

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

    def embed(self, token_ids: Sequence[int], position: int = 0) -> WireTensor:
        """[1, len(token_ids), hidden] entering block 1, the first token at ``position``, in the head's dtype."""
        ids = list(token_ids)
        if not ids or any(not isinstance(t, int | np.integer) or not 0 <= t < self.vocab_size for t in ids):
            raise ValueError(f"token_ids: need at least one id in 0..{self.vocab_size - 1}")
        with torch.inference_mode():
            return torch_to_wire(self._entry(torch.tensor([ids], device=self.device), position))

    def logits(self, hiddens: Sequence[WireTensor], num_positions: Sequence[int] | None = None) -> np.ndarray:
        """float32 [Σ num_positions, vocab] logits of each one's last ``num_positions[i]`` positions
        (default: 1), in one forward."""
        counts = num_positions or [1] * len(hiddens)
        with torch.inference_mode():
            rows = [wire_to_torch(h, self.hidden_size)[0, -n:] for h, n in zip(hiddens, counts, strict=True)]
            h = torch.cat(rows).to(self.device, self.dtype)[None]
            if self.norm_then_head:
                return self._norm_then_head(h)[0].float().cpu().numpy()
            self.stand_in.given = h
            try:
                out = self.model(inputs_embeds=h, use_cache=False)
            finally:
                self.stand_in.given = None
            return out.logits[0].float().cpu().numpy()

    def _entry(self, ids: torch.Tensor, position: int) -> torch.Tensor:
        if self.embeds_alone:
            return self.embedding(ids)
        pos = position + torch.arange(ids.shape[1], device=self.device)[None]
        try:
            self.model.base_model(input_ids=ids, position_ids=pos, use_cache=False)
        except _Entered as entered:
            return entered.hidden
        raise RuntimeError(f"model: {self.model_id} ran no decoder layer")

    def _embedding_is_entry(self) -> bool:
        """Whether the embedding module's output is what enters block 1 (no positions, no scaling in
        the base model's forward): sample tokens at positions 0 and 7 through both."""
        self.embeds_alone = False
        ids = torch.arange(min(5, self.vocab_size), device=self.device)[None]
        with torch.inference_mode():
            plain = self.embedding(ids)
            return all(torch.equal(self._entry(ids, p), plain) for p in (0, 7))

    def _norm_then_head(self, h: torch.Tensor) -> torch.Tensor:
        return self.model.get_output_embeddings()(self.model.base_model.norm(h))

    def _logits_are_norm_then_head(self) -> bool:
        """Whether the causal LM's logits are its output embedding of its base model's final ``norm``
        and nothing else (no scaling, softcapping or positions: Llama, Mistral, Qwen, …): checked on
        sample hidden states, bit for bit; then :meth:`logits` runs just those two modules, not the
        whole forward with its masks and rotary embeddings (~1 ms per call at one row, issue 30)."""
        if not isinstance(getattr(self.model.base_model, "norm", None), torch.nn.Module):
            return False
        self.norm_then_head = False
        gen = torch.Generator().manual_seed(0)
        h = torch.randn(2, 3, self.hidden_size, generator=gen).to(self.device, self.dtype)
        with torch.inference_mode():
            rows = [torch_to_wire(row[None]) for row in h]
            whole = self.logits(rows, [3, 3])
            return np.array_equal(whole, self._norm_then_head(h.reshape(1, 6, -1))[0].float().cpu().numpy())


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
