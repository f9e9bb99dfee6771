"""Birth–death sandwich bounds on the mean response time under JFFC (paper §2.5, Theorem 4).

Computed in log space so that C (the number of job servers) may be in the thousands.

**What they assume** (:data:`ASSUMPTION`): Poisson arrivals, exponential service of mean T_k on chain
k, and each job in service occupying one of c_k slots (C = Σ c_k job servers). With the KV cache paged
by tokens (issue 30) chain k holds c_k·T̄ tokens, T̄ the plan's ``max_tokens`` (the workload's mean
prompt + output tokens), and a job its own tokens: for jobs of constant length T̄ that is exactly one
slot each and the bounds are exact bounds; with variable lengths a chain holds more short or fewer long
jobs than c_k, and the head of JFFC's FCFS queue may wait for pages while chains hold fewer than c_k
jobs. The bounds then still bracket the simulated mean where chains hold many jobs (c_k ≳ 16) at
moderate load (tests/test_paging.py: c_k = 32, 16 at ρ = 0.7, lengths of CV ≈ 1 and uniform), but not
for small chains at high load (c_k = 4, ρ = 0.85, uniform lengths: ~170 s simulated against an upper
bound of 1.9 s): they are not bounds for variable lengths.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

#: What the bounds assume, in one line for reports and ``plan --json`` (module docstring).
ASSUMPTION = (
    "JFFC, Poisson arrivals, exponential service, each job one of c_k slots (with a paged KV cache: "
    "every job exactly max_tokens long; exact only for constant lengths)"
)


@dataclass(frozen=True, slots=True)
class Bounds:
    """Lower and upper bounds on the mean response time (seconds), paper §2.5."""

    lower_s: float
    upper_s: float


def slot_rates(rates: Sequence[float], capacities: Sequence[int]) -> np.ndarray:
    """The C job-server rates, fastest first: chain k contributes c_k copies of μ_k."""
    expanded = np.repeat(np.asarray(rates, dtype=float), np.asarray(capacities, dtype=int))
    return np.sort(expanded)[::-1]


def mean_jobs_birth_death(arrival_rate: float, death_rates: np.ndarray) -> float:
    """E[Z] of a birth–death chain with birth rate λ, death rate ``death_rates[n-1]`` in state
    n ≤ C and ν = ``death_rates[-1]`` beyond C. ``inf`` unless λ < ν.

    >>> round(mean_jobs_birth_death(1.0, np.array([2.0])), 6)  # M/M/1, ρ = 1/2
    1.0
    """
    C = len(death_rates)
    nu = float(death_rates[-1]) if C else 0.0
    if C == 0 or arrival_rate >= nu:
        return math.inf
    rho = arrival_rate / nu
    # log φ_n (unnormalised, φ_0 = 1) for n = 0..C
    log_phi = np.concatenate(([0.0], np.cumsum(math.log(arrival_rate) - np.log(death_rates))))
    log_tail = log_phi[C] - math.log1p(-rho)  # Σ_{n ≥ C} φ_n
    phi = np.exp(log_phi - max(float(log_phi[:C].max()), log_tail))  # scaled so that nothing overflows
    norm = float(phi[:C].sum()) + phi[C] / (1 - rho)
    body = float(np.dot(np.arange(C), phi[:C]))
    tail = phi[C] * (rho / (1 - rho) ** 2 + C / (1 - rho))
    return float((body + tail) / norm)


def response_time_bounds(arrival_rate: float, rates: Sequence[float], capacities: Sequence[int]) -> Bounds:
    """Lower/upper bounds on JFFC's mean response time for chains with rates μ_k and capacities c_k.

    The lower bound packs jobs on the fastest job servers (ν̄_n), the upper on the slowest (ν̲_n);
    both give E[Z], and Little's law gives E[Z]/λ. ``inf`` bounds when λ ≥ ν.

    >>> b = response_time_bounds(1.0, [2.0], [1])  # M/M/1 with μ = 2: E[T] = 1/(μ − λ)
    >>> round(b.lower_s, 6), round(b.upper_s, 6)
    (1.0, 1.0)
    """
    slots = slot_rates(rates, capacities)
    if len(slots) == 0:
        return Bounds(math.inf, math.inf)
    fast_first = np.cumsum(slots)
    slow_first = np.cumsum(slots[::-1])
    lower = mean_jobs_birth_death(arrival_rate, fast_first) / arrival_rate
    upper = mean_jobs_birth_death(arrival_rate, slow_first) / arrival_rate
    return Bounds(lower, upper)
