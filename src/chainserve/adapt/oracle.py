"""An oracle for the adaptive experiments: it knows the rate profile and re-plans at its true change
points at no cost (no detection delay, no loading time; the old jobs still drain, as they must).
It answers the :class:`~chainserve.adapt.controller.AdaptiveController` calls a driver makes."""

from __future__ import annotations

from collections.abc import Sequence

from chainserve.adapt.controller import AdaptConfig, PlanChange, plan_for_rate, rounded_rate
from chainserve.adapt.cost import REALLOCATE, REPLACE, migration
from chainserve.model.spec import Problem
from chainserve.plan.types import Layout, Plan


class OracleController:
    """Switches to the plan for ``rates_per_s[i]`` at ``starts_s[i]`` (same driver interface)."""

    def __init__(
        self,
        problem: Problem,
        layout: Layout,
        starts_s: Sequence[float],
        rates_per_s: Sequence[float],
        config: AdaptConfig,
    ):
        self.problem, self.config = problem, config
        self._layout = layout
        self.plan_rate_per_s = layout.problem.arrival_rate_per_s
        self._schedule = sorted(zip(starts_s, rates_per_s, strict=True))
        self.pending: PlanChange | None = None
        self.changes: list[PlanChange] = []

    @property
    def layout(self) -> Layout:
        return self._layout

    def observe(self, t: float, prompt_tokens: int, output_tokens: int) -> None:
        """The oracle needs no measurements."""

    def decide(self, t: float) -> PlanChange | None:
        """The plan for the latest change point passed, when it differs from the plan in force."""
        due = [rate for start, rate in self._schedule if start <= t]
        if self.pending is not None or not due:
            return None
        rate = rounded_rate(due[-1])
        self._schedule = [(s, r) for s, r in self._schedule if s > t]
        new = plan_for_rate(self.problem, self.config.planner, rate)
        if rate == self.plan_rate_per_s or new == self._layout:
            return None
        moves = migration(self._layout, new)
        kind = REPLACE if moves or set(new.placement.spans) != set(self._layout.placement.spans) else REALLOCATE
        old_c = self._layout.c if isinstance(self._layout, Plan) else None
        self.pending = PlanChange(
            t, "oracle", kind, old_c, new.c, rate, new, tuple((j, 0.0) for j, _ in moves), 0.0, 0.0, 0.0
        )
        return self.pending

    def applied(self, change: PlanChange, t: float) -> None:
        self.pending = None
        self._layout, self.plan_rate_per_s = change.layout, change.rate_per_s
        self.changes.append(change)
