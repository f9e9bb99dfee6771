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
"""

from __future__ import annotations

import math
from dataclasses import dataclass


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
    reference_per_s: float, true_per_s: float, band: float, threshold: float, window_s: float
) -> float:
    """Wald's approximation of the detection delay, h / E[ℓ] windows (plus the window in progress),
    for a shift from ``reference_per_s`` to ``true_per_s``; ``inf`` if that side's drift is ≤ 0.

    >>> round(expected_delay_s(1.0, 3.0, 0.5, 11.18, 10.0), 1)   # 3× up, tuned for 1.5×
    25.6
    """
    alternative = reference_per_s * (1 + band) if true_per_s > reference_per_s else reference_per_s / (1 + band)
    drift = drift_per_window(reference_per_s, alternative, true_per_s, window_s)
    return math.inf if drift <= 0 else (threshold / drift + 1.0) * window_s


@dataclass(frozen=True, slots=True)
class Alarm:
    """A detected shift: ``direction`` "up" or "down", the rate estimated since the change, and
    how many windows ago the change began (the windows that estimate uses)."""

    direction: str
    rate_per_s: float
    num_windows: int


class PoissonCusum:
    """Two-sided CUSUM on windowed Poisson counts (module docstring); one owner feeds it counts.

    >>> d = PoissonCusum(reference_per_s=1.0, window_s=10.0, band=0.5, threshold=5.0)
    >>> [d.update(10) for _ in range(3)]          # on target: no alarm
    [None, None, None]
    >>> next(a for a in (d.update(30) for _ in range(10)) if a)   # 3× the rate
    Alarm(direction='up', rate_per_s=3.0, num_windows=1)
    """

    def __init__(self, reference_per_s: float, window_s: float, band: float, threshold: float):
        if not (window_s > 0 and band > 0 and threshold > 0):
            raise ValueError("window_s, band and threshold must be positive")
        self.window_s, self.band, self.threshold = window_s, band, threshold
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
            s = self.statistic[side] + count * log_ratio - offset
            if s <= 0:
                self.statistic[side], self._segment[side] = 0.0, (0, 0)
                continue
            arrivals, windows = self._segment[side]
            self.statistic[side], self._segment[side] = s, (arrivals + count, windows + 1)
            if s > self.threshold and alarm is None:
                arrivals, windows = self._segment[side]
                alarm = Alarm(side, max(arrivals, 1) / (windows * self.window_s), windows)
        return alarm
