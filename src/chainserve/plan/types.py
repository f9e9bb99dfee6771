"""Frozen plan data: block placement, server chains, the whole plan, and its self-check (paper §1).

Blocks are numbered 1..L (1-based, as in the paper). Server references are indices into
``Problem.servers``. :class:`Layout` is what every planner's output answers: this module's
:class:`Plan` (chains with reserved cache) and the path routers' ``PathPlacement`` (a cache pool per
server, :mod:`chainserve.plan.baselines.types`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Protocol

from chainserve.analysis.bounds import Bounds
from chainserve.model.spec import Problem

#: Tolerance on memory sums (GB) so float round-off never flips a feasible fit.
MEMORY_EPS_GB = 1e-9
#: Relative tolerance of ⌊free/need⌋.
FIT_EPS = 1e-9


def jobs_that_fit(free_gb: float, need_gb: float) -> int:
    """⌊free/need⌋ with a tolerance for float round-off; 0 when nothing fits."""
    if free_gb < 0:
        return 0
    return int(math.floor(free_gb / need_gb + FIT_EPS))


@dataclass(frozen=True, slots=True)
class BlockRange:
    """Blocks ``start_block .. start_block + num_blocks - 1`` on server ``server``."""

    server: int
    start_block: int
    num_blocks: int

    @property
    def end_block(self) -> int:
        """Last block, start + num − 1."""
        return self.start_block + self.num_blocks - 1


@dataclass(frozen=True, slots=True)
class Span(BlockRange):
    """The blocks a server hosts (a_j, m_j)."""


@dataclass(frozen=True, slots=True)
class Placement:
    """Spans of the placed servers (servers not listed host nothing)."""

    spans: tuple[Span, ...]
    num_blocks: int

    def span_of(self, server: int) -> Span | None:
        for span in self.spans:
            if span.server == server:
                return span
        return None

    @property
    def servers(self) -> tuple[int, ...]:
        return tuple(s.server for s in self.spans)


@dataclass(frozen=True, slots=True)
class Hop(BlockRange):
    """One hop of a chain: the blocks ``server`` runs for it (m_ij of them, a suffix of its span)."""


@dataclass(frozen=True, slots=True)
class Chain:
    """A server chain k: its hops, service time T_k and capacity c_k (concurrent jobs)."""

    hops: tuple[Hop, ...]
    service_time_s: float
    capacity: int

    @property
    def rate_per_s(self) -> float:
        """μ_k = 1/T_k."""
        return 1.0 / self.service_time_s

    @property
    def servers(self) -> tuple[int, ...]:
        return tuple(h.server for h in self.hops)


def chain_number(index: int) -> int:
    """The number users see for the chain at ``index`` of a plan's ``chains`` (0-based in code): chains
    are numbered from 1 wherever they leave the program — ``plan`` and ``demo`` tables, the API's
    ``chainserve.chain``, ``/status``, ``/metrics`` labels, logs; the status page does the same.

    >>> chain_number(0)
    1
    """
    return index + 1


def hop_time_s(problem: Problem, server: int, num_blocks: int) -> float:
    """τ^c_j + τ^p_j · m_ij: one job's time on one hop."""
    s = problem.servers[server]
    return s.tau_c_s + s.tau_p_s * num_blocks


def chain_time_s(problem: Problem, hops: tuple[Hop, ...]) -> float:
    """T_k = Σ_hops (τ^c_j + τ^p_j · m_ij)."""
    return sum(hop_time_s(problem, h.server, h.num_blocks) for h in hops)


class Layout(Protocol):
    """A placement and the cache it sets aside: a :class:`Plan` or a ``PathPlacement``."""

    @property
    def problem(self) -> Problem: ...

    @property
    def placement(self) -> Placement: ...

    @property
    def chains(self) -> tuple[Chain, ...]: ...

    def reservation_by_server(self) -> dict[int, float]:
        """Cache reserved on each placed server, GB: s_c·Σ_k m_ij(k)·c_k for a plan, the cache pool
        for a path placement."""
        ...


def reserved_block_jobs(layout: Layout) -> dict[int, int]:
    """The reservation of each placed server in block-jobs (units of its s_c,j): Σ_k m_ij(k)·c_k for
    a plan (exact: the GB sum's round-off is far below :data:`FIT_EPS`), ⌊pool/s_c,j⌋ for a path
    placement."""
    problem = layout.problem
    return {j: jobs_that_fit(gb, problem.cache_size_gb(j)) for j, gb in layout.reservation_by_server().items()}


def default_max_waiting(layout: Layout) -> int:
    """4 × C, C the jobs the layout serves at once (Σ c_k; for a path placement, the fewest
    sessions any block can hold, Σ over the servers covering it of slots_j/m_j): the central queue's
    bound by default (beyond the paper, whose queue is unbounded)."""
    if layout.chains:
        return 4 * sum(ch.capacity for ch in layout.chains)
    slots = reserved_block_jobs(layout)
    per_block = [0.0] * (layout.placement.num_blocks + 1)
    for span in layout.placement.spans:
        for b in range(span.start_block, span.end_block + 1):
            per_block[b] += slots[span.server] / span.num_blocks
    return 4 * max(1, math.floor(min(per_block[1:])))


@dataclass(frozen=True, slots=True)
class SearchReport:
    """How the best planner's search ended (issue 19): its work, its time and whether the wall-clock
    safety net cut it short (then the plan is the best found so far and may differ between machines)."""

    elapsed_s: float
    time_limit_s: float
    cut_short: bool
    num_evaluations: int  # placements completed
    num_milp_nodes: int  # branch-and-bound nodes over every MILP
    seed: int


@dataclass(frozen=True, slots=True)
class Plan:
    """Placement + chains (sorted fastest first) + the chosen c, ν and the response-time bounds.

    On a problem with step costs (issue 18, :mod:`chainserve.plan.loaded`) the bounds use batch-1
    speeds for the lower and full-load speeds for the upper one, and ``estimate_s`` is the mean
    response time at the concurrency the load brings (the planner's score); else ``None``."""

    problem: Problem
    placement: Placement
    chains: tuple[Chain, ...]
    c: int | None
    bounds: Bounds
    method: str = "proposed"
    notes: tuple[str, ...] = field(default=())
    search: SearchReport | None = field(default=None, compare=False)  # the best planner's, else None
    estimate_s: float | None = None

    @property
    def score_s(self) -> float:
        """What the planners minimise: the batch-aware estimate when there is one, else the lower bound."""
        return self.bounds.lower_s if self.estimate_s is None else self.estimate_s

    @property
    def total_rate_per_s(self) -> float:
        """ν = Σ c_k μ_k."""
        return sum(ch.capacity * ch.rate_per_s for ch in self.chains)

    @property
    def num_job_servers(self) -> int:
        """C = Σ c_k."""
        return sum(ch.capacity for ch in self.chains)

    @property
    def load(self) -> float:
        """ρ = λ/ν (≥ 1 means unstable)."""
        nu = self.total_rate_per_s
        return math.inf if nu == 0 else self.problem.arrival_rate_per_s / nu

    @property
    def is_stable(self) -> bool:
        return self.load < 1

    def reservation_by_server(self) -> dict[int, float]:
        """Cache reserved on each placed server, GB: Σ_k s_c,j · m_ij(k) · c_k (:class:`Layout`)."""
        problem = self.problem
        used = {span.server: 0.0 for span in self.placement.spans}
        for ch in self.chains:
            for hop in ch.hops:
                used[hop.server] += problem.cache_size_gb(hop.server) * hop.num_blocks * ch.capacity
        return used

    def free_memory_gb(self) -> dict[int, float]:
        """M_j − s_m,j·m_j − reserved cache, per placed server."""
        problem = self.problem
        used = self.reservation_by_server()
        return {
            j: problem.servers[j].memory_gb - problem.block_size_gb(j) * span.num_blocks - used[j]
            for j, span in ((span.server, span) for span in self.placement.spans)
        }

    def check(self) -> None:
        """Raise ``ValueError`` unless the plan is valid: see :func:`check_plan`."""
        check_plan(self)


def check_placement(problem: Problem, placement: Placement) -> None:
    """Spans lie in 1..L, each server at most once, parameters fit in memory."""
    L = problem.model.num_blocks
    seen: set[int] = set()
    for span in placement.spans:
        if not 0 <= span.server < problem.num_servers:
            raise ValueError(f"placement: unknown server index {span.server}")
        if span.server in seen:
            raise ValueError(f"placement: server {span.server} placed twice")
        seen.add(span.server)
        if span.num_blocks < 1 or span.start_block < 1 or span.end_block > L:
            raise ValueError(f"placement: span {span} outside blocks 1..{L}")
        j = span.server
        if problem.block_size_gb(j) * span.num_blocks > problem.servers[j].memory_gb + MEMORY_EPS_GB:
            raise ValueError(f"placement: server {span.server} cannot hold {span.num_blocks} blocks")


def check_plan(plan: Plan) -> None:
    """Memory never exceeded; every chain covers blocks 1..L contiguously, each hop inside its
    server's span, capacities ≥ 1, T_k matching the hops."""
    problem, placement = plan.problem, plan.placement
    check_placement(problem, placement)
    L = problem.model.num_blocks
    for k, ch in enumerate(plan.chains):
        if ch.capacity < 1:
            raise ValueError(f"chain {k}: capacity {ch.capacity} < 1")
        next_block = 1
        for hop in ch.hops:
            span = placement.span_of(hop.server)
            if span is None:
                raise ValueError(f"chain {k}: server {hop.server} hosts no blocks")
            if hop.start_block != next_block or hop.num_blocks < 1:
                raise ValueError(f"chain {k}: hop {hop} does not continue at block {next_block}")
            if hop.start_block < span.start_block or hop.end_block != span.end_block:
                raise ValueError(f"chain {k}: hop {hop} is not a suffix of the server's span {span}")
            next_block = hop.end_block + 1
        if next_block != L + 1:
            raise ValueError(f"chain {k}: covers blocks 1..{next_block - 1}, not 1..{L}")
        if not math.isclose(ch.service_time_s, chain_time_s(problem, ch.hops), rel_tol=1e-9):
            raise ValueError(f"chain {k}: service time does not match its hops")
    for server, free in plan.free_memory_gb().items():
        if free < -MEMORY_EPS_GB * max(1.0, problem.servers[server].memory_gb):
            raise ValueError(f"server {problem.servers[server].name}: memory exceeded by {-free:.6g} GB")
