"""Changing the plan in force while requests run (beyond the paper, which plans once).

:class:`PlanChanger` is built from the orchestrator's two owners of state — the block servers
(:class:`~.servers.ServerTable`) and the plans being served (:class:`~.generations.Generations`) —
and hands job decisions back through a narrow :class:`JobHost`. It makes three kinds of change:

* after a failure or a rejoin, the chains are recomposed on the live servers within their limits
  (:func:`~chainserve.plan.recovery.recompose`): waiting jobs move to the new chains at once, running
  ones finish on the old (a start waits until each hop has room, ``ServerTable.hold``);
* when the live servers no longer cover the model, it is placed anew on them and migrated to;
* the adaptive controller's changes (the object the simulator drives) are migrated to.

A migration steps the same pure schedule the simulator steps
(:class:`~chainserve.adapt.migration.Migration`): a ``Load`` restarts the block server with its new
span (:meth:`PlanOps.reload`), a ``Join`` raises the server's own admission limit to what old and
new jobs may hold there and restores it in the new dispatcher, a ``Switch`` moves the waiting jobs.
Once done, each server's limit is lowered to the new reservation when what is held there fits it.
Every change is logged with its reason, listed at ``/plan`` and counted in ``/metrics``.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol

from chainserve.adapt.cost import migration
from chainserve.adapt.migration import Action, Done, Join, Load, Migration, Switch
from chainserve.dispatch.base import Dispatcher, Job, Start
from chainserve.dispatch.generations import Generation, Generations
from chainserve.plan.recovery import recompose
from chainserve.plan.types import Layout, Plan, Span, reserved_block_jobs
from chainserve.runtime.metrics import RuntimeMetrics
from chainserve.runtime.servers import ServerClient, ServerTable

log = logging.getLogger("chainserve.orchestrator")


class PlanOps(Protocol):
    """What the service lends to change the plan in force: a fresh dispatcher of the method over a
    layout; a new placement of the live servers (``None``: impossible); and, where ``can_reload``,
    restarting server j with its span in a layout (returns its new connection)."""

    can_reload: bool

    def dispatcher(self, layout: Layout) -> Dispatcher: ...

    def place(self, placed: Layout, alive: frozenset[int]) -> Layout | None: ...

    async def reload(self, server: int, layout: Layout) -> ServerClient: ...


class Controller(Protocol):
    """The adaptive controller (``chainserve.adapt``): pure and clock-free, times in seconds."""

    def observe(self, t: float, prompt_tokens: int, output_tokens: int) -> None: ...

    def decide(self, t: float) -> Any: ...

    def applied(self, change: Any, t: float) -> None: ...


class JobHost(Protocol):
    """The orchestrator's side: run the starts a generation's dispatcher made, move jobs to the
    current generation, and hear that the plan in force changed."""

    def apply(self, starts: Sequence[Start], gen: Generation) -> None: ...

    def move(self, jobs: Sequence[Job]) -> None: ...

    def plan_changed(self) -> None: ...


class PlanChanger:
    """See the module docstring. ``placed``: the plan in force with every server alive (failures
    recompose it); ``changes``: the last 100 changes, as ``/plan`` lists them."""

    def __init__(
        self,
        servers: ServerTable,
        generations: Generations,
        host: JobHost,
        ops: PlanOps | None,
        metrics: RuntimeMetrics,
        clock: Callable[[], float],
    ):
        self.servers, self.generations, self.host, self.ops = servers, generations, host, ops
        self.metrics, self.clock = metrics, clock
        self.placed = generations.current.layout
        self.changes: deque[dict[str, Any]] = deque(maxlen=100)
        self.task: asyncio.Task | None = None  # the migration in progress (one at a time)

    @property
    def is_busy(self) -> bool:
        return self.task is not None and not self.task.done()

    def start(self, migrate: Callable[[], Any]) -> None:
        """Run one migration (``migrate()``'s coroutine) in the background."""
        self.task = asyncio.get_running_loop().create_task(migrate())

    # ---- failures -----------------------------------------------------------------------------
    def recompose(self, reason: str, detail: str) -> None:
        """Chains for the live servers now; when none covers the model, a new placement follows
        (:meth:`replace_placement`) and requests wait for it — unless a dead server is being restarted
        (:mod:`.supervision`): then they wait for it, and a new placement follows only if it cannot be."""
        live, new = self.servers.live(), None
        if self.ops is not None and isinstance(self.placed, Plan) and not self.is_busy:
            new = recompose(self.placed, live, {r.index: r.limit for r in self.servers})
            if new is not None:
                self._switch_to(Generation(new, self.ops.dispatcher(new)))
        self.record(reason, detail, new is not None)
        covered = any(live.issuperset(ch.servers) for ch in self.generations.current.layout.chains)
        can_place = self.ops is not None and self.ops.can_reload and isinstance(self.placed, Plan)
        restarting = [r.name for r in self.servers if r.is_restarting]
        if not covered and new is None and can_place and not self.is_busy:
            if restarting:
                log.warning("no complete chain until %s restarts", ", ".join(restarting))
            else:
                self.start(self.replace_placement)

    def _switch_to(self, gen: Generation) -> None:
        """``gen`` takes arrivals; the jobs waiting in the old current one, and in retired ones (whose
        chains may all be dead: with KV by tokens every job may have run there), join its queue."""
        self.host.move(self.generations.switch(gen) + self.generations.retire_idle())
        self.servers.wake()  # starts of the old plan waiting for room move on
        self.host.plan_changed()

    async def replace_placement(self) -> None:
        """Place the model anew on the live servers and migrate to it."""
        live = self.servers.live()
        if not live:
            log.error("no block server is alive; requests wait for a server to come back")
            return
        log.warning("the live servers no longer cover the model: placing it anew on %d servers", len(live))
        try:
            new = self.ops.place(self.placed, live)
            if new is None:
                log.error("the live servers cannot hold the model; requests wait for a server to come back")
                return
            restarted = await self.migrate(new, dict(migration(self.placed, new)))
        except Exception:
            log.exception("re-placement failed; requests wait for a server to come back")
            return
        self.record("replaced", f"{restarted} servers restarted with new spans", True)

    # ---- migrating to a new plan --------------------------------------------------------------
    async def migrate(self, layout: Layout, load_s: Mapping[int, float]) -> int:
        """Move to ``layout`` by the :class:`Migration` schedule; returns the servers restarted."""
        records = list(self.servers)
        loaded = {r.index: None if r.span is None else Span(r.index, *r.span) for r in records}
        schedule = Migration(layout, load_s, loaded, {r.index: r.arena for r in records})
        gen = self.generations.bring_in(layout, self.ops.dispatcher(layout))
        now = self.clock()
        for j in schedule.servers:
            gen.dispatcher.fail_server(j, now)
        in_use = {j for g in self.generations if g is not gen for ch in g.layout.chains for j in ch.servers}
        loads: dict[asyncio.Task, int] = {}
        restarted: list[int] = []
        actions = schedule.start(self.generations.old_cache(), in_use)
        try:
            while True:
                await self._carry_out(actions, schedule, gen, loads, restarted)
                if schedule.is_done:
                    break
                actions = schedule.released(self.generations.old_cache())
                if actions:
                    continue
                freed = asyncio.ensure_future(self.servers.freed())
                done, _ = await asyncio.wait({freed, *loads}, return_when=asyncio.FIRST_COMPLETED)
                freed.cancel()
                for task in done & set(loads):
                    j, arena = loads.pop(task), task.result()
                    actions += schedule.loaded(j, arena, self.generations.old_cache())
        finally:
            for task in loads:
                task.cancel()
        self.placed = layout
        return len(restarted)

    async def _carry_out(
        self,
        actions: Sequence[Action],
        schedule: Migration,
        gen: Generation,
        loads: dict[asyncio.Task, int],
        restarted: list[int],
    ) -> None:
        layout = gen.layout
        for action in actions:
            if isinstance(action, Load):
                loads[asyncio.ensure_future(self._restart(action.server, layout))] = action.server
                restarted.append(action.server)
            elif isinstance(action, Join):
                j, r = action.server, self.servers[action.server]
                if not r.is_live:  # died meanwhile: it stays failed in the new dispatcher
                    continue
                need = self.generations.old_cache().get(j, 0) + schedule.reservation.get(j, 0)
                if r.limit < need:
                    await self.servers.set_limit(j, r.arena)
                self.host.apply(gen.dispatcher.restore_server(j, self.clock()), gen)
            elif isinstance(action, Switch):
                self._switch_to(gen)
            elif isinstance(action, Done):
                want = reserved_block_jobs(layout)
                self.servers.lower_when_fits({r.index: want.get(r.index, 0) for r in self.servers})

    async def _restart(self, j: int, layout: Layout) -> int:
        """Restart server j (it holds no job) with its span in ``layout``; returns its arena."""
        r = self.servers.records.get(j)  # None: it hosted nothing so far
        if r is not None:
            r.is_out = True  # no heartbeat verdicts while it restarts
        try:
            client = await self.ops.reload(j, layout)
            info = await client.info()
        finally:
            if r is not None:
                r.is_out = False
        self.servers.replace(j, client, info)
        return self.servers[j].arena

    # ---- adapting to load (issue 9) -----------------------------------------------------------
    async def execute(self, change: Any, controller: Controller, t0: float) -> None:
        """Carry out a :class:`~chainserve.adapt.controller.PlanChange`, then tell the controller."""
        began = self.clock()
        log.info("plan change (%s) starts: %s for %.3g requests/s", change.reason, change.kind, change.rate_per_s)
        try:
            restarted = await self.migrate(change.layout, dict(change.migration))
        except Exception:
            log.exception("plan change (%s) failed; the chains in force stay", change.reason)
            return
        took_s = self.clock() - began
        controller.applied(change, self.clock() - t0)
        self.record(
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

    def record(self, reason: str, detail: str, recomposed: bool, **extra: Any) -> None:
        names = {r.index: r.name for r in self.servers}
        chains = [[names[j] for j in ch.servers] for ch in self.generations.current.layout.chains]
        self.changes.append(
            {"at": time.time(), "reason": reason, "detail": detail, "recomposed": recomposed, "chains": chains, **extra}
        )
        self.metrics.observe_plan_change(reason)
        log.warning(
            "plan change (%s: %s): %s",
            reason,
            detail,
            "chains " + "; ".join(" → ".join(c) for c in chains) if recomposed else "chains kept",
        )
        self.host.plan_changed()
