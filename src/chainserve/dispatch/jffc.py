"""JFFC: Join-the-Fastest-Free-Chain with one central FIFO queue (paper §2.4), and its threshold
variant (beyond the paper; Lin & Kumar 1984): chain k takes a waiting job only while more than
``thresholds[k]`` jobs wait. All-zero thresholds are plain JFFC. After a failure the fastest live
chain's threshold drops to 0, so no queue is left waiting beside free slots.
"""

from __future__ import annotations

import heapq
from collections import deque
from collections.abc import Sequence

from chainserve.dispatch.base import ChainState, FailureOutcome, Job, Start
from chainserve.plan.types import Chain


class JFFC:
    """Central FIFO queue; a job goes to the fastest chain with Z_k < c_k (and queue > threshold_k).

    Work-conserving with zero thresholds, hence stable for every λ < ν. On a completion at chain k
    the head of the queue starts on k (it is then the only free chain). Free job slots sit in a heap
    keyed by chain speed rank, so an event costs O(log C). Thresholds must not decrease from faster
    to slower chains: then the fastest free slot is also the one with the lowest threshold.

    >>> from chainserve.plan.types import Chain, Hop
    >>> fast, slow = Chain((Hop(0, 1, 2),), 1.0, 1), Chain((Hop(1, 1, 2),), 2.0, 1)
    >>> d = JFFC([fast, slow])
    >>> [s.route.chain for s in d.submit(Job(0, 0.0), 0.0) + d.submit(Job(1, 0.1), 0.1)]
    [0, 1]
    >>> d.submit(Job(2, 0.2), 0.2), d.num_waiting
    ([], 1)
    >>> [(s.job.job_id, s.route.chain) for s in d.complete(1, 0.5)]
    [(2, 1)]
    """

    name = "jffc"

    def __init__(self, chains: Sequence[Chain], thresholds: Sequence[int] | None = None):
        self.state = ChainState(chains)
        chains = self.state.chains
        self.order = tuple(sorted(range(len(chains)), key=lambda k: (chains[k].service_time_s, k)))
        self.rank = {k: r for r, k in enumerate(self.order)}
        if thresholds is not None and (len(thresholds) != len(chains) or any(t < 0 for t in thresholds)):
            raise ValueError("thresholds: need one non-negative integer per chain")
        by_rank = tuple(thresholds[k] for k in self.order) if thresholds is not None else (0,) * len(chains)
        if any(a > b for a, b in zip(by_rank, by_rank[1:], strict=False)):
            raise ValueError("thresholds: must not decrease from faster to slower chains")
        self.threshold_by_rank = by_rank
        if any(by_rank):
            self.name = "threshold-jffc"
        self.free_slots = [r for r, k in enumerate(self.order) for _ in range(chains[k].capacity)]
        heapq.heapify(self.free_slots)
        self.queue: deque[Job] = deque()

    def _fill(self) -> list[Start]:
        queue = self.queue
        if not queue:  # most completions: nothing waits
            return []
        starts: list[Start] = []
        free, alive = self.free_slots, self.state.alive
        while queue and free and len(queue) > self.threshold_by_rank[free[0]]:
            k = self.order[heapq.heappop(free)]
            if alive[k]:
                starts.append(self.state.start(queue.popleft(), k))
        return starts

    def submit(self, job: Job, now: float) -> list[Start]:
        self.queue.append(job)
        return self._fill()

    def complete(self, job_id: int, now: float) -> list[Start]:
        heapq.heappush(self.free_slots, self.rank[self.state.finish(job_id)])
        return self._fill()

    def fail_server(self, server: int, now: float) -> FailureOutcome:
        aborted = self.state.fail_server(server)
        # The fastest live chain must take jobs at any queue length, or a queue no longer than the
        # survivors' thresholds would wait forever; dead ranks faster than it get 0 too, so that the
        # fastest free slot (live or dead) still has the lowest threshold.
        first_live = next((r for r, k in enumerate(self.order) if self.state.alive[k]), None)
        if first_live is not None:
            self.threshold_by_rank = (0,) * (first_live + 1) + self.threshold_by_rank[first_live + 1 :]
        self.queue.extendleft(reversed(aborted))
        return FailureOutcome(tuple(aborted), tuple(self._fill()))

    @property
    def num_waiting(self) -> int:
        return len(self.queue)

    @property
    def num_in_service(self) -> int:
        return self.state.num_in_service
