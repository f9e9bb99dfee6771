"""Online estimates from arrivals: counts per window for the change detector, and the mean rate and
prompt/output lengths since the plan last changed (paper §1's λ, l_in, l_out, measured).

Time enters only through the arrival and decision times the driver passes (its clock, seconds); the
first time seen is the origin of the windows ``[t0 + i·w, t0 + (i+1)·w)``.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np


def fano_factor(counts: Sequence[int], group: int) -> float:
    """Fano factor (variance over mean) of the arrivals in blocks of ``group`` consecutive windows,
    from the differences of successive blocks: E[(S_i − S_{i−1})²] = 2·Var S when the rate is level,
    and a step or a slow drift adds to one difference only, so it barely inflates the estimate.
    1 for Poisson counts; ``nan`` before two blocks or without arrivals.

    >>> fano_factor([5, 5, 5, 5], 2), fano_factor([0, 4, 0, 4], 1)   # level; swings of ±2 around 2
    (0.0, 4.0)
    """
    sums = np.add.reduceat(np.asarray(counts, dtype=float), np.arange(0, len(counts) - group + 1, group))
    sums = sums[: len(counts) // group]
    if len(sums) < 2 or sums.sum() == 0:
        return math.nan
    return float(np.mean(np.diff(sums) ** 2) / (2.0 * sums.mean()))


@dataclass(frozen=True, slots=True)
class Estimate:
    """Measured since ``since_s``: ``num_arrivals`` over ``span_s`` seconds, the rate λ̂ (``nan``
    before any time has passed) and the mean prompt/output tokens (``nan`` without arrivals)."""

    since_s: float
    span_s: float
    num_arrivals: int
    rate_per_s: float
    prompt_tokens: float
    output_tokens: float


class ArrivalWindows:
    """Arrival counts per window, handed out once each window has closed, and running means.

    >>> w = ArrivalWindows(10.0)
    >>> for t in (0.0, 1.0, 12.0, 35.0):
    ...     w.add(t, 100, 10)
    >>> w.closed_counts(31.0)      # windows [0,10), [10,20), [20,30) have closed
    [2, 1, 0]
    >>> w.estimate(40.0).rate_per_s, w.estimate(40.0).prompt_tokens
    (0.1, 100.0)
    """

    def __init__(self, window_s: float):
        if not (math.isfinite(window_s) and window_s > 0):
            raise ValueError(f"window_s must be a positive number, got {window_s!r}")
        self.window_s = window_s
        self.origin_s: float | None = None
        self.next_window = 0  # first window not yet handed out
        self._counts: Counter[int] = Counter()
        self.restart(math.nan)

    def _window(self, t: float) -> int:
        if self.origin_s is None:
            self.origin_s = t
        return math.floor((t - self.origin_s) / self.window_s)

    def add(self, t: float, prompt_tokens: int, output_tokens: int) -> None:
        """One arrival at ``t`` (an arrival in a window already handed out counts in the next one)."""
        self._counts[max(self._window(t), self.next_window)] += 1
        if math.isnan(self._since_s):
            self._since_s = t
        self._num += 1
        self._prompt += prompt_tokens
        self._output += output_tokens

    def closed_counts(self, t: float) -> list[int]:
        """Counts of the windows that closed by ``t`` and were not handed out before, in order."""
        last = self._window(t)  # windows < last have closed
        counts = [self._counts.pop(i, 0) for i in range(self.next_window, last)]
        self.next_window = max(self.next_window, last)
        return counts

    def restart(self, t: float) -> None:
        """Restart the running means at ``t`` (after a plan change; ``nan``: at the next arrival)."""
        self._since_s, self._num, self._prompt, self._output = t, 0, 0, 0

    def estimate(self, t: float) -> Estimate:
        """The running estimate at ``t``."""
        span = t - self._since_s if not math.isnan(self._since_s) else 0.0
        n = self._num
        return Estimate(
            self._since_s,
            span,
            n,
            n / span if span > 0 else math.nan,
            self._prompt / n if n else math.nan,
            self._output / n if n else math.nan,
        )
