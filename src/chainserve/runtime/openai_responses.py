"""OpenAI response objects of the runtime's API (paper §4.2's client side): plain dicts in OpenAI's
shapes, built from the engine's :class:`~.requests.Finished` and :class:`~.requests.TokenEvent`.

Choices are indexed as OpenAI does: prompt p's j-th of n choices is ``p·n + j``. ``usage`` counts each
prompt once and every choice's generated tokens (as OpenAI and vLLM do for ``n > 1``). Log-probabilities
(issue 20; their distribution: :mod:`.logprobs`): completions ``{tokens, token_logprobs, top_logprobs,
text_offset}`` (``top_logprobs``: the k most likely plus the chosen token, as vLLM; offsets into the
choice's ``text``; with echo the prompt's tokens first, the first with ``None``); chat
``{"content": [{token, logprob, bytes, top_logprobs: [{token, logprob, bytes}]}]}`` (exactly k).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from .requests import Finished, TokenLogprob
from .tools import ToolCall, finish_reason, parse_calls

Decode = Callable[[Sequence[int]], str]


@dataclass(frozen=True, slots=True)
class Echo:
    """A completions choice's echoed prompt: its text and, with logprobs, its tokens' scores."""

    text: str
    token_ids: tuple[int, ...]


def usage(prompt_tokens: int, finished: Sequence[Finished]) -> dict[str, int]:
    completion = sum(f.completion_tokens for f in finished)
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion, "total_tokens": prompt_tokens + completion}


def route(f: Finished) -> dict[str, Any]:
    """The non-standard ``chainserve`` field: where and how long the request ran, and the generated
    token ids (EOS included when it ended the answer)."""
    return {
        "chain": f.chain,
        "hops": [{"server": s, "first_block": a, "last_block": b} for s, a, b in f.hops],
        "queued_s": f.queued_s,
        "ttft_s": f.ttft_s,
        "e2e_s": f.e2e_s,
        "num_attempts": f.num_attempts,
        "token_ids": list(f.token_ids),
    }


def completion_logprobs(
    entries: Sequence[tuple[int, TokenLogprob | None]], decode: Decode, offset: int = 0
) -> dict[str, list[Any]]:
    """Completions' ``logprobs`` of ``(token id, its log-probability or None)`` entries, text offsets
    counted from ``offset``.

    >>> lp = TokenLogprob(7, -0.5, ((8, -0.1),))
    >>> completion_logprobs([(6, None), (7, lp)], lambda ids: "ab"[ids[0] - 6] if ids[0] < 8 else "c")
    {'tokens': ['a', 'b'], 'token_logprobs': [None, -0.5], 'top_logprobs': [None, {'c': -0.1, 'b': -0.5}], \
'text_offset': [0, 1]}
    """
    out: dict[str, list[Any]] = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    for token_id, lp in entries:
        text = decode([token_id])
        out["tokens"].append(text)
        out["token_logprobs"].append(None if lp is None else lp.logprob)
        top: dict[str, float] | None = None
        if lp is not None:  # tokens that read the same keep the likelier one's value
            top = {}
            for t, v in (*lp.top, (token_id, lp.logprob)):
                top.setdefault(decode([t]), v)
        out["top_logprobs"].append(top)
        out["text_offset"].append(offset)
        offset += len(text)
    return out


def chat_logprobs(lps: Sequence[TokenLogprob], decode: Decode) -> dict[str, Any]:
    """Chat's ``logprobs``: ``{"content": [...], "refusal": None}``."""

    def entry(token_id: int, logprob: float) -> dict[str, Any]:
        text = decode([token_id])
        return {"token": text, "logprob": logprob, "bytes": list(text.encode())}

    content = [entry(lp.token_id, lp.logprob) | {"top_logprobs": [entry(t, v) for t, v in lp.top]} for lp in lps]
    return {"content": content, "refusal": None}


def choice_logprobs(f: Finished, echo: Echo | None, chat: bool, decode: Decode) -> dict[str, Any] | None:
    """A finished choice's ``logprobs`` (``None`` when not asked for: the engine reported none)."""
    if chat:
        return chat_logprobs(f.logprobs, decode) if f.logprobs else None
    entries: list[tuple[int, TokenLogprob | None]] = []
    if echo is not None and f.prompt_logprobs:
        entries += zip(echo.token_ids, f.prompt_logprobs, strict=True)
    entries += [(lp.token_id, lp) for lp in f.logprobs]
    return completion_logprobs(entries, decode) if entries else None


def completion_response(
    rid: str, created: int, model: str, chat: bool, finished: Sequence[Finished], echoes: Sequence[Echo | None],
    prompt_tokens: int, decode: Decode, tool_names: tuple[str, ...] | None = None,
) -> dict[str, Any]:  # fmt: skip
    """The whole answer; ``chainserve`` at the top is choice 0's route, each choice carries its own.
    With ``tool_names`` (chat with tools) a choice's text is read for its calls (:func:`.tools.parse_calls`):
    then its message has ``tool_calls`` and the text before them as content, and ``finish_reason`` is
    ``tool_calls`` (``length`` still, when the answer was cut off after them)."""
    choices = []
    for i, (f, echo) in enumerate(zip(finished, echoes, strict=True)):
        logprobs = choice_logprobs(f, echo, chat, decode)
        reason: str = f.finish_reason
        if chat:
            message: dict[str, Any] = {"role": "assistant", "content": f.text}
            if tool_names is not None:
                content, calls = parse_calls(f.text, tool_names)
                if calls:
                    message = {"role": "assistant", "content": content, "tool_calls": [c.as_openai() for c in calls]}
                    reason = finish_reason(f.finish_reason, calls)
            choice = {"index": i, "message": message, "logprobs": logprobs}
        else:
            choice = {"index": i, "text": (echo.text if echo else "") + f.text, "logprobs": logprobs}
        choices.append(choice | {"finish_reason": reason, "chainserve": route(f)})
    return {
        "id": rid,
        "object": "chat.completion" if chat else "text_completion",
        "created": created,
        "model": model,
        "choices": choices,
        "usage": usage(prompt_tokens, finished),
        "chainserve": route(finished[0]),
    }


def tool_call_deltas(index: int, call: ToolCall) -> list[dict[str, Any]]:
    """A whole call as OpenAI streams one: its id, type and name (empty arguments), then its arguments."""
    return [
        {"index": index, "id": call.id, "type": "function", "function": {"name": call.name, "arguments": ""}},
        {"index": index, "function": {"arguments": call.arguments}},
    ]


def chunk(
    rid: str,
    created: int,
    model: str,
    chat: bool,
    *,
    index: int = 0,
    text: str | None = None,
    role: bool = False,
    finish_reason: str | None = None,
    logprobs: dict[str, Any] | None = None,
    include_usage: bool = False,
    tool_calls: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """One streamed chunk of choice ``index``: ``text_completion`` or ``chat.completion.chunk``
    (``role``: the first chat delta ``{"role": "assistant"}``; ``tool_calls``: chat's call deltas;
    ``usage`` is ``null`` on every chunk when usage is requested)."""
    if chat:
        delta: dict[str, Any] = {"role": "assistant", "content": ""} if role else {}
        if text is not None:
            delta["content"] = text
        if tool_calls is not None:
            delta["tool_calls"] = tool_calls
        choice = {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason}
    else:
        choice = {"index": index, "text": text or "", "logprobs": logprobs, "finish_reason": finish_reason}
    body = {
        "id": rid,
        "object": "chat.completion.chunk" if chat else "text_completion",
        "created": created,
        "model": model,
        "choices": [choice],
    }
    if include_usage:
        body["usage"] = None
    return body
