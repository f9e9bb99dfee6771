"""Catalogues of real models and GPU profiles, and the paper's τ formulas (paper §4.1).

Model figures come from each model's published architecture; GPU figures are vendor peak dense
fp16/bf16 tensor FLOP/s and memory bandwidth (MIG slices get their share of SMs and memory slices).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from chainserve.model.formats import BITS_PER_PARAM, WEIGHT_FORMATS, FormatSizes
from chainserve.model.spec import ModelSpec, Problem, SpecError
from chainserve.model.step_cost import StepCost

GB = 1e9

#: Bytes per KV-cache value (the cache stays in 16-bit whatever the weight format).
KV_BYTES = 2


@dataclass(frozen=True, slots=True)
class ModelArch:
    """A transformer's shape; everything the planner needs is derived from it."""

    name: str
    num_layers: int
    hidden_size: int
    intermediate_size: int
    num_heads: int
    num_kv_heads: int
    gated_mlp: bool = True  # LLaMA-style SwiGLU (3 matrices) vs BLOOM's 2-matrix MLP
    default_dtype: str = "fp16"

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def params_per_block(self) -> int:
        """Parameters in one block: attention projections, MLP, and two norms."""
        d, kv = self.hidden_size, self.num_kv_heads * self.head_dim
        attention = 2 * d * d + 2 * d * kv
        mlp = (3 if self.gated_mlp else 2) * d * self.intermediate_size
        return attention + mlp + 2 * d

    @property
    def flops_per_token_per_block(self) -> float:
        """F: about two FLOPs per parameter per token."""
        return 2.0 * self.params_per_block

    def block_size_gb(self, dtype: str) -> float:
        """s_m: one block's parameters in GB for a weight format."""
        if dtype not in BITS_PER_PARAM:
            raise SpecError("dtype", f"unknown dtype {dtype!r}; known: {', '.join(BITS_PER_PARAM)}")
        return self.params_per_block * BITS_PER_PARAM[dtype] / 8 / GB

    def cache_size_gb(self, max_tokens: int) -> float:
        """s_c: one job's K and V for one block, for ``max_tokens`` tokens, in GB."""
        if max_tokens < 1:
            raise SpecError("max_tokens", f"must be a positive integer, got {max_tokens!r}")
        return 2 * self.num_kv_heads * self.head_dim * max_tokens * KV_BYTES / GB

    def spec(self, dtype: str | None = None, max_tokens: int = 2048) -> ModelSpec:
        """The model in ``dtype`` (default its own), with its sizes in every server weight format
        (the catalogue's KV cache is 16-bit in all of them)."""
        dtype = dtype or self.default_dtype
        cache_gb = self.cache_size_gb(max_tokens)
        return ModelSpec(
            name=f"{self.name}/{dtype}",
            num_blocks=self.num_layers,
            block_size_gb=self.block_size_gb(dtype),
            cache_size_gb=cache_gb,
            flops_per_token_per_block=self.flops_per_token_per_block,
            max_tokens=max_tokens,
            dtype=dtype,
            format_sizes=tuple(FormatSizes(f, self.block_size_gb(f), cache_gb) for f in WEIGHT_FORMATS),
        )


MODELS: dict[str, ModelArch] = {
    m.name: m
    for m in (
        ModelArch("llama-2-7b", 32, 4096, 11008, 32, 32),
        ModelArch("llama-2-13b", 40, 5120, 13824, 40, 40),
        ModelArch("llama-2-70b", 80, 8192, 28672, 64, 8),
        ModelArch("llama-3-8b", 32, 4096, 14336, 32, 8, default_dtype="bf16"),
        ModelArch("llama-3-70b", 80, 8192, 28672, 64, 8, default_dtype="bf16"),
        ModelArch("bloom-176b", 70, 14336, 57344, 112, 112, gated_mlp=False, default_dtype="nf4"),
        ModelArch("smollm2-135m", 30, 576, 1536, 9, 3, default_dtype="bf16"),
    )
}


@dataclass(frozen=True, slots=True)
class GpuProfile:
    """A GPU or MIG slice: memory, peak dense fp16 FLOP/s, memory bandwidth."""

    name: str
    memory_gb: float
    peak_tflops: float
    bandwidth_gb_per_s: float


GPUS: dict[str, GpuProfile] = {
    g.name: g
    for g in (
        GpuProfile("a100-80gb", 80, 312.0, 2039.0),
        GpuProfile("a100-3g.40gb", 40, 312.0 * 3 / 7, 2039.0 * 4 / 8),
        GpuProfile("a100-2g.20gb", 20, 312.0 * 2 / 7, 2039.0 * 2 / 8),
        GpuProfile("a100-1g.10gb", 10, 312.0 * 1 / 7, 2039.0 * 1 / 8),
        GpuProfile("h100-80gb", 80, 989.0, 3350.0),
        GpuProfile("l4", 24, 121.0, 300.0),
        GpuProfile("t4", 16, 65.0, 320.0),
        GpuProfile("v100-32gb", 32, 125.0, 900.0),
        GpuProfile("rtx-4090", 24, 165.0, 1008.0),
    )
}
GPU_ALIASES = {
    "3g.40gb": "a100-3g.40gb",
    "2g.20gb": "a100-2g.20gb",
    "1g.10gb": "a100-1g.10gb",
    "a100": "a100-80gb",
    "h100": "h100-80gb",
    "v100": "v100-32gb",
    "4090": "rtx-4090",
}

#: t_o: fixed per-block overhead of one job (seconds).
BLOCK_OVERHEAD_S = 0.001
#: Per-hop software overhead added to each round trip (PETALS' 18 ms).
HOP_OVERHEAD_S = 0.018


def lookup(table: dict, aliases: dict[str, str], name: str, what: str):
    key = aliases.get(name.lower(), name.lower())
    if key not in table:
        raise SpecError(what, f"unknown {what} {name!r}; known: {', '.join(sorted(table))}")
    return table[key]


def model_arch(name: str) -> ModelArch:
    return lookup(MODELS, {}, name, "model")


def gpu_profile(name: str) -> GpuProfile:
    return lookup(GPUS, GPU_ALIASES, name, "gpu")


def tau_p_s(gpu: GpuProfile, arch: ModelArch, block_size_gb: float, prompt_tokens: int, output_tokens: int) -> float:
    """τ^p_j = t_o + (F/f_j)·l_in + (s_m/b_j)·(l_out − 1): prefill is compute-bound, decode
    memory-bound (paper §4.1)."""
    prefill = arch.flops_per_token_per_block / (gpu.peak_tflops * 1e12) * prompt_tokens
    decode = block_size_gb / gpu.bandwidth_gb_per_s * max(output_tokens - 1, 0)
    return BLOCK_OVERHEAD_S + prefill + decode


def tau_c_s(rtt_s: float, round_trips: int, overhead_s: float = HOP_OVERHEAD_S) -> float:
    """τ^c_j = (RTT + per-hop overhead) × round trips of one job (one per generated token)."""
    return (rtt_s + overhead_s) * round_trips


def roofline_step_cost(gpu: GpuProfile, block_size_gb: float, flops_per_token_per_block: float) -> StepCost:
    """The roofline step cost of a block on ``gpu`` (issue 18): every weight read once per iteration
    (α = α' = t_o + s_m / memory bandwidth), each token computed at peak (β = β' = F / peak FLOP/s).

    >>> cost = roofline_step_cost(gpu_profile("a100-80gb"), 0.4, 0.8e9)
    >>> round(cost.alpha_s * 1e3, 3), round(cost.beta_s * 1e6, 3)   # ms, µs
    (1.196, 2.564)
    """
    alpha = BLOCK_OVERHEAD_S + block_size_gb / gpu.bandwidth_gb_per_s
    beta = flops_per_token_per_block / (gpu.peak_tflops * 1e12)
    return StepCost(alpha, beta, alpha, beta)


def with_roofline_step_costs(problem: Problem) -> Problem:
    """``problem`` with a roofline-shaped step cost on every server that names a gpu, scaled so that
    one job alone still takes τ^p_j per block at the workload's mean lengths: the cluster keeps its
    meaning at batch 1 and gains what batching costs on that GPU (issue 18's emulated clusters)."""
    model, w = problem.model, problem.workload
    if model.flops_per_token_per_block is None:
        raise SpecError("model", f"{model.name}: the roofline needs a catalogue model (its FLOPs per token)")
    servers = []
    for s in problem.servers:
        if s.gpu is None:
            servers.append(s)
            continue
        roof = roofline_step_cost(gpu_profile(s.gpu), model.block_size_gb, model.flops_per_token_per_block)
        servers.append(
            dataclasses.replace(s, step=roof.scaled(s.tau_p_s / roof.job_s(w.prompt_tokens, w.output_tokens)))
        )
    return dataclasses.replace(problem, servers=tuple(servers))
