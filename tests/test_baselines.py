"""Baselines of spec §3: PETALS / BPRR / JFFC-only placements, the path routers and the method registry."""

import itertools
import math
from collections import defaultdict

import numpy as np
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from chainserve.dispatch.base import Job
from chainserve.dispatch.path_router import PathRouter, shortest_path
from chainserve.dispatch.petals_route import ALLOC_PENALTY_S, PetalsRouter
from chainserve.dispatch.ws_rr import WsRrRouter, expected_wait_s
from chainserve.methods import METHODS, build_method
from chainserve.model.spec import ModelSpec, Problem, Server, Workload
from chainserve.plan.baselines.bprr import bprr_placement, bprr_sessions, bprr_sessions_cap
from chainserve.plan.baselines.jffc_only import jffc_only_plan
from chainserve.plan.baselines.petals import best_start, petals_placement
from chainserve.plan.baselines.types import PathPlacement
from chainserve.plan.types import Placement, Plan, Span

EPS = 1e-9
FAST = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def toy(memories, taus, num_blocks, s_m=1.0, s_c=1.0, rate=0.1, tau_c=0.0, prompt=1, output=1, sizes=None):
    """``sizes``: each server's own (s_m,j, s_c,j), ``None`` for the model's (issue 29)."""
    own = sizes or [None] * len(memories)
    servers = tuple(
        Server(
            f"s{i}",
            float(m),
            float(t),
            tau_c,
            **({} if o is None else {"block_size_gb": o[0], "cache_size_gb": o[1]}),
        )
        for i, (m, t, o) in enumerate(zip(memories, taus, own, strict=True))
    )
    return Problem(
        servers, ModelSpec("toy", num_blocks, s_m, s_c), Workload(rate, prompt_tokens=prompt, output_tokens=output)
    )


@st.composite
def problems(draw):
    num_blocks = draw(st.integers(2, 6))
    num_servers = draw(st.integers(2, 5))
    s_c = draw(st.sampled_from([0.25, 0.5, 1.0]))
    memories = draw(st.lists(st.integers(2, 4 * num_blocks), min_size=num_servers, max_size=num_servers))
    taus = draw(st.lists(st.sampled_from([0.5, 1.0, 2.0, 3.0]), min_size=num_servers, max_size=num_servers))
    own = st.one_of(st.none(), st.tuples(st.sampled_from([0.5, 1.0, 2.0]), st.sampled_from([0.25, 0.5, 1.0])))
    return toy(
        memories,
        taus,
        num_blocks,
        s_c=s_c,
        rate=draw(st.sampled_from([0.05, 0.5, 2.0])),
        tau_c=draw(st.sampled_from([0.0, 0.3])),
        output=draw(st.integers(1, 3)),
        sizes=draw(st.lists(own, min_size=num_servers, max_size=num_servers)),
    )


def assert_valid_layout(layout: PathPlacement) -> None:
    """Independent of PathPlacement.check: spans inside 1..L, every block hosted, memory respected."""
    problem, L = layout.problem, layout.problem.model.num_blocks
    covered = set()
    for span in layout.placement.spans:
        assert 1 <= span.start_block <= span.end_block <= L
        covered.update(range(span.start_block, span.end_block + 1))
        s_m = problem.servers[span.server].block_size_gb or problem.model.block_size_gb
        used = s_m * span.num_blocks + layout.cache_gb[span.server]
        assert used <= problem.servers[span.server].memory_gb + EPS
    assert covered == set(range(1, L + 1))
    assert len({s.server for s in layout.placement.spans}) == len(layout.placement.spans)
    assert layout.reservation_by_server() == {s.server: layout.cache_gb[s.server] for s in layout.placement.spans}


# ---------------------------------------------------------------- placements


def test_best_start_is_lexicographic_on_sorted_windows():
    # windows of 3: [5,0,2]→(0,2,5) [0,2,0]→(0,0,2) [2,0,1]→(0,1,2) [0,1,0]→(0,0,1): the last wins
    assert best_start(np.array([5.0, 0.0, 2.0, 0.0, 1.0, 0.0]), 3) == 3
    assert best_start(np.array([1.0, 1.0, 1.0]), 2) == 0  # ties: smallest start
    assert best_start(np.array([0.0, 9.0, 0.0, 0.0]), 2) == 2  # two empty blocks beat one


def test_petals_worked_example():
    # s_m = 1, s_c = 1 for max tokens 2 (prompt 1 + output 1); cache_tokens = 2 → 1 GB per block.
    # m = ⌊M/2⌋: 3, 2, 2 blocks; throughput min(1/τ^p / ((m+1)/2), ∞): 1/2, 2/3, 1/3.
    p = toy([6, 4, 4], [1.0, 1.0, 2.0], 4)
    order = np.random.default_rng(7).permutation(3).tolist()
    layout = petals_placement(p, np.random.default_rng(7), cache_tokens=2, autograd_gb=0.0)
    spans = {s.server: (s.start_block, s.num_blocks) for s in layout.placement.spans}
    # replay by hand in the same join order
    throughput, rates, blocks, expect = [0.0] * 4, [1 / 2, 2 / 3, 1 / 3], [3, 2, 2], {}
    for j in order:
        options = [(sorted(throughput[a : a + blocks[j]]), a) for a in range(4 - blocks[j] + 1)]
        start = min(options)[1]
        expect[j] = (start + 1, blocks[j])
        for b in range(start, start + blocks[j]):
            throughput[b] += rates[j]
    assert spans == expect
    assert layout.cache_gb == (3.0, 2.0, 2.0)
    assert_valid_layout(layout)


def test_petals_blocks_use_max_tokens_of_the_workload():
    # s_c for 2020 tokens (2000 + 20); 4096 tokens of cache per block = 4096/2020 · s_c; a raw model
    # (not in the catalogue) gets BLOOM's autograd reserve, 2 GiB = 2.147483648 GB
    p = toy([40, 40, 40, 20, 20], [0.1, 0.1, 0.1, 0.2, 0.2], 70, s_m=1.31, s_c=0.117, prompt=2000, output=20)
    layout = petals_placement(p, np.random.default_rng(0))
    per_block = 0.117 * 4096 / 2020
    for span in layout.placement.spans:
        memory_gb = p.servers[span.server].memory_gb
        assert span.num_blocks == math.floor((memory_gb - 2 * 1.073741824) / (1.31 + per_block))
        assert layout.cache_gb[span.server] == pytest.approx(per_block * span.num_blocks)


def test_petals_block_count_with_the_autograd_reserve_by_hand():
    # BLOOM-176B NF4 on a 40 GB slice, 4096 tokens of cache per block:
    #   s_m = 2 466 279 424 params · 4.25 bits / 8 = 1.310211 GB; s_c (2048 tokens) = 2·14336·2048·2 B
    #   = 0.117441 GB, so cache per block = 2 · s_c = 0.234881 GB; reserve = 2 GiB · 14336/14336 = 2.147484 GB.
    #   m = ⌊(40 − 2.147484) / (1.310211 + 0.234881)⌋ = ⌊37.852516 / 1.545092⌋ = ⌊24.499⌋ = 24
    #   (without the reserve: ⌊40 / 1.545092⌋ = ⌊25.888⌋ = 25). On 20 GB: ⌊17.852516 / 1.545092⌋ = 11 (not 12).
    from chainserve.model.catalogue import model_arch
    from chainserve.plan.baselines.petals import autograd_reserve_gb

    bloom = model_arch("bloom-176b").spec("nf4", max_tokens=2048)
    assert bloom.block_size_gb == pytest.approx(1.310211, abs=1e-6)
    assert autograd_reserve_gb(bloom) == pytest.approx(2.147484, abs=1e-6)
    servers = (*(Server(f"high-{i}", 40, 0.109, 1.0) for i in (1, 2, 3)), Server("low", 20, 0.175, 1.0))
    p = Problem(servers, bloom, Workload(0.2, prompt_tokens=2000, output_tokens=20))
    spans = petals_placement(p, np.random.default_rng(0)).placement.spans
    assert sorted(s.num_blocks for s in spans) == [11, 24, 24, 24]  # 83 blocks hosted for L = 70
    no_reserve = petals_placement(p, np.random.default_rng(0), autograd_gb=0.0).placement.spans
    assert sorted(s.num_blocks for s in no_reserve) == [12, 25, 25, 25]
    # LLaMA-2-7B (hidden 4096): 2 GiB · 4096/14336 = 0.613567 GB; fp16 s_m = 202 383 360 · 2 B = 0.404767 GB,
    # 4096-token cache per block = 2·4096·4096·2 B = 0.067109 GB: ⌊(20 − 0.613567)/0.471876⌋ = ⌊41.08⌋ → L = 32
    # on 20 GB, and on 10 GB ⌊(10 − 0.613567)/0.471876⌋ = ⌊19.89⌋ = 19 (⌊21.19⌋ = 21 without it).
    llama = model_arch("llama-2-7b").spec("fp16", max_tokens=2076)
    assert autograd_reserve_gb(llama) == pytest.approx(0.613567, abs=1e-6)
    p = Problem(
        (Server("a", 20, 0.1, 1.0), Server("b", 10, 0.1, 1.0)),
        llama,
        Workload(0.2, prompt_tokens=2048, output_tokens=28),
    )
    spans = petals_placement(p, np.random.default_rng(0)).placement.spans
    assert sorted(s.num_blocks for s in spans) == [19, 32]


def test_petals_rebalancing_raises_the_weakest_block():
    p = toy([3, 4, 5, 11], [4.0, 2.0, 4.0, 4.0], 4)

    def weakest(layout):
        t = np.zeros(4)
        for s in layout.placement.spans:
            t[s.start_block - 1 : s.end_block] += 1 / p.servers[s.server].tau_p_s / ((s.num_blocks + 1) / 2)
        return t.min()

    before = petals_placement(p, np.random.default_rng(0), cache_tokens=1, autograd_gb=0.0)
    after = petals_placement(p, np.random.default_rng(0), cache_tokens=1, rebalance_rounds=2, autograd_gb=0.0)
    assert weakest(after) > weakest(before) / 0.75  # it moved because the gain exceeded 1/0.75
    assert_valid_layout(after)


def test_petals_raises_when_blocks_stay_uncovered():
    with pytest.raises(ValueError, match="hosted by no server"):
        petals_placement(toy([4, 4], [1.0, 1.0], 6), np.random.default_rng(0), cache_tokens=2, autograd_gb=0.0)


def test_bprr_sessions_and_cap():
    # one server, L = 2, s_m = 2, s_c = 1: the R = 1 placement puts both blocks on it; its path takes
    # T̄ = 2 × 1 s; λ = 1 → λT̄ = 2 → ⌊2 + √2⌋ = ⌊3.41⌋ = 3
    p = toy([30], [1.0], 2, s_m=2.0, rate=1.0)
    assert bprr_sessions_cap(p) == 8  # ⌊(30 − 2·3)/(1·3)⌋
    assert bprr_sessions(p) == 3
    assert bprr_sessions(p.with_workload(arrival_rate_per_s=100.0)) == 8  # capped


def test_bprr_sessions_use_the_fastest_path_of_the_r1_placement_by_hand():
    # L = 4, s_m = 2, s_c = 1, M = 10 each, τ^c = 0.5 s; τ^p = 1, 2, 1.5 s for a, b, c.
    # R = 1: m = ⌊10/3⌋ = 3; t̃ = 3.5/3, 6.5/3, 5/3 → order a, c, b. Phase 1: a → 1..3, c → 2..4;
    # phase 2: b → 1..3. Fastest path: a runs 1..3 (0.5 + 3 = 3.5 s), c runs block 4 (0.5 + 1.5 = 2 s):
    # T̄ = 5.5 s. (The old estimate L · mean t̃ = 4 · (3.5 + 6.5 + 5)/9 = 6.67 s.)
    # λ = 0.1: λT̄ = 0.55 → ⌊0.55 + 0.742⌋ = 1;  λ = 0.2: 1.1 → ⌊1.1 + 1.049⌋ = 2;
    # λ = 0.5: 2.75 → ⌊4.41⌋ = 4, capped at ⌊(30 − 2·7)/(1·7)⌋ = 2.
    from chainserve.plan.baselines.bprr import fastest_path_s

    p = toy([10, 10, 10], [1.0, 2.0, 1.5], 4, s_m=2.0, tau_c=0.5, rate=0.1)
    one = bprr_placement(p, sessions=1)
    assert [(s.server, s.start_block, s.num_blocks) for s in one.placement.spans] == [(0, 1, 3), (2, 2, 3), (1, 1, 3)]
    assert fastest_path_s(p, one.placement.spans) == pytest.approx(5.5)
    assert bprr_sessions_cap(p) == 2
    assert [bprr_sessions(p.with_workload(arrival_rate_per_s=r)) for r in (0.1, 0.2, 0.5)] == [1, 2, 2]


def test_bprr_sessions_override():
    from chainserve.methods import check_method_name
    from chainserve.model.cluster_file import problem_from_dict
    from chainserve.model.spec import SpecError

    p = toy([10, 10, 10], [1.0, 2.0, 1.5], 4, s_m=2.0, tau_c=0.5, rate=0.1)  # rule: R = 1
    assert "R = 1 sessions reserved per block (⌊λT̄ + √(λT̄)⌋)" in bprr_placement(p).notes[0]
    fixed = bprr_placement(p, sessions=2)
    assert fixed.notes[0].startswith("R = 2 sessions reserved per block (fixed")
    # too many for phase 1: lowered (R = 3: m = ⌊10/5⌋ = 2 blocks holding 3 sessions; R = 4: 1 block each)
    assert bprr_placement(p, sessions=50).notes[0].startswith("R = 3 sessions reserved per block (fixed; 50 asked")
    setup = build_method("bprr:R=2", p, np.random.default_rng(0))
    assert setup.plan_or_placement.placement == fixed.placement and "R = 2" in setup.description
    assert check_method_name("bprr:R=2") == ("bprr", None)
    for bad in ("bprr:R=0", "bprr:R=", "bprr:3", "bprr:r=3", "bprr:R=1.5", "bprr:R=-1", "jffc-only:R=2"):
        with pytest.raises(SpecError) as info:
            build_method(bad, p, np.random.default_rng(0))
        assert info.value.field == "method"
    cluster = {
        "model": "bloom-176b",
        "bprr_sessions": 2,
        "workload": {"arrival_rate": 0.2},
        "servers": [{"gpu": "a100-3g.40gb", "count": 3, "rtt_ms": 20}, {"gpu": "a100-2g.20gb", "rtt_ms": 30}],
    }
    problem = problem_from_dict(cluster)
    assert problem.bprr_sessions == 2
    assert problem.with_workload(arrival_rate_per_s=0.3).bprr_sessions == 2
    assert bprr_placement(problem).notes[0].startswith("R = 2 sessions reserved per block (fixed")
    raw = {
        "num_blocks": 4,
        "block_size_gb": 2.0,
        "cache_size_gb": 1.0,
        "arrival_rate": 0.1,
        "bprr_sessions": 3,
        "servers": [{"server_id": i, "memory_gb": 10, "tau_p": 1.0, "tau_c": 0.5} for i in range(3)],
    }
    assert problem_from_dict(raw).bprr_sessions == 3
    for bad in (0, -1, 1.5, True, "2"):
        with pytest.raises(SpecError) as info:
            problem_from_dict({**cluster, "bprr_sessions": bad})
        assert info.value.field == "bprr_sessions"


def test_bprr_worked_example():
    # R = 1 (λT̄ = 0.05 · 4 · mean(1, 2, 1.5) = 0.3); m = ⌊10/3⌋ = 3 blocks; 1 session each.
    # Phase 1 (fastest first): a → 1..3, c → 2..4 (shifted to end at L). Phase 2: b ties → 1..3.
    layout = bprr_placement(toy([10, 10, 10], [1.0, 2.0, 1.5], 4, s_m=2.0, rate=0.05))
    assert [(s.server, s.start_block, s.num_blocks) for s in layout.placement.spans] == [
        (0, 1, 3),
        (2, 2, 3),
        (1, 1, 3),
    ]
    assert layout.cache_gb == (4.0, 4.0, 4.0)


def test_bprr_phase_two_fills_the_least_served_blocks():
    # R = 1 (cap ⌊(17 − 7)/7⌋ = 1); m = 2, 3, 2 blocks holding 1 session each. Phase 1: a (fastest)
    # → 1..2, b → 2..4 (shifted to end at L): capacity per block 1, 2, 1, 1. Phase 2: c's windows
    # (1,2) (2,1) (1,1) all have least capacity 1; the smallest total is blocks 3..4.
    p = toy([5, 7, 5], [0.5, 1.0, 1.0], 4, rate=0.01)
    assert bprr_sessions(p) == 1
    layout = bprr_placement(p)
    spans = {s.server: (s.start_block, s.num_blocks) for s in layout.placement.spans}
    assert spans == {0: (1, 2), 1: (2, 3), 2: (3, 2)}
    assert_valid_layout(layout)


@FAST
@given(problems(), st.integers(0, 3))
def test_placements_respect_memory_and_cover_every_block(problem, seed):
    for build in (
        lambda: petals_placement(problem, np.random.default_rng(seed), cache_tokens=2, autograd_gb=0.0),
        lambda: bprr_placement(problem),
    ):
        try:
            layout = build()
        except ValueError:
            continue
        assert_valid_layout(layout)


def test_jffc_only_plan_and_not_applicable():
    p = toy([20, 8, 15], [1.0, 1.0, 2.0], 3, s_m=2.0, tau_c=0.5)
    plan = jffc_only_plan(p)
    assert [(ch.servers, ch.capacity, ch.service_time_s) for ch in plan.chains] == [
        ((0,), 4, 3.5),
        ((2,), 3, 6.5),
    ]  # ⌊(20 − 6)/3⌋, ⌊(15 − 6)/3⌋; server 1 cannot hold the model
    with pytest.raises(ValueError, match="not applicable"):
        jffc_only_plan(toy([7, 8], [1.0, 1.0], 3, s_m=2.0))


# ---------------------------------------------------------------- shortest path


def brute_force_path(spans, cost, L):
    best = math.inf
    for k in range(1, len(spans) + 1):
        for seq in itertools.permutations(spans, k):
            prev, total = 0, 0.0
            for span in seq:
                if not span.start_block <= prev + 1 <= span.end_block:
                    break
                total += cost(span, span.end_block - prev)
                prev = span.end_block
            else:
                if prev == L:
                    best = min(best, total)
    return best


@FAST
@given(
    st.integers(2, 6),
    st.lists(st.tuples(st.integers(1, 6), st.integers(1, 6), st.floats(0.1, 5)), min_size=1, max_size=5),
)
def test_shortest_path_matches_brute_force(L, raw):
    spans = [Span(j, min(a, L), min(m, L - min(a, L) + 1)) for j, (a, m, _) in enumerate(raw)]
    weight = {j: w for j, (_, _, w) in enumerate(raw)}

    def cost(span, m):
        return 0.3 + weight[span.server] * m

    path = shortest_path(spans, cost, lambda s: 0.0, L)
    expected = brute_force_path(spans, cost, L)
    if path is None:
        assert expected == math.inf
        return
    assert path[0].start_block == 1 and path[-1].end_block == L
    assert all(a.end_block + 1 == b.start_block for a, b in itertools.pairwise(path))
    by_server = {s.server: s for s in spans}
    assert sum(cost(by_server[h.server], h.num_blocks) for h in path) == pytest.approx(expected)


# ---------------------------------------------------------------- routers


class Driver:
    """A minimal event loop: checks memory and attempts on every start from the outside, records
    completions and cancels."""

    def __init__(self, router: PathRouter):
        self.router, self.next_id, self.now = router, 0, 0.0
        self.in_service: dict[int, tuple] = {}
        self.attempt: dict[int, int] = {}  # job id → attempt of its current or last start
        self.stale: list[tuple[int, int]] = []  # (job id, attempt) of starts no longer in service
        self.jobs: dict[int, Job] = {}
        self.completed: list[int] = []
        self.cancelled: set[int] = set()
        self.restarts = 0
        problem = router.problem
        self.s_c = [s.cache_size_gb or problem.model.cache_size_gb for s in problem.servers]
        self.pool = router.pool.capacity_gb

    def _start(self, starts):
        for start in starts:
            job_id = start.job.job_id
            assert job_id not in self.in_service
            assert start.route.chain is None
            assert start.attempt == self.attempt.get(job_id, -1) + 1  # 0, then +1 per restart
            self.attempt[job_id] = start.attempt
            self.in_service[job_id] = start.route.hops
        used = defaultdict(float)
        for hops in self.in_service.values():
            for hop in hops:
                used[hop.server] += self.s_c[hop.server] * hop.num_blocks
        for server, gb in used.items():
            assert gb <= self.pool[server] + EPS and self.router.alive[server]
        for server, pool in enumerate(self.pool):  # the router never goes over a pool
            assert -EPS <= self.router.pool.free_gb[server] <= pool + EPS

    def _leave(self, job_id):
        del self.in_service[job_id]
        self.stale.append((job_id, self.attempt[job_id]))

    def arrive(self):
        self.now += 0.1
        self.jobs[self.next_id] = job = Job(self.next_id, self.now)
        self.next_id += 1
        self._start(self.router.submit(job, self.now))

    def finish(self, pick: int):
        if self.in_service:
            job_id = sorted(self.in_service)[pick % len(self.in_service)]
            self._leave(job_id)
            self.completed.append(job_id)
            self._start(self.router.complete(job_id, self.now, self.attempt[job_id] if pick % 2 else None))

    def fail(self, server: int):
        outcome = self.router.fail_server(server, self.now)
        for job in outcome.aborted:
            self._leave(job.job_id)
            self.restarts += 1
        self._start(outcome.starts)

    def abort(self, pick: int):
        if self.in_service:
            job_id = sorted(self.in_service)[pick % len(self.in_service)]
            self._leave(job_id)
            self.restarts += 1
            self._start(self.router.abort(job_id, self.now))

    def cancel(self, pick: int):
        """Cancel any job: waiting, acquiring, in service, finished, cancelled or unknown."""
        job_id = pick % (self.next_id + 2)
        if job_id in self.in_service:
            self._leave(job_id)
        if job_id < self.next_id and job_id not in self.completed:
            self.cancelled.add(job_id)
        self._start(self.router.cancel(job_id, self.now))

    def drain_and_resubmit(self):
        """Hand the waiting jobs over as to a new router (which numbers attempts from 0 again)."""
        jobs = self.router.drain()
        assert self.router.num_waiting == 0 and not any(self.router.queues.values())
        assert jobs == sorted(jobs, key=lambda j: (j.arrived_at, j.job_id))
        for job in jobs:
            self.attempt.pop(job.job_id, None)
            self.stale = [(j, a) for j, a in self.stale if j != job.job_id]
        for job in jobs:
            self._start(self.router.submit(job, self.now))

    def step(self, kind: str, k: int):
        """``a``: arrival; ``f``: the k-th job in service completes; ``x``: the k-th placed server fails;
        ``r``: it is restored; ``b``: the k-th job in service aborts; ``c``: job k is cancelled; ``d``:
        drain and resubmit; ``l``: a late completion of a stale attempt."""
        spans = self.router.spans
        if kind == "a":
            self.arrive()
        elif kind == "f":
            self.finish(k)
        elif kind == "x":
            self.fail(spans[k % len(spans)].server)
        elif kind == "r":
            self._start(self.router.restore_server(spans[k % len(spans)].server, self.now))
        elif kind == "b":
            self.abort(k)
        elif kind == "c":
            self.cancel(k)
        elif kind == "d":
            self.drain_and_resubmit()
        elif self.stale:
            job_id, attempt = self.stale[k % len(self.stale)]
            assert self.router.complete(job_id, self.now, attempt) == []

    def drain(self):
        while self.in_service:
            self.finish(0)


def layouts(problem, seed):
    for build in (
        lambda: petals_placement(problem, np.random.default_rng(seed), cache_tokens=4, autograd_gb=0.0),
        lambda: bprr_placement(problem),
    ):
        try:
            yield build()
        except ValueError:
            continue


EVENTS = st.lists(st.tuples(st.sampled_from("aaaaffffxrbcdl"), st.integers(0, 9)), max_size=40)


@FAST
@given(problems(), st.integers(0, 3), EVENTS)
def test_routers_respect_memory_and_serve_every_request(problem, seed, events):
    """Events of :meth:`Driver.step`; then every job in service completes, and once every server is
    back, every request that was not cancelled is served."""
    made = list(layouts(problem, seed))
    assume(made)
    for layout in made:
        for Router in (PetalsRouter, WsRrRouter):
            try:
                driver = Driver(Router(layout))
            except ValueError:  # no path fits one request's cache
                continue
            router = driver.router
            for kind, k in events:
                driver.step(kind, k)
                assert router.num_in_service == len(driver.in_service)
                assert router.num_waiting + router.num_in_service == (
                    driver.next_id - len(driver.completed) - len(driver.cancelled)
                )
            driver.drain()
            stuck = sorted(job.job_id for job in router.unroutable)
            finished = sorted(driver.completed + sorted(driver.cancelled))
            assert sorted(finished + stuck) == list(range(driver.next_id))  # no deadlock, none lost
            assert not stuck or router._choose_hops(1.0) is None  # only when no live path is left
            assert router.num_in_service == 0 and router.num_waiting == len(stuck)
            assert router.pool.free_gb == pytest.approx(list(driver.pool))
            for span in router.spans:  # every server back: the stuck requests are served
                driver.step("r", router.spans.index(span))
            driver.drain()
            assert sorted(driver.completed + sorted(driver.cancelled)) == list(range(driver.next_id))
            assert router.num_waiting == 0


def replicas(num_servers=3, L=3, pool_jobs=2):
    p = toy([L + pool_jobs * L] * num_servers, [1.0 + j for j in range(num_servers)], L)
    spans = tuple(Span(j, 1, L) for j in range(num_servers))
    return PathPlacement(p, Placement(spans, L), (float(pool_jobs * L),) * num_servers, "test")


@pytest.mark.parametrize("Router", [PetalsRouter, WsRrRouter])
def test_failure_loses_no_request(Router):
    driver = Driver(Router(replicas()))
    for _ in range(10):
        driver.arrive()
    holding = {j for j, hops in driver.in_service.items() if hops[0].server == 0}
    waiting = driver.router.num_waiting
    assert holding and waiting
    driver.fail(0)
    assert driver.restarts == len(holding)
    assert all(hops[0].server != 0 for hops in driver.in_service.values())
    for _ in range(5):
        driver.arrive()
    driver.drain()
    assert sorted(driver.completed) == list(range(15))
    assert driver.router.pool.free_gb[1:] == pytest.approx([6.0, 6.0])


def test_failure_without_live_path_keeps_requests_waiting():
    driver = Driver(PetalsRouter(replicas(num_servers=1)))
    driver.arrive()
    driver.fail(0)
    assert driver.restarts == 1 and not driver.in_service
    assert driver.router.num_waiting == 1 and driver.router.num_in_service == 0


def test_waits_are_fifo_per_server():
    router = PetalsRouter(replicas(num_servers=1, pool_jobs=1))
    driver = Driver(router)
    for _ in range(4):
        driver.arrive()
    assert list(router.queues[0]) == [1, 2, 3]
    driver.finish(0)
    assert list(driver.in_service) == [1] and list(router.queues[0]) == [2, 3]


def started(starts):
    """(job, first server, attempt) of each start."""
    return [(s.job.job_id, s.route.hops[0].server, s.attempt) for s in starts]


@pytest.mark.parametrize("Router", [PetalsRouter, WsRrRouter])
def test_cancel_and_late_completions(Router):
    router = Router(replicas(num_servers=1, pool_jobs=1))
    assert started(router.submit(Job(0, 0.0), 0.0)) == [(0, 0, 0)]
    assert router.submit(Job(1, 1.0), 1.0) == [] and router.submit(Job(2, 2.0), 2.0) == []
    assert router.cancel(2, 3.0) == [] and list(router.queues[0]) == [1]  # leaves the wait queue
    assert started(router.cancel(0, 4.0)) == [(1, 0, 0)]  # the waiter takes the freed cache
    assert router.cancel(0, 5.0) == [] and router.cancel(9, 5.0) == []  # idempotent
    assert router.complete(0, 6.0, attempt=0) == []  # a cancelled start's late completion
    with pytest.raises(KeyError):
        router.complete(0, 6.0)
    assert router.num_in_service == 1 and router.num_waiting == 0


@pytest.mark.parametrize("Router", [PetalsRouter, WsRrRouter])
def test_abort_and_restore_route_again_with_the_next_attempt(Router):
    router = Router(replicas(num_servers=1, pool_jobs=1))
    router.submit(Job(0, 0.0), 0.0)
    router.submit(Job(1, 1.0), 1.0)
    assert started(router.abort(0, 2.0)) == [(1, 0, 0)]  # the waiter first, as after a failure
    assert list(router.queues[0]) == [0] and router.complete(0, 3.0, attempt=0) == []
    assert started(router.complete(1, 4.0)) == [(0, 0, 1)]
    assert router.fail_server(0, 5.0).aborted[0].job_id == 0 and router.num_waiting == 1
    assert router.restore_server(0, 6.0) != [] and router.restore_server(0, 6.0) == []
    assert router.num_in_service == 1 and router.requests[0].attempt == 2
    with pytest.raises(KeyError):
        router.abort(1, 7.0)


def test_drain_frees_the_caches_of_requests_still_acquiring():
    # blocks 1 on server 0 (pool: 2 jobs), 2 on server 1 (pool: 1 job): job 1 holds 0, waits at 1
    p = toy([10, 10], [1.0, 1.0], 2)
    router = PetalsRouter(PathPlacement(p, Placement((Span(0, 1, 1), Span(1, 2, 1)), 2), (2.0, 1.0), "test"))
    assert started(router.submit(Job(0, 0.0), 0.0)) == [(0, 0, 0)]
    assert router.submit(Job(1, 1.0), 1.0) == [] and router.pool.free_gb == [0.0, 0.0]
    assert [j.job_id for j in router.drain()] == [1]
    assert router.pool.free_gb == [1.0, 0.0] and not router.queues[1] and router.num_waiting == 0
    assert router.complete(0, 2.0) == [] and router.pool.free_gb == [2.0, 1.0]


def test_petals_penalty_checks_the_whole_span():
    # server 0 hosts 1..3 but a path may use only block 3 of it; free cache for 1 block, not 3 → penalty
    p = toy([10, 10], [1.0, 1.0], 3)
    layout = PathPlacement(p, Placement((Span(0, 1, 3), Span(1, 1, 2)), 3), (4.0, 4.0), "test")
    router = PetalsRouter(layout)
    router.pool.allocate(0, 2.0)  # 2 GB left: one job on 1..2 blocks, not on all 3
    hop_cost, _ = router.path_costs(1.0)
    assert hop_cost(layout.placement.spans[0], 1) == pytest.approx(router.enter_s[0] + 1.0 + ALLOC_PENALTY_S)
    assert hop_cost(layout.placement.spans[1], 2) == pytest.approx(router.enter_s[1] + 2.0)


def test_expected_wait_matches_order_statistics_and_grows_with_the_deficit():
    holders = [(1.0, 0.5)] * 4
    waits = [expected_wait_s(d, holders) for d in (0.5, 1.5, 2.5, 3.5)]
    assert waits == pytest.approx([2 / 4, 2 / 4 + 2 / 3, 2 / 4 + 2 / 3 + 2 / 2, 2 / 4 + 2 / 3 + 2 / 2 + 2])
    rng = np.random.default_rng(0)
    samples = np.sort(rng.exponential(2.0, size=(20_000, 4)), axis=1)[:, 1]  # 2nd departure
    assert samples.mean() == pytest.approx(waits[1], rel=0.03)


# ---------------------------------------------------------------- method registry


def test_build_method_for_every_name():
    p = toy([20, 20, 12], [0.5, 1.0, 0.8], 3, s_m=2.0, tau_c=0.1, rate=0.2, prompt=2000, output=48)
    for name in (*METHODS, "proposed:jffc"):
        setup = build_method(name, p, np.random.default_rng(0))
        layout = setup.plan_or_placement
        assert isinstance(layout, Plan | PathPlacement) and setup.description
        dispatcher = setup.make_dispatcher(np.random.default_rng(1))
        assert dispatcher is not setup.make_dispatcher(np.random.default_rng(1))  # fresh state each run
        starts = dispatcher.submit(Job(0, 0.0), 0.0)
        assert len(starts) == 1 and starts[0].route.hops[-1].end_block == 3
    for bad in ("nope", "petals:jffc", "proposed:"):
        with pytest.raises(ValueError):
            build_method(bad, p, np.random.default_rng(0))
