"""Constructive placements for the best planner: GBP-CR's walk (spec §2.1) with its choices opened up.

GBP-CR fixes four things: one reservation level c for every server, the order (amortised time
t̃_j(c)), the stop (once the closed chains promise λ/ρ̄) and the chain end (the completing server is
shifted left to end at L). :func:`walk` takes each as an argument, and :func:`variant_placements`
lists the combinations the best planner tries for one c: server orders by amortised time, by memory
and by per-block time; walking every server (GBP-CR leaves the rest idle) or stopping as GBP-CR does;
the completing server shifted left or trimmed to the blocks still missing (its freed memory becomes
cache); and per-server reservation levels (servers grouped by memory, each group with its own level).
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator, Sequence

from chainserve.model.spec import Problem
from chainserve.plan.types import Placement, Span, jobs_that_fit


def blocks_for_levels(problem: Problem, levels: Sequence[int]) -> list[int]:
    """m_j = min(⌊M_j/(s_m,j + s_c,j·c_j)⌋, L) for a per-server reservation level c_j (spec §2.1 step 1)."""
    L = problem.model.num_blocks
    return [
        min(jobs_that_fit(s.memory_gb, problem.block_size_gb(j) + problem.cache_size_gb(j) * level), L)
        for j, (s, level) in enumerate(zip(problem.servers, levels, strict=True))
    ]


def walk(
    problem: Problem, levels: Sequence[int], order: Sequence[int], *, stop_early: bool, trim: bool
) -> Placement | None:
    """GBP-CR's walk over ``order`` with per-server levels: each server takes m_j(c_j) blocks from the
    first uncovered one; the server completing a chain is shifted left to end at L (``trim=False``,
    the paper) or holds only the blocks still missing (``trim=True``); a chain's capacity is the least
    level on it. ``stop_early``: stop once the closed chains promise Σ c_k/T_k ≥ λ/ρ̄ (the paper); else
    every server in ``order`` is placed. ``None`` when the servers cannot cover 1..L. O(J).

    >>> from chainserve.model.spec import ModelSpec, Problem, Server, Workload
    >>> p = Problem((Server("a", 10, 1.0, 0.0), Server("b", 10, 2.0, 0.0)),
    ...             ModelSpec("toy", 3, 2.0, 1.0), Workload(0.1))
    >>> [(s.server, s.start_block, s.num_blocks) for s in walk(p, [1, 1], [1, 0], stop_early=False,
    ...                                                          trim=True).spans]
    [(0, 1, 3), (1, 1, 3)]
    """
    L = problem.model.num_blocks
    blocks = blocks_for_levels(problem, levels)
    order = [j for j in order if blocks[j] > 0]
    if sum(blocks[j] for j in order) < L:
        return None
    target = problem.arrival_rate_per_s / problem.workload.rho_bar
    spans: list[Span] = []
    next_block, chain_time, chain_level, rate = 1, 0.0, None, 0.0
    for j in order:
        s = problem.servers[j]
        if trim and next_block + blocks[j] - 1 > L:
            start, num = next_block, L - next_block + 1
        else:
            start, num = min(next_block, L - blocks[j] + 1), blocks[j]
        spans.append(Span(j, start, num))
        chain_time += s.tau_c_s + s.tau_p_s * (start + num - next_block)
        chain_level = levels[j] if chain_level is None else min(chain_level, levels[j])
        next_block = start + num
        if next_block > L:
            rate += chain_level / chain_time
            next_block, chain_time, chain_level = 1, 0.0, None
            if stop_early and rate >= target:
                break
    return Placement(tuple(sorted(spans, key=lambda sp: sp.server)), L)


def server_orders(problem: Problem, blocks: Sequence[int]) -> dict[str, list[int]]:
    """Orders of the servers that can hold a block: by amortised time t̃_j (GBP-CR's), by memory
    (largest first, then t̃_j), by per-block time τ^p_j (then τ^c_j)."""
    servers = problem.servers
    usable = [j for j, m in enumerate(blocks) if m > 0]

    def amortised(j: int) -> float:
        return (servers[j].tau_c_s + servers[j].tau_p_s * blocks[j]) / blocks[j]

    return {
        "amortised": sorted(usable, key=lambda j: (amortised(j), j)),
        "memory": sorted(usable, key=lambda j: (-servers[j].memory_gb, amortised(j), j)),
        "speed": sorted(usable, key=lambda j: (servers[j].tau_p_s, servers[j].tau_c_s, j)),
    }


def memory_groups(problem: Problem) -> list[list[int]]:
    """Servers grouped by memory M_j (largest first)."""
    groups: dict[float, list[int]] = {}
    for j, s in enumerate(problem.servers):
        groups.setdefault(s.memory_gb, []).append(j)
    return [groups[m] for m in sorted(groups, reverse=True)]


def variant_placements(
    problem: Problem, c: int, other_levels: Sequence[int] = (), max_groups: int = 3
) -> Iterator[Placement]:
    """The placements the best planner completes for reservation level ``c``: every order × stop ×
    end of :func:`walk` at level c for all servers, then per-server levels — each memory group (up to
    ``max_groups`` groups) at c or at one of ``other_levels``, in the amortised order, walking every
    server. Duplicates are left to the caller. O(variants · J log J).
    """
    J = problem.num_servers
    uniform = [c] * J
    orders = server_orders(problem, blocks_for_levels(problem, uniform))
    for order, stop_early, trim in itertools.product(orders.values(), (True, False), (False, True)):
        placement = walk(problem, uniform, order, stop_early=stop_early, trim=trim)
        if placement is not None:
            yield placement
    groups = memory_groups(problem)
    if not 1 < len(groups) <= max_groups:
        return
    choices = sorted({c, *other_levels})
    for picks in itertools.product(choices, repeat=len(groups)):
        if len(set(picks)) == 1:
            continue
        levels = [0] * J
        for group, level in zip(groups, picks, strict=True):
            for j in group:
                levels[j] = level
        order = server_orders(problem, blocks_for_levels(problem, levels))["amortised"]
        for trim in (False, True):
            placement = walk(problem, levels, order, stop_early=False, trim=trim)
            if placement is not None:
                yield placement
