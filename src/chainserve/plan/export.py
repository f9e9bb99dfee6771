"""Plans as plain data: a JSON-ready dict and PETALS server commands (paper §1 notation).

Blocks are 1-based in the dict (as in the paper) and 0-based half-open in PETALS' ``--block_indices``.
"""

from __future__ import annotations

import dataclasses
import math
from fractions import Fraction
from typing import Any

from chainserve.analysis.bounds import ASSUMPTION as BOUNDS_ASSUMPTION
from chainserve.model.spec import ModelSpec, Problem, SpecError
from chainserve.plan.loaded import batch_one_times_s, full_load_times_s
from chainserve.plan.types import Plan, reserved_block_jobs

#: Hugging Face repositories PETALS loads for the catalogue models.
HF_REPOS = {
    "llama-2-7b": "meta-llama/Llama-2-7b-hf",
    "llama-2-13b": "meta-llama/Llama-2-13b-hf",
    "llama-2-70b": "meta-llama/Llama-2-70b-hf",
    "llama-3-8b": "meta-llama/Meta-Llama-3-8B",
    "llama-3-70b": "meta-llama/Meta-Llama-3-70B",
    "bloom-176b": "bigscience/bloom",
    "smollm2-135m": "HuggingFaceTB/SmolLM2-135M",
}
#: PETALS ``--torch_dtype`` / ``--quant_type`` for each weight format of the catalogue.
PETALS_DTYPE_FLAGS = {
    "fp32": "--torch_dtype float32 --quant_type none",
    "fp16": "--torch_dtype float16 --quant_type none",
    "bf16": "--torch_dtype bfloat16 --quant_type none",
    "int8": "--quant_type int8",
    "nf4": "--quant_type nf4",
}


def _finite(x: float) -> float | None:
    """JSON has no infinity: unstable plans report ``null``."""
    return x if math.isfinite(x) else None


def plan_to_dict(plan: Plan) -> dict[str, Any]:
    """The plan as JSON-ready data.

    ``model``: :func:`model_to_dict`. ``servers``: the placed servers (``start_block`` a_j 1-based,
    ``num_blocks`` m_j, reserved ``cache_gb``, ``free_gb`` left, ``num_jobs`` = Σ c_k over chains through
    it, and :func:`server_sizes`: ``weights``, ``block_size_gb``, ``cache_size_gb``). ``chains`` (fastest
    first): server names, ``blocks`` = [first, last] 1-based per hop, ``service_time`` T_k (s),
    ``capacity`` c_k, ``rate`` μ_k (1/s). ``nu`` ν, ``load`` ρ = λ/ν, ``bounds`` on the mean response
    time (s; ``assumes``: what they assume, :data:`chainserve.analysis.bounds.ASSUMPTION`); infinite
    values become ``null``. With step costs (issue 18) each chain also has
    ``service_time_batch1`` and ``service_time_full_load`` and the plan an ``estimate`` of the mean
    response time at the load's concurrency (:mod:`chainserve.plan.loaded`). ``search`` (best planner only): its
    :class:`~chainserve.plan.types.SearchReport`, ``cut_short`` true when the time limit, not the work
    limits, ended it.
    """
    problem = plan.problem
    cache, free = plan.reservation_by_server(), plan.free_memory_gb()
    jobs = jobs_per_server(plan)
    servers = [
        {
            "name": problem.servers[span.server].name,
            "gpu": problem.servers[span.server].gpu,
            "memory_gb": problem.servers[span.server].memory_gb,
            "start_block": span.start_block,
            "num_blocks": span.num_blocks,
            "cache_gb": cache[span.server],
            "free_gb": free[span.server],
            "num_jobs": jobs[span.server],
            **server_sizes(problem, span.server),
        }
        for span in plan.placement.spans
    ]
    chains = [
        {
            "servers": [problem.servers[h.server].name for h in ch.hops],
            "blocks": [[h.start_block, h.end_block] for h in ch.hops],
            "service_time": ch.service_time_s,
            "capacity": ch.capacity,
            "rate": ch.rate_per_s,
        }
        for ch in plan.chains
    ]
    data: dict[str, Any] = {
        "cluster": problem.name,
        "model": model_to_dict(problem.model),
        "method": plan.method,
        "c": plan.c,
        "arrival_rate": problem.arrival_rate_per_s,
        "servers": servers,
        "chains": chains,
        "num_job_servers": plan.num_job_servers,
        "nu": plan.total_rate_per_s,
        "load": _finite(plan.load),
        "stable": plan.is_stable,
        "bounds": {
            "lower": _finite(plan.bounds.lower_s),
            "upper": _finite(plan.bounds.upper_s),
            "assumes": BOUNDS_ASSUMPTION,
        },
    }
    if plan.estimate_s is not None:
        for entry, one, full in zip(
            chains, batch_one_times_s(problem, plan.chains), full_load_times_s(problem, plan.chains), strict=True
        ):
            entry["service_time_batch1"], entry["service_time_full_load"] = one, full
        data["estimate"] = _finite(plan.estimate_s)
    if plan.search is not None:
        data["search"] = dataclasses.asdict(plan.search)
    return data


def model_to_dict(model: ModelSpec) -> dict[str, Any]:
    """The model as JSON-ready data: ``name``, ``num_blocks`` L, ``block_size_gb`` s_m and
    ``cache_size_gb`` s_c in its ``dtype``, ``kv_bytes_per_token_per_block`` (measured, else s_c over
    ``max_tokens`` when known, else ``null``) and ``measured``: whether L, s_m and s_c were measured from
    a model directory (issue 29)."""
    kv = model.kv_bytes_per_token_per_block
    if kv is None and model.max_tokens is not None:
        kv = model.cache_size_gb * 1e9 / model.max_tokens
    return {
        "name": model.name,
        "num_blocks": model.num_blocks,
        "block_size_gb": model.block_size_gb,
        "cache_size_gb": model.cache_size_gb,
        "dtype": model.dtype,
        "kv_bytes_per_token_per_block": kv,
        "measured": model.measured_from is not None,
    }


def server_sizes(problem: Problem, j: int) -> dict[str, Any]:
    """Server j's ``weights`` (the model's dtype when it sets none), ``block_size_gb`` s_m,j and
    ``cache_size_gb`` s_c,j."""
    return {
        "weights": problem.servers[j].weights or problem.model.dtype,
        "block_size_gb": problem.block_size_gb(j),
        "cache_size_gb": problem.cache_size_gb(j),
    }


def jobs_per_server(plan: Plan) -> dict[int, int]:
    """Concurrent jobs whose cache each placed server holds: Σ c_k over the chains through it."""
    jobs = {span.server: 0 for span in plan.placement.spans}
    for ch in plan.chains:
        for hop in ch.hops:
            jobs[hop.server] += ch.capacity
    return jobs


def max_tokens_of(model: ModelSpec) -> int:
    """The sequence length s_c was sized for (known for catalogue models).

    >>> from chainserve.model.catalogue import model_arch
    >>> max_tokens_of(model_arch("llama-2-7b").spec("fp16", max_tokens=2076))
    2076
    """
    if model.max_tokens is None:
        raise SpecError(
            "max_tokens",
            f'unknown for the raw model {model.name!r}; add "max_tokens" (the sequence '
            "length cache_size_gb holds) to the raw instance, or model.max_tokens to a raw model "
            "mapping, so that cache can be sized in tokens",
        )
    return model.max_tokens


def cache_tokens_per_block(plan: Plan, max_tokens: int) -> dict[int, int]:
    """PETALS ``attn_cache_tokens`` per placed server: its reserved cache spread over its m_j blocks,
    in tokens, ⌈Σ_k c_k·m_ij(k) / m_j × max_tokens⌉ (PETALS sizes one pool of that many tokens on
    each of its blocks, shared by all sessions)."""
    block_jobs = reserved_block_jobs(plan)
    return {
        span.server: math.ceil(Fraction(block_jobs[span.server], span.num_blocks) * max_tokens)
        for span in plan.placement.spans
    }


def petals_commands(plan: Plan, model_repo: str | None = None) -> list[str]:
    """One ``python -m petals.cli.run_server`` command per placed server, in placement order.

    ``--block_indices START:END`` is 0-based half-open (a_j − 1 : a_j − 1 + m_j);
    ``--attn_cache_tokens`` is :func:`cache_tokens_per_block`; ``--inference_max_length`` lets a
    session reach the planned sequence length; dtype flags follow each server's weight format (the
    model's when it sets none).
    """
    model = plan.problem.model
    max_tokens = max_tokens_of(model)
    arch_name = model.name.split("/")[0]
    repo = model_repo or HF_REPOS.get(arch_name, arch_name)
    dtype = model.dtype or (model.name.split("/")[1] if "/" in model.name else None)
    tokens = cache_tokens_per_block(plan, max_tokens)
    lines = []
    for span in plan.placement.spans:
        start = span.start_block - 1
        parts = [
            f"python -m petals.cli.run_server {repo}",
            f"--block_indices {start}:{start + span.num_blocks}",
            f"--attn_cache_tokens {tokens[span.server]}",
            f"--inference_max_length {max_tokens}",
        ]
        weights = plan.problem.servers[span.server].weights or dtype
        if weights in PETALS_DTYPE_FLAGS:
            parts.append(PETALS_DTYPE_FLAGS[weights])
        parts.append(f"--public_name {plan.problem.servers[span.server].name}")
        lines.append(" ".join(parts))
    return lines
