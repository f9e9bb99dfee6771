"""Service-time models for the simulator.

A model is a frozen description; :meth:`sampler` binds it to a problem, a realised arrival stream and
the service random stream, and returns ``duration(route, job_index) -> seconds``, the time job
``job_index`` takes on ``route`` (called on every start, so it is kept cheap).

* ``"exponential"`` (paper §1): exponential with mean T of the route. One unit exponential variate
  is drawn per job index up front, and the duration is ``T × variate``: every policy sees the same
  draw for the same job, and a job restarted after a failure reuses its variate.
* ``"token"``: deterministic given the job's lengths (l_in, l_out). Each hop (i, j) of the route costs
  ``τ^c_j · l_out / l̄_out + m_ij · τ^p_j(l_in, l_out)`` with τ^p_j(l_in, l_out) = t_o + a_j·l_in +
  b_j·(l_out − 1) (paper §4.1): τ^c_j covers all of a job's round trips, one per generated token.
  When the server names a ``gpu`` profile and the model gives F (``flops_per_token_per_block``),
  a_j = F/f_j and b_j = s_m/b_j from the catalogue. Otherwise (our reading, the paper is silent) every
  token costs the same: a_j = b_j = (τ^p_j − t_o)/(l̄_in + l̄_out − 1) with t_o = min(t_o, τ^p_j), which
  gives back τ^p_j at the workload's mean lengths l̄_in, l̄_out.
* ``"emulated"``: the timing of the runtime's emulated backend (``chainserve.runtime.backends.emulated``),
  so the simulator predicts what the live emulated system measures. A job makes l_out forward steps
  whatever its prompt (one prefill, l_out − 1 decodes); each step on hop (i, j) sleeps
  ``(m_ij·τ^p_j + τ^c_j) / l̄_out`` plus ``hop_overhead_s``, the orchestrator's and transport's own time
  per hop and step (measured, ~1 ms here): duration = ``l_out · Σ_hops ((m_ij·τ^p_j + τ^c_j)/l̄_out +
  hop_overhead_s)``. Unlike ``"token"``, a long prompt costs no more than a short one.
* ``"batched"`` (issue 18): not a duration per job but an iteration-level simulation of every server's
  batches, prefill chunks and hops with the servers' step costs (:mod:`chainserve.sim.batched`);
  without step costs it gives the ``"emulated"`` times.
"""

from __future__ import annotations

from array import array
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import ClassVar, Protocol

import numpy as np

from chainserve.dispatch.base import Route
from chainserve.model.catalogue import BLOCK_OVERHEAD_S, gpu_profile
from chainserve.model.spec import Problem
from chainserve.plan.types import Hop
from chainserve.sim.arrivals import Arrivals
from chainserve.sim.batched import BatchedService

#: duration(route, job_index) -> service time in seconds.
Duration = Callable[[Route, int], float]


class ServiceModel(Protocol):
    name: str

    def sampler(self, problem: Problem, arrivals: Arrivals, rng: np.random.Generator) -> Duration: ...


@dataclass(frozen=True, slots=True)
class ExponentialService:
    """Exponential service with mean T of the route (paper §1)."""

    name: ClassVar[str] = "exponential"

    def sampler(self, problem: Problem, arrivals: Arrivals, rng: np.random.Generator) -> Duration:
        unit = array("d", rng.standard_exponential(len(arrivals)).tobytes())

        def duration(route: Route, job: int) -> float:
            return route.service_time_s * unit[job]

        return duration


@dataclass(frozen=True, slots=True)
class BlockCost:
    """τ^p_j(l_in, l_out) = overhead_s + prompt_s·l_in + decode_s·(l_out − 1) for one block."""

    overhead_s: float
    prompt_s: float
    decode_s: float


def block_cost(problem: Problem, server: int) -> BlockCost:
    """Server ``server``'s per-block cost split into overhead, prefill and decode (module docstring).

    >>> from chainserve.model.spec import ModelSpec, Server, Workload
    >>> p = Problem((Server("a", 10, 0.1, 0.0),), ModelSpec("m", 2, 1.0, 0.1),
    ...             Workload(1.0, prompt_tokens=90, output_tokens=11))
    >>> c = block_cost(p, 0)   # 0.099 s shared by 90 + 10 tokens
    >>> c.overhead_s, round(c.prompt_s, 6), round(c.decode_s, 6)
    (0.001, 0.00099, 0.00099)
    """
    s, model, w = problem.servers[server], problem.model, problem.workload
    if s.gpu is not None and model.flops_per_token_per_block is not None:
        gpu = gpu_profile(s.gpu)
        return BlockCost(
            BLOCK_OVERHEAD_S,
            model.flops_per_token_per_block / (gpu.peak_tflops * 1e12),
            problem.block_size_gb(server) / gpu.bandwidth_gb_per_s,
        )
    overhead = min(BLOCK_OVERHEAD_S, s.tau_p_s)
    per_token = (s.tau_p_s - overhead) / (w.prompt_tokens + w.output_tokens - 1)
    return BlockCost(overhead, per_token, per_token)


@dataclass(frozen=True, slots=True)
class RouteCost:
    """A route's token-level time, linear in the lengths:
    ``fixed_s + prompt_s·l_in + decode_s·(l_out − 1) + per_output_s·l_out``."""

    fixed_s: float
    prompt_s: float
    decode_s: float
    per_output_s: float

    def time_s(self, prompt_tokens: int, output_tokens: int) -> float:
        return (
            self.fixed_s
            + self.prompt_s * prompt_tokens
            + self.decode_s * (output_tokens - 1)
            + self.per_output_s * output_tokens
        )


def route_cost(problem: Problem, hops: Iterable[Hop]) -> RouteCost:
    """Sum of the hops' costs: m_ij·τ^p_j(l_in, l_out) plus τ^c_j scaled by l_out/l̄_out."""
    fixed = prompt = decode = per_output = 0.0
    for hop in hops:
        cost = block_cost(problem, hop.server)
        fixed += hop.num_blocks * cost.overhead_s
        prompt += hop.num_blocks * cost.prompt_s
        decode += hop.num_blocks * cost.decode_s
        per_output += problem.servers[hop.server].tau_c_s / problem.workload.output_tokens
    return RouteCost(fixed, prompt, decode, per_output)


@dataclass(frozen=True, slots=True)
class TokenService:
    """Token-level deterministic service times (module docstring)."""

    name: ClassVar[str] = "token"

    def sampler(self, problem: Problem, arrivals: Arrivals, rng: np.random.Generator) -> Duration:
        _, prompt, output = arrivals.columns()
        by_chain: dict[int, RouteCost] = {}

        def duration(route: Route, job: int) -> float:
            cost = by_chain.get(route.chain) if route.chain is not None else None
            if cost is None:
                cost = route_cost(problem, route.hops)
                if route.chain is not None:
                    by_chain[route.chain] = cost
            return cost.time_s(prompt[job], output[job])

        return duration


@dataclass(frozen=True, slots=True)
class EmulatedService:
    """The emulated backend's per-step sleeps (module docstring); ``hop_overhead_s`` ≥ 0 per hop and step.

    >>> from chainserve.model.spec import ModelSpec, Problem, Server, Workload
    >>> from chainserve.sim.arrivals import Arrivals
    >>> p = Problem((Server("a", 10, 0.1, 0.2),), ModelSpec("m", 2, 1.0, 0.1), Workload(1.0, output_tokens=4))
    >>> jobs = Arrivals(np.zeros(2), np.array([5, 500]), np.array([4, 8]))
    >>> duration = EmulatedService(0.001).sampler(p, jobs, np.random.default_rng(0))
    >>> [round(duration(Route((Hop(0, 1, 2),), 0.4), job), 3) for job in (0, 1)]  # (2·0.1 + 0.2)/4 + 0.001 per step
    [0.404, 0.808]
    """

    hop_overhead_s: float = 0.0
    name: ClassVar[str] = "emulated"

    def __post_init__(self) -> None:
        if not self.hop_overhead_s >= 0:
            raise ValueError(f"hop_overhead_s: must be ≥ 0, got {self.hop_overhead_s}")

    def step_s(self, problem: Problem, hops: tuple[Hop, ...]) -> float:
        """One forward step's time along ``hops``."""
        servers = problem.servers
        per_job = sum(h.num_blocks * servers[h.server].tau_p_s + servers[h.server].tau_c_s for h in hops)
        return per_job / problem.workload.output_tokens + self.hop_overhead_s * len(hops)

    def sampler(self, problem: Problem, arrivals: Arrivals, rng: np.random.Generator) -> Duration:
        _, _, output = arrivals.columns()
        by_route: dict[tuple[Hop, ...], float] = {}

        def duration(route: Route, job: int) -> float:
            step = by_route.get(route.hops)
            if step is None:
                step = by_route[route.hops] = self.step_s(problem, route.hops)
            return step * output[job]

        return duration


SERVICE_MODELS: dict[str, type] = {
    "exponential": ExponentialService,
    "token": TokenService,
    "emulated": EmulatedService,
    "batched": BatchedService,  # iteration-level, issue 18 (chainserve.sim.batched)
}


def service_model(name_or_model: str | ServiceModel | BatchedService) -> ServiceModel | BatchedService:
    """A model from its registry name, or the model itself."""
    if not isinstance(name_or_model, str):
        return name_or_model
    if name_or_model not in SERVICE_MODELS:
        raise ValueError(f"service: unknown model {name_or_model!r}; known: {', '.join(SERVICE_MODELS)}")
    return SERVICE_MODELS[name_or_model]()
