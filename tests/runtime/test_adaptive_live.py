"""Adapting to load, live (issue 9, part 4): ``chainserve serve --adapt`` started as a user does, on the
emulated backend, under Poisson requests whose rate steps 4 → 12 → 4 per second.

At 4/s the plan is one chain over two servers (ν ≈ 9.6/s, unstable at 12/s); at 12/s it is c = 3
over all six (tests/runtime/data/adaptive-step.yaml). The plan must change (logged, at ``/plan``,
counted in ``/metrics``), no request may be lost or cut, and once the new plan is in force the mean
response must be within 20 % of a server planned for 12/s from the start (same load, same cluster
with its rate set to 12). About 90 s.
"""

from __future__ import annotations

import asyncio
import time

import httpx
import numpy as np
import pytest
from tests.runtime.conftest import DATA, serving

from chainserve.measure.bench import BenchRequest, RequestResult, run_bench

OUTPUT_TOKENS = 4
LOW, HIGH = 4.0, 12.0
#: Requests that arrive this long after the new plan is in force are compared with the reference
#: (the backlog of the detection and migration time drains first).
SETTLE_S = 4.0


def poisson(profile: list[tuple[float, float]], seed: int) -> list[BenchRequest]:
    """Arrivals of a piecewise-constant rate: ``profile`` is (seconds, requests/s) per phase."""
    rng, times, start = np.random.default_rng(seed), [], 0.0
    for duration_s, rate in profile:
        t = start + rng.exponential(1 / rate)
        while t < start + duration_s:
            times.append(t)
            t += rng.exponential(1 / rate)
        start += duration_s
    return [BenchRequest(float(t), 8, OUTPUT_TOKENS) for t in times]


def mean_response(results: list[RequestResult], since_s: float, until_s: float) -> float:
    return float(np.mean([r.e2e_s for r in results if since_s <= r.sent_at_s < until_s]))


def assert_complete(results: list[RequestResult]) -> None:
    """Every request answered with all its tokens (none lost, none cut short)."""
    failed = [r.error for r in results if not r.ok]
    assert not failed, failed[:3]
    assert all(r.output_tokens == OUTPUT_TOKENS and r.finish_reason == "length" for r in results)


@pytest.mark.slow
def test_the_plan_follows_a_rate_step_and_nothing_is_lost(tmp_path) -> None:
    low_s, high_s, back_s = 8.0, 32.0, 10.0
    requests = poisson([(low_s, LOW), (high_s, HIGH), (back_s, LOW)], seed=3)
    adapt = ("--adapt", "--adapt-window-s", "1", "--adapt-min-dwell-s", "5", "--max-waiting", "5000")
    with serving(str(DATA / "adaptive-step.yaml"), "--backend", "emulated", *adapt, tmp_path=tmp_path) as served:
        assert len(served.get("/plan")["servers"]) == 2
        began = time.time()
        report = asyncio.run(run_bench(served.url, requests, progress=False))
        plan = served.get("/plan")
        metrics = httpx.get(served.url + "/metrics").text
    log = (tmp_path / "serve.err").read_text()
    changes = plan["changes"]
    print("plan changes:", [(round(c["at"] - began, 1), c["reason"], c["detail"]) for c in changes])
    assert_complete(list(report.results))
    assert changes and changes[0]["reason"] == "rate_up" and changes[0]["kind"] == "replace"
    assert "plan change (rate_up: replace" in log
    counts = {c["reason"]: sum(d["reason"] == c["reason"] for d in changes) for c in changes}
    for reason, count in counts.items():
        assert f'chainserve:plan_changes_total{{reason="{reason}"}} {float(count)}' in metrics

    in_force_s = changes[0]["at"] - began
    assert low_s < in_force_s < low_s + high_s - 10, "the change must come early enough to measure"
    results = list(report.results)
    after = mean_response(results, in_force_s + SETTLE_S, low_s + high_s)
    after_all = mean_response(results, in_force_s, low_s + high_s)
    before = mean_response(results, 0.0, low_s)

    reference_requests = poisson([(16.0, HIGH)], seed=4)
    (tmp_path / "ref").mkdir()
    with serving(str(DATA / "adaptive-step-high.yaml"), "--backend", "emulated", tmp_path=tmp_path / "ref") as ref:
        assert len(ref.get("/plan")["servers"]) == 6
        reference_report = asyncio.run(run_bench(ref.url, reference_requests, progress=False))
    assert_complete(list(reference_report.results))
    reference = mean_response(list(reference_report.results), SETTLE_S, 16.0)
    print(
        f"mean response: before {before:.3f} s (at {LOW:g}/s), after the change {after:.3f} s "
        f"({after_all:.3f} s counting the backlog), planned for {HIGH:g}/s from the start {reference:.3f} s; "
        f"change in force {in_force_s:.1f} s after the start (rate step at {low_s:g} s)"
    )
    assert after <= 1.2 * reference
