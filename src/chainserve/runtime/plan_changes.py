"""Changing the plan in force while requests run (beyond the paper, which plans once).

Failures recompose the chains on the live servers (:meth:`PlanChanges._recompose`) or place the model
anew on them (:meth:`PlanChanges._replace_placement`); the adaptive controller's changes are executed by
:meth:`PlanChanges._execute`. These are the :class:`~chainserve.runtime.orchestrator.Orchestrator`'s
methods that switch dispatchers, move admission limits and migrate spans; they share its state.

Adapting to load (beyond the paper, issue 9): an adaptive controller (the object the simulator
drives) sees every admitted request's arrival and is asked to ``decide`` after arrivals and on a
timer; a plan change it returns is executed without dropping or cutting a request. A re-allocation
switches to the new chains on a fresh dispatcher (:meth:`PlanChanges._adopt`). A re-placement migrates server
by server (:meth:`PlanChanges._migrate`): the server leaves the chains, its jobs finish, it restarts with its new
span, the servers in place serve on the chains they form, next. Each block server's admission limit
follows the plan in force within its physical arena (raised before a job may use it, lowered after),
and a start waits until each hop has room under the limit (``Orchestrator._hold``), so old chains' jobs and
new ones never hold more KV than a server has. Every change is logged with its reason, listed at
``/plan`` and counted in ``/metrics``.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Protocol

from chainserve.dispatch.base import Dispatcher
from chainserve.plan.types import Layout, Placement, Plan, Span, reserved_block_jobs
from chainserve.runtime.client import ServerFailed
from chainserve.runtime.recovery import chains_within, recompose

if TYPE_CHECKING:
    from chainserve.runtime.orchestrator import Orchestrator, ServerClient

log = logging.getLogger("chainserve.orchestrator")


class PlanOps(Protocol):
    """What the service lends the orchestrator to change the plan in force: a fresh dispatcher of the
    method over a layout; a new placement of the live servers (``None``: impossible); and, where
    ``can_reload``, restarting server j with its span in a layout (returns its new connection)."""

    can_reload: bool

    def dispatcher(self, layout: Layout) -> Dispatcher: ...

    def place(self, placed: Layout, alive: frozenset[int]) -> Layout | None: ...

    async def reload(self, server: int, layout: Layout) -> ServerClient: ...


class Controller(Protocol):
    """The adaptive controller (``chainserve.adapt``): pure and clock-free, times in seconds."""

    def observe(self, t: float, prompt_tokens: int, output_tokens: int) -> None: ...

    def decide(self, t: float) -> Any: ...

    def applied(self, change: Any, t: float) -> None: ...


class PlanChanges:
    """The orchestrator's plan-change methods (mixed into :class:`~.orchestrator.Orchestrator`)."""

    def _live(self: Orchestrator) -> frozenset[int]:
        """Servers that answer and are not out of the chains for a restart."""
        return frozenset(j for j, up in self.alive.items() if up and j not in self._out)

    def _recompose(self: Orchestrator, reason: str, detail: str) -> None:
        """Switch to chains for the live servers: waiting jobs move to the new dispatcher; running
        ones finish on the old (drained, never cut). When the live servers' spans no longer cover the
        model, a new placement follows (:meth:`_replace_placement`) and requests wait for it."""
        new = None
        if self.plan_ops is not None and isinstance(self.placed, Plan):
            new = recompose(self.placed, self._live(), self.block_slots)
            if new is not None:
                self._switch(new, self.plan_ops.dispatcher(new))
        self._record(reason, detail, new is not None)
        covered = any(all(j in self._live() for j in ch.servers) for ch in self.layout.chains)
        if new is None and isinstance(self.placed, Plan) and not covered and self.plan_ops.can_reload:
            if not self._busy:
                self._replacing = asyncio.get_running_loop().create_task(self._replace_placement())

    @property
    def _busy(self: Orchestrator) -> bool:
        """A plan change (re-placement or adaptation) is being executed."""
        return self._replacing is not None and not self._replacing.done()

    def _switch(self: Orchestrator, layout: Layout, dispatcher: Dispatcher) -> None:
        self._wake()  # starts of the old dispatcher waiting for room move on
        old = self.dispatcher
        moved = old.drain()
        self.layout, self.dispatcher = layout, dispatcher
        self.retired.append(old)
        self._reset_peaks()
        for job in moved:
            self.runs[job.job_id].dispatcher = dispatcher
            self._apply(dispatcher.submit(job, self.clock()), dispatcher)
        self._retire_idle()

    def _record(self: Orchestrator, reason: str, detail: str, recomposed: bool, **extra: Any) -> None:
        chains = [[self.names[j] for j in ch.servers] for ch in self.layout.chains]
        self.plan_changes.append(
            {
                "at": time.time(),
                "reason": reason,
                "detail": detail,
                "recomposed": recomposed,
                "chains": chains,
                **extra,
            }
        )
        self.metrics.observe_plan_change(reason)
        log.warning(
            "plan change (%s: %s): %s",
            reason,
            detail,
            "chains " + "; ".join(" → ".join(c) for c in chains) if recomposed else "chains kept",
        )
        self._update_gauges()

    async def _replace_placement(self: Orchestrator) -> None:
        """Place the model anew on the live servers (restarting those whose span changes)."""
        alive = self._live()
        log.warning("the live servers no longer cover the model: placing it anew on %d servers", len(alive))
        try:
            new = self.plan_ops.place(self.placed, alive)
            if new is None:
                log.error("the live servers cannot hold the model; requests wait for a server to come back")
                return
            restarted = await self._migrate(new, ())
        except Exception:
            log.exception("re-placement failed; requests wait for a server to come back")
            return
        self._record("replaced", f"{restarted} servers restarted with new spans", True)

    # ---- plan changes: limits, re-allocation, migration ---------------------------------------
    async def _set_limit(self: Orchestrator, j: int, limit: int) -> None:
        """Server j's own admission limit (holding the lock); a dead server, or one being restarted,
        keeps its own (a restarted one reports it)."""
        if self.alive.get(j, False) and j not in self._out:
            self.server_limits[j] = limit
            await self.clients[j].set_limit(limit, timeout_s=self.heartbeat_deadline_s)

    async def _adopt(self: Orchestrator, layout: Layout) -> None:
        """Serve ``layout``'s chains on a fresh dispatcher; waiting jobs move to it, running ones finish
        on their chains. The orchestrator's admission limits become ``layout``'s reservation (0 where
        a server hosts no chain). A server's own limit is raised before the switch and lowered once
        what the orchestrator holds there fits (:meth:`_lower`): a job admitted under the old limit
        opens its later hops' sessions after the switch, and the server must not refuse them."""
        want = reserved_block_jobs(layout)
        limits = {j: want.get(j, 0) for j in self.hosted}
        too_big = [self.names[j] for j, n in limits.items() if n > self.arena_slots.get(j, 0)]
        if too_big:
            raise RuntimeError(f"the new plan reserves more than the arenas of {', '.join(too_big)} hold")
        async with self._limits_lock:
            raised = [j for j, n in limits.items() if n > self.server_limits.get(j, 0)]
            await asyncio.gather(*(self._set_limit(j, limits[j]) for j in raised))
            self.block_slots.update(limits)
        self.placed = layout
        if self.max_waiting_follows_plan:
            self.max_waiting = default_max_waiting(layout)
        self._switch(layout, self.plan_ops.dispatcher(layout))
        loop = asyncio.get_running_loop()
        for j, n in limits.items():
            if n < self.server_limits.get(j, 0) and (j not in self._lowering or self._lowering[j].done()):
                self._lowering[j] = loop.create_task(self._lower(j))

    async def _lower(self: Orchestrator, j: int) -> None:
        """Lower server j's own limit to the orchestrator's once the block-slots held there fit it
        (no new job is admitted past it meanwhile, so this comes within a job's lifetime)."""
        while self.held_slots.get(j, 0) > self.block_slots.get(j, 0) and j not in self._out:
            await self._freed.wait()
        async with self._limits_lock:
            if self.block_slots.get(j, 0) < self.server_limits.get(j, 0):
                try:
                    await self._set_limit(j, self.block_slots[j])
                except ServerFailed as exc:
                    log.warning("could not lower the admission limit of %s: %s", self.names[j], exc)

    def _exclude(self: Orchestrator) -> None:
        """New jobs avoid the servers out of the chains (and dead ones): a fresh dispatcher over the
        same chains with those servers failed; their running jobs finish on the retired one."""
        dispatcher = self.plan_ops.dispatcher(self.layout)
        now = self.clock()
        for j in self.hosted:
            if j not in self._live():
                dispatcher.fail_server(j, now)
        self._switch(self.layout, dispatcher)

    async def _drained(self: Orchestrator, j: int) -> None:
        """Until no started route runs through server j (each ends within the request timeout)."""
        while self.used_slots.get(j, 0) > 0:
            await self._freed.wait()

    def _needs_restart(self: Orchestrator, target: Layout, j: int) -> bool:
        span = target.placement.span_of(j)
        want = reserved_block_jobs(target).get(j, 0)
        return span is not None and (
            self.hosted.get(j) != (span.start_block, span.num_blocks) or want > self.arena_slots.get(j, 0)
        )

    async def _migrate(self: Orchestrator, target: Layout, order: Sequence[int]) -> int:
        """Move to ``target``'s placement. Servers that host nothing yet start first (together: they
        take nothing out of service); then, one at a time in ``order``, each server whose span
        changes leaves the chains, its jobs finish (never cut), it restarts with its new span and
        arena; meanwhile the servers in place serve on the chains they form (GCA within their arenas;
        none: requests wait). Servers that leave the placement only drain. Returns the restarts."""
        changed = [j for j in order if self._needs_restart(target, j)]
        changed += [j for j in target.placement.servers if j not in changed and self._needs_restart(target, j)]
        fresh = [j for j in changed if j not in self.hosted or not self.alive.get(j, False)]
        await asyncio.gather(*(self._restart(j, target) for j in fresh))
        if fresh:
            await self._serve_interim(target)
        for j in changed:
            if j in fresh:
                continue
            self._out.add(j)
            await self._serve_interim(target)
            began = self.clock()
            await self._drained(j)
            log.info("block server %s drained in %.2f s; restarting it", self.names[j], self.clock() - began)
            await self._restart(j, target)
            await self._serve_interim(target)
        await self._adopt(target)
        return len(changed)

    async def _restart(self: Orchestrator, j: int, target: Layout) -> None:
        """Restart server j with its span and arena in ``target`` (it must hold no job) and take its
        connection; it serves from the next :meth:`_adopt` on."""
        self._out.add(j)  # no heartbeat verdicts while it restarts
        try:
            client = await self.plan_ops.reload(j, target)
            info = await client.info()
        finally:
            self._out.discard(j)
        old = self.clients.get(j)
        self.clients[j] = client
        if old is not None and hasattr(old, "close"):
            old.close()
        self.hosted[j] = (info["first_block"], info["num_blocks"])
        self.arena_slots[j] = info["num_block_slots"]
        self.server_limits[j] = info["slot_limit"]
        self.block_slots[j] = 0  # nothing is admitted there before _adopt raises the limit
        for counts in (self.used_slots, self.held_slots):
            counts.setdefault(j, 0)
        self.alive[j] = True
        self.metrics.set_server_up(self.names[j], True)
        log.info("block server %s restarted with blocks %d..+%d", self.names[j], *self.hosted[j])

    async def _serve_interim(self: Orchestrator, target: Layout) -> None:
        """Mid-migration: chains over what the live servers host now; none: new jobs avoid the servers
        out of service and wait."""
        interim = self._placed_now(target)
        if interim is not None:
            await self._adopt(interim)
        else:
            self._exclude()

    def _placed_now(self: Orchestrator, target: Layout) -> Plan | None:
        """Chains over what the live servers of the old and new placements host now (mid-migration)."""
        members = set(self.placed.placement.servers) | set(target.placement.servers)
        spans = tuple(Span(j, *self.hosted[j]) for j in sorted(members & self._live() & set(self.hosted)))
        return chains_within(target, Placement(spans, target.placement.num_blocks), self.arena_slots)

    # ---- adapting to load (issue 9) -----------------------------------------------------------
    def _maybe_adapt(self: Orchestrator) -> None:
        """Ask the controller; execute the change it returns (one at a time, never while degraded)."""
        if self.controller is None or self._busy or not all(self.alive.values()):
            return
        change = self.controller.decide(self.clock() - self._t0)
        if change is not None:
            self._replacing = asyncio.get_running_loop().create_task(self._execute(change))

    async def _adapt_timer(self: Orchestrator) -> None:
        while True:
            await asyncio.sleep(self.adapt_interval_s)
            self._maybe_adapt()

    async def _execute(self: Orchestrator, change: Any) -> None:
        """Carry out a :class:`~chainserve.adapt.controller.PlanChange`, then tell the controller."""
        began = self.clock()
        log.info("plan change (%s) starts: %s for %.3g requests/s", change.reason, change.kind, change.rate_per_s)
        try:
            if change.kind == "replace":
                restarted = await self._migrate(change.layout, [j for j, _ in change.migration])
            else:
                restarted = 0
                await self._adopt(change.layout)
        except Exception:
            log.exception("plan change (%s) failed; the chains in force stay", change.reason)
            return
        took_s = self.clock() - began
        self.controller.applied(change, self.clock() - self._t0)
        self._record(
            change.reason,
            f"{change.kind}, c {change.old_c} → {change.new_c} for {change.rate_per_s:.3g} requests/s "
            f"(predicted gain {change.gain_s:.3g} s > cost {change.cost_s:.3g} s; "
            f"{restarted} servers restarted, {took_s:.2f} s)",
            True,
            kind=change.kind,
            old_c=change.old_c,
            new_c=change.new_c,
            rate_per_s=change.rate_per_s,
            gain_s=change.gain_s,
            cost_s=change.cost_s,
            took_s=took_s,
        )

    def _retire_idle(self: Orchestrator) -> None:
        """Forget old dispatchers with nothing left in them; move any waiting job to the current one."""
        for old in list(self.retired):
            for job in old.drain():
                self.runs[job.job_id].dispatcher = self.dispatcher
                self._apply(self.dispatcher.submit(job, self.clock()))
            if old.num_in_service == 0:
                self.retired.remove(old)


def default_max_waiting(layout: Layout) -> int:
    """4 × C, C the jobs the layout serves at once (Σ c_k; for a path placement, the fewest
    sessions any block can hold, Σ over the servers covering it of slots_j/m_j)."""
    if layout.chains:
        return 4 * sum(ch.capacity for ch in layout.chains)
    slots = reserved_block_jobs(layout)
    per_block = [0.0] * (layout.placement.num_blocks + 1)
    for span in layout.placement.spans:
        for b in range(span.start_block, span.end_block + 1):
            per_block[b] += slots[span.server] / span.num_blocks
    return 4 * max(1, math.floor(min(per_block[1:])))
