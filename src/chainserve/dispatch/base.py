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
  dispatcher; jobs in service stay;
* ``fits(job)`` → whether some live chain (path) could ever hold the job's KV cache: ``False`` means
  it would wait forever, so a runtime refuses it at once (always ``True`` under the paper's model;
  for chains, ``state.max_job_tokens`` is the longest demand that fits, to name in the refusal).

**KV cache by slots or by tokens.** ``paging`` is ``None`` for the paper's model (§2.1): a job takes
one of chain k's c_k slots, each sized for ``model.max_tokens`` T. With a :class:`Paging` (issue 30:
block servers page the cache by tokens) chain k instead has a budget of c_k·T tokens and a job
reserves, on admission, its own prompt + output tokens rounded up to whole pages of P tokens (its
*demand*). A block server pages each job separately, so Σ ⌈T_i/P⌉ pages must fit where the plan
reserved c_k·T/P per chain: the rounding makes every server's pages suffice whenever every chain
keeps to its budget. Jobs of length T (P dividing T) take exactly one slot each: the two models agree.

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
class Paging:
    """KV cache by tokens (module docstring): ``tokens_per_slot`` T, the tokens one of c_k's slots was
    sized for (the plan's ``model.max_tokens``), and ``page_tokens`` P, a block server's page size.

    >>> Paging(2048, 16).demand(Job(0, 0.0, 100, 20)), Paging(2048).demand(Job(0, 0.0, 100, 20))
    (128, 120)
    """

    tokens_per_slot: int
    page_tokens: int = 1

    def __post_init__(self) -> None:
        if self.tokens_per_slot < 1 or self.page_tokens < 1:
            raise ValueError(f"paging: need tokens_per_slot ≥ 1 and page_tokens ≥ 1, got {self}")

    def demand(self, job: Job) -> int:
        """Tokens ``job`` reserves: prompt + output, rounded up to whole pages."""
        page = self.page_tokens
        return -(-(job.prompt_tokens + job.output_tokens) // page) * page


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
    paging: Paging | None

    def fits(self, job: Job) -> bool: ...

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
    """Occupancy of a plan's chains: Z_k jobs in service (``busy``) against capacity c_k, the cache
    they hold (``used``) against each chain's ``budget``, liveness, and the attempt number of each
    job's next start.

    ``used`` and ``budget`` count slots under the paper's model (``tokens_per_slot=None``: a job uses
    1 of c_k; ``used`` is then ``busy`` itself) and tokens with paging (a job uses its demand of
    c_k·``tokens_per_slot``; see the module docstring). Chains are kept in the order given (a plan
    lists them fastest first). A chain is alive while none of its servers has failed.

    >>> from chainserve.plan.types import Chain, Hop
    >>> state = ChainState([Chain((Hop(0, 1, 1),), 1.0, 2)], tokens_per_slot=100, page_tokens=10)
    >>> [state.start(Job(i, 0.0, 30, 10), 0).route.chain for i in range(5)]   # 5 × 40 ≤ 2 × 100
    [0, 0, 0, 0, 0]
    >>> state.busy, state.used, state.can_start(0, Job(5, 0.0, 1, 1))
    ([5], [200], False)
    """

    def __init__(self, chains: Sequence[Chain], tokens_per_slot: int | None = None, page_tokens: int = 1):
        if not chains:
            raise ValueError("chains: a dispatcher needs at least one chain")
        self.chains = tuple(chains)
        self.routes = tuple(Route.of_chain(k, ch) for k, ch in enumerate(self.chains))
        self.capacity = [ch.capacity for ch in self.chains]
        self.busy = [0] * len(self.chains)
        self.paging = None if tokens_per_slot is None else Paging(tokens_per_slot, page_tokens)
        if self.paging is None:
            self.budget, self.used = self.capacity, self.busy
        else:
            self.budget, self.used = [c * tokens_per_slot for c in self.capacity], [0] * len(self.chains)
        self.alive = [True] * len(self.chains)
        self.failed: set[int] = set()
        self.held: dict[int, tuple[int, Job, int]] = {}  # job id → (chain, job, attempt) in service
        self.next_attempt: dict[int, int] = {}  # job id → attempt of its next start, once aborted
        self.max_job_tokens: int | None = None
        self._set_max_job_tokens()

    def demand(self, job: Job) -> int:
        """What ``job`` uses of a chain's budget: 1 slot, or its tokens in whole pages."""
        return 1 if self.paging is None else self.paging.demand(job)

    def can_start(self, k: int, job: Job) -> bool:
        """Chain k is alive and has room for ``job`` (a slot, or pages for its tokens)."""
        return self.alive[k] and self.used[k] + self.demand(job) <= self.budget[k]

    def fits(self, job: Job) -> bool:
        """Some live chain could hold ``job`` alone (its demand ≤ :attr:`max_job_tokens`), so it will
        not wait forever; always under the paper's model."""
        return self.paging is None or self.paging.demand(job) <= self.max_job_tokens

    def _set_max_job_tokens(self) -> None:
        """``max_job_tokens``: the most tokens (in whole pages) one job may reserve, the largest budget
        of a live chain (of every chain while none is alive: jobs then wait for a restore); ``None``
        under the paper's model. A runtime names it when it refuses a job."""
        if self.paging is not None:
            live = [b for b, alive in zip(self.budget, self.alive, strict=True) if alive]
            self.max_job_tokens = max(live or self.budget)

    def start(self, job: Job, k: int) -> Start:
        paging = self.paging  # the simulator's hot path: can_start inlined, slots first
        if paging is None:
            if not self.alive[k] or self.busy[k] >= self.capacity[k]:
                raise RuntimeError(f"chain {k} has no free slot")
        else:
            need = paging.demand(job)
            if not self.alive[k] or self.used[k] + need > self.budget[k]:
                raise RuntimeError(f"chain {k} has no pages for job {job.job_id}'s {need} tokens")
            self.used[k] += need
        self.busy[k] += 1
        attempt = self.next_attempt.pop(job.job_id, 0) if self.next_attempt else 0
        self.held[job.job_id] = (k, job, attempt)
        return Start(job, self.routes[k], attempt)

    def is_serving(self, job_id: int, attempt: int) -> bool:
        """Whether ``job_id`` is in service under ``attempt``."""
        held = self.held.get(job_id)
        return held is not None and held[2] == attempt

    def finish(self, job_id: int) -> int:
        """Free the job's slot (or pages); returns its chain."""
        held = self.held.pop(job_id, None)
        if held is None:
            raise KeyError(f"job {job_id} is not in service")
        k = held[0]
        self.busy[k] -= 1
        if self.paging is not None:
            self.used[k] -= self.paging.demand(held[1])
        return k

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
        self._set_max_job_tokens()
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
        self._set_max_job_tokens()
        return revived

    @property
    def num_in_service(self) -> int:
        return sum(self.busy)
