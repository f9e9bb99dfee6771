"""Executing a plan change: one pure schedule that the simulator and the serving runtime both step
(beyond the paper, whose plan is static; :mod:`.controller` decides the change, this module says how
it is carried out).

The new plan runs on a fresh dispatcher in which every server of its placement starts out failed and
*joins* (``restore_server``) when it can; the old plans' jobs finish on their chains (drained, never
cut). A change to ``layout``:

* servers of the new placement that must load a span (theirs changes, or their arena is too small
  for the new reservation) and that no old chain uses load at once, together, while the old plan
  keeps serving;
* once they are loaded (at once if none takes time) the plans switch: the old dispatcher's waiting
  jobs move, in queue order, to the new one, which also takes every later arrival;
* every other server joins when it can: one that must load once the old jobs on it have finished
  (it then loads and joins when loaded); one whose span stays once the old jobs' cache leaves room
  for its whole new reservation (``old cache + reservation ≤ arena``);
* once every server has joined the change is done.

The schedule holds no clock and no jobs. A driver tells it what happened — :meth:`Migration.start`,
:meth:`~Migration.loaded` (a load finished), :meth:`~Migration.released` (old jobs freed cache) — with
the block-jobs of cache the old plans' jobs hold on each server (``old_cache``), and carries out the
actions it gets back, in order: :class:`Load`, :class:`Join`, :class:`Switch`, :class:`Done`.

>>> from chainserve.model.spec import ModelSpec, Problem, Server, Workload
>>> from chainserve.plan.csearch import make_plan
>>> from chainserve.plan.types import Chain, Hop, Placement
>>> p = Problem((Server("a", 10, 1.0, 0.0), Server("b", 10, 1.0, 0.0)), ModelSpec("m", 2, 1.0, 1.0), Workload(1.0))
>>> new = make_plan(p, Placement((Span(0, 1, 2), Span(1, 1, 2)), 2),
...                 (Chain((Hop(0, 1, 2),), 1.0, 4), Chain((Hop(1, 1, 2),), 1.0, 4)), 2)
>>> m = Migration(new, {1: 5.0}, {0: Span(0, 1, 2), 1: None}, {0: 8, 1: 0})
>>> m.start({0: 6}, in_use={0})   # b is idle: it loads first; a waits for room
[Load(server=1, span=Span(server=1, start_block=1, num_blocks=2), seconds=5.0)]
>>> m.loaded(1, 8, {0: 6})        # b is loaded: it joins, the plans switch
[Join(server=1), Switch()]
>>> m.released({0: 2})            # a's new reservation (4 jobs x 2 blocks) does not fit beside 2
[]
>>> m.released({0: 0}), m.is_done
([Join(server=0), Done()], True)
"""

from __future__ import annotations

from collections.abc import Mapping, Set
from dataclasses import dataclass

from chainserve.plan.types import Layout, Span, reserved_block_jobs


@dataclass(frozen=True, slots=True)
class Load:
    """Unload ``server`` (it holds no job) and load ``span``, modelled to take ``seconds``; report
    :meth:`Migration.loaded` when done."""

    server: int
    span: Span
    seconds: float


@dataclass(frozen=True, slots=True)
class Join:
    """``server`` serves the new plan from now on: ``restore_server`` in the new dispatcher."""

    server: int


@dataclass(frozen=True, slots=True)
class Switch:
    """The new plan takes the old dispatcher's waiting jobs and every later arrival."""


@dataclass(frozen=True, slots=True)
class Done:
    """Every server of the new placement has joined."""


Action = Load | Join | Switch | Done


class Migration:
    """The schedule of one change to ``layout`` (module docstring). ``load_s``: modelled seconds for
    each server to load its new span; ``loaded``: the span each server holds now (``None``: none);
    ``limits``: each server's arena in block-jobs of cache, for the span it holds."""

    def __init__(
        self, layout: Layout, load_s: Mapping[int, float], loaded: Mapping[int, Span | None], limits: Mapping[int, int]
    ):
        self.layout = layout
        self.reservation = reserved_block_jobs(layout)
        self.limits = dict(limits)
        spans = layout.placement.spans
        self.to_load = {
            s.server: load_s.get(s.server, 0.0)
            for s in spans
            if loaded.get(s.server) != s or self.limits.get(s.server, 0) < self.reservation.get(s.server, 0)
        }
        self.joining = {s.server for s in spans}
        self.loading: set[int] = set()
        self.first_loads: set[int] = set()  # the idle servers' loads the switch waits for
        self.is_switched = False
        self.is_done = False

    @property
    def servers(self) -> frozenset[int]:
        """The servers of the new placement (each starts out failed in the new dispatcher)."""
        return frozenset(s.server for s in self.layout.placement.spans)

    def start(self, old_cache: Mapping[int, int], in_use: Set[int]) -> list[Action]:
        """The change begins; ``in_use``: the servers of the old plans' chains."""
        idle = [j for j in self.to_load if j not in in_use and old_cache.get(j, 0) == 0]
        actions: list[Action] = [self._load(j) for j in idle]
        self.first_loads = {a.server for a in actions if a.seconds > 0}
        return actions if self.first_loads else actions + self._switch(old_cache)

    def loaded(self, server: int, limit: int, old_cache: Mapping[int, int]) -> list[Action]:
        """``server`` finished loading; ``limit``: its arena for the new span."""
        self.loading.discard(server)
        self.joining.discard(server)
        self.limits[server] = limit
        actions: list[Action] = [Join(server)]
        if server in self.first_loads:
            self.first_loads.discard(server)
            return actions + (self._switch(old_cache) if not self.first_loads else [])
        return actions + self._admit(old_cache) if self.is_switched else actions

    def released(self, old_cache: Mapping[int, int]) -> list[Action]:
        """Jobs of the old plans finished (their cache left ``old_cache``)."""
        return self._admit(old_cache) if self.is_switched and not self.is_done else []

    def _load(self, j: int) -> Load:
        self.loading.add(j)
        return Load(j, self.layout.placement.span_of(j), self.to_load.pop(j))

    def _switch(self, old_cache: Mapping[int, int]) -> list[Action]:
        self.is_switched = True
        return [*self._admit(old_cache), Switch()]

    def _admit(self, old_cache: Mapping[int, int]) -> list[Action]:
        actions: list[Action] = []
        for j in sorted(self.joining - self.loading):
            if j in self.to_load:
                if old_cache.get(j, 0) == 0:
                    actions.append(self._load(j))
            elif old_cache.get(j, 0) + self.reservation.get(j, 0) <= self.limits.get(j, 0):
                self.joining.discard(j)
                actions.append(Join(j))
        if not self.joining and not self.is_done:
            self.is_done = True
            actions.append(Done())
        return actions
