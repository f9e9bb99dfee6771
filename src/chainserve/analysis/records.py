"""Job records and the metrics computed from them, shared by the simulator and the serving runtime.

A run produces one :class:`JobRecord` per served request (paper §1: response = waiting + service);
:func:`summarize` turns them into a :class:`Summary` (means, percentiles, throughput, per-chain
utilisation and a confidence interval for the mean response time). Nothing here knows how the
records were produced.

Metric definitions (each defined once, here):

* response time ``finished_at − arrived_at``; waiting time ``started_at − arrived_at``; service time
  ``finished_at − started_at`` (a job restarted after a failure keeps its arrival time, so the lost
  service counts as waiting);
* the *window* is ``[first measured arrival, last measured finish]``; throughput is measured jobs per
  second of window;
* utilisation of chain k is its busy job-server time inside the window over ``c_k × window``;
* percentiles use linear interpolation between order statistics (numpy's default).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True, slots=True)
class JobRecord:
    """One served request: when it arrived, started and finished service, and where it ran.

    ``chain``: the plan's chain index (``None`` for routers that compose a path per request);
    ``servers``: the servers of its route, in block order.
    """

    job_id: int
    arrived_at: float
    started_at: float
    finished_at: float
    chain: int | None
    servers: tuple[int, ...]
    prompt_tokens: int
    output_tokens: int

    def __post_init__(self) -> None:
        if not self.arrived_at <= self.started_at <= self.finished_at:
            raise ValueError(f"job {self.job_id}: need arrived_at ≤ started_at ≤ finished_at")

    @property
    def response_s(self) -> float:
        return self.finished_at - self.arrived_at

    @property
    def waiting_s(self) -> float:
        return self.started_at - self.arrived_at

    @property
    def service_s(self) -> float:
        return self.finished_at - self.started_at


@dataclass(frozen=True, slots=True)
class Stats:
    """Mean and percentiles of one metric, in seconds."""

    mean_s: float
    p50_s: float
    p95_s: float
    p99_s: float

    @classmethod
    def of(cls, values_s: np.ndarray) -> Stats:
        p50, p95, p99 = np.percentile(values_s, [50, 95, 99])
        return cls(float(np.mean(values_s)), float(p50), float(p95), float(p99))

    def to_json(self) -> dict[str, float]:
        return {"mean": self.mean_s, "p50": self.p50_s, "p95": self.p95_s, "p99": self.p99_s}


@dataclass(frozen=True, slots=True)
class Interval:
    """A confidence interval ``mean ± half_width`` at level ``confidence``."""

    mean: float
    half_width: float
    confidence: float

    @property
    def low(self) -> float:
        return self.mean - self.half_width

    @property
    def high(self) -> float:
        return self.mean + self.half_width

    def contains(self, value: float) -> bool:
        return self.low <= value <= self.high


def replications_ci(means: Sequence[float] | np.ndarray, confidence: float = 0.95) -> Interval:
    """Student-t interval for the mean from independent replications (one mean per seed).

    >>> ci = replications_ci([1.0, 2.0, 3.0])
    >>> ci.mean, round(ci.half_width, 4)  # t_{0.975, 2} · s/√3 = 4.3027 · 1/√3
    (2.0, 2.4841)
    """
    x = np.asarray(means, dtype=float)
    if x.size < 2:
        raise ValueError(f"means: need at least 2 replications, got {x.size}")
    if not 0 < confidence < 1:
        raise ValueError(f"confidence: must lie in (0, 1), got {confidence}")
    from scipy import stats  # ~2 s to import: only when an interval is asked for, not at CLI start-up

    t = stats.t.ppf(0.5 + confidence / 2, df=x.size - 1)
    return Interval(float(x.mean()), float(t * x.std(ddof=1) / math.sqrt(x.size)), confidence)


def batch_means_ci(values: Sequence[float] | np.ndarray, num_batches: int = 20, confidence: float = 0.95) -> Interval:
    """Batch-means interval for the mean of one long, correlated run (values in arrival order).

    The run is cut into ``num_batches`` contiguous batches of equal size (the first ``n mod B``
    values are dropped, they are the oldest); the batch means are treated as independent
    replications. Sound when a batch is much longer than the run's correlation time.

    >>> ci = batch_means_ci(np.arange(40.0), num_batches=4)
    >>> ci.mean, ci.half_width > 0
    (19.5, True)
    """
    x = np.asarray(values, dtype=float)
    if num_batches < 2 or x.size < num_batches:
        raise ValueError(f"values: need at least num_batches ≥ 2 values, got {x.size} for {num_batches}")
    size = x.size // num_batches
    batches = x[x.size - size * num_batches :].reshape(num_batches, size).mean(axis=1)
    ci = replications_ci(batches, confidence)
    return Interval(float(x[x.size - size * num_batches :].mean()), ci.half_width, confidence)


@dataclass(frozen=True, slots=True)
class Summary:
    """What a run achieved; see the module docstring for the definitions.

    ``utilisation``: one value per chain index (empty when no capacities were given);
    ``response_mean_ci``: batch-means interval for the mean response time (``None`` on short runs).
    """

    num_requests: int
    window_s: float
    throughput_per_s: float
    response: Stats
    waiting: Stats
    service: Stats
    utilisation: tuple[float, ...]
    response_mean_ci: Interval | None

    def to_json(self) -> dict[str, object]:
        """A JSON-ready dict: ``requests``, ``throughput``, ``response``/``waiting``/``service`` as
        ``{mean, p50, p95, p99}`` in seconds, plus ``window_s``, ``utilisation`` and the interval."""
        ci = self.response_mean_ci
        return {
            "requests": self.num_requests,
            "throughput": self.throughput_per_s,
            "response": self.response.to_json(),
            "waiting": self.waiting.to_json(),
            "service": self.service.to_json(),
            "window_s": self.window_s,
            "utilisation": list(self.utilisation),
            "response_mean_ci": None if ci is None else {"low": ci.low, "high": ci.high, "confidence": ci.confidence},
        }


def _busy_s(
    started_at: np.ndarray, finished_at: np.ndarray, chain: np.ndarray, num_chains: int, window: tuple[float, float]
) -> np.ndarray:
    """Service time of each chain's jobs that falls inside the window."""
    overlap = np.minimum(finished_at, window[1]) - np.maximum(started_at, window[0])
    ok = (chain >= 0) & (chain < num_chains)
    return np.bincount(chain[ok], weights=np.maximum(overlap[ok], 0.0), minlength=num_chains)


def summarize_arrays(
    arrived_at: np.ndarray,
    started_at: np.ndarray,
    finished_at: np.ndarray,
    chain: np.ndarray | None = None,
    capacities: Sequence[int] = (),
    warmup: int = 0,
    confidence: float = 0.95,
    num_batches: int = 20,
) -> Summary:
    """:func:`summarize` on column arrays in arrival order (chain ``-1`` = no chain).

    Jobs ``warmup:`` are measured; all jobs count towards the busy time inside the window.
    """
    arrived_at, started_at, finished_at = (np.asarray(a, dtype=float) for a in (arrived_at, started_at, finished_at))
    if not 0 <= warmup < arrived_at.size:
        raise ValueError(f"records: nothing to summarise ({arrived_at.size} records, warmup {warmup})")
    a, s, f = arrived_at[warmup:], started_at[warmup:], finished_at[warmup:]
    if np.any(s < a) or np.any(f < s):
        raise ValueError("records: need arrived_at ≤ started_at ≤ finished_at")
    window = (float(a.min()), float(f.max()))
    length = window[1] - window[0]
    response = f - a
    utilisation: tuple[float, ...] = ()
    if len(capacities) and length > 0:
        chain = np.full(arrived_at.size, -1) if chain is None else np.asarray(chain, dtype=int)
        busy = _busy_s(started_at, finished_at, chain, len(capacities), window)
        utilisation = tuple(float(b / (c * length)) for b, c in zip(busy, capacities, strict=True))
    return Summary(
        num_requests=int(a.size),
        window_s=length,
        throughput_per_s=a.size / length if length > 0 else math.inf,
        response=Stats.of(response),
        waiting=Stats.of(s - a),
        service=Stats.of(f - s),
        utilisation=utilisation,
        response_mean_ci=batch_means_ci(response, num_batches, confidence)
        if response.size >= 2 * num_batches
        else None,
    )


def summarize(
    records: Sequence[JobRecord],
    capacities: Sequence[int] = (),
    warmup: int = 0,
    confidence: float = 0.95,
    num_batches: int = 20,
) -> Summary:
    """Summarise records (taken in arrival order; the first ``warmup`` are not measured).

    ``capacities``: c_k per chain index, for the utilisation; ``confidence``/``num_batches``: the
    batch-means interval of the mean response time.

    >>> recs = [JobRecord(i, float(i), i + 0.5, i + 1.5, 0, (0,), 10, 2) for i in range(4)]
    >>> s = summarize(recs, capacities=[1])
    >>> s.response.mean_s, s.waiting.mean_s, s.window_s  # window: first arrival 0 to last finish 4.5
    (1.5, 0.5, 4.5)
    >>> round(s.throughput_per_s, 3), round(s.utilisation[0], 3)  # 4 jobs, 4 s of service in 4.5 s
    (0.889, 0.889)
    """
    ordered = sorted(records, key=lambda r: (r.arrived_at, r.job_id))
    return summarize_arrays(
        np.array([r.arrived_at for r in ordered]),
        np.array([r.started_at for r in ordered]),
        np.array([r.finished_at for r in ordered]),
        np.array([-1 if r.chain is None else r.chain for r in ordered], dtype=int),
        capacities,
        warmup,
        confidence,
        num_batches,
    )
