"""Reliability (issue: failures, overload, access): block servers killed with SIGKILL under load, a
server restarted by hand, a burst past the queue bound, and secrets that never leak.

Every test starts ``chainserve serve`` as a user does and drives it over HTTP with streamed requests
(the benchmark client, :mod:`chainserve.measure.bench`), so a lost, cut or duplicated token shows in the
client's text.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time
from pathlib import Path

import httpx
import pytest
from tests.runtime.conftest import DATA, EMULATED_6, block_server_by_hand, by_hand_cluster, server_infos, serving

from chainserve.measure.bench import BenchRequest, RequestResult, run_bench
from chainserve.runtime.backends.emulated import EmulatedHead

PROMPTS = [
    "the chain serves the model",
    "a fast server holds the cache",
    "we wait in the queue",
    "light on the river",
    "the plan came back",
    "many people work here",
    "time to start",
    "old stone road",
]


def run_load(url: str, prompts: list[str], max_tokens: int, concurrency: int, faults=()) -> list[RequestResult]:
    """Send every prompt (``concurrency`` at a time, each as soon as a slot frees) while running ``faults``
    (``(offset_s, callable)``) at their offsets; the results in prompt order."""
    requests = [BenchRequest(0.0, 0, max_tokens, prompt=p) for p in prompts]

    async def go() -> list[RequestResult]:
        bench = asyncio.create_task(run_bench(url, requests, progress=False, concurrency=concurrency))
        began = time.monotonic()
        for at_s, fault in sorted(faults, key=lambda f: f[0]):
            await asyncio.sleep(max(0.0, at_s - (time.monotonic() - began)))
            fault()
        return list((await bench).results)

    return asyncio.run(go())


def report(results: list[RequestResult], prompts: list[str], expected) -> dict:
    """Counts: sent, completed, resumed, lost (not completed, or completed with other text than
    ``expected(prompt)``, the fault-free answer)."""
    wrong = sum(r.ok and r.text != expected(prompts[r.index]) for r in results)
    return {
        "sent": len(results),
        "completed": sum(r.ok for r in results),
        "resumed": sum(r.ok and r.num_attempts > 1 for r in results),
        "lost": sum(not r.ok for r in results) + wrong,
        "wrong_text": wrong,
    }


def emulated_reference(prompt: str, max_tokens: int) -> str:
    """The emulated model's greedy answer, computed here (what a fault-free run streams)."""
    return EmulatedHead("toy", 8, 4096).greedy_text(prompt, max_tokens)


def kill(served, name: str):
    """A fault: SIGKILL the block server ``name`` (its pid from its own info)."""
    pid = next(info["pid"] for info in server_infos(served) if info["server_id"] == name)

    def fault() -> None:
        os.kill(pid, signal.SIGKILL)

    return fault


def wait_for(condition, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.2)


@pytest.mark.slow
def test_emulated_servers_killed_under_load_lose_nothing_and_a_restarted_one_rejoins(tmp_path) -> None:
    max_tokens = 40
    with serving(str(EMULATED_6), "--backend", "emulated", tmp_path=tmp_path) as served:
        plan_file = tmp_path / "plan.json"
        plan_file.write_text(json.dumps(served.get("/plan")))
        ports = {s["name"]: s["endpoint"].rsplit(":", 1)[1] for s in served.get("/status")["servers"]}
        first_chain = served.get("/plan")["chains"][0]["servers"]  # s0 → s1 → s4: JFFC fills it first
        faults = [(1.0, kill(served, first_chain[0])), (3.0, kill(served, first_chain[2]))]
        prompts = PROMPTS * 6
        results = run_load(served.url, prompts, max_tokens, concurrency=8, faults=faults)
        counts = report(results, prompts, lambda p: emulated_reference(p, max_tokens))
        print("fault report (emulated):", counts)
        assert counts["sent"] == counts["completed"] == len(prompts)
        assert counts["lost"] == counts["wrong_text"] == 0
        assert counts["resumed"] >= 1
        assert all(r.route["token_ids"] and len(r.route["token_ids"]) == max_tokens for r in results)
        plan = served.get("/plan")
        assert [c["reason"] for c in plan["changes"]] == ["server_failed", "server_failed"]
        assert plan["alive"][first_chain[0]] is False and plan["alive"][first_chain[2]] is False
        assert all(first_chain[0] not in c["servers"] for c in plan["chains"])

        # the operator restarts the first one by hand, same id, same port: it rejoins and takes load
        restarted, _ = block_server_by_hand(plan_file, first_chain[0], tmp_path / "token", ports[first_chain[0]])
        try:
            wait_for(lambda: served.get("/plan")["alive"][first_chain[0]])
            assert served.get("/plan")["changes"][-1]["reason"] == "server_back"
            again = run_load(served.url, PROMPTS, 8, concurrency=4)
            assert all(r.ok for r in again)
            used = {h["server"] for r in again for h in r.route["hops"]}
            assert first_chain[0] in used
        finally:
            restarted.terminate()
            restarted.wait(10)


def test_torch_servers_killed_under_load_give_the_fault_free_text(tmp_path) -> None:
    pytest.importorskip("torch", reason="the torch extra is not installed")
    max_tokens = 24
    args = (
        str(DATA / "tiny-6.yaml"),
        "--backend",
        "torch",
        "--model",
        "tiny-random",
        "--delay-ms",
        "a0=4,a1=4,a2=4,b0=4,b1=4,b2=4",
    )
    with serving(*args, tmp_path=tmp_path) as served:
        reference = {PROMPTS[r.index]: r.text for r in run_load(served.url, PROMPTS, max_tokens, concurrency=4)}
        chains = [c["servers"] for c in served.get("/plan")["chains"]]
        faults = [(0.6, kill(served, chains[0][0])), (1.6, kill(served, chains[1][1]))]
        results = run_load(served.url, PROMPTS * 3, max_tokens, concurrency=8, faults=faults)
        counts = report(results, PROMPTS * 3, reference.__getitem__)
        print("fault report (torch, tiny model):", counts)
        assert counts["completed"] == counts["sent"] and counts["lost"] == 0
        assert counts["resumed"] >= 1


def test_a_burst_past_the_queue_bound_gets_429_and_service_goes_on(tmp_path) -> None:
    # block-slots of 32 tokens: each request (3 + 16 tokens) takes one, as many as the plan's c_k count
    with serving(str(EMULATED_6), "--backend", "emulated", "--max-tokens", "32", tmp_path=tmp_path) as served:
        capacity = served.get("/plan")["num_job_servers"]
        rss_before = _rss_kb(served.proc.pid)

        async def burst() -> list[httpx.Response]:
            async with httpx.AsyncClient(base_url=served.url, timeout=120) as http:
                body = {"prompt": "the chain serves", "max_tokens": 16}
                return await asyncio.gather(*(http.post("/v1/completions", json=body) for _ in range(7 * capacity)))

        responses = asyncio.run(burst())
        codes = [r.status_code for r in responses]
        assert set(codes) == {200, 429} and codes.count(429) >= capacity
        rejected = next(r for r in responses if r.status_code == 429)
        assert int(rejected.headers["Retry-After"]) >= 1 and rejected.json()["error"]["type"] == "rate_limit_error"
        metrics = httpx.get(served.url + "/metrics").text
        assert f'chainserve:request_failure_total{{reason="rejected"}} {float(codes.count(429))}' in metrics
        after = run_load(served.url, PROMPTS, 8, concurrency=4)
        assert all(r.ok for r in after)
        assert _rss_kb(served.proc.pid) - rss_before < 100_000  # memory stays bounded


def test_secrets_never_leak_and_servers_refuse_strangers(tmp_path) -> None:
    with serving(str(EMULATED_6), "--backend", "emulated", "--api-key", "api-key-123", tmp_path=tmp_path) as served:
        headers = {"Authorization": "Bearer api-key-123"}
        body = {"prompt": "the chain", "max_tokens": 2}
        assert httpx.post(served.url + "/v1/completions", json=body).status_code == 401
        ok = httpx.post(served.url + "/v1/completions", json=body, headers=headers)
        assert ok.status_code == 200
        pages = [httpx.get(served.url + p, headers=headers).text for p in ("/plan", "/status", "/metrics", "/health")]
        assert not any(served.token in page for page in pages)
        endpoint = served.get("/status")["servers"][0]["endpoint"]

        async def stranger() -> str:
            from chainserve.runtime.client import BlockClient, ServerFailed

            client = BlockClient("stranger", endpoint, "not-the-token")
            try:
                await client.info()
            except ServerFailed as exc:
                return exc.code
            finally:
                client.close()
            return "answered"

        assert asyncio.run(stranger()) == "unauthorized"
    logs = [p.read_text(errors="replace") for p in Path(served.log_dir).glob("*.log")]
    logs.append((tmp_path / "serve.err").read_text(errors="replace"))
    assert logs and not any(served.token in text for text in logs)


def _rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def test_losing_every_server_of_a_block_places_the_model_anew_on_the_survivors(tmp_path) -> None:
    max_tokens = 30
    with serving(str(EMULATED_6), "--backend", "emulated", tmp_path=tmp_path) as served:
        spans = {s["name"]: (s["start_block"], s["num_blocks"]) for s in served.get("/plan")["servers"]}
        first = sorted(name for name, (start, _) in spans.items() if start == 1)  # every server holding block 1
        faults = [(0.8 + 0.3 * i, kill(served, name)) for i, name in enumerate(first)]
        results = run_load(served.url, PROMPTS * 2, max_tokens, concurrency=6, faults=faults)
        counts = report(results, PROMPTS * 2, lambda p: emulated_reference(p, max_tokens))
        print("fault report (re-placement):", counts)
        assert counts["completed"] == counts["sent"] and counts["lost"] == 0
        plan = served.get("/plan")
        assert "replaced" in [c["reason"] for c in plan["changes"]]
        assert not {s["name"] for s in plan["servers"]} & set(first)
        assert min(s["start_block"] for s in plan["servers"]) == 1 and plan["chains"]


def test_health_is_degraded_while_a_chain_serves_and_unavailable_once_block_1_is_gone(tmp_path) -> None:
    """Servers started by hand (nothing restarts them): with s0 killed the chains through s3 still
    serve, so ``/health`` is 200 ``degraded`` while requests complete; with s3 killed too no live
    server holds block 1, nothing can be placed anew, and ``/health`` is 503."""
    plan_file, procs, endpoints = by_hand_cluster(tmp_path, "health-token")
    first = {s["name"] for s in json.loads(Path(plan_file).read_text())["servers"] if s.get("start_block") == 1}
    assert first == {"s0", "s3"}
    try:
        by_hand = ("--plan", str(plan_file), "--servers", ",".join(f"{n}={e}" for n, e in endpoints.items()))
        with serving(*by_hand, "--heartbeat-deadline-s", "1", tmp_path=tmp_path, token="health-token") as served:
            assert httpx.get(served.url + "/health").json() == {"status": "ok"}
            procs["s0"].kill()
            wait_for(lambda: httpx.get(served.url + "/health").json()["status"] == "degraded")
            health = httpx.get(served.url + "/health")
            assert (health.status_code, health.json()["dead"]) == (200, ["s0"])
            results = run_load(served.url, PROMPTS, 6, concurrency=4)
            assert all(r.ok for r in results)
            assert httpx.get(served.url + "/health").status_code == 200
            procs["s3"].kill()
            wait_for(lambda: httpx.get(served.url + "/health").status_code == 503)
            assert httpx.get(served.url + "/health").json() == {"status": "unavailable", "dead": ["s0", "s3"]}
    finally:
        for proc in procs.values():
            proc.kill()
            proc.wait(10)
