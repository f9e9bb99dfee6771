"""Live runs for the runtime experiments (issue 7; paper §4.2): serve a layout with ``chainserve serve``
as a user does, replay requests with the benchmark client, and simulate the same layout and requests.

Each method's layout is built once here and handed to both drivers — ``chainserve serve --plan FILE``
(an orchestrator process plus one process per block server) and the simulator — so they run the same
placement, chains and cache pools. Per request the server reports its queue time (``queued_s``) and
its end-to-end time (``e2e_s``) in the ``chainserve`` field of the answer; measured waiting is
``queued_s``, measured service ``e2e_s − queued_s``, measured response the client's end-to-end time.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from chainserve.analysis.records import Stats
from chainserve.experiments.common import pct
from chainserve.measure.bench import BenchRequest, run_bench
from chainserve.measure.faults import Kill, Outage, kill_and_watch
from chainserve.methods import build_method, dispatcher_for
from chainserve.model.spec import Problem
from chainserve.plan.baselines.petals import petals_placement
from chainserve.plan.baselines.types import PathPlacement
from chainserve.plan.plan_file import layout_to_dict
from chainserve.plan.types import Hop, Layout, Plan
from chainserve.runtime.backends.base import PAGE_TOKENS
from chainserve.runtime.serve_process import serve_process
from chainserve.sim.arrivals import Arrivals, ReplayArrivals
from chainserve.sim.batched import BatchedService
from chainserve.sim.engine import SimResult, simulate
from chainserve.sim.events import Failure
from chainserve.sim.service import EmulatedService, ServiceModel

#: How long ``chainserve serve`` may take to start its block servers (torch loads weights).
READY_TIMEOUT_S = 300.0
#: Issue 7: the simulator predicts the runtime's mean response time within this fraction.
FIDELITY_TARGET = 0.15


@dataclass(frozen=True, slots=True)
class Measured:
    """One method's live run: counts and per-request times (seconds) of the completed requests, the
    run's span (first send to last answer), the requests resumed on another chain after a server
    failure (``num_attempts`` > 1), the outage of a killed server (``None``: no kill) and the CPU seconds
    that ``chainserve serve``, its block servers and this process (the benchmark client) used from the
    first request sent to the last answer (a killed server's stop counting when it dies)."""

    num_requests: int
    num_completed: int
    response_s: np.ndarray
    waiting_s: np.ndarray
    service_s: np.ndarray
    server_e2e_s: np.ndarray
    model_service_s: np.ndarray  # the emulated backend's sleeps for the request's route and length
    hop_steps: np.ndarray  # hops of its route × its output tokens
    duration_s: float
    num_retried: int = 0
    outage: Outage | None = None
    index: np.ndarray | None = None  # each completed request's place in the requests sent
    sent_at_s: np.ndarray | None = None  # … and when it was sent, from the benchmark's start
    cpu_s: float | None = None  # CPU the served processes and this client used over the run (issue 31)

    @property
    def num_failed(self) -> int:
        return self.num_requests - self.num_completed

    def stats(self, name: str) -> Stats:
        return Stats.of(getattr(self, f"{name}_s"))

    @property
    def mean_in_service(self) -> float:
        """The time-average number of jobs in service over the run (Σ service / span)."""
        return float(np.sum(self.service_s)) / self.duration_s if self.duration_s > 0 else 0.0


def scale_times(problem: Problem, factor: float) -> Problem:
    """``problem`` with every time (τ^p, τ^c, RTT, step costs) multiplied by ``factor`` and λ divided
    by it: the same queueing system on a faster (``factor`` < 1) clock, so a run takes ``factor`` as long."""
    servers = tuple(
        replace(
            s,
            tau_p_s=s.tau_p_s * factor,
            tau_c_s=s.tau_c_s * factor,
            rtt_s=None if s.rtt_s is None else s.rtt_s * factor,
            step=None if s.step is None else s.step.scaled(factor),
        )
        for s in problem.servers
    )
    workload = replace(problem.workload, arrival_rate_per_s=problem.workload.arrival_rate_per_s / factor)
    head = None if problem.head_cost is None else problem.head_cost.scaled(factor)
    return replace(problem, servers=servers, workload=workload, head_cost=head)


def method_layout(
    method: str, problem: Problem, seed: int = 0, planner: str = "greedy", petals_cache_tokens: int | None = None
) -> Layout:
    """The layout ``method`` serves (:func:`chainserve.methods.build_method`); PETALS' cache per block
    is ``petals_cache_tokens`` tokens when given (its ``--attn_cache_tokens``)."""
    rng = np.random.default_rng(seed)
    if method == "petals" and petals_cache_tokens is not None:
        return petals_placement(problem, rng, cache_tokens=petals_cache_tokens)
    return build_method(method, problem, rng, planner).plan_or_placement


def to_arrivals(requests: Sequence[BenchRequest]) -> Arrivals:
    """The requests as the simulator's arrival stream (same times and lengths)."""
    return Arrivals(
        np.array([r.at_s for r in requests], dtype=float),
        np.array([r.prompt_tokens for r in requests], dtype=np.int64),
        np.array([r.output_tokens for r in requests], dtype=np.int64),
    )


def simulate_run(
    layout: Layout,
    method: str,
    requests: Sequence[BenchRequest],
    service: ServiceModel,
    seed: int = 0,
    page_tokens: int | None = PAGE_TOKENS,
    failures: Sequence[Failure] = (),
) -> SimResult:
    """The simulator's run of ``requests`` on ``layout`` with ``method``'s dispatcher (``page_tokens``:
    the KV paging, by default the live runtime's — pages of 16 tokens, a slot of the model's
    ``max_tokens``, issue 30 — :func:`chainserve.methods.dispatcher_for`); ``failures`` are recovered
    from as the runtime does (chains recomposed, each new plan with ``method``'s dispatcher: ``simulate --fail``)."""
    rng = np.random.default_rng(seed)
    dispatcher = dispatcher_for(method, layout, rng, page_tokens=page_tokens)
    return simulate(
        layout,
        dispatcher,
        ReplayArrivals(to_arrivals(requests)),
        service,
        seed=seed,
        failures=failures,
        recover=bool(failures),
        make_dispatcher=lambda plan: dispatcher_for(method, plan, rng, page_tokens=page_tokens),
    )


def simulate_layout(
    layout: Layout,
    method: str,
    requests: Sequence[BenchRequest],
    service: ServiceModel,
    seed: int = 0,
    page_tokens: int | None = PAGE_TOKENS,
):
    """The simulator's summary of :func:`simulate_run` without failures."""
    result = simulate_run(layout, method, requests, service, seed, page_tokens)
    if result.summary is None:
        raise RuntimeError(f"{method}: no simulated job finished")
    return result.summary


async def measure_layout(
    layout: Layout,
    method: str,
    requests: Sequence[BenchRequest],
    work_dir: Path,
    backend: str = "emulated",
    model: str | None = None,
    progress: bool = False,
    kill: Kill | None = None,
) -> Measured:
    """Serve ``layout`` live, replay ``requests`` against it and collect the per-request times;
    ``kill``: SIGKILL that block server during the replay (:mod:`chainserve.measure.faults`; its
    supervisor restarts it)."""
    work_dir.mkdir(parents=True, exist_ok=True)
    plan_file = work_dir / "plan.json"
    plan_file.write_text(json.dumps(layout_to_dict(layout)), encoding="utf-8")
    args = ["--plan", str(plan_file), "--method", method, "--backend", backend, "--port", "0"]
    args += ["--max-waiting", "1000000", "--request-timeout-s", "3600", "--log-dir", str(work_dir / "logs")]
    args += ["--log-level", "warning", *(["--model", model] if model is not None else [])]
    with serve_process(args, work_dir / "logs" / "serve.log", READY_TIMEOUT_S) as served:
        started: asyncio.Future[float] = asyncio.get_running_loop().create_future()
        cpu_at_start: list[float] = []

        def start(at: float) -> None:
            cpu_at_start.append(served.cpu_s() + time.process_time())
            started.set_result(at)

        bench = run_bench(served.url, requests, progress=progress, timeout_s=3600, on_start=start)
        if kill is None:
            report, outage = await bench, None
        else:
            watch = kill_and_watch(served.url, work_dir / "logs" / "token", kill, started)
            report, outage = await asyncio.gather(bench, watch)
        cpu_s = served.cpu_s() + time.process_time() - cpu_at_start[0]
    done = [r for r in report.results if r.ok and r.route is not None]
    queued = np.array([float(r.route["queued_s"]) for r in done])
    server_e2e = np.array([float(r.route["e2e_s"]) for r in done])
    problem = layout.problem
    index = {s.name: j for j, s in enumerate(problem.servers)}
    routes = [
        tuple(
            Hop(index[h["server"]], h["first_block"], h["last_block"] - h["first_block"] + 1) for h in r.route["hops"]
        )
        for r in done
    ]
    sleeps = EmulatedService()
    return Measured(
        len(report.results),
        len(done),
        np.array([float(r.e2e_s) for r in done]),
        queued,
        server_e2e - queued,
        server_e2e,
        np.array([sleeps.step_s(problem, hops) * r.output_tokens for hops, r in zip(routes, done, strict=True)]),
        np.array([len(hops) * r.output_tokens for hops, r in zip(routes, done, strict=True)]),
        report.duration_s,
        sum(r.num_attempts > 1 for r in done),
        outage,
        np.array([r.index for r in done], dtype=np.int64),
        np.array([r.sent_at_s for r in done]),
        cpu_s,
    )


def chain_rows(layout: Layout) -> list[list[object]]:
    """(chain, servers, blocks per hop, T_k, c_k) rows of a plan; a path placement's spans and pools."""
    names = [s.name for s in layout.problem.servers]
    if isinstance(layout, Plan):
        return [
            [
                k,
                " → ".join(names[h.server] for h in ch.hops),
                " + ".join(str(h.num_blocks) for h in ch.hops),
                ch.service_time_s,
                ch.capacity,
            ]
            for k, ch in enumerate(layout.chains)
        ]
    assert isinstance(layout, PathPlacement)
    return [
        [
            "–",
            names[s.server],
            f"{s.start_block}..{s.start_block + s.num_blocks - 1}",
            float("nan"),
            f"pool {layout.cache_gb[s.server]:.2f} GB",
        ]
        for s in layout.placement.spans
    ]


def error_cell(sim: float, live: float) -> str:
    """The simulator's error relative to the measured value, as a report cell ("–" without one)."""
    return pct(100 * (sim - live) / live) if live > 0 else "–"


def within_target(sim: float, live: float, target: float = FIDELITY_TARGET) -> bool:
    """Whether a simulated mean lies within ``target`` (a fraction) of the measured one."""
    return abs(sim - live) <= target * live


def calibrated_batched(
    runs: Sequence[tuple[Layout, str, Measured]], requests: Sequence[BenchRequest]
) -> BatchedService:
    """The batched model (issue 18) with the runtime's own time per hop and step fitted on a
    cluster's live ``runs`` (layout, method, measurement): Σ(measured − simulated service) over
    Σ(hops × output tokens) of the completed requests, simulated first without it (0 when negative).
    One constant per cluster, as :func:`chainserve.experiments.table1_live.hop_overhead_s` for the
    emulated model."""
    extra = steps = 0.0
    for layout, method, measured in runs:
        simulated = simulate_layout(layout, method, requests, BatchedService())
        extra += float(np.sum(measured.service_s)) - simulated.service.mean_s * simulated.num_requests
        steps += float(np.sum(measured.hop_steps))
    return BatchedService(max(extra / steps, 0.0) if steps > 0 else 0.0)
