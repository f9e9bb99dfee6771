"""Self-healing (issue 33): on a cluster with ONE chain a → b → c, a block server killed with SIGKILL
under load is restarted by its launcher (local, or Ray), requests never wait silently (each completes or
gets a 503 within ``--unavailable-wait-s``), a replay after the restart is exact, and a server the
operator started by hand is re-admitted when it comes back by hand.

Each test starts ``chainserve serve`` as a user does and talks to it over HTTP."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import subprocess
import sys
import time

import httpx
import openai
import pytest
from tests.runtime.conftest import DATA, block_server_by_hand, server_infos, serving

from chainserve.runtime.backends.emulated import EmulatedHead

CHAIN_3 = DATA / "emulated-chain-3.yaml"
PROMPTS = ["the chain serves the model", "a fast server holds the cache", "we wait in the queue", "old stone road"]


def wait_for(condition, timeout_s: float, what: str) -> float:
    """Poll ``condition`` until true; the seconds it took."""
    began = time.monotonic()
    while not condition():
        assert time.monotonic() - began < timeout_s, f"{what}: not within {timeout_s:g} s"
        time.sleep(0.1)
    return time.monotonic() - began


def health(url: str) -> str:
    return httpx.get(url + "/health", timeout=10).json()["status"]


def restarts(url: str, server: str) -> float:
    """``chainserve:server_restarts_total{server}`` (0 when never counted)."""
    text = httpx.get(url + "/metrics", timeout=10).text
    match = re.search(rf'^chainserve:server_restarts_total\{{server="{server}"\}} (\S+)$', text, re.M)
    return float(match.group(1)) if match else 0.0


def pid_of(served, name: str) -> int:
    return next(info["pid"] for info in server_infos(served) if info["server_id"] == name)


async def completions(url: str, bodies: list[dict], concurrency: int, fault=None, fault_at_s: float = 0.0):
    """POST every body (``concurrency`` at a time); ``fault()`` runs at ``fault_at_s``. Per request: its
    status, JSON answer, and the times (since the start) it was sent and answered."""
    began, gate = time.monotonic(), asyncio.Semaphore(concurrency)

    async def one(http: httpx.AsyncClient, body: dict) -> tuple[int, dict, float, float]:
        async with gate:
            sent = time.monotonic() - began
            response = await http.post("/v1/completions", json=body)
            return response.status_code, response.json(), sent, time.monotonic() - began

    async def trigger() -> None:
        await asyncio.sleep(fault_at_s)
        fault()

    async with httpx.AsyncClient(base_url=url, timeout=300) as http:
        results = await asyncio.gather(*(one(http, b) for b in bodies), *([trigger()] if fault else []))
    return [r for r in results if r is not None]


def test_the_middle_server_of_a_single_chain_killed_under_load_is_restarted(tmp_path) -> None:
    wait_s, max_tokens = 20.0, 30
    args = ("--backend", "emulated", "--unavailable-wait-s", str(wait_s))
    with serving(str(CHAIN_3), *args, tmp_path=tmp_path) as served:
        (chain,) = served.get("/plan")["chains"]
        assert len(chain["servers"]) == 3
        middle = chain["servers"][1]
        old_pid = pid_of(served, middle)
        bodies = [{"prompt": PROMPTS[i % 4], "max_tokens": max_tokens, "temperature": 0} for i in range(24)]
        head = EmulatedHead("toy", 6, 4096)
        results = asyncio.run(
            completions(served.url, bodies, 6, lambda: os.kill(old_pid, signal.SIGKILL), fault_at_s=1.0)
        )
        codes = [code for code, *_ in results]
        print("status codes after kill -9 of", middle, codes)
        assert set(codes) <= {200, 503}, codes
        for (code, answer, sent, answered), body in zip(results, bodies, strict=True):
            assert answered - max(sent, 1.0) < wait_s + 10, "a request waited past the bound"
            if code == 200:
                assert answer["choices"][0]["text"] == head.greedy_text(body["prompt"], max_tokens)
            else:
                assert answer["error"]["code"] == "unavailable"
        assert codes.count(200) >= 6  # those before the kill, and those the restarted chain served
        wait_for(lambda: health(served.url) == "ok", 60, "/health ok after the restart")
        assert pid_of(served, middle) != old_pid
        again = httpx.post(served.url + "/v1/completions", json=bodies[0], timeout=60)
        assert again.status_code == 200
        assert restarts(served.url, middle) == 1.0
        status = served.get("/status")
        assert {s["name"]: s["restarts"] for s in status["servers"]}[middle] == 1
        reasons = [c["reason"] for c in served.get("/plan")["changes"]]
        assert reasons[:1] == ["server_failed"] and "server_restarted" in reasons
        logs = (served.log_dir.parent / "serve.err").read_text()
        assert f"restarting block server {middle}" in logs


def test_without_a_chain_requests_get_503_within_the_bound_and_a_hand_started_server_is_readmitted(
    tmp_path,
) -> None:
    """Servers started by hand are not restarted: with b dead no chain exists, so a new request gets 503
    with Retry-After at once, the waiting ones 503 after ``--unavailable-wait-s``, ``/health`` is 503
    ``unavailable``; b started again by hand on its port rejoins and serves."""
    wait_s = 3.0
    plan = subprocess.run(
        [sys.executable, "-m", "chainserve", "plan", str(CHAIN_3), "--planner", "greedy", "--json"],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    plan_file, token_file = tmp_path / "plan.json", tmp_path / "token"
    plan_file.write_text(plan)
    token_file.write_text("self-healing-token")
    procs, endpoints = {}, {}
    for s in json.loads(plan)["servers"]:
        procs[s["name"]], endpoints[s["name"]] = block_server_by_hand(plan_file, s["name"], token_file)
    try:
        by_hand = ("--plan", str(plan_file), "--servers", ",".join(f"{n}={e}" for n, e in endpoints.items()))
        args = (*by_hand, "--heartbeat-deadline-s", "1", "--unavailable-wait-s", str(wait_s))
        with serving(*args, tmp_path=tmp_path, token="self-healing-token") as served:
            (chain,) = served.get("/plan")["chains"]
            middle = chain["servers"][1]
            long = {"prompt": "a long answer", "max_tokens": 400, "temperature": 0}
            killed_at: list[float] = []

            def kill() -> None:
                procs[middle].kill()
                killed_at.append(time.monotonic())

            began = time.monotonic()
            results = asyncio.run(completions(served.url, [long] * 3, 3, kill, fault_at_s=1.0))
            kill_s = killed_at[0] - began
            for code, answer, _, answered in results:
                assert code == 503 and answer["error"]["code"] == "unavailable", (code, answer)
                assert answered - kill_s < wait_s + 4, "a request waited past the bound"
            refused = httpx.post(served.url + "/v1/completions", json=long, timeout=10)
            assert refused.status_code == 503 and int(refused.headers["Retry-After"]) >= 1
            assert refused.json()["error"]["type"] == "server_error"
            assert health(served.url) == "unavailable"
            procs[middle].wait(10)
            port = endpoints[middle].rsplit(":", 1)[1]
            procs[middle], _ = block_server_by_hand(plan_file, middle, token_file, port)
            wait_for(lambda: health(served.url) == "ok", 30, "/health ok once b is back")
            short = {"prompt": "the plan came back", "max_tokens": 8, "temperature": 0}
            assert httpx.post(served.url + "/v1/completions", json=short, timeout=60).status_code == 200
            assert restarts(served.url, middle) == 0.0  # nobody restarted it but its operator
            assert served.get("/plan")["changes"][-1]["reason"] == "server_back"
    finally:
        for proc in procs.values():
            proc.kill()
            proc.wait(10)


def test_a_torch_chain_restarted_after_kill_9_replays_exactly(tmp_path) -> None:
    pytest.importorskip("torch", reason="the torch extra is not installed")
    from tests.runtime.reference import Reference

    max_tokens = 24
    reference = Reference("tiny-random")
    args = ("--backend", "torch", "--model", "tiny-random", "--device", "cpu", "--delay-ms", "t0=3,t1=3,t2=3")
    with serving(str(DATA / "tiny-3.yaml"), *args, tmp_path=tmp_path) as served:
        (chain,) = served.get("/plan")["chains"]
        middle = chain["servers"][1]
        old_pid = pid_of(served, middle)
        model = served.get("/v1/models")["data"][0]["id"]
        client = openai.AsyncOpenAI(base_url=served.url + "/v1", api_key="unused", max_retries=0, timeout=120)
        questions = [PROMPTS[i % 4] for i in range(8)]

        async def run() -> list[tuple[str, object]]:
            async def one(question: str) -> tuple[str, object]:
                try:
                    reply = await client.chat.completions.create(
                        model=model, messages=[{"role": "user", "content": question}], max_tokens=max_tokens,
                        temperature=0,
                    )  # fmt: skip
                except openai.APIStatusError as exc:
                    return question, exc.status_code
                return question, reply.model_extra["chainserve"]

            async def fault() -> None:
                await asyncio.sleep(0.5)
                os.kill(old_pid, signal.SIGKILL)

            results = await asyncio.gather(*(one(q) for q in questions), fault())
            await client.close()
            return results[:-1]

        results = asyncio.run(run())
        completed = [(q, extra) for q, extra in results if isinstance(extra, dict)]
        assert all(extra == 503 for _, extra in results if not isinstance(extra, dict))
        assert completed, "no request completed"
        for question, extra in completed:
            assert extra["token_ids"] == reference.tokens(question, max_tokens), question
        print(f"torch: {len(completed)} of 8 completed, {sum(e['num_attempts'] > 1 for _, e in completed)} replayed")
        wait_for(lambda: health(served.url) == "ok", 60, "/health ok after the restart")
        assert pid_of(served, middle) != old_pid and restarts(served.url, middle) == 1.0
        sync = openai.OpenAI(base_url=served.url + "/v1", api_key="unused", max_retries=0, timeout=60)
        reply = sync.chat.completions.create(
            model=model, messages=[{"role": "user", "content": PROMPTS[0]}], max_tokens=max_tokens, temperature=0
        )
        assert reply.model_extra["chainserve"]["token_ids"] == reference.tokens(PROMPTS[0], max_tokens)


def test_the_ray_launcher_restarts_a_killed_actor_and_its_server(tmp_path) -> None:
    pytest.importorskip("ray", reason="Ray is not installed (optional extra: pip install 'chainserve[ray]')")
    args = ("--backend", "emulated", "--launcher", "ray")
    with serving(str(CHAIN_3), *args, tmp_path=tmp_path, ready_s=300) as served:
        (chain,) = served.get("/plan")["chains"]
        middle = chain["servers"][1]
        server_pid = pid_of(served, middle)
        actor_pid = int(open(f"/proc/{server_pid}/stat").read().rsplit(")", 1)[1].split()[1])  # its parent
        os.kill(actor_pid, signal.SIGKILL)  # the actor's process: Ray restarts the actor, we its server
        wait_for(lambda: health(served.url) != "ok", 30, "the server's death seen")
        wait_for(lambda: health(served.url) == "ok", 60, "/health ok after Ray restarted the actor")
        assert pid_of(served, middle) != server_pid and restarts(served.url, middle) == 1.0
        body = {"prompt": "the chain serves", "max_tokens": 5, "temperature": 0}
        assert httpx.post(served.url + "/v1/completions", json=body, timeout=60).status_code == 200
