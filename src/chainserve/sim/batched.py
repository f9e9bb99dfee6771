"""Iteration-level simulation of batched serving (issue 18): ``simulate(..., service="batched")``.

The job-level models of :mod:`.service` give a job one duration when it starts. Here a job is its
l_out forward steps (one prefill, l_out − 1 decodes), and each step walks its route hop by hop the way
the runtime moves it (:mod:`chainserve.runtime.jobs`): the orchestrator sends the step to the hop's
block server, the server computes it in an iteration, the reply comes back after the hop's
communication time, the next hop follows; after the last hop the orchestrator's LM head samples the
token and the next step begins.

A server with a step cost (:mod:`chainserve.model.step_cost`) batches as the block server's
:class:`~chainserve.runtime.batching.Batcher` does: steps that arrive while an iteration runs wait;
the next iteration takes the oldest waiting step and every later one within ``max_batch_tokens``
(a decode counts one token); prompts go in chunks of ``max_batch_tokens // 2`` tokens, one chunk per
iteration, and the step moves on after its last chunk. The iteration costs
``m·(max(α, α') + β·b + β'·q)`` (:meth:`StepCost.iteration_s`). A server without one serves every
step at once in ``m_ij·τ^p_j / l̄_out`` (the emulated backend's model, no batching). The orchestrator's
head batches likewise with ``Problem.head_cost`` (free without it). Communication per hop and step is
``τ^c_j / l̄_out`` plus ``hop_overhead_s``, and does not hold the server. Servers (and the head) that
share a machine may share its cores (``BatchedService.hosts``: processor sharing, issue 31).

The model is a service component of the simulator's one event loop (:mod:`.loop`, issue 31), which
owns dispatch (a job's route comes from ``submit``/``complete``, as in the runtime) and the KV cache
a job holds from start to its last token. Its own events — iteration ends, a batch's replies back,
iteration starts — and its stations, queues and per-job step state live in a compiled core
(:mod:`.batched_core`, numba; issue 31 asks for the batched model within 10x of the job-level one
per job) with a heap of its own: the loop asks it to run what comes before the loop's next event
(:class:`~chainserve.sim.batched_process.BatchedProcess`), and it returns at each job's last token,
so Python and the core cross O(1) times per job. Events are per server iteration, not per step: an
iteration's end is one event carrying its batch, and the replies of its steps, which all travel the
server's communication time, are one more; an iteration start runs only when something waits (its
place in the order of events is reserved when the previous iteration begins). The records are those
of one event per step and hop (``tests/test_batch_service.py`` pins the order at an instant), and
the same, float for float, as the Python model this core replaced. Cost: O(l_out · hops) iterations
per job at most, fewer as batches grow.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from chainserve.model.spec import Problem
from chainserve.model.step_cost import MAX_BATCH_TOKENS


@dataclass(frozen=True, slots=True)
class BatchedService:
    """The iteration-level model (module docstring); ``hop_overhead_s`` ≥ 0 per hop and step.

    ``hosts`` (issue 31: servers that share a machine's cores): the host of each station, one per
    server in ``problem.servers`` order and one for the orchestrator's head, indexing ``host_cores``
    (each host's cores). An iteration in progress on a host then progresses at min(1, cores / n),
    n the iterations in progress there (egalitarian processor sharing; a free iteration takes no
    share), and its end moves whenever n changes. ``None``: every station computes alone.

    ``background_cores`` ≥ 0: the cores each shared host spends, on average, on work the model does not
    time — the runtime's own Python (HTTP, routing, transport), a benchmark client — taken off its
    ``cores`` (a mean-field approximation: that work is spread evenly over the run); it must leave
    every shared host some."""

    hop_overhead_s: float = 0.0
    max_batch_tokens: int = MAX_BATCH_TOKENS
    hosts: tuple[int, ...] | None = None
    host_cores: tuple[float, ...] = ()
    background_cores: float = 0.0
    name: ClassVar[str] = "batched"

    def __post_init__(self) -> None:
        if not self.hop_overhead_s >= 0:
            raise ValueError(f"hop_overhead_s: must be ≥ 0, got {self.hop_overhead_s}")
        if not self.background_cores >= 0:
            raise ValueError(f"background_cores: must be ≥ 0, got {self.background_cores}")
        if self.max_batch_tokens < 2:
            raise ValueError(f"max_batch_tokens: must be ≥ 2, got {self.max_batch_tokens}")
        if self.hosts is not None and not all(c > 0 for c in self.host_cores):
            raise ValueError(f"host_cores: each host needs cores > 0, got {self.host_cores}")

    def host_model(self, problem: Problem) -> tuple[tuple[int, ...], tuple[float, ...]] | None:
        """``(hosts, host_cores)`` as given, else from the cluster's shared hosts
        (:attr:`Problem.hosts <chainserve.model.spec.Problem.hosts>`: a station on none gets a host of
        its own with one core, which never slows it), each shared host less ``background_cores``;
        ``None``: no station shares a host."""
        if self.hosts is not None:
            return self.hosts, self._less_background(self.host_cores)
        if not problem.hosts:
            return None
        index = {name: j for j, name in enumerate(s.name for s in problem.servers)}
        stations = len(problem.servers) + 1  # the head last
        hosts = [-1] * stations
        for h, host in enumerate(problem.hosts):
            for name in host.servers:
                hosts[index[name]] = h
            if host.head:
                hosts[-1] = h
        cores = list(self._less_background(tuple(float(host.cores) for host in problem.hosts)))
        for j in range(stations):
            if hosts[j] < 0:
                hosts[j] = len(cores)
                cores.append(1.0)
        return tuple(hosts), tuple(cores)

    def _less_background(self, cores: tuple[float, ...]) -> tuple[float, ...]:
        left = tuple(c - self.background_cores for c in cores)
        if not all(c > 0 for c in left):
            raise ValueError(
                f"background_cores: {self.background_cores:g} leaves a shared host no cores (it has {min(cores):g})"
            )
        return left
