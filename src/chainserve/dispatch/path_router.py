"""Per-request path routing with server-side waits for cache (spec §3: PETALS, BPRR's WS-RR).

These dispatchers have no chains and no central queue. When a request arrives it gets a path of hops
over the placed servers (chosen by a subclass's hop costs, :func:`shortest_path`); it must then hold
``s_c × (blocks it runs there)`` of every hop's cache pool (:class:`CachePool`) for its whole life.

**Hop-by-hop acquisition** (as PETALS' inference session: its first step reaches server 1, which
allocates its cache, then server 2, …, each server waiting for free cache before it answers): the
request takes its caches in path order, keeping those it has. When a server's pool cannot hold it, it
waits at that server in a FIFO queue (PETALS' ``MemoryCache`` holds one lock while the first waiter
waits, so later requests queue behind it); nobody else allocates there while someone waits. Its
service starts (a :class:`Start` with ``Route(hops, T, chain=None)``, T from the paper's model) once
every hop is held; ``complete`` frees all of them and returns the starts that became possible.
PETALS' 600 s allocation timeout and the client's retries are not modelled: a request keeps waiting
(a retry would pick the same path again while the cache stays full).

**No deadlock.** Along any path the servers' last blocks strictly increase (a hop runs a suffix of its
server's span and the next hop continues after it), so a request waiting at server k holds only servers
whose last block is below e_k, and the requests it waits for — those holding k, or queued ahead of it at
k — hold k and wait, if at all, at servers with last blocks above e_k. Waits thus point to strictly
larger last blocks: no cycle. By induction from the largest last block down, every holder eventually
starts and completes, so every waiter's pool eventually empties; routes never use a hop needing more
than its pool, so every request eventually starts.

**Failures.** ``fail_server`` aborts every request whose path uses the failed server (in service or
still acquiring), frees its caches, and routes it again over the live servers in arrival order; the
aborted in-service ones are reported so a driver can cancel their completions. A request with no live
path waits (counted in ``num_waiting``) until ``restore_server`` brings a server back; then every such
request is routed again, in arrival order.

**Paging** (issue 30; :mod:`.base`): with ``tokens_per_slot`` T given, a request holds on each hop
s_c·m_ij·d/T, d its demand (prompt + output tokens in whole pages of ``page_tokens``) instead of the
full s_c·m_ij sized for T tokens; ``fits(job)`` says whether some live path's pools could ever hold it.

**Runtime verbs.** ``abort`` frees an in-service request's caches and routes it again, as a failure
does (the requests waiting for the freed caches take them first); ``cancel`` frees whatever the
request holds, leaves its wait queue, and lets the waiters behind take what is free; ``drain``
removes every request not yet in service, freeing the caches it acquired so far.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from chainserve.dispatch.base import FailureOutcome, Job, Paging, Route, Start
from chainserve.dispatch.cache_pool import CachePool
from chainserve.plan.baselines.types import PathPlacement
from chainserve.plan.types import Hop, Span, chain_time_s

HopCost = Callable[[Span, int], float]


def shortest_path(
    spans: Sequence[Span], hop_cost: HopCost, exit_cost: Callable[[Span], float], num_blocks: int
) -> tuple[Hop, ...] | None:
    """Cheapest source→sink path: a hop into ``span`` after a predecessor ending at block b runs the
    ``span.end_block − b`` blocks b+1..end (allowed iff ``span.start_block ≤ b+1 ≤ end``), costing
    ``hop_cost(span, blocks)`` (``inf``: not allowed); a path ends with a span ending at L, plus its
    ``exit_cost``. Dynamic programme over end blocks, O(J · distinct ends). Ties: the smaller
    predecessor end, then the smaller server index. ``None`` when no finite path exists.

    >>> spans = [Span(0, 1, 2), Span(1, 2, 2), Span(2, 1, 3)]
    >>> [(h.server, h.start_block, h.num_blocks) for h in shortest_path(
    ...     spans, lambda s, m: 1.0 + m, lambda s: 0.0, 3)]   # 1 hop (cost 4) beats 2 hops (cost 5)
    [(2, 1, 3)]
    """
    best: dict[int, float] = {0: 0.0}
    ends = [0]  # ends reached so far, ascending
    back: dict[int, tuple[int, Span]] = {}
    for span in sorted(spans, key=lambda s: (s.end_block, s.server)):
        end = span.end_block
        options = [
            (best[prev] + hop_cost(span, end - prev), prev) for prev in ends if span.start_block - 1 <= prev < end
        ]
        if not options:
            continue
        cost, prev = min(options)
        cost += exit_cost(span) if end == num_blocks else 0.0
        if cost < best.get(end, math.inf):
            if end not in best:
                ends.append(end)
            best[end], back[end] = cost, (prev, span)
    if not math.isfinite(best.get(num_blocks, math.inf)):
        return None
    hops: list[Hop] = []
    end = num_blocks
    while end > 0:
        prev, span = back[end]
        hops.append(Hop(span.server, prev + 1, end - prev))
        end = prev
    return tuple(reversed(hops))


def _arrival_key(request: PathRequest) -> tuple[float, int]:
    return _job_key(request.job)


def _job_key(job: Job) -> tuple[float, int]:
    return job.arrived_at, job.job_id


@dataclass(slots=True)
class PathRequest:
    """A routed request: its hops, mean service time T, the share of s_c it holds per block
    (``scale``: 1 for a slot, d/T with paging), how many hops' caches it holds, where it waits (server
    index, ``None`` if not waiting) and whether it is in service."""

    job: Job
    hops: tuple[Hop, ...]
    service_time_s: float
    scale: float = 1.0
    num_held: int = 0
    waiting_at: int | None = None
    in_service: bool = False
    attempt: int = 0


class PathRouter:
    """Shared mechanics of the path routers; subclasses give the hop costs (:meth:`path_costs`)."""

    name = "path"
    state = None  # no plan chains: occupancy is per server pool (see the Dispatcher protocol)

    def __init__(self, layout: PathPlacement, tokens_per_slot: int | None = None, page_tokens: int = 1):
        layout.check()
        self.paging = None if tokens_per_slot is None else Paging(tokens_per_slot, page_tokens)
        self.problem = layout.problem
        self.spans = layout.placement.spans
        self.cache_gb_per_block = layout.problem.cache_sizes
        self.pool = CachePool(layout.cache_gb)
        self.alive = [True] * layout.problem.num_servers
        self.requests: dict[int, PathRequest] = {}
        self.queues: dict[int, deque[int]] = {s.server: deque() for s in self.spans}
        self.holders: dict[int, dict[int, float]] = {s.server: {} for s in self.spans}
        self.unroutable: deque[Job] = deque()
        self.next_attempt: dict[int, int] = {}  # job id → attempt of its next start, once aborted
        self._num_in_service = 0
        if self._choose_hops(1.0) is None:
            raise ValueError(f"{layout.method}: no path over the placement fits one request's cache")

    def path_costs(self, scale: float) -> tuple[HopCost, Callable[[Span], float]]:
        """Hop and exit costs for the next request (holding ``scale`` of s_c per block), given the
        current state."""
        raise NotImplementedError

    def need_gb(self, server: int, num_blocks: int, scale: float = 1.0) -> float:
        """Cache a request holds on a hop of ``num_blocks`` blocks on ``server``: s_c,j · m_ij · scale."""
        return self.cache_gb_per_block[server] * num_blocks * scale

    def scale_of(self, job: Job) -> float:
        """The share of s_c (sized for T tokens) ``job`` holds per block: 1, or d/T with paging."""
        return 1.0 if self.paging is None else self.paging.demand(job) / self.paging.tokens_per_slot

    def _route_within_pools(self, scale: float, live_only: bool) -> tuple[Hop, ...] | None:
        """Any path whose hops' pools could each hold a request of ``scale`` (fewest-blocks costs)."""

        def usable(span: Span, m: int) -> float:
            fits = self.need_gb(span.server, m, scale) <= self.pool.capacity_gb[span.server]
            return 1.0 if fits and (self.alive[span.server] or not live_only) else math.inf

        return shortest_path(self.spans, usable, lambda span: 0.0, self.problem.model.num_blocks)

    def fits(self, job: Job) -> bool:
        """Some path over live servers (over all while none is left: jobs then wait for a restore)
        whose pools could hold ``job`` alone."""
        scale = self.scale_of(job)
        if self._route_within_pools(scale, True) is not None:
            return True
        return self._route_within_pools(0.0, True) is None and self._route_within_pools(scale, False) is not None

    def _choose_hops(self, scale: float) -> tuple[Hop, ...] | None:
        hop_cost, exit_cost = self.path_costs(scale)

        def usable(span: Span, m: int) -> float:
            fits = self.need_gb(span.server, m, scale) <= self.pool.capacity_gb[span.server]
            return hop_cost(span, m) if self.alive[span.server] and fits else math.inf

        return shortest_path(self.spans, usable, exit_cost, self.problem.model.num_blocks)

    def _admit(self, job: Job) -> list[Start]:
        scale = self.scale_of(job)
        hops = self._choose_hops(scale)
        if hops is None:
            self.unroutable.append(job)
            return []
        request = PathRequest(
            job, hops, chain_time_s(self.problem, hops), scale, attempt=self.next_attempt.get(job.job_id, 0)
        )
        self.requests[job.job_id] = request
        return self._advance(request)

    def _advance(self, request: PathRequest) -> list[Start]:
        """Take caches hop by hop until one is full (then wait there) or all are held (then start)."""
        job_id = request.job.job_id
        while request.num_held < len(request.hops):
            hop = request.hops[request.num_held]
            need, queue = self.need_gb(hop.server, hop.num_blocks, request.scale), self.queues[hop.server]
            at_head = bool(queue) and queue[0] == job_id
            if (at_head or not queue) and self.pool.can_allocate(hop.server, need):
                if at_head:
                    queue.popleft()
                self.pool.allocate(hop.server, need)
                self.holders[hop.server][job_id] = need
                request.num_held += 1
                request.waiting_at = None
                continue
            if not at_head:
                queue.append(job_id)
                request.waiting_at = hop.server
            return []
        request.in_service = True
        self._num_in_service += 1
        self.next_attempt.pop(job_id, None)
        return [Start(request.job, Route(request.hops, request.service_time_s, None), request.attempt)]

    def _serve_queue(self, server: int) -> list[Start]:
        starts: list[Start] = []
        queue = self.queues[server]
        while queue:
            head = self.requests[queue[0]]
            need = self.need_gb(server, head.hops[head.num_held].num_blocks, head.scale)
            if not self.pool.can_allocate(server, need):
                break
            starts += self._advance(head)
        return starts

    def _release(self, request: PathRequest) -> None:
        """Free the request's caches, take it out of its wait queue and forget it."""
        job_id = request.job.job_id
        for hop in request.hops[: request.num_held]:
            self.pool.free(hop.server, self.holders[hop.server].pop(job_id))
        if request.waiting_at is not None:
            self.queues[request.waiting_at].remove(job_id)
        del self.requests[job_id]
        if request.in_service:
            self._num_in_service -= 1

    def submit(self, job: Job, now: float) -> list[Start]:
        return self._admit(job)

    def complete(self, job_id: int, now: float, attempt: int | None = None) -> list[Start]:
        request = self.requests.get(job_id)
        if request is None or not request.in_service or attempt not in (None, request.attempt):
            if attempt is None:
                raise KeyError(f"job {job_id} is not in service")
            return []  # a late completion of an aborted or cancelled start
        self._release(request)
        starts: list[Start] = []
        for hop in request.hops:
            starts += self._serve_queue(hop.server)
        return starts

    def cancel(self, job_id: int, now: float) -> list[Start]:
        self.next_attempt.pop(job_id, None)
        request = self.requests.get(job_id)
        if request is None:
            if any(job.job_id == job_id for job in self.unroutable):
                self.unroutable = deque(job for job in self.unroutable if job.job_id != job_id)
            return []
        touched = [h.server for h in request.hops[: request.num_held]]
        if request.waiting_at is not None:
            touched.append(request.waiting_at)
        self._release(request)
        starts: list[Start] = []
        for server in touched:
            starts += self._serve_queue(server)
        return starts

    def abort(self, job_id: int, now: float) -> list[Start]:
        request = self.requests.get(job_id)
        if request is None or not request.in_service:
            raise KeyError(f"job {job_id} is not in service")
        return self._reroute([request], set())

    def fail_server(self, server: int, now: float) -> FailureOutcome:
        if not self.alive[server]:
            return FailureOutcome()
        self.alive[server] = False
        hit = [r for r in self.requests.values() if any(h.server == server for h in r.hops)]
        aborted = tuple(r.job for r in sorted(hit, key=_arrival_key) if r.in_service)
        return FailureOutcome(aborted, tuple(self._reroute(hit, {server})))

    def _reroute(self, requests: list[PathRequest], dead: set[int]) -> list[Start]:
        """Release ``requests``, let the waiters at the freed live servers take the caches, then
        route the requests again in arrival order (an in-service one's next start is a new attempt)."""
        freed: set[int] = set()
        for request in requests:
            freed.update(h.server for h in request.hops[: request.num_held])
            self._release(request)
            if request.in_service:
                self.next_attempt[request.job.job_id] = request.attempt + 1
        starts: list[Start] = []
        for j in sorted(freed - dead):
            starts += self._serve_queue(j)
        for request in sorted(requests, key=_arrival_key):
            starts += self._admit(request.job)
        return starts

    def restore_server(self, server: int, now: float) -> list[Start]:
        if self.alive[server]:
            return []
        self.alive[server] = True
        stranded = sorted(self.unroutable, key=_job_key)
        self.unroutable.clear()
        starts: list[Start] = []
        for job in stranded:
            starts += self._admit(job)
        return starts

    def drain(self) -> list[Job]:
        waiting = [r for r in self.requests.values() if not r.in_service]
        for request in waiting:
            self._release(request)
        jobs = sorted([*(r.job for r in waiting), *self.unroutable], key=_job_key)
        self.unroutable.clear()
        for job in jobs:
            self.next_attempt.pop(job.job_id, None)
        return jobs

    @property
    def num_waiting(self) -> int:
        return len(self.requests) - self._num_in_service + len(self.unroutable)

    @property
    def num_in_service(self) -> int:
        return self._num_in_service
