"""The adaptive controller: watch arrivals, detect a rate change, re-plan when it pays (beyond the
paper; §4.3: its plan is static).

One object, driven by the simulator (:mod:`chainserve.sim.engine`) and the serving runtime alike; it
has no clock (time enters through ``t``), does no I/O and never executes a change itself:

* ``observe(t, prompt_tokens, output_tokens)`` for every arrival;
* ``decide(t)`` at any time: the windows closed by ``t`` go through the two-sided CUSUM
  (:mod:`.detect`); on an alarm it plans for the estimated rate (the configured planner, and GCA on the
  current placement), prices each move (:mod:`.cost`) and returns the best :class:`PlanChange` when its
  gain over the horizon beats its cost, else re-centres the detector on the new rate and keeps the plan;
* ``applied(change, t)`` once the driver has executed it; until then ``decide`` returns ``None``.

Hysteresis: the detector is tuned to shifts of ``band`` (smaller ones rarely alarm), no change is
considered within ``min_dwell_s`` of the last, and a move must improve the predicted mean response by
``min_improvement`` and beat its cost.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

from chainserve.adapt.cost import REALLOCATE, Move, predicted_response_s, price_move
from chainserve.adapt.detect import PoissonCusum, change_point, cusum_threshold
from chainserve.adapt.estimate import ArrivalWindows, Estimate, fano_factor
from chainserve.model.spec import Problem, SpecError
from chainserve.plan.best import PLANNERS, plan_with
from chainserve.plan.csearch import make_plan
from chainserve.plan.gca import gca
from chainserve.plan.types import Layout, Plan


@dataclass(frozen=True, slots=True)
class AdaptConfig:
    """Settings of the controller (each field's meaning after its name).

    ``window_s``: seconds per arrival-count window of the change detector.
    ``band``: relative rate shift the detector is tuned to: λ0·(1+band) up, λ0/(1+band) down.
    ``false_alarms_per_hour``: target false-alarm rate of the detector at a constant rate.
    ``false_alarms_up_per_hour``: the up side's own target (``None``: the same). Asymmetric because
    the errors are: a step up found late queues the peak on a plan too small for it (every minute
    adds jobs that drain only at the new plan's spare capacity), while a false up-alarm is priced
    first (its short segment's estimate rarely pays for a move) and at worst over-provisions.
    ``min_dwell_s``: no change is decided within this many seconds of the last one applied.
    ``horizon_s``: how long a new plan is expected to stay in force (its gain is counted over it).
    ``min_improvement``: least relative cut of the predicted mean response a move must bring.
    ``min_estimate_arrivals``: arrivals a regime needs before the detector follows its mean rate
    (100: a ±10 % estimate; fewer leave it off-centre, and a noisy centre makes false alarms).
    ``planner``: planner of the new plans, ``greedy`` (paper) or ``best``.
    ``plan_z``: a new plan is made (and priced) for the upper confidence bound λ̂ + z·√(φ·n)/span of
    the regime's rate, not its point estimate: a plan a little too large costs a few percent, one too
    small queues the peak (and an alarm's estimate rests on a few windows).
    ``dispersion_group``: windows per block of the over-dispersion estimate φ (the Fano factor of the
    arrivals per block, :func:`~chainserve.adapt.estimate.fano_factor`, over all windows seen; its
    lower 2-sigma bound, at least 1),
    by which the detector divides its steps (quasi-Poisson CUSUM, :mod:`.detect`); estimated once
    ``dispersion_blocks`` blocks have closed.
    """

    window_s: float = 10.0
    band: float = 0.5
    false_alarms_per_hour: float = 0.01
    false_alarms_up_per_hour: float | None = 1.0
    min_dwell_s: float = 120.0
    horizon_s: float = 1800.0
    min_improvement: float = 0.02
    min_estimate_arrivals: int = 100
    planner: str = "greedy"
    plan_z: float = 1.0
    dispersion_group: int = 6
    dispersion_blocks: int = 10

    def __post_init__(self) -> None:
        for name in ("window_s", "band", "false_alarms_per_hour", "horizon_s"):
            value = getattr(self, name)
            if not (isinstance(value, int | float) and math.isfinite(value) and value > 0):
                raise SpecError(name, f"must be a positive number, got {value!r}")
        up = self.false_alarms_up_per_hour
        if up is not None and not (isinstance(up, int | float) and math.isfinite(up) and up > 0):
            raise SpecError("false_alarms_up_per_hour", f"must be a positive number or None, got {up!r}")
        for name in ("min_dwell_s", "min_improvement", "plan_z"):
            value = getattr(self, name)
            if not (isinstance(value, int | float) and math.isfinite(value) and value >= 0):
                raise SpecError(name, f"must be a non-negative number, got {value!r}")
        if not (isinstance(self.min_estimate_arrivals, int) and self.min_estimate_arrivals >= 1):
            raise SpecError("min_estimate_arrivals", f"must be a positive integer, got {self.min_estimate_arrivals!r}")
        for name in ("dispersion_group", "dispersion_blocks"):
            if not (isinstance(getattr(self, name), int) and getattr(self, name) >= 1):
                raise SpecError(name, f"must be a positive integer, got {getattr(self, name)!r}")
        if self.planner not in PLANNERS:
            raise SpecError("planner", f"unknown planner {self.planner!r}; known: {', '.join(PLANNERS)}")

    @property
    def threshold(self) -> float:
        """The CUSUM threshold h for :attr:`false_alarms_per_hour`."""
        return cusum_threshold(self.false_alarms_per_hour, self.window_s)

    @property
    def threshold_up(self) -> float:
        """The up side's CUSUM threshold (:attr:`false_alarms_up_per_hour`, else :attr:`threshold`)."""
        up = self.false_alarms_up_per_hour
        return self.threshold if up is None else cusum_threshold(up, self.window_s)


@dataclass(frozen=True, slots=True)
class PlanChange:
    """A decided plan change (see the module docstring).

    ``time_s``: when it was decided (driver's clock); ``reason``: ``rate_up`` or ``rate_down``;
    ``kind``: ``reallocate`` (same placement, new chains) or ``replace`` (new placement);
    ``old_c`` / ``new_c``: the plans' c; ``rate_per_s``: the rate the new plan is made for;
    ``layout``: the new plan; ``migration``: (server index, seconds out of service to load its new span)
    in migration order, () for a re-allocation; ``gain_s`` / ``cost_s``: predicted gain over the
    horizon and cost, seconds of response time; ``transition_s``: the predicted drain + load time.
    """

    time_s: float
    reason: str
    kind: str
    old_c: int | None
    new_c: int | None
    rate_per_s: float
    layout: Layout
    migration: tuple[tuple[int, float], ...]
    gain_s: float
    cost_s: float
    transition_s: float


#: Relative gap between the rate measured after a change and the rate it was planned for past which
#: the controller reconsiders at once.
RECHECK_TOLERANCE = 0.05

#: Significant digits of the rate a plan is made for (so repeated estimates reuse cached plans).
RATE_DIGITS = 3


@functools.lru_cache(maxsize=512)
def plan_for_rate(problem: Problem, planner: str, rate_per_s: float) -> Plan:
    """``planner``'s plan for ``problem`` at ``rate_per_s``; past the cluster's capacity, the plan for
    the highest rate (in steps of 5 % down) that still has a stable plan."""
    rate = rate_per_s
    for _ in range(100):
        try:
            return plan_with(planner, problem.with_workload(arrival_rate_per_s=rate))
        except SpecError as exc:
            if exc.field != "arrival_rate":
                raise
            rate *= 0.95
    raise SpecError("arrival_rate", f"no stable plan at or below {rate_per_s:g}/s")


def rounded_rate(rate_per_s: float) -> float:
    """``rate_per_s`` to :data:`RATE_DIGITS` significant digits.

    >>> rounded_rate(0.123456)
    0.123
    """
    return float(f"{rate_per_s:.{RATE_DIGITS}g}")


class AdaptiveController:
    """Decides plan changes from arrivals (module docstring).

    The *regime* is the run of windows since the last change began (the start of the alarm's CUSUM
    segment): once it holds ``min_estimate_arrivals`` the detector tests against its mean rate (so an
    estimate made in a hurry does not leave the detector off-centre), and if that mean leaves the
    band around the plan's rate the move is considered (slow drifts the CUSUM re-centring hides).
    """

    def __init__(self, problem: Problem, layout: Layout, config: AdaptConfig):
        self.problem, self.config = problem, config
        self._layout = layout
        self.plan_rate_per_s = layout.problem.arrival_rate_per_s
        self.windows = ArrivalWindows(config.window_s)
        self.detector = PoissonCusum(
            self.plan_rate_per_s, config.window_s, config.band, config.threshold, threshold_up=config.threshold_up
        )
        self.pending: PlanChange | None = None
        self.last_applied_s = -math.inf
        self.changes: list[PlanChange] = []  # applied changes, in order
        self._history: list[int] = []  # every closed window's count
        self._regime_start = 0  # first window of the regime in force
        self._pending_start = 0  # first window of the regime the pending change is for
        self._recheck = False  # reconsider the regime at the next decide

    @property
    def layout(self) -> Layout:
        """The plan in force."""
        return self._layout

    def observe(self, t: float, prompt_tokens: int, output_tokens: int) -> None:
        """One arrival at ``t``."""
        self.windows.add(t, prompt_tokens, output_tokens)

    def estimate(self, t: float) -> Estimate:
        """Rate and mean lengths measured since the last change (or the start)."""
        return self.windows.estimate(t)

    def decide(self, t: float) -> PlanChange | None:
        """Feed the closed windows to the detector; a change worth making, else ``None``."""
        counts = self.windows.closed_counts(t)
        change: PlanChange | None = None
        if self.pending is None and self._recheck:
            self._recheck = False
            change = self._consider(self._regime_start, t)
        for count in counts:
            self._history.append(count)
            self._update_dispersion()
            if self.pending is not None or change is not None:
                continue
            alarm = self.detector.update(count)
            dwelt = t - self.last_applied_s >= self.config.min_dwell_s
            if alarm is not None and dwelt:
                regime = self._history[self._regime_start :]
                change = self._consider(self._regime_start + change_point(regime), t)
            elif alarm is None:
                change = self._follow_regime(t, dwelt)
        return change

    def _update_dispersion(self) -> None:
        """φ from all windows seen, once enough blocks have closed (every block's end)."""
        group, history = self.config.dispersion_group, self._history
        if len(history) % group or len(history) < group * self.config.dispersion_blocks:
            return
        fano = fano_factor(history, group)
        blocks = len(history) // group
        # its lower 2-sigma bound (a variance estimate from k − 1 differences has relative error
        # √(2/(k − 1))): Poisson noise alone must not slow the detector down
        lower = fano * (1 - 2 * math.sqrt(2 / (blocks - 1)))
        self.detector.dispersion = max(1.0, lower) if math.isfinite(lower) else 1.0

    def applied(self, change: PlanChange, t: float) -> None:
        """The driver has executed ``change`` at ``t``: it is the plan in force from now on. The rate is
        measured again over the regime (the transition's windows too); if even its lower confidence bound
        exceeds the rate the plan was made for by more than :data:`RECHECK_TOLERANCE`, the next
        ``decide`` reconsiders (the move must still pay); a plan too large is left to the detector and
        the band."""
        if change is not self.pending:
            raise ValueError("applied: not the change this controller is waiting for")
        self.pending = None
        self._layout, self.plan_rate_per_s, self.last_applied_s = change.layout, change.rate_per_s, t
        self._regime_start = self._pending_start
        rate = self._regime_rate() or change.rate_per_s
        lower = self.confidence_interval(self._regime_start)[0] if self._history[self._regime_start :] else 0.0
        self._recheck = lower > change.rate_per_s * (1 + RECHECK_TOLERANCE)
        self.detector.reset(rate)
        self.windows.restart(t)
        self.changes.append(change)

    def _regime_rate(self) -> float:
        """Mean rate over the regime's windows (0 before any)."""
        regime = self._history[self._regime_start :]
        return sum(regime) / (len(regime) * self.config.window_s) if regime else 0.0

    def _follow_regime(self, t: float, dwelt: bool) -> PlanChange | None:
        """Re-centre the detector on the regime's mean; consider a move if it left the plan's band."""
        if sum(self._history[self._regime_start :]) < self.config.min_estimate_arrivals:
            return None
        rate = self._regime_rate()
        self.detector.recentre(rate)
        if dwelt and abs(math.log(rate / self.plan_rate_per_s)) > math.log1p(self.config.band):
            return self._consider(self._regime_start, t)
        return None

    def confidence_interval(self, regime_start: int) -> tuple[float, float]:
        """λ̂ ∓ ``plan_z``·√(φ·n)/span for the regime that began at window ``regime_start`` (n arrivals
        over its span; :class:`AdaptConfig`)."""
        regime = self._history[regime_start:]
        span = len(regime) * self.config.window_s
        n = max(sum(regime), 1)
        spread = self.config.plan_z * math.sqrt(self.detector.dispersion * n)
        return (n - spread) / span, (n + spread) / span

    def _consider(self, regime_start: int, t: float) -> PlanChange | None:
        """The change to make for the regime that began at window ``regime_start``, if any (planned
        and priced at the upper confidence bound of its rate); else the detector is re-centred on
        that regime and the plan stays."""
        regime = self._history[regime_start:]
        rate = max(sum(regime), 1) / (len(regime) * self.config.window_s)
        lower, upper = self.confidence_interval(regime_start)
        # a rise is planned for its upper bound but must pay at its lower one (a false up-alarm's
        # short segment leaves the lower bound near the plan's rate: no gain)
        move = self._best_move(upper, max(lower, self.plan_rate_per_s) if rate > self.plan_rate_per_s else upper)
        if move is None:
            self._regime_start = regime_start
            self.detector.reset(rate)
            return None
        self._pending_start = regime_start
        self.pending = PlanChange(
            t,
            "rate_up" if rate > self.plan_rate_per_s else "rate_down",
            move.kind,
            self._layout.c if isinstance(self._layout, Plan) else None,
            move.layout.c,
            move.layout.problem.arrival_rate_per_s,
            move.layout,
            move.migration,
            move.gain_s,
            move.cost_s,
            move.transition_s,
        )
        return self.pending

    def _best_move(self, rate_per_s: float, price_rate_per_s: float) -> Move | None:
        """The move with the largest net gain among the plans for ``rate_per_s``, priced at
        ``price_rate_per_s``, if it is worth making."""
        rate = rounded_rate(rate_per_s)
        horizon = self.config.horizon_s
        candidates = [plan_for_rate(self.problem, self.config.planner, rate)]
        at_rate = self.problem.with_workload(arrival_rate_per_s=candidates[0].problem.arrival_rate_per_s)
        current = self._layout
        chains = gca(at_rate, current.placement)
        if chains:
            candidates.append(make_plan(at_rate, current.placement, chains, getattr(current, "c", None)))
        rate = rounded_rate(price_rate_per_s)
        moves = [price_move(current, plan, rate, horizon) for plan in candidates]
        best = max(moves, key=lambda m: (m.net_s, m.kind == REALLOCATE))
        now_s = predicted_response_s(current, rate, horizon)
        enough = best.gain_s > self.config.min_improvement * rate * horizon * now_s
        return best if best.net_s > 0 and enough else None
