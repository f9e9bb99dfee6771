"""The plans a driver serves at once (beyond the paper, which plans once): the *generation* in
force, one being brought in by a plan change (or a recomposition after a failure), and retired ones
whose jobs still run (drained, never cut). Pure (no clock, no I/O): the orchestrator
(:mod:`chainserve.runtime.plan_changes`) and the simulator (:mod:`chainserve.sim.loop`) both keep
their plans in force here.

Each :class:`Generation` is one layout with its own dispatcher and the block-slots its started jobs
take on each server; :class:`Generations` switches the one that takes arrivals, retires the ones
with nothing left in service, and counts.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from chainserve.dispatch.base import Dispatcher, Job, Start
from chainserve.plan.types import Layout, chain_number


@dataclass(slots=True, eq=False)
class Generation:
    """A layout, its dispatcher, the block-slots its started jobs take per server (``used``) and
    the most jobs each chain has held at once since it came in (``peak_busy``)."""

    layout: Layout
    dispatcher: Dispatcher
    used: defaultdict[int, int] = field(default_factory=lambda: defaultdict(int))
    peak_busy: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        state = self.dispatcher.state
        self.peak_busy = [0] * (len(state.chains) if state is not None else 0)

    def started(self, start: Start) -> None:
        for hop in start.route.hops:
            self.used[hop.server] += hop.num_blocks

    def ended(self, start: Start) -> None:
        for hop in start.route.hops:
            self.used[hop.server] -= hop.num_blocks

    def note_peaks(self) -> None:
        state = self.dispatcher.state
        if state is not None:
            self.peak_busy = [max(p, b) for p, b in zip(self.peak_busy, state.busy, strict=True)]

    def chain_rows(self, names: Mapping[int, str]) -> list[dict[str, Any]]:
        """Each chain for ``/status``: its number (from 1), servers' names, busy / capacity, peak and liveness."""
        state = self.dispatcher.state
        if state is None:  # a path router has no chains
            return []
        return [
            {
                "chain": chain_number(k),
                "servers": [names[j] for j in ch.servers],
                "busy": state.busy[k],
                "capacity": state.capacity[k],
                "peak_busy": self.peak_busy[k],
                "alive": state.alive[k],
            }
            for k, ch in enumerate(state.chains)
        ]


class Generations:
    """``current`` takes arrivals; ``incoming`` is the plan a change is bringing in (not yet
    switched to); ``retired`` ones only finish what they run."""

    def __init__(self, layout: Layout, dispatcher: Dispatcher):
        self.current = Generation(layout, dispatcher)
        self.incoming: Generation | None = None
        self.retired: list[Generation] = []

    def __iter__(self):
        """Every generation, the current one first."""
        yield self.current
        if self.incoming is not None:
            yield self.incoming
        yield from self.retired

    @property
    def newest(self) -> Generation:
        return self.incoming or self.current

    def bring_in(self, layout: Layout, dispatcher: Dispatcher) -> Generation:
        """A generation that takes arrivals only from :meth:`switch` on."""
        self.incoming = Generation(layout, dispatcher)
        return self.incoming

    def switch(self, new: Generation | None = None) -> list[Job]:
        """``new`` (default: the incoming one) takes arrivals; the old current one retires. Returns
        its waiting jobs, in queue order, for the caller to submit to ``new``."""
        new = new or self.incoming
        old, self.current = self.current, new
        if self.incoming is new:
            self.incoming = None
        self.retired.append(old)
        return old.dispatcher.drain()

    def retire_idle(self) -> list[Job]:
        """Forget retired generations with nothing in service; returns any job still waiting in a
        retired one (to move to the current one)."""
        moved = [job for gen in self.retired for job in gen.dispatcher.drain()]
        self.retired = [gen for gen in self.retired if gen.dispatcher.num_in_service]
        return moved

    def old_cache(self) -> dict[int, int]:
        """Block-slots per server held by jobs of every generation but the newest."""
        newest, cache = self.newest, defaultdict(int)
        for gen in self:
            if gen is not newest:
                for j, n in gen.used.items():
                    cache[j] += n
        return cache

    def used_on(self, j: int) -> int:
        return sum(gen.used.get(j, 0) for gen in self)

    @property
    def num_waiting(self) -> int:
        return sum(gen.dispatcher.num_waiting for gen in self)

    @property
    def num_running(self) -> int:
        return sum(gen.dispatcher.num_in_service for gen in self)
