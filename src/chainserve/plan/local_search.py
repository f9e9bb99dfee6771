"""Local search over block placements, scored by the Theorem-4 lower bound (spec §2.5) of the plan GCA
completes (spec §2.2): the best planner's improvement step.

A placement is a map server → span (a_j, m_j). Moves, for every server j:

* placed: shrink by one block at either end, extend by one at either end (if one job still fits on
  every block, (s_m + s_c)·m_j ≤ M_j), shift by one, align the start just after another span's end or
  the end onto another span's end, drop j;
* not placed (GBP-CR leaves many idle): add j with a span from just after a span end (or block 1) to a
  span end (or L), as long as one job fits;
* swap the spans of two servers (when each fits the other's).

First improvement over the moves in a seeded random order, restarted after every improvement; stops at
a local optimum, after ``max_evaluations`` completions, or once ``expired()`` (the wall-clock safety net).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import numpy as np

from chainserve.model.spec import Problem
from chainserve.plan.complete import is_better
from chainserve.plan.types import Placement, Plan, Span, jobs_that_fit

Spans = dict[int, tuple[int, int]]  # server → (start block, number of blocks)
Evaluate = Callable[[Placement], Plan]
Swaps = tuple[list[int], list[int], list[int]]  # see :func:`_swaps`


def most_blocks(problem: Problem, server: int) -> int:
    """The longest span server j can host with cache for one job on every block: m_j(1)."""
    memory = problem.servers[server].memory_gb
    need_gb = problem.block_size_gb(server) + problem.cache_size_gb(server)
    return min(jobs_that_fit(memory, need_gb), problem.model.num_blocks)


def as_placement(spans: Spans, num_blocks: int) -> Placement:
    return Placement(tuple(Span(j, a, m) for j, (a, m) in sorted(spans.items())), num_blocks)


def neighbours(problem: Problem, spans: Spans, rng: np.random.Generator, max_added: int = 8) -> Iterator[Spans]:
    """Every move of the module doc, in a random order (seeded by ``rng``); unplaced servers: only the
    ``max_added`` fastest per block (τ^p_j, then τ^c_j), each from every start to the nearest and the
    farthest reachable span end. O(J² + J·B) moves, B the number of distinct span ends."""
    L = problem.model.num_blocks
    servers = problem.servers
    limit = [most_blocks(problem, j) for j in range(problem.num_servers)]
    ends = sorted({a + m - 1 for a, m in spans.values()} | {L})
    starts = sorted({0} | {e for e in ends if e < L})  # a span may start right after one of these
    moves: list[tuple[tuple[int, tuple[int, int] | None], ...]] = []

    def put(j: int, a: int, m: int) -> None:
        if 1 <= a and m >= 1 and a + m - 1 <= L and m <= limit[j] and spans.get(j) != (a, m):
            moves.append(((j, (a, m)),))

    for j, (a, m) in spans.items():
        e = a + m - 1
        for a2, m2 in ((a + 1, m - 1), (a, m - 1), (a - 1, m + 1), (a, m + 1), (a - 1, m), (a + 1, m)):
            put(j, a2, m2)
        for b in starts:
            put(j, b + 1, e - b)
        for e2 in ends:
            put(j, a, e2 - a + 1)
        if len(spans) > 1:
            moves.append(((j, None),))
    idle = sorted(
        (j for j in range(problem.num_servers) if j not in spans and limit[j] > 0),
        key=lambda j: (servers[j].tau_p_s, servers[j].tau_c_s, j),
    )[:max_added]
    for j in idle:
        for b in starts:
            reach = [e2 for e2 in ends if b < e2 <= b + limit[j]]
            for e2 in {min(b + limit[j], L), *reach[:1], *reach[-1:]}:
                put(j, b + 1, e2 - b)
    placed = sorted(spans)
    xs, ys, partners = _swaps(spans, placed, idle, limit)
    singles = len(moves)
    for index in rng.permutation(singles + len(xs)).tolist():
        if index < singles:
            move = moves[index]
        else:  # a swap: placed[x] and partners[y] (an idle one when y is past the placed ones)
            i, k = placed[xs[index - singles]], partners[ys[index - singles]]
            move = ((i, spans.get(k)), (k, spans[i]))
        changed = dict(spans)
        for j, span in move:
            if span is None:
                changed.pop(j, None)
            else:
                changed[j] = span
        yield changed


def _swaps(
    spans: Spans, placed: list[int], idle: list[int], limit: list[int]
) -> tuple[list[int], list[int], list[int]]:
    """The swap moves, in the order of a loop over placed servers i and, for each, the later placed
    ones then ``idle``: (indices into ``placed``, indices into ``partners``, partners). A placed k: the
    spans differ and each fits the other server; an idle k: i's span fits k. Built with numpy (issue
    32: O(J²) pairs, listed in Python they were most of a J = 1000 local search)."""
    partners = placed + idle
    if not placed:
        return [], [], partners
    lim = np.array(limit)
    start = np.array([spans[i][0] for i in placed])
    blocks = np.array([spans[i][1] for i in placed])
    other_start = np.concatenate((start, np.zeros(len(idle), dtype=int)))
    other_blocks = np.concatenate((blocks, np.zeros(len(idle), dtype=int)))
    column = np.arange(len(partners))
    row = np.arange(len(placed))[:, None]
    fits_partner = blocks[:, None] <= lim[np.array(partners)][None, :]
    with_placed = (
        (column[None, :] > row)
        & ((start[:, None] != other_start[None, :]) | (blocks[:, None] != other_blocks[None, :]))
        & (other_blocks[None, :] <= lim[np.array(placed)][:, None])
    )
    ok = fits_partner & np.where(column[None, :] < len(placed), with_placed, True)
    xs, ys = np.nonzero(ok)  # row-major: the loop's order
    return xs.tolist(), ys.tolist(), partners


def local_search(
    problem: Problem,
    start: Plan,
    evaluate: Evaluate,
    rng: np.random.Generator,
    max_evaluations: int,
    expired: Callable[[], bool],
    sideways: int = 0,
) -> tuple[Plan, int]:
    """Improve ``start`` by the moves of the module doc; returns (best plan, completions used).
    ``sideways``: how many moves to a plan that ties the current one (neither is better by
    :func:`chainserve.plan.complete.is_better`, e.g. a server added that GCA's chains leave unused) may
    be taken to cross a plateau (issue 32: a plan two moves away, each alone no gain). Never returns a
    plan worse than ``start`` by :func:`chainserve.plan.complete.score`. O(max_evaluations · one GCA)."""
    best = current = start
    spans: Spans = {s.server: (s.start_block, s.num_blocks) for s in start.placement.spans}
    seen = {frozenset(spans.items())}
    used = 0
    improved = True
    while improved and used < max_evaluations and not expired():
        improved = False
        for candidate in neighbours(problem, spans, rng):
            key = frozenset(candidate.items())
            if key in seen:
                continue
            seen.add(key)
            plan = evaluate(as_placement(candidate, problem.model.num_blocks))
            used += 1
            if is_better(plan, current):
                current, spans, improved = plan, candidate, True
                if is_better(plan, best):
                    best = plan
                break
            if sideways > 0 and not is_better(current, plan):
                sideways -= 1
                current, spans, improved = plan, candidate, True
                break
            if used >= max_evaluations or expired():
                break
    return best, used
