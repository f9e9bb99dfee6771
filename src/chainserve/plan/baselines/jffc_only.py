"""The "JFFC only" baseline (spec §3): whole-model replicas, no pipeline across servers.

Every server that can hold all L blocks and the cache of at least one job hosts blocks 1..L and forms a
one-server chain of capacity ``⌊(M_j − s_m·L)/(s_c·L)⌋`` and time ``τ^c_j + τ^p_j·L``; JFFC
(:class:`chainserve.dispatch.jffc.JFFC`) balances the load over them. The remaining servers stay idle.
"""

from __future__ import annotations

from chainserve.model.spec import Problem
from chainserve.plan.csearch import make_plan
from chainserve.plan.types import Chain, Hop, Placement, Plan, Span, hop_time_s, jobs_that_fit


def jffc_only_plan(problem: Problem) -> Plan:
    """One-server chains on every server that fits the model; raises ``ValueError`` if none does
    (the method is then not applicable). O(J log J).

    >>> from chainserve.model.spec import ModelSpec, Problem, Server, Workload
    >>> p = Problem((Server("big", 20, 1.0, 0.5), Server("small", 8, 1.0, 0.5)),
    ...             ModelSpec("toy", 3, 2.0, 1.0), Workload(0.1))
    >>> plan = jffc_only_plan(p)   # big: ⌊(20 − 6)/3⌋ = 4 jobs; small cannot hold the model
    >>> [(ch.servers, ch.service_time_s, ch.capacity) for ch in plan.chains]
    [((0,), 3.5, 4)]
    """
    L = problem.model.num_blocks
    spans, chains = [], []
    for j, server in enumerate(problem.servers):
        capacity = jobs_that_fit(server.memory_gb - problem.block_size_gb(j) * L, problem.cache_size_gb(j) * L)
        if capacity >= 1:
            spans.append(Span(j, 1, L))
            chains.append(Chain((Hop(j, 1, L),), hop_time_s(problem, j, L), capacity))
    if not chains:
        raise ValueError(
            f"jffc-only: no server can hold all {L} blocks ({min(problem.block_sizes) * L:.4g} GB) plus one "
            f"job's cache ({min(problem.cache_sizes) * L:.4g} GB); the method is not applicable to this cluster"
        )
    plan = make_plan(problem, Placement(tuple(spans), L), tuple(chains), None, "jffc-only")
    plan.check()
    return plan
