"""Profiling block servers (paper §4.2): per-block compute τ^p_j and communication τ^c_j from step times.

The paper profiles its testbed before planning; this module turns a server's measured step times into
the cluster file's raw numbers. A step of a session entering a server's span at block b runs the
m = last − b + 1 blocks b..last, so one server yields step times at several m. Robust (Theil–Sen)
linear regression of step time on m, separately for the prefill step (``p`` prompt tokens) and the
decode steps (one output token each), gives per step ``t(m) = a + b·m``: the slope b is the compute of
one block, the intercept a what a step costs with no block at all (network round trip and transport).
A job with l_in prompt and l_out output tokens makes one prefill and l_out − 1 decode steps on a hop
(§1: τ^c counts "all its round trips", one per generated token), so its hop costs τ^c_j + τ^p_j·m with

    τ^p_j = b_prefill · l_in / p + b_decode · (l_out − 1),      τ^c_j = a_prefill + a_decode · (l_out − 1).

The prefill is measured at the stated prompt length (p = l_in) when the server's cache holds it, else
at the longest that fits and scaled linearly (prefill compute grows with prompt tokens, §4.1). Under
the emulated backend, which sleeps τ^p_j/l_out per block and τ^c_j/l_out per round trip each step,
these formulas give back the configured τ^p_j and τ^c_j plus the runtime's own per-step overhead.

Batched step cost (issue 18): besides τ, each server gets a :class:`~chainserve.model.step_cost.StepCost`
fitted from decode iterations of b sessions stepped together and prefills of q tokens
(:mod:`.profile_batch`, :mod:`.step_fit`), written as its ``step_cost``; the orchestrator's LM head,
timed locally with the torch backend, gives the file's ``head_cost``.

Deliberate choices: the τ^c measured here already holds the runtime's per-hop overhead, so the cluster
file gets it raw (``tau_c_s``), not as an RTT to which the catalogue's 18 ms PETALS overhead would be
added; a server whose span (or free cache) allows only one block count adds its ``close`` round trips
(no tensor, no block) as points at m = 0, the only way to separate a from b there.
"""

from __future__ import annotations

import math
import os
import socket
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace

import numpy as np
import yaml
from scipy.stats import theilslopes

from chainserve.measure.step_fit import DEFAULT_MAX_BATCH, StepFit, cost_entry
from chainserve.model import catalogue
from chainserve.model.spec import ModelSpec, Problem, SharedHost, SpecError
from chainserve.model.step_cost import StepCost


@dataclass(frozen=True, slots=True)
class ProfileSettings:
    """What to measure: the stated ``prompt_tokens`` l_in and ``output_tokens`` l_out the τ are for;
    per server ``warmup`` discarded sessions, then ``repeats`` sessions at each of at most
    ``num_counts`` block counts, each a prefill, ``decode_steps`` decodes and a close; ``parallel``
    profiles all servers at once (only when they do not share CPUs); ``seed`` orders the sessions;
    ``max_batch``: the largest decode batch of the step-cost profile (issue 18; 0: no step cost)."""

    prompt_tokens: int
    output_tokens: int
    decode_steps: int = 4
    repeats: int = 4
    warmup: int = 2
    num_counts: int = 6
    parallel: bool = False
    seed: int = 0
    max_batch: int = DEFAULT_MAX_BATCH

    def __post_init__(self) -> None:
        for name, low, high in (
            ("prompt_tokens", 1, 10**6),
            ("output_tokens", 1, 10**6),
            ("decode_steps", 1, 1000),
            ("repeats", 1, 1000),
            ("warmup", 0, 1000),
            ("num_counts", 2, 1000),
            ("max_batch", 0, 256),
        ):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
                raise SpecError(name.replace("_", "-"), f"must be an integer in {low}..{high}, got {value!r}")
        if self.max_batch == 1:
            raise SpecError("max-batch", "must be 0 (no step cost) or at least 2: β needs two batch sizes")


@dataclass(frozen=True, slots=True)
class Fit:
    """Step time ``intercept_s + slope_s·m`` (seconds, m blocks run) over ``num_points`` steps;
    ``r2``: the share of the steps' variance the line explains (1: every point on it)."""

    slope_s: float
    intercept_s: float
    r2: float
    num_points: int


def fit_line(blocks: Sequence[float], seconds: Sequence[float]) -> Fit:
    """Theil–Sen line of step time on blocks run (a step slowed by another process does not tilt it)
    and the R² of all points around it; O(n²) in the number of steps.

    >>> f = fit_line([1, 1, 2, 2, 3, 3], [0.012, 0.012, 0.017, 0.017, 0.022, 0.022])
    >>> round(f.slope_s, 6), round(f.intercept_s, 6), round(f.r2, 6), f.num_points
    (0.005, 0.007, 1.0, 6)
    """
    x, y = np.asarray(blocks, dtype=float), np.asarray(seconds, dtype=float)
    if len(np.unique(x)) < 2:
        raise ValueError("blocks: a line needs steps at two block counts at least")
    slope, intercept = theilslopes(y, x, method="joint")[:2]
    total = float(np.sum((y - y.mean()) ** 2))
    residual = float(np.sum((y - intercept - slope * x) ** 2))
    return Fit(float(slope), float(intercept), 1.0 - residual / total if total > 0 else 1.0, len(x))


def block_counts(num_blocks: int, num_free_slots: int, num_counts: int) -> tuple[int, ...]:
    """The block counts m to run on a span of ``num_blocks`` with ``num_free_slots`` free block-slots
    (a session running m blocks holds m): up to ``num_counts`` spread evenly over 1..max.

    >>> block_counts(3, 15, 6), block_counts(32, 768, 6), block_counts(5, 2, 6), block_counts(4, 0, 6)
    ((1, 2, 3), (1, 7, 13, 20, 26, 32), (1, 2), ())
    """
    top = min(num_blocks, num_free_slots)
    if top < 1:
        return ()
    return tuple(sorted({int(round(m)) for m in np.linspace(1, top, min(top, num_counts))}))


@dataclass(frozen=True, slots=True)
class Samples:
    """One server's raw measurements (seconds): ``(m, t)`` per prefill and per decode step, the
    ``close`` round trips, the ``info`` pings, and ``prompt_len`` p, the prompt each prefill had."""

    prefill: tuple[tuple[int, float], ...]
    decode: tuple[tuple[int, float], ...]
    close_s: tuple[float, ...]
    ping_s: tuple[float, ...]
    prompt_len: int


@dataclass(frozen=True, slots=True)
class ServerProfile:
    """One server's fits and the τ they give for the settings' l_in, l_out (module docstring):
    ``tau_p_s`` τ^p_j (s per block per job), ``tau_c_s`` τ^c_j (s per job), ``ping_s`` the median
    ``info`` round trip from the orchestrator, ``counts`` the block counts run; ``step_fit`` the
    batched step-cost fit (issue 18; ``None`` when not profiled) and ``step`` its :class:`StepCost`."""

    name: str
    first_block: int
    num_blocks: int
    counts: tuple[int, ...]
    prompt_len: int
    prefill: Fit
    decode: Fit
    ping_s: float
    tau_p_s: float
    tau_c_s: float
    step_fit: StepFit | None = None

    @property
    def step(self) -> StepCost | None:
        return None if self.step_fit is None else self.step_fit.cost


def server_profile(
    name: str, first_block: int, num_blocks: int, counts: Sequence[int], samples: Samples, settings: ProfileSettings
) -> ServerProfile:
    """Fit one server's samples and derive τ^p_j, τ^c_j (raises ``ValueError`` when they make no sense)."""
    zero = [(0, t) for t in samples.close_s] if len(set(counts)) < 2 else []
    prefill = fit_line(*zip(*(list(samples.prefill) + zero), strict=True))
    decode = fit_line(*zip(*(list(samples.decode) + zero), strict=True))
    rounds = settings.output_tokens - 1
    tau_p = prefill.slope_s * settings.prompt_tokens / samples.prompt_len + decode.slope_s * rounds
    if not tau_p > 0:
        raise SpecError(name, f"step time does not grow with the blocks run (τ^p = {tau_p:.3g} s); repeat more")
    tau_c = max(prefill.intercept_s + decode.intercept_s * rounds, 0.0)
    return ServerProfile(
        name,
        first_block,
        num_blocks,
        tuple(counts),
        samples.prompt_len,
        prefill,
        decode,
        float(np.median(samples.ping_s)),
        tau_p,
        tau_c,
    )


def ranks_agree(measured: Mapping[str, float], configured: Mapping[str, float]) -> bool:
    """Whether every pair the configured values order strictly is ordered the same way when measured.

    >>> ranks_agree({"a": 1.1, "b": 1.9, "c": 1.8}, {"a": 1, "b": 2, "c": 2})
    True
    >>> ranks_agree({"a": 2.1, "b": 1.9}, {"a": 1, "b": 2})
    False
    """
    names = [n for n in measured if n in configured]
    return all(
        (configured[a] - configured[b]) * (measured[a] - measured[b]) > 0
        for i, a in enumerate(names)
        for b in names[i + 1 :]
        if configured[a] != configured[b]
    )


def _sig(x: float) -> float:
    """Six significant digits: what a profile can claim, and readable in YAML."""
    return float(f"{x:.6g}")


def _model_entry(model: ModelSpec) -> dict:
    """The cluster file's ``model``: the catalogue entry when the spec is one (keeps F), else raw."""
    arch_name, _, dtype = model.name.partition("/")
    arch = catalogue.MODELS.get(arch_name)
    if arch is not None and dtype in catalogue.BITS_PER_PARAM and model.max_tokens is not None:
        if arch.spec(dtype, model.max_tokens) == model:
            return {"name": arch_name, "dtype": dtype, "max_tokens": model.max_tokens}
    entry = {
        "name": model.name,
        "num_blocks": model.num_blocks,
        "block_size_gb": model.block_size_gb,
        "cache_size_gb": model.cache_size_gb,
    }
    return entry if model.max_tokens is None else {**entry, "max_tokens": model.max_tokens}


def cluster_dict(
    problem: Problem,
    profiles: Mapping[str, ServerProfile],
    settings: ProfileSettings,
    head_cost: StepCost | None = None,
) -> dict:
    """The profiled cluster in the cluster-file format (:mod:`chainserve.model.cluster_file`): the
    served model and workload at the stated token lengths, every server with its measured τ and
    ``step_cost`` (servers not in ``profiles`` keep the served values), ``head_cost`` when measured."""
    w = problem.workload
    servers = []
    for s in problem.servers:
        entry: dict = {"name": s.name} | ({"gpu": s.gpu} if s.gpu else {}) | {"memory_gb": s.memory_gb}
        p = profiles.get(s.name)
        if p is not None:
            entry |= {"tau_p_s": _sig(p.tau_p_s), "tau_c_s": _sig(p.tau_c_s)}
            entry |= {"step_cost": cost_entry(p.step)} if p.step is not None else {}
        else:
            entry |= {"tau_p_s": s.tau_p_s, "tau_c_s": s.tau_c_s}
            entry |= {"rtt_s": s.rtt_s} if s.rtt_s is not None else {}
        servers.append(entry)
    data = {
        "name": f"{problem.name}-profiled",
        "model": _model_entry(problem.model),
        "workload": {
            "arrival_rate": w.arrival_rate_per_s,
            "prompt_tokens": settings.prompt_tokens,
            "output_tokens": settings.output_tokens,
            "rho_bar": w.rho_bar,
        },
        "servers": servers,
    }
    data |= {"head_cost": cost_entry(head_cost, head=True)} if head_cost is not None else {}
    data |= {"hosts": [host_entry(h) for h in problem.hosts]} if problem.hosts else {}
    return data | ({"bprr_sessions": problem.bprr_sessions} if problem.bprr_sessions is not None else {})


def host_entry(host: SharedHost) -> dict:
    """A cluster file's ``hosts`` entry (:mod:`chainserve.model.cluster_file`)."""
    return {"name": host.name, "cores": host.cores, "servers": list(host.servers), "head": host.head}


def cpu_hosts(problem: Problem) -> tuple[SharedHost, ...]:
    """What ``problem``'s torch block servers started here share: this machine's cores when torch's
    ``auto`` device is the CPU (the local launcher's default), none when they go to a GPU."""
    from chainserve.runtime.backends.devices import resolve_device  # torch: only for the torch backend

    return (this_machine(problem),) if resolve_device("auto").type == "cpu" else ()


def this_machine(problem: Problem) -> SharedHost:
    """The machine this process runs on, as the host whose cores ``problem``'s servers and the
    orchestrator's head share (block servers started here on the CPU: ``profile``, the local launcher)."""
    return SharedHost(
        socket.gethostname() or "local", float(os.cpu_count() or 1), tuple(s.name for s in problem.servers), True
    )


def cluster_yaml(
    problem: Problem,
    profiles: Mapping[str, ServerProfile],
    settings: ProfileSettings,
    source: str,
    head_cost: StepCost | None = None,
) -> str:
    """:func:`cluster_dict` as YAML, with a header saying what was measured, how and where."""
    kept = [s.name for s in problem.servers if s.name not in profiles]
    header = [
        f"# Profiled by `chainserve profile` ({source}), paper §4.2: tau_p_s, tau_c_s of each measured server",
        f"# for {settings.prompt_tokens} prompt / {settings.output_tokens} output tokens, from Theil-Sen fits of "
        "step time on blocks run",
        f"# ({settings.repeats} repeats per block count, {settings.warmup} warm-up sessions per server).",
    ]
    if any(p.step is not None for p in profiles.values()):
        header.append(
            f"# step_cost (issue 18): least-squares fits of decode iterations at b = 1..{settings.max_batch} sessions"
            " and prefills of q tokens, t = c0 + m·(alpha + beta·x); r2: the worse fit's."
        )
    if head_cost is not None:
        header.append("# head_cost: the orchestrator's LM head over n jobs, timed on this machine.")
    if kept:
        header.append(f"# Not measured (served values kept): {', '.join(kept)}.")
    body = yaml.safe_dump(
        cluster_dict(problem, profiles, settings, head_cost),
        sort_keys=False,
        allow_unicode=True,
        width=120,
        default_flow_style=None,
    )
    return "\n".join(header) + "\n" + body


def profiled_problem(
    problem: Problem, profiles: Mapping[str, ServerProfile], head_cost: StepCost | None = None
) -> Problem:
    """``problem`` as measured, what :func:`cluster_dict` writes without the rounding: each profiled
    server's τ^p_j, τ^c_j and (issue 18) ``step``, and ``head_cost`` when given."""
    servers = tuple(
        s
        if (p := profiles.get(s.name)) is None
        else replace(s, tau_p_s=p.tau_p_s, tau_c_s=p.tau_c_s, step=p.step if p.step is not None else s.step)
        for s in problem.servers
    )
    return replace(problem, servers=servers, head_cost=head_cost if head_cost is not None else problem.head_cost)


def relative_error(measured: float, configured: float) -> float:
    """``measured / configured − 1`` (NaN when nothing was configured)."""
    return measured / configured - 1.0 if configured > 0 else math.nan
