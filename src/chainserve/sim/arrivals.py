"""Arrival processes for the simulator: Poisson (paper §1), Gamma renewal with a burstiness knob,
and replay of the Azure LLM inference trace (paper §4.2).

A process is a frozen description; :meth:`sample` realises it with the numpy ``Generator`` it is
given into an :class:`Arrivals` stream: arrival times (seconds, non-decreasing) and each job's
prompt and output token counts. Samples are never clipped.
"""

from __future__ import annotations

import csv
import math
from array import array
from collections.abc import Iterator
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Protocol

import numpy as np

from chainserve.model.spec import Workload

TRACE_COLUMNS = ("TIMESTAMP", "ContextTokens", "GeneratedTokens")


@dataclass(frozen=True, slots=True)
class Arrivals:
    """A realised arrival stream: ``times_s`` (non-decreasing), ``prompt_tokens`` l_in and
    ``output_tokens`` l_out (≥ 1) per job, in arrival order."""

    times_s: np.ndarray
    prompt_tokens: np.ndarray
    output_tokens: np.ndarray

    def __post_init__(self) -> None:
        n = len(self.times_s)
        if len(self.prompt_tokens) != n or len(self.output_tokens) != n:
            raise ValueError("arrivals: times_s, prompt_tokens and output_tokens differ in length")
        if n and (np.any(np.diff(self.times_s) < 0) or self.times_s[0] < 0):
            raise ValueError("arrivals: times_s must be non-negative and non-decreasing")
        if n and (self.prompt_tokens.min() < 0 or self.output_tokens.min() < 1):
            raise ValueError("arrivals: need prompt_tokens ≥ 0 and output_tokens ≥ 1")

    def __len__(self) -> int:
        return len(self.times_s)

    def columns(self) -> tuple[array, array, array]:
        """The three columns as typed Python arrays (``'d'``, ``'q'``, ``'q'``): a memory copy, and
        element access as fast as a list's, for the simulator's event loop."""
        return (
            array("d", np.ascontiguousarray(self.times_s, dtype=np.float64).tobytes()),
            array("q", np.ascontiguousarray(self.prompt_tokens, dtype=np.int64).tobytes()),
            array("q", np.ascontiguousarray(self.output_tokens, dtype=np.int64).tobytes()),
        )

    def __iter__(self) -> Iterator[tuple[float, int, int]]:
        """(arrival time, prompt_tokens, output_tokens) per job."""
        return zip(self.times_s.tolist(), self.prompt_tokens.tolist(), self.output_tokens.tolist(), strict=True)


class ArrivalProcess(Protocol):
    """Anything that realises ``num_jobs`` arrivals (``None``: all it has, for finite traces)."""

    def sample(self, workload: Workload, num_jobs: int | None, rng: np.random.Generator) -> Arrivals: ...


def _renewal(gaps_s: np.ndarray, workload: Workload) -> Arrivals:
    """Arrivals after the given gaps, every job with the workload's mean lengths."""
    n = len(gaps_s)
    return Arrivals(
        np.cumsum(gaps_s),
        np.full(n, workload.prompt_tokens, dtype=np.int64),
        np.full(n, workload.output_tokens, dtype=np.int64),
    )


def _check_rate(rate_per_s: float | None) -> None:
    if rate_per_s is not None and not (math.isfinite(rate_per_s) and rate_per_s > 0):
        raise ValueError(f"rate_per_s: must be a positive number, got {rate_per_s!r}")


def _need_count(num_jobs: int | None) -> int:
    if num_jobs is None or num_jobs < 1:
        raise ValueError(f"num_jobs: a renewal process needs a positive job count, got {num_jobs!r}")
    return num_jobs


@dataclass(frozen=True, slots=True)
class ReplayArrivals:
    """An :class:`ArrivalProcess` that always gives the same stream (the requests a live run sent)."""

    arrivals: Arrivals

    def sample(self, workload: Workload, num_jobs: int | None, rng: np.random.Generator) -> Arrivals:
        return self.arrivals


@dataclass(frozen=True, slots=True)
class PoissonArrivals:
    """Poisson arrivals of rate ``rate_per_s`` (default: the workload's λ); every job has the
    workload's mean token lengths.

    >>> a = PoissonArrivals(2.0).sample(Workload(1.0), 20_000, np.random.default_rng(0))
    >>> round(float(len(a) / a.times_s[-1]), 1)
    2.0
    """

    rate_per_s: float | None = None

    def __post_init__(self) -> None:
        _check_rate(self.rate_per_s)

    def sample(self, workload: Workload, num_jobs: int | None, rng: np.random.Generator) -> Arrivals:
        rate = self.rate_per_s or workload.arrival_rate_per_s
        return _renewal(rng.exponential(1.0 / rate, _need_count(num_jobs)), workload)


@dataclass(frozen=True, slots=True)
class GammaArrivals:
    """Renewal arrivals with Gamma inter-arrival times of mean 1/λ and coefficient of variation
    ``cv`` (shape 1/cv², scale cv²/λ): ``cv = 1`` is Poisson, ``cv > 1`` burstier, ``cv < 1`` smoother.

    >>> a = GammaArrivals(cv=2.0, rate_per_s=1.0).sample(Workload(1.0), 100_000, np.random.default_rng(0))
    >>> gaps = np.diff(a.times_s)
    >>> round(float(gaps.std() / gaps.mean()), 1)
    2.0
    """

    cv: float = 1.0
    rate_per_s: float | None = None

    def __post_init__(self) -> None:
        if not (math.isfinite(self.cv) and self.cv > 0):
            raise ValueError(f"cv: must be a positive number, got {self.cv!r}")
        _check_rate(self.rate_per_s)

    def sample(self, workload: Workload, num_jobs: int | None, rng: np.random.Generator) -> Arrivals:
        rate = self.rate_per_s or workload.arrival_rate_per_s
        shape = 1.0 / self.cv**2
        gaps = rng.gamma(shape, 1.0 / (rate * shape), _need_count(num_jobs))
        return _renewal(gaps, workload)


def bundled_trace_path() -> Path:
    """The Azure LLM inference trace 2023 (code) shipped with the package."""
    return Path(str(resources.files("chainserve") / "data" / "azure_code_2023.csv"))


def read_azure_trace(path: str | Path | None = None) -> Arrivals:
    """Read a trace in the Azure LLM format (``TIMESTAMP,ContextTokens,GeneratedTokens``), times in
    seconds since its first request. ``None``: the bundled trace.

    >>> t = read_azure_trace()
    >>> len(t), float(t.times_s[0]), round(float(len(t) / t.times_s[-1]), 2)
    (8819, 0.0, 2.57)
    """
    with open(path or bundled_trace_path(), newline="") as f:
        rows = csv.reader(f)
        header = tuple(c.strip() for c in next(rows, ()))
        if header != TRACE_COLUMNS:
            raise ValueError(f"trace: expected columns {','.join(TRACE_COLUMNS)}, got {','.join(header)}")
        stamps, prompt, output = zip(
            *((r[0].strip().replace(" ", "T"), int(r[1]), int(r[2])) for r in rows if r), strict=True
        )
    ns = np.array(stamps, dtype="datetime64[ns]").astype(np.int64)
    times = (ns - ns[0]) / 1e9
    order = np.argsort(times, kind="stable")
    return Arrivals(times[order], np.array(prompt)[order], np.array(output)[order])


@dataclass(frozen=True, slots=True)
class TraceArrivals:
    """Replay rows ``start .. start+count-1`` of a trace (``path=None``: the bundled one), times
    shifted to start at 0 and multiplied by ``time_scale`` (0.5 replays twice as fast). The workload's
    λ is ignored; ``sample(num_jobs)`` takes the first ``num_jobs`` of the slice (``None``: all).
    """

    path: str | Path | None = None
    time_scale: float = 1.0
    start: int = 0
    count: int | None = None

    def __post_init__(self) -> None:
        if not (math.isfinite(self.time_scale) and self.time_scale > 0):
            raise ValueError(f"time_scale: must be a positive number, got {self.time_scale!r}")
        if self.start < 0 or (self.count is not None and self.count < 1):
            raise ValueError(f"start/count: need start ≥ 0 and count ≥ 1, got {self.start}, {self.count}")

    def sample(self, workload: Workload, num_jobs: int | None, rng: np.random.Generator) -> Arrivals:
        trace = read_azure_trace(self.path)
        end = len(trace) if self.count is None else self.start + self.count
        if end > len(trace) or self.start >= len(trace):
            raise ValueError(f"start/count: slice {self.start}..{end - 1} exceeds the trace's {len(trace)} rows")
        if num_jobs is not None and num_jobs > end - self.start:
            raise ValueError(f"num_jobs: {num_jobs} requested, the slice has {end - self.start}")
        end = end if num_jobs is None else self.start + num_jobs
        times = trace.times_s[self.start : end]
        return Arrivals(
            (times - times[0]) * self.time_scale,
            trace.prompt_tokens[self.start : end],
            trace.output_tokens[self.start : end],
        )


@dataclass(frozen=True, slots=True)
class PiecewiseArrivals:
    """Poisson arrivals whose rate is ``rates_per_s[i]`` from second ``starts_s[i]`` on (beyond the
    paper: load that changes over time). ``starts_s`` begins at 0 and increases; the last rate holds
    until ``duration_s``. ``sample(num_jobs)``: the first ``num_jobs`` arrivals (the last rate going on
    as long as needed); ``None``: every arrival before ``duration_s``. Every job has the workload's
    mean token lengths.

    Realised by inversion: unit-rate Poisson epochs mapped through the inverse of the cumulative rate
    Λ(t) = ∫₀ᵗ λ, which is piecewise linear.

    >>> a = PiecewiseArrivals((0.0, 100.0), (1.0, 3.0), 200.0).sample(Workload(1.0), None, np.random.default_rng(0))
    >>> int(np.sum(a.times_s < 100)), int(np.sum(a.times_s >= 100))   # about 100 and 300
    (97, 311)
    """

    starts_s: tuple[float, ...]
    rates_per_s: tuple[float, ...]
    duration_s: float | None = None

    def __post_init__(self) -> None:
        if not self.starts_s or len(self.starts_s) != len(self.rates_per_s):
            raise ValueError("rate profile: need one rate per start time, at least one")
        if self.starts_s[0] != 0 or any(b <= a for a, b in zip(self.starts_s, self.starts_s[1:], strict=False)):
            raise ValueError(f"rate profile: start times must begin at 0 and increase, got {self.starts_s}")
        for rate in self.rates_per_s:
            _check_rate(rate)
        if self.duration_s is not None and not (math.isfinite(self.duration_s) and self.duration_s > 0):
            raise ValueError(f"duration_s: must be a positive number, got {self.duration_s!r}")

    @property
    def mean_rate_per_s(self) -> float:
        """Λ(duration)/duration (needs ``duration_s``)."""
        if self.duration_s is None:
            raise ValueError("duration_s: a mean rate needs the profile's duration")
        return self._cumulative(self.duration_s) / self.duration_s

    @property
    def peak_rate_per_s(self) -> float:
        """The highest rate in force before ``duration_s``."""
        end = math.inf if self.duration_s is None else self.duration_s
        return max(r for s, r in zip(self.starts_s, self.rates_per_s, strict=True) if s < end)

    def _cumulative(self, t: float) -> float:
        starts = np.asarray(self.starts_s)
        lengths = np.clip(np.minimum(np.append(starts[1:], math.inf), t) - starts, 0.0, None)
        return float(np.dot(lengths, self.rates_per_s))

    def sample(self, workload: Workload, num_jobs: int | None, rng: np.random.Generator) -> Arrivals:
        if num_jobs is None:
            if self.duration_s is None:
                raise ValueError("num_jobs: a rate profile without duration_s needs a job count")
            count = rng.poisson(self._cumulative(self.duration_s))
            # given their number, Poisson epochs on [0, Λ(T)] are sorted uniforms
            epochs = np.sort(rng.uniform(0.0, self._cumulative(self.duration_s), count))
        else:
            epochs = np.cumsum(rng.exponential(1.0, _need_count(num_jobs)))
        knots_t = np.asarray(self.starts_s, dtype=float)
        knots_cum = np.array([self._cumulative(t) for t in self.starts_s])
        segment = np.searchsorted(knots_cum, epochs, side="right") - 1
        rates = np.asarray(self.rates_per_s, dtype=float)[segment]
        times = knots_t[segment] + (epochs - knots_cum[segment]) / rates
        n = len(times)
        return Arrivals(
            times,
            np.full(n, workload.prompt_tokens, dtype=np.int64),
            np.full(n, workload.output_tokens, dtype=np.int64),
        )


def daily_profile(
    trough_per_s: float, peak_per_s: float, period_s: float = 86_400.0, steps: int = 24, days: int = 1
) -> PiecewiseArrivals:
    """An operator's day as ``steps`` piecewise-constant rates per ``period_s``: a cosine from the
    trough at the start of the period to the peak at its middle, repeated for ``days``.

    >>> p = daily_profile(1.0, 3.0, period_s=24.0, steps=4)
    >>> [round(r, 2) for r in p.rates_per_s], p.starts_s
    ([1.29, 2.71, 2.71, 1.29], (0.0, 6.0, 12.0, 18.0))
    """
    if not 0 < trough_per_s <= peak_per_s or steps < 1 or days < 1:
        raise ValueError("daily profile: need 0 < trough ≤ peak, steps ≥ 1 and days ≥ 1")
    step_s = period_s / steps
    mid = (np.arange(steps) + 0.5) / steps  # each step's rate is the cosine at its middle
    rates = trough_per_s + (peak_per_s - trough_per_s) * 0.5 * (1 - np.cos(2 * np.pi * mid))
    return PiecewiseArrivals(
        tuple(float(i * step_s) for i in range(steps * days)),
        tuple(float(r) for r in np.tile(rates, days)),
        period_s * days,
    )
