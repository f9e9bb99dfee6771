"""Frozen problem specs: servers, the model to serve, the workload (paper §1).

Sizes are in GB (10^9 bytes), times in seconds. Constructors only validate; they raise
:class:`SpecError` naming the offending field.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

from chainserve.model.step_cost import StepCost

#: Default weight-loading bandwidth (GB/s): a local NVMe SSD read into GPU memory.
DEFAULT_LOAD_BANDWIDTH_GB_PER_S = 2.0


class SpecError(ValueError):
    """Invalid input; ``field`` names the offending field (e.g. ``servers[2].memory_gb``)."""

    def __init__(self, field_name: str, message: str):
        super().__init__(f"{field_name}: {message}")
        self.field = field_name


def _positive(field_name: str, value: float) -> None:
    if not isinstance(value, int | float) or isinstance(value, bool) or not math.isfinite(value) or value <= 0:
        raise SpecError(field_name, f"must be a positive number, got {value!r}")


def _non_negative(field_name: str, value: float) -> None:
    if not isinstance(value, int | float) or isinstance(value, bool) or not math.isfinite(value) or value < 0:
        raise SpecError(field_name, f"must be a non-negative number, got {value!r}")


@dataclass(frozen=True, slots=True)
class Server:
    """One server j (a GPU, MIG slice or host).

    ``memory_gb``: M_j, GPU memory for blocks and KV cache.
    ``tau_p_s``: τ^p_j, mean time for one job to pass one block on this server (prefill + decode).
    ``tau_c_s``: τ^c_j, mean communication time of one job to and from this server.
    ``gpu``: catalogue profile name when the server was described by one (else ``None``).
    ``rtt_s``: network round-trip time to the server when known (used by PETALS-style routing).
    ``step``: what a batched iteration costs here (:mod:`.step_cost`, issue 18); ``None``: the
    paper's model, every session at the speed τ^p_j however many run.
    """

    name: str
    memory_gb: float
    tau_p_s: float
    tau_c_s: float
    gpu: str | None = None
    rtt_s: float | None = None
    step: StepCost | None = None

    def __post_init__(self) -> None:
        if not self.name:
            raise SpecError("name", "must be a non-empty string")
        _positive(f"{self.name}.memory_gb", self.memory_gb)
        _positive(f"{self.name}.tau_p_s", self.tau_p_s)
        _non_negative(f"{self.name}.tau_c_s", self.tau_c_s)
        if self.rtt_s is not None:
            _non_negative(f"{self.name}.rtt_s", self.rtt_s)


@dataclass(frozen=True, slots=True)
class ModelSpec:
    """The model to serve: ``num_blocks`` L blocks, each ``block_size_gb`` s_m of parameters; one job
    holds ``cache_size_gb`` s_c of KV cache per block it passes (sized for the maximum sequence).
    ``flops_per_token_per_block``: F, and ``max_tokens``: the sequence length s_c was sized for; both
    known for catalogue models (token-level service times and PETALS export need them).
    ``kv_bytes_per_token_per_block``: s_c per token, and ``measured_from``: the model directory L, s_m
    and s_c were measured from (meta-device build and dry run, issue 29); both ``None`` otherwise."""

    name: str
    num_blocks: int
    block_size_gb: float
    cache_size_gb: float
    flops_per_token_per_block: float | None = None
    max_tokens: int | None = None
    kv_bytes_per_token_per_block: float | None = None
    measured_from: str | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.num_blocks, int) or isinstance(self.num_blocks, bool) or self.num_blocks < 1:
            raise SpecError("model.num_blocks", f"must be a positive integer, got {self.num_blocks!r}")
        _positive("model.block_size_gb", self.block_size_gb)
        _positive("model.cache_size_gb", self.cache_size_gb)
        if self.flops_per_token_per_block is not None:
            _positive("model.flops_per_token_per_block", self.flops_per_token_per_block)
        if self.max_tokens is not None and (not isinstance(self.max_tokens, int) or self.max_tokens < 1):
            raise SpecError("model.max_tokens", f"must be a positive integer, got {self.max_tokens!r}")
        if self.kv_bytes_per_token_per_block is not None:
            _positive("model.kv_bytes_per_token_per_block", self.kv_bytes_per_token_per_block)


@dataclass(frozen=True, slots=True)
class Workload:
    """Poisson arrivals of rate ``arrival_rate_per_s`` λ; design load ``rho_bar`` ρ̄ (ν ≥ λ/ρ̄).

    ``prompt_tokens`` / ``output_tokens``: mean lengths l_in / l_out (used to derive τ^p, τ^c).
    """

    arrival_rate_per_s: float
    rho_bar: float = 0.7
    prompt_tokens: int = 2000
    output_tokens: int = 20

    def __post_init__(self) -> None:
        _positive("arrival_rate", self.arrival_rate_per_s)
        _positive("rho_bar", self.rho_bar)
        if self.rho_bar >= 1:
            raise SpecError("rho_bar", f"must be below 1, got {self.rho_bar!r}")
        for name in ("prompt_tokens", "output_tokens"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise SpecError(name, f"must be a positive integer, got {value!r}")


@dataclass(frozen=True, slots=True)
class Problem:
    """A planning instance: the servers, the model and the workload.

    ``bprr_sessions``: R for the BPRR baseline when fixed by the cluster file (``None``: its rule).
    ``load_bandwidth_gb_per_s``: how fast a server loads block weights when a re-placement changes
    its span (GB/s; :mod:`chainserve.adapt.cost`).
    ``head_cost``: the orchestrator's batched iteration (embedding, LM head, sampling) for every job
    whose step came back together, as a one-block :class:`StepCost` (``None``: free; issue 18).
    """

    servers: tuple[Server, ...]
    model: ModelSpec
    workload: Workload
    name: str = "cluster"
    notes: tuple[str, ...] = field(default=())
    bprr_sessions: int | None = None
    load_bandwidth_gb_per_s: float = DEFAULT_LOAD_BANDWIDTH_GB_PER_S
    head_cost: StepCost | None = None

    def __post_init__(self) -> None:
        _positive("load_bandwidth_gb_per_s", self.load_bandwidth_gb_per_s)
        if not self.servers:
            raise SpecError("servers", "at least one server is required")
        if self.bprr_sessions is not None and (
            not isinstance(self.bprr_sessions, int) or isinstance(self.bprr_sessions, bool) or self.bprr_sessions < 1
        ):
            raise SpecError("bprr_sessions", f"must be a positive integer, got {self.bprr_sessions!r}")
        names = [s.name for s in self.servers]
        if len(set(names)) != len(names):
            dup = next(n for n in names if names.count(n) > 1)
            raise SpecError("servers", f"server names must be unique, {dup!r} repeats")

    @property
    def batch_aware(self) -> bool:
        """Whether any server carries a step cost (issue 18's load-dependent service)."""
        return any(s.step is not None for s in self.servers)

    @property
    def num_servers(self) -> int:
        return len(self.servers)

    @property
    def arrival_rate_per_s(self) -> float:
        return self.workload.arrival_rate_per_s

    def with_workload(self, **changes: float) -> Problem:
        """A copy with some workload fields replaced (e.g. ``arrival_rate_per_s``)."""
        w = self.workload
        fields = {
            "arrival_rate_per_s": w.arrival_rate_per_s,
            "rho_bar": w.rho_bar,
            "prompt_tokens": w.prompt_tokens,
            "output_tokens": w.output_tokens,
        }
        fields.update(changes)
        return dataclasses.replace(self, workload=Workload(**fields))
