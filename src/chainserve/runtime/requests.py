"""What the API hands the orchestrator and what it streams back (paper §4.2's client side).

The OpenAI layer (:mod:`.api`) turns HTTP bodies into a prompt (token ids) and
:class:`SamplingParams`; :meth:`Engine.generate` yields one :class:`TokenEvent` per generated token
and ends with one :class:`Finished`. Stopping the iteration early (client gone) cancels the job.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, Protocol

if TYPE_CHECKING:
    from .tools import Tool

MAX_LOGPROBS = 20  # top log-probabilities per position at most (vLLM's default max_logprobs)


@dataclass(frozen=True, slots=True)
class SamplingParams:
    """``max_tokens``: tokens to generate at most (0: run the prompt only, as echo does, for its
    ``prompt_logprobs``); ``temperature`` 0 means greedy; ``top_p`` nucleus mass; ``seed`` makes sampling
    reproducible; generation ends at EOS (unless ``ignore_eos``; never before ``min_tokens``) or when
    the text contains one of ``stop`` (the stop string itself is not returned).

    Penalties, as OpenAI and vLLM define them: ``presence_penalty`` is subtracted from the logit of
    every token generated so far, ``frequency_penalty`` times its count; ``repetition_penalty``
    (vLLM, CTRL's) divides positive and multiplies negative logits of tokens in the prompt or the
    output (1: off). ``logprobs``: the top-k log-probabilities to report per generated token (``None``:
    none; 0: only the chosen token's); ``prompt_logprobs``: also those of every prompt token (echo);
    ``grammar``: an llguidance grammar that constrains every token (:mod:`.constraints`)."""

    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    min_tokens: int = 0
    logprobs: int | None = None
    prompt_logprobs: bool = False
    grammar: str | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.max_tokens, int) or self.max_tokens < 0:
            raise ValueError(f"max_tokens: must be a non-negative integer, got {self.max_tokens!r}")
        if not 0 <= self.temperature <= 100:
            raise ValueError(f"temperature: must lie in [0, 100], got {self.temperature!r}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p: must lie in (0, 1], got {self.top_p!r}")
        for name in ("presence_penalty", "frequency_penalty"):
            if not -2 <= getattr(self, name) <= 2:
                raise ValueError(f"{name}: must lie in [-2, 2], got {getattr(self, name)!r}")
        if not 0 < self.repetition_penalty <= 2:
            raise ValueError(f"repetition_penalty: must lie in (0, 2], got {self.repetition_penalty!r}")
        if not 0 <= self.min_tokens <= self.max_tokens:
            raise ValueError(f"min_tokens: must lie in [0, max_tokens={self.max_tokens}], got {self.min_tokens!r}")
        if self.logprobs is not None and not 0 <= self.logprobs <= MAX_LOGPROBS:
            raise ValueError(f"logprobs: must lie in [0, {MAX_LOGPROBS}], got {self.logprobs!r}")

    @property
    def has_penalties(self) -> bool:
        return bool(self.presence_penalty or self.frequency_penalty or self.repetition_penalty != 1)

    @property
    def is_greedy(self) -> bool:
        return self.temperature == 0


@dataclass(frozen=True, slots=True)
class TokenLogprob:
    """A token's log-probability under the model's raw next-token distribution (before temperature,
    penalties and grammar, as vLLM reports by default) and the ``top`` (token id, log-probability)
    pairs of that distribution, most likely first."""

    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()


@dataclass(frozen=True, slots=True)
class TokenEvent:
    """One generated token and the text it adds (``text`` may be empty while a multi-byte character
    is incomplete, or while a possible stop string is held back); its ``logprob`` when asked for, and
    on a job's first event the ``prompt_logprobs`` when asked for (``None`` for the first token)."""

    token_id: int
    text: str
    logprob: TokenLogprob | None = None
    prompt_logprobs: tuple[TokenLogprob | None, ...] = ()


@dataclass(frozen=True, slots=True)
class Finished:
    """End of a request: why (``stop``: EOS or a stop string; ``length``: max_tokens reached), the
    token counts, the whole generated text, and where and how it ran: ``chain`` (the plan chain's
    number, from 1 as :func:`~chainserve.plan.types.chain_number` gives it; ``None`` for per-request
    paths), ``hops`` as (server name, first block, last block), and the times in seconds
    (``queued_s`` arrival → start of service, ``ttft_s`` arrival → first token, ``e2e_s`` arrival →
    end), the attempts it took, the generated ``token_ids``, and when asked for their ``logprobs``
    and the ``prompt_logprobs`` (see :class:`TokenEvent`)."""

    finish_reason: Literal["stop", "length"]
    prompt_tokens: int
    completion_tokens: int
    text: str
    chain: int | None = None
    hops: tuple[tuple[str, int, int], ...] = ()
    queued_s: float = 0.0
    ttft_s: float = 0.0
    e2e_s: float = 0.0
    num_attempts: int = 1
    token_ids: tuple[int, ...] = ()
    logprobs: tuple[TokenLogprob, ...] = ()
    prompt_logprobs: tuple[TokenLogprob | None, ...] = ()


class RequestFailed(RuntimeError):
    """A request could not be served (``status`` 504: its timeout passed; 503: no server could)."""

    def __init__(self, message: str, status: int = 503):
        super().__init__(message)
        self.status = status


class Overloaded(RuntimeError):
    """The central queue is full: the request is refused (HTTP 429)."""

    def __init__(self, message: str, retry_after_s: float = 1.0):
        super().__init__(message)
        self.retry_after_s = retry_after_s


class Engine(Protocol):
    """What the API needs of the orchestrator."""

    model_id: str
    max_tokens: int  # context length: prompt + generated tokens must fit in it
    max_job_tokens: int  # the most a job's KV may hold on any chain (issue 30); a default max_tokens stays within
    vocab_size: int  # token ids of a prompt must lie in 0 .. vocab_size - 1

    def encode(self, text: str) -> list[int]: ...

    def decode(self, token_ids: Sequence[int]) -> str: ...

    def chat_prompt(self, messages: Sequence[dict[str, Any]], tools: tuple[Tool, ...] = ()) -> list[int]: ...

    def generate(self, prompt_ids: Sequence[int], params: SamplingParams) -> AsyncIterator[TokenEvent | Finished]:
        """Queue the request (raises :class:`Overloaded` when the queue is full), then stream."""
        ...

    def plan_dict(self) -> dict[str, Any]:
        """The live plan, same keys as ``chainserve plan --json``."""
        ...

    def status(self) -> dict[str, Any]:
        """Live state: ``healthy``, ``serving`` (a complete chain can serve), ``dead`` (server names),
        ``num_running``, ``num_waiting``, ``chains`` (busy, capacity), ``servers`` (name, used and total
        block-slots)."""
        ...


@dataclass(slots=True)
class RequestTimes:
    """Wall-clock marks of one request (seconds, the engine's clock)."""

    arrived_at: float
    started_at: float | None = None
    first_token_at: float | None = None
