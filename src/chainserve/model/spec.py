"""Frozen problem specs: servers, the model to serve, the workload (paper §1).

Sizes are in GB (10^9 bytes), times in seconds. Constructors only validate; they raise
:class:`SpecError` naming the offending field.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass, field

from chainserve.model.formats import BITS_PER_PARAM, FLOAT_BYTES, WEIGHT_FORMATS, FormatSizes, compute_dtype
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


def _check_format(field_name: str, value: str, known: tuple[str, ...]) -> None:
    if value not in known:
        raise SpecError(field_name, f"unknown weight format {value!r}; known: {', '.join(known)}")


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
    ``weights``: the format its blocks are held in (:data:`~.formats.WEIGHT_FORMATS`; ``None``: the
    model's), and ``block_size_gb`` s_m,j / ``cache_size_gb`` s_c,j: its block and per-block cache
    sizes in that format (``None``: the model's s_m / s_c; read them with :meth:`Problem.block_size_gb`).
    """

    name: str
    memory_gb: float
    tau_p_s: float
    tau_c_s: float
    gpu: str | None = None
    rtt_s: float | None = None
    step: StepCost | None = None
    weights: str | None = None
    block_size_gb: float | None = None
    cache_size_gb: float | None = None

    def __post_init__(self) -> None:
        if not self.name:
            raise SpecError("name", "must be a non-empty string")
        _positive(f"{self.name}.memory_gb", self.memory_gb)
        _positive(f"{self.name}.tau_p_s", self.tau_p_s)
        _non_negative(f"{self.name}.tau_c_s", self.tau_c_s)
        if self.rtt_s is not None:
            _non_negative(f"{self.name}.rtt_s", self.rtt_s)
        if self.weights is not None:
            _check_format(f"{self.name}.weights", self.weights, WEIGHT_FORMATS)
        for key in ("block_size_gb", "cache_size_gb"):
            if getattr(self, key) is not None:
                _positive(f"{self.name}.{key}", getattr(self, key))


@dataclass(frozen=True, slots=True)
class ModelSpec:
    """The model to serve: ``num_blocks`` L blocks, each ``block_size_gb`` s_m of parameters; one job
    holds ``cache_size_gb`` s_c of KV cache per block it passes (sized for the maximum sequence).
    ``flops_per_token_per_block``: F, and ``max_tokens``: the sequence length s_c was sized for; both
    known for catalogue models (token-level service times and PETALS export need them).
    ``kv_bytes_per_token_per_block``: s_c per token, and ``measured_from``: the model directory L, s_m
    and s_c were measured from (meta-device build and dry run, issue 29); both ``None`` otherwise.
    ``dtype``: the format s_m and s_c are given in (``None``: unknown, raw sizes); ``format_sizes``:
    s_m and s_c measured in other weight formats (:meth:`sizes_for`)."""

    name: str
    num_blocks: int
    block_size_gb: float
    cache_size_gb: float
    flops_per_token_per_block: float | None = None
    max_tokens: int | None = None
    kv_bytes_per_token_per_block: float | None = None
    measured_from: str | None = None
    dtype: str | None = None
    format_sizes: tuple[FormatSizes, ...] = ()

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
        if self.dtype is not None:
            _check_format("model.dtype", self.dtype, tuple(BITS_PER_PARAM))
        formats = [entry.format for entry in self.format_sizes]
        for i, entry in enumerate(self.format_sizes):
            _check_format(f"model.format_sizes[{i}].format", entry.format, WEIGHT_FORMATS)
            if formats.count(entry.format) > 1:
                raise SpecError(f"model.format_sizes[{i}].format", f"{entry.format!r} is given twice")
            _positive(f"model.format_sizes[{i}].block_size_gb", entry.block_size_gb)
            _positive(f"model.format_sizes[{i}].cache_size_gb", entry.cache_size_gb)

    def sizes_for(self, weights: str | None) -> tuple[float, float]:
        """(s_m, s_c) in GB of a block held in ``weights`` (``None``: the model's own): the measured entry
        of ``format_sizes`` when there is one, else scaled from ``dtype`` by bits per parameter (int8: 8)
        and by bytes per KV value of the compute dtype (:func:`~.formats.compute_dtype`; issue 29).

        >>> m = ModelSpec("toy", 2, 2.0, 0.5, dtype="bf16")
        >>> m.sizes_for(None), m.sizes_for("fp32"), m.sizes_for("int8")
        ((2.0, 0.5), (4.0, 1.0), (1.0, 0.5))
        """
        if weights is None:
            return self.block_size_gb, self.cache_size_gb
        _check_format("weights", weights, WEIGHT_FORMATS)
        for entry in self.format_sizes:
            if entry.format == weights:
                return entry.block_size_gb, entry.cache_size_gb
        if self.dtype is None:
            raise SpecError(
                "weights",
                f"the model {self.name!r} does not say which dtype its sizes are in, so they cannot be "
                f"converted to {weights}; give the model's dtype",
            )
        kv_ratio = FLOAT_BYTES[compute_dtype(weights, self.dtype)] / FLOAT_BYTES[compute_dtype(self.dtype, self.dtype)]
        return self.block_size_gb * BITS_PER_PARAM[weights] / BITS_PER_PARAM[self.dtype], self.cache_size_gb * kv_ratio


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
class SharedHost:
    """A machine whose CPU cores several of the cluster's processes share (issue 31): ``servers`` (their
    names) and, with ``head``, the orchestrator's LM head compute there, one core each at most, so when
    more of them compute at once than it has ``cores`` each runs at ``cores / n`` of its speed
    (processor sharing: the batched simulator's model, :class:`~chainserve.sim.batched.BatchedService`).
    A server on no shared host has its device to itself (a GPU; the paper's model)."""

    name: str
    cores: float
    servers: tuple[str, ...]
    head: bool = False

    def __post_init__(self) -> None:
        if not self.name:
            raise SpecError("hosts.name", "must be a non-empty string")
        _positive(f"hosts.{self.name}.cores", self.cores)
        if not self.servers and not self.head:
            raise SpecError(f"hosts.{self.name}", "shares nothing: give servers or head")


@dataclass(frozen=True, slots=True)
class Problem:
    """A planning instance: the servers, the model and the workload.

    ``bprr_sessions``: R for the BPRR baseline when fixed by the cluster file (``None``: its rule).
    ``load_bandwidth_gb_per_s``: how fast a server loads block weights when a re-placement changes
    its span (GB/s; :mod:`chainserve.adapt.cost`).
    ``head_cost``: the orchestrator's batched iteration (embedding, LM head, sampling) for every job
    whose step came back together, as a one-block :class:`StepCost` (``None``: free; issue 18).
    ``hosts``: the machines whose cores some servers (and the head) share (:class:`SharedHost`, issue 31).
    """

    servers: tuple[Server, ...]
    model: ModelSpec
    workload: Workload
    name: str = "cluster"
    notes: tuple[str, ...] = field(default=())
    bprr_sessions: int | None = None
    load_bandwidth_gb_per_s: float = DEFAULT_LOAD_BANDWIDTH_GB_PER_S
    head_cost: StepCost | None = None
    hosts: tuple[SharedHost, ...] = ()

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
        self._check_hosts(set(names))

    def _check_hosts(self, names: set[str]) -> None:
        """Each shared host names known servers; a server and the head are on one host at most."""
        seen: set[str] = set()
        for host in self.hosts:
            for name in host.servers:
                if name not in names:
                    raise SpecError(f"hosts.{host.name}.servers", f"{name!r} is not a server of the cluster")
                if name in seen:
                    raise SpecError(f"hosts.{host.name}.servers", f"{name!r} is on two hosts")
                seen.add(name)
        if sum(host.head for host in self.hosts) > 1:
            raise SpecError("hosts", "the head is on two hosts")

    @property
    def batch_aware(self) -> bool:
        """Whether any server carries a step cost (issue 18's load-dependent service)."""
        return any(s.step is not None for s in self.servers)

    def block_size_gb(self, j: int) -> float:
        """s_m,j: one block's parameters on server j, in its weight format (default the model's s_m)."""
        size = self.servers[j].block_size_gb
        return self.model.block_size_gb if size is None else size

    def cache_size_gb(self, j: int) -> float:
        """s_c,j: one job's KV cache per block on server j, in its compute dtype (default the model's s_c)."""
        size = self.servers[j].cache_size_gb
        return self.model.cache_size_gb if size is None else size

    @property
    def block_sizes(self) -> tuple[float, ...]:
        """s_m,j of every server."""
        return tuple(self.block_size_gb(j) for j in range(len(self.servers)))

    @property
    def cache_sizes(self) -> tuple[float, ...]:
        """s_c,j of every server."""
        return tuple(self.cache_size_gb(j) for j in range(len(self.servers)))

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

    def with_servers(self, kept: Sequence[int]) -> Problem:
        """A copy on the servers at indices ``kept`` (in that order), each shared host narrowed to them
        (one left sharing nothing is dropped)."""
        servers = tuple(self.servers[j] for j in kept)
        names = {s.name for s in servers}
        kept_names = [(h, tuple(n for n in h.servers if n in names)) for h in self.hosts]
        hosts = tuple(dataclasses.replace(h, servers=on) for h, on in kept_names if on or h.head)
        return dataclasses.replace(self, servers=servers, hosts=hosts)
