"""A block-server fault under load (issue 31's fidelity check; the supervision of issue 33): SIGKILL one
block server of a running ``chainserve serve`` at a given second of a benchmark and watch ``/status``
until the runtime has it back, so the simulator can replay the same outage (``simulate --fail``).

The server's process id comes from the server itself (``info``, as ``benchmarks/soak.py`` finds it);
the times are the client's, from the benchmark's start: the kill, the first ``/status`` that shows the
server dead (the runtime noticed) and the first that shows it alive again after a restart (its
supervisor restarted and re-admitted it; paper §2.6 leaves recovery out, the runtime's is
:mod:`chainserve.runtime.supervision`). ``/status`` is polled every :data:`POLL_S`.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

from chainserve.runtime.client import server_pid

#: How often ``/status`` is polled while the server is down (the outage's resolution).
POLL_S = 0.05
#: How long after the kill the server must be back (the supervisor's back-off is capped at 30 s a restart).
BACK_WITHIN_S = 120.0


@dataclass(frozen=True, slots=True)
class Kill:
    """SIGKILL block server ``server`` ``at_s`` seconds into the benchmark."""

    server: str
    at_s: float


@dataclass(frozen=True, slots=True)
class Outage:
    """What happened, in seconds from the benchmark's start: the kill, the runtime seeing the server
    dead, and the server back (restarted and re-admitted)."""

    server: str
    killed_at_s: float
    dead_at_s: float
    back_at_s: float

    @property
    def down_s(self) -> float:
        """Kill to back: the outage the simulator replays."""
        return self.back_at_s - self.killed_at_s


async def kill_and_watch(url: str, token_file: Path, kill: Kill, started: asyncio.Future[float]) -> Outage:
    """Kill ``kill.server`` of the ``serve`` at ``url`` ``kill.at_s`` after the benchmark's start
    (``started``'s ``time.monotonic()``) and return the outage once ``/status`` shows it restarted;
    ``TimeoutError`` when it is not back within :data:`BACK_WITHIN_S` (the supervisor gave up)."""
    token = token_file.read_text(encoding="utf-8").strip()
    async with httpx.AsyncClient(base_url=url, timeout=30) as http:

        async def server() -> dict:
            servers = (await http.get("/status")).json()["servers"]
            return next(s for s in servers if s["name"] == kill.server)

        before = await server()
        pid = await server_pid(kill.server, before["endpoint"], token)
        began = await started
        await asyncio.sleep(max(0.0, began + kill.at_s - time.monotonic()))
        os.kill(pid, signal.SIGKILL)
        killed = time.monotonic()
        dead = None
        while time.monotonic() - killed < BACK_WITHIN_S:
            await asyncio.sleep(POLL_S)
            now, state = time.monotonic(), await server()
            if not state["alive"] and dead is None:
                dead = now
            if state["alive"] and state["restarts"] > before["restarts"]:
                return Outage(kill.server, killed - began, (dead or now) - began, now - began)
        raise TimeoutError(f"block server {kill.server}: not back within {BACK_WITHIN_S:g} s of its kill")
