"""Supervision (issue 33, beyond the paper): a block server the launcher started that dies is started
again, on the same device with the same span, and re-attached.

:class:`Supervisor` restarts one server at a time per server through ``restart(name)`` (the
launcher's: a new child process for the local launcher, the same Ray actor — restarted by Ray itself
when its process died — for the Ray launcher), which returns a connection stamped with the
orchestrator's epoch. The restarted server must host what it hosted before; it gets back its
admission limit, and the orchestrator restores it in its dispatchers (``on_back``), so the jobs that
were on it, replayed from the central queue, run again once a chain exists. Retries are bounded:
:class:`RestartPolicy` waits ``backoff_s`` × 2ⁿ⁻¹ before the n-th consecutive restart (the first at
once) and gives up after ``max_restarts`` consecutive ones (``on_given_up``: the orchestrator may then
place the model anew on the survivors); a server that stays up ``stable_s`` starts counting afresh.
A server whose process exited is restarted at once; one that only stopped answering its heartbeats
(busy, or hung) is given ``silent_s`` to answer again — it is then re-admitted as it was — before its
launcher replaces it.
Servers the operator started (``serve --servers``, or detached ones) are not supervised: they are
re-admitted when they answer heartbeats again.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

from chainserve.plan.recovery import RestartPolicy
from chainserve.runtime.metrics import RuntimeMetrics
from chainserve.runtime.servers import ServerClient, ServerTable

log = logging.getLogger("chainserve.orchestrator")

__all__ = ["RestartPolicy", "Supervisor"]


class Supervisor:
    """Restarts dead servers of ``servers`` by ``restart(name)``; see the module docstring."""

    def __init__(
        self,
        servers: ServerTable,
        restart: Callable[[str], Awaitable[ServerClient]],
        policy: RestartPolicy,
        metrics: RuntimeMetrics,
        clock: Callable[[], float],
        on_back: Callable[[int], None],
        on_given_up: Callable[[int, str], None],
    ):
        self.servers, self.restart, self.policy, self.metrics, self.clock = servers, restart, policy, metrics, clock
        self.on_back, self.on_given_up = on_back, on_given_up
        self.tasks: dict[int, asyncio.Task] = {}
        self.attempts: dict[int, int] = {}  # consecutive restarts of each server
        self.up_since = {r.index: clock() for r in servers}  # up since then (started, or last restarted)
        self.restarts: dict[str, int] = {}  # restarts that succeeded, by server name (/status)
        self.exited: dict[int, asyncio.Event] = {}  # set when server j's process is known to have ended

    def server_died(self, j: int, exited: bool) -> bool:
        """Server j was marked dead (``exited``: its process ended; else it stopped answering): restart
        it, unless that is under way; whether a restart is coming."""
        if self.policy.max_restarts == 0:
            return False
        task = self.tasks.get(j)
        if task is not None and not task.done():
            if exited:
                self.exited[j].set()
            return True
        if self.clock() - self.up_since.get(j, self.clock()) >= self.policy.stable_s:
            self.attempts[j] = 0
        if self.attempts.get(j, 0) >= self.policy.max_restarts:
            return False
        self.exited[j] = asyncio.Event()
        if exited:
            self.exited[j].set()
        self.servers[j].is_restarting = True
        self.tasks[j] = asyncio.get_running_loop().create_task(self._restart(j))
        return True

    async def _restart(self, j: int) -> None:
        r = self.servers[j]
        limit = r.limit
        reason = "no attempt"
        try:
            if not self.exited[j].is_set():
                try:
                    await asyncio.wait_for(self.exited[j].wait(), self.policy.silent_s)
                except TimeoutError:
                    pass
                if r.is_alive:  # it answered again: its heartbeats re-admitted it
                    return
            while (attempt := self.attempts.get(j, 0)) < self.policy.max_restarts:
                self.attempts[j] = attempt + 1
                await asyncio.sleep(self.policy.delay_s(attempt))
                log.warning(
                    "restarting block server %s (restart %d of at most %d)", r.name, attempt + 1,
                    self.policy.max_restarts,
                )  # fmt: skip
                began = self.clock()
                try:
                    client = await self.restart(r.name)
                    info = await client.info(timeout_s=self.servers.deadline_s * 5)
                except Exception as exc:  # a launcher or transport error: retry after the back-off
                    reason = str(exc) or type(exc).__name__
                    log.warning("restart of block server %s failed: %s", r.name, reason)
                    continue
                problem = self.servers.mismatch(j, info, limit)
                if problem is not None:  # not what it hosted before: never admitted
                    reason = problem
                    log.error("restarted block server %s cannot serve: %s", r.name, problem)
                    client.close()
                    continue
                self.servers.replace(j, client, info)
                try:
                    await self.servers.attach(j, info, limit)
                except Exception as exc:
                    reason = str(exc) or type(exc).__name__
                    self.servers.mark_dead(j, f"restarted but its admission limit could not be set: {reason}")
                    continue
                r.is_restarting = False
                self.up_since[j] = self.clock()
                self.restarts[r.name] = self.restarts.get(r.name, 0) + 1
                self.metrics.observe_restart(r.name)
                log.warning("block server %s restarted in %.2f s at %s", r.name, self.clock() - began, client.endpoint)
                self.on_back(j)
                return
        finally:
            r.is_restarting = False
        log.error("block server %s: gave up after %d restarts (%s)", r.name, self.attempts.get(j, 0), reason)
        self.on_given_up(j, reason)

    async def close(self) -> None:
        for task in self.tasks.values():
            task.cancel()
        await asyncio.gather(*self.tasks.values(), return_exceptions=True)
