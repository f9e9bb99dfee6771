"""One API request served as its jobs (paper §4.2's client side; issue 20): each choice — n per
prompt — is its own job through the engine's dispatcher, admitted like any other. All are queued
before the answer starts (a refusal of any is a 429, and the ones queued are cancelled); the first
event of any is awaited before the response starts, so an ``Overloaded`` is a real 429 even for
streams. Streams interleave the choices' chunks as their tokens come, each chunk naming its choice,
as OpenAI does. A client that disconnects closes every job's iterator (the engine cancels the jobs).
"""

from __future__ import annotations

import asyncio
import json
import math
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import anyio
from fastapi import Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.types import Receive, Scope, Send

from . import openai_responses as out
from .openai_schema import ApiError, error_body
from .requests import Engine, Finished, Overloaded, SamplingParams, TokenEvent
from .tools import CallStream, ToolUse, finish_reason

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class ChoiceJob:
    """One choice to generate: its prompt, sampling parameters and (completions' echo) echoed prompt."""

    prompt_ids: tuple[int, ...]
    params: SamplingParams
    echo: out.Echo | None = None


class ClientGone(Exception):
    """The client disconnected before the answer was ready."""


class Choices:
    """The events of every choice's engine stream as they come: ``(choice index, event)``."""

    def __init__(self, streams: Sequence[AsyncIterator[Any]]):
        self.streams = list(streams)
        self.queue: asyncio.Queue[tuple[int, Any]] = asyncio.Queue()
        self.pumps = [asyncio.ensure_future(self._pump(i, s)) for i, s in enumerate(self.streams)]
        self.num_open = len(self.streams)

    async def _pump(self, index: int, stream: AsyncIterator[Any]) -> None:
        try:
            async for event in stream:
                self.queue.put_nowait((index, event))
        except Exception as e:  # raised to the reader, in order
            self.queue.put_nowait((index, e))
        self.queue.put_nowait((index, None))

    def __aiter__(self) -> Choices:
        return self

    async def __anext__(self) -> tuple[int, TokenEvent | Finished]:
        while self.num_open:
            index, event = await self.queue.get()
            if event is None:
                self.num_open -= 1
                continue
            if isinstance(event, Exception):
                raise event
            return index, event
        raise StopAsyncIteration

    async def aclose(self) -> None:
        for pump in self.pumps:
            pump.cancel()
        await asyncio.gather(*self.pumps, return_exceptions=True)
        for stream in self.streams:
            await _aclose(stream)


async def serve(
    engine: Engine, request: Request, jobs: Sequence[ChoiceJob], num_prompt_tokens: int, chat: bool,
    stream: bool, include_usage: bool, tools: ToolUse | None = None,
) -> Response:  # fmt: skip
    """Answer ``jobs``; with ``tools`` (chat) each choice's text is read for the tool calls it makes."""
    rid = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
    created, model = int(time.time()), engine.model_id
    names = tools.names if tools is not None else None
    answer = Answer(rid, created, model, chat, jobs, num_prompt_tokens, include_usage, engine.decode, names)
    choices = Choices(_generate_all(engine, jobs))
    try:
        first = await _unless_disconnected(request, _first_event(choices))
        if not stream:
            finished = await _unless_disconnected(request, _finish(choices, first, len(jobs)))
            await choices.aclose()
            return JSONResponse(answer.whole(finished))
    except BaseException as e:
        await choices.aclose()
        if isinstance(e, ClientGone):
            return Response(status_code=499)  # nobody reads it; nginx's "client closed request"
        raise
    return _SSEResponse(answer.sse(choices, first), choices)


def _generate_all(engine: Engine, jobs: Sequence[ChoiceJob]) -> list[AsyncIterator[Any]]:
    streams: list[AsyncIterator[Any]] = []
    try:
        for job in jobs:
            streams.append(engine.generate(job.prompt_ids, job.params))
    except Overloaded as e:
        _close_later(streams)
        raise _too_many(e) from None
    except ValueError as e:
        _close_later(streams)
        raise ApiError(400, str(e)) from None
    return streams


def _close_later(streams: Sequence[AsyncIterator[Any]]) -> None:
    for s in streams:
        asyncio.ensure_future(_aclose(s))


async def _first_event(choices: Choices) -> tuple[int, TokenEvent | Finished]:
    try:
        return await anext(choices)
    except Overloaded as e:
        raise _too_many(e) from None
    except ValueError as e:
        raise ApiError(400, str(e)) from None
    except StopAsyncIteration:
        raise ApiError(500, "the engine ended without an answer", type_="server_error") from None


async def _finish(choices: Choices, first: tuple[int, Any], num_choices: int) -> list[Finished]:
    done: dict[int, Finished] = {}
    index, event = first
    while True:
        if isinstance(event, Finished):
            done[index] = event
        if len(done) == num_choices:
            return [done[i] for i in range(num_choices)]
        try:
            index, event = await anext(choices)
        except StopAsyncIteration:
            raise ApiError(500, "the engine ended without an answer", type_="server_error") from None


def _too_many(e: Overloaded) -> ApiError:
    retry_s = max(float(e.retry_after_s), 0.0) if math.isfinite(e.retry_after_s) else 1.0
    headers = {"Retry-After": str(max(1, math.ceil(retry_s))), "retry-after-ms": str(int(retry_s * 1000))}
    return ApiError(429, str(e) or "server overloaded", code="rate_limit_exceeded", type_="rate_limit_error",
                    headers=headers)  # fmt: skip


async def _unless_disconnected(request: Request, awaitable: Awaitable[T]) -> T:
    """Await ``awaitable`` unless the client disconnects first (then cancel it, raise :class:`ClientGone`)."""
    result: list[T] = []
    error: list[BaseException] = []
    async with anyio.create_task_group() as tg:

        async def watch() -> None:
            while (await request.receive())["type"] != "http.disconnect":
                pass
            tg.cancel_scope.cancel()

        tg.start_soon(watch)
        try:
            result.append(await awaitable)
        except Exception as e:  # re-raised outside the task group, unwrapped
            error.append(e)
        tg.cancel_scope.cancel()
    if error:
        raise error[0]
    if not result:
        raise ClientGone
    return result[0]


async def _aclose(it: AsyncIterator[Any]) -> None:
    close = getattr(it, "aclose", None)
    if close is not None:
        with anyio.CancelScope(shield=True):
            await close()


def _sse_line(obj: Any) -> bytes:
    return b"data: " + (obj if isinstance(obj, bytes) else json.dumps(obj).encode()) + b"\n\n"


@dataclass(frozen=True, slots=True)
class Answer:
    """How one request's answer is written, whole or as a stream."""

    rid: str
    created: int
    model: str
    chat: bool
    jobs: Sequence[ChoiceJob]
    num_prompt_tokens: int
    include_usage: bool
    decode: out.Decode
    tool_names: tuple[str, ...] | None = None  # the tools whose calls are read from the text (None: no tools)

    def whole(self, finished: Sequence[Finished]) -> dict[str, Any]:
        echoes = [job.echo for job in self.jobs]
        return out.completion_response(self.rid, self.created, self.model, self.chat, finished, echoes,
                                       self.num_prompt_tokens, self.decode, self.tool_names)  # fmt: skip

    def _chunk(self, index: int, extra: dict[str, Any] | None = None, **kw: Any) -> bytes:
        body = out.chunk(self.rid, self.created, self.model, self.chat, index=index, include_usage=self.include_usage,
                         **kw)  # fmt: skip
        return _sse_line(body | (extra or {}))

    async def sse(self, choices: Choices, first: tuple[int, Any]) -> AsyncIterator[bytes]:
        """OpenAI's chunk stream: per choice (chat) a role delta or (echo) the prompt, one chunk per
        token with text or logprobs, with tools each call as ``tool_calls`` deltas (its id and name,
        then its arguments) once it is whole, a chunk with the finish reason (and the ``chainserve``
        route); then (``include_usage``) a usage chunk; ``[DONE]``."""
        started: set[int] = set()
        offsets = [0] * len(self.jobs)  # completions' text_offset so far, per choice
        names = self.tool_names
        calls = [CallStream(names) for _ in self.jobs] if names is not None else None
        finished: list[Finished] = []
        index, event = first
        try:
            while True:
                if index not in started:
                    started.add(index)
                    opening = self._opening(index, event, offsets)
                    if opening is not None:
                        yield opening
                if isinstance(event, TokenEvent) and (event.text or event.logprob is not None):
                    text = calls[index].push(event.text) if calls is not None else event.text
                    if text or event.logprob is not None:
                        yield self._chunk(index, text=text, logprobs=self._token_logprobs(index, event, offsets))
                elif isinstance(event, Finished):
                    finished.append(event)
                    reason: str = event.finish_reason
                    if calls is not None:
                        text, made = calls[index].finish()
                        if text:
                            yield self._chunk(index, text=text)
                        for k, call in enumerate(made):
                            for delta in out.tool_call_deltas(k, call):
                                yield self._chunk(index, tool_calls=[delta])
                        reason = finish_reason(reason, made)
                    yield self._chunk(index, {"chainserve": out.route(event)}, finish_reason=reason)
                    if len(finished) == len(self.jobs):
                        break
                index, event = await anext(choices)
        except StopAsyncIteration:
            yield _sse_line(error_body("the engine ended without an answer", "server_error"))
        except Exception as e:  # the 200 is already sent: report in-band, as vLLM does
            yield _sse_line(error_body(f"generation failed: {e}", "server_error"))
        else:
            if self.include_usage:
                body = out.chunk(self.rid, self.created, self.model, self.chat, include_usage=True)
                yield _sse_line(body | {"choices": [], "usage": out.usage(self.num_prompt_tokens, finished)})
        yield _sse_line(b"[DONE]")

    def _opening(self, index: int, event: Any, offsets: list[int]) -> bytes | None:
        """A choice's first chunk: chat's role delta, or completions' echoed prompt (none without echo)."""
        if self.chat:
            return self._chunk(index, role=True)
        echo = self.jobs[index].echo
        if echo is None:
            return None
        scores = event.prompt_logprobs
        logprobs = None
        if scores:
            logprobs = out.completion_logprobs(list(zip(echo.token_ids, scores, strict=True)), self.decode)
            offsets[index] = len("".join(logprobs["tokens"]))
        return self._chunk(index, text=echo.text, logprobs=logprobs)

    def _token_logprobs(self, index: int, event: TokenEvent, offsets: list[int]) -> dict[str, Any] | None:
        if event.logprob is None:
            return None
        if self.chat:
            return out.chat_logprobs([event.logprob], self.decode)
        logprobs = out.completion_logprobs([(event.token_id, event.logprob)], self.decode, offsets[index])
        offsets[index] += len(logprobs["tokens"][0])
        return logprobs


class _SSEResponse(StreamingResponse):
    """A stream that stops when the client disconnects, whatever the server's ASGI version, and then
    closes the engine's iterators (so the engine cancels the jobs)."""

    def __init__(self, content: AsyncIterator[bytes], choices: Choices) -> None:
        headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
        super().__init__(content, media_type="text/event-stream", headers=headers)
        self.choices = choices

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            async with anyio.create_task_group() as tg:

                async def stream() -> None:
                    try:
                        await self.stream_response(send)
                    except OSError:  # ASGI ≥ 2.4 servers report a gone client this way
                        pass
                    tg.cancel_scope.cancel()

                tg.start_soon(stream)
                await self.listen_for_disconnect(receive)
                tg.cancel_scope.cancel()
        finally:
            await _aclose(self.body_iterator)  # type: ignore[arg-type]
            await _aclose(self.choices)
