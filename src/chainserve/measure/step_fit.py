"""Fit a server's batched step cost from timed iterations (issue 18, item 2).

A block server that batches runs one iteration for every step that arrived together; per block, a
decode iteration of b sessions costs α + β·b and a prefill chunk of q tokens α' + β'·q
(:class:`~chainserve.model.step_cost.StepCost`). The orchestrator times whole round trips through m
blocks, so each fit carries a per-message transport term c0 that is not part of the step cost:

    decode   t = c0  + m·(α  + β·b)          prefill   t = c0' + m·(α' + β'·q)

Both are linear least squares in (c0, α, β), solved with α, β ≥ 0 (a negative coefficient, from
noise, is held at 0 and the rest refitted; a log line says so). Each fit's R² is kept and the smaller
one is the StepCost's ``r2``. The same form with m = 1 fits the orchestrator's LM head over n jobs
(``head_cost``: α_h + β_h·n, no transport term).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from chainserve.model.spec import SpecError
from chainserve.model.step_cost import StepCost

log = logging.getLogger("chainserve.profile")

#: The largest decode batch profiled by default (sessions stepped in one iteration).
DEFAULT_MAX_BATCH = 16
#: Prompt lengths of the prefill steps profiled (those above the server's chunk or cache are left out).
PREFILL_TOKENS = (8, 32, 128)
#: Below this a coefficient is written as 0: the cluster file's times start at 1 µs.
MIN_WRITTEN_S = 1e-6


@dataclass(frozen=True, slots=True)
class LinearFit:
    """``t = overhead_s + m·(alpha_s + beta_s·x)`` fitted on the ``(m, x, t)`` timings ``points``,
    with its ``r2``; ``clamped``: the coefficients held at 0 because the free fit made them negative."""

    overhead_s: float
    alpha_s: float
    beta_s: float
    r2: float
    points: tuple[tuple[float, float, float], ...]
    clamped: tuple[str, ...] = ()

    @property
    def num_points(self) -> int:
        return len(self.points)

    def predict_s(self, m: float, x: float) -> float:
        """The fitted time of one timing at ``m`` blocks and size ``x``."""
        return self.overhead_s + m * (self.alpha_s + self.beta_s * x)


def fit_per_block(rows: Sequence[tuple[float, float, float]], what: str = "", overhead: bool = True) -> LinearFit:
    """Least squares of ``t = c0 + m·(α + β·x)`` on ``(m, x, t)`` rows with α, β ≥ 0 (``overhead``
    False: c0 = 0). Raises ``ValueError`` when the rows cannot separate the terms.

    >>> f = fit_per_block([(m, b, 0.003 + m * (0.010 + 0.002 * b)) for m in (1, 4) for b in (1, 2, 4)])
    >>> round(f.overhead_s, 6), round(f.alpha_s, 6), round(f.beta_s, 6), round(f.r2, 6)
    (0.003, 0.01, 0.002, 1.0)
    """
    data = np.asarray(rows, dtype=float).reshape(-1, 3)
    m, x, t = data[:, 0], data[:, 1], data[:, 2]
    columns = [np.ones_like(m)] if overhead else []
    design = np.column_stack([*columns, m, m * x])
    if np.linalg.matrix_rank(design) < design.shape[1]:
        raise ValueError(f"{what or 'rows'}: timings at too few block counts or sizes to fit")
    coef = np.linalg.lstsq(design, t, rcond=None)[0]
    held: list[int] = []  # α, β columns held at 0, the most negative first (an active-set refit)
    while np.any(coef[-2:] < 0) and len(held) < 2:
        held.append(len(coef) - 2 + int(np.argmin(coef[-2:])))
        keep = [i for i in range(len(coef)) if i not in held]
        coef = np.zeros(len(coef))
        coef[keep] = np.linalg.lstsq(design[:, keep], t, rcond=None)[0]
    clamped = tuple(("alpha", "beta")[i - len(coef) + 2] for i in sorted(held))
    if clamped:
        log.warning("%s: the fit made %s negative; held at 0 and refitted", what or "fit", " and ".join(clamped))
    total = float(np.sum((t - t.mean()) ** 2))
    residual = float(np.sum((t - design @ coef) ** 2))
    r2 = 1.0 - residual / total if total > 0 else 1.0
    c0 = float(coef[0]) if overhead else 0.0
    points = tuple((float(a), float(b), float(c)) for a, b, c in data)
    return LinearFit(c0, float(coef[-2]), float(coef[-1]), r2, points, clamped)


@dataclass(frozen=True, slots=True)
class StepFit:
    """A server's two fits and the :class:`StepCost` they give (``r2``: the smaller fit's R², ≥ 0)."""

    decode: LinearFit
    prefill: LinearFit

    @property
    def cost(self) -> StepCost:
        d, p = self.decode, self.prefill
        return StepCost(d.alpha_s, d.beta_s, p.alpha_s, p.beta_s, max(0.0, min(d.r2, p.r2)))


def fit_step_cost(
    decode: Sequence[tuple[int, int, float]], prefill: Sequence[tuple[int, int, float]], name: str = "server"
) -> StepFit:
    """Fit ``(m, b, t)`` decode iterations and ``(m, q, t)`` prefill steps (module docstring); raises
    :class:`SpecError` naming the server when they give no usable cost."""
    try:
        fit = StepFit(fit_per_block(decode, f"{name} decode"), fit_per_block(prefill, f"{name} prefill"))
        fit.cost  # noqa: B018  (checks α + β > 0)
    except ValueError as exc:
        raise SpecError(name, f"step cost: {exc}") from None
    return fit


def fit_head(rows: Sequence[tuple[int, float]]) -> StepCost:
    """``head_cost`` from ``(n jobs, seconds)`` timings of the LM head: α_h + β_h·n (prefill = decode)."""
    f = fit_per_block([(1, n, t) for n, t in rows], "head", overhead=False)
    return StepCost(f.alpha_s, f.beta_s, f.alpha_s, f.beta_s, max(0.0, f.r2))


def batch_sizes(max_batch: int) -> tuple[int, ...]:
    """1, 2, 4, … up to ``max_batch``, and ``max_batch`` itself.

    >>> batch_sizes(5), batch_sizes(16), batch_sizes(1)
    ((1, 2, 4, 5), (1, 2, 4, 8, 16), (1,))
    """
    sizes = {1 << i for i in range(max_batch.bit_length()) if 1 << i <= max_batch}
    return tuple(sorted(sizes | {max_batch})) if max_batch >= 1 else ()


def prefill_lengths(limit: int) -> tuple[int, ...]:
    """The prompt lengths to profile when a prefill may hold at most ``limit`` tokens in one chunk.

    >>> prefill_lengths(256), prefill_lengths(44), prefill_lengths(6)
    ((8, 32, 128), (8, 32), (2, 6))
    """
    lengths = tuple(q for q in PREFILL_TOKENS if q <= limit)
    return lengths if len(lengths) >= 2 else tuple(sorted({2, max(limit, 2)}))


def _ms(seconds: float) -> float:
    """Milliseconds to six significant digits; 0 below the 1 µs the cluster file accepts."""
    return 0.0 if seconds < MIN_WRITTEN_S else float(f"{seconds * 1000:.6g}")


def cost_entry(cost: StepCost, head: bool = False) -> dict:
    """A ``step_cost`` (or, ``head``, a ``head_cost``) entry of the cluster file (:mod:`..model.cluster_file`)."""
    small = [
        n for n in ("alpha_s", "beta_s", "prefill_alpha_s", "prefill_beta_s") if 0 < getattr(cost, n) < MIN_WRITTEN_S
    ]
    if small:
        log.info("step cost: %s below 1 µs written as 0", ", ".join(small))
    entry = {"alpha_ms": _ms(cost.alpha_s), "beta_ms": _ms(cost.beta_s)}
    if not head:
        entry |= {"prefill_alpha_ms": _ms(cost.prefill_alpha_s), "prefill_beta_ms": _ms(cost.prefill_beta_s)}
    return entry | ({"r2": round(float(cost.r2), 4)} if cost.r2 is not None else {})  # 1e-16 reads as 0
