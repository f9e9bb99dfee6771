"""Next-token choice and the text a client sees (§4.2: the orchestrator runs the LM head).

:class:`Sampler`: penalties (:func:`penalized`), EOS held back before ``min_tokens``, the grammar's
mask (:mod:`.constraints`), then greedy (temperature 0) or temperature + top-p (nucleus) sampling
with its own ``numpy.random.Generator`` seeded by the request's ``seed``. :class:`TextStream`:
incremental detokenisation that never emits half a character, stops at a stop string (which is not
returned) and holds back text that might still become one.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

from chainserve.runtime.constraints import Constraint
from chainserve.runtime.requests import SamplingParams


def penalized(
    logits: np.ndarray, prompt: Sequence[int], generated: Sequence[int], params: SamplingParams
) -> np.ndarray:
    """Logits after vLLM's repetition penalty (tokens of prompt or output: positive logits ÷ p,
    negative × p) and OpenAI's frequency and presence penalties (output tokens: − count·f − [count > 0]·p).

    >>> p = SamplingParams(frequency_penalty=0.5, presence_penalty=1.0)
    >>> penalized(np.array([2.0, 2.0, 2.0]), [0], [1, 1], p).tolist()
    [2.0, 0.0, 2.0]
    >>> penalized(np.array([2.0, -2.0, 2.0]), [0], [1], SamplingParams(repetition_penalty=2.0)).tolist()
    [1.0, -4.0, 2.0]
    """
    z = logits.astype(np.float64)
    if params.repetition_penalty != 1:
        seen = np.unique(np.asarray([*prompt, *generated], dtype=np.int64))
        seen = seen[seen < len(z)]
        z[seen] = np.where(z[seen] > 0, z[seen] / params.repetition_penalty, z[seen] * params.repetition_penalty)
    if generated and (params.frequency_penalty or params.presence_penalty):
        counts = np.bincount(np.asarray(generated, dtype=np.int64), minlength=len(z))[: len(z)]
        z -= params.frequency_penalty * counts + params.presence_penalty * (counts > 0)
    return z


class Sampler:
    """Picks the next token from float logits, given the tokens generated so far; with a
    ``constraint`` only tokens its grammar allows, which it then accepts.

    >>> Sampler(SamplingParams(temperature=0))(np.array([0.1, 2.0, 0.5]))
    1
    >>> s = Sampler(SamplingParams(temperature=1.0, top_p=0.5, seed=1))
    >>> {s(np.array([0.0, 5.0, 0.0])) for _ in range(20)}   # the top token holds > 50 % of the mass
    {1}
    >>> Sampler(SamplingParams(temperature=0, min_tokens=1), eos_token_ids=(1,))(np.array([0.1, 2.0, 0.5]))
    2
    """

    def __init__(
        self,
        params: SamplingParams,
        prompt: Sequence[int] = (),
        eos_token_ids: Sequence[int] = (),
        constraint: Constraint | None = None,
    ):
        self.params, self.prompt, self.eos_token_ids = params, tuple(prompt), list(eos_token_ids)
        self.constraint = constraint
        self.rng = np.random.default_rng(params.seed)

    @property
    def is_done(self) -> bool:
        """The grammar is complete: the answer ends here."""
        return self.constraint is not None and self.constraint.is_done

    def __call__(self, logits: np.ndarray, generated: Sequence[int] = ()) -> int:
        if self._plain_greedy(generated):  # the argmax of the float32 logits is that of their float64 copy
            return int(np.argmax(logits))
        token = self._pick(self._masked(logits, generated))
        if self.constraint is not None:
            self.constraint.accept(token)
        return token

    def _plain_greedy(self, generated: Sequence[int]) -> bool:
        """Greedy with nothing that changes the logits (issue 30: no float64 copy of the vocabulary per
        token on the orchestrator's per-token path)."""
        params = self.params
        return (
            params.is_greedy
            and not params.has_penalties
            and self.constraint is None
            and not (len(generated) < params.min_tokens and self.eos_token_ids)
        )

    def _masked(self, logits: np.ndarray, generated: Sequence[int]) -> np.ndarray:
        params = self.params
        z = penalized(logits, self.prompt, generated, params) if params.has_penalties else logits.astype(np.float64)
        if len(generated) < params.min_tokens and self.eos_token_ids:
            z[self.eos_token_ids] = -np.inf
        if self.constraint is not None:
            z[~self.constraint.allowed(len(z))] = -np.inf
        return z

    def _pick(self, z: np.ndarray) -> int:
        if self.params.is_greedy:
            return int(np.argmax(z))
        z = z / self.params.temperature
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
