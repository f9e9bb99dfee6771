"""The planner on examples worked by hand (paper §2.1 GBP-CR, §2.2 GCA, §2.5 bounds).

The 3-server cluster used throughout (sizes in GB, times in seconds):

    L = 4 blocks, s_m = 1, s_c = 0.5, λ = 0.15/s, ρ̄ = 0.5
    server 0 "A": M = 6,   τ^p = 1.4, τ^c = 0
    server 1 "B": M = 4.5, τ^p = 1.0, τ^c = 0.5
    server 2 "C": M = 3,   τ^p = 1.0, τ^c = 0.5
"""

from __future__ import annotations

import math
from decimal import Decimal, localcontext

import numpy as np
import pytest

from chainserve.analysis.bounds import mean_jobs_birth_death, response_time_bounds, slot_rates
from chainserve.model.spec import ModelSpec, Problem, Server, Workload
from chainserve.plan.csearch import max_reservation, plan_for_c, search_c
from chainserve.plan.gbp_cr import blocks_with_reservation, gbp_cr
from chainserve.plan.gca import gca
from chainserve.plan.types import Placement, Span

A, B, C = 0, 1, 2


@pytest.fixture
def problem() -> Problem:
    servers = (Server("A", 6.0, 1.4, 0.0), Server("B", 4.5, 1.0, 0.5), Server("C", 3.0, 1.0, 0.5))
    return Problem(servers, ModelSpec("toy", 4, 1.0, 0.5), Workload(0.15, rho_bar=0.5))


def spans_of(placement: Placement) -> list[tuple[int, int, int]]:
    """(server, a_j, e_j) in walk order."""
    return [(s.server, s.start_block, s.end_block) for s in placement.spans]


def chain_rows(chains) -> list[tuple[tuple[tuple[int, int, int], ...], float, int]]:
    """((server, first block, last block) per hop, T_k, c_k) per chain."""
    return [
        (tuple((h.server, h.start_block, h.end_block) for h in ch.hops), ch.service_time_s, ch.capacity)
        for ch in chains
    ]


# ---------------------------------------------------------------- GBP-CR (§2.1)


def test_gbp_cr_c1_left_shift_and_stopping_rule(problem):
    # m_j(1) = min(⌊M_j / (s_m + s_c)⌋, L) = ⌊M_j / 1.5⌋: A ⌊6/1.5⌋ = 4, B ⌊4.5/1.5⌋ = 3, C ⌊3/1.5⌋ = 2
    assert blocks_with_reservation(problem, 1) == [4, 3, 2]
    # t_j = τ^c + τ^p·m_j: A 0 + 1.4·4 = 5.6, B 0.5 + 3 = 3.5, C 0.5 + 2 = 2.5
    # t̃_j = t_j/m_j:        A 1.4,            B 1.1667,      C 1.25     → order B, C, A
    # target λ/(ρ̄·c) = 0.15/0.5 = 0.3
    # B: a = 1 → [1..3]; next block 4
    # C: a = min(4, L − m_C + 1 = 3) = 3 → [3..4]: shifted left by one so that it ends at L;
    #    chain 1 closed, T = t_B + t_C = 6, rate 1/6 = 0.1667 < 0.3 → go on
    # A: a = min(1, 4 − 4 + 1) = 1 → [1..4]: chain 2 closed, T = 5.6, rate 1/6 + 1/5.6 = 0.3452 ≥ 0.3 → stop
    result = gbp_cr(problem, 1)
    assert spans_of(result.placement) == [(B, 1, 3), (C, 3, 4), (A, 1, 4)]
    assert result.num_chains == 2
    assert result.promised_rate_per_s == pytest.approx(1 / 6 + 1 / 5.6)


def test_gbp_cr_lower_load_stops_after_first_chain(problem):
    # λ = 0.08 → target 0.08/0.5 = 0.16 ≤ 1/6 after chain 1 (B, C): stop; A is never reached, hosts nothing
    result = gbp_cr(problem.with_workload(arrival_rate_per_s=0.08), 1)
    assert spans_of(result.placement) == [(B, 1, 3), (C, 3, 4)]
    assert result.num_chains == 1
    assert result.promised_rate_per_s == pytest.approx(1 / 6)


def test_gbp_cr_c2_unfinished_chain(problem):
    # m_j(2) = ⌊M_j/2⌋: A 3, B 2, C 1; t: A 4.2, B 2.5, C 1.5; t̃: A 1.4, B 1.25, C 1.5 → order B, A, C
    # target 0.15/(0.5·2) = 0.15
    # B [1..2]; A: a = min(3, 4 − 3 + 1 = 2) = 2 → [2..4] closes chain 1, T = 2.5 + 4.2 = 6.7,
    #   rate 0.1493 < 0.15 → go on
    # C [1..1] starts chain 2 but no server is left: K = 1, promised c·1/6.7 = 0.2985
    result = gbp_cr(problem, 2)
    assert spans_of(result.placement) == [(B, 1, 2), (A, 2, 4), (C, 1, 1)]
    assert result.num_chains == 1
    assert result.promised_rate_per_s == pytest.approx(2 / 6.7)


def test_gbp_cr_c3_ties_and_infeasible_c(problem):
    # m_j(3) = ⌊M_j/2.5⌋: A ⌊2.4⌋ = 2, B ⌊1.8⌋ = 1, C ⌊1.2⌋ = 1; Σ = 4 = L (just feasible)
    # t̃: A 2.8/2 = 1.4, B 1.5, C 1.5 (tie B/C → lower index first) → A [1..2], B [3..3], C [4..4]
    # T = 2.8 + 1.5 + 1.5 = 5.8; target 0.15/1.5 = 0.1 ≤ 1/5.8 → K = 1, promised 3/5.8
    result = gbp_cr(problem, 3)
    assert spans_of(result.placement) == [(A, 1, 2), (B, 3, 3), (C, 4, 4)]
    assert result.promised_rate_per_s == pytest.approx(3 / 5.8)
    # m_j(5) = ⌊M_j/3.5⌋: A 1, B 1, C 0 → Σ = 2 < 4: infeasible
    assert blocks_with_reservation(problem, 5) == [1, 1, 0]
    assert gbp_cr(problem, 5) is None
    # c_max = ⌊(max M − s_m)/s_c⌋ = ⌊5/0.5⌋ = 10
    assert max_reservation(problem) == 10


# ---------------------------------------------------------------- GCA (§2.2)


def test_gca_on_c2_placement(problem):
    # spans B [1..2], A [2..4], C [1..1]; residual M̃ = M − s_m·m: B 2.5, A 3, C 2
    # edges (j may follow i iff a_j ≤ e_i + 1 ≤ e_j), cost τ^c_j + τ^p_j·m_ij, need s_c·m_ij:
    #   src→B m 2 cost 2.5 need 1   | src→C m 1 cost 1.5 need 0.5 | src→A: a_A = 2 > 1, no edge
    #   B→A  m 2 cost 2.8 need 1    | C→A  m 3 cost 4.2 need 1.5  | C→B  m 1 cost 1.5 need 0.5
    # round 1 shortest: src→B→A 5.3 (< src→C→A 5.7 < src→C→B→A 5.8); c = min(⌊2.5/1⌋, ⌊3/1⌋) = 2
    #   → M̃: B 0.5, A 1; src→B (needs 1) and C→A (needs 1.5) no longer fit
    # round 2: src→C→B→A 5.8; c = min(⌊2/0.5⌋, ⌊0.5/0.5⌋, ⌊1/1⌋) = 1 → M̃: C 1.5, B 0, A 0
    # round 3: no path (C→B and B→A no longer fit)
    placement = gbp_cr(problem, 2).placement
    rows = chain_rows(gca(problem, placement))
    assert [(hops, cap) for hops, _, cap in rows] == [
        (((B, 1, 2), (A, 3, 4)), 2),
        (((C, 1, 1), (B, 2, 2), (A, 3, 4)), 1),
    ]
    assert [t for _, t, _ in rows] == pytest.approx([5.3, 5.8])
    plan = plan_for_c(problem, 2)[1]
    plan.check()
    free = plan.free_memory_gb()
    assert (free[A], free[B], free[C]) == pytest.approx((0.0, 0.0, 1.5))
    assert plan.total_rate_per_s == pytest.approx(2 / 5.3 + 1 / 5.8)  # ≥ promised 2/6.7


def test_gca_on_c3_placement_is_mmc(problem):
    # A [1..2], B [3..3], C [4..4]; M̃: A 4, B 3.5, C 2; one path A→B→C, T = 2.8 + 1.5 + 1.5 = 5.8
    # c = min(⌊4/(0.5·2)⌋ = 4, ⌊3.5/0.5⌋ = 7, ⌊2/0.5⌋ = 4) = 4
    rows = chain_rows(gca(problem, gbp_cr(problem, 3).placement))
    assert [(hops, cap) for hops, _, cap in rows] == [(((A, 1, 2), (B, 3, 3), (C, 4, 4)), 4)]
    assert rows[0][1] == pytest.approx(5.8)


def test_gca_tie_at_sink_takes_lowest_server_index():
    # two identical whole-model servers: both paths cost 2·1 = 2 → server 0 first (tie rule at the sink),
    # M̃ = 4 − 2 = 2, c = ⌊2/(0.5·2)⌋ = 2 each
    servers = (Server("x", 4.0, 1.0, 0.0), Server("y", 4.0, 1.0, 0.0))
    p = Problem(servers, ModelSpec("toy", 2, 1.0, 0.5), Workload(0.1))
    chains = gca(p, Placement((Span(1, 1, 2), Span(0, 1, 2)), 2))
    assert [(ch.servers, ch.capacity) for ch in chains] == [((0,), 2), ((1,), 2)]


def test_gca_tie_between_predecessors_takes_the_earlier_end():
    # L = 3, τ^c = 0, τ^p = 1: X holds block 1, Y blocks 1..2, Z blocks 2..3. X→Z costs 1 + 2 = 3 and
    # Y→Z costs 2 + 1 = 3: the tie goes to the predecessor ending first (X, end 1). Its capacity:
    # X ⌊(2 − 1)/(0.5·1)⌋ = 2, Z ⌊(4 − 2)/(0.5·2)⌋ = 2; Z is then full, so Y is on no chain (Y first
    # would give two chains of one job each).
    servers = (Server("X", 2.0, 1.0, 0.0), Server("Y", 3.0, 1.0, 0.0), Server("Z", 4.0, 1.0, 0.0))
    p = Problem(servers, ModelSpec("toy", 3, 1.0, 0.5), Workload(0.1))
    chains = gca(p, Placement((Span(0, 1, 1), Span(1, 1, 2), Span(2, 2, 2)), 3))
    assert [(ch.servers, ch.service_time_s, ch.capacity) for ch in chains] == [((0, 2), 3.0, 2)]


def test_gca_can_fall_below_gbp_cr_promise(problem):
    """Counterexample to §2.2's "GCA's total rate is at least what GBP-CR promised", and the guard.

    c = 1 placement: B [1..3], C [3..4], A [1..4]; M̃: A 6 − 4 = 2, B 1.5, C 1. Paths:
    src→A 5.6, src→B→C 3.5 + 1.5 = 5.0, src→B→A 3.5 + 1.4 = 4.9 (B→A: m = 1, needs 0.5 ≤ 2).
    Round 1 takes B→A with c = min(⌊1.5/1.5⌋, ⌊2/0.5⌋) = 1 → M̃_B = 0, M̃_A = 1.5 < s_c·4 = 2:
    both of GBP-CR's chains (B→C and A alone) are now dead. ν = 1/4.9 = 0.204 < promised 0.345.
    So plan_for_c keeps GBP-CR's own chains at capacity 1 (B→C 5.0 s, A 5.6 s: ν = 0.379) and lets
    GCA fill the rest: M̃_B = 0, M̃_C = 0.5, M̃_A = 0 leave no further path.
    """
    placed = gbp_cr(problem, 1)
    greedy = gca(problem, placed.placement)
    assert chain_rows(greedy)[0][0] == ((B, 1, 3), (A, 4, 4))
    assert sum(ch.capacity * ch.rate_per_s for ch in greedy) == pytest.approx(1 / 4.9)
    assert 1 / 4.9 < placed.promised_rate_per_s
    _, plan = plan_for_c(problem, 1)
    assert chain_rows(plan.chains) == [(((B, 1, 3), (C, 4, 4)), 5.0, 1), (((A, 1, 4),), pytest.approx(5.6), 1)]
    assert plan.total_rate_per_s == pytest.approx(1 / 5 + 1 / 5.6)
    assert plan.total_rate_per_s >= placed.promised_rate_per_s


def test_search_c_by_hand(problem):
    # c = 1: GBP-CR's chains (above): slots (1/5, 1/5.6); ν̄ = (0.2, 0.37857), ρ = 0.39623,
    #   φ = (1, 0.75, 0.29717); E[Z] = (0.75 + 0.29717·(1.08694 + 3.31250)) / (1.75 + 0.29717/0.60377)
    #   = 2.05738 / 2.24219 = 0.91758 → lower = 6.1172
    # c = 3, 4: same placement, M/M/4 with μ = 1/5.8 (Erlang C) → 5.824
    # c = 2: slots (1/5.3, 1/5.3, 1/5.8); ν̄ = (0.18868, 0.37736, 0.54977), ρ = 0.15/0.54977 = 0.27284
    #   φ = (1, 0.79500, 0.31601, 0.08622);
    #   Σ n·φ_n + φ_3·(ρ/(1−ρ)² + 3/(1−ρ)) = 0.795 + 0.632 + 0.4001 = 1.8271
    #   normaliser 1 + 0.795 + 0.316 + 0.08622/0.72716 = 2.2296 → E[Z] = 0.8195, lower = E[Z]/λ = 5.4636
    # c ≥ 5 infeasible, so the search keeps c = 2 (fastest chain 5.3 s beats M/M/4's 5.8 s at this low load)
    assert plan_for_c(problem, 1)[1].bounds.lower_s == pytest.approx(6.1172, rel=1e-4)
    assert plan_for_c(problem, 3)[1].bounds.lower_s == pytest.approx(erlang_c_response_s(0.15, 1 / 5.8, 4))
    plan = search_c(problem)
    assert plan.c == 2
    assert plan.bounds.lower_s == pytest.approx(5.4636, rel=1e-4)
    assert plan.bounds.lower_s == pytest.approx(bounds_direct(0.15, [1 / 5.3, 1 / 5.8], [2, 1])[0], rel=1e-12)


# ---------------------------------------------------------------- bounds (§2.5)


def test_bounds_c2_by_hand():
    # μ = (2, 1), c = (1, 1), λ = 1, ν = 3, ρ = 1/3, C = 2
    # ν̄ = (2, 3): φ = (1, 1/2, 1/6);  Σ_{n<2} n·φ_n = 1/2; tail φ_2·(ρ/(1−ρ)² + C/(1−ρ)) = 1/6·15/4 = 5/8
    #   normaliser 1 + 1/2 + φ_2/(1−ρ) = 7/4 → E[Z] = (9/8)/(7/4) = 9/14
    # ν̲ = (1, 3): φ = (1, 1, 1/3); 1 + (1/3)(15/4) = 9/4; normaliser 1 + 1 + (1/3)(3/2) = 5/2 → E[Z] = 9/10
    assert list(slot_rates([1.0, 2.0], [1, 1])) == [2.0, 1.0]
    assert mean_jobs_birth_death(1.0, np.array([2.0, 3.0])) == pytest.approx(9 / 14)
    assert mean_jobs_birth_death(1.0, np.array([1.0, 3.0])) == pytest.approx(9 / 10)
    bounds = response_time_bounds(1.0, [1.0, 2.0], [1, 1])
    assert (bounds.lower_s, bounds.upper_s) == pytest.approx((9 / 14, 9 / 10))  # E[Z]/λ, λ = 1


def test_bounds_c3_by_hand():
    # μ = (2, 1), c = (1, 2), λ = 2, ν = 4, ρ = 1/2, C = 3; tail factor ρ/(1−ρ)² + C/(1−ρ) = 2 + 6 = 8
    # ν̄ = (2, 3, 4): φ = (1, 1, 2/3, 1/3); 1·1 + 2·2/3 + 8/3 = 5; normaliser 1 + 1 + 2/3 + (1/3)·2 = 10/3
    #   → E[Z] = 3/2, lower = E[Z]/λ = 3/4
    # ν̲ = (1, 2, 4): φ = (1, 2, 2, 1); 2 + 4 + 8 = 14; normaliser 1 + 2 + 2 + 2 = 7 → E[Z] = 2, upper = 1
    bounds = response_time_bounds(2.0, [2.0, 1.0], [1, 2])
    assert (bounds.lower_s, bounds.upper_s) == pytest.approx((3 / 4, 1.0))


def test_bounds_unstable_are_infinite():
    assert response_time_bounds(3.0, [2.0, 1.0], [1, 1]).lower_s == math.inf  # λ = ν
    assert response_time_bounds(1.0, [], []).upper_s == math.inf


def erlang_c_response_s(arrival_rate: float, rate: float, servers: int) -> float:
    """M/M/c mean response time W = C(c, a)/(cμ − λ) + 1/μ, with Erlang C from the Erlang B recursion
    B_k = a·B_{k−1}/(k + a·B_{k−1}), C = B/(1 − ρ(1 − B)), a = λ/μ, ρ = a/c."""
    a = arrival_rate / rate
    erlang_b = 1.0
    for k in range(1, servers + 1):
        erlang_b = a * erlang_b / (k + a * erlang_b)
    rho = a / servers
    erlang_c = erlang_b / (1 - rho * (1 - erlang_b))
    return erlang_c / (servers * rate - arrival_rate) + 1 / rate


@pytest.mark.parametrize(("servers", "load"), [(1, 0.5), (4, 0.8), (50, 0.9), (2000, 0.97), (5000, 0.99)])
def test_one_chain_is_mmc(servers, load):
    rate = 0.25
    arrival = load * servers * rate
    bounds = response_time_bounds(arrival, [rate], [servers])
    expected = erlang_c_response_s(arrival, rate, servers)
    assert bounds.lower_s == pytest.approx(expected, rel=1e-9)
    assert bounds.upper_s == pytest.approx(expected, rel=1e-9)


def bounds_direct(arrival_rate: float, rates: list[float], capacities: list[int]) -> tuple[float, float]:
    """§2.5 by direct sums in 60-digit decimal (exponent range far beyond float's)."""
    with localcontext() as ctx:
        ctx.prec = 60
        lam = Decimal(arrival_rate)
        pairs = zip(rates, capacities, strict=True)
        slots = sorted((Decimal(r) for r, c in pairs for _ in range(c)), reverse=True)
        nu, num = sum(slots), len(slots)
        rho = lam / nu
        result = []
        for order in (slots, slots[::-1]):
            phi, death, body, norm = Decimal(1), Decimal(0), Decimal(0), Decimal(1)
            for n in range(1, num + 1):
                death += order[n - 1]
                phi *= lam / death
                if n < num:
                    body += n * phi
                    norm += phi
            body += phi * (rho / (1 - rho) ** 2 + num / (1 - rho))
            norm += phi / (1 - rho)
            result.append(float(body / norm / lam))
        return result[0], result[1]


def test_direct_sum_reference_on_hand_case():
    # the decimal reference itself on the C = 3 case worked above: (3/4, 1)
    assert bounds_direct(2.0, [2.0, 1.0], [1, 2]) == pytest.approx((0.75, 1.0), rel=1e-15)


@pytest.mark.parametrize(("num_chains", "seed", "load"), [(8, 0, 0.9), (40, 1, 0.95), (300, 2, 0.99)])
def test_bounds_match_high_precision(num_chains, seed, load):
    rng = np.random.default_rng(seed)
    rates = list(rng.uniform(0.05, 2.0, num_chains))
    capacities = [int(c) for c in rng.integers(1, 30, num_chains)]  # C ≈ 4500 at 300 chains
    arrival = load * float(np.dot(rates, capacities))
    bounds = response_time_bounds(arrival, rates, capacities)
    lower, upper = bounds_direct(arrival, rates, capacities)
    assert bounds.lower_s == pytest.approx(lower, rel=1e-8)
    assert bounds.upper_s == pytest.approx(upper, rel=1e-8)
    assert bounds.lower_s <= bounds.upper_s


def test_bounds_no_overflow_at_c5000():
    rng = np.random.default_rng(3)
    rates = list(rng.uniform(0.01, 10.0, 5000))
    arrival = 0.5 * sum(rates)  # λ/ν = 1/2 with C = 5000 unit-capacity chains: φ_C ~ e^-thousands
    bounds = response_time_bounds(arrival, rates, [1] * 5000)
    assert math.isfinite(bounds.lower_s) and math.isfinite(bounds.upper_s)
    assert 1 / max(rates) <= bounds.lower_s <= bounds.upper_s


# --- a block size per server (issue 29: weight formats) -------------------------------------------


def mixed_formats(memory_b: float = 10.0) -> Problem:
    """L = 4, the model's s_m = 2, s_c = 1; server "q" holds its blocks in a format half the size
    (s_m,q = 1, s_c,q = 0.5), server "f" in the model's. Both M = 10 (f: ``memory_b``), τ^c = 0."""
    servers = (
        Server("q", 10.0, 1.0, 0.0, weights="int8", block_size_gb=1.0, cache_size_gb=0.5),
        Server("f", memory_b, 2.0, 0.0),
    )
    return Problem(servers, ModelSpec("toy", 4, 2.0, 1.0, dtype="fp16"), Workload(0.1, 0.7))


def test_gbp_cr_reserves_with_each_servers_sizes():
    # m_q(1) = ⌊10/(1 + 0.5)⌋ = 6 → 4 (L); m_f(1) = ⌊10/(2 + 1)⌋ = 3. With the model's sizes q too
    # would hold only 3, and no server alone would cover 1..4.
    p = mixed_formats()
    assert p.block_sizes == (1.0, 2.0) and p.cache_sizes == (0.5, 1.0)
    assert blocks_with_reservation(p, 1) == [4, 3]
    assert blocks_with_reservation(p, 2) == [4, 2]  # q: ⌊10/2⌋ = 5 → 4; f: ⌊10/4⌋ = 2
    placed = gbp_cr(p, 1)  # t̃: q 4/4 = 1, f 6/3 = 2; q closes a chain of rate 1/4 ≥ λ/ρ̄ = 0.143 and stops
    assert [(s.server, s.start_block, s.num_blocks) for s in placed.placement.spans] == [(0, 1, 4)]
    assert placed.num_chains == 1
    # c_max = max(⌊(10 − 1)/0.5⌋, ⌊(10 − 2)/1⌋) = 18
    assert max_reservation(p) == 18


def test_gca_allocates_with_each_servers_sizes():
    # q hosts 1..4 (4 GB of weights, 6 GB left, a job takes 0.5·4 = 2 GB): 3 jobs.
    # f (M = 12) hosts 1..4 (8 GB, 4 GB left, a job takes 1·4 = 4 GB): 1 job.
    p = mixed_formats(memory_b=12.0)
    placement = Placement((Span(0, 1, 4), Span(1, 1, 4)), 4)
    chains = gca(p, placement)
    assert [(ch.servers, ch.service_time_s, ch.capacity) for ch in chains] == [((0,), 4.0, 3), ((1,), 8.0, 1)]
    plan = plan_for_c(p, 1)[1]
    plan.check()
    full = search_c(p)
    full.check()
    free = full.free_memory_gb()
    assert all(gb >= -1e-9 for gb in free.values())
    # a two-hop chain: q runs 1..2 (s_m,q·2 = 2 GB), f runs 3..4 (4 GB); per job 0.5·2 = 1 GB on q
    # (8 GB left: 8 jobs) and 1·2 = 2 GB on f (8 GB left: 4 jobs) → capacity 4
    two = gca(p, Placement((Span(0, 1, 2), Span(1, 3, 2)), 4))
    assert [(ch.servers, ch.capacity) for ch in two] == [((0, 1), 4)]
