"""Weight formats a server may hold its blocks in, and what each costs (issue 29; paper §1's s_m, s_c).

A server's format sets its block size s_m,j and, since the KV cache is kept in the compute dtype, its
cache size per block s_c,j. The float formats compute in themselves; ``int8`` (torchao's int8
weight-only quantisation) computes, and caches KV, in the model's dtype. No torch here.
"""

from __future__ import annotations

from dataclasses import dataclass

#: The formats a server may set with ``servers[i].weights``.
WEIGHT_FORMATS = ("fp32", "bf16", "fp16", "int8")
#: Bits per parameter of every format a model's sizes may be given in (NF4 counts its block-wise scales).
BITS_PER_PARAM: dict[str, float] = {"fp32": 32.0, "fp16": 16.0, "bf16": 16.0, "int8": 8.0, "nf4": 4.25}
#: Bytes per value of the dtypes a block computes (and keeps its KV cache) in.
FLOAT_BYTES: dict[str, int] = {"fp32": 4, "bf16": 2, "fp16": 2}
#: The compute dtype of a model whose own dtype is quantised (the catalogue's 16-bit KV cache).
QUANTISED_COMPUTE = "fp16"


@dataclass(frozen=True, slots=True)
class FormatSizes:
    """One block's sizes in a weight ``format``: ``block_size_gb`` s_m and ``cache_size_gb`` s_c (one
    job's KV for the model's ``max_tokens``), both in GB."""

    format: str
    block_size_gb: float
    cache_size_gb: float


def compute_dtype(weights: str, model_dtype: str | None) -> str:
    """The dtype a block in ``weights`` computes and caches KV in: a float format's own, else the
    model's (16-bit when the model's dtype is quantised or unknown).

    >>> compute_dtype("bf16", "fp32"), compute_dtype("int8", "fp32"), compute_dtype("int8", "nf4")
    ('bf16', 'fp32', 'fp16')
    """
    if weights in FLOAT_BYTES:
        return weights
    return model_dtype if model_dtype in FLOAT_BYTES else QUANTISED_COMPUTE
