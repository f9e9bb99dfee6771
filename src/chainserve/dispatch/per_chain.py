"""Load-balancing baselines with per-chain FIFO queues (paper §3, "Load-balancing baselines").

The paper names SED, speed-aware JSQ, JSQ, JIQ and random over the same chains as JFFC and says no more;
the exact rules below are our reading. Common to all: a job is bound to one chain k when it arrives and
waits in that chain's FIFO queue; chain k serves up to c_k jobs at once (c_k job servers of rate
μ_k = 1/T_k), so a queue is non-empty only while its chain is full. n_k = jobs at chain k (in service
plus queued). Only live chains are candidates ("ties to the fastest" = least T_k, then least index).

On a server failure every chain through it dies; its in-service jobs (reported as aborted) and its
queued jobs are re-assigned, oldest first, by the same rule to the live chains, each entering its new
queue in arrival order. With no live chain left, jobs wait unassigned (still counted as waiting).

Beyond the paper, for a serving runtime: ``abort`` frees the job's slot and re-assigns the job by the
same rule as a failure does (entering its queue in arrival order; the freed slot goes to the head of
its chain's queue); ``cancel`` removes a job from its queue or frees its slot (the head of that
chain's queue takes it); ``restore_server`` revives the chains whose servers are all alive and
assigns the unassigned jobs; queued jobs stay where they are. ``drain`` empties every queue.

With paging (issue 30; :mod:`.base`) chain k serves the head of its queue while its servers have pages
for the head's tokens, and a job is only bound to a live chain whose budget c_k·T could ever hold it
(none: it waits unassigned, as while every chain is dead). The rules still count jobs n_k against c_k,
the expected number of concurrent jobs the plan sized (JIQ's "idle" is "has room for this job").
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence

import numpy as np

from chainserve.dispatch.base import ChainState, FailureOutcome, Job, Start
from chainserve.plan.types import Chain


def _arrival_key(job: Job) -> tuple[float, int]:
    return job.arrived_at, job.job_id


class PerChainDispatcher:
    """Shared machinery: chain occupancy, per-chain FIFO queues, failure re-assignment.

    Subclasses implement ``choose(live, job)``: the chain (index into ``chains``) for ``job``, given
    the indices of the live chains that could hold it, in the order given.
    """

    name: str

    def __init__(self, chains: Sequence[Chain], tokens_per_slot: int | None = None, page_tokens: int = 1):
        self.state = ChainState(chains, tokens_per_slot, page_tokens)
        self.paging = self.state.paging
        self.queues: list[deque[Job]] = [deque() for _ in self.state.chains]
        self.unassigned: deque[Job] = deque()  # only while every chain is dead

    def choose(self, live: list[int], job: Job) -> int:
        raise NotImplementedError

    def fits(self, job: Job) -> bool:
        return self.state.fits(job)

    def num_jobs_at(self, k: int) -> int:
        """n_k: jobs in service on chain k plus jobs queued for it."""
        return self.state.busy[k] + len(self.queues[k])

    def _assign(self, job: Job) -> list[Start]:
        state = self.state
        need = state.demand(job)
        live = [k for k, alive in enumerate(state.alive) if alive and need <= state.budget[k]]
        if not live:
            self.unassigned.append(job)
            return []
        k = self.choose(live, job)
        queue = self.queues[k]
        if not queue and state.can_start(k, job):
            return [self.state.start(job, k)]
        if queue and _arrival_key(job) < _arrival_key(queue[-1]):  # a re-assigned older job
            self.queues[k] = deque(sorted([*queue, job], key=_arrival_key))
        else:
            queue.append(job)
        return []

    def _serve(self, k: int) -> list[Start]:
        """Start the head of chain k's queue in its free slots."""
        queue, starts = self.queues[k], []
        while queue and self.state.can_start(k, queue[0]):
            starts.append(self.state.start(queue.popleft(), k))
        return starts

    def submit(self, job: Job, now: float) -> list[Start]:
        return self._assign(job)

    def complete(self, job_id: int, now: float, attempt: int | None = None) -> list[Start]:
        if attempt is not None and not self.state.is_serving(job_id, attempt):
            return []  # a late completion of an aborted or cancelled start
        return self._serve(self.state.finish(job_id))

    def cancel(self, job_id: int, now: float) -> list[Start]:
        self.state.forget(job_id)
        if job_id in self.state.held:
            return self.complete(job_id, now)
        for k, queue in enumerate((*self.queues, self.unassigned)):
            for i, job in enumerate(queue):
                if job.job_id == job_id:
                    del queue[i]  # with paging, the jobs behind a long head may fit
                    return self._serve(k) if queue is not self.unassigned else []
        return []

    def abort(self, job_id: int, now: float) -> list[Start]:
        k, job = self.state.abort(job_id)
        starts = self._assign(job)  # sees chain k's freed slot; if it picks k, by arrival order
        return starts + self._serve(k)

    def fail_server(self, server: int, now: float) -> FailureOutcome:
        aborted = self.state.fail_server(server)
        stranded = list(aborted)
        for k, alive in enumerate(self.state.alive):
            if not alive and self.queues[k]:
                stranded.extend(self.queues[k])
                self.queues[k].clear()
        starts = [s for job in sorted(stranded, key=_arrival_key) for s in self._assign(job)]
        return FailureOutcome(tuple(aborted), tuple(starts))

    def restore_server(self, server: int, now: float) -> list[Start]:
        if not self.state.restore_server(server) or not self.unassigned:
            return []
        stranded = sorted(self.unassigned, key=_arrival_key)
        self.unassigned.clear()
        return [s for job in stranded for s in self._assign(job)]

    def drain(self) -> list[Job]:
        jobs = sorted((job for queue in (*self.queues, self.unassigned) for job in queue), key=_arrival_key)
        for queue in (*self.queues, self.unassigned):
            queue.clear()
        for job in jobs:
            self.state.forget(job.job_id)
        return jobs

    @property
    def num_waiting(self) -> int:
        return sum(len(q) for q in self.queues) + len(self.unassigned)

    @property
    def num_in_service(self) -> int:
        return self.state.num_in_service

    def _fastest(self, candidates: list[int]) -> int:
        chains = self.state.chains
        return min(candidates, key=lambda k: (chains[k].service_time_s, k))

    def _least_jobs_per_slot(self, live: list[int]) -> list[int]:
        """The live chains with the least n_k/c_k (exact: small integers divide to distinct floats)."""
        load = {k: self.num_jobs_at(k) / self.state.capacity[k] for k in live}
        least = min(load.values())
        return [k for k in live if load[k] == least]


class SED(PerChainDispatcher):
    """Shortest expected delay: the chain minimising T_k + max(0, n_k + 1 − c_k)/(c_k μ_k), the mean
    response of the new job there (it starts at once if n_k < c_k, else after n_k + 1 − c_k departures
    at rate c_k μ_k); ties to the fastest chain.

    >>> from chainserve.plan.types import Chain, Hop
    >>> d = SED([Chain((Hop(0, 1, 1),), 1.0, 1), Chain((Hop(1, 1, 1),), 3.0, 2)])
    >>> [s.route.chain for i in range(4) for s in d.submit(Job(i, 0.0), 0.0)]  # 1; 2 vs 3; 3 vs 3; 4 vs 3
    [0, 1]
    """

    name = "sed"

    def choose(self, live: list[int], job: Job) -> int:
        chains, cap = self.state.chains, self.state.capacity

        def expected_s(k: int) -> float:
            behind = max(0, self.num_jobs_at(k) + 1 - cap[k])
            return chains[k].service_time_s * (1.0 + behind / cap[k])

        return min(live, key=lambda k: (expected_s(k), chains[k].service_time_s, k))


class SpeedAwareJSQ(PerChainDispatcher):
    """Speed-aware JSQ: the chain with the least jobs per job server n_k/c_k; ties to the fastest."""

    name = "sa-jsq"

    def choose(self, live: list[int], job: Job) -> int:
        return self._fastest(self._least_jobs_per_slot(live))


class RandomisedDispatcher(PerChainDispatcher):
    """A per-chain policy that breaks ties (or chooses) at random with ``rng``."""

    def __init__(
        self,
        chains: Sequence[Chain],
        rng: np.random.Generator,
        tokens_per_slot: int | None = None,
        page_tokens: int = 1,
    ):
        super().__init__(chains, tokens_per_slot, page_tokens)
        self.rng = rng


class JSQ(RandomisedDispatcher):
    """JSQ: the chain with the least jobs per job server n_k/c_k; ties uniformly at random."""

    name = "jsq"

    def choose(self, live: list[int], job: Job) -> int:
        least = self._least_jobs_per_slot(live)
        return least[int(self.rng.integers(len(least)))]


class JIQ(RandomisedDispatcher):
    """Join-idle-queue: uniformly at random among chains with an idle job server (room for the job); if none,
    uniformly at random among all live chains."""

    name = "jiq"

    def choose(self, live: list[int], job: Job) -> int:
        idle = [k for k in live if self.state.can_start(k, job)] or live
        return idle[int(self.rng.integers(len(idle)))]


class RandomDispatch(RandomisedDispatcher):
    """Random: uniformly among the live chains, blind to speed, capacity and load (so it is unstable
    once λ/K exceeds some chain's c_k μ_k, even when λ < ν)."""

    name = "random"

    def choose(self, live: list[int], job: Job) -> int:
        return live[int(self.rng.integers(len(live)))]
