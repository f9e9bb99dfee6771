"""End to end on the emulated backend: ``chainserve serve`` started as a user does, spoken to over HTTP
with the official ``openai`` client, httpx and curl (paper §4.2; issue: serving runtime)."""

from __future__ import annotations

import asyncio
import json
import re
import shutil
import subprocess
import sys

import httpx
import openai
import pytest
from tests.runtime.conftest import (
    DATA,
    EMULATED_6,
    REPLICAS,
    block_server_by_hand,
    server_infos,
    serving,
    sse_events,
)
from typer.testing import CliRunner

from chainserve.cli import app
from chainserve.runtime.backends.emulated import VOCAB

PROMPT = "the chain serves the model"


@pytest.fixture(scope="module")
def proposed(tmp_path_factory):
    with serving(str(EMULATED_6), "--backend", "emulated", tmp_path=tmp_path_factory.mktemp("proposed")) as served:
        yield served


def client(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)


def test_chat_streaming_and_not_agree_and_report_usage(proposed) -> None:
    c = client(proposed.url)
    messages = [{"role": "user", "content": PROMPT}]
    whole = c.chat.completions.create(model="emulated/toy", messages=messages, max_tokens=7, temperature=0)
    chunks = list(
        c.chat.completions.create(
            model="emulated/toy",
            messages=messages,
            max_tokens=7,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    streamed = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert whole.choices[0].message.content == streamed != ""
    assert whole.choices[0].finish_reason == "length"
    assert whole.usage.completion_tokens == 7 and chunks[-1].usage.completion_tokens == 7
    assert whole.usage.prompt_tokens == chunks[-1].usage.prompt_tokens > 0
    assert [m.id for m in c.models.list().data] == ["emulated/toy"]


def test_completions_over_curl_stream_ends_with_done(proposed) -> None:
    if shutil.which("curl") is None:
        pytest.skip("curl is not installed")
    body = json.dumps({"prompt": PROMPT, "max_tokens": 5, "stream": True, "temperature": 0})
    out = subprocess.run(
        ["curl", "-sN", proposed.url + "/v1/completions", "-H", "content-type: application/json", "-d", body],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout
    events = sse_events(out)
    assert events[-1] == "[DONE]"
    text = "".join(e["choices"][0]["text"] for e in events[:-1] if e["choices"])
    plain = client(proposed.url).completions.create(model="emulated/toy", prompt=PROMPT, max_tokens=5, temperature=0)
    assert text == plain.choices[0].text


def test_an_idle_chain_serves_a_job_in_about_its_planned_time(proposed) -> None:
    """Emulated servers sleep τ^p_j·m_ij/l_out and τ^c_j/l_out per step: a job of l_out tokens on an idle
    system takes the fastest chain's T_k plus the runtime's own overhead."""
    plan = proposed.get("/plan")
    output_tokens = plan["problem"]["workload"]["output_tokens"]
    answer = client(proposed.url).completions.create(model="emulated/toy", prompt=PROMPT, max_tokens=output_tokens)
    route = answer.model_extra["chainserve"]
    assert route["chain"] == 1  # the first (fastest) of the plan's chains
    planned = plan["chains"][0]["service_time"]
    assert planned * 0.97 <= route["e2e_s"] <= planned * 1.5


def test_a_raw_instance_is_served_with_its_own_tau(tmp_path) -> None:
    raw = DATA.parents[2] / "examples" / "raw-instance.json"
    with serving(str(raw), "--backend", "emulated", tmp_path=tmp_path) as served:
        plan = served.get("/plan")
        assert plan["cluster"] == "raw-small" and served.get("/v1/models")["data"][0]["id"] == "emulated/raw-small"
        answer = client(served.url).completions.create(model="emulated/raw-small", prompt=PROMPT, max_tokens=20)
        planned = plan["chains"][answer.model_extra["chainserve"]["chain"] - 1]["service_time"]
        assert planned * 0.97 <= answer.model_extra["chainserve"]["e2e_s"] <= planned * 1.2


def test_a_burst_of_three_times_capacity_of_short_jobs_packs_the_fastest_chain_within_its_pages(proposed) -> None:
    """KV by tokens (issue 30): c_k counts jobs of the plan's length (``model.max_tokens``), so a burst
    of 3 × Σ c_k short jobs (a few tokens each) all run at once on the fastest chain, each holding only
    its own pages, and no server ever holds more pages than it has or refuses a session."""
    plan = proposed.get("/plan")
    capacity = plan["num_job_servers"]

    async def burst() -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=proposed.url, timeout=120) as http:
            body = {"prompt": PROMPT, "max_tokens": 8, "temperature": 0}
            return await asyncio.gather(*(http.post("/v1/completions", json=body) for _ in range(3 * capacity)))

    responses = asyncio.run(burst())
    assert [r.status_code for r in responses] == [200] * (3 * capacity)
    assert all(r.json()["usage"]["completion_tokens"] == 8 for r in responses)
    status = proposed.get("/status")
    assert status["num_running"] == status["num_waiting"] == 0
    assert status["chains"][0]["peak_busy"] > status["chains"][0]["capacity"]  # more short jobs than c_1
    for info in server_infos(proposed):
        assert info["peak_pages"] <= info["num_pages"] and info["peak_block_slots"] <= info["num_block_slots"]
        assert info["used_pages"] == info["num_sessions"] == 0
        assert info["num_refused"] == 0


@pytest.mark.parametrize(
    "body, status",
    [
        ({"prompt": PROMPT, "max_tokens": -1}, 400),
        ({"prompt": PROMPT, "max_tokens": 10**12}, 400),
        ({"prompt": PROMPT, "max_tokens": "many"}, 400),
        ({"prompt": 42}, 400),
        ({"prompt": PROMPT, "model": "gpt-4"}, 404),
        ({"prompt": ""}, 400),
    ],
)
def test_bad_completion_input_gets_openai_errors(proposed, body, status) -> None:
    response = httpx.post(proposed.url + "/v1/completions", json=body, timeout=30)
    assert response.status_code == status
    assert set(response.json()["error"]) >= {"message", "type", "code"}


def test_chains_are_numbered_from_1_everywhere_as_plan_numbers_them(proposed) -> None:
    """``chainserve plan`` lists chain k as row k (from 1): ``/status``, ``/metrics`` and the API's
    ``chainserve.chain`` give that chain the same number."""
    planned = CliRunner().invoke(app, ["plan", str(EMULATED_6), "--planner", "greedy", "--json"])
    chains = json.loads(planned.stdout)["chains"]
    numbers = list(range(1, len(chains) + 1))
    status = proposed.get("/status")["chains"]
    assert [c["chain"] for c in status] == numbers
    assert [c["servers"] for c in status] == [c["servers"] for c in chains]
    metrics = httpx.get(proposed.url + "/metrics", timeout=30).text
    capacity = dict(re.findall(r'^chainserve:chain_capacity_slots\{chain="(\d+)"\} (\S+)$', metrics, re.M))
    assert {int(n): float(c) for n, c in capacity.items()} == {n: chains[n - 1]["capacity"] for n in numbers}
    busy = re.findall(r'^chainserve:chain_busy_slots\{chain="(\d+)"\}', metrics, re.M)
    assert sorted(int(n) for n in busy) == numbers
    route = client(proposed.url).completions.create(model="emulated/toy", prompt=PROMPT, max_tokens=2).model_extra
    number = route["chainserve"]["chain"]
    assert [h["server"] for h in route["chainserve"]["hops"]] == chains[number - 1]["servers"]


def _counter(url: str, name: str) -> float:
    text = httpx.get(url + "/metrics", timeout=30).text
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(name))


def test_generated_tokens_are_counted_as_they_stream(proposed) -> None:
    """``generation_tokens_total`` grows while a request generates (the status page's tokens / s is
    its rate), and ends at exactly the request's completion tokens: nothing counted twice."""
    tokens, successes = "chainserve:generation_tokens_total", "chainserve:request_success_total"
    before, done_before = _counter(proposed.url, tokens), _counter(proposed.url, successes)
    body = {"prompt": PROMPT, "max_tokens": 40, "stream": True, "stream_options": {"include_usage": True}}
    received, mid, usage = 0, None, None
    with httpx.stream("POST", proposed.url + "/v1/completions", json=body, timeout=60) as response:
        for line in response.iter_lines():
            event = json.loads(line[len("data: ") :]) if line.startswith("data: {") else None
            if event and event["choices"] and event["choices"][0]["text"]:
                received += 1
            if event and event.get("usage"):
                usage = event["usage"]
            if received == 3 and mid is None:  # mid-stream: 37 tokens still to come
                mid = (_counter(proposed.url, tokens) - before, _counter(proposed.url, successes) - done_before)
    assert mid is not None and mid[0] >= 3 and mid[1] == 0
    assert usage["completion_tokens"] == 40 == _counter(proposed.url, tokens) - before


def test_a_token_id_outside_the_vocabulary_is_a_400_not_a_503(proposed) -> None:
    vocab_size = len(VOCAB)
    for ids in ([5, vocab_size], [vocab_size + 1000]):
        response = httpx.post(proposed.url + "/v1/completions", json={"prompt": ids, "max_tokens": 2}, timeout=30)
        assert response.status_code == 400, response.text
        assert "retry-after" not in response.headers
        error = response.json()["error"]
        assert error["param"] == "prompt" and f"vocabulary size {vocab_size}" in error["message"]
    last = httpx.post(proposed.url + "/v1/completions", json={"prompt": [vocab_size - 1], "max_tokens": 2}, timeout=30)
    assert last.status_code == 200, last.text


def test_tools_on_the_emulated_backend(proposed) -> None:
    """``auto`` answers (the toy model writes no calls); a forced call needs a tokenizer for its grammar."""
    c = client(proposed.url)
    tools = [{"type": "function", "function": {"name": "lookup", "parameters": {"type": "object"}}}]
    messages = [{"role": "user", "content": PROMPT}]
    answer = c.chat.completions.create(model="emulated/toy", messages=messages, tools=tools, max_tokens=4)
    assert answer.choices[0].finish_reason == "length" and answer.choices[0].message.content
    with pytest.raises(openai.BadRequestError, match="no Hugging Face tokenizer"):
        c.chat.completions.create(model="emulated/toy", messages=messages, tools=tools, tool_choice="required")


def test_bad_chat_input_gets_openai_errors(proposed) -> None:
    c = client(proposed.url)
    with pytest.raises(openai.BadRequestError):
        c.chat.completions.create(model="emulated/toy", messages=[], max_tokens=4)
    with pytest.raises(openai.BadRequestError):
        c.chat.completions.create(model="emulated/toy", messages=[{"role": "user", "content": PROMPT}], max_tokens=0)
    with pytest.raises(openai.NotFoundError):
        c.chat.completions.create(model="nope", messages=[{"role": "user", "content": PROMPT}])
    assert proposed.get("/health") == {"status": "ok"}


@pytest.mark.parametrize(
    "method, cluster",
    [("petals", REPLICAS), ("bprr", EMULATED_6), ("jffc-only", REPLICAS), ("proposed:sed", EMULATED_6)],
)
def test_every_method_serves(tmp_path, method, cluster) -> None:
    with serving(str(cluster), "--backend", "emulated", "--method", method, tmp_path=tmp_path) as served:
        assert served.get("/plan")["method"] == method

        async def ask() -> list[dict]:
            async with httpx.AsyncClient(base_url=served.url, timeout=120) as http:
                body = {"prompt": PROMPT, "max_tokens": 6, "temperature": 0}
                responses = await asyncio.gather(*(http.post("/v1/completions", json=body) for _ in range(6)))
            return [r.json() for r in responses]

        answers = asyncio.run(ask())
        # the emulated model's greedy text depends on the tokens only, never on the route
        reference = (
            client(served.url)
            .completions.create(model="emulated/toy", prompt=PROMPT, max_tokens=6, temperature=0)
            .choices[0]
            .text
        )
        assert {a["choices"][0]["text"] for a in answers} == {reference}
        assert all(a["chainserve"]["hops"] for a in answers)


def test_serve_a_saved_plan_with_servers_started_by_hand(tmp_path) -> None:
    plan_file = tmp_path / "plan.json"
    plan_file.write_text(
        subprocess.run(
            [sys.executable, "-m", "chainserve", "plan", str(EMULATED_6), "--json"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
    )
    names = [s["name"] for s in json.loads(plan_file.read_text())["servers"]]
    (tmp_path / "token").write_text("by-hand-token")
    procs, endpoints = [], {}
    try:
        for name in names:
            proc, endpoints[name] = block_server_by_hand(plan_file, name, tmp_path / "token")
            procs.append(proc)
        servers = ",".join(f"{n}={e}" for n, e in endpoints.items())
        by_hand = ("--plan", str(plan_file), "--servers", servers)
        with serving(*by_hand, tmp_path=tmp_path, token="by-hand-token") as served:
            answer = client(served.url).completions.create(model="emulated/toy", prompt=PROMPT, max_tokens=4)
            assert answer.usage.completion_tokens == 4
            assert {h["server"] for h in answer.model_extra["chainserve"]["hops"]} <= set(names)
    finally:
        for proc in procs:
            proc.terminate()
            proc.wait(10)
