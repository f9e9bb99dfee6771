"""The two halves of a served model, as the runtime sees them (paper §4.2).

* A :class:`SpanBackend` lives in a block server: it runs the server's span of blocks on a batch of
  sessions' steps (:class:`SpanStep`) and owns the KV memory, paged by tokens (issue 30): ``num_pages``
  *pages*, each one block's K and V for ``page_tokens`` positions. The plan reserves memory in
  *block-slots* (one block of one job at the ``max_tokens`` the plan sized s_c for), so a server's
  pool is its reservation Σ_k c_k·m_ij(k) (chains) or its cache pool (PETALS, BPRR) times
  ``pages_per_slot``. A session entering the span at block b reserves, for each of the blocks b..end,
  the pages its own prompt + output need; admission (which pages a session gets) is the block
  server's job (:mod:`..kv_arena`).
* A :class:`ModelHead` lives in the orchestrator, the client of every chain (as PETALS' client is):
  tokenizer, chat template, embeddings, final norm + LM head.

Hidden states travel as :class:`WireTensor` (raw bytes with dtype and shape; never pickle).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

if TYPE_CHECKING:
    from chainserve.runtime.tools import Tool

#: dtypes allowed on the wire → bytes per element.
WIRE_DTYPES = {"float32": 4, "float16": 2, "bfloat16": 2, "int32": 4, "int64": 8}


#: Tokens per KV page (vLLM's CPU default block size is 16 too; PETALS sizes a session by its max_length).
PAGE_TOKENS = 16


class NoFreeSlot(RuntimeError):
    """Admission refused: not enough free pages for the session (never an out-of-bounds write)."""


@dataclass(frozen=True, slots=True)
class WireTensor:
    """A tensor as raw bytes: ``dtype`` (a key of :data:`WIRE_DTYPES`; bf16 travels as its 2-byte
    pattern), ``shape``, and ``data`` (C-contiguous, exactly ``prod(shape) × itemsize`` bytes)."""

    dtype: str
    shape: tuple[int, ...]
    data: bytes | memoryview

    def __post_init__(self) -> None:
        if self.dtype not in WIRE_DTYPES:
            raise ValueError(f"dtype: {self.dtype!r} is not one of {', '.join(WIRE_DTYPES)}")
        if not self.shape or any(not isinstance(d, int) or d < 0 for d in self.shape):
            raise ValueError(f"shape: must be non-negative integers, got {self.shape!r}")
        if len(self.data) != self.nbytes:
            raise ValueError(
                f"data: {len(self.data)} bytes for shape {self.shape} of {self.dtype} (need {self.nbytes})"
            )

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * WIRE_DTYPES[self.dtype]

    def tokens(self, start: int, stop: int) -> WireTensor:
        """Tokens ``start..stop−1`` of a [1, q, …] tensor (a slice of its bytes)."""
        per_token = self.nbytes // self.shape[1]
        return WireTensor(
            self.dtype, (1, stop - start, *self.shape[2:]), self.data[start * per_token : stop * per_token]
        )

    @staticmethod
    def concat(parts: Sequence[WireTensor]) -> WireTensor:
        """[1, q₁ + q₂ + …, …] from [1, qᵢ, …] parts of one dtype (the inverse of :meth:`tokens`).

        >>> t = WireTensor("int32", (1, 3, 1), np.arange(3, dtype=np.int32).tobytes())
        >>> WireTensor.concat([t.tokens(0, 2), t.tokens(2, 3)]) == t
        True
        """
        first = parts[0]
        shape = (1, sum(p.shape[1] for p in parts), *first.shape[2:])
        return WireTensor(first.dtype, shape, b"".join(bytes(p.data) for p in parts))


@dataclass(frozen=True, slots=True)
class SpanInfo:
    """What a block server hosts: blocks ``first_block``..``first_block + num_blocks − 1`` (1-based,
    the plan's span) and KV memory for ``num_block_slots`` block-slots of ``max_tokens`` positions
    each (the plan's unit: s_c), held as pages of ``page_tokens`` positions; ``max_context``: the
    longest session it serves (``None``: as long as the model's window and its pages allow).

    >>> info = SpanInfo(1, 30, num_block_slots=2, max_tokens=2048)
    >>> info.pages_per_slot, info.num_pages, info.pages_for(64)
    (128, 256, 4)
    """

    first_block: int
    num_blocks: int
    num_block_slots: int
    max_tokens: int
    page_tokens: int = PAGE_TOKENS
    max_context: int | None = None

    @property
    def last_block(self) -> int:
        return self.first_block + self.num_blocks - 1

    @property
    def pages_per_slot(self) -> int:
        """Pages of one block-slot (one block of one job at ``max_tokens``)."""
        return self.pages_for(self.max_tokens)

    @property
    def num_pages(self) -> int:
        return self.num_block_slots * self.pages_per_slot

    def pages_for(self, num_tokens: int) -> int:
        """Pages one block of a session holding ``num_tokens`` positions needs."""
        return -(-num_tokens // self.page_tokens)

    def slot_pages(self, slots: Sequence[int]) -> tuple[tuple[int, ...], ...]:
        """The pages of block-slots ``slots`` where each block-slot is a run of ``pages_per_slot``
        pages (a fixed assignment, for tools and benchmarks that place sessions themselves).

        >>> SpanInfo(1, 2, num_block_slots=4, max_tokens=32, page_tokens=16).slot_pages([3, 0])
        ((6, 7), (0, 1))
        """
        n = self.pages_per_slot
        return tuple(tuple(range(s * n, (s + 1) * n)) for s in slots)


@dataclass(frozen=True, slots=True)
class SpanStep:
    """One session's step through the span: ``hidden`` ([1, q, hidden_size]: q new tokens at
    absolute positions ``position..position+q−1``) enters at ``first_block``; block ``first_block + i``
    reads and writes its KV in the pages ``pages[i]`` (position p in page ``pages[i][p // page_tokens]``;
    positions ``< position`` were written by earlier steps of the same session; later ones are
    overwritten)."""

    hidden: WireTensor
    first_block: int
    pages: tuple[tuple[int, ...], ...]
    position: int

    @property
    def num_tokens(self) -> int:
        return self.hidden.shape[1] if len(self.hidden.shape) >= 2 else 0

    def chunks(self, size: int) -> list[SpanStep]:
        """This step cut into steps of at most ``size`` tokens, in order (chunked prefill)."""
        q = self.num_tokens
        if q <= size:
            return [self]
        return [
            SpanStep(self.hidden.tokens(a, min(a + size, q)), self.first_block, self.pages, self.position + a)
            for a in range(0, q, size)
        ]


class SpanBackend(Protocol):
    """Runs blocks of one server's span (see module docstring). ``batches``: the block server runs
    one :meth:`forward` at a time over every step waiting (torch); otherwise each step is its own call
    as it arrives (emulated: every session at its own full rate). ``context``: the longest session it
    serves (``info.max_context`` within the model's window; ``None``: no bound but its pages)."""

    info: SpanInfo
    batches: bool
    context: int | None

    async def forward(self, steps: Sequence[SpanStep]) -> list[WireTensor | Exception]:
        """Run each step (distinct sessions) through blocks ``step.first_block..info.last_block``:
        the hidden states after the last block, same dtype and shape, or the exception that failed
        that step alone. The caller guarantees that ``step.pages`` hold positions up to ``position + q``."""
        ...

    def close(self) -> None:
        """Release the weights and the cache."""
        ...


class ModelHead(Protocol):
    """Tokenizer, embeddings and LM head of the served model (orchestrator side); ``in_thread``: its
    :meth:`logits` is long enough to run in a worker thread; ``tokenizer``: the Hugging Face fast
    tokenizer, which structured output needs (``None``: there is none)."""

    in_thread: bool
    tokenizer: Any
    model_id: str
    num_blocks: int
    max_tokens: int
    vocab_size: int  # token ids are 0 .. vocab_size - 1
    eos_token_ids: tuple[int, ...]

    def encode(self, text: str) -> list[int]: ...

    def decode(self, token_ids: Sequence[int]) -> str: ...

    def chat_prompt(self, messages: Sequence[dict[str, Any]], tools: tuple[Tool, ...] = ()) -> list[int]:
        """Token ids of a chat (``[{"role", "content"}, …]``, with ``tool_calls`` and ``tool`` messages)
        and the ``tools`` it offers through the tokenizer's chat template, ending with the assistant's
        turn opened (:mod:`..tools`)."""
        ...

    def embed(self, token_ids: Sequence[int], position: int = 0) -> WireTensor:
        """Hidden states entering block 1 for these tokens, the first at ``position`` (learned position
        embeddings depend on it): [1, len(token_ids), hidden_size]."""
        ...

    def logits(self, hiddens: Sequence[WireTensor], num_positions: Sequence[int] | None = None) -> np.ndarray:
        """Next-token logits (float32, [Σ num_positions, vocab]) after the last ``num_positions[i]``
        positions of each of the last block's outputs (``None``: the last position of each; a prefill's
        output has every prompt position, which echo's prompt log-probabilities need), rows in order,
        in one batch (the orchestrator calls it from a worker thread)."""
        ...
