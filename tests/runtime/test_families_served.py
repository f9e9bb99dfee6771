"""Any decoder family, served (issue 29, item 1): tiny random models of 14 families, each through
``chainserve serve --backend torch --model DIR`` (six block-server processes, two chains of three), give
Hugging Face ``generate``'s greedy tokens on the whole model, token for token, for three concurrent
requests of different lengths (ragged decode batches), one of them prefilled in chunks
(``--max-batch-tokens``), while a block server of the chain they run on is killed (SIGKILL) once all
three hold their sessions there: the requests resume on the other chain and still equal ``generate``.

In-process, every family of the zoo (:mod:`tests.runtime.families`) is also checked span by span:
three :class:`TorchSpan` s and a :class:`TorchHead` against the whole model."""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

import httpx
import openai
import pytest

torch = pytest.importorskip("torch", reason="the torch extra is not installed")
from tests.runtime.conftest import server_infos, serving
from tests.runtime.families import FAMILIES, build_family
from transformers import AutoModelForCausalLM

from chainserve.runtime.backends.base import SpanInfo
from chainserve.runtime.backends.torch_backend import TorchHead, TorchSpan
from chainserve.runtime.backends.torch_common import torch_to_wire, wire_to_torch

#: The families the issue names (sliding windows, MoE, MLA, ALiBi, learned positions, sinks, …).
SERVED = (
    "mistral", "qwen2", "qwen3_moe", "mixtral", "gemma2", "gemma3", "phi3", "gpt2", "gpt_neox", "falcon",
    "bloom", "starcoder2", "deepseek_v3", "gpt_oss",
)  # fmt: skip
#: Prompts as token ids (the completions API takes them): 40 tokens (prefilled in chunks of 8), 11, 5.
PROMPTS = ([(7 * i + 3) % 380 + 3 for i in range(40)], [11, 42, 99, 5, 17, 23, 200, 150, 8, 9, 10], [3, 4, 5, 6, 7])
MAX_TOKENS = 14
CLUSTER = """\
name: families
model: {name: family, num_blocks: 6, block_size_gb: 1.0, cache_size_gb: 0.05}
workload: {arrival_rate: 6.0, prompt_tokens: 16, output_tokens: 24, rho_bar: 0.8}
servers:
  - {name: a0, memory_gb: 2.5, tau_p_ms: 5, tau_c_ms: 240}
  - {name: a1, memory_gb: 2.5, tau_p_ms: 5, tau_c_ms: 240}
  - {name: a2, memory_gb: 2.5, tau_p_ms: 5, tau_c_ms: 240}
  - {name: b0, memory_gb: 2.5, tau_p_ms: 6, tau_c_ms: 240}
  - {name: b1, memory_gb: 2.5, tau_p_ms: 6, tau_c_ms: 240}
  - {name: b2, memory_gb: 2.5, tau_p_ms: 6, tau_c_ms: 240}
"""


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    root = tmp_path_factory.mktemp("zoo")
    built: dict[str, Path] = {}

    def get(name: str) -> Path:
        if name not in built:
            built[name] = build_family(name, root / name)
        return built[name]

    return get


def generate(model_dir: Path, prompt: list[int]) -> list[int]:
    """Hugging Face ``generate``, greedy, on the whole model (stops at its EOS, as the server does)."""
    full = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, local_files_only=True).eval()
    with torch.no_grad():
        out = full.generate(torch.tensor([prompt]), max_new_tokens=MAX_TOKENS, do_sample=False)
    return out[0, len(prompt) :].tolist()


@pytest.mark.parametrize("family", FAMILIES)
def test_three_spans_and_the_head_equal_the_whole_model(family, zoo) -> None:
    """Greedy tokens through spans 1–2, 3–4, 5–6 and the head (ragged decode of two sessions at once)
    equal ``generate``'s."""
    d = zoo(family)
    head, spans = TorchHead(d), [TorchSpan(d, SpanInfo(first, 2, 4, 64)) for first in (1, 3, 5)]
    prompts, want = PROMPTS[1:], [generate(d, p) for p in PROMPTS[1:]]
    got: list[list[int]] = [[], []]
    pending, positions = [list(p) for p in prompts], [0, 0]
    for step in range(MAX_TOKENS):
        hiddens = [
            wire_to_torch(head.embed(ids, pos), head.hidden_size) for ids, pos in zip(pending, positions, strict=True)
        ]
        if step == 0:  # prefills, one session at a time
            outs = []
            for r, x in enumerate(hiddens):
                for span in spans:
                    x = span.run(x, span.info.first_block, [span.info.slot_pages([2 * r, 2 * r + 1])], [0])
                outs.append(x)
        else:  # one ragged batch: the sessions sit at different positions
            x = torch.cat(hiddens)
            for span in spans:
                x = span.run(x, span.info.first_block, [span.info.slot_pages(s) for s in ([0, 1], [2, 3])], positions)
            outs = list(x.split(1))
        logits = head.logits([torch_to_wire(o) for o in outs])
        for r in range(len(outs)):
            positions[r] += len(pending[r])
            token = int(logits[r].argmax())
            got[r].append(token)
            pending[r] = [token]
    for r in range(2):
        stop = next((i + 1 for i, t in enumerate(got[r]) if t in head.eos_token_ids), MAX_TOKENS)
        assert got[r][:stop] == want[r], (family, r)


def stream(client: openai.OpenAI, model: str, prompt: list[int], out: dict) -> None:
    """One streamed completion: its ``chainserve`` route (from the last chunk) or its error."""
    try:
        chunks = client.completions.create(
            model=model, prompt=prompt, max_tokens=MAX_TOKENS, temperature=0, stream=True
        )
        for chunk in chunks:
            out["route"] = (chunk.model_extra or {}).get("chainserve", out.get("route"))
    except openai.OpenAIError as exc:
        out["error"] = exc


@pytest.mark.slow
@pytest.mark.parametrize("family", SERVED)
def test_a_family_served_by_block_servers_equals_generate_through_a_kill(family, zoo, tmp_path) -> None:
    d = zoo(family)
    want = [generate(d, p) for p in PROMPTS]
    cluster = tmp_path / "cluster.yaml"
    cluster.write_text(CLUSTER)
    delays = ",".join(f"{s}=20" for s in ("a0", "a1", "a2", "b0", "b1", "b2"))
    args = ("--backend", "torch", "--model", str(d), "--max-batch-tokens", "16", "--delay-ms", delays)
    with serving(str(cluster), *args, tmp_path=tmp_path) as served:
        chains = [c["servers"] for c in served.get("/plan")["chains"]]
        assert all(len(chain) >= 3 for chain in chains)
        pids = {i["server_id"]: i["pid"] for i in server_infos(served)}
        client = openai.OpenAI(base_url=served.url + "/v1", api_key="unused", timeout=60, max_retries=0)
        model = served.get("/v1/models")["data"][0]["id"]
        results: list[dict] = [{} for _ in PROMPTS]
        threads = [
            threading.Thread(target=stream, args=(client, model, p, r)) for p, r in zip(PROMPTS, results, strict=True)
        ]
        for t in threads:
            t.start()
        # every request decodes on one chain (it holds a session on each of its servers, and tokens come
        # out: two per request on average): kill that chain's middle server
        deadline, full = time.monotonic() + 60, len(PROMPTS)
        while _generated(served) < 2 * len(PROMPTS) or not (
            busy := [c for used in [_used(served)] for c in chains if min(used[s] for s in c) >= full]
        ):
            assert time.monotonic() < deadline, "the requests never decoded together on one chain"
            time.sleep(0.02)
        os.kill(pids[busy[0][1]], signal.SIGKILL)
        for t in threads:
            t.join(120)
    assert not [r["error"] for r in results if "error" in r]
    got = [r["route"]["token_ids"] for r in results]
    assert got == want, family
    assert sum(r["route"]["num_attempts"] > 1 for r in results) >= 1  # resumed after the kill


def _used(served) -> dict[str, int]:
    return {i["server_id"]: i["num_sessions"] for i in server_infos(served)}


def _generated(served) -> float:
    """Tokens generated so far (``/metrics``: counted as each is sampled)."""
    text = httpx.get(served.url + "/metrics", timeout=10).text
    return sum(
        float(line.split()[-1]) for line in text.splitlines() if line.startswith("chainserve:generation_tokens_total")
    )


def test_recurrent_and_hybrid_models_and_gemma3_in_fp16_are_refused() -> None:
    """A hybrid (Qwen3-Next: linear-attention layers) or recurrent (Mamba) model gets one clear error, as
    does Gemma 3 in fp16 (its activations overflow to NaN)."""
    import transformers

    from chainserve.runtime.backends.hf_parts import check_supported

    with pytest.raises(ValueError, match="linear_attention layers; chainserve serves decoders"):
        check_supported(transformers.Qwen3NextConfig(num_hidden_layers=4), torch.float32)
    with pytest.raises(ValueError, match="no list of its|keep no KV|cached keys and values"):
        from chainserve.runtime.model_facts import measure

        measure(transformers.MambaConfig(num_hidden_layers=2, hidden_size=32, vocab_size=64))
    with pytest.raises(ValueError, match="fp16 overflows to NaN"):
        check_supported(transformers.Gemma3TextConfig(), torch.float16)
    check_supported(transformers.Gemma3TextConfig(), torch.bfloat16)
