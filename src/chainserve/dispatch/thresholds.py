"""Thresholds for threshold-JFFC (beyond the paper, §4.3; Lin & Kumar 1984).

Threshold-JFFC (:class:`chainserve.dispatch.jffc.JFFC` with ``thresholds``) lets chain k take the head
of the central queue only while more than ``t_k`` jobs wait. Here t_k is chosen from the model.

**Upper bound, the selfish rule.** When chain k has a free slot and n jobs wait (n ≥ 1, counting the
head), every faster chain is full (it has a lower threshold and would have taken the head). Call
ν_f = Σ_{l<k} c_l μ_l and C_f = Σ_{l<k} c_l the faster chains' rate and slots. The n-th job in the
queue gets a faster slot after about n faster departures, i.e. n/ν_f, and the slot that frees first
belongs to chain l with probability c_l μ_l/ν_f, so its mean service is Σ_l (c_l μ_l/ν_f)·T_l =
C_f/ν_f. Chain k is then worth it for that job iff T_k ≤ (n + C_f)/ν_f, i.e. n ≥ T_k ν_f − C_f; since
chain k is used once n ≥ t_k + 1, the selfish threshold is ``max(0, ceil(T_k ν_f − C_f) − 1)``. It
ignores the delay a waiting job causes the jobs behind it, which grows with the load λ: in every case
we solved exactly the best threshold was no larger, and at high load it is far smaller (μ_1 = 10 μ_2,
one slot each, ρ = 0.9: the selfish threshold 8 makes the mean response 8 % worse than plain JFFC,
the best, 2, makes it 2 % better). So the selfish value only bounds the search.

**The rule used: exact search on a reduced chain.** For each slower chain k (fastest first), the faster
chains are lumped into a pool of m = min(C_f, ``max_pool_slots``) slots of rate ν_f/m each (exact
whenever the pool is full, which is when the threshold matters; slower chains are left out) and t_k
is the t in [t_{k−1}, selfish bound] that minimises the mean number in system E[N] of the two-chain
threshold-JFFC CTMC (:func:`chainserve.analysis.ctmc.jffc_ctmc`). Candidates go up in steps of
max(1, ⌊t/8⌋) until ``patience`` candidates in a row fail to improve E[N] by more than ``GAIN_RTOL``
(so of nearly equal thresholds the smallest, nearest plain JFFC, wins). For two chains with m = C_f
this is the optimum over thresholds up to that step size. Checked on the exact CTMC of the whole
system (2- and 3-chain plans, ρ from 0.1 to 0.95, 54 cases): never worse than plain JFFC, and within
1 % of the best thresholds found by brute force (worst 0.9 %, where chain k alone cannot carry the
load beyond the faster ones, so its reduced chain is unstable and it inherits t_{k−1}).
Thresholds come out non-decreasing (as JFFC requires), 0 for the fastest chain and for chains as
fast as it. A chain that the reduced chain cannot run stably without gets t_{k−1}.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from chainserve.analysis.ctmc import jffc_ctmc
from chainserve.plan.types import Chain

#: Relative gain in E[N] below which a larger threshold is not preferred (keeps the one nearer JFFC).
GAIN_RTOL = 1e-4


def selfish_threshold(service_time_s: float, faster_rate_per_s: float, faster_slots: int) -> int:
    """max(0, ⌈T_k ν_f − C_f⌉ − 1): the queue length beyond which the n-th waiting job is better off
    on chain k than waiting for one of C_f faster slots of total rate ν_f (module docstring).

    >>> selfish_threshold(10.0, 1.0, 1)  # one server 10× faster: wait while ≤ 8 are queued
    8
    """
    return max(0, math.ceil(service_time_s * faster_rate_per_s - faster_slots - 1e-9) - 1)


def choose_thresholds(
    chains: Sequence[Chain], arrival_rate: float, max_pool_slots: int = 4, patience: int = 3
) -> tuple[int, ...]:
    """Thresholds for threshold-JFFC, one per chain in the order given (see the module docstring).

    Cost: per slower chain, O(log of the selfish bound) CTMC solves (after the first 8) of about
    2(m + t)(c_k + 1) states each; well under a second for K ≤ 10 chains of capacity ≤ 35 unless a
    chain is ~100× slower than the rest at high load.

    >>> from chainserve.plan.types import Chain, Hop
    >>> fast, slow = Chain((Hop(0, 1, 1),), 1.0, 1), Chain((Hop(1, 1, 1),), 10.0, 1)
    >>> choose_thresholds([slow, fast], 0.3), choose_thresholds([slow, fast], 0.9)  # selfish bound: 8
    ((6, 0), (2, 0))
    """
    if not arrival_rate > 0:
        raise ValueError(f"arrival_rate: must be > 0, got {arrival_rate}")
    if not chains:
        raise ValueError("chains: need at least one chain")
    order = sorted(range(len(chains)), key=lambda k: (chains[k].service_time_s, k))
    thresholds = [0] * len(chains)
    fastest_s = chains[order[0]].service_time_s
    nu_f, slots_f, previous = 0.0, 0, 0
    for k in order:
        chain = chains[k]
        if chain.service_time_s > fastest_s:
            previous = _best_threshold(nu_f, slots_f, chain, arrival_rate, previous, max_pool_slots, patience)
        thresholds[k] = previous
        nu_f += chain.capacity * chain.rate_per_s
        slots_f += chain.capacity
    return tuple(thresholds)


def _best_threshold(
    nu_f: float, slots_f: int, chain: Chain, arrival_rate: float, low: int, max_pool_slots: int, patience: int
) -> int:
    """argmin over t in [low, selfish bound] of E[N] in the reduced chain: pool (m slots of rate
    ν_f/m) + ``chain``. Steps grow by 1/8 of t; a gain under ``GAIN_RTOL`` does not count."""
    if arrival_rate >= nu_f + chain.capacity * chain.rate_per_s:
        return low
    high = max(low, selfish_threshold(chain.service_time_s, nu_f, slots_f))
    pool = min(slots_f, max_pool_slots)
    rates, capacities = (nu_f / pool, chain.rate_per_s), (pool, chain.capacity)
    best_t, best_jobs, misses, t = low, math.inf, 0, low
    while t <= high and misses < patience:
        jobs = jffc_ctmc(rates, capacities, arrival_rate, (0, t)).mean_jobs
        if jobs < best_jobs * (1 - GAIN_RTOL):
            best_t, best_jobs, misses = t, jobs, 0
        else:
            misses += 1
        t += max(1, t // 8)
    return best_t
