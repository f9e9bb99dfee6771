"""Online policies by name: ``POLICIES[name](chains, rng, arrival_rate) -> Dispatcher`` (paper §2.4, §3).

Every factory takes the same three arguments so drivers need not know which policy uses what:
``rng`` (a ``numpy.random.Generator``) feeds the randomised ones, ``arrival_rate`` (λ, jobs per second)
the threshold choice. The path routers (PETALS', WS-RR) take a path placement instead of chains, so
they are not here: :func:`chainserve.methods.dispatcher_for` builds every method's dispatcher.

>>> from chainserve.dispatch.base import Job
>>> from chainserve.plan.types import Chain, Hop
>>> d = POLICIES["sed"]([Chain((Hop(0, 1, 1),), 1.0, 2)], np.random.default_rng(0), 0.5)
>>> d.name, [s.route.chain for s in d.submit(Job(0, 0.0), 0.0)]
('sed', [0])
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

from chainserve.dispatch.base import Dispatcher
from chainserve.dispatch.jffc import JFFC
from chainserve.dispatch.per_chain import JIQ, JSQ, SED, RandomDispatch, SpeedAwareJSQ
from chainserve.dispatch.thresholds import choose_thresholds
from chainserve.plan.types import Chain

Factory = Callable[[Sequence[Chain], np.random.Generator, float], Dispatcher]

POLICIES: dict[str, Factory] = {
    "jffc": lambda chains, rng, arrival_rate: JFFC(chains),
    "threshold-jffc": lambda chains, rng, arrival_rate: JFFC(chains, choose_thresholds(chains, arrival_rate)),
    "sed": lambda chains, rng, arrival_rate: SED(chains),
    "sa-jsq": lambda chains, rng, arrival_rate: SpeedAwareJSQ(chains),
    "jsq": lambda chains, rng, arrival_rate: JSQ(chains, rng),
    "jiq": lambda chains, rng, arrival_rate: JIQ(chains, rng),
    "random": lambda chains, rng, arrival_rate: RandomDispatch(chains, rng),
}
