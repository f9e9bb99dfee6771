"""Greedy sampling's fast path (issue 30): with nothing that changes the logits the sampler takes the
argmax of the float32 logits, the token the float64 path picks (ties: the first); EOS held back
before ``min_tokens``, penalties and grammars still go through that path."""

import numpy as np

from chainserve.runtime.requests import SamplingParams
from chainserve.runtime.sampling import Sampler


def test_plain_greedy_picks_what_the_float64_path_picks():
    rng = np.random.default_rng(0)
    sampler = Sampler(SamplingParams(temperature=0))
    for _ in range(50):
        logits = rng.standard_normal(1000).astype(np.float32)
        logits[rng.integers(1000, size=3)] = logits.max()  # ties
        assert sampler._plain_greedy(())
        assert (
            sampler(logits)
            == sampler._pick(sampler._masked(logits, ()))
            == int(np.flatnonzero(logits == logits.max())[0])
        )


def test_greedy_with_min_tokens_or_penalties_takes_the_full_path():
    logits = np.array([0.1, 2.0, 0.5], dtype=np.float32)
    held = Sampler(SamplingParams(temperature=0, min_tokens=1), eos_token_ids=(1,))
    assert not held._plain_greedy(()) and held(logits) == 2
    assert held._plain_greedy([2]) and held(logits, [2]) == 1
    penalized = Sampler(SamplingParams(temperature=0, repetition_penalty=2.0), prompt=[1])
    assert not penalized._plain_greedy(()) and penalized(np.array([0.1, 1.0, 0.6], dtype=np.float32)) == 2
