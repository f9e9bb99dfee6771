"""Block server request handling (no sockets: :meth:`BlockServer.handle` on encoded frames), admission
control, message validation, and the orchestrator's retry of a refused admission (paper §1, §4.2)."""

from __future__ import annotations

import asyncio
import json
import time

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from chainserve.model.spec import ModelSpec, Problem, Server, Workload
from chainserve.model.step_cost import StepCost
from chainserve.plan.csearch import make_plan
from chainserve.plan.types import Chain, Hop, Placement, Span
from chainserve.runtime import protocol
from chainserve.runtime.backends.base import SpanInfo, WireTensor
from chainserve.runtime.backends.emulated import EmulatedHead, EmulatedSpan
from chainserve.runtime.block_server import BlockServer, ServerKnobs
from chainserve.runtime.client import ServerFailed, ServerRefused
from chainserve.runtime.orchestrator import Orchestrator
from chainserve.runtime.requests import SamplingParams

TOKEN = "secret"


def server(
    first: int = 1, num: int = 2, slots: int = 4, step_s: float = 0.0, idle_s: float = 300.0, page_tokens: int = 32
) -> BlockServer:
    """A block server of emulated blocks; by default one page per block-slot of 32 positions, so a
    session without a reservation takes one page per block."""
    info = SpanInfo(first, num, slots, 32, page_tokens)
    return BlockServer("s", EmulatedSpan(info, step_s), ServerKnobs(idle_timeout_s=idle_s, token=TOKEN))


def ids(*tokens: int) -> WireTensor:
    return WireTensor("int32", (1, len(tokens), 1), np.asarray(tokens, dtype=np.int32).tobytes())


def call(srv: BlockServer, op: str, token: str = TOKEN, **fields) -> protocol.Reply:
    """One info, close or limit request through the handler."""
    return protocol.decode_reply(asyncio.run(srv.handle(protocol.encode_request(op, 1, token, **fields))))


def step(srv: BlockServer, tensor: WireTensor, **fields) -> WireTensor | tuple[str, str]:
    """One session's step through the handler: its output, or its (error code, message)."""
    reply = protocol.decode_reply(
        asyncio.run(srv.handle(protocol.encode_forward(1, TOKEN, [protocol.Step(tensor=tensor, **fields)])))
    )
    assert reply.ok, reply.message
    return reply.results[0]


def error_of(reply: protocol.Reply) -> str | None:
    """The message's error code, else its first step's, else ``None``."""
    if not reply.ok:
        return reply.error
    return next((r[0] for r in reply.results if isinstance(r, tuple)), None)


class LoopbackClient:
    """A client that calls a BlockServer's handler directly (the real protocol, no socket)."""

    endpoint = "loopback"

    def __init__(self, srv: BlockServer):
        self.name, self.srv = srv.server_id, srv

    def _raise(self, code: str, message: str):
        raise ServerRefused(message) if code == "no_free_slot" else ServerFailed(self.name, message, code)

    async def _request(self, op, **fields) -> protocol.Reply:
        reply = protocol.decode_reply(await self.srv.handle(protocol.encode_request(op, 1, TOKEN, **fields)))
        if not reply.ok:
            self._raise(reply.error, reply.message)
        return reply

    async def forward(self, session, first_block, position, hidden, *, open=False, close=False, reserve=None):
        step = protocol.Step(session, first_block, position, hidden, open, close, reserve)
        frames = protocol.encode_forward(1, TOKEN, [step])
        reply = protocol.decode_reply(await self.srv.handle(frames))
        if not reply.ok:
            self._raise(reply.error, reply.message)
        (result,) = reply.results
        if isinstance(result, tuple):
            self._raise(*result)
        return result

    def close_session(self, session):
        return asyncio.ensure_future(self._request("close", session=session))

    async def info(self, timeout_s=10.0):
        return (await self._request("info")).fields

    async def set_limit(self, num_block_slots: int, timeout_s: float = 10.0) -> dict:
        return (await self._request("limit", num_block_slots=num_block_slots)).fields

    def fail_pending(self, message: str) -> None:
        """Nothing waits on a socket here."""

    def close(self) -> None:
        """No socket to close."""


def test_forward_admits_steps_and_closes() -> None:
    srv = server()
    assert step(srv, ids(5, 6), session="a", first_block=1, position=0, open=True) == ids(5, 6)
    assert srv.arena.num_used == 2
    assert step(srv, ids(7), session="a", first_block=1, position=2, close=True) == ids(7)
    assert srv.arena.num_used == 0 and srv.counters.num_steps == 2 and srv.counters.peak_block_slots == 2


def test_sessions_reserve_the_pages_of_their_own_length() -> None:
    """Paged KV (issue 30): 2 block-slots of 32 positions are 8 pages of 8 per server; a session holds,
    on each of its blocks, the pages of the positions it reserves, never writes past them, and one
    that could never fit, or is longer than the served context, is a bad request."""
    srv = server(num=2, slots=2, page_tokens=8)
    assert (srv.arena.num_pages, srv.arena.pages_per_slot) == (8, 4)
    assert step(srv, ids(1, 2), session="a", first_block=1, position=0, open=True, reserve=8) == ids(1, 2)
    assert step(srv, ids(3), session="b", first_block=1, position=0, open=True, reserve=20) == ids(3)
    assert srv.arena.num_used == 2 * 1 + 2 * 3
    assert srv.sessions["a"].pages == ((0,), (1,)) and len(set(srv.sessions["b"].all_pages())) == 6
    assert step(srv, ids(4), session="c", first_block=2, position=0, open=True, reserve=1)[0] == "no_free_slot"
    assert step(srv, ids(3, 4, 5, 6, 7, 8), session="a", first_block=1, position=2) == ids(3, 4, 5, 6, 7, 8)
    code, message = step(srv, ids(6), session="a", first_block=1, position=8)
    assert code == "bad_request" and "8 positions" in message
    code, message = step(srv, ids(7), session="d", first_block=1, position=0, open=True, reserve=40)
    assert code == "bad_request" and "10 pages" in message
    assert call(srv, "close", session="a").ok
    assert step(srv, ids(4), session="c", first_block=2, position=0, open=True, reserve=1) == ids(4)
    info = call(srv, "info").fields
    assert (info["used_pages"], info["num_pages"], info["page_tokens"], info["used_block_slots"]) == (7, 8, 8, 2)
    short = BlockServer("s", EmulatedSpan(SpanInfo(1, 2, 2, 32, 8, max_context=16), 0.0), ServerKnobs(token=TOKEN))
    code, message = step(short, ids(1), session="e", first_block=1, position=0, open=True, reserve=20)
    assert code == "bad_request" and "context of 16" in message


def test_the_limit_counts_block_slots_of_pages() -> None:
    """The plan's admission limit (block-slots) admits that many block-slots' pages."""
    srv = server(num=1, slots=4, page_tokens=8)
    call(srv, "limit", num_block_slots=1)
    assert step(srv, ids(1), session="a", first_block=1, position=0, open=True, reserve=24) == ids(1)
    assert step(srv, ids(1), session="b", first_block=1, position=0, open=True, reserve=9)[0] == "no_free_slot"
    assert step(srv, ids(1), session="c", first_block=1, position=0, open=True, reserve=8) == ids(1)


def test_a_full_arena_refuses_and_never_over_allocates() -> None:
    srv = server(num=2, slots=3)
    assert step(srv, ids(1), session="a", first_block=1, position=0, open=True) == ids(1)
    assert step(srv, ids(1), session="b", first_block=1, position=0, open=True)[0] == "no_free_slot"
    assert step(srv, ids(1), session="c", first_block=2, position=0, open=True) == ids(1)  # one block fits
    assert srv.arena.num_used == 3 and srv.counters.num_refused == 1


def test_one_message_carries_many_sessions_and_an_error_fails_only_its_own() -> None:
    srv = server(num=2, slots=4)
    steps = [
        protocol.Step("a", 1, 0, ids(1, 2), open=True),
        protocol.Step("ghost", 1, 3, ids(3)),  # never opened
        protocol.Step("b", 2, 0, ids(4), open=True),
        protocol.Step("c", 1, 0, ids(5), open=True),  # the arena is full by now
    ]
    reply = protocol.decode_reply(asyncio.run(srv.handle(protocol.encode_forward(7, TOKEN, steps))))
    assert reply.ok and reply.rid == 7
    assert reply.results[0] == ids(1, 2) and reply.results[2] == ids(4)
    assert [r[0] for r in (reply.results[1], reply.results[3])] == ["unknown_session", "no_free_slot"]
    assert srv.arena.num_used == 3 and set(srv.sessions) == {"a", "b"}


def forward_frames(data: bytes = b"\0" * 4, **changes) -> list[bytes]:
    """A forward message opening session ``a`` at block 1 with one int32 token, the step's fields
    changed (``None`` drops one)."""
    item = {"session": "a", "first_block": 1, "position": 0, "open": True,
            "tensor": {"dtype": "int32", "shape": [1, 1, 1]}} | changes  # fmt: skip
    header = {
        "v": 2,
        "op": "forward",
        "rid": 1,
        "token": TOKEN,
        "items": [{k: v for k, v in item.items() if v is not None}],
    }
    return [json.dumps(header).encode(), data]


def header(**fields) -> list[bytes]:
    return [json.dumps({"v": 2, "rid": 1, **fields}).encode()]


@pytest.mark.parametrize(
    "frames, code",
    [
        ([b"not json"], "bad_request"),
        ([b"{}", b"", b""], "bad_request"),
        (header(op="launch", token=TOKEN), "bad_request"),
        (header(op="info", token="wrong"), "unauthorized"),
        (header(op="info"), "unauthorized"),
        (header(op="info", token=TOKEN) + [b"x"], "bad_request"),  # a tensor frame where none belongs
        (forward_frames(tensor={"dtype": "int32", "shape": [1, 2, 1]}), "bad_request"),  # 4 bytes for 8
        (forward_frames(b"\0" * 8, tensor={"dtype": "float64", "shape": [1, 1, 1]}), "bad_request"),
        (forward_frames()[:1], "bad_request"),  # a step without its tensor frame
        (forward_frames() + [b"\0" * 4], "bad_request"),  # a frame too many
        (forward_frames(position=40), "bad_request"),  # past the 32 positions of the cache
        (forward_frames(first_block=9), "bad_request"),  # outside the span
        (forward_frames(open=None), "unknown_session"),
        (header(op="close", token=TOKEN, session="nobody"), "unknown_session"),
    ],
)
def test_malformed_or_unauthorised_messages_are_refused_before_any_tensor_work(frames, code) -> None:
    srv = server()
    reply = protocol.decode_reply(asyncio.run(srv.handle(frames)))
    assert error_of(reply) == code
    assert srv.arena.num_used == 0 and srv.counters.num_steps == 0


def test_a_session_twice_in_one_message_is_refused() -> None:
    frames = forward_frames()
    doubled = json.loads(frames[0])
    doubled["items"] *= 2
    reply = protocol.decode_reply(asyncio.run(server().handle([json.dumps(doubled).encode(), frames[1], frames[1]])))
    assert error_of(reply) == "bad_request" and "twice" in reply.message


def test_idle_sessions_expire() -> None:
    srv = server(idle_s=5.0)
    step(srv, ids(1), session="a", first_block=1, position=0, open=True)
    srv.expire_idle(srv.sessions["a"].last_used_at + 6.0)
    assert srv.arena.num_used == 0 and srv.counters.num_expired == 1


@settings(max_examples=60, deadline=None)
@given(
    st.lists(st.tuples(st.sampled_from(["open", "step", "close"]), st.integers(0, 4), st.integers(1, 3)), max_size=40)
)
def test_the_arena_is_never_exceeded(ops) -> None:
    srv = server(first=1, num=3, slots=5)
    for op, session, first in ops:
        name = f"s{session}"
        if op == "open":
            step(srv, ids(1), session=name, first_block=first, position=0, open=True)
        elif op == "step" and name in srv.sessions:
            step(
                srv,
                ids(1),
                session=name,
                first_block=srv.sessions[name].first_block,
                position=srv.sessions[name].next_position,
            )
        elif op == "close":
            call(srv, "close", session=name)
        assert srv.arena.num_used == sum(3 - s.first_block + 1 for s in srv.sessions.values()) <= 5
    assert srv.counters.peak_block_slots <= 5


def test_a_refused_admission_leaves_the_job_queued_and_it_is_served_later() -> None:
    """The plan lets 2 jobs run on the chain, but the last server's arena holds only 1: the second job is
    refused there, ``abort`` puts it back at the head of the central queue (it never leaves the
    dispatcher), and it is started again (attempt 1, after a backoff) until the server admits it."""
    problem = Problem(
        (Server("a", 10, 0.01, 0.0), Server("b", 10, 0.01, 0.0)), ModelSpec("m", 2, 1.0, 1.0), Workload(1.0)
    )
    plan = make_plan(
        problem, Placement((Span(0, 1, 1), Span(1, 2, 1)), 2), (Chain((Hop(0, 1, 1), Hop(1, 2, 1)), 0.02, 2),), 2
    )
    servers = {0: server(1, 1, 2, step_s=0.05), 1: server(2, 1, 1, step_s=0.05)}
    head = EmulatedHead("m", 2, 32)

    async def run() -> tuple[list, list[int], Orchestrator]:
        from chainserve.dispatch.jffc import JFFC

        orch = Orchestrator(
            plan, JFFC(plan.chains), head, {j: LoopbackClient(s) for j, s in servers.items()}, retry_backoff_s=0.02
        )
        held: list[int] = []

        async def consume(stream) -> list:
            return [event async for event in stream]

        params = SamplingParams(max_tokens=4, temperature=0)
        jobs = [asyncio.create_task(consume(orch.generate(head.encode("the chain"), params))) for _ in range(2)]
        while not all(job.done() for job in jobs):
            held.append(orch.dispatcher.num_waiting + orch.dispatcher.num_in_service + 2 - len(orch.runs))
            await asyncio.sleep(0.005)
        return [job.result() for job in jobs], held, orch

    results, held, orch = asyncio.run(run())
    assert set(held) == {2}  # every job is always waiting, in service or ended: none is lost
    finished = [events[-1] for events in results]
    assert all(f.completion_tokens == 4 for f in finished)
    assert [e.text for e in results[0][:-1]] == [e.text for e in results[1][:-1]]  # same greedy text
    refused = max(finished, key=lambda f: f.num_attempts)
    assert refused.num_attempts >= 2
    attempts = sorted((r.job_id, r.attempt) for r in orch.starts)
    assert (1, 1) in attempts or (0, 1) in attempts  # the refused job was started again
    assert servers[1].counters.num_refused >= 1 and servers[1].counters.peak_sessions == 1
    assert all(s.arena.num_used == 0 for s in servers.values())


def test_oversized_tensors_are_refused(monkeypatch) -> None:
    srv = server()
    declared = forward_frames(b"\0" * 16, tensor={"dtype": "float32", "shape": [1, 2**20, 2**12]})  # 16 GiB
    reply = protocol.decode_reply(asyncio.run(srv.handle(declared)))
    assert error_of(reply) == "bad_request"
    monkeypatch.setattr(protocol, "MAX_TENSOR_BYTES", 1024)  # a frame past the limit is refused unread
    frames = forward_frames(b"\0" * 2048, tensor={"dtype": "int32", "shape": [1, 512, 1]})
    reply = protocol.decode_reply(asyncio.run(srv.handle(frames)))
    assert error_of(reply) == "bad_request" and "limit" in reply.message
    assert srv.arena.num_used == 0 and srv.counters.num_steps == 0


def test_emulated_step_cost_batches_and_sleeps_the_iteration_once():
    """Issue 18: an emulated server with a step cost batches what arrives together (one message with
    four sessions' prefills, then their decodes) and sleeps each iteration's cost once."""
    cost = StepCost(0.030, 0.010, 0.030, 0.001)
    srv = BlockServer("s", EmulatedSpan(SpanInfo(1, 2, 8, 32), 0.0, cost), ServerKnobs(token=TOKEN))

    async def run() -> tuple[float, float]:
        began = time.perf_counter()
        prompts = [protocol.Step(f"j{i}", 1, 0, ids(5, 6, 7, 8), open=True) for i in range(4)]
        reply = protocol.decode_reply(await srv.handle(protocol.encode_forward(1, TOKEN, prompts)))
        assert reply.ok and all(isinstance(r, WireTensor) for r in reply.results)
        prefill = time.perf_counter() - began
        began = time.perf_counter()
        decodes = [protocol.Step(f"j{i}", 1, 4, ids(9)) for i in range(4)]
        reply = protocol.decode_reply(await srv.handle(protocol.encode_forward(1, TOKEN, decodes)))
        assert reply.ok
        return prefill, time.perf_counter() - began

    prefill, decode = asyncio.run(run())
    assert cost.iteration_s([(2, 4)] * 4) <= prefill < 2 * cost.iteration_s([(2, 4)] * 4)  # 2·(30 + 4·4·1) ms
    assert cost.iteration_s([(2, 1)] * 4) <= decode < 2 * cost.iteration_s([(2, 1)] * 4)  # 2·(30 + 4·10) ms
    assert srv.counters.num_batches == 2


def test_a_job_longer_than_any_chains_cache_is_refused_at_once() -> None:
    """Issue 30: with each chain's c_k slots budgeted by tokens, a request whose prompt + output could
    never fit any chain is a 400 (``ValueError``) naming the most a job may reserve, not a wait; one
    that fits is served."""
    problem = Problem((Server("a", 10, 0.01, 0.0),), ModelSpec("m", 2, 1.0, 1.0, max_tokens=32), Workload(1.0))
    plan = make_plan(problem, Placement((Span(0, 1, 2),), 2), (Chain((Hop(0, 1, 2),), 0.02, 2),), 2)
    srv = BlockServer("s", EmulatedSpan(SpanInfo(1, 2, 4, 32, 16), 0.0), ServerKnobs(token=TOKEN))
    head = EmulatedHead("m", 2, 1000)

    async def run() -> list:
        from chainserve.dispatch.jffc import JFFC

        dispatcher = JFFC(plan.chains, tokens_per_slot=32, page_tokens=16)
        orch = Orchestrator(plan, dispatcher, head, {0: LoopbackClient(srv)})
        await orch.servers.connect({0: 4}, 5.0, time.monotonic)
        with pytest.raises(ValueError, match=r"needs more KV cache than any chain .*at most 64 tokens"):
            orch.generate(head.encode("the chain"), SamplingParams(max_tokens=70, temperature=0))
        return [event async for event in orch.generate(head.encode("the chain"), SamplingParams(max_tokens=40))]

    events = asyncio.run(run())
    assert events[-1].completion_tokens == 40 and srv.arena.num_used == 0
