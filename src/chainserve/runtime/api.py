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
  ``max_tokens`` / ``max_completion_tokens`` < 1 (0 allowed with echo) or prompt + max_tokens >
  ``engine.max_tokens``, the cache one job holds (param ``max_tokens``), temperature outside [0, 2],
  top_p outside (0, 1], more than 4 stop strings, an empty prompt or ``messages`` list, a prompt alone
  filling the context (param ``prompt`` / ``messages``), token ids outside the engine's ``vocab_size``
  when it has one, more than 128 choices (n × prompts; param ``n``), a ``response_format`` that is not
  a valid JSON schema, ``tools`` / ``tool_choice`` that :func:`.tools.tool_use` refuses (a
  ``required`` or named choice with a ``response_format`` too), ``ValueError`` from the engine
  (``encode``, ``chat_prompt``, :class:`.SamplingParams`, ``generate``: e.g. structured output on a
  backend without a tokenizer).
* 401: ``api_key`` set and ``Authorization: Bearer <key>`` wrong or missing (``/v1/*`` only).
* 404: ``model`` given and not ``engine.model_id`` (a missing ``model`` is accepted); unknown routes.
* 429 with ``Retry-After`` (whole seconds) and ``retry-after-ms``: ``engine.generate`` raised
  :class:`.Overloaded`, at the call or at its first event.

Chat with ``tools`` (:mod:`.tools`): the tools reach ``engine.chat_prompt``; ``required`` and a named
function constrain every token with the calls' grammar; every choice but ``none`` reads the answer's
text for calls (:mod:`.openai_serving`).

Defaults: completions ``max_tokens`` 16, chat the rest of the context (as vLLM); both are cut to the
context left after the prompt. Each choice (n per prompt) is one engine job (:mod:`.openai_serving`);
with a ``seed``, choice j samples with ``seed + j`` (as vLLM), so choices differ and each is
reproducible. A client that disconnects closes the engine's iterators (the engine then cancels the
jobs): while queued, while streaming, and while a non-streamed request runs. Recording request
outcomes in :class:`.RuntimeMetrics` is the orchestrator's job; the API only serves it.
"""

from __future__ import annotations

import hmac
import time
from collections.abc import Callable
from dataclasses import replace
from importlib import resources
from typing import Any, TypeVar

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from pydantic import BaseModel, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from . import openai_schema as oa
from .constraints import grammar_for
from .metrics import RuntimeMetrics
from .openai_responses import Echo
from .openai_serving import ChoiceJob, serve
from .requests import Engine, RequestFailed, SamplingParams
from .tools import ToolUse, tool_use

M = TypeVar("M", bound=BaseModel)
T = TypeVar("T")
DEFAULT_COMPLETION_TOKENS = 16  # OpenAI's default for /v1/completions
#: The status page's headers: inline script and style only, fetches to this origin only, never cached.
STATUS_PAGE_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; "
    "connect-src 'self'; img-src 'self' data:",
    "Cache-Control": "no-cache",
}


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
        _check_request(engine, req, len(req.prompt))
        jobs, num_prompt_tokens = [], 0
        grammar = _grammar(req.response_format, None)
        for prompt in req.prompt:
            ids = _prompt_ids(engine, prompt)
            params = _sampling(engine, req, len(ids), "prompt", "max_tokens", req.max_tokens, grammar)
            echo = Echo(engine.decode(ids) if isinstance(prompt, list) else prompt, tuple(ids)) if req.echo else None
            jobs += [ChoiceJob(tuple(ids), p, echo) for p in _choices(params, req.n)]
            num_prompt_tokens += len(ids)
        return await serve(engine, request, jobs, num_prompt_tokens, False, bool(req.stream), req.include_usage)

    @v1.post("/chat/completions")
    async def chat_completions(request: Request) -> Response:
        req = _parse(oa.ChatRequest, await request.body())
        _check_request(engine, req, 1)
        use = _user_error(tool_use, req.tools, req.tool_choice, req.parallel_tool_calls)
        tools = use.tools if use is not None else ()
        prompt_ids = _engine_call(lambda ms: engine.chat_prompt(ms, tools), [m.as_dict() for m in req.messages])
        if not prompt_ids:
            raise oa.ApiError(400, "messages: the chat prompt is empty", param="messages")
        name, max_tokens = req.max_tokens_param
        grammar = _grammar(req.response_format, use)
        params = _sampling(engine, req, len(prompt_ids), "messages", name, max_tokens, grammar)
        jobs = [ChoiceJob(tuple(prompt_ids), p) for p in _choices(params, req.n)]
        calls = use if use is not None and use.parses_calls else None
        return await serve(engine, request, jobs, len(prompt_ids), True, bool(req.stream), req.include_usage, calls)

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


def _check_request(engine: Engine, req: oa.CompletionRequest | oa.ChatRequest, num_prompts: int) -> None:
    _check_model(engine, req.model)
    bad = req.unsupported()
    if bad is not None:
        raise oa.ApiError(400, bad[1], param=bad[0])
    if num_prompts * (req.n or 1) > oa.MAX_CHOICES:
        raise oa.ApiError(
            400, f"n: {num_prompts} prompts × n={req.n or 1} is more than {oa.MAX_CHOICES} choices", param="n"
        )


def _user_error(fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """``fn(*args, **kwargs)``; its ``ValueError`` (``"param: message"``) is a 400 naming the parameter."""
    try:
        return fn(*args, **kwargs)
    except ValueError as e:
        raise oa.ApiError(400, str(e), param=str(e).partition(":")[0].partition("[")[0] or None) from None


def _grammar(response_format: dict[str, Any] | None, use: ToolUse | None) -> str | None:
    """The grammar every token obeys: a forced tool call's, or the response format's."""
    forced = use.grammar() if use is not None else None
    if forced is None:
        return _user_error(grammar_for, response_format)
    if response_format is not None and response_format.get("type") != "text":
        raise oa.ApiError(400, "response_format: cannot be combined with a required or named tool_choice",
                          param="response_format")  # fmt: skip
    return forced


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
    if max(prompt) >= engine.vocab_size:
        raise oa.ApiError(
            400, f"prompt: token ids must be below the vocabulary size {engine.vocab_size}", param="prompt"
        )
    return prompt


def _sampling(
    engine: Engine, req: oa.CompletionRequest | oa.ChatRequest, num_prompt: int, prompt_param: str,
    max_param: str, max_tokens: int | None, grammar: str | None,
) -> SamplingParams:  # fmt: skip
    """Sampling parameters; prompt + max_tokens must fit in the engine's context (the cache a job holds)."""
    room = engine.max_tokens - num_prompt
    if room < (0 if max_tokens == 0 else 1):
        raise oa.ApiError(
            400, f"{prompt_param}: {num_prompt} prompt tokens leave no room in the model's context of "
            f"{engine.max_tokens} tokens", param=prompt_param,
        )  # fmt: skip
    if max_tokens is None:  # up to the context, within what a chain's cache holds (paged KV: reserved whole)
        room = max(min(room, engine.max_job_tokens - num_prompt), 1)
        max_tokens = min(room, DEFAULT_COMPLETION_TOKENS) if isinstance(req, oa.CompletionRequest) else room
    elif max_tokens > room:
        raise oa.ApiError(
            400, f"{max_param}: the model's context is {engine.max_tokens} tokens; the prompt has {num_prompt} "
            f"and {max_param} is {max_tokens} (at most {room} allowed)", param=max_param,
        )  # fmt: skip
    chat = isinstance(req, oa.ChatRequest)
    if chat:
        logprobs = (req.top_logprobs or 0) if req.logprobs else None
    else:
        logprobs = req.logprobs
    return _user_error(
        SamplingParams,
        max_tokens=max_tokens,
        temperature=1.0 if req.temperature is None else req.temperature,
        top_p=1.0 if req.top_p is None else req.top_p,
        seed=req.seed,
        stop=tuple(req.stop),
        ignore_eos=bool(req.ignore_eos),
        presence_penalty=req.presence_penalty or 0.0,
        frequency_penalty=req.frequency_penalty or 0.0,
        repetition_penalty=1.0 if req.repetition_penalty is None else req.repetition_penalty,
        min_tokens=min(req.min_tokens or 0, max_tokens),
        logprobs=logprobs,
        prompt_logprobs=not chat and bool(req.echo) and logprobs is not None,
        grammar=grammar,
    )


def _choices(params: SamplingParams, n: int | None) -> list[SamplingParams]:
    """The n choices' parameters: with a seed, choice j samples with ``seed + j`` (as vLLM)."""
    if params.seed is None:
        return [params] * (n or 1)
    return [replace(params, seed=params.seed + j) for j in range(n or 1)]


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
