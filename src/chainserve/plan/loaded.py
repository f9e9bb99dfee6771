"""Load-dependent chain service times for planning (issue 18).

With step costs (:mod:`chainserve.model.step_cost`) a chain's service time depends on how many jobs
share its servers' iterations. With ``b_j`` sessions on server j and ``B`` jobs in service in all, a
job on chain k takes

    T_k(b) = Σ_hops (τ^c_j + m_ij · t_j(b_j)) + l̄_out · head(B)

where ``t_j(b) = StepCost.job_s(l̄_in, l̄_out, b)`` (its prefill, l̄_out − 1 decode iterations of the
whole batch, the prefills of the others landing beside it) and τ^p_j on a server without a step cost;
``head(B) = α_h + β_h·B`` per token when the problem has a ``head_cost``.

* **batch 1** (b_j = 1, B = 1): no job is faster, so Theorem 4's lower bound with these rates stays
  a lower bound;
* **full load** (b_j = Σ_{k ∋ j} c_k, B = C: every job server of the plan busy): no job is slower
  (up to the mean-prompt interference term), so the upper bound with these rates stays an upper bound;
* **score** (:func:`loaded_bounds`): the lower bound's formula at full-load speeds, what the
  c-search and the best planner minimise; with capped capacities among the candidates
  (:func:`chainserve.plan.csearch.capped_plans`) it weighs a job server's worth against the
  slowdown it brings every job beside it.
"""

from __future__ import annotations

from collections.abc import Sequence

from chainserve.analysis.bounds import Bounds, response_time_bounds
from chainserve.model.spec import Problem
from chainserve.plan.types import Chain, Hop


def loaded_chain_time_s(problem: Problem, hops: Sequence[Hop], batch: dict[int, float], total: float) -> float:
    """T_k with ``batch[j]`` sessions on server j and ``total`` jobs at the head (module docstring).

    >>> from chainserve.model.spec import ModelSpec, Server, Workload
    >>> from chainserve.model.step_cost import StepCost
    >>> p = Problem((Server("a", 10, 0.1, 0.2, step=StepCost(0.01, 0.002, 0.01, 0.001)),),
    ...             ModelSpec("m", 2, 1.0, 0.1), Workload(1.0, prompt_tokens=100, output_tokens=5))
    >>> round(loaded_chain_time_s(p, (Hop(0, 1, 2),), {0: 1}, 1), 6)   # 0.2 + 2 · 0.158
    0.516
    >>> round(loaded_chain_time_s(p, (Hop(0, 1, 2),), {0: 3}, 3), 6)   # 0.2 + 2 · 0.374
    0.948
    """
    w = problem.workload
    time_s = 0.0
    for hop in hops:
        s = problem.servers[hop.server]
        per_block = s.tau_p_s if s.step is None else s.step.job_s(w.prompt_tokens, w.output_tokens, batch[hop.server])
        time_s += s.tau_c_s + hop.num_blocks * per_block
    if problem.head_cost is not None:
        time_s += w.output_tokens * problem.head_cost.decode_s(max(total, 1.0))
    return time_s


def _times(problem: Problem, chains: Sequence[Chain], others: Sequence[float], extra: float) -> list[float]:
    """Chain times when a job shares its servers with ``others[k]`` jobs of each chain k, plus
    ``extra`` (1: itself, 0: when ``others`` already counts it)."""
    batch: dict[int, float] = {}
    for ch, n in zip(chains, others, strict=True):
        for j in ch.servers:
            batch[j] = batch.get(j, 0.0) + n
    batch = {j: max(b + extra, 1.0) for j, b in batch.items()}
    return [loaded_chain_time_s(problem, ch.hops, batch, max(sum(others) + extra, 1.0)) for ch in chains]


def batch_one_times_s(problem: Problem, chains: Sequence[Chain]) -> list[float]:
    """T_k at batch 1: one job alone on the cluster."""
    return _times(problem, chains, [0.0] * len(chains), 1.0)


def full_load_times_s(problem: Problem, chains: Sequence[Chain]) -> list[float]:
    """T_k with every job server of the plan busy."""
    return _times(problem, chains, [float(ch.capacity) for ch in chains], 0.0)


def loaded_bounds(problem: Problem, chains: Sequence[Chain]) -> tuple[Bounds, float]:
    """Theorem 4 kept a sandwich, and the planner's batch-aware score, from one pass over each speed.

    Bounds: the lower one at batch-1 speeds, the upper one at full-load speeds. Score: the lower-bound
    formula at full-load speeds, the mean response time if every job ran as slowly as the plan's
    concurrency allows (``inf`` when unstable at that speed). Pessimistic at light load, but it ranks
    a plan that fills memory with sessions that slow each other below one that caps them where
    batching still pays."""
    lam, caps = problem.arrival_rate_per_s, [ch.capacity for ch in chains]
    one = response_time_bounds(lam, [1 / t for t in batch_one_times_s(problem, chains)], caps)
    full = response_time_bounds(lam, [1 / t for t in full_load_times_s(problem, chains)], caps)
    return Bounds(one.lower_s, full.upper_s), full.lower_s
