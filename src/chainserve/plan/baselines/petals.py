"""PETALS' block placement (spec §3), modelled on bigscience-workshop/petals.

What PETALS does (read in ``server/server.py``, ``server/block_selection.py``, ``server/throughput.py``,
``server/memory_cache.py``), and what we keep:

* **Number of blocks.** A server first sets aside an autograd reserve for backward passes,
  ``2 GiB × n_devices × hidden_size / 14336`` (2 GiB for BLOOM-176B, proportional for other models;
  one device per server here, :func:`autograd_reserve_gb`), then takes
  ``⌊(memory − reserve) / (block size + cache per block)⌋`` blocks (at most L), where the cache per
  block holds K and V for ``attn_cache_tokens`` tokens. We serve inference only, but a PETALS server
  keeps the reserve whatever it serves, so we keep it too (it is part of what the baseline is).
  Recent PETALS reserve 8192 tokens (32768 for grouped-query models); the version the paper compares
  against reserved 4096 (16384), our default (:func:`default_cache_tokens` tells grouped-query
  catalogue models apart).
  The cache pool is ``cache per block × blocks`` and is all a server will ever give to inference
  sessions (the rest of its memory stays unused).
  Our ``ModelSpec`` sizes s_c for the maximum sequence but does not record that length, so we take
  max tokens = prompt + output tokens of the workload (as the cluster files do by default):
  cache per block = ``s_c · cache_tokens / max_tokens``.
* **Announced throughput.** ``min(forward_rps / ((m + 1)/2), network_rps)``: forward_rps is the
  measured per-block compute rate, divided by the mean number of the server's blocks a request uses
  if it enters at a uniformly random block; network_rps its measured link rate. In our model a job
  passes one block in τ^p_j, so forward_rps = 1/τ^p_j (jobs/s); our servers carry no bandwidth, so
  ``network_rps`` (jobs/s per server) is an optional argument, unlimited by default.
* **Choice of span.** Servers join one after another (random order here, PETALS adds random delays).
  Each sums the announced throughputs of the servers already on every block, and takes the start whose
  window of m blocks, sorted ascending, is lexicographically smallest (ties: the smallest start) — it
  serves the weakest blocks first — then adds its own throughput to those blocks.
* **Rebalancing** (optional, ``rebalance_rounds``). Each server periodically simulates leaving its span,
  moving to the best start and letting every other server (in random order) re-choose until nothing
  moves; if that would raise the weakest block's throughput by more than a factor 1/``balance_quality``
  (0.75 in PETALS) it leaves and re-chooses its span among the others. One round lets every server
  check once, in random order. PETALS' absolute epsilon (1e-3 in tokens/s) becomes a relative bias
  ``(1 + ε)`` plus a tiny absolute floor, since our throughputs are in jobs/s; a sweep limit guards the
  simulated re-choosing, which PETALS leaves unbounded.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from chainserve.model.catalogue import MODELS
from chainserve.model.spec import ModelSpec, Problem
from chainserve.plan.baselines.types import PathPlacement
from chainserve.plan.types import Placement, Span, jobs_that_fit

#: PETALS' bias that keeps a server where it is when alternatives are equal (relative here).
STAY_BIAS = 1e-3
#: Throughput treated as zero (jobs/s).
TINY_RATE = 1e-12
#: PETALS' autograd reserve: 2 GiB per device for BLOOM-176B (hidden size 14336), proportional otherwise.
AUTOGRAD_GIB = 2.0
BLOOM_HIDDEN_SIZE = 14336
GIB_IN_GB = 1024**3 / 1e9


def default_cache_tokens(model: ModelSpec) -> int:
    """4096 tokens per block, 16384 for a catalogue model with grouped-query (multi-query) attention,
    recognised by its ``name/dtype`` spec name.

    >>> from chainserve.model.catalogue import model_arch
    >>> [default_cache_tokens(model_arch(name).spec()) for name in ("llama-2-7b", "llama-3-8b")]
    [4096, 16384]
    """
    arch = MODELS.get(model.name.split("/")[0])
    return 16384 if arch is not None and arch.num_kv_heads < arch.num_heads else 4096


def autograd_reserve_gb(model: ModelSpec, num_devices: int = 1) -> float:
    """PETALS' autograd reserve in GB: 2 GiB × ``num_devices`` × hidden_size / 14336, hidden_size from
    the catalogue (``name/dtype`` spec name); a model the catalogue does not know gets BLOOM's 2 GiB.

    >>> from chainserve.model.catalogue import model_arch
    >>> [round(autograd_reserve_gb(model_arch(n).spec()), 4) for n in ("bloom-176b", "llama-2-7b")]
    [2.1475, 0.6136]
    """
    arch = MODELS.get(model.name.split("/")[0])
    hidden_size = arch.hidden_size if arch is not None else BLOOM_HIDDEN_SIZE
    return AUTOGRAD_GIB * GIB_IN_GB * num_devices * hidden_size / BLOOM_HIDDEN_SIZE


def best_start(throughput: np.ndarray, num_blocks: int) -> int:
    """0-based start of the window whose sorted throughputs are lexicographically smallest
    (ties: smallest start), as PETALS' ``_choose_best_start``.

    >>> best_start(np.array([3.0, 1.0, 1.0, 2.0, 0.5]), 2)   # windows sorted: (1,3) (1,1) (1,2) (.5,2)
    3
    """
    windows = ((sorted(throughput[i : i + num_blocks].tolist()), i) for i in range(len(throughput) - num_blocks + 1))
    return min(windows)[1]


def _should_move(
    throughput: np.ndarray,
    starts: dict[int, int],
    blocks: dict[int, int],
    rates: dict[int, float],
    j: int,
    rng: np.random.Generator,
    quality: float,
) -> bool:
    """PETALS' ``should_choose_other_blocks`` for server j, on a copy of the swarm."""
    t = throughput.copy()
    initial = t.min()
    start, m = starts[j], blocks[j]
    t[start : start + m] -= rates[j] * (1 + STAY_BIAS)
    if initial > TINY_RATE and t.min() <= TINY_RATE:
        return False  # leaving would disconnect the swarm
    new_start = best_start(t, m)
    if new_start == start:
        return False
    t[start : start + m] += rates[j] * STAY_BIAS
    where = dict(starts)
    where[j] = new_start
    t[new_start : new_start + m] += rates[j]
    for _ in range(10 * len(where)):
        moved = False
        for k in rng.permutation(sorted(where)).tolist():
            s, mk = where[k], blocks[k]
            t[s : s + mk] -= rates[k] * (1 + STAY_BIAS)
            ns = best_start(t, mk)
            t[s : s + mk] += rates[k] * STAY_BIAS
            moved |= ns != s
            where[k] = ns
            t[ns : ns + mk] += rates[k]
        if not moved:
            break
    new = t.min()
    if new < initial or new < TINY_RATE:
        return False
    return initial / new < quality - STAY_BIAS


def petals_placement(
    problem: Problem,
    rng: np.random.Generator,
    cache_tokens: int | None = None,
    *,
    network_rps: Sequence[float] | None = None,
    rebalance_rounds: int = 0,
    balance_quality: float = 0.75,
    autograd_gb: float | None = None,
) -> PathPlacement:
    """PETALS' placement; see the module docstring. ``cache_tokens`` defaults to
    :func:`default_cache_tokens`, ``autograd_gb`` (memory each server sets aside) to
    :func:`autograd_reserve_gb`. O(J·L² log L) (+ rebalancing).

    Raises ``ValueError`` when the servers that fit at least one block cannot host every block.

    >>> from chainserve.model.spec import ModelSpec, Problem, Server, Workload
    >>> p = Problem(tuple(Server(n, 10, t, 0.0) for n, t in (("a", 1.0), ("b", 2.0), ("c", 1.0))),
    ...             ModelSpec("toy", 4, 2.0, 1.0), Workload(0.1, prompt_tokens=1, output_tokens=1))
    >>> pp = petals_placement(p, np.random.default_rng(0), cache_tokens=2, autograd_gb=0.0)  # 1 job/block
    >>> # m = ⌊10/(2+1)⌋ = 3 each; joining c, a, b: c takes 1..3, a must cover block 4 (2..4), b ties → 1..3
    >>> sorted((s.server, s.start_block, s.num_blocks) for s in pp.placement.spans), pp.cache_gb
    ([(0, 2, 3), (1, 1, 3), (2, 1, 3)], (3.0, 3.0, 3.0))
    """
    cache_tokens = default_cache_tokens(problem.model) if cache_tokens is None else cache_tokens
    if cache_tokens < 1:
        raise ValueError(f"cache_tokens must be a positive integer, got {cache_tokens}")
    if not 0 < balance_quality <= 1:
        raise ValueError(f"balance_quality must be in (0, 1], got {balance_quality}")
    autograd_gb = autograd_reserve_gb(problem.model) if autograd_gb is None else autograd_gb
    if not (autograd_gb >= 0 and math.isfinite(autograd_gb)):
        raise ValueError(f"autograd_gb must be a non-negative number, got {autograd_gb}")
    model, L = problem.model, problem.model.num_blocks
    max_tokens = model.max_tokens or problem.workload.prompt_tokens + problem.workload.output_tokens
    cache_per_block_gb = model.cache_size_gb * cache_tokens / max_tokens
    per_block_gb = [s_c * cache_tokens / max_tokens for s_c in problem.cache_sizes]  # each server's s_c,j
    blocks = {
        j: min(jobs_that_fit(s.memory_gb - autograd_gb, problem.block_size_gb(j) + per_block_gb[j]), L)
        for j, s in enumerate(problem.servers)
    }
    blocks = {j: m for j, m in blocks.items() if m > 0}
    link = network_rps if network_rps is not None else [math.inf] * problem.num_servers
    if len(link) != problem.num_servers:
        raise ValueError(f"network_rps: need one rate per server ({problem.num_servers})")
    rates = {j: min(1.0 / problem.servers[j].tau_p_s / ((m + 1) / 2), link[j]) for j, m in blocks.items()}
    throughput = np.zeros(L)
    starts: dict[int, int] = {}
    for j in rng.permutation(sorted(blocks)).tolist():
        starts[j] = best_start(throughput, blocks[j])
        throughput[starts[j] : starts[j] + blocks[j]] += rates[j]
    for _ in range(rebalance_rounds):
        for j in rng.permutation(sorted(starts)).tolist():
            if _should_move(throughput, starts, blocks, rates, j, rng, balance_quality):
                throughput[starts[j] : starts[j] + blocks[j]] -= rates[j]
                starts[j] = best_start(throughput, blocks[j])
                throughput[starts[j] : starts[j] + blocks[j]] += rates[j]
    spans = tuple(Span(j, starts[j] + 1, blocks[j]) for j in sorted(starts))
    cache = tuple(per_block_gb[j] * blocks[j] if j in starts else 0.0 for j in range(problem.num_servers))
    layout = PathPlacement(
        problem,
        Placement(spans, L),
        cache,
        "petals",
        (
            f"cache for {cache_tokens} tokens per block ({cache_per_block_gb:.4g} GB at the model's s_c, sized for "
            f"{max_tokens} tokens, {'the model max_tokens' if model.max_tokens else 'prompt + output'})",
            f"autograd reserve {autograd_gb:.3g} GB",
            f"rebalance rounds {rebalance_rounds}",
        ),
    )
    layout.check()
    return layout
