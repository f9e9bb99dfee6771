"""BPRR's CG-BP block placement (spec §3; Sun, He, Ji, Parag, arXiv 2512.21884).

Our reading of CG-BP (conservative greedy block placement), with the points the spec leaves open:

* **Sessions to reserve, R.** "Mean plus one standard deviation of the number of concurrent requests."
  That number is taken as Poisson with mean λ·T̄ (an M/M/∞ system), so R = λT̄ + √(λT̄), **rounded
  down** (truncated) and at least 1. T̄ is, as in the BPRR authors' simulator, the service time of a
  request's path through the R = 1 CG-BP placement: the fastest path (:func:`fastest_path_s`; a hop
  into server j running m_ij blocks costs τ^c_j + τ^p_j·m_ij) — the time a request actually spends,
  not L blocks at an average per-block time. Rounding down is our reading (the authors' code reports
  R = 2–3 on the paper's clusters, which truncation approaches; ⌈·⌉ would reserve one session more
  and the paper-sweeps report tabulates R = 1..6). R is capped by
  ``⌊(Σ_j M_j − s_m(L+J)) / (s_c(L+J))⌋``, the most sessions the cluster's memory could hold on every
  block (the ``+J`` allows each server a block's worth of rounding waste). An explicit R (method
  ``bprr:R=<n>`` or the cluster-file field ``bprr_sessions``) replaces the rule and is not capped.
* **Blocks per server.** ``m_j = min(⌊M_j / (s_m + s_c·R)⌋, L)``; servers sorted by amortised time
  ``t̃_j = (τ^c_j + τ^p_j·m_j)/m_j`` (fastest first, ties by index).
* **Phase 1** — every block reaches R sessions: walking that order, a server starts at the first block
  whose session capacity is below R (shifted left to end at L if it would run past it). A server's
  session capacity on its blocks is ``k_j = ⌊(M_j − s_m·m_j)/(s_c·m_j)⌋ ≥ R``, so one pass over blocks
  1..L suffices. If the servers run out first, R is lowered by one and the placement redone.
* **Phase 2** — fill the least-served blocks: each remaining server, in the same order, takes the
  window whose least capacity is smallest (ties: smallest total capacity, then smallest start).

Every placed server gives all memory left after its parameters to its cache pool, from which WS-RR
(:mod:`chainserve.dispatch.ws_rr`) routes requests.
"""

from __future__ import annotations

import math

from chainserve.model.spec import Problem, SpecError
from chainserve.plan.baselines.types import PathPlacement
from chainserve.plan.gbp_cr import blocks_with_reservation
from chainserve.plan.types import Placement, Span, jobs_that_fit


def bprr_sessions_cap(problem: Problem) -> int:
    """⌊(Σ_j M_j − s_m(L+J)) / (s_c(L+J))⌋, the largest R memory allows (may be ≤ 0); with per-server
    sizes s_m,j and s_c,j, the smallest of each (an upper bound on R)."""
    room = problem.model.num_blocks + problem.num_servers
    s_m, s_c = min(problem.block_sizes), min(problem.cache_sizes)
    return math.floor((sum(s.memory_gb for s in problem.servers) - s_m * room) / (s_c * room))


def fastest_path_s(problem: Problem, spans: tuple[Span, ...]) -> float:
    """Service time of the fastest request path through ``spans``: from the next block b to run, a
    server whose span holds b runs b..its last block at τ^c_j + τ^p_j·(blocks run). Dynamic
    programme over b = 1..L, O(J·L); ``inf`` when blocks 1..L cannot be covered.

    >>> from chainserve.model.spec import ModelSpec, Problem, Server, Workload
    >>> p = Problem((Server("a", 9, 1.0, 0.5), Server("b", 9, 3.0, 0.5)), ModelSpec("toy", 4, 1.0, 1.0),
    ...             Workload(1.0))
    >>> fastest_path_s(p, (Span(0, 1, 3), Span(1, 2, 3)))   # a runs 1..3 (3.5 s), b runs 4 (3.5 s)
    7.0
    """
    num_blocks = problem.model.num_blocks
    best = [math.inf] * (num_blocks + 2)  # best[b]: time to have run blocks 1..b−1
    best[1] = 0.0
    for b in range(1, num_blocks + 1):
        if math.isinf(best[b]):
            continue
        for span in spans:
            if span.start_block <= b <= span.end_block:
                server = problem.servers[span.server]
                time_s = best[b] + server.tau_c_s + server.tau_p_s * (span.end_block - b + 1)
                best[span.end_block + 1] = min(best[span.end_block + 1], time_s)
    return best[num_blocks + 1]


def bprr_sessions(problem: Problem) -> int:
    """R = ⌊λT̄ + √(λT̄)⌋ (≥ 1), T̄ = :func:`fastest_path_s` through the R = 1 CG-BP placement, capped
    by :func:`bprr_sessions_cap`; see the module docstring.

    >>> from chainserve.model.spec import ModelSpec, Problem, Server, Workload
    >>> p = Problem((Server("a", 30, 1.0, 0.0),), ModelSpec("toy", 2, 2.0, 1.0), Workload(1.0))
    >>> bprr_sessions(p)   # T̄ = 2 blocks × 1 s, λT̄ = 2: ⌊2 + 1.41⌋ = 3; cap ⌊(30 − 6)/3⌋ = 8
    3
    """
    cap = bprr_sessions_cap(problem)
    if cap < 1:
        raise ValueError("servers: their memory cannot hold every block with cache for one session")
    spans = _cg_bp(problem, 1)
    if spans is None:
        raise ValueError("servers: too little memory to host every block with cache for one session")
    load = problem.arrival_rate_per_s * fastest_path_s(problem, spans)
    return min(max(1, math.floor(load + math.sqrt(load))), cap)


def _cg_bp(problem: Problem, sessions: int) -> tuple[Span, ...] | None:
    """Phases 1 and 2 for R = ``sessions``; ``None`` if phase 1 cannot reach R on every block."""
    L = problem.model.num_blocks
    blocks = blocks_with_reservation(problem, sessions)
    times = [s.tau_c_s + s.tau_p_s * m for s, m in zip(problem.servers, blocks, strict=True)]
    order = sorted((j for j, m in enumerate(blocks) if m > 0), key=lambda j: (times[j] / blocks[j], j))
    capacity = [0] * (L + 1)  # 1-based: sessions each block can hold
    spans: list[Span] = []
    for j in order:
        m = blocks[j]
        short = [b for b in range(1, L + 1) if capacity[b] < sessions]
        if short:
            start = min(short[0], L - m + 1)
        else:
            start = min(range(1, L - m + 2), key=lambda a: (min(capacity[a : a + m]), sum(capacity[a : a + m]), a))
        spans.append(Span(j, start, m))
        sessions_here = jobs_that_fit(
            problem.servers[j].memory_gb - problem.block_size_gb(j) * m, problem.cache_size_gb(j) * m
        )
        for b in range(start, start + m):
            capacity[b] += sessions_here
    if min(capacity[1:]) < sessions:
        return None
    return tuple(spans)


def bprr_placement(problem: Problem, sessions: int | None = None) -> PathPlacement:
    """CG-BP placement reserving R sessions per block, lowered until phase 1 succeeds. R is
    ``sessions`` when given, else the problem's ``bprr_sessions``, else :func:`bprr_sessions`.
    O(R·J·L²) at worst. Raises ``ValueError`` when even R = 1 cannot cover every block.

    >>> from chainserve.model.spec import ModelSpec, Problem, Server, Workload
    >>> p = Problem((Server("a", 10, 1.0, 0.0), Server("b", 10, 2.0, 0.0), Server("c", 10, 1.5, 0.0)),
    ...             ModelSpec("toy", 4, 2.0, 1.0), Workload(0.05))
    >>> layout = bprr_placement(p)   # T̄ = 3 + 1.5 s (a: 1..3, c: 4), λT̄ = 0.225 → R = 1; m = 3
    >>> # a (fastest) takes 1..3, c covers block 4 ending at L (2..4), b ties on 1..3 and 2..4 → 1..3
    >>> [(s.server, s.start_block, s.num_blocks) for s in layout.placement.spans], layout.cache_gb
    ([(0, 1, 3), (2, 2, 3), (1, 1, 3)], (4.0, 4.0, 4.0))
    """
    if sessions is not None and (isinstance(sessions, bool) or not isinstance(sessions, int) or sessions < 1):
        raise SpecError("bprr_sessions", f"must be a positive integer, got {sessions!r}")
    fixed = sessions if sessions is not None else problem.bprr_sessions
    wanted = fixed if fixed is not None else bprr_sessions(problem)
    most = max(
        jobs_that_fit(s.memory_gb - problem.block_size_gb(j), problem.cache_size_gb(j))
        for j, s in enumerate(problem.servers)
    )
    for sessions in range(min(wanted, most), 0, -1):  # above ``most`` no server holds one block
        spans = _cg_bp(problem, sessions)
        if spans is not None:
            break
    else:
        raise ValueError("servers: too little memory to host every block with cache for one session")
    how = "fixed" if fixed is not None else "⌊λT̄ + √(λT̄)⌋"
    note = f"R = {sessions} sessions reserved per block ({how}" + (
        f"; {wanted} asked, too many for phase 1)" if sessions != wanted else ")"
    )
    placed = {s.server: s for s in spans}
    cache = tuple(
        problem.servers[j].memory_gb - problem.block_size_gb(j) * placed[j].num_blocks if j in placed else 0.0
        for j in range(problem.num_servers)
    )
    layout = PathPlacement(problem, Placement(spans, problem.model.num_blocks), cache, "bprr", (note,))
    layout.check()
    return layout
