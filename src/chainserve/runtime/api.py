"""The OpenAI-compatible HTTP API of the orchestrator (paper §4.2: clients send requests to the central
orchestrator, which queues them and streams tokens back from the chain that serves them).

Routes: ``GET /v1/models`` (and ``/v1/models/{id}``), ``POST /v1/completions``,
``POST /v1/chat/completions`` (JSON or Server-Sent Events with ``stream: true``), and, outside ``/v1``
and never behind the API key, ``GET /health``, ``/plan``, ``/status``, ``/metrics`` and ``/``, the live
status page (``static/status.html``: one self-contained file that reads those three JSON/text routes, so it
needs no key either and never sees one; its Content-Security-Policy lets it load nothing from elsewhere).

Validation (every failure is a 4xx in OpenAI's ``{"error": {message, type, param, code}}`` format;
request shapes and unsupported parameters in :mod:`.openai_schema`):

* 400: malformed JSON, a body that is not an object, wrong types (strict: ``"5"`` is not an int),
  ``max_tokens`` / ``max_completion_tokens`` < 1 or prompt + max_tokens > ``engine.max_tokens``
  (param ``max_tokens``), temperature outside [0, 2], top_p outside (0, 1], more than 4 stop strings,
  an empty prompt or ``messages`` list, a prompt alone filling the context (param ``prompt`` /
  ``messages``), token ids outside the engine's ``vocab_size`` when it has one, ``ValueError`` from the
  engine (``encode``, ``chat_prompt``, :class:`.SamplingParams`, ``generate``).
* 401: ``api_key`` set and ``Authorization: Bearer <key>`` wrong or missing (``/v1/*`` only).
* 404: ``model`` given and not ``engine.model_id`` (a missing ``model`` is accepted); unknown routes.
* 429 with ``Retry-After`` (whole seconds) and ``retry-after-ms``: ``engine.generate`` raised
  :class:`.Overloaded`, at the call or at its first event.

Defaults: completions ``max_tokens`` 16, chat the rest of the context (as vLLM); both are cut to the
context left after the prompt. The first engine event is awaited before the response starts, so an
``Overloaded`` is a real 429 even for streams. A client that disconnects closes the engine's iterator
(the engine then cancels the job): while queued, while streaming, and while a non-streamed request runs.
Recording request outcomes in :class:`.RuntimeMetrics` is the orchestrator's job; the API only serves it.
"""

from __future__ import annotations

import hmac
import json
import math
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Sequence
from importlib import resources
from typing import Any, TypeVar

import anyio
from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import Receive, Scope, Send

from . import openai_schema as oa
from .metrics import RuntimeMetrics
from .requests import Engine, Finished, Overloaded, RequestFailed, SamplingParams, TokenEvent

T = TypeVar("T")
M = TypeVar("M", bound=BaseModel)
DEFAULT_COMPLETION_TOKENS = 16  # OpenAI's default for /v1/completions
#: The status page's headers: inline script and style only, fetches to this origin only, never cached.
STATUS_PAGE_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; "
    "connect-src 'self'; img-src 'self' data:",
    "Cache-Control": "no-cache",
}


class ClientGone(Exception):
    """The client disconnected before the answer was ready."""


def create_app(engine: Engine, metrics: RuntimeMetrics, api_key: str | None = None) -> FastAPI:
    """The API around ``engine``; ``metrics`` is served at ``/metrics``; with ``api_key`` every ``/v1``
    route needs ``Authorization: Bearer <api_key>``."""
    app = FastAPI(title="chainserve", docs_url=None, redoc_url=None)
    created_at = int(time.time())
    _install_error_handlers(app)

    async def check_key(request: Request) -> None:
        if api_key is None:
            return
        given = request.headers.get("authorization", "")
        scheme, _, token = given.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), api_key.encode()):
            raise oa.ApiError(401, "Incorrect or missing API key.", code="invalid_api_key")

    v1 = APIRouter(prefix="/v1", dependencies=[Depends(check_key)])

    def model_card() -> dict[str, Any]:
        return {
            "id": engine.model_id,
            "object": "model",
            "created": created_at,
            "owned_by": "chainserve",
            "max_model_len": engine.max_tokens,
        }

    @v1.get("/models")
    async def list_models() -> dict[str, Any]:
        return {"object": "list", "data": [model_card()]}

    @v1.get("/models/{model_id:path}")
    async def get_model(model_id: str) -> dict[str, Any]:
        _check_model(engine, model_id)
        return model_card()

    @v1.post("/completions")
    async def completions(request: Request) -> Response:
        req = _parse(oa.CompletionRequest, await request.body())
        _check_request(engine, req)
        prompt_ids = _prompt_ids(engine, req.prompt)
        params = _sampling(engine, req, len(prompt_ids), "prompt", "max_tokens", req.max_tokens)
        return await _serve(engine, request, prompt_ids, params, req, chat=False)

    @v1.post("/chat/completions")
    async def chat_completions(request: Request) -> Response:
        req = _parse(oa.ChatRequest, await request.body())
        _check_request(engine, req)
        prompt_ids = _engine_call(engine.chat_prompt, [m.as_dict() for m in req.messages])
        if not prompt_ids:
            raise oa.ApiError(400, "messages: the chat prompt is empty", param="messages")
        name, max_tokens = req.max_tokens_param
        params = _sampling(engine, req, len(prompt_ids), "messages", name, max_tokens)
        return await _serve(engine, request, prompt_ids, params, req, chat=True)

    app.include_router(v1)

    @app.get("/health")
    async def health() -> JSONResponse:
        """200 ``ok`` (every block server answers) or ``degraded`` (some are dead, but a complete chain
        of live ones still serves; ``dead`` names them), 503 ``unavailable`` when no chain can serve.
        A liveness or readiness probe takes a degraded service as up: it is answering requests."""
        try:
            status = engine.status()
        except Exception:  # a health probe must answer, not fail
            status = {"serving": False, "dead": []}
        if not status.get("serving"):
            return JSONResponse({"status": "unavailable", "dead": status.get("dead", [])}, status_code=503)
        if status.get("dead"):
            return JSONResponse({"status": "degraded", "dead": status["dead"]})
        return JSONResponse({"status": "ok"})

    @app.get("/plan")
    async def plan() -> dict[str, Any]:
        return engine.plan_dict()

    @app.get("/status")
    async def status() -> dict[str, Any]:
        return engine.status()

    @app.get("/metrics")
    async def render_metrics() -> Response:
        body, content_type = metrics.render()
        return Response(body, media_type=content_type)

    status_page = resources.files(__package__).joinpath("static", "status.html").read_bytes()

    @app.get("/", include_in_schema=False)
    async def status_html() -> HTMLResponse:
        return HTMLResponse(status_page, headers=STATUS_PAGE_HEADERS)

    return app


# --- validation ----------------------------------------------------------------------------------------


def _parse(model: type[M], body: bytes) -> M:
    try:
        return model.model_validate_json(body or b"null")
    except ValidationError as e:
        raise oa.from_validation_error(e) from None


def _check_model(engine: Engine, model: str | None) -> None:
    if model is not None and model != engine.model_id:
        raise oa.ApiError(404, f"The model `{model}` does not exist.", param="model", code="model_not_found")


def _check_request(engine: Engine, req: oa.CompletionRequest | oa.ChatRequest) -> None:
    _check_model(engine, req.model)
    bad = req.unsupported()
    if bad is not None:
        raise oa.ApiError(400, bad[1], param=bad[0])


def _engine_call(fn: Any, arg: Any) -> list[int]:
    try:
        return list(fn(arg))
    except ValueError as e:
        raise oa.ApiError(400, str(e)) from None


def _prompt_ids(engine: Engine, prompt: str | list[int]) -> list[int]:
    if not prompt:
        raise oa.ApiError(400, "prompt: must not be empty", param="prompt")
    if isinstance(prompt, str):
        ids = _engine_call(engine.encode, prompt)
        if not ids:
            raise oa.ApiError(400, "prompt: encodes to no tokens", param="prompt")
        return ids
    vocab_size = getattr(engine, "vocab_size", None)
    if isinstance(vocab_size, int) and max(prompt) >= vocab_size:
        raise oa.ApiError(400, f"prompt: token ids must be below the vocabulary size {vocab_size}", param="prompt")
    return prompt


def _sampling(
    engine: Engine, req: oa.CompletionRequest | oa.ChatRequest, num_prompt: int, prompt_param: str,
    max_param: str, max_tokens: int | None,
) -> SamplingParams:  # fmt: skip
    """Sampling parameters; prompt + max_tokens must fit in the engine's context."""
    room = engine.max_tokens - num_prompt
    if room < 1:
        raise oa.ApiError(
            400, f"{prompt_param}: {num_prompt} prompt tokens leave no room in the model's context of "
            f"{engine.max_tokens} tokens", param=prompt_param,
        )  # fmt: skip
    if max_tokens is None:
        max_tokens = min(room, DEFAULT_COMPLETION_TOKENS) if isinstance(req, oa.CompletionRequest) else room
    elif max_tokens > room:
        raise oa.ApiError(
            400, f"{max_param}: the model's context is {engine.max_tokens} tokens; the prompt has {num_prompt} "
            f"and {max_param} is {max_tokens} (at most {room} allowed)", param=max_param,
        )  # fmt: skip
    try:
        return SamplingParams(
            max_tokens=max_tokens,
            temperature=1.0 if req.temperature is None else req.temperature,
            top_p=1.0 if req.top_p is None else req.top_p,
            seed=req.seed,
            stop=tuple(req.stop),
            ignore_eos=bool(req.ignore_eos),
        )
    except ValueError as e:
        raise oa.ApiError(400, str(e), param=str(e).partition(":")[0] or None) from None


# --- serving -------------------------------------------------------------------------------------------


async def _serve(
    engine: Engine, request: Request, prompt_ids: Sequence[int], params: SamplingParams,
    req: oa.CompletionRequest | oa.ChatRequest, chat: bool,
) -> Response:  # fmt: skip
    rid = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
    created, model = int(time.time()), engine.model_id
    it = _generate(engine, prompt_ids, params)
    try:
        first = await _unless_disconnected(request, _first_event(it))
        if not req.stream:
            finished = first if isinstance(first, Finished) else await _unless_disconnected(request, _finish(it))
            await _aclose(it)
            return JSONResponse(oa.completion_response(rid, created, model, finished, chat))
    except BaseException as e:
        await _aclose(it)
        if isinstance(e, ClientGone):
            return Response(status_code=499)  # nobody reads it; nginx's "client closed request"
        raise
    events = _sse(it, first, rid, created, model, chat, req.include_usage)
    return _SSEResponse(events, it)


def _generate(engine: Engine, prompt_ids: Sequence[int], params: SamplingParams) -> AsyncIterator[Any]:
    try:
        return engine.generate(prompt_ids, params)
    except Overloaded as e:
        raise _too_many(e) from None
    except ValueError as e:
        raise oa.ApiError(400, str(e)) from None


async def _first_event(it: AsyncIterator[Any]) -> TokenEvent | Finished:
    try:
        return await anext(it)
    except Overloaded as e:
        raise _too_many(e) from None
    except ValueError as e:
        raise oa.ApiError(400, str(e)) from None
    except StopAsyncIteration:
        raise oa.ApiError(500, "the engine ended without an answer", type_="server_error") from None


async def _finish(it: AsyncIterator[Any]) -> Finished:
    async for event in it:
        if isinstance(event, Finished):
            return event
    raise oa.ApiError(500, "the engine ended without an answer", type_="server_error")


def _too_many(e: Overloaded) -> oa.ApiError:
    retry_s = max(float(e.retry_after_s), 0.0) if math.isfinite(e.retry_after_s) else 1.0
    headers = {"Retry-After": str(max(1, math.ceil(retry_s))), "retry-after-ms": str(int(retry_s * 1000))}
    return oa.ApiError(429, str(e) or "server overloaded", code="rate_limit_exceeded", type_="rate_limit_error",
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


async def _sse(
    it: AsyncIterator[Any], first: TokenEvent | Finished, rid: str, created: int, model: str, chat: bool,
    include_usage: bool,
) -> AsyncIterator[bytes]:  # fmt: skip
    """OpenAI's chunk stream: (chat) a role delta, one chunk per non-empty token text, a chunk with the
    finish reason (and the ``chainserve`` route), (``include_usage``) a usage chunk, ``[DONE]``."""
    base = (rid, created, model, chat)
    if chat:
        yield _sse_line(oa.chunk(*base, role=True, include_usage=include_usage))
    event: Any = first
    try:
        while not isinstance(event, Finished):
            if isinstance(event, TokenEvent) and event.text:
                yield _sse_line(oa.chunk(*base, text=event.text, include_usage=include_usage))
            event = await anext(it)
    except StopAsyncIteration:
        yield _sse_line(oa.error_body("the engine ended without an answer", "server_error"))
    except Exception as e:  # the 200 is already sent: report in-band, as vLLM does
        yield _sse_line(oa.error_body(f"generation failed: {e}", "server_error"))
    else:
        done = oa.chunk(*base, finish_reason=event.finish_reason, include_usage=include_usage)
        yield _sse_line(done | {"chainserve": oa.route(event)})
        if include_usage:
            yield _sse_line({**oa.chunk(*base, include_usage=True), "choices": [], "usage": oa.usage(event)})
    yield _sse_line(b"[DONE]")


class _SSEResponse(StreamingResponse):
    """A stream that stops when the client disconnects, whatever the server's ASGI version, and then
    closes the engine's iterator (so the engine cancels the job)."""

    def __init__(self, content: AsyncIterator[bytes], engine_it: AsyncIterator[Any]) -> None:
        headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
        super().__init__(content, media_type="text/event-stream", headers=headers)
        self.engine_it = engine_it

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
            await _aclose(self.engine_it)


def _install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(oa.ApiError)
    async def api_error(_: Request, e: oa.ApiError) -> JSONResponse:
        return JSONResponse(e.body(), status_code=e.status, headers=e.headers)

    @app.exception_handler(RequestFailed)
    async def request_failed(_: Request, e: RequestFailed) -> JSONResponse:
        code = "timeout" if e.status == 504 else "unavailable"
        headers = {"Retry-After": "1"} if e.status == 503 else None  # clients retry (the openai client does)
        return JSONResponse(oa.error_body(str(e), "server_error", None, code), status_code=e.status, headers=headers)

    @app.exception_handler(RequestValidationError)
    async def validation_error(_: Request, e: RequestValidationError) -> JSONResponse:
        errors = e.errors()
        loc = [str(x) for x in errors[0]["loc"] if x != "body"] if errors else []
        msg = f"{'.'.join(loc) or 'request'}: {errors[0]['msg'] if errors else 'invalid'}"
        return JSONResponse(oa.error_body(msg, "invalid_request_error", loc[0] if loc else None), status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, e: StarletteHTTPException) -> JSONResponse:
        type_ = "invalid_request_error" if e.status_code < 500 else "server_error"
        return JSONResponse(oa.error_body(str(e.detail), type_), status_code=e.status_code, headers=e.headers)

    @app.exception_handler(Exception)
    async def internal_error(_: Request, e: Exception) -> JSONResponse:
        return JSONResponse(oa.error_body(f"internal error: {type(e).__name__}", "server_error"), status_code=500)
