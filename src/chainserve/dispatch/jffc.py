"""JFFC: Join-the-Fastest-Free-Chain with one central FIFO queue (paper §2.4), and its threshold
variant (beyond the paper; Lin & Kumar 1984): chain k takes a waiting job only while more than
``thresholds[k]`` jobs wait. All-zero thresholds are plain JFFC. The thresholds in force are always
the configured ones with every rank up to the fastest live chain set to 0: after a failure the fastest
live chain takes jobs at any queue length, so no queue is left waiting beside free slots, and once
the failed servers are restored the configured thresholds return.

Beyond §2.4, for a serving runtime: ``cancel`` removes a job from the queue or frees its slot;
``abort`` frees its slot and puts the job back in the central queue in arrival order (ahead of every
job that arrived after it, so an aborted job is never overtaken); ``restore_server``
gives the revived chains' slots back; ``drain`` empties the queue.

With paging (issue 30; :mod:`.base`), a chain is *free for a job* when its servers have pages for the
job's own tokens (its token budget c_k·T is not exceeded), so a chain may hold more than c_k short
jobs, or fewer long ones. JFFC stays FCFS: the head of the queue goes to the fastest chain with pages
for it, and while no live chain has them it waits, and so does every job behind it (a job that no
live chain could ever hold: ``fits`` is ``False``, and a runtime refuses it instead of queueing it).
"""

from __future__ import annotations

import bisect
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
    to slower chains: then the fastest free slot is also the one with the lowest threshold. With
    paging (``tokens_per_slot``, ``page_tokens``: :class:`~.base.ChainState`) the head goes to the
    fastest live chain with room for its tokens, found by a scan: O(K) per start.

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

    def __init__(
        self,
        chains: Sequence[Chain],
        thresholds: Sequence[int] | None = None,
        tokens_per_slot: int | None = None,
        page_tokens: int = 1,
    ):
        self.state = ChainState(chains, tokens_per_slot, page_tokens)
        self.paging = self.state.paging
        chains = self.state.chains
        self.order = tuple(sorted(range(len(chains)), key=lambda k: (chains[k].service_time_s, k)))
        self.rank = {k: r for r, k in enumerate(self.order)}
        if thresholds is not None and (len(thresholds) != len(chains) or any(t < 0 for t in thresholds)):
            raise ValueError("thresholds: need one non-negative integer per chain")
        by_rank = tuple(thresholds[k] for k in self.order) if thresholds is not None else (0,) * len(chains)
        if any(a > b for a, b in zip(by_rank, by_rank[1:], strict=False)):
            raise ValueError("thresholds: must not decrease from faster to slower chains")
        self.configured_by_rank = self.threshold_by_rank = by_rank
        if any(by_rank):
            self.name = "threshold-jffc"
        # slots: the live chains' free slots by speed rank (paging: unused, a scan finds room by tokens)
        self.free_slots = [r for r, k in enumerate(self.order) for _ in range(0 if self.paging else chains[k].capacity)]
        heapq.heapify(self.free_slots)
        self.queue: deque[Job] = deque()

    def fits(self, job: Job) -> bool:
        return self.state.fits(job)

    def _fill(self) -> list[Start]:
        queue = self.queue
        if not queue:  # most completions: nothing waits
            return []
        if self.paging is not None:
            return self._fill_by_tokens()
        starts: list[Start] = []
        free = self.free_slots  # live chains' free slots only: fail_server removes the dead ones'
        while queue and free and len(queue) > self.threshold_by_rank[free[0]]:
            starts.append(self.state.start(queue.popleft(), self.order[heapq.heappop(free)]))
        return starts

    def _fill_by_tokens(self) -> list[Start]:
        """The head of the queue to the fastest live chain with room for its tokens, while one has."""
        queue, state, order = self.queue, self.state, self.order
        alive, used, budget = state.alive, state.used, state.budget
        starts: list[Start] = []
        while queue:
            need = state.demand(queue[0])
            for k in order:  # fastest first
                if used[k] + need <= budget[k] and alive[k]:
                    break
            else:
                break  # no live chain has room for the head: it waits, and the jobs behind it
            if len(queue) <= self.threshold_by_rank[self.rank[k]]:
                break
            starts.append(state.start(queue.popleft(), k))
        return starts

    def submit(self, job: Job, now: float) -> list[Start]:
        self.queue.append(job)
        return self._fill()

    def complete(self, job_id: int, now: float, attempt: int | None = None) -> list[Start]:
        if attempt is not None and not self.state.is_serving(job_id, attempt):
            return []  # a late completion of an aborted or cancelled start
        k = self.state.finish(job_id)
        if self.paging is None:
            heapq.heappush(self.free_slots, self.rank[k])
        return self._fill()

    def cancel(self, job_id: int, now: float) -> list[Start]:
        self.state.forget(job_id)
        if job_id in self.state.held:
            return self.complete(job_id, now)
        for i, job in enumerate(self.queue):
            if job.job_id == job_id:
                del self.queue[i]
                return self._fill()  # with paging, the jobs behind a long head may fit
        return []

    def abort(self, job_id: int, now: float) -> list[Start]:
        k, job = self.state.abort(job_id)
        if self.paging is None:
            heapq.heappush(self.free_slots, self.rank[k])
        self._requeue([job])
        return self._fill()

    def fail_server(self, server: int, now: float) -> FailureOutcome:
        aborted = self.state.fail_server(server)
        alive = self.state.alive
        self.free_slots = [r for r in self.free_slots if alive[self.order[r]]]  # dead chains' free slots
        heapq.heapify(self.free_slots)
        self._set_thresholds()
        self._requeue(aborted)
        return FailureOutcome(tuple(aborted), tuple(self._fill()))

    def _requeue(self, jobs: Sequence[Job]) -> None:
        """Jobs that left service wait again, each ahead of the jobs that arrived after it."""
        for job in jobs:
            at = bisect.bisect_left(self.queue, _arrival(job), key=_arrival)
            self.queue.insert(at, job)

    def restore_server(self, server: int, now: float) -> list[Start]:
        revived = self.state.restore_server(server)
        if not revived:
            return []
        for k in revived if self.paging is None else ():  # a dead chain holds no job nor free slot
            for _ in range(self.state.capacity[k] - self.state.busy[k]):
                heapq.heappush(self.free_slots, self.rank[k])
        self._set_thresholds()
        return self._fill()

    def drain(self) -> list[Job]:
        jobs = list(self.queue)
        self.queue.clear()
        for job in jobs:
            self.state.forget(job.job_id)
        return jobs

    def _set_thresholds(self) -> None:
        """The configured thresholds, with 0 up to the fastest live chain's rank: it must take jobs at
        any queue length, or a queue no longer than the survivors' thresholds would wait forever (0 for
        the dead ranks before it keeps thresholds non-decreasing)."""
        first_live = next((r for r, k in enumerate(self.order) if self.state.alive[k]), None)
        configured = self.configured_by_rank
        if first_live is not None:
            self.threshold_by_rank = (0,) * (first_live + 1) + configured[first_live + 1 :]

    @property
    def num_waiting(self) -> int:
        return len(self.queue)

    @property
    def num_in_service(self) -> int:
        return self.state.num_in_service


def _arrival(job: Job) -> tuple[float, int]:
    return job.arrived_at, job.job_id
