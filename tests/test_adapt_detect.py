"""The change detector (chainserve.adapt.detect) on synthetic Poisson streams: its false-alarm rate
stays within the configured target, and it finds a shift of the configured size about as fast as
Wald's approximation says."""

import numpy as np
import pytest

from chainserve.adapt.detect import PoissonCusum, change_point, cusum_threshold, expected_delay_s
from chainserve.adapt.estimate import ArrivalWindows, fano_factor

WINDOW_S, RATE, BAND = 1.0, 5.0, 0.5


def alarms_per_hour(target_per_hour: float, num_windows: int, seed: int) -> float:
    """False alarms per hour on a constant Poisson(RATE) stream (restarted after each alarm)."""
    h = cusum_threshold(target_per_hour, WINDOW_S)
    detector = PoissonCusum(RATE, WINDOW_S, BAND, h)
    alarms = 0
    for count in np.random.default_rng(seed).poisson(RATE * WINDOW_S, num_windows).tolist():
        if detector.update(count) is not None:
            alarms += 1
            detector.reset(RATE)
    return alarms / (num_windows * WINDOW_S / 3600)


@pytest.mark.parametrize("target", [36.0, 360.0])
def test_false_alarm_rate_within_target(target):
    # 2·10^5 one-second windows (55 h): at the 36/h target Lorden's bound allows ~2000 alarms
    measured = alarms_per_hour(target, 200_000, seed=1)
    assert measured <= target, f"{measured:.1f} false alarms per hour, target {target}"


def test_detection_delay_matches_wald():
    """A shift of exactly the band, up and down, from a fresh detector: the mean delay lies within
    25 % of h/E[ℓ] (Wald), and the estimated rate within 25 % of the true one."""
    rng = np.random.default_rng(2)
    h = cusum_threshold(36.0, WINDOW_S)
    for true_rate in (RATE * (1 + BAND), RATE / (1 + BAND)):
        delays, estimates = [], []
        for _ in range(300):
            detector = PoissonCusum(RATE, WINDOW_S, BAND, h)
            for window, count in enumerate(rng.poisson(true_rate * WINDOW_S, 1000).tolist(), start=1):
                alarm = detector.update(count)
                if alarm is not None:
                    delays.append(window * WINDOW_S)
                    estimates.append(alarm.rate_per_s)
                    break
        assert len(delays) == 300
        expected = expected_delay_s(RATE, true_rate, BAND, h, WINDOW_S)
        assert 0.75 * expected <= np.mean(delays) <= 1.25 * expected, (true_rate, np.mean(delays), expected)
        assert abs(np.median(estimates) / true_rate - 1) < 0.25


def test_windows_count_arrivals_once():
    windows = ArrivalWindows(10.0)
    times = np.sort(np.random.default_rng(3).uniform(0, 1000, 500))
    handed = []
    for t in times:
        windows.add(float(t), 10, 2)
        handed += windows.closed_counts(float(t))
    handed += windows.closed_counts(2000.0)
    assert sum(handed) == 500
    assert windows.estimate(float(times[-1])).output_tokens == 2


def bursty_counts(rate: float, fano: float, num_windows: int, rng: np.random.Generator) -> list[int]:
    """Negative-binomial window counts of mean rate·w and variance fano × mean (a Gamma-mixed Poisson)."""
    mean = rate * WINDOW_S
    shape = mean / (fano - 1)
    return rng.poisson(rng.gamma(shape, mean / shape, num_windows)).tolist()


def test_quasi_poisson_cusum_holds_its_false_alarm_rate_on_bursty_counts():
    """Counts 4× over-dispersed: the Poisson CUSUM alarms far above its target; the same detector with
    the dispersion measured from the counts (fano_factor) stays within it."""
    rng = np.random.default_rng(4)
    counts = bursty_counts(RATE, 4.0, 100_000, rng)
    phi = fano_factor(counts, 6)
    assert 3.0 < phi < 5.0
    h = cusum_threshold(36.0, WINDOW_S)

    def rate(dispersion):
        detector, alarms = PoissonCusum(RATE, WINDOW_S, BAND, h, dispersion), 0
        for count in counts:
            if detector.update(count) is not None:
                alarms += 1
                detector.reset(RATE)
        return alarms / (len(counts) * WINDOW_S / 3600)

    assert rate(1.0) > 5 * 36.0
    assert rate(phi) <= 36.0


def test_change_point_finds_a_step_and_dispersion_ignores_it():
    rng = np.random.default_rng(5)
    counts = rng.poisson(2.0, 300).tolist() + rng.poisson(6.0, 30).tolist()
    assert abs(change_point(counts) - 300) <= 3
    assert fano_factor(counts, 6) < 1.5  # the step moves one block difference only
