"""Memory ledger: the KV cache every server holds for the jobs in service, checked against memory.

Paper §1: a job served on a route holds s_c,j·m_ij of cache on every server j of it, so at every
instant ``s_m,j·m_j + s_c,j·Σ_{jobs in service through j} m_ij ≤ M_j``. The ledger counts cache in
block-jobs (units of its own s_c,j) against ``⌊(M_j − s_m,j·m_j)/s_c,j⌋``, so the check is exact integer arithmetic.
For a layout without chains (PETALS, BPRR: a ``PathPlacement``) the limit is the server's
reservation, its cache pool ``⌊cache_gb_j/s_c,j⌋``, which the layout keeps within ``M_j − s_m,j·m_j``.

Exact and O(1) per start on the common path: with Z_k jobs on plan chain k, a plan whose
reservation fits (Σ_k m_jk·c_k within every server's limit) cannot exceed memory while every
Z_k ≤ c_k and no per-request route is in service. The driver handles that case inline (it only
counts Z_k); :meth:`MemoryLedger.admit` / :meth:`MemoryLedger.release` handle the rest — a start beyond
c_k, a route that is not one of the plan's chains — by summing the actual usage of the servers
involved. ``num_unsafe`` counts the reasons the fast path is off (chains over capacity, per-request
jobs in service, a plan whose reservation does not fit, a server reloaded).

One ledger for both simulator loops (issue 31): the job-level fast path (:mod:`.engine`) and the
general loop (:mod:`.loop`), where it also says what each server holds now — the span it has loaded
(plan changes reload servers), whether it is alive — and, after a failure with recovery, keeps each
server to the plan's reservation (the runtime's arena).

With paging (issue 30, :class:`~chainserve.dispatch.base.Paging`: slots sized for T tokens, a job holding
its own demand d of tokens) the unit is the block-token (s_c,j/T): a job holds m_ij·d on every server j
of its route, a chain's budget is c_k·T, limits are ⌊room·T/s_c,j⌋, and the same argument makes the
fast path safe while every chain keeps to its budget. ``admit``/``release`` then take the job's demand.
"""

from __future__ import annotations

from array import array
from collections.abc import Sequence

from chainserve.dispatch.base import Paging, Route
from chainserve.plan.types import Layout, Span, jobs_that_fit, reserved_block_jobs


def demands(paging: Paging | None, prompts: array, outputs: array) -> list[int]:
    """Each job's cache per block in the ledger's units: 1 (a slot), or its tokens in whole pages (a
    list: the simulator's hot path reads it twice per job, and a list reads fastest).

    >>> prompts, outputs = array("q", [30, 1]), array("q", [3, 1])
    >>> list(demands(Paging(100, 16), prompts, outputs)), list(demands(None, prompts, outputs))
    ([48, 16], [1, 1])
    """
    if paging is None:
        return [1] * len(prompts)
    page = paging.page_tokens
    return [-(-(p + o) // page) * page for p, o in zip(prompts, outputs, strict=True)]


class MemoryExceeded(RuntimeError):
    """A dispatcher started a job whose KV cache does not fit on one of its servers."""


class MemoryLedger:
    """Jobs in service per plan chain (``in_service``, Z_k) and per-request cache (``extra``), per
    server limits (``limits``) in block-jobs; see the module docstring. ``by_chain=False`` (the
    general loop, whose plans change) counts every job's cache per server, as ``extra``.

    >>> from chainserve.model.spec import ModelSpec, Problem, Server, Workload
    >>> from chainserve.plan.csearch import make_plan
    >>> from chainserve.plan.types import Chain, Hop, Placement, Span
    >>> p = Problem((Server("a", 10, 1.0, 0.0),), ModelSpec("m", 2, 1.0, 1.0), Workload(0.1))
    >>> plan = make_plan(p, Placement((Span(0, 1, 2),), 2), (Chain((Hop(0, 1, 2),), 2.0, 3),), 3)
    >>> ledger, route = MemoryLedger(plan), Route.of_chain(0, plan.chains[0])
    >>> for job in range(4):   # 8 GB free, a job holds 2 GB: the 4th start still fits
    ...     ledger.admit(job, route, 0.0)
    >>> ledger.in_service, ledger.num_unsafe
    ([4], 1)
    >>> ledger.admit(4, route, 0.0)
    Traceback (most recent call last):
    ...
    chainserve.sim.memory.MemoryExceeded: job 4 at t=0.0: server 0 would hold 10 block-jobs of cache, 8 fit
    """

    def __init__(self, plan: Layout, paging: Paging | None = None, by_chain: bool = True):
        problem = plan.problem
        self.problem = problem
        self.unit = 1 if paging is None else paging.tokens_per_slot  # per slot: 1 block-job, or T block-tokens
        reserved = {j: r * self.unit for j, r in reserved_block_jobs(plan).items()}
        #: each server's cache pool (a path placement's; ``None``: chains may use all the room — a start
        #: beyond c_k that fits is allowed)
        self.pools_gb: dict[int, float] = {} if plan.chains else plan.reservation_by_server()
        #: what each server holds now (the loop's plan changes load others) and whether it is alive
        self.loaded: list[Span | None] = [plan.placement.span_of(j) for j in range(problem.num_servers)]
        self.alive = [True] * problem.num_servers
        self.limits = [self._limit(j) for j in range(problem.num_servers)]
        chains = plan.chains if by_chain else ()
        self.chain_hops = [tuple((h.server, h.num_blocks) for h in ch.hops) for ch in chains]
        self.capacity = [ch.capacity * self.unit for ch in chains]
        self.in_service = [0] * len(chains)
        self.extra = [0] * problem.num_servers
        #: chain index -> the Route object the driver may take the fast path for
        self.known: dict[int, Route] = {}
        self.through: list[list[tuple[int, int]]] = [[] for _ in problem.servers]
        for k, hops in enumerate(self.chain_hops):
            for server, blocks in hops:
                self.through[server].append((k, blocks))
        self.num_unsafe = int(any(r > self.limits[j] for j, r in reserved.items()))
        self.unit_name = "jobs" if paging is None else "tokens"

    def _limit(self, j: int) -> int:
        span, problem = self.loaded[j], self.problem
        if span is None:
            return 0
        room_gb = problem.servers[j].memory_gb - problem.block_size_gb(j) * span.num_blocks
        return jobs_that_fit(self.pools_gb.get(j, room_gb), problem.cache_size_gb(j) / self.unit)

    def load(self, j: int, span: Span) -> None:
        """Unload server ``j`` (it must hold no job's cache) and give it ``span`` (a plan change); the
        fast path is off from then on."""
        if self.used(j):
            raise RuntimeError(f"server {j} unloaded while its jobs hold {self.used(j)} block-jobs of cache")
        self.loaded[j] = span
        self.limits[j] = self._limit(j)
        self.num_unsafe += 1

    def keep_to_reservation(self, plan: Layout, servers: Sequence[int] | None = None) -> None:
        """Each server's (of ``servers``; ``None``: all) limit is ``plan``'s reservation there, as the
        runtime's block server, started for a plan, holds that many (its arena); a reservation that
        fits keeps the fast path safe."""
        for j, slots in reserved_block_jobs(plan).items():
            if servers is None or j in servers:
                self.limits[j] = min(self.limits[j], slots * self.unit)

    def check(self, job: int, route: Route, now: float) -> None:
        """Raise :class:`MemoryExceeded` unless every hop lies in its live server's span."""
        for hop in route.hops:
            j, span = hop.server, self.loaded[hop.server]
            if span is None or hop.start_block < span.start_block or hop.end_block > span.end_block:
                raise MemoryExceeded(f"job {job} at t={now}: server {j} does not hold blocks of {hop}")
            if not self.alive[j]:
                raise MemoryExceeded(f"job {job} at t={now}: server {j} is dead")

    def has_room(self, route: Route, demand: int = 1) -> bool:
        """Whether a job holding ``demand`` per block fits on every hop of ``route`` now."""
        limits = self.limits
        if not self.in_service:  # nothing counted by chain: all per server
            extra = self.extra
            return all(extra[h.server] + h.num_blocks * demand <= limits[h.server] for h in route.hops)
        return all(self.used(h.server) + h.num_blocks * demand <= limits[h.server] for h in route.hops)

    def used(self, server: int) -> int:
        """Block-jobs (block-tokens) of cache held on ``server`` now."""
        through = self.through[server]
        if not through:
            return self.extra[server]
        return self.extra[server] + sum(b * self.in_service[k] for k, b in through)

    def _chain_of(self, route: Route) -> int | None:
        """The plan chain ``route`` runs on (its hops are the chain's), else ``None``."""
        k = route.chain
        if k is None or not 0 <= k < len(self.chain_hops):
            return None
        if route is self.known.get(k):
            return k
        if tuple((h.server, h.num_blocks) for h in route.hops) != self.chain_hops[k]:
            return None
        self.known.setdefault(k, route)
        return k

    def admit(self, job: int, route: Route, now: float, demand: int = 1) -> None:
        """Account for ``job`` (holding ``demand`` units per block: 1 slot, or its tokens with paging)
        starting on ``route``; raise :class:`MemoryExceeded` if it does not fit."""
        k = self._chain_of(route)
        if not self.has_room(route, demand):
            raise MemoryExceeded(self.overflow(job, route, demand, now))
        if k is None:
            self.hold(route, demand)
        else:
            self.num_unsafe -= self.in_service[k] > self.capacity[k]
            self.in_service[k] += demand
            self.num_unsafe += self.in_service[k] > self.capacity[k]

    def overflow(self, job: int, route: Route, demand: int, now: float) -> str:
        """What a start of ``job`` on ``route`` would exceed (it has no room)."""
        j, load = next(
            (h.server, self.used(h.server) + h.num_blocks * demand)
            for h in route.hops
            if self.used(h.server) + h.num_blocks * demand > self.limits[h.server]
        )
        return (
            f"job {job} at t={now}: server {j} would hold {load} block-{self.unit_name} of cache, {self.limits[j]} fit"
        )

    def hold(self, route: Route, demand: int = 1) -> None:
        """Account for a job's cache on every server of ``route`` (per server, unchecked: the caller
        found room, :meth:`has_room`)."""
        extra = self.extra
        for hop in route.hops:
            extra[hop.server] += hop.num_blocks * demand
        self.num_unsafe += 1

    def release(self, route: Route, demand: int = 1) -> None:
        """Free the cache of one job that ran on ``route`` holding ``demand`` units per block."""
        k = self._chain_of(route)
        if k is None:
            for hop in route.hops:
                self.extra[hop.server] -= hop.num_blocks * demand
            self.num_unsafe -= 1
        else:
            self.num_unsafe -= self.in_service[k] > self.capacity[k]
            self.in_service[k] -= demand
            self.num_unsafe += self.in_service[k] > self.capacity[k]
