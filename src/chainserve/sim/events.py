"""The events the simulator's loop (:mod:`.loop`) takes and reports besides arrivals: server
failures (and the supervisor's modelled restarts, issue 33) and executed plan changes."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from chainserve.adapt.controller import PlanChange
from chainserve.plan.recovery import RestartPolicy, restart_s
from chainserve.plan.types import Layout


@dataclass(frozen=True, slots=True)
class Failure:
    """Server ``server`` (index) fails at ``time_s`` and is back ``down_s`` seconds later (``None``:
    never)."""

    time_s: float
    server: int
    down_s: float | None = None

    def __post_init__(self) -> None:
        if not self.time_s >= 0:
            raise ValueError(f"time_s: must be ≥ 0, got {self.time_s}")
        if self.down_s is not None and not self.down_s >= 0:
            raise ValueError(f"down_s: must be ≥ 0, got {self.down_s}")


def supervised_failures(
    layout: Layout, failures: Sequence[tuple[float, int, float | None]], policy: RestartPolicy
) -> tuple[Failure, ...]:
    """(time, server, down seconds or ``None``) as :class:`Failure` events, ``None`` meaning: restarted
    by the runtime's supervisor after :func:`~chainserve.plan.recovery.restart_s` — its back-off counts
    consecutive restarts of a server, afresh once it stayed up ``policy.stable_s`` — or never back when
    the policy gives up.

    >>> from chainserve.model.spec import ModelSpec, Problem, Server, Workload
    >>> from chainserve.plan.csearch import make_plan
    >>> from chainserve.plan.types import Chain, Hop, Placement, Span
    >>> p = Problem((Server("a", 10, 1.0, 0.0),), ModelSpec("m", 1, 1.0, 1.0), Workload(0.5),
    ...             load_bandwidth_gb_per_s=1.0)
    >>> plan = make_plan(p, Placement((Span(0, 1, 1),), 1), (Chain((Hop(0, 1, 1),), 1.0, 1),), 1)
    >>> events = [(10.0, 0, None), (12.0, 0, None), (100.0, 0, None), (200.0, 0, 5.0)]
    >>> [f.down_s for f in supervised_failures(plan, events, RestartPolicy(max_restarts=5, stable_s=60))]
    [1.0, 2.0, 1.0, 5.0]
    """
    out: list[Failure] = []
    attempts: dict[int, int] = {}
    back_at: dict[int, float] = {}
    for t, j, down in sorted(failures, key=lambda f: f[0]):
        if down is None:
            span = layout.placement.span_of(j)
            attempt = attempts.get(j, 0) if t - back_at.get(j, -math.inf) < policy.stable_s else 0
            down = 0.0 if span is None else restart_s(layout.problem, span, policy, attempt)
            attempts[j] = attempt + 1
        out.append(Failure(t, j, down))
        back_at[j] = math.inf if down is None else t + down
    return tuple(out)


@dataclass(frozen=True, slots=True)
class Transition:
    """One executed plan change: the decision and when its last server joined the new plan."""

    change: PlanChange
    finished_s: float

    @property
    def duration_s(self) -> float:
        """Time spent migrating: from the decision until every server serves the new plan."""
        return self.finished_s - self.change.time_s
