"""Log-probabilities of tokens from the logits the LM head returns (issue 20: OpenAI's ``logprobs``).

They are those of the model's raw next-token distribution — log-softmax of the logits before
temperature, penalties and the grammar mask — which is what vLLM reports by default
(``logprobs_mode=raw_logprobs``); OpenAI's API does not say. Computed in float64 from float32 logits.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from chainserve.runtime.requests import TokenLogprob


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise log-softmax in float64.

    >>> np.round(np.exp(log_softmax(np.array([0.0, np.log(3.0)]))), 6).tolist()
    [0.25, 0.75]
    """
    z = np.asarray(logits, dtype=np.float64)
    z = z - z.max(axis=-1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=-1, keepdims=True))


def token_logprob(logits: np.ndarray, token_id: int, k: int) -> TokenLogprob:
    """``token_id``'s log-probability under ``logits`` ([vocab]) and the ``k`` most likely tokens'.

    >>> lp = token_logprob(np.array([0.0, 0.0, 10.0]), 0, 1)
    >>> round(lp.logprob, 3), [(t, round(v, 3)) for t, v in lp.top]
    (-10.0, [(2, -0.0)])
    """
    row = log_softmax(logits)
    return TokenLogprob(int(token_id), float(row[token_id]), _top(row, k))


def prompt_logprobs(rows: np.ndarray, prompt: Sequence[int], k: int) -> tuple[TokenLogprob | None, ...]:
    """Each prompt token's log-probability given the tokens before it: ``rows[i]`` ([len(prompt), vocab])
    are the logits after position i; the first token has none (``None``, as OpenAI's echo reports)."""
    out: list[TokenLogprob | None] = [None]
    for i in range(1, len(prompt)):
        out.append(token_logprob(rows[i - 1], prompt[i], k))
    return tuple(out)


def _top(row: np.ndarray, k: int) -> tuple[tuple[int, float], ...]:
    if k <= 0:
        return ()
    best = np.argpartition(-row, min(k, len(row)) - 1)[:k]
    best = best[np.argsort(-row[best], kind="stable")]
    return tuple((int(t), float(row[t])) for t in best)
