"""Greedy reference tokens of a whole model in this process (Hugging Face ``generate``), for the
end-to-end tests that check served output token for token."""

from __future__ import annotations

import torch
from transformers import AutoTokenizer, LlamaForCausalLM

from chainserve.runtime.models import resolve_model


class Reference:
    """Greedy tokens of the whole model in this process (``generate``), per question, longest asked."""

    def __init__(self, model: str):
        path = resolve_model(model)
        self.tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        self.model = LlamaForCausalLM.from_pretrained(path, dtype=torch.float32, local_files_only=True).eval()
        self.cache: dict[str, list[int]] = {}

    def tokens(self, question: str, max_tokens: int) -> list[int]:
        if len(self.cache.get(question, ())) < max_tokens:
            chat = [{"role": "user", "content": question}]
            ids = self.tokenizer.apply_chat_template(
                chat, add_generation_prompt=True, return_tensors="pt", return_dict=True
            )
            with torch.inference_mode():
                out = self.model.generate(**ids, max_new_tokens=max_tokens, do_sample=False)
            self.cache[question] = out[0, ids["input_ids"].shape[1] :].tolist()
        eos = self.model.generation_config.eos_token_id
        eos = set(eos if isinstance(eos, list) else [eos])
        got = self.cache[question][:max_tokens]
        cut = next((i + 1 for i, t in enumerate(got) if t in eos), len(got))  # generation stops at EOS
        return got[:cut]
