"""No single point of failure (issue 21): epochs on the block servers, an orchestrator restarted on
servers that survived, and a standby that takes over from a killed orchestrator under load.

Block servers outlive their orchestrator (started by hand here, or ``serve --detach-servers``); a
newer orchestrator's first message frees the older one's sessions, and the older one's late messages
are refused, so a takeover leaks no block-slot and a dead orchestrator cannot write into a new KV."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import openai
import pytest
from tests.runtime.conftest import EMULATED_6, by_hand_cluster

from chainserve.measure.balancer import Balancer
from chainserve.runtime import protocol
from chainserve.runtime.backends.base import SpanInfo, WireTensor
from chainserve.runtime.backends.emulated import EmulatedSpan
from chainserve.runtime.block_server import BlockServer, ServerKnobs
from chainserve.runtime.client import stop_servers
from chainserve.runtime.serve_process import serve_process

TOKEN = "failover-token"


def handle(srv: BlockServer, frames: list[bytes]) -> protocol.Reply:
    return protocol.decode_reply(asyncio.run(srv.handle(frames)))


def step(session: str, position: int, tensor: WireTensor, epoch: int, open: bool = False) -> list[bytes]:
    return protocol.encode_forward(1, TOKEN, [protocol.Step(session, 1, position, tensor, open)], epoch)


def test_a_newer_epoch_frees_the_older_sessions_and_refuses_their_messages() -> None:
    srv = BlockServer("s", EmulatedSpan(SpanInfo(1, 2, 4, 32, page_tokens=32), 0.0), ServerKnobs(token=TOKEN))
    one = WireTensor("int32", (1, 1, 1), np.int32(5).tobytes())
    assert isinstance(handle(srv, step("a", 0, one, epoch=10, open=True)).results[0], WireTensor)
    assert isinstance(handle(srv, step("tool", 0, one, epoch=None, open=True)).results[0], WireTensor)
    assert srv.arena.num_used == 4
    assert handle(srv, protocol.encode_request("info", 1, TOKEN, 20)).fields["epoch"] == 20
    assert set(srv.sessions) == {"tool"} and srv.counters.num_superseded == 1  # an epoch-less tool's stays
    late = handle(srv, step("a", 1, one, epoch=10))
    assert (late.ok, late.error) == (False, "stale_epoch")
    assert handle(srv, protocol.encode_request("close", 1, TOKEN, 10, session="tool")).error == "stale_epoch"
    assert isinstance(handle(srv, step("b", 0, one, epoch=20, open=True)).results[0], WireTensor)


def test_the_first_orchestrator_attaches_quietly_and_a_takeover_warns(caplog) -> None:
    """Issue 28: every normal start logged a WARNING; only a newer epoch replacing one is worth one."""
    srv = BlockServer("s", EmulatedSpan(SpanInfo(1, 2, 4, 32, page_tokens=32), 0.0), ServerKnobs(token=TOKEN))
    caplog.set_level(logging.INFO, logger="chainserve.block_server")
    for epoch in (10, 10, 20):
        handle(srv, protocol.encode_request("info", 1, TOKEN, epoch))
    attached = [(r.levelno, r.getMessage()) for r in caplog.records if "attached" in r.getMessage()]
    assert attached == [
        (logging.INFO, "s: orchestrator epoch 10 attached (was 0); freed 0 sessions of older epochs"),
        (logging.WARNING, "s: orchestrator epoch 20 attached (was 10); freed 0 sessions of older epochs"),
    ]


def test_a_late_step_of_a_dead_orchestrator_cannot_touch_a_new_sessions_kv(tmp_path) -> None:
    """A step of epoch 1 still computing when epoch 2 attaches keeps its block-slots until it is done,
    so the new session gets others; a later epoch-1 step is refused; the new session's outputs equal
    the same steps on a fresh server."""
    torch = pytest.importorskip("torch", reason="the torch extra is not installed")
    from chainserve.runtime.backends.torch_backend import TorchHead, TorchSpan
    from chainserve.runtime.models import resolve_model

    torch.set_num_threads(1)
    path = resolve_model("tiny-random", tmp_path / "models")
    head = TorchHead(path)
    old_prompt, new_prompt = head.embed(head.encode("an old prompt")), head.embed(head.encode("the new one"))

    def server() -> BlockServer:
        return BlockServer("s", TorchSpan(path, SpanInfo(1, 6, 12, 64, page_tokens=64)), ServerKnobs(token=TOKEN))

    async def run() -> tuple[list, list, BlockServer]:
        srv = server()
        await srv.handle(step("old", 0, old_prompt, epoch=1, open=True))
        old_slots = srv.sessions["old"].all_pages()
        late = asyncio.create_task(srv.handle(step("old", 3, head.embed([9]), epoch=1)))  # computing...
        await asyncio.sleep(0)
        await srv.handle(protocol.encode_request("info", 1, TOKEN, 2))  # a new orchestrator attaches
        outs = [protocol.decode_reply(await srv.handle(step("new", 0, new_prompt, epoch=2, open=True)))]
        assert not set(srv.sessions["new"].all_pages()) & set(old_slots)  # the computing step's pages stay its own
        await late
        refused = protocol.decode_reply(await srv.handle(step("old", 4, head.embed([9]), epoch=1)))
        assert refused.error == "stale_epoch"
        pos = new_prompt.shape[1]
        outs.append(protocol.decode_reply(await srv.handle(step("new", pos, head.embed([7]), epoch=2))))
        fresh = server()
        ref = [protocol.decode_reply(await fresh.handle(step("new", 0, new_prompt, epoch=2, open=True)))]
        ref.append(protocol.decode_reply(await fresh.handle(step("new", pos, head.embed([7]), epoch=2))))
        return outs, ref, srv

    outs, ref, srv = asyncio.run(run())
    assert [o.results[0] for o in outs] == [r.results[0] for r in ref]  # bit for bit
    assert srv.arena.num_used == 6 and set(srv.sessions) == {"new"}


def infos(endpoints: dict[str, str]) -> dict[str, dict]:
    """Each block server's own ``info`` (asked outside epochs, as an operator's tool does)."""
    from chainserve.runtime.client import BlockClient

    async def ask() -> dict[str, dict]:
        clients = {n: BlockClient(n, f"tcp://{e}", TOKEN) for n, e in endpoints.items()}
        try:
            return {n: await c.info() for n, c in clients.items()}
        finally:
            for c in clients.values():
                c.close()

    return asyncio.run(ask())


def serve_args(plan_file: str, endpoints: dict[str, str], tmp_path) -> list[str]:
    servers = ",".join(f"{n}={e}" for n, e in endpoints.items())
    return ["--plan", plan_file, "--servers", servers, "--port", "0", "--token-file", str(tmp_path / "token"),
            "--log-level", "warning"]  # fmt: skip


def completion(url: str, max_tokens: int, **kwargs) -> openai.types.Completion:
    client = openai.OpenAI(base_url=url + "/v1", api_key="unused", timeout=60, **kwargs)
    return client.completions.create(model="emulated/toy", prompt="the chain serves", max_tokens=max_tokens)


def test_an_orchestrator_restarted_on_surviving_servers_serves_at_once(tmp_path) -> None:
    plan_file, procs, endpoints = by_hand_cluster(tmp_path, TOKEN)
    try:
        with serve_process(serve_args(plan_file, endpoints, tmp_path), tmp_path / "first.err", 60) as first:
            capacity = httpx.get(first.url + "/plan").json()["num_job_servers"]
            pool = ThreadPoolExecutor(capacity)
            held = [pool.submit(completion, first.url, 2000, max_retries=0) for _ in range(capacity)]
            time.sleep(1.0)  # every chain slot holds a session now
            assert sum(i["used_block_slots"] for i in infos(endpoints).values()) > 0
            first.proc.send_signal(signal.SIGKILL)
            first.proc.wait()
        pool.shutdown(wait=True)
        assert all(f.exception() is not None for f in held)  # the dead one's streams broke
        with serve_process(serve_args(plan_file, endpoints, tmp_path), tmp_path / "second.err", 60) as second:
            began = time.monotonic()
            assert completion(second.url, 4, max_retries=0).usage.completion_tokens == 4
            assert time.monotonic() - began < 5.0  # not after the 300 s idle timeout
            assert sum(i["num_superseded"] for i in infos(endpoints).values()) >= capacity
    finally:
        for proc in procs.values():
            proc.kill()
            proc.wait()


def test_a_standby_takes_over_from_a_killed_orchestrator_and_no_request_fails(tmp_path) -> None:
    (tmp_path / "token").write_text(TOKEN)
    common = ["--port", "0", "--token-file", str(tmp_path / "token"), "--log-level", "warning"]
    active_args = [str(EMULATED_6), "--planner", "greedy", "--detach-servers", "--log-dir", str(tmp_path / "a")]
    endpoints: dict[str, str] = {}
    pids: dict[str, int] = {}
    try:
        with serve_process([*active_args, *common], tmp_path / "active.err", 60) as active:
            status = httpx.get(active.url + "/status").json()
            endpoints = {s["name"]: s["endpoint"].removeprefix("tcp://") for s in status["servers"]}
            standby_args = ["--standby-of", active.url, "--log-dir", str(tmp_path / "b"), *common]
            with serve_process(standby_args, tmp_path / "standby.err", 60) as standby:
                assert httpx.get(standby.url + "/health").json() == {"status": "standby", "active": active.url}
                pids = {n: i["pid"] for n, i in infos(endpoints).items()}
                balancer = Balancer([active.url, standby.url])
                time.sleep(0.5)  # the active's and the standby's plan views settle
                done, failed, stop = [], [], threading.Event()

                def client() -> None:  # the official client, its default retries, non-streamed
                    while not stop.is_set():
                        try:
                            done.append(completion(balancer.url, 8).usage.completion_tokens)
                        except openai.OpenAIError as exc:
                            failed.append(repr(exc))

                threads = [threading.Thread(target=client) for _ in range(6)]
                for t in threads:
                    t.start()
                time.sleep(1.5)
                before = len(done)
                os.kill(active.proc.pid, signal.SIGKILL)
                killed_at = time.monotonic()
                while httpx.get(standby.url + "/health").status_code != 200:
                    assert time.monotonic() - killed_at < 5.0, "the standby did not take over within 5 s"
                    time.sleep(0.05)
                took_s = time.monotonic() - killed_at
                time.sleep(4.0)
                stop.set()
                for t in threads:
                    t.join(60)
                balancer.close()
                print(f"takeover after {took_s:.2f} s; {len(done)} requests done ({before} before the kill)")
                assert not failed, failed[:3]
                assert len(done) > before + 20 and all(n == 8 for n in done)
                assert {n: i["pid"] for n, i in infos(endpoints).items()} == pids  # no block server restarted
                deadline = time.monotonic() + 5
                while any(i["used_block_slots"] for i in infos(endpoints).values()):
                    assert time.monotonic() < deadline, infos(endpoints)
                    time.sleep(0.1)
                plan = httpx.get(standby.url + "/plan").json()
                assert (
                    plan["epoch"] > 0 and "chainserve:takeovers_total 1.0" in httpx.get(standby.url + "/metrics").text
                )
                stopped = subprocess.run(
                    [sys.executable, "-m", "chainserve", "stop", "--url", standby.url, "--token-file",
                     str(tmp_path / "token")], capture_output=True, text=True, timeout=60,
                )  # fmt: skip
                assert stopped.returncode == 0, stopped.stderr
    finally:
        if endpoints:  # whatever happened, no detached block server outlives the test
            asyncio.run(stop_servers(endpoints, TOKEN, timeout_s=2))
    deadline = time.monotonic() + 10
    while any(_alive(pid) for pid in pids.values()):
        assert time.monotonic() < deadline, "chainserve stop left block servers running"
        time.sleep(0.1)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat") as f:
        return f.read().split()[2] != "Z"
