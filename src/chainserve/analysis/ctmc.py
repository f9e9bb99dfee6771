"""Exact steady state of JFFC and threshold-JFFC for small systems (paper §2.4; Lin & Kumar 1984).

The continuous-time Markov chain has state (Z_1..Z_K, q): jobs in service per chain (fastest first) and
the central queue length. Arrivals (rate λ) join the queue; a completion at chain k (rate Z_k·μ_k) frees
a slot; after either event the queue is drained into free slots exactly as
:class:`chainserve.dispatch.jffc.JFFC` does (:func:`jffc_fill`).

No truncation is needed. Let t_max be the largest threshold (0 for plain JFFC). Above level t_max
every slot is taken (a free slot would have accepted the head), so levels q > t_max hold the single
state (full, q), reached only from (full, q − 1) at rate λ and left only to (full, q − 1) at rate ν:
its mass is exactly geometric, π(full, q) = π(full, t_max + 1)·ρ^{q − t_max − 1}, ρ = λ/ν. Those
levels are lumped into one tail state, left at rate ν(1 − ρ) = ν − λ; the lumping is exact, so the
result carries no truncation error (a deliberate improvement over truncating at some Q). ``tol``
bounds the residual of the numerical solve instead.

**What it assumes** (as :mod:`.bounds`): each job takes one of chain k's c_k slots. With a paged KV
cache (issue 30) that is exact for jobs of constant length T̄ = the plan's ``max_tokens``; with
variable lengths a chain holds a varying number of jobs around c_k and the chain is an approximation.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp
from scipy.sparse.linalg import spsolve

Busy = tuple[int, ...]


@dataclass(frozen=True, slots=True)
class CtmcResult:
    """Steady-state means of the JFFC chain (times in seconds; ``mean_busy`` in the caller's order)."""

    mean_jobs: float  # E[N], jobs in system
    mean_response_s: float  # E[T] = E[N]/λ (Little)
    mean_waiting_s: float  # E[W] = E[q]/λ
    prob_wait: float  # P(an arrival does not start at once), by PASTA
    mean_busy: tuple[float, ...]  # E[Z_k] per chain
    num_states: int  # explicit states + the lumped tail

    @property
    def mean_service_s(self) -> float:
        """E[T] − E[W]: the mean service time actually received."""
        return self.mean_response_s - self.mean_waiting_s


def jffc_fill(busy: Busy, queue_len: int, capacities: Sequence[int], thresholds: Sequence[int]) -> tuple[Busy, int]:
    """Drain the queue into free slots, fastest chain first, while ``queue_len > thresholds[k]``.

    ``busy``, ``capacities`` and ``thresholds`` list chains fastest first; thresholds are
    non-decreasing, so the fastest free chain is also the one most willing to take a job.

    >>> jffc_fill((0, 0), 2, (1, 1), (0, 0))
    ((1, 1), 0)
    >>> jffc_fill((1, 0), 2, (1, 1), (0, 2))  # the slow chain waits for a queue of 3
    ((1, 0), 2)
    """
    z = list(busy)
    for k, cap in enumerate(capacities):
        while z[k] < cap and queue_len > thresholds[k]:
            z[k] += 1
            queue_len -= 1
        if z[k] < cap:
            break
    return tuple(z), queue_len


def _sorted_inputs(
    rates: Sequence[float], capacities: Sequence[int], thresholds: Sequence[int] | None
) -> tuple[list[int], list[float], list[int], list[int]]:
    """Validate; return the fastest-first order and rates, capacities, thresholds in it."""
    K = len(rates)
    if K == 0 or len(capacities) != K:
        raise ValueError("capacities: need one capacity per rate, at least one chain")
    if any(not mu > 0 for mu in rates) or any(c < 1 for c in capacities):
        raise ValueError("rates: must be > 0 and capacities ≥ 1")
    thr = list(thresholds) if thresholds is not None else [0] * K
    if len(thr) != K or any(t < 0 for t in thr):
        raise ValueError("thresholds: need one non-negative integer per chain")
    order = sorted(range(K), key=lambda k: (-rates[k], k))  # JFFC's order: fastest, then index
    thr_sorted = [thr[k] for k in order]
    if any(a > b for a, b in zip(thr_sorted, thr_sorted[1:], strict=False)):
        raise ValueError("thresholds: must not decrease from faster to slower chains")
    return order, [float(rates[k]) for k in order], [int(capacities[k]) for k in order], thr_sorted


def _likely_state(mu: list[float], cap: list[int], thr: list[int], arrival_rate: float) -> tuple[Busy, int]:
    """A state of high probability: n* arrivals into the empty system, n* = the mode of the
    birth–death lower-bound chain (§2.5), i.e. the number of fastest slots whose rates sum ≤ λ."""
    slot_rates = np.repeat(mu, cap)
    num_jobs = int(np.searchsorted(np.cumsum(slot_rates), arrival_rate, side="right"))
    state: tuple[Busy, int] = ((0,) * len(cap), 0)
    for _ in range(num_jobs):
        state = jffc_fill(state[0], state[1] + 1, cap, thr)
    return state


def jffc_ctmc(
    rates: Sequence[float],
    capacities: Sequence[int],
    arrival_rate: float,
    thresholds: Sequence[int] | None = None,
    tol: float = 1e-10,
    max_states: int = 200_000,
) -> CtmcResult:
    """Solve the (threshold-)JFFC chain exactly: rates μ_k, capacities c_k, Poisson rate λ.

    ``thresholds[k]`` (caller's order, default all 0 = plain JFFC) as in ``JFFC``: chain k takes the
    head of the queue only while more than ``thresholds[k]`` jobs wait. States are enumerated from the
    empty system (reachable ones only, at most Π(c_k+1)·(t_max+1) + 1) and πQ = 0 is solved with a
    sparse LU. Raises ``ValueError`` if λ ≥ ν, if more than ``max_states`` states are needed, or if
    the solve's residual exceeds ``tol`` (relative to the largest rate).

    >>> r = jffc_ctmc([2.0], [1], 1.0)  # M/M/1, ρ = 1/2: E[N] = 1, E[T] = 1, P(wait) = ρ
    >>> round(r.mean_jobs, 9), round(r.mean_response_s, 9), round(r.prob_wait, 9)
    (1.0, 1.0, 0.5)
    """
    order, mu, cap, thr = _sorted_inputs(rates, capacities, thresholds)
    nu = sum(c * m for c, m in zip(cap, mu, strict=True))
    if not 0 < arrival_rate < nu:
        raise ValueError(f"arrival_rate: need 0 < λ < ν = {nu:.6g}, got {arrival_rate}")
    rho, t_max, full = arrival_rate / nu, thr[-1], tuple(cap)
    tail = (full, t_max + 1)  # stands for all levels q > t_max

    index: dict[tuple[Busy, int], int] = {}
    states: list[tuple[Busy, int]] = []
    rows: list[int] = []
    cols: list[int] = []
    vals: list[float] = []

    def visit(state: tuple[Busy, int]) -> int:
        if state not in index:
            if len(states) >= max_states:
                raise ValueError(f"max_states: the chain needs more than {max_states} states")
            index[state] = len(states)
            states.append(state)
        return index[state]

    def add(src: int, state: tuple[Busy, int], rate: float) -> None:
        dst = visit(state if state[1] <= t_max else tail)
        if dst != src:
            rows.append(src)
            cols.append(dst)
            vals.append(rate)

    visit(((0,) * len(cap), 0))
    i = 0
    while i < len(states):
        busy, q = states[i]
        if (busy, q) == tail:
            add(i, (full, t_max), nu - arrival_rate)  # exact exit rate of the geometric tail
        else:
            add(i, jffc_fill(busy, q + 1, cap, thr), arrival_rate)
            for k, z in enumerate(busy):
                if z:
                    freed = busy[:k] + (z - 1,) + busy[k + 1 :]
                    add(i, jffc_fill(freed, q, cap, thr), z * mu[k])
        i += 1
    pi = _stationary(len(states), rows, cols, vals, index[_likely_state(mu, cap, thr, arrival_rate)], tol)

    in_queue = np.array([q for _, q in states], dtype=float)
    busy_arr = np.array([b for b, _ in states], dtype=float)
    is_tail = np.array([s == tail for s in states])
    in_queue[is_tail] = t_max + 1 + rho / (1 - rho)  # E[q | tail]
    waits = np.array([s == tail or jffc_fill(s[0], s[1] + 1, cap, thr)[1] > 0 for s in states])
    mean_busy_sorted = pi @ busy_arr
    mean_queue = float(pi @ in_queue)
    mean_jobs = float(mean_busy_sorted.sum()) + mean_queue
    mean_busy = [0.0] * len(cap)
    for pos, k in enumerate(order):
        mean_busy[k] = float(mean_busy_sorted[pos])
    return CtmcResult(
        mean_jobs=mean_jobs,
        mean_response_s=mean_jobs / arrival_rate,
        mean_waiting_s=mean_queue / arrival_rate,
        prob_wait=float(pi[waits].sum()),
        mean_busy=tuple(mean_busy),
        num_states=len(states),
    )


def _stationary(n: int, rows: list[int], cols: list[int], vals: list[float], pin: int, tol: float) -> np.ndarray:
    """π with πQ = 0, Σπ = 1 for the generator whose off-diagonal entries are given (COO, n ≥ 2).

    Fixes π_pin = 1 and solves the other n − 1 balance equations (Qᵀ without row and column ``pin``),
    then normalises. Unlike a row of ones for Σπ = 1 this keeps the system sparse (little LU fill-in);
    it is well conditioned when ``pin`` is a likely state (a rare one, say the empty system at high
    load, would make the minor nearly singular).
    """
    r, c, v = np.array(rows, dtype=np.int64), np.array(cols, dtype=np.int64), np.array(vals)
    out_rate = np.bincount(r, weights=v, minlength=n)
    diag = np.arange(n)
    gen_t = sp.csc_matrix((np.append(v, -out_rate), (np.append(c, diag), np.append(r, diag))), (n, n))
    rest = np.flatnonzero(diag != pin)
    pi = np.ones(n)
    pi[rest] = spsolve(gen_t[rest][:, rest], -gen_t[rest][:, [pin]].toarray().ravel())
    pi /= pi.sum()
    residual = float(np.abs(gen_t @ pi).max()) / float(out_rate.max())
    if not (residual <= tol and pi.min() >= -tol):
        raise ValueError(f"tol: stationary residual {residual:.3g} (min π {pi.min():.3g}) exceeds {tol}")
    pi = np.clip(pi, 0.0, None)
    return pi / pi.sum()
