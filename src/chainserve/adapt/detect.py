"""Change detection on Poisson counts: a two-sided CUSUM of log-likelihood ratios (Page 1954).

Arrivals are counted in windows of ``window_s`` seconds. Under the reference rate λ0 a window holds
Poisson(λ0·w) arrivals; the detector tests λ0 against λ0·(1+δ) (up) and λ0/(1+δ) (down), δ the
``band``. One window with n arrivals adds to the side with alternative λ1

    ℓ(n) = n·ln(λ1/λ0) − (λ1 − λ0)·w,      S ← max(0, S + ℓ(n)),

and the side alarms once S > h. Lorden's bound gives each side a mean run length of at least e^h
windows under λ0, so ``h = ln(2 / p)`` keeps the false alarms of both sides below ``p`` per window;
:func:`cusum_threshold` sets ``p`` from a target in false alarms per hour. A shift to rate λ is
found after about h / E_λ[ℓ] windows (:func:`expected_delay_s`). The rate after the change is
estimated from the windows since the alarming side last stood at 0 (the change-point estimate).

Over-dispersed traffic (real traces are burstier than Poisson within minutes: the variance of a
window's count exceeds its mean by the Fano factor φ > 1) makes the Poisson LLR too large, so bursts
read as rate changes. The quasi-Poisson CUSUM divides each step by φ (``dispersion``; McCullagh &
Nelder's quasi-likelihood): the false-alarm rate holds again, and a shift is found φ times later.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np


def cusum_threshold(false_alarms_per_hour: float, window_s: float) -> float:
    """h such that both sides together raise at most ``false_alarms_per_hour`` (Lorden's bound).

    >>> round(cusum_threshold(0.01, 10.0), 2)   # p = 0.01 × 10/3600 per window; h = ln(2/p)
    11.18
    """
    if not (false_alarms_per_hour > 0 and window_s > 0):
        raise ValueError("false_alarms_per_hour and window_s must be positive")
    per_window = false_alarms_per_hour * window_s / 3600.0
    return math.log(2.0 / min(per_window, 1.0))


def drift_per_window(reference_per_s: float, alternative_per_s: float, true_per_s: float, window_s: float) -> float:
    """E[ℓ(n)] for n ~ Poisson(true·w): the CUSUM's mean step when the rate is ``true_per_s``."""
    log_ratio = math.log(alternative_per_s / reference_per_s)
    return (true_per_s * log_ratio - (alternative_per_s - reference_per_s)) * window_s


def expected_delay_s(
    reference_per_s: float, true_per_s: float, band: float, threshold: float, window_s: float, dispersion: float = 1.0
) -> float:
    """Wald's approximation of the detection delay, φ·h / E[ℓ] windows (plus the window in progress),
    for a shift from ``reference_per_s`` to ``true_per_s``; ``inf`` if that side's drift is ≤ 0.

    >>> round(expected_delay_s(1.0, 3.0, 0.5, 11.18, 10.0), 1)   # 3× up, tuned for 1.5×
    25.6
    """
    alternative = reference_per_s * (1 + band) if true_per_s > reference_per_s else reference_per_s / (1 + band)
    drift = drift_per_window(reference_per_s, alternative, true_per_s, window_s)
    return math.inf if drift <= 0 else (dispersion * threshold / drift + 1.0) * window_s


def change_point(counts: Sequence[int]) -> int:
    """The index k ≥ 1 that best splits ``counts`` into two Poisson segments of their own rates
    (maximum likelihood: Σ over the segments of n·ln(n/windows)): where the new regime begins. The
    CUSUM's own segment starts where its statistic last stood at 0, which for a shift larger than the
    band it is tuned to often lies windows before the change, and its rate estimate is then low.

    >>> change_point([2, 1, 2, 2, 6, 5, 7])
    4
    """
    n = np.cumsum(np.asarray(counts, dtype=float))
    total, size = n[-1], len(counts)
    k = np.arange(1, size)
    before, after = n[:-1], total - n[:-1]
    with np.errstate(divide="ignore", invalid="ignore"):
        ll = np.nan_to_num(before * np.log(before / k)) + np.nan_to_num(after * np.log(after / (size - k)))
    return int(k[np.argmax(ll)]) if size > 1 else 0


@dataclass(frozen=True, slots=True)
class Alarm:
    """A detected shift: ``direction`` "up" or "down", the rate estimated since the change, and
    how many windows ago the change began (the windows that estimate uses)."""

    direction: str
    rate_per_s: float
    num_windows: int


class PoissonCusum:
    """Two-sided CUSUM on windowed Poisson counts (module docstring); one owner feeds it counts.
    ``threshold_up``: the up side's own threshold (default ``threshold``), for an asymmetric test.

    >>> d = PoissonCusum(reference_per_s=1.0, window_s=10.0, band=0.5, threshold=5.0)
    >>> [d.update(10) for _ in range(3)]          # on target: no alarm
    [None, None, None]
    >>> next(a for a in (d.update(30) for _ in range(10)) if a)   # 3× the rate
    Alarm(direction='up', rate_per_s=3.0, num_windows=1)
    """

    def __init__(
        self,
        reference_per_s: float,
        window_s: float,
        band: float,
        threshold: float,
        dispersion: float = 1.0,
        threshold_up: float | None = None,
    ):
        up = threshold if threshold_up is None else threshold_up
        if not (window_s > 0 and band > 0 and threshold > 0 and up > 0 and dispersion >= 1):
            raise ValueError("window_s, band and thresholds must be positive, dispersion ≥ 1")
        self.window_s, self.band, self.threshold = window_s, band, threshold
        self.thresholds = {"up": up, "down": threshold}  # the up side may alarm sooner (asymmetric)
        self.dispersion = dispersion  # φ: each step's LLR is divided by it (module docstring)
        self.reset(reference_per_s)

    def reset(self, reference_per_s: float) -> None:
        """Start afresh, testing against ``reference_per_s``."""
        if not (math.isfinite(reference_per_s) and reference_per_s > 0):
            raise ValueError(f"reference rate must be a positive number, got {reference_per_s!r}")
        self.reference_per_s = reference_per_s
        w, up, down = self.window_s, reference_per_s * (1 + self.band), reference_per_s / (1 + self.band)
        self._sides = {
            "up": (math.log(up / reference_per_s), (up - reference_per_s) * w),
            "down": (math.log(down / reference_per_s), (down - reference_per_s) * w),
        }
        self.statistic = {"up": 0.0, "down": 0.0}
        self._segment = {"up": (0, 0), "down": (0, 0)}  # (arrivals, windows) since S last stood at 0

    def recentre(self, reference_per_s: float) -> None:
        """Test against ``reference_per_s`` from now on, keeping the statistics."""
        statistic, segment = dict(self.statistic), dict(self._segment)
        self.reset(reference_per_s)
        self.statistic, self._segment = statistic, segment

    def update(self, count: int) -> Alarm | None:
        """Add one window's arrival count; an :class:`Alarm` while a side is above the threshold."""
        alarm: Alarm | None = None
        for side, (log_ratio, offset) in self._sides.items():
            s = self.statistic[side] + (count * log_ratio - offset) / self.dispersion
            if s <= 0:
                self.statistic[side], self._segment[side] = 0.0, (0, 0)
                continue
            arrivals, windows = self._segment[side]
            self.statistic[side], self._segment[side] = s, (arrivals + count, windows + 1)
            if s > self.thresholds[side] and alarm is None:
                arrivals, windows = self._segment[side]
                alarm = Alarm(side, max(arrivals, 1) / (windows * self.window_s), windows)
        return alarm
