"""The best planner's work limits and its wall-clock safety net (spec §2.5's search; issue 19).

The search is bounded by *work*: completions per local search, branch-and-bound nodes per MILP and
over the whole run. Counts do not depend on the machine's speed, so the same problem and seed give
the same plan on a fast machine and on a busy one. Wall time is only a safety net: every step and
every MILP (HiGHS' ``time_limit``) gets what is left of it, never more, and when it fires the plan is
the best found so far and :attr:`Budget.cut_short` says so.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from scipy.optimize import OptimizeResult

#: ``scipy.optimize.milp`` status of a solve that stopped at its time limit (HiGHS status 13).
MILP_TIME_LIMIT = 1


@dataclass(frozen=True, slots=True)
class WorkLimits:
    """How much work one best-planner run may do; the same limits give the same plan anywhere."""

    #: branch-and-bound nodes over every MILP of one run (a solve costs at least one)
    milp_nodes: int = 20_000
    #: most allocation MILPs of one run (:func:`chainserve.plan.exact.optimal_allocation`); later
    #: completions are GCA and the small branch and bound only. Their root work, not their nodes, is
    #: most of a MILP's time, so their number is limited too (issue 32: 40, each for a placement near
    #: the best plan so far, :data:`chainserve.plan.complete.ALLOCATION_MARGIN`, found what 120 did)
    allocation_milps: int = 40
    #: most nodes of one allocation MILP
    allocation_nodes: int = 100
    #: most completions of one run's local searches together
    max_evaluations: int = 4_000
    #: completions per server: the local searches' share is min(max_evaluations, this·J, search_work/J)
    evaluations_per_server: int = 50
    #: completions × J over the local searches (one completion costs O(J·L)): bounds large clusters
    search_work: int = 20_000
    #: most local searches from the best plan at the end, each of a quarter of the local searches' share
    polish_rounds: int = 4
    #: moves to a tying plan each of those local searches may take (plateaus)
    sideways_moves: int = 8

    def __post_init__(self) -> None:
        for name in self.__slots__:
            if getattr(self, name) < 0:
                raise ValueError(f"{name}: must be ≥ 0, got {getattr(self, name)}")

    def local_search_evaluations(self, num_servers: int) -> int:
        """Completions for the local searches of a J-server run.

        >>> WorkLimits().local_search_evaluations(10), WorkLimits().local_search_evaluations(1000)
        (500, 20)
        """
        return min(self.max_evaluations, self.evaluations_per_server * num_servers, self.search_work // num_servers)


class Budget:
    """One run's work left and its deadline (``time.monotonic()``); the one mutable owner of both."""

    __slots__ = ("limits", "deadline", "milp_nodes_left", "allocation_milps_left", "cut_short")

    def __init__(self, limits: WorkLimits, time_limit_s: float) -> None:
        self.limits = limits
        self.deadline = time.monotonic() + time_limit_s
        self.milp_nodes_left = limits.milp_nodes
        self.allocation_milps_left = limits.allocation_milps
        self.cut_short = False  # the safety net fired: the plan may depend on the machine's speed

    def expired(self) -> bool:
        """Whether the deadline has passed (and, if so, remember that the search was cut short)."""
        if time.monotonic() >= self.deadline:
            self.cut_short = True
        return self.cut_short

    @property
    def milp_nodes_used(self) -> int:
        return self.limits.milp_nodes - self.milp_nodes_left

    def allocation_options(self) -> dict[str, float] | None:
        """:meth:`milp_options` for one more allocation MILP (gap 0), ``None`` once they are used up."""
        if self.allocation_milps_left < 1:
            return None
        options = self.milp_options(self.limits.allocation_nodes, 0.0)
        if options is not None:
            self.allocation_milps_left -= 1
        return options

    def milp_options(self, node_limit: int, mip_rel_gap: float) -> dict[str, float] | None:
        """``scipy.optimize.milp`` options for one solve of at most ``node_limit`` nodes (and the nodes
        and time left), or ``None`` when no MILP may run any more."""
        nodes = min(node_limit, self.milp_nodes_left)
        if nodes < 1 or self.expired():
            return None
        left_s = self.deadline - time.monotonic()
        return {"node_limit": nodes, "time_limit": max(left_s, 1e-3), "mip_rel_gap": mip_rel_gap}

    def charge(self, result: OptimizeResult) -> None:
        """Count a solve's nodes (at least one); a solve stopped by its time limit cuts the run short."""
        self.milp_nodes_left -= max(1, int(getattr(result, "mip_node_count", 0) or 0))
        if result.status == MILP_TIME_LIMIT:
            self.cut_short = True
