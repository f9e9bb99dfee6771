"""Chains after a server fails or comes back, and a new placement when the survivors no longer cover
the model (beyond the paper, §4.3: static plans; issues: reliability, adapting to load).

Servers keep their spans and their KV arenas (block servers cannot grow memory they never
allocated), so a new cache allocation must fit the arenas: GCA (§2.2) runs on the placement in force
with each server's memory taken as exactly its parameters plus its arena, s_m·m_j + s_c·slots_j
(:func:`chains_within`). With every server alive again the original plan comes back unchanged.
:func:`arena_block_slots` is the arena a server's whole cache memory holds for a span, which an
adaptive service allocates so that any later plan for that span fits. :class:`RestartPolicy` is when
a dead server is started again (issue 33): the runtime's supervisor follows it, and the simulator
models a failure without a given down time by it (:func:`restart_s`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Set
from dataclasses import dataclass

from chainserve.model.spec import Problem
from chainserve.plan.csearch import make_plan
from chainserve.plan.gca import gca
from chainserve.plan.types import Placement, Plan, Span, jobs_that_fit


@dataclass(frozen=True, slots=True)
class RestartPolicy:
    """Bounded restarts with exponential back-off: the n-th consecutive restart waits ``backoff_s`` ×
    2ⁿ⁻¹ (the first at once, at most ``max_backoff_s``); after ``max_restarts`` consecutive ones the
    server is given up (0: never restarted); one up for ``stable_s`` counts afresh; one that only
    stopped answering gets ``silent_s`` to answer again (:mod:`chainserve.runtime.supervision`)."""

    max_restarts: int = 5
    backoff_s: float = 1.0
    max_backoff_s: float = 30.0
    stable_s: float = 60.0
    silent_s: float = 10.0

    def __post_init__(self) -> None:
        if self.max_restarts < 0:
            raise ValueError(f"max_restarts: must be non-negative, got {self.max_restarts}")
        if not 0 <= self.backoff_s <= self.max_backoff_s:
            raise ValueError(f"backoff_s: must lie in [0, max_backoff_s={self.max_backoff_s}], got {self.backoff_s}")

    def delay_s(self, attempt: int) -> float:
        """The wait before consecutive restart number ``attempt`` (0: the first, at once).

        >>> [RestartPolicy(backoff_s=1, max_backoff_s=4).delay_s(n) for n in range(5)]
        [0.0, 1.0, 2.0, 4.0, 4.0]
        """
        return 0.0 if attempt == 0 else float(min(self.backoff_s * 2 ** (attempt - 1), self.max_backoff_s))


def restart_s(problem: Problem, span: Span, policy: RestartPolicy, attempt: int = 0) -> float | None:
    """Seconds a dead server is out when its supervisor restarts it: ``policy``'s wait before
    consecutive restart ``attempt`` (0: at once) plus loading its span's weights, s_m,j × blocks at
    the cluster's load bandwidth; ``None`` when the policy gives up first (the server stays dead).

    >>> from chainserve.model.spec import ModelSpec, Server, Workload
    >>> p = Problem((Server("a", 10, 1.0, 0.0),), ModelSpec("toy", 4, 2.0, 0.5), Workload(0.1))
    >>> policy = RestartPolicy(max_restarts=2)
    >>> load = restart_s(p, Span(0, 1, 3), policy)   # 6 GB of blocks at the cluster's bandwidth
    >>> load == 6.0 / p.load_bandwidth_gb_per_s, restart_s(p, Span(0, 1, 3), policy, 1) == 1.0 + load
    (True, True)
    >>> print(restart_s(p, Span(0, 1, 3), policy, 2))
    None
    """
    if attempt >= policy.max_restarts:
        return None
    load_s = problem.block_size_gb(span.server) * span.num_blocks / problem.load_bandwidth_gb_per_s
    return policy.delay_s(attempt) + load_s


def arena_block_slots(problem: Problem, span: Span) -> int:
    """⌊(M_j − s_m,j·m_j)/s_c,j⌋: the block-slots server ``span.server``'s memory holds beside its span.

    >>> from chainserve.model.spec import ModelSpec, Server, Workload
    >>> p = Problem((Server("a", 10, 1.0, 0.0),), ModelSpec("toy", 4, 2.0, 0.5), Workload(0.1))
    >>> arena_block_slots(p, Span(0, 1, 3))
    8
    """
    j = span.server
    free_gb = problem.servers[j].memory_gb - problem.block_size_gb(j) * span.num_blocks
    return jobs_that_fit(free_gb, problem.cache_size_gb(j))


def chains_within(plan: Plan, placement: Placement, block_slots: Mapping[int, int]) -> Plan | None:
    """GCA over ``placement`` (spans of live servers) with each server's cache capped at its arena
    ``block_slots[j]``; the plan keeps ``plan``'s problem, c and method. ``None`` when no chain covers
    blocks 1..L."""
    problem = plan.problem
    servers = list(problem.servers)
    for span in placement.spans:
        j = span.server
        arena_gb = problem.block_size_gb(j) * span.num_blocks + problem.cache_size_gb(j) * block_slots[j]
        servers[j] = dataclasses.replace(servers[j], memory_gb=min(servers[j].memory_gb, arena_gb))
    capped = dataclasses.replace(problem, servers=tuple(servers))
    chains = gca(capped, placement) if placement.spans else ()
    if not chains:
        return None
    return make_plan(problem, placement, chains, plan.c, plan.method)


def recompose(plan: Plan, alive: Set[int], block_slots: Mapping[int, int]) -> Plan | None:
    """The plan for the servers in ``alive``: ``plan`` itself when all of its servers are alive, else
    GCA over the surviving spans within their arenas; ``None`` when no chain covers blocks 1..L.

    >>> from chainserve.model.spec import ModelSpec, Problem, Server, Workload
    >>> from chainserve.plan.types import Span
    >>> p = Problem(tuple(Server(n, 10, t, 0.0) for n, t in (("a", 1.0), ("b", 2.0), ("c", 3.0))),
    ...             ModelSpec("toy", 2, 2.0, 1.0), Workload(0.1))
    >>> placement = Placement((Span(0, 1, 2), Span(1, 1, 1), Span(2, 2, 1)), 2)
    >>> full = make_plan(p, placement, gca(p, placement), None)
    >>> [(ch.servers, ch.capacity) for ch in full.chains]
    [((0,), 3), ((1, 2), 8)]
    >>> slots = {0: 6, 1: 8, 2: 8}
    >>> [(ch.servers, ch.capacity) for ch in recompose(full, {1, 2}, slots).chains]
    [((1, 2), 8)]
    >>> recompose(full, {0, 1, 2}, slots) is full, recompose(full, {0, 1}, slots).chains[0].servers
    (True, (0,))
    >>> print(recompose(full, {1}, slots))
    None
    """
    placed = set(plan.placement.servers)
    if placed <= set(alive):
        return plan
    spans = tuple(s for s in plan.placement.spans if s.server in alive)
    found = chains_within(plan, Placement(spans, plan.placement.num_blocks), block_slots)
    return None if found is None else dataclasses.replace(found, placement=plan.placement)


def replace_survivors(plan: Plan, alive: Set[int]) -> Plan | None:
    """A new placement of the live servers when their spans no longer cover blocks 1..L: the c-search
    of §2.3 on the live servers alone (least lower bound; if no c is stable at the workload's rate,
    the c = 1 plan, which covers the model with the most room), server indices kept. ``None`` when
    the live servers cannot hold the model at all.

    >>> from chainserve.model.spec import ModelSpec, Problem, Server, Workload
    >>> from chainserve.plan.types import Span
    >>> p = Problem(tuple(Server(n, 5, 1.0, 0.0) for n in "abc"), ModelSpec("toy", 4, 1.0, 0.5), Workload(0.1))
    >>> placement = Placement((Span(0, 1, 2), Span(1, 3, 2), Span(2, 1, 4)), 4)
    >>> plan = make_plan(p, placement, gca(p, placement), None)
    >>> new = replace_survivors(plan, {0, 1})
    >>> [(s.server, s.start_block, s.num_blocks) for s in new.placement.spans], new.chains[0].servers
    ([(0, 1, 2), (1, 3, 2)], (0, 1))
    >>> print(replace_survivors(plan, {0}))
    None
    """
    from chainserve.plan.csearch import plan_for_c, search_c

    problem = plan.problem
    live = sorted(alive)
    sub = problem.with_servers(live)
    try:
        found = search_c(sub)
    except ValueError:
        first = plan_for_c(sub, 1)
        if first is None:
            return None
        found = first[1]
    spans = tuple(dataclasses.replace(s, server=live[s.server]) for s in found.placement.spans)
    chains = tuple(
        dataclasses.replace(ch, hops=tuple(dataclasses.replace(h, server=live[h.server]) for h in ch.hops))
        for ch in found.chains
    )
    return make_plan(problem, Placement(spans, plan.placement.num_blocks), chains, found.c, plan.method)
