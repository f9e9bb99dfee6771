"""The dispatcher contract shared by the simulator and the serving runtime (paper §2.4).

A dispatcher owns the online state (queues, jobs in service, cache held) and answers events with
*decisions*: the jobs that start service now and on which route. It has no clock of its own (``now``
is passed in), does no I/O and imports no torch, so the virtual-time simulator and the wall-clock
orchestrator drive the very same object:

* ``submit(job, now)``      → the starts this arrival causes;
* ``complete(job_id, now)`` → the starts the freed capacity causes;
* ``fail_server(server, now)`` → the jobs whose service was aborted (the dispatcher has already put
  them back at the head of its queue, in arrival order: nothing is lost) and any starts.
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

    @classmethod
    def of_chain(cls, index: int, chain: Chain) -> Route:
        return cls(chain.hops, chain.service_time_s, index)


@dataclass(slots=True)
class Start:
    """Decision: ``job`` starts service now on ``route``."""

    job: Job
    route: Route


@dataclass(frozen=True, slots=True)
class FailureOutcome:
    """What a server failure did: aborted jobs (re-queued by the dispatcher) and new starts."""

    aborted: tuple[Job, ...] = ()
    starts: tuple[Start, ...] = field(default=())


class Dispatcher(Protocol):
    """Online load balancer; see the module docstring."""

    name: str

    def submit(self, job: Job, now: float) -> list[Start]: ...

    def complete(self, job_id: int, now: float) -> list[Start]: ...

    def fail_server(self, server: int, now: float) -> FailureOutcome: ...

    @property
    def num_waiting(self) -> int: ...

    @property
    def num_in_service(self) -> int: ...


class ChainState:
    """Occupancy of a plan's chains: Z_k jobs in service against capacity c_k, and liveness.

    Chains are kept in the order given (a plan lists them fastest first).
    """

    def __init__(self, chains: Sequence[Chain]):
        if not chains:
            raise ValueError("chains: a dispatcher needs at least one chain")
        self.chains = tuple(chains)
        self.routes = tuple(Route.of_chain(k, ch) for k, ch in enumerate(self.chains))
        self.capacity = [ch.capacity for ch in self.chains]
        self.busy = [0] * len(self.chains)
        self.alive = [True] * len(self.chains)
        self.held: dict[int, tuple[int, Job]] = {}  # job id → (chain, job) for jobs in service

    def can_start(self, k: int) -> bool:
        return self.alive[k] and self.busy[k] < self.capacity[k]

    def start(self, job: Job, k: int) -> Start:
        if not self.alive[k] or self.busy[k] >= self.capacity[k]:
            raise RuntimeError(f"chain {k} has no free slot")
        self.busy[k] += 1
        self.held[job.job_id] = (k, job)
        return Start(job, self.routes[k])

    def finish(self, job_id: int) -> int:
        """Free the job's slot; returns its chain."""
        held = self.held.pop(job_id, None)
        if held is None:
            raise KeyError(f"job {job_id} is not in service")
        self.busy[held[0]] -= 1
        return held[0]

    def fail_server(self, server: int) -> list[Job]:
        """Mark every chain through ``server`` dead; return its jobs (oldest first), slots freed."""
        for k, ch in enumerate(self.chains):
            if self.alive[k] and server in ch.servers:
                self.alive[k] = False
        aborted = [job for k, job in self.held.values() if not self.alive[k]]
        for job in aborted:
            self.finish(job.job_id)
        return sorted(aborted, key=lambda j: (j.arrived_at, j.job_id))

    @property
    def num_in_service(self) -> int:
        return sum(self.busy)
