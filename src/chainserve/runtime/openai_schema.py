"""OpenAI request bodies of the runtime's API (paper §4.2's client side; responses: :mod:`.openai_responses`).

Requests are pydantic models in strict mode (no ``"5"`` → 5, no ``true`` → 1); an unknown top-level
field is a 400 ("unrecognized request argument", as OpenAI answers), except the OpenAI parameters in
:data:`IGNORED_FIELDS`, which clients send and which change nothing here. Parameters that would change
the output but are not implemented are rejected (:meth:`CompletionRequest.unsupported`), never
silently ignored:

* ``best_of`` other than 1, non-empty ``suffix`` or ``logit_bias``; ``stream_options``
  without ``stream: true``; ``top_logprobs`` without ``logprobs: true``; ``max_tokens: 0`` without echo.
* Implemented (issue 20): ``n`` (1..128, OpenAI's bound, over all prompts of a request), a list of
  prompts, ``echo``, ``logprobs`` / ``top_logprobs`` (≤ 20), ``presence_penalty`` /
  ``frequency_penalty`` ([−2, 2]), vLLM's ``repetition_penalty`` ((0, 2]) and ``min_tokens``,
  ``response_format`` ``text`` / ``json_object`` / ``json_schema`` (both endpoints, as vLLM).
* Implemented (issue 28): chat's ``tools``, ``tool_choice``, ``parallel_tool_calls`` (:mod:`.tools`),
  assistant messages with ``tool_calls`` and ``role: "tool"`` messages in the history.
* Ignored (no effect on the output): :data:`IGNORED_FIELDS`. ``ignore_eos`` is a (vLLM-style) extension.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from .requests import MAX_LOGPROBS

MAX_STOP = 4  # OpenAI's limit on stop sequences
MAX_CHOICES = 128  # OpenAI's bound on n; here on n × the number of prompts of one request
INT64_MIN, UINT64_END = -(2**63), 2**64


class ApiError(Exception):
    """An error answered in OpenAI's format ``{"error": {message, type, param, code}}``."""

    def __init__(
        self,
        status: int,
        message: str,
        param: str | None = None,
        code: str | None = None,
        type_: str = "invalid_request_error",
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type_
        self.headers = headers

    def body(self) -> dict[str, Any]:
        return error_body(self.message, self.type, self.param, self.code)


def error_body(message: str, type_: str, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def from_validation_error(e: ValidationError) -> ApiError:
    """The first pydantic error as a 400 naming the offending top-level field in ``param``."""
    err = e.errors(include_url=False)[0]
    loc = err["loc"]
    msg = str(err["msg"]).removeprefix("Value error, ")
    if not loc:
        if err["type"] == "model_type":
            msg = "must be a JSON object"
        return ApiError(400, f"request body: {msg}")
    path = str(loc[0]) + "".join(f"[{x}]" if isinstance(x, int) else f".{x}" for x in loc[1:])
    return ApiError(400, f"{path}: {msg}", param=str(loc[0]))


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _token_ids(x: Any) -> list[int] | None:
    if isinstance(x, list) and all(_is_int(t) for t in x):
        if any(not 0 <= t < 2**63 for t in x):
            raise ValueError("token ids must be non-negative 64-bit integers")
        return x
    return None


#: OpenAI parameters accepted and ignored: they do not change what is generated.
IGNORED_FIELDS = frozenset(
    {
        "user",
        "metadata",
        "store",
        "service_tier",
        "prompt_cache_key",
        "safety_identifier",
    }
)


class StreamOptions(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")
    include_usage: bool | None = False


class _Request(BaseModel):
    """Fields shared by both endpoints (``None``: the default)."""

    model_config = ConfigDict(strict=True, extra="ignore")
    model: str | None = None
    max_tokens: int | None = Field(None, ge=0)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    seed: int | None = Field(None, ge=INT64_MIN, lt=UINT64_END)
    stop: list[str] = []
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    n: int | None = Field(None, ge=1, le=MAX_CHOICES)
    ignore_eos: bool | None = False
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    repetition_penalty: float | None = Field(None, gt=0, le=2)
    min_tokens: int | None = Field(None, ge=0)
    logit_bias: dict[str, float] | None = None
    response_format: dict[str, Any] | None = None

    @model_validator(mode="before")
    @classmethod
    def _known_fields(cls, data: Any) -> Any:
        if isinstance(data, dict):
            unknown = sorted(set(data) - set(cls.model_fields) - IGNORED_FIELDS)
            if unknown:
                raise ValueError(f"unrecognized request argument supplied: {unknown[0]}")
        return data

    @field_validator("stop", mode="plain")
    @classmethod
    def _stop(cls, v: Any) -> list[str]:
        if v is None:
            return []
        if isinstance(v, str):
            v = [v]
        if not isinstance(v, list) or not all(isinstance(s, str) for s in v):
            raise ValueError("must be a string or a list of strings")
        if len(v) > MAX_STOP:
            raise ValueError(f"at most {MAX_STOP} stop sequences, got {len(v)}")
        return [s for s in v if s]  # an empty stop string would end every request at once

    @property
    def include_usage(self) -> bool:
        return bool(self.stream and self.stream_options and self.stream_options.include_usage)

    def unsupported(self) -> tuple[str, str] | None:
        """The first parameter set to something not implemented: ``(param, message)``."""
        if self.logit_bias:
            return "logit_bias", "logit_bias: not supported"
        if self.stream_options is not None and not self.stream:
            return "stream_options", "stream_options: only allowed when stream is true"
        return None


class CompletionRequest(_Request):
    """``POST /v1/completions``; ``prompt`` is a string, token ids (a list of ints), or a list of
    either (one choice per prompt, in order); kept as that list."""

    prompt: list[str | list[int]]
    echo: bool | None = False
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    best_of: int | None = None
    suffix: str | None = None

    @field_validator("prompt", mode="plain")
    @classmethod
    def _prompt(cls, v: Any) -> list[str | list[int]]:
        if isinstance(v, str) or _token_ids(v) is not None:
            return [v]
        if isinstance(v, list) and v and all(isinstance(p, str) for p in v):
            return v
        if isinstance(v, list) and v and all(_token_ids(p) is not None for p in v):
            return v
        raise ValueError("must be a string, a list of token ids, or a non-empty list of either")

    def unsupported(self) -> tuple[str, str] | None:
        if self.best_of not in (None, 1):
            return "best_of", "best_of: only best_of=1 is supported"
        if self.max_tokens == 0 and not self.echo:
            return "max_tokens", "max_tokens: must be at least 1 (0 only with echo)"
        if self.suffix:
            return "suffix", "suffix: not supported"
        return super().unsupported()


class FunctionCall(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")
    name: str
    arguments: str


class MessageToolCall(BaseModel):
    """A call an earlier assistant message made (``arguments``: JSON text, as OpenAI sends it)."""

    model_config = ConfigDict(strict=True, extra="ignore")
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(BaseModel):
    """One message; ``content`` is a string or a list of ``{"type": "text", "text": …}`` parts (joined
    by newlines). ``developer`` is OpenAI's newer name for ``system``. An assistant message may carry
    ``tool_calls`` instead of content; a ``tool`` message answers the call ``tool_call_id``."""

    model_config = ConfigDict(strict=True, extra="ignore")
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | None = None
    tool_calls: list[MessageToolCall] | None = None
    tool_call_id: str | None = None

    @field_validator("content", mode="plain")
    @classmethod
    def _content(cls, v: Any) -> str | None:
        if v is None or isinstance(v, str):
            return v
        parts = v if isinstance(v, list) else None
        if parts is None or not all(isinstance(p, dict) and p.get("type") == "text" for p in parts):
            raise ValueError('must be a string or a list of {"type": "text", "text": ...} parts')
        if not all(isinstance(p.get("text"), str) for p in parts):
            raise ValueError("text parts need a string 'text'")
        return "\n".join(p["text"] for p in parts)

    @model_validator(mode="after")
    def _needs_content(self) -> ChatMessage:
        if self.tool_calls and self.role != "assistant":
            raise ValueError(f"tool_calls: only assistant messages carry them, not {self.role}")
        if self.content is None and not (self.role == "assistant" and self.tool_calls):
            raise ValueError(f"content: a {self.role} message needs content")
        if self.role == "tool" and self.tool_call_id is None:
            raise ValueError("tool_call_id: a tool message names the call it answers")
        return self

    def as_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"role": "system" if self.role == "developer" else self.role, "content": self.content}
        if self.tool_calls:
            out["tool_calls"] = [c.model_dump() for c in self.tool_calls]
        if self.tool_call_id is not None:
            out["tool_call_id"] = self.tool_call_id
        return out


class ChatRequest(_Request):
    """``POST /v1/chat/completions``; ``max_completion_tokens`` wins over ``max_tokens``."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool | None = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    tools: list[Any] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None

    def unsupported(self) -> tuple[str, str] | None:
        if self.top_logprobs is not None and not self.logprobs:
            return "top_logprobs", "top_logprobs: only allowed when logprobs is true"
        if self.max_tokens == 0:
            return "max_tokens", "max_tokens: must be at least 1"
        return super().unsupported()

    @property
    def max_tokens_param(self) -> tuple[str, int | None]:
        if self.max_completion_tokens is not None:
            return "max_completion_tokens", self.max_completion_tokens
        return "max_tokens", self.max_tokens
