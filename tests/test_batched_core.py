"""The batched model's compiled core (issue 31, :mod:`chainserve.sim.batched_core`): its twins of the
batching rule and of the iteration cost are pinned to the definitions the runtime's ``Batcher`` uses
(:func:`~chainserve.model.step_cost.take_batch`, :meth:`~chainserve.model.step_cost.StepCost.iteration_s`),
bit for bit."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from chainserve.model.step_cost import StepCost, take_batch
from chainserve.sim.batched_core import iteration_s, take_batch_mask

coefficient = st.floats(0.0, 1.0, allow_subnormal=False)


@settings(max_examples=300, deadline=None)
@given(tokens=st.lists(st.integers(0, 600), max_size=40), budget=st.integers(2, 1024))
def test_the_batching_twin_takes_the_same_batch(tokens, budget):
    items = list(enumerate(tokens))
    batch, rest = take_batch(items, lambda item: item[1], budget)
    least = min(1, min(tokens, default=1))  # the core's early stop: no waiting item has fewer tokens
    taken = np.zeros(len(tokens), np.int64)
    k = take_batch_mask(np.array(tokens, np.int64), len(tokens), budget, least, taken)
    assert k == len(batch)
    assert [i for i, _ in batch] == [x for x in range(len(tokens)) if taken[x]]
    assert [i for i, _ in rest] == [x for x in range(len(tokens)) if not taken[x]]


@settings(max_examples=300, deadline=None)
@given(
    items=st.lists(st.tuples(st.integers(1, 80), st.integers(0, 512)), min_size=1, max_size=40),
    alpha=coefficient,
    beta=coefficient,
    palpha=coefficient,
    pbeta=coefficient,
)
def test_the_cost_twin_gives_the_same_seconds(items, alpha, beta, palpha, pbeta):
    if alpha + beta <= 0:
        beta = 1e-3
    cost = StepCost(alpha, beta, palpha, pbeta)
    blocks = np.array([m for m, _ in items], np.int64)
    tokens = np.array([q for _, q in items], np.int64)
    twin = iteration_s(blocks, tokens, len(items), alpha, beta, palpha, pbeta)
    assert twin == cost.iteration_s(items)
    assert np.float64(twin).view(np.int64) == np.float64(cost.iteration_s(items)).view(np.int64)
