"""The dispatcher contract shared by the simulator and the serving runtime (paper §2.4).

A dispatcher owns the online state (queues, jobs in service, cache held) and answers events with
*decisions*: the jobs that start service now and on which route. It has no clock of its own (``now``
is passed in), does no I/O and imports no torch, so the virtual-time simulator and the wall-clock
orchestrator drive the very same object:

* ``submit(job, now)`` → the starts this arrival causes;
* ``complete(job_id, now, attempt=None)`` → the starts the freed capacity causes. With ``attempt``
  given, a completion of a start that is no longer in service (aborted, cancelled, failed: a late
  message) is ignored and returns ``[]``; without it, a job not in service raises ``KeyError``;
* ``cancel(job_id, now)`` → the job leaves wherever it is (waiting, acquiring caches, in service:
  its capacity is freed) and the starts the freed capacity causes; an unknown or finished job: ``[]``;
* ``abort(job_id, now)`` → one start of an in-service job failed (a server refused it): its capacity
  is freed, the job goes back to the head of the queue (each policy says where exactly) and the
  starts that follow are returned, possibly the same job again; not in service: ``KeyError``;
* ``fail_server(server, now)`` → the jobs whose service was aborted (the dispatcher has already put
  them back at the head of its queue, in arrival order: nothing is lost) and any starts;
* ``restore_server(server, now)`` → a failed server is back: every route whose servers are all alive
  again is usable; the starts that follow. Restoring a live server does nothing and returns ``[]``;
* ``drain()`` → removes and returns every *waiting* job (queue order), to hand them to another
  dispatcher; jobs in service stay.

Each :class:`Start` carries ``attempt``: 0 for a job's first start, +1 for each later start of the
same job (after ``abort`` or a failure), so that a driver can tell a late completion from a current
one. Attempts count the starts this dispatcher made: ``drain`` and ``cancel`` forget the job.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

from chainserve.plan.types import Chain, Hop


# Job and Start are made on every event of the simulator's hot path: slotted but not frozen (a frozen
# dataclass's __init__ costs ~2× more, ~30 % of simulated throughput). Treat them as read-only.
@dataclass(slots=True)
class Job:
    """A request: id, arrival time and its token lengths (l_in, l_out)."""

    job_id: int
    arrived_at: float
    prompt_tokens: int = 2000
    output_tokens: int = 20


@dataclass(frozen=True, slots=True)
class Route:
    """Where a job is served: its hops, the mean service time T on them, and the plan's chain index
    (``None`` for routers that compose a path per request)."""

    hops: tuple[Hop, ...]
    service_time_s: float
    chain: int | None = None

    @property
    def servers(self) -> tuple[int, ...]:
        return tuple(h.server for h in self.hops)

    @classmethod
    def of_chain(cls, index: int, chain: Chain) -> Route:
        return cls(chain.hops, chain.service_time_s, index)


@dataclass(slots=True)
class Start:
    """Decision: ``job`` starts service now on ``route``, for the ``attempt``-th time (0: first)."""

    job: Job
    route: Route
    attempt: int = 0


@dataclass(frozen=True, slots=True)
class FailureOutcome:
    """What a server failure did: aborted jobs (re-queued by the dispatcher) and new starts."""

    aborted: tuple[Job, ...] = ()
    starts: tuple[Start, ...] = field(default=())


class Dispatcher(Protocol):
    """Online load balancer; see the module docstring. ``state``: the occupancy of the plan's chains
    (busy, capacity, alive per chain), which drivers report; ``None`` for routers that compose a path
    per request."""

    name: str
    state: ChainState | None

    def submit(self, job: Job, now: float) -> list[Start]: ...

    def complete(self, job_id: int, now: float, attempt: int | None = None) -> list[Start]: ...

    def cancel(self, job_id: int, now: float) -> list[Start]: ...

    def abort(self, job_id: int, now: float) -> list[Start]: ...

    def fail_server(self, server: int, now: float) -> FailureOutcome: ...

    def restore_server(self, server: int, now: float) -> list[Start]: ...

    def drain(self) -> list[Job]: ...

    @property
    def num_waiting(self) -> int: ...

    @property
    def num_in_service(self) -> int: ...


class ChainState:
    """Occupancy of a plan's chains: Z_k jobs in service against capacity c_k, liveness, and the
    attempt number of each job's next start.

    Chains are kept in the order given (a plan lists them fastest first). A chain is alive while
    none of its servers has failed.
    """

    def __init__(self, chains: Sequence[Chain]):
        if not chains:
            raise ValueError("chains: a dispatcher needs at least one chain")
        self.chains = tuple(chains)
        self.routes = tuple(Route.of_chain(k, ch) for k, ch in enumerate(self.chains))
        self.capacity = [ch.capacity for ch in self.chains]
        self.busy = [0] * len(self.chains)
        self.alive = [True] * len(self.chains)
        self.failed: set[int] = set()
        self.held: dict[int, tuple[int, Job, int]] = {}  # job id → (chain, job, attempt) in service
        self.next_attempt: dict[int, int] = {}  # job id → attempt of its next start, once aborted

    def can_start(self, k: int) -> bool:
        return self.alive[k] and self.busy[k] < self.capacity[k]

    def start(self, job: Job, k: int) -> Start:
        if not self.alive[k] or self.busy[k] >= self.capacity[k]:
            raise RuntimeError(f"chain {k} has no free slot")
        self.busy[k] += 1
        attempt = self.next_attempt.pop(job.job_id, 0) if self.next_attempt else 0
        self.held[job.job_id] = (k, job, attempt)
        return Start(job, self.routes[k], attempt)

    def is_serving(self, job_id: int, attempt: int) -> bool:
        """Whether ``job_id`` is in service under ``attempt``."""
        held = self.held.get(job_id)
        return held is not None and held[2] == attempt

    def finish(self, job_id: int) -> int:
        """Free the job's slot; returns its chain."""
        held = self.held.pop(job_id, None)
        if held is None:
            raise KeyError(f"job {job_id} is not in service")
        self.busy[held[0]] -= 1
        return held[0]

    def abort(self, job_id: int) -> tuple[int, Job]:
        """Free the slot of an in-service job that will be started again; returns (chain, job)."""
        held = self.held.get(job_id)
        if held is None:
            raise KeyError(f"job {job_id} is not in service")
        k, job, attempt = held
        self.finish(job_id)
        self.next_attempt[job_id] = attempt + 1
        return k, job

    def forget(self, job_id: int) -> None:
        """Drop the attempt count of a job that leaves this dispatcher (cancelled or drained)."""
        self.next_attempt.pop(job_id, None)

    def fail_server(self, server: int) -> list[Job]:
        """Mark every chain through ``server`` dead; return its jobs (oldest first), slots freed."""
        self.failed.add(server)
        for k, ch in enumerate(self.chains):
            if self.alive[k] and server in ch.servers:
                self.alive[k] = False
        aborted = [job for k, job, _ in self.held.values() if not self.alive[k]]
        for job in aborted:
            self.abort(job.job_id)
        return sorted(aborted, key=lambda j: (j.arrived_at, j.job_id))

    def restore_server(self, server: int) -> list[int]:
        """``server`` is back: revive every dead chain none of whose servers is still failed; returns
        the revived chains (a live server: none)."""
        if server not in self.failed:
            return []
        self.failed.discard(server)
        revived = [
            k for k, ch in enumerate(self.chains) if not self.alive[k] and not self.failed.intersection(ch.servers)
        ]
        for k in revived:
            self.alive[k] = True
        return revived

    @property
    def num_in_service(self) -> int:
        return sum(self.busy)
