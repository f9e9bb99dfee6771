"""BPRR's WS-RR routing (spec §3; arXiv 2512.21884): per request, the shortest path whose hop cost is the
hop's time plus the expected wait until the server has the hop's cache free.

Hop (i, j) running m_ij blocks costs ``τ^c_j + τ^p_j·m_ij + W_j(s_c·m_ij)``. The wait estimate W_j
(:func:`expected_wait_s`) — our reading, the spec leaves it open:

* the request must find ``need`` GB free *after* the requests already queued at j (FIFO) take theirs,
  so the deficit is ``need + queued demand − free``; zero or less means no wait;
* the cache at j is held by requests with exponential service of mean T_q (rate μ_q = 1/T_q, also
  used for holders still acquiring caches further down their paths). By memorylessness, with a set S
  of holders left the next release comes after Exp(Σ_S μ_q). We assume they leave fastest first and
  sum the expected gaps until the released GB cover the deficit: exact when all holders have equal
  rates and holdings (the k-th order statistic of n exponentials), an estimate otherwise;
* if the holders' cache is not enough (queued demand beyond it), the queued requests are taken to
  start once the holders are gone and to release theirs the same way, fastest first. Since every GB
  is free, held or about to be held by the queue, this always covers a hop that fits the pool.

The chosen path then acquires its caches hop by hop, waiting FIFO at a full server
(:mod:`.path_router`); its service time is the paper's T = Σ(τ^c_j + τ^p_j·m_ij).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from chainserve.dispatch.path_router import HopCost, PathRouter
from chainserve.plan.types import MEMORY_EPS_GB, Span


def expected_wait_s(
    deficit_gb: float, holders: Sequence[tuple[float, float]], queued: Sequence[tuple[float, float]] = ()
) -> float:
    """Expected time until ``deficit_gb`` is released: first by the ``holders`` (gb held, release
    rate per s), then by the ``queued`` requests once they hold their cache; each group fastest first.

    >>> expected_wait_s(0.0, [(1.0, 1.0)])
    0.0
    >>> expected_wait_s(2.0, [(1.0, 1.0)] * 3)   # 2nd of 3 Exp(1) departures: 1/3 + 1/2
    0.8333333333333333
    >>> expected_wait_s(2.0, [(1.0, 1.0)], [(1.0, 0.5)])   # the holder (1 s), then the queued one (2 s)
    3.0
    """
    wait = freed = 0.0
    for group in (holders, queued):
        order = sorted(group, key=lambda h: -h[1])
        total_rate = sum(rate for _, rate in order)
        for gb, rate in order:
            if freed >= deficit_gb - MEMORY_EPS_GB:
                return wait
            wait += 1.0 / total_rate
            total_rate -= rate
            freed += gb
    return wait


class WsRrRouter(PathRouter):
    """WS-RR over a BPRR placement (or any :class:`PathPlacement`).

    >>> from chainserve.dispatch.base import Job
    >>> from chainserve.model.spec import ModelSpec, Problem, Server, Workload
    >>> from chainserve.plan.baselines.types import PathPlacement
    >>> from chainserve.plan.types import Placement, Span
    >>> p = Problem((Server("fast", 10, 1.0, 0.0), Server("slow", 10, 2.5, 0.0)),
    ...             ModelSpec("toy", 1, 1.0, 1.0), Workload(0.1))
    >>> r = WsRrRouter(PathPlacement(p, Placement((Span(0, 1, 1), Span(1, 1, 1)), 1), (1.0, 1.0), "bprr"))
    >>> [s.route.hops[0].server for s in r.submit(Job(0, 0.0), 0.0)]   # fast: 1 s
    [0]
    >>> r.submit(Job(1, 0.0), 0.0), r.queues[0]   # fast busy: 1 s + 1 s wait < slow's 2.5 s: wait
    ([], deque([1]))
    >>> [s.route.hops[0].server for s in r.submit(Job(2, 0.0), 0.0)]   # fast: 1 s + 2 s of waits
    [1]
    """

    name = "ws-rr"

    def path_costs(self, scale: float) -> tuple[HopCost, Callable[[Span], float]]:
        servers = self.problem.servers
        waits: dict[tuple[int, int], float] = {}

        def wait_s(j: int, num_blocks: int) -> float:
            if (j, num_blocks) not in waits:
                ahead = [self.requests[q] for q in self.queues[j]]
                queued = [
                    (self.need_gb(j, r.hops[r.num_held].num_blocks, r.scale), 1.0 / r.service_time_s) for r in ahead
                ]
                deficit = self.need_gb(j, num_blocks, scale) + sum(gb for gb, _ in queued) - self.pool.free_gb[j]
                holding = [(gb, 1.0 / self.requests[q].service_time_s) for q, gb in self.holders[j].items()]
                waits[j, num_blocks] = expected_wait_s(deficit, holding, queued)
            return waits[j, num_blocks]

        def hop_cost(span: Span, num_blocks: int) -> float:
            j = span.server
            return servers[j].tau_c_s + servers[j].tau_p_s * num_blocks + wait_s(j, num_blocks)

        return hop_cost, lambda span: 0.0
