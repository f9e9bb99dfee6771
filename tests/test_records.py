"""Job records, summaries and confidence intervals (chainserve.analysis.records)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from scipy.signal import lfilter

from chainserve.analysis.records import (
    JobRecord,
    batch_means_ci,
    replications_ci,
    summarize,
    summarize_arrays,
)


def test_record_times_and_validation():
    r = JobRecord(7, 1.0, 1.5, 4.0, 2, (0, 3), 100, 5)
    assert (r.response_s, r.waiting_s, r.service_s) == (3.0, 0.5, 2.5)
    with pytest.raises(ValueError, match="job 7"):
        JobRecord(7, 1.0, 0.5, 4.0, 2, (0,), 100, 5)


def test_summary_by_hand():
    # chain 0 (c = 1): jobs at [0,1] and [1,3]; chain 1 (c = 2): a job at [0.5, 2.5], waiting 0.5
    records = [
        JobRecord(0, 0.0, 0.0, 1.0, 0, (0,), 10, 1),
        JobRecord(1, 1.0, 1.0, 3.0, 0, (0,), 10, 1),
        JobRecord(2, 0.0, 0.5, 2.5, 1, (1,), 10, 1),
    ]
    s = summarize(records, capacities=[1, 2])
    assert s.num_requests == 3 and s.window_s == 3.0 and s.throughput_per_s == 1.0
    assert s.response.mean_s == pytest.approx(5.5 / 3) and s.waiting.mean_s == pytest.approx(0.5 / 3)
    assert s.service.p50_s == 2.0 and s.response.p50_s == 2.0
    assert s.utilisation == pytest.approx((3.0 / 3.0, 2.0 / 6.0))
    assert s.response_mean_ci is None  # too few records for batch means


def test_warmup_jobs_count_only_towards_busy_time():
    arrived, started, finished = np.array([0.0, 2.0]), np.array([0.0, 3.0]), np.array([3.0, 4.0])
    s = summarize_arrays(arrived, started, finished, np.array([0, 0]), capacities=[1], warmup=1)
    assert s.num_requests == 1 and s.window_s == 2.0 and s.waiting.mean_s == 1.0
    assert s.utilisation == (1.0,)  # window [2, 4]: warm-up job 0 busy in [2, 3], job 1 in [3, 4]
    with pytest.raises(ValueError, match="nothing to summarise"):
        summarize([], capacities=[1])


def test_to_json_is_plain_json():
    rng = np.random.default_rng(0)
    arrived = np.cumsum(rng.exponential(1.0, 200))
    started = arrived + rng.exponential(0.1, 200)
    out = summarize_arrays(arrived, started, started + 1.0).to_json()
    assert json.loads(json.dumps(out)) == out
    assert out["requests"] == 200 and set(out["service"]) == {"mean", "p50", "p95", "p99"}
    assert out["service"]["mean"] == pytest.approx(1.0) and out["response_mean_ci"]["confidence"] == 0.95


def test_confidence_intervals_cover_at_their_level():
    rng = np.random.default_rng(42)
    hits = sum(replications_ci(rng.normal(3.0, 2.0, 10), 0.9).contains(3.0) for _ in range(2_000))
    assert 0.88 < hits / 2_000 < 0.92
    # AR(1) data, strongly correlated: batch means still cover, a naive iid interval would not
    hits = naive = 0
    for _ in range(200):
        x = lfilter([1.0], [1.0, -0.9], rng.normal(0.0, 1.0, 20_000))  # x_t = 0.9 x_{t-1} + ε_t
        hits += batch_means_ci(x, 20, 0.95).contains(0.0)
        naive += abs(x.mean()) <= 1.96 * x.std() / np.sqrt(x.size)
    assert hits >= 180 and naive < 140


def test_interval_arguments_are_checked():
    with pytest.raises(ValueError, match="replications"):
        replications_ci([1.0])
    with pytest.raises(ValueError, match="num_batches"):
        batch_means_ci(np.arange(5.0), num_batches=10)
