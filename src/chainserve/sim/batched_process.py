"""The batched model's component of the event loop (issue 31): :class:`BatchedProcess` holds the
arrays of one run of the compiled core (:mod:`.batched_core`) and makes the three calls the loop
(:mod:`.loop`) needs, each O(1) times per job. Importing it loads numba (the loop does so only
when the service is :class:`~chainserve.sim.batched.BatchedService`)."""

from __future__ import annotations

from functools import partial

import numpy as np

from chainserve.model.step_cost import prefill_chunk_tokens
from chainserve.sim.batched_core import (
    ARRIVAL,
    G_BUDGET,
    G_CHUNK,
    G_FREE,
    G_HEAD,
    G_HEAP,
    G_LEAST,
    G_PEND_ST,
    G_SHARED,
    H_CORES,
    H_FIRST,
    H_SIZE,
    J_OUTPUT,
    J_PROMPT,
    J_QSLOT,
    L_NEXT,
    S_ALPHA,
    S_COMM,
    S_COSTED,
    S_HOST,
    S_LONE,
    S_MEMBER,
    S_PBETA,
    S_QHEAD,
    S_QTAIL,
    abort,
    advance,
    start,
)

__all__ = ["ARRIVAL", "BatchedProcess"]


class BatchedProcess:
    """The iteration-level service of every job (:mod:`.batched`) as a component of the event loop
    (:mod:`.loop`), over the arrays of one run: the loop calls :meth:`start` when a job's service
    begins, :meth:`abort` when a failure ends it, and ``advance(limit_t, limit_rank)`` (:func:`advance`
    on this run's arrays) before each of its own events and arrivals, which returns ``(job, t)`` at
    a job's last token, or ``(−1, t)``. The component's events run after the loop's own kinds of
    their instant; an iteration's end and a batch's replies before the arrivals of the instant
    (:data:`ARRIVAL`, the rank the loop passes for one), an iteration start after them (steps that
    reach a server together share it). One slot is kept per job and per abort (a stale step of an
    aborted attempt may still be in flight)."""

    def __init__(self, problem, model, prompts, outputs):
        servers, steps_mean = problem.servers, problem.workload.output_tokens
        n, stations = len(prompts), len(servers) + 1  # the servers, then the orchestrator's head
        self.jobs = np.zeros((n, 9), np.int64)
        self.jobs[:, J_PROMPT] = np.asarray(prompts, np.int64)
        self.jobs[:, J_OUTPUT] = np.asarray(outputs, np.int64)
        self.jobs[:, J_QSLOT] = -1
        self.st_i = np.zeros((stations, 10), np.int64)
        self.st_i[:, S_QHEAD] = self.st_i[:, S_QTAIL] = -1
        self.st_f = np.zeros((stations, 8), np.float64)
        for j, s in enumerate(servers):
            self.st_f[j, S_COMM] = s.tau_c_s / steps_mean + model.hop_overhead_s
            self.st_f[j, S_LONE] = s.tau_p_s / steps_mean  # per block and step, no step cost
        for j, cost in enumerate([*(s.step for s in servers), problem.head_cost]):
            if cost is not None:
                self.st_i[j, S_COSTED] = 1
                self.st_f[j, S_ALPHA : S_PBETA + 1] = (
                    cost.alpha_s,
                    cost.beta_s,
                    cost.prefill_alpha_s,
                    cost.prefill_beta_s,
                )
        self.glob = np.zeros(12, np.int64)
        self.glob[G_CHUNK] = prefill_chunk_tokens(model.max_batch_tokens)
        self.glob[G_BUDGET], self.glob[G_HEAD] = model.max_batch_tokens, len(servers)
        self.glob[G_LEAST] = min(1, int(self.jobs[:, J_PROMPT].min(initial=1)))
        self.glob[G_PEND_ST] = self.glob[G_FREE] = -1
        self.glob_f = np.full(3, -1.0)
        self._hosts(problem, model, stations)
        self.calls = np.zeros((stations, 2), np.int64)  # the starts due: (seq, station)
        self.slots = np.zeros((0, 6), np.int64)
        self.heap_t = np.zeros(0, np.float64)
        self.heap_k = np.zeros((0, 2), np.int64)
        self.stations = stations
        self.num_jobs = n
        self.num_aborts = 0
        self.routes = np.zeros((64, 2), np.int64)
        self.num_routed = 0  # rows of ``routes`` in use
        self.route_at: dict[int, tuple[object, int]] = {}  # id(hops) -> (hops, offset in routes)
        self._grow(n + 16)

    def _hosts(self, problem, model, stations: int) -> None:
        """The host of each station and the cores of each host (:meth:`BatchedService.host_model`: the
        cluster's shared hosts; none: no sharing)."""
        shared = model.host_model(problem)
        if shared is None:
            self.host_i, self.host_f = np.zeros((1, 3), np.int64), np.zeros((1, 2), np.float64)
            return
        hosts, host_cores = shared
        order = sorted(range(stations), key=lambda j: hosts[j])
        self.st_i[:, S_HOST] = hosts
        self.st_i[:, S_MEMBER] = order
        self.host_i = np.zeros((len(host_cores), 3), np.int64)
        self.host_f = np.zeros((len(host_cores), 2), np.float64)
        self.host_f[:, H_CORES] = host_cores
        for x, j in enumerate(order):
            h = hosts[j]
            if self.host_i[h, H_SIZE] == 0:
                self.host_i[h, H_FIRST] = x
            self.host_i[h, H_SIZE] += 1
        self.glob[G_SHARED] = 1

    def _grow(self, slots: int) -> None:
        """Room for ``slots`` steps (every slot, free or not, may be a waiting step or an event)."""
        old = len(self.slots)
        self.slots = np.concatenate([self.slots, np.zeros((slots - old, 6), np.int64)])
        self.slots[old:, L_NEXT] = np.arange(old + 1, slots + 1)
        self.slots[slots - 1, L_NEXT] = self.glob[G_FREE]
        self.glob[G_FREE] = old
        events = slots + self.stations  # a reply per slot, an iteration's end per station
        used = self.glob[G_HEAP]
        heap_t, heap_k = np.zeros(events, np.float64), np.zeros((events, 2), np.int64)
        heap_t[:used], heap_k[:used] = self.heap_t[:used], self.heap_k[:used]
        self.heap_t, self.heap_k = heap_t, heap_k
        self.scratch = np.zeros((5, slots), np.int64)
        self._bind()

    def _bind(self) -> None:
        """``advance`` and ``_start`` on the current arrays."""
        state = (self.jobs, self.st_i, self.st_f, self.slots, self.heap_t, self.heap_k, self.calls, self.glob)
        self.advance = partial(advance, *state, self.glob_f, self.routes, self.scratch, self.host_i, self.host_f)
        self._start = partial(start, *state, self.glob_f, self.routes)

    def start(self, i: int, route, now: float) -> None:
        """Job ``i``'s service begins on ``route``: its prompt goes to the first hop."""
        hops = route.hops
        seen = self.route_at.get(id(hops))
        if seen is None or seen[0] is not hops:  # hops first seen: into ``routes``
            offset = self.num_routed
            self.num_routed += len(hops)
            if self.num_routed > len(self.routes):
                self.routes = np.concatenate([self.routes, np.zeros((len(self.routes) + len(hops), 2), np.int64)])
            self.routes[offset : self.num_routed] = [(h.server, h.num_blocks) for h in hops]
            self.route_at[id(hops)] = seen = (hops, offset)
            self._bind()
        self._start(i, seen[1], len(hops), now)

    def abort(self, i: int) -> None:
        """Job ``i`` lost its service: its waiting step leaves its queue, its steps in flight are void."""
        abort(self.jobs, self.st_i, self.slots, self.glob, i)
        self.num_aborts += 1
        if self.num_jobs + self.num_aborts + 16 > len(self.slots):
            self._grow(2 * len(self.slots))
