"""What a plan change gains and costs, both in seconds of response time summed over the jobs of the
horizon (beyond the paper; its §2.5 bounds price the plans).

* Predicted mean response of a layout at rate λ: the Theorem-4 lower bound (§2.5, what the c-search
  minimises). An unstable layout (λ ≥ ν) gets the fluid estimate over the horizon H: the queue grows
  at λ − ν, so a job waits (λ − ν)·H/(2ν) on average, plus C/ν of service.
* Gain of a move over H: λ·H·(R_old − R_new).
* Cost: the move's transition is priced as a blackout of D seconds after which the new plan serves at
  ν_new — jobs keep arriving at λ, the backlog λD then drains at ν_new − λ, which adds (fluid, the
  area of the extra backlog) ½·λ·D²·ν_new/(ν_new − λ) seconds of waiting in all, counted only within
  the horizon H. A new plan that cannot keep up (ν_new ≤ λ, a peak past the cluster's capacity) never
  drains the blackout's backlog: it adds ν_new·D of backlog for the rest of the horizon,
  ½·ν_new·D² + ν_new·D·(H − D) — finite, so such a move is still taken when the plan in force is
  worse (its own fluid response grows faster). D is the drain time (the slowest old chain's
  mean service time T: old jobs finish where they started) for a *re-allocation* (same placement, new
  chains), plus the longest load for a *re-placement*: a server whose span changes loads the blocks it
  did not hold, s_m,j × blocks ÷ the cluster's load bandwidth.
* Migration order: the servers of the fastest new chains first, so capacity comes back fastest first.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from chainserve.analysis.bounds import response_time_bounds
from chainserve.plan.types import Layout, Plan, Span

#: The two moves: same placement with new chains, or a new placement.
REALLOCATE, REPLACE = "reallocate", "replace"


def predicted_response_s(layout: Layout, rate_per_s: float, horizon_s: float) -> float:
    """Mean response of ``layout``'s chains under JFFC at ``rate_per_s`` (module docstring).

    >>> from chainserve.model.spec import ModelSpec, Problem, Server, Workload
    >>> from chainserve.plan.csearch import make_plan
    >>> from chainserve.plan.types import Chain, Hop, Placement, Span
    >>> p = Problem((Server("a", 10, 0.5, 0.0),), ModelSpec("m", 2, 1.0, 1.0), Workload(1.0))
    >>> plan = make_plan(p, Placement((Span(0, 1, 2),), 2), (Chain((Hop(0, 1, 2),), 1.0, 2),), 2)
    >>> round(predicted_response_s(plan, 1.0, 100.0), 4)    # M/M/2, μ = 1, λ = 1: 4/3
    1.3333
    >>> predicted_response_s(plan, 3.0, 100.0)              # ν = 2: C/ν + (3 − 2)·100/(2·2)
    26.0
    """
    rates = [ch.rate_per_s for ch in layout.chains]
    capacities = [ch.capacity for ch in layout.chains]
    nu = sum(c * r for c, r in zip(capacities, rates, strict=True))
    if nu > rate_per_s:
        return response_time_bounds(rate_per_s, rates, capacities).lower_s
    if nu == 0:
        return math.inf
    return sum(capacities) / nu + (rate_per_s - nu) * horizon_s / (2 * nu)


def new_blocks(old: Span | None, new: Span) -> int:
    """Blocks of ``new`` that ``old`` does not hold (all of them when the server held nothing).

    >>> new_blocks(Span(0, 1, 10), Span(0, 6, 10)), new_blocks(None, Span(0, 1, 4))
    (5, 4)
    """
    if old is None:
        return new.num_blocks
    overlap = max(0, min(old.end_block, new.end_block) - max(old.start_block, new.start_block) + 1)
    return new.num_blocks - overlap


def migration(current: Layout, new: Layout) -> tuple[tuple[int, float], ...]:
    """(server, seconds out of service to load its new span) for every server whose span changes, the
    servers of the fastest new chains first; () when the placement stays."""
    problem = new.problem
    bandwidth = problem.load_bandwidth_gb_per_s
    rank: dict[int, int] = {}
    for k, chain in enumerate(sorted(new.chains, key=lambda ch: ch.service_time_s)):
        for server in chain.servers:
            rank.setdefault(server, k)
    moved = [span for span in new.placement.spans if current.placement.span_of(span.server) != span]
    moved.sort(key=lambda span: (rank.get(span.server, len(rank)), span.server))
    return tuple(
        (j, problem.block_size_gb(j) * new_blocks(current.placement.span_of(j), span) / bandwidth)
        for j, span in ((span.server, span) for span in moved)
    )


def drain_s(layout: Layout) -> float:
    """How long the old chains take to finish their jobs: the slowest chain's mean service time."""
    return max((ch.service_time_s for ch in layout.chains), default=0.0)


def blackout_cost_s(rate_per_s: float, duration_s: float, new_rate_per_s: float, horizon_s: float) -> float:
    """Total extra waiting (fluid) within ``horizon_s`` of a ``duration_s``-second outage after which
    the new plan serves at ``new_rate_per_s`` (module docstring).

    >>> blackout_cost_s(1.0, 10.0, 2.0, 100.0)   # 10 jobs pile up, drain in 10 s: area ½·10·20
    100.0
    >>> blackout_cost_s(1.0, 10.0, 2.0, 15.0)    # cut at 15 s: 50 + (10 + 5)/2·5
    87.5
    >>> blackout_cost_s(1.0, 10.0, 0.5, 100.0)   # never drains: ½·0.5·100 + 0.5·10·90
    475.0
    """
    duration = min(duration_s, horizon_s)
    if duration <= 0:
        return 0.0
    lam, nu, rest = rate_per_s, new_rate_per_s, horizon_s - duration
    if nu <= lam:
        return 0.5 * nu * duration**2 + nu * duration * rest
    peak = lam * duration
    clear = min(rest, peak / (nu - lam))
    return 0.5 * peak * duration + clear * (peak - 0.5 * (nu - lam) * clear)


@dataclass(frozen=True, slots=True)
class Move:
    """A priced plan change: its kind, the new plan, the servers to reload (in order), the predicted
    transition time D, and gain and cost in seconds of response time over the horizon."""

    kind: str
    layout: Plan
    migration: tuple[tuple[int, float], ...]
    transition_s: float
    gain_s: float
    cost_s: float

    @property
    def net_s(self) -> float:
        return self.gain_s - self.cost_s


def price_move(current: Layout, new: Plan, rate_per_s: float, horizon_s: float) -> Move:
    """Gain and cost of replacing ``current`` by ``new`` at ``rate_per_s`` (module docstring)."""
    moves = migration(current, new)
    kind = REPLACE if moves or set(current.placement.spans) != set(new.placement.spans) else REALLOCATE
    transition = drain_s(current) + max((seconds for _, seconds in moves), default=0.0)
    gain = (
        rate_per_s
        * horizon_s
        * (predicted_response_s(current, rate_per_s, horizon_s) - predicted_response_s(new, rate_per_s, horizon_s))
    )
    nu = sum(ch.capacity * ch.rate_per_s for ch in new.chains)
    return Move(kind, new, moves, transition, gain, blackout_cost_s(rate_per_s, transition, nu, horizon_s))
