"""Online policies by name: ``POLICIES[name](chains, rng, arrival_rate, tokens_per_slot=None,
page_tokens=1) -> Dispatcher`` (paper §2.4, §3).

Every factory takes the same arguments so drivers need not know which policy uses what: ``rng`` (a
``numpy.random.Generator``) feeds the randomised ones, ``arrival_rate`` (λ, jobs per second) the
threshold choice; ``tokens_per_slot`` and ``page_tokens`` switch on KV cache by tokens (issue 30,
:class:`chainserve.dispatch.base.ChainState`; ``None``: the paper's slots). The path routers (PETALS',
WS-RR) take a path placement instead of chains, so they are not here: :func:`chainserve.methods.dispatcher_for`
builds every method's dispatcher.

>>> from chainserve.dispatch.base import Job
>>> from chainserve.plan.types import Chain, Hop
>>> d = POLICIES["sed"]([Chain((Hop(0, 1, 1),), 1.0, 2)], np.random.default_rng(0), 0.5)
>>> d.name, [s.route.chain for s in d.submit(Job(0, 0.0), 0.0)]
('sed', [0])
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import numpy as np

from chainserve.dispatch.base import Dispatcher
from chainserve.dispatch.jffc import JFFC
from chainserve.dispatch.per_chain import JIQ, JSQ, SED, RandomDispatch, SpeedAwareJSQ
from chainserve.dispatch.thresholds import choose_thresholds
from chainserve.plan.types import Chain


class Factory(Protocol):
    def __call__(
        self,
        chains: Sequence[Chain],
        rng: np.random.Generator,
        arrival_rate: float,
        tokens_per_slot: int | None = None,
        page_tokens: int = 1,
    ) -> Dispatcher: ...


POLICIES: dict[str, Factory] = {
    "jffc": lambda chains, rng, arrival_rate, tokens_per_slot=None, page_tokens=1: JFFC(
        chains, None, tokens_per_slot, page_tokens
    ),
    "threshold-jffc": lambda chains, rng, arrival_rate, tokens_per_slot=None, page_tokens=1: JFFC(
        chains, choose_thresholds(chains, arrival_rate), tokens_per_slot, page_tokens
    ),
    "sed": lambda chains, rng, arrival_rate, tokens_per_slot=None, page_tokens=1: SED(
        chains, tokens_per_slot, page_tokens
    ),
    "sa-jsq": lambda chains, rng, arrival_rate, tokens_per_slot=None, page_tokens=1: SpeedAwareJSQ(
        chains, tokens_per_slot, page_tokens
    ),
    "jsq": lambda chains, rng, arrival_rate, tokens_per_slot=None, page_tokens=1: JSQ(
        chains, rng, tokens_per_slot, page_tokens
    ),
    "jiq": lambda chains, rng, arrival_rate, tokens_per_slot=None, page_tokens=1: JIQ(
        chains, rng, tokens_per_slot, page_tokens
    ),
    "random": lambda chains, rng, arrival_rate, tokens_per_slot=None, page_tokens=1: RandomDispatch(
        chains, rng, tokens_per_slot, page_tokens
    ),
}
