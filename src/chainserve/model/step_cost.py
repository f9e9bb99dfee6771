"""What one batched iteration costs on a server (issue 18, beyond the paper's fixed τ^p of §1).

Once a block server batches its sessions (iteration-level batching), a step's time depends on what
runs beside it. Per block the server passes, a decode iteration of ``b`` sessions costs
``alpha_s + beta_s·b`` and a prefill chunk of ``q`` tokens ``prefill_alpha_s + prefill_beta_s·q``; an
iteration that mixes them pays the larger fixed part once and every item's variable part:

    iteration(m; b decodes, q prefill tokens) = m · (max(α·[b>0], α'·[q>0]) + β·b + β'·q)

A lone prompt of one token counts as a decode. For a catalogue GPU the roofline default
(:func:`chainserve.model.catalogue.roofline_step_cost`) reads every weight once per iteration and
computes each token at peak.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TypeVar

#: Tokens one block-server iteration computes at most (a decode counts one); prompts go in chunks of
#: half (the runtime's continuous batching, issue 17, and the batched simulator's).
MAX_BATCH_TOKENS = 512

T = TypeVar("T")


def take_batch(waiting: Iterable[T], cost: Callable[[T], int], budget: int | None) -> tuple[list[T], list[T]]:
    """The batching rule (issue 17): the next iteration takes the oldest waiting item, then each later
    one whose ``cost`` (its tokens: a decode 1, a prefill chunk its length) still fits ``budget``
    (``None``: no limit); returns (batch, the rest), both in arrival order. The block server's
    :class:`~chainserve.runtime.batching.Batcher` and the batched simulator both take batches here.

    >>> take_batch([("a", 300), ("b", 1), ("c", 256), ("d", 1)], lambda item: item[1], 512)
    ([('a', 300), ('b', 1), ('d', 1)], [('c', 256)])
    """
    batch: list[T] = []
    rest: list[T] = []
    used = 0
    for item in waiting:
        c = cost(item)
        if not batch or budget is None or used + c <= budget:
            batch.append(item)
            used += c
        else:
            rest.append(item)
    return batch, rest


def prefill_chunk_tokens(max_batch_tokens: int) -> int:
    """Prompt tokens one iteration computes at most (chunked prefill): half the budget, so decodes
    always fit beside a chunk and a prompt holds them up by at most one chunk.

    >>> prefill_chunk_tokens(MAX_BATCH_TOKENS)
    256
    """
    return max_batch_tokens // 2


@dataclass(frozen=True, slots=True)
class StepCost:
    """Per-block iteration cost coefficients of one server, in seconds (module docstring);
    ``r2``: the fit's coefficient of determination when measured (``None``: given or derived)."""

    alpha_s: float
    beta_s: float
    prefill_alpha_s: float
    prefill_beta_s: float
    r2: float | None = None

    def __post_init__(self) -> None:
        for name in ("alpha_s", "beta_s", "prefill_alpha_s", "prefill_beta_s"):
            value = getattr(self, name)
            if not isinstance(value, int | float) or not math.isfinite(value) or value < 0:
                raise ValueError(f"{name}: must be a non-negative number, got {value!r}")
        if self.alpha_s + self.beta_s <= 0:
            raise ValueError("alpha_s + beta_s: a decode step must cost some time")

    def iteration_s(self, items: Iterable[tuple[int, int]]) -> float:
        """One iteration of ``items`` = (blocks m_i, tokens q_i) pairs (q_i = 1: a decode): the
        blocks any item passes pay the fixed part, each item its own variable part.

        >>> cost = StepCost(0.010, 0.002, 0.012, 0.0005)
        >>> round(cost.iteration_s([(2, 1), (2, 1)]), 6)          # 2·(10 + 2·2) ms
        0.028
        >>> round(cost.iteration_s([(2, 1), (1, 100)]), 6)        # 2·12 + 2·2 + 1·50 ms
        0.078
        """
        blocks = decode = prefill = 0.0
        has_decode = has_prefill = False
        for m, q in items:
            blocks = max(blocks, m)
            if q <= 1:
                has_decode, decode = True, decode + m * self.beta_s
            else:
                has_prefill, prefill = True, prefill + m * q * self.prefill_beta_s
        fixed = max(self.alpha_s if has_decode else 0.0, self.prefill_alpha_s if has_prefill else 0.0)
        return blocks * fixed + decode + prefill

    def decode_s(self, batch: int) -> float:
        """One block's decode iteration of ``batch`` sessions."""
        return self.alpha_s + self.beta_s * batch

    def prefill_s(self, tokens: int) -> float:
        """One block's prefill of ``tokens`` prompt tokens alone."""
        return self.prefill_alpha_s + self.prefill_beta_s * tokens if tokens > 1 else self.decode_s(1)

    def job_s(self, prompt_tokens: float, output_tokens: float, batch: float = 1.0) -> float:
        """One job's time through one block when ``batch`` sessions share every iteration: its
        prefill, l_out − 1 decode iterations of the whole batch, and the prefills of the batch − 1
        others that land beside it (each session is replaced once per job time, so a job overlaps
        about batch − 1 of them). At batch 1 this is τ^p_j of the paper's model.

        >>> StepCost(0.010, 0.002, 0.010, 0.001).job_s(100, 5)       # 110 + 4·12 ms
        0.158
        >>> round(StepCost(0.010, 0.002, 0.010, 0.001).job_s(100, 5, batch=3), 6)  # + 4·4 + 2·100 ms
        0.374
        """
        decodes = max(output_tokens - 1, 0.0)
        return (
            self.prefill_s(round(prompt_tokens))
            + decodes * self.decode_s(batch)
            + (batch - 1) * self.prefill_beta_s * prompt_tokens
        )

    def ms_text(self) -> str:
        """``α,β,α',β'`` in milliseconds (the block server's ``--step-cost-ms``)."""
        return ",".join(repr(x * 1000) for x in (self.alpha_s, self.beta_s, self.prefill_alpha_s, self.prefill_beta_s))

    @classmethod
    def from_ms_text(cls, text: str) -> StepCost:
        """The inverse of :meth:`ms_text`.

        >>> StepCost.from_ms_text(StepCost(0.01, 0.002, 0.012, 0.0005).ms_text())
        StepCost(alpha_s=0.01, beta_s=0.002, prefill_alpha_s=0.012, prefill_beta_s=0.0005, r2=None)
        """
        try:
            values = [float(x) / 1000 for x in text.split(",")]
        except ValueError:
            values = []
        if len(values) != 4:
            raise ValueError(f"step cost: expected 4 comma-separated numbers in ms (α,β,α',β'), got {text!r}")
        return cls(*values)

    def scaled(self, factor: float) -> StepCost:
        """Every coefficient × ``factor`` (a time scale for experiments)."""
        return StepCost(
            self.alpha_s * factor,
            self.beta_s * factor,
            self.prefill_alpha_s * factor,
            self.prefill_beta_s * factor,
            self.r2,
        )
