"""The simulator agrees with the exact JFFC / threshold-JFFC Markov chain within 2 % on small systems
(exponential service, Poisson arrivals, long seeded runs)."""

import pytest

from chainserve.analysis.ctmc import jffc_ctmc
from chainserve.dispatch.jffc import JFFC
from chainserve.model.spec import ModelSpec, Problem, Server, Workload
from chainserve.plan.csearch import make_plan
from chainserve.plan.types import Chain, Hop, Placement, Span
from chainserve.sim.arrivals import PoissonArrivals
from chainserve.sim.engine import simulate


def one_server_chains(times_s, capacities):
    """One single-server chain per (T_k, c_k); each server holds the 2-block model and c_k jobs."""
    pairs = list(enumerate(zip(times_s, capacities, strict=True)))
    servers = tuple(Server(f"s{k}", 2.0 + c, t / 2, 0.0) for k, (t, c) in pairs)
    problem = Problem(servers, ModelSpec("toy", 2, 1.0, 0.5), Workload(1.0))
    placement = Placement(tuple(Span(k, 1, 2) for k in range(len(servers))), 2)
    chains = tuple(Chain((Hop(k, 1, 2),), t, c) for k, (t, c) in pairs)
    return make_plan(problem, placement, chains, None)


@pytest.mark.slow
@pytest.mark.parametrize(
    ("times_s", "capacities", "load", "thresholds"),
    [
        ((1.0, 2.0), (2, 1), 0.6, None),
        ((1.0, 1.5, 4.0), (1, 2, 1), 0.8, None),
        ((1.0, 10.0), (1, 1), 0.5, (0, 3)),
    ],
)
def test_simulated_mean_response_within_2_percent_of_ctmc(times_s, capacities, load, thresholds):
    plan = one_server_chains(times_s, capacities)
    rates = [1 / t for t in times_s]
    rate = load * sum(c * r for c, r in zip(capacities, rates, strict=True))
    exact = jffc_ctmc(rates, capacities, rate, thresholds).mean_response_s
    result = simulate(
        plan, JFFC(plan.chains, thresholds), PoissonArrivals(rate), seed=11, num_jobs=300_000, warmup=10_000
    )
    assert result.summary.response.mean_s == pytest.approx(exact, rel=0.02)
