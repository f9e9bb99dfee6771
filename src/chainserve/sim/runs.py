"""Seeded replications of one method (paper §3–§4): build its layout and dispatcher, simulate.

Seeds: replication ``s`` builds the method's randomised placement (PETALS' join order) from
``SeedSequence([s, 1])``, its dispatcher's coins from ``SeedSequence([s, 2])`` and the simulation
(arrivals, service) from seed ``s``; the experiments build replication ``s``'s cluster from
``default_rng(s)`` — so every method sees the same cluster and the same arrival and service draws in
replication ``s``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from chainserve.adapt.controller import AdaptConfig, AdaptiveController
from chainserve.analysis.records import Summary
from chainserve.methods import MethodSetup, build_method, check_method_name, dispatcher_for
from chainserve.model.spec import Problem
from chainserve.plan.recovery import RestartPolicy
from chainserve.plan.types import Plan
from chainserve.sim.arrivals import ArrivalProcess
from chainserve.sim.engine import simulate
from chainserve.sim.events import Failure, Transition, supervised_failures


@dataclass(frozen=True, slots=True)
class Replication:
    """One simulated run: its seed, summary, (chain methods) the plan's bounds, the plan changes an
    adaptive run made, the page size of a paged KV cache (``None``: the paper's slots), the jobs
    refused on arrival (paging: too long for every chain or path), and for a run with failures the
    failures as simulated, the aborted starts, the jobs that ran again and the recompositions."""

    seed: int
    summary: Summary
    setup: MethodSetup
    transitions: tuple[Transition, ...] = ()
    page_tokens: int | None = None
    num_refused: int = 0
    failures: tuple[Failure, ...] = ()
    num_restarts: int = 0
    num_retried: int = 0
    num_recomposed: int = 0

    @property
    def bounds(self) -> tuple[float, float] | None:
        plan = self.setup.plan_or_placement
        return (plan.bounds.lower_s, plan.bounds.upper_s) if isinstance(plan, Plan) else None


def run_method(
    problem: Problem,
    method: str,
    seed: int,
    num_jobs: int,
    arrivals: ArrivalProcess | None = None,
    service: str = "exponential",
    warmup: int = 0,
    planner: str = "greedy",
    adapt: AdaptConfig | None = None,
    page_tokens: int | None = None,
    failures: Sequence[tuple[float, int, float | None]] = (),
    restart_policy: RestartPolicy | None = None,
) -> Replication:
    """Build ``method`` for ``problem`` (the proposed chains by ``planner``, see
    :func:`chainserve.methods.build_method`) and simulate ``num_jobs`` jobs with the seeds of the module doc.
    ``adapt``: re-plan online with an :class:`AdaptiveController` (proposed methods only); every new
    plan gets a fresh dispatcher of the method's policy, with the same coins' stream. ``page_tokens``:
    KV cache by tokens (issue 30, :func:`chainserve.methods.dispatcher_for`); ``None``: the paper's slots.
    ``failures``: (time, server, seconds down) — ``None`` down: restarted as ``restart_policy`` (default
    the runtime's) restarts it (:func:`~chainserve.sim.events.supervised_failures`) — each recovered
    from as the runtime recovers (chains recomposed on the live servers)."""
    base, _ = check_method_name(method)
    if adapt is not None and base != "proposed":
        raise ValueError(f"adapt: only the proposed method re-plans online, got {method!r}")
    if adapt is not None and page_tokens is not None:
        raise ValueError("adapt: the adaptive simulator counts KV cache in max-length slots, not pages")
    setup = build_method(method, problem, np.random.default_rng(np.random.SeedSequence([seed, 1])), planner)
    coins = np.random.default_rng(np.random.SeedSequence([seed, 2]))
    dispatcher = setup.make_dispatcher(coins, page_tokens)
    controller = None if adapt is None else AdaptiveController(problem, setup.plan_or_placement, adapt)
    if failures and not isinstance(setup.plan_or_placement, Plan):
        raise ValueError(f"failures: recovery recomposes chains; {method} composes a path per request")
    events = supervised_failures(setup.plan_or_placement, failures, restart_policy or RestartPolicy())
    result = simulate(
        setup.plan_or_placement,
        dispatcher,
        arrivals,
        service,
        seed=seed,
        num_jobs=num_jobs,
        warmup=warmup,
        failures=events,
        recover=bool(events),
        controller=controller,
        make_dispatcher=lambda layout: dispatcher_for(setup.method, layout, coins, page_tokens=page_tokens),
    )
    if result.summary is None:
        raise RuntimeError(f"{method}: no job finished in replication {seed}")
    paging = dispatcher.paging
    pages = None if paging is None else paging.page_tokens
    return Replication(
        seed, result.summary, setup, result.transitions, pages, result.num_refused, events,
        result.num_restarts, result.num_retried, result.num_recomposed,
    )  # fmt: skip
