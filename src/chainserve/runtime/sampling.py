"""Next-token choice and the text a client sees (§4.2: the orchestrator runs the LM head).

:class:`Sampler`: greedy (temperature 0), or temperature + top-p (nucleus) sampling with its own
``numpy.random.Generator`` seeded by the request's ``seed``. :class:`TextStream`: incremental
detokenisation that never emits half a character, stops at a stop string (which is not returned)
and holds back text that might still become one.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

from chainserve.runtime.requests import SamplingParams


class Sampler:
    """Picks the next token from float logits.

    >>> Sampler(SamplingParams(temperature=0))(np.array([0.1, 2.0, 0.5]))
    1
    >>> s = Sampler(SamplingParams(temperature=1.0, top_p=0.5, seed=1))
    >>> {s(np.array([0.0, 5.0, 0.0])) for _ in range(20)}   # the top token holds > 50 % of the mass
    {1}
    """

    def __init__(self, params: SamplingParams):
        self.params = params
        self.rng = np.random.default_rng(params.seed)

    def __call__(self, logits: np.ndarray) -> int:
        if self.params.is_greedy:
            return int(np.argmax(logits))
        z = logits.astype(np.float64) / self.params.temperature
        z -= z.max()
        probs = np.exp(z)
        probs /= probs.sum()
        if self.params.top_p < 1:
            order = np.argsort(-probs, kind="stable")
            keep = int(np.searchsorted(np.cumsum(probs[order]), self.params.top_p)) + 1
            order = order[:keep]
            return int(order[self.rng.choice(len(order), p=probs[order] / probs[order].sum())])
        return int(self.rng.choice(len(probs), p=probs))


class TextStream:
    """Generated text so far; :meth:`push` returns the new text that is safe to send.

    >>> words = {1: "Hel", 2: "lo", 3: " wor", 4: "ld"}
    >>> ts = TextStream(lambda ids: "".join(words[i] for i in ids), stop=("lo w",))
    >>> ts.push(1), ts.push(2), ts.push(3), ts.stopped, ts.text
    ('He', 'l', '', True, 'Hel')
    """

    def __init__(self, decode: Callable[[Sequence[int]], str], stop: Sequence[str] = ()):
        self.decode = decode
        self.stop = tuple(s for s in stop if s)
        self.token_ids: list[int] = []
        self.text = ""  # text sent so far
        self.stopped = False

    def push(self, token_id: int) -> str:
        self.token_ids.append(token_id)
        full = self.decode(self.token_ids)
        cut = min((i for i in (full.find(s) for s in self.stop) if i >= 0), default=-1)
        if cut >= 0:
            self.stopped = True
            return self._advance(full[:cut])
        safe = len(full)
        if full.endswith("\ufffd"):  # an incomplete multi-byte character
            safe = len(full.rstrip("\ufffd"))
        for s in self.stop:  # hold back a tail that may grow into a stop string
            for n in range(min(len(s) - 1, safe), 0, -1):
                if full[:safe].endswith(s[:n]):
                    safe -= n
                    break
        return self._advance(full[:safe])

    def finish(self) -> str:
        """At the end (EOS or length): release what was held back (no stop string can follow)."""
        if self.stopped:
            return ""
        return self._advance(self.decode(self.token_ids).rstrip("\ufffd"))

    def _advance(self, upto: str) -> str:
        if not upto.startswith(self.text) or len(upto) <= len(self.text):
            return ""
        delta, self.text = upto[len(self.text) :], upto
        return delta
