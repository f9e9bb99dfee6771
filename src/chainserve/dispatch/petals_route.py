"""PETALS' client-side routing (spec §3), modelled on ``client/routing/sequence_manager.py``.

What PETALS does for an inference session (``make_sequence(mode="min_latency",
cache_tokens_needed=max_length)``): Dijkstra over a graph of (server, block) nodes whose edge costs are
the latency of one generation step —

* client → first server, and server → next server: half the measured RTT (``rtt/2``, 0.15 s when
  unknown, at most 5 s) plus 18 ms of serialisation overhead;
* each block on a server: ``1 / inference_rps``, the server's measured per-block decode time;
* last server → client: half its RTT (no overhead);
* a switch to another server is only allowed at the end of the current server's span (a server is
  always run to its last block), entering the next one at any of its blocks;
* 10 s more on every edge into a server whose announced free cache cannot hold the session on its
  *whole* span (PETALS' deliberately pessimistic check: it does not yet know how many of the span's
  blocks the path will use).

Our model: one job makes n = ``output_tokens`` round trips (one per generated token), so one step costs
a job ``τ^p_j / n`` per block; the RTT is ``Server.rtt_s`` when known, else recovered from
``τ^c_j = (RTT + 18 ms)·n``. We have no server-to-server RTTs, so a hop into server j costs half of j's
RTT to the client. The free cache is read from the pool now (PETALS reads announcements that may be a
minute old). The chosen path then acquires its caches hop by hop (:mod:`.path_router`); its service
time is the paper's ``T = Σ(τ^c_j + τ^p_j·m_ij)``, the same model as every other method's.
"""

from __future__ import annotations

from collections.abc import Callable

from chainserve.dispatch.path_router import HopCost, PathRouter
from chainserve.model.catalogue import HOP_OVERHEAD_S
from chainserve.plan.baselines.types import PathPlacement
from chainserve.plan.types import Span

#: PETALS' ``alloc_delay``: penalty (s) on an edge into a server without free cache for the session.
ALLOC_PENALTY_S = 10.0


class PetalsRouter(PathRouter):
    """Per-request minimum-latency path with PETALS' step costs and cache penalty.

    >>> from chainserve.dispatch.base import Job
    >>> from chainserve.model.spec import ModelSpec, Problem, Server, Workload
    >>> from chainserve.plan.types import Placement, Span
    >>> p = Problem((Server("fast", 10, 1.0, 0.0, rtt_s=0.0), Server("slow", 10, 2.0, 0.0, rtt_s=0.0)),
    ...             ModelSpec("toy", 2, 1.0, 1.0), Workload(0.1, output_tokens=1))
    >>> layout = PathPlacement(p, Placement((Span(0, 1, 2), Span(1, 1, 2)), 2), (2.0, 2.0), "petals")
    >>> r = PetalsRouter(layout)
    >>> [s.route.hops[0].server for s in r.submit(Job(0, 0.0), 0.0) + r.submit(Job(1, 0.0), 0.0)]
    [0, 1]
    """

    name = "petals"

    def __init__(self, layout: PathPlacement, tokens_per_slot: int | None = None, page_tokens: int = 1):
        problem = layout.problem
        steps = problem.workload.output_tokens
        rtts = [
            s.rtt_s if s.rtt_s is not None else max(s.tau_c_s / steps - HOP_OVERHEAD_S, 0.0) for s in problem.servers
        ]
        self.enter_s = [rtt / 2 + HOP_OVERHEAD_S for rtt in rtts]
        self.exit_s = [rtt / 2 for rtt in rtts]
        self.block_s = [s.tau_p_s / steps for s in problem.servers]
        super().__init__(layout, tokens_per_slot, page_tokens)

    def path_costs(self, scale: float) -> tuple[HopCost, Callable[[Span], float]]:
        def hop_cost(span: Span, num_blocks: int) -> float:
            j = span.server
            has_cache = self.pool.can_allocate(j, self.need_gb(j, span.num_blocks, scale))
            penalty = 0.0 if has_cache else ALLOC_PENALTY_S
            return self.enter_s[j] + self.block_s[j] * num_blocks + penalty

        return hop_cost, lambda span: self.exit_s[span.server]
