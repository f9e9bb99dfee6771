"""The supervisor's rules (issue 33, :mod:`chainserve.runtime.supervision`) on a fake transport: an
exited server is restarted at once and re-attached with its limit; failed restarts back off and give
up after ``max_restarts``; a server that only went silent and answers again is not restarted; a
restarted server hosting another span is never admitted."""

from __future__ import annotations

import asyncio

import pytest

from chainserve.runtime.metrics import RuntimeMetrics
from chainserve.runtime.servers import ServerRecord, ServerTable
from chainserve.runtime.supervision import RestartPolicy, Supervisor

FAST = RestartPolicy(max_restarts=3, backoff_s=0.01, max_backoff_s=0.04, silent_s=0.2)


class FakeClient:
    """A block server's connection that answers ``info`` with its span and records limits set."""

    def __init__(self, name: str, first_block: int = 1, num_blocks: int = 4, endpoint: str = "tcp://new"):
        self.name, self.endpoint = name, endpoint
        self.first_block, self.num_blocks = first_block, num_blocks
        self.limits: list[int] = []
        self.closed = False

    async def info(self, timeout_s: float = 10.0) -> dict:
        return {"first_block": self.first_block, "num_blocks": self.num_blocks, "num_block_slots": 8}

    async def set_limit(self, num_block_slots: int, timeout_s: float = 10.0) -> dict:
        self.limits.append(num_block_slots)
        return {}

    def fail_pending(self, message: str) -> None:
        """Nothing is pending on a fake."""

    def close(self) -> None:
        self.closed = True


class Harness:
    """One dead server "b" (blocks 1..4, limit 3) under a supervisor whose launcher answers with
    ``launches`` in turn (a client, or an exception to raise)."""

    def __init__(self, launches: list, policy: RestartPolicy = FAST):
        self.metrics = RuntimeMetrics()
        self.table = ServerTable(
            [ServerRecord(0, "b", (1, 4), 8, 3, FakeClient("b", endpoint="tcp://old"))], self.metrics
        )
        self.launches, self.asked, self.back, self.given_up = list(launches), [], [], []
        self.supervisor = Supervisor(
            self.table, self.restart, policy, self.metrics, asyncio.get_running_loop().time,
            self.back.append, lambda j, reason: self.given_up.append((j, reason)),
        )  # fmt: skip
        self.table.mark_dead(0, "killed")

    async def restart(self, name: str) -> FakeClient:
        self.asked.append((name, asyncio.get_running_loop().time()))
        launch = self.launches.pop(0)
        if isinstance(launch, Exception):
            raise launch
        return launch

    async def settle(self) -> None:
        await asyncio.gather(*self.supervisor.tasks.values())


def test_an_exited_server_is_restarted_at_once_with_its_limit() -> None:
    async def go() -> tuple[Harness, FakeClient, float]:
        client = FakeClient("b")
        h = Harness([client])
        began = asyncio.get_running_loop().time()
        assert h.supervisor.server_died(0, exited=True)
        assert h.table[0].is_restarting
        await h.settle()
        return h, client, h.asked[0][1] - began

    h, client, waited = asyncio.run(go())
    r = h.table[0]
    assert waited < 0.05 and h.back == [0] and not h.given_up
    assert r.is_alive and not r.is_restarting and r.client is client and client.limits == [3] and r.limit == 3
    assert h.supervisor.restarts == {"b": 1}
    assert b'chainserve:server_restarts_total{server="b"} 1.0' in h.metrics.render()[0]


def test_failed_restarts_back_off_then_give_up() -> None:
    async def go() -> Harness:
        h = Harness([RuntimeError("no port")] * 3)
        h.supervisor.server_died(0, exited=True)
        await h.settle()
        assert not h.supervisor.server_died(0, exited=True)  # given up: no more attempts until stable_s
        return h

    h = asyncio.run(go())
    times = [t for _, t in h.asked]
    gaps = [b - a for a, b in zip(times, times[1:], strict=False)]
    assert len(times) == 3 and gaps[0] >= 0.01 and gaps[1] >= 0.02  # 0, then backoff_s, then 2 × backoff_s
    assert h.given_up == [(0, "no port")] and h.back == []
    assert not h.table[0].is_alive and not h.table[0].is_restarting


def test_a_silent_server_that_answers_again_is_not_restarted() -> None:
    async def go() -> Harness:
        h = Harness([FakeClient("b")])
        h.supervisor.server_died(0, exited=False)
        await asyncio.sleep(0.05)
        h.table.mark_back(0)  # its heartbeats re-admitted it within silent_s
        await h.settle()
        return h

    h = asyncio.run(go())
    assert h.asked == [] and h.back == [] and h.given_up == [] and h.table[0].client.endpoint == "tcp://old"


def test_a_silent_server_whose_process_then_exits_is_restarted_before_silent_s() -> None:
    async def go() -> tuple[Harness, float]:
        h = Harness([FakeClient("b")], RestartPolicy(max_restarts=3, backoff_s=0.01, silent_s=30))
        began = asyncio.get_running_loop().time()
        h.supervisor.server_died(0, exited=False)
        await asyncio.sleep(0.05)
        assert h.supervisor.server_died(0, exited=True)  # the launcher saw the exit
        await h.settle()
        return h, h.asked[0][1] - began

    h, waited = asyncio.run(go())
    assert waited < 1 and h.back == [0]


def test_a_restarted_server_hosting_another_span_is_never_admitted() -> None:
    async def go() -> tuple[Harness, FakeClient]:
        wrong = FakeClient("b", first_block=5)
        h = Harness([wrong, RuntimeError("gone"), RuntimeError("gone")])
        h.supervisor.server_died(0, exited=True)
        await h.settle()
        return h, wrong

    h, wrong = asyncio.run(go())
    assert wrong.closed and wrong.limits == [] and h.back == [] and len(h.given_up) == 1
    assert not h.table[0].is_alive and h.table[0].client.endpoint == "tcp://old"


def test_no_restarts_when_the_policy_allows_none() -> None:
    async def go() -> Harness:
        h = Harness([FakeClient("b")], RestartPolicy(max_restarts=0))
        assert not h.supervisor.server_died(0, exited=True)
        return h

    h = asyncio.run(go())
    assert h.asked == [] and not h.table[0].is_restarting


@pytest.mark.parametrize("bad", [{"max_restarts": -1}, {"backoff_s": 60, "max_backoff_s": 30}])
def test_a_policy_refuses_nonsense(bad) -> None:
    with pytest.raises(ValueError):
        RestartPolicy(**bad)
