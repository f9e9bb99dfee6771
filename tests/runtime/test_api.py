"""The OpenAI-compatible API (paper §4.2's client side) against a fake engine: no torch, no processes.

The official ``openai`` client talks to the app in-process (Starlette's TestClient as its HTTP client);
disconnects use a real uvicorn server on a free 127.0.0.1 port in a thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import threading
import time
from collections.abc import AsyncIterator, Sequence
from typing import Any

import httpx
import openai
import pytest
import uvicorn
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from chainserve.runtime.api import create_app
from chainserve.runtime.metrics import RuntimeMetrics
from chainserve.runtime.requests import Finished, Overloaded, SamplingParams, TokenEvent
from chainserve.runtime.tools import Tool

MODEL = "fake-model"
WORD = {"type": "object", "properties": {"word": {"type": "string"}}, "required": ["word"]}
TOOL = {"type": "function", "function": {"name": "lookup", "description": "Look a word up", "parameters": WORD}}
CALL = {"id": "call_1", "type": "function", "function": {"name": "lookup", "arguments": '{"word": "chain"}'}}
METRIC_NAMES = (
    "num_requests_running", "num_requests_waiting", "kv_cache_usage_perc", "chain_busy_slots", "chain_capacity_slots",
    "time_to_first_token_seconds", "time_per_output_token_seconds", "e2e_request_latency_seconds",
    "request_queue_time_seconds", "request_success_total", "request_failure_total", "prompt_tokens_total",
    "generation_tokens_total",
)  # fmt: skip


class FakeEngine:
    """Engine protocol, echo style: byte tokenizer; output token i is prompt token i (cycling when
    ``ignore_eos``), EOS after one pass over the prompt; stop strings cut the text. Records every job:
    ``closed`` gets True when the job finished, False when its iterator was closed before that."""

    model_id = MODEL
    max_tokens = 64
    max_job_tokens = 64
    vocab_size = 256

    def __init__(self, metrics: RuntimeMetrics | None = None) -> None:
        self.metrics = metrics
        self.overloaded: str | None = None  # "call": generate() raises; "first": the first event raises
        self.delay_s = 0.0  # between tokens
        self.queue_s = 0.0  # before the first token
        self.fail_after: int | None = None  # raise RuntimeError after this many tokens
        self.dead: list[str] = []
        self.serving = True
        self.closed: list[bool] = []
        self.params: list[SamplingParams] = []

    def encode(self, text: str) -> list[int]:
        return list(text.encode())

    def decode(self, token_ids: Sequence[int]) -> str:
        return bytes(token_ids).decode(errors="replace")

    def chat_prompt(self, messages: Sequence[dict[str, Any]], tools: tuple[Tool, ...] = ()) -> list[int]:
        if any(m["content"] == "boom" for m in messages):
            raise ValueError("messages: the chat template refuses 'boom'")
        self.tools = tools
        return self.encode("".join(f"<{m['role']}>{m['content']}" for m in messages) + "<assistant>")

    def generate(self, prompt_ids: Sequence[int], params: SamplingParams) -> AsyncIterator[TokenEvent | Finished]:
        if self.overloaded == "call":
            raise Overloaded("queue full", retry_after_s=2.5)
        self.params.append(params)
        return self._run(list(prompt_ids), params)

    @staticmethod
    def expected(prompt_ids: list[int], params: SamplingParams) -> tuple[list[int], str, str]:
        tokens: list[int] = []
        for i in range(params.max_tokens):
            if i == len(prompt_ids) and not params.ignore_eos:
                break
            tokens.append(prompt_ids[i % len(prompt_ids)])
            text = bytes(tokens).decode(errors="replace")
            cuts = [text.find(s) for s in params.stop if s in text]
            if cuts:
                return tokens, text[: min(cuts)], "stop"
        return tokens, bytes(tokens).decode(errors="replace"), "length" if len(tokens) == params.max_tokens else "stop"

    async def _run(self, prompt_ids: list[int], params: SamplingParams) -> AsyncIterator[TokenEvent | Finished]:
        if self.overloaded == "first":
            raise Overloaded("queue full", retry_after_s=0.2)
        completed = False
        try:
            await asyncio.sleep(self.queue_s)
            tokens, text, reason = self.expected(prompt_ids, params)
            sent = 0
            for k, tok in enumerate(tokens):
                if self.fail_after is not None and k == self.fail_after:
                    raise RuntimeError("block server lost")
                await asyncio.sleep(self.delay_s)
                if self.metrics is not None:  # what the orchestrator does, token by token
                    self.metrics.observe_generated()
                upto = min(len(bytes(tokens[: k + 1]).decode(errors="replace")), len(text))
                yield TokenEvent(tok, text[sent:upto])
                sent = max(sent, upto)
            f = Finished(reason, len(prompt_ids), len(tokens), text, chain=1, hops=(("s0", 1, 16), ("s1", 17, 32)),
                         queued_s=self.queue_s, ttft_s=0.01, e2e_s=0.02)  # fmt: skip
            if self.metrics is not None:  # what the orchestrator does
                self.metrics.observe_finished(f, 0.001 if len(tokens) > 1 else None)
            completed = True
            yield f
        finally:
            self.closed.append(completed)

    def plan_dict(self) -> dict[str, Any]:
        return {"c": 2, "chains": [{"servers": ["s0", "s1"], "capacity": 2}]}

    def status(self) -> dict[str, Any]:
        return {
            "healthy": not self.dead,
            "serving": self.serving,
            "dead": self.dead,
            "num_running": 0,
            "num_waiting": 0,
        }


@pytest.fixture
def engine() -> FakeEngine:
    return FakeEngine()


@pytest.fixture
def metrics() -> RuntimeMetrics:
    return RuntimeMetrics()


@pytest.fixture
def http(engine, metrics) -> TestClient:
    engine.metrics = metrics
    with TestClient(create_app(engine, metrics)) as client:
        yield client


@pytest.fixture
def client(http) -> openai.OpenAI:
    return openai.OpenAI(base_url="http://test/v1", api_key="none", http_client=http, max_retries=0)


def sse_events(raw: str) -> list[Any]:
    assert raw.endswith("data: [DONE]\n\n")
    parts = [p for p in raw.split("\n\n") if p]
    assert all(p.startswith("data: ") for p in parts)
    return [json.loads(p[6:]) for p in parts[:-1]]


# --- happy paths -----------------------------------------------------------------------------------------


def test_models(client, http):
    models = client.models.list()
    assert [m.id for m in models.data] == [MODEL]
    assert client.models.retrieve(MODEL).id == MODEL
    assert http.get("/v1/models").json()["object"] == "list"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("other")


def test_completion_matches_the_engine(client, http):
    out = client.completions.create(model=MODEL, prompt="hello world", max_tokens=5)
    assert out.object == "text_completion" and out.model == MODEL
    assert out.choices[0].text == "hello" and out.choices[0].finish_reason == "length"
    assert (out.usage.prompt_tokens, out.usage.completion_tokens, out.usage.total_tokens) == (11, 5, 16)
    raw = http.post("/v1/completions", json={"prompt": "hi", "max_tokens": 5}).json()
    assert raw["choices"][0]["text"] == "hi" and raw["choices"][0]["finish_reason"] == "stop"  # EOS
    assert raw["chainserve"]["chain"] == 1
    assert raw["chainserve"]["hops"][0] == {"server": "s0", "first_block": 1, "last_block": 16}
    assert set(raw["chainserve"]) >= {"queued_s", "ttft_s", "e2e_s"}


@pytest.mark.parametrize("prompt", ["abcdef", ["abcdef"], list(b"abcdef"), [list(b"abcdef")]])
def test_prompt_forms(client, prompt):
    assert client.completions.create(model=MODEL, prompt=prompt, max_tokens=3).choices[0].text == "abc"


def test_defaults(http, engine):
    out = http.post("/v1/completions", json={"prompt": "x" * 40, "ignore_eos": True}).json()
    assert out["usage"]["completion_tokens"] == 16  # OpenAI's default
    http.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "x"}]})
    assert engine.params[-1].max_tokens == engine.max_tokens - len(b"<user>x<assistant>")  # rest of the context
    out = http.post("/v1/completions", json={"prompt": "x" * 60, "ignore_eos": True}).json()
    assert out["usage"]["completion_tokens"] == 4  # default cut to the room left
    p = engine.params[-1]
    assert (p.temperature, p.top_p, p.seed, p.stop) == (1.0, 1.0, None, ())


def test_sampling_parameters_reach_the_engine(client, engine):
    client.completions.create(model=MODEL, prompt="ab", temperature=0, top_p=0.5, seed=7, stop=["x", ""],
                              extra_body={"ignore_eos": True})  # fmt: skip
    p = engine.params[-1]
    assert (p.temperature, p.top_p, p.seed, p.stop, p.ignore_eos) == (0, 0.5, 7, ("x",), True)


def test_chat(client):
    out = client.chat.completions.create(
        model=MODEL, messages=[{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}],
        max_completion_tokens=8,
    )  # fmt: skip
    assert out.object == "chat.completion"
    assert out.choices[0].message.role == "assistant" and out.choices[0].message.content == "<system>"
    assert out.usage.completion_tokens == 8


def test_chat_content_parts_and_developer_role(client):
    parts = [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]
    out = client.chat.completions.create(model=MODEL, messages=[{"role": "developer", "content": parts}],
                                         max_tokens=30)  # fmt: skip
    assert out.choices[0].message.content == "<system>a\nb<assistant>"
    assert out.choices[0].finish_reason == "stop"


@pytest.mark.parametrize("stop", ["o w", ["zz", "o w"]])
def test_stop_strings(client, stop):
    kw = dict(model=MODEL, prompt="hello world", max_tokens=11, stop=stop)
    out = client.completions.create(**kw)
    assert out.choices[0].text == "hell" and out.choices[0].finish_reason == "stop"
    streamed = "".join(c.choices[0].text for c in client.completions.create(**kw, stream=True) if c.choices)
    assert streamed == "hell"


@pytest.mark.parametrize("ignore_eos", [False, True])
def test_streamed_completion_equals_non_streamed(client, ignore_eos):
    kw = dict(model=MODEL, prompt="the quick brown fox", max_tokens=30, extra_body={"ignore_eos": ignore_eos})
    whole = client.completions.create(**kw)
    chunks = list(client.completions.create(**kw, stream=True, stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == whole.choices[0].text
    assert chunks[-2].choices[0].finish_reason == whole.choices[0].finish_reason
    assert chunks[-1].choices == [] and chunks[-1].usage == whole.usage
    assert all(c.object == "text_completion" and c.id == chunks[0].id for c in chunks)


def test_streamed_chat_equals_non_streamed(client):
    kw = dict(model=MODEL, messages=[{"role": "user", "content": "tell me"}], max_tokens=12)
    whole = client.chat.completions.create(**kw)
    chunks = list(client.chat.completions.create(**kw, stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == whole.choices[0].message.content
    assert chunks[-2].choices[0].finish_reason == "length" and chunks[-2].choices[0].delta.content is None
    assert chunks[-1].usage.total_tokens == whole.usage.total_tokens
    assert all(c.object == "chat.completion.chunk" for c in chunks)


# --- tools (issue 28): the fake engine echoes its prompt, so a prompt holding a call is an answer with one --


@pytest.fixture
def long_context(engine):
    engine.max_tokens = engine.max_job_tokens = 1024  # room to echo a prompt holding calls


def test_tools_reach_the_prompt_and_a_call_in_the_answer_is_a_tool_call(long_context, client, engine):
    said = '<tool_call>\n{"name": "lookup", "arguments": {"word": "chain"}}\n</tool_call>'
    out = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": said}], tools=[TOOL],
                                         max_tokens=400)  # fmt: skip
    assert [t.name for t in engine.tools] == ["lookup"] and engine.params[-1].grammar is None  # auto: free
    choice = out.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content == "<user>"
    (call,) = choice.message.tool_calls
    assert call.type == "function" and call.id.startswith("call_") and call.function.name == "lookup"
    assert json.loads(call.function.arguments) == {"word": "chain"}


def test_tool_choice_none_and_unknown_names_answer_text(long_context, client):
    said = '<tool_call>\n{"name": "other", "arguments": {}}\n</tool_call>'
    for choice in ("auto", "none"):
        out = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": said}], tools=[TOOL],
                                             tool_choice=choice, max_tokens=400)  # fmt: skip
        assert out.choices[0].finish_reason == "stop" and out.choices[0].message.tool_calls is None
        assert out.choices[0].message.content == f"<user>{said}<assistant>"


@pytest.mark.parametrize("choice", ["required", {"type": "function", "function": {"name": "lookup"}}])
def test_required_and_named_tool_choices_generate_under_a_grammar(client, engine, choice):
    client.chat.completions.create(model=MODEL, messages=MSG, tools=[TOOL], tool_choice=choice, max_tokens=5)
    grammar = engine.params[-1].grammar
    assert grammar is not None and "lookup" in grammar and "<tool_call>" in grammar


def test_streamed_tool_calls_assemble_to_the_whole_answer(long_context, client):
    said = 'Let me look.\n<tool_call>\n{"name": "lookup", "arguments": {"word": "a"}}\n</tool_call>\n' \
           '<tool_call>\n{"name": "lookup", "arguments": {"word": "b"}}\n</tool_call>'  # fmt: skip
    kw = dict(model=MODEL, messages=[{"role": "user", "content": said}], tools=[TOOL], max_tokens=400)
    whole = client.chat.completions.create(**kw).choices[0]
    chunks = list(client.chat.completions.create(**kw, stream=True))
    content = "".join(c.choices[0].delta.content or "" for c in chunks)
    calls: dict[int, dict[str, str]] = {}
    for c in chunks:
        for d in c.choices[0].delta.tool_calls or []:
            call = calls.setdefault(d.index, {"name": "", "arguments": ""})
            call["name"] += d.function.name or ""
            call["arguments"] += d.function.arguments or ""
    assert content == whole.message.content == "<user>Let me look."
    assert [calls[i] for i in sorted(calls)] == [
        {"name": c.function.name, "arguments": c.function.arguments} for c in whole.message.tool_calls
    ]
    assert len(calls) == 2 and chunks[-1].choices[0].finish_reason == whole.finish_reason == "tool_calls"


def test_a_history_with_tool_calls_and_results_is_accepted(long_context, client, engine):
    history = [*MSG, {"role": "assistant", "content": None, "tool_calls": [CALL]},
               {"role": "tool", "tool_call_id": "call_1", "content": "a chain is a sequence"}]  # fmt: skip
    out = client.chat.completions.create(model=MODEL, messages=history, tools=[TOOL], max_tokens=20)
    assert out.choices[0].finish_reason == "length" and out.choices[0].message.content.startswith("<user>")


def test_raw_stream_shape(http):
    r = http.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "ab"}], "max_tokens": 2,
                                               "stream": True})  # fmt: skip
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    events = sse_events(r.text)
    assert events[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert [e["choices"][0]["delta"].get("content") for e in events[1:-1]] == ["<", "u"]
    assert events[-1]["choices"][0] == {"index": 0, "delta": {}, "logprobs": None, "finish_reason": "length"}
    assert "usage" not in events[-1] and events[-1]["chainserve"]["chain"] == 1


# --- errors ---------------------------------------------------------------------------------------------

CHAT = "/v1/chat/completions"
COMP = "/v1/completions"
MSG = [{"role": "user", "content": "hi"}]
BAD = [  # (path, body, status, param)
    (COMP, {"prompt": "hi", "max_tokens": 0}, 400, "max_tokens"),
    (COMP, {"prompt": "hi", "max_tokens": -3}, 400, "max_tokens"),
    (COMP, {"prompt": "hi", "max_tokens": 10**12}, 400, "max_tokens"),
    (COMP, {"prompt": "hi", "max_tokens": 63}, 400, "max_tokens"),  # 2 + 63 > 64
    (COMP, {"prompt": "hi", "max_tokens": "5"}, 400, "max_tokens"),
    (COMP, {"prompt": "hi", "max_tokens": 1.5}, 400, "max_tokens"),
    (COMP, {"prompt": "hi", "max_tokens": True}, 400, "max_tokens"),
    (CHAT, {"messages": MSG, "max_tokens": 10**12}, 400, "max_tokens"),
    (CHAT, {"messages": MSG, "max_completion_tokens": 10**12}, 400, "max_completion_tokens"),
    (COMP, {"prompt": "hi", "temperature": 2.5}, 400, "temperature"),
    (COMP, {"prompt": "hi", "temperature": -0.1}, 400, "temperature"),
    (CHAT, {"messages": MSG, "top_p": 0}, 400, "top_p"),
    (CHAT, {"messages": MSG, "top_p": 1.01}, 400, "top_p"),
    (COMP, {"prompt": "hi", "seed": 2**64}, 400, "seed"),
    (COMP, {"prompt": "hi", "stop": ["a", "b", "c", "d", "e"]}, 400, "stop"),
    (COMP, {"prompt": "hi", "stop": 3}, 400, "stop"),
    (COMP, {"prompt": ""}, 400, "prompt"),
    (COMP, {"prompt": []}, 400, "prompt"),
    (COMP, {"prompt": [""]}, 400, "prompt"),
    (COMP, {"prompt": ["a", [1]]}, 400, "prompt"),
    (COMP, {"prompt": [[1], "b"]}, 400, "prompt"),
    (COMP, {"prompt": ["a", ""]}, 400, "prompt"),
    (COMP, {"prompt": [1, -2]}, 400, "prompt"),
    (COMP, {"prompt": [1, 300]}, 400, "prompt"),  # beyond vocab_size
    (COMP, {"prompt": [1, True]}, 400, "prompt"),
    (COMP, {"prompt": "x" * 64}, 400, "prompt"),  # fills the context
    (COMP, {"prompt": 5}, 400, "prompt"),
    (COMP, {}, 400, "prompt"),
    (COMP, {"prompt": "hi", "n": 0}, 400, "n"),
    (COMP, {"prompt": "hi", "n": 129}, 400, "n"),
    (COMP, {"prompt": ["hi"] * 65, "n": 2}, 400, "n"),  # 130 choices
    (COMP, {"prompt": "hi", "best_of": 3}, 400, "best_of"),
    (COMP, {"prompt": "hi", "logprobs": 21}, 400, "logprobs"),
    (COMP, {"prompt": "hi", "logprobs": True}, 400, "logprobs"),
    (COMP, {"prompt": "x" * 65, "echo": True, "max_tokens": 0}, 400, "prompt"),  # over the context
    (COMP, {"prompt": "hi", "min_tokens": -1}, 400, "min_tokens"),
    (COMP, {"prompt": "hi", "repetition_penalty": 0}, 400, "repetition_penalty"),
    (COMP, {"prompt": "hi", "frequency_penalty": -2.5}, 400, "frequency_penalty"),
    (COMP, {"prompt": "hi", "response_format": {"type": "xml"}}, 400, "response_format"),
    (COMP, {"prompt": "hi", "stream_options": {"include_usage": True}}, 400, "stream_options"),
    (COMP, {"prompt": "hi", "stream": "yes"}, 400, "stream"),
    (CHAT, {"messages": MSG, "presence_penalty": 2.5}, 400, "presence_penalty"),
    (CHAT, {"messages": MSG, "top_logprobs": 2}, 400, "top_logprobs"),  # without logprobs: true
    (CHAT, {"messages": MSG, "logprobs": True, "top_logprobs": 21}, 400, "top_logprobs"),
    (CHAT, {"messages": MSG, "max_tokens": 0}, 400, "max_tokens"),
    (CHAT, {"messages": MSG, "tools": [{"type": "function"}]}, 400, "tools"),
    (CHAT, {"messages": MSG, "tools": [TOOL, TOOL]}, 400, "tools"),  # one name twice
    (
        CHAT,
        {"messages": MSG, "tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": 3}}}]},
        400,
        "tools",
    ),  # fmt: skip
    (CHAT, {"messages": MSG, "tool_choice": "required"}, 400, "tool_choice"),  # no tools
    (CHAT, {"messages": MSG, "tools": [TOOL], "tool_choice": "sometimes"}, 400, "tool_choice"),
    (
        CHAT,
        {"messages": MSG, "tools": [TOOL], "tool_choice": {"type": "function", "function": {"name": "g"}}},
        400,
        "tool_choice",
    ),  # fmt: skip
    (CHAT, {"messages": MSG, "tools": [TOOL], "tool_choice": 5}, 400, "tool_choice"),
    (
        CHAT,
        {"messages": MSG, "tools": [TOOL], "tool_choice": "required", "response_format": {"type": "json_object"}},
        400,
        "response_format",
    ),  # fmt: skip
    (CHAT, {"messages": [{"role": "user", "content": "x", "tool_calls": [CALL]}]}, 400, "messages"),
    (
        CHAT,
        {"messages": [{"role": "assistant", "tool_calls": [{"id": "c1", "function": {"name": "f"}}]}]},
        400,
        "messages",
    ),  # fmt: skip
    (
        CHAT,
        {"messages": MSG, "response_format": {"type": "json_schema", "json_schema": {"name": "x"}}},
        400,
        "response_format",
    ),
    (
        CHAT,
        {"messages": MSG, "response_format": {"type": "json_schema", "json_schema": {"schema": {"type": 3}}}},
        400,
        "response_format",
    ),
    (CHAT, {"messages": []}, 400, "messages"),
    (CHAT, {}, 400, "messages"),
    (CHAT, {"messages": "hi"}, 400, "messages"),
    (CHAT, {"messages": [{"role": "tool", "content": "x"}]}, 400, "messages"),
    (CHAT, {"messages": [{"role": "user"}]}, 400, "messages"),
    (CHAT, {"messages": [{"role": "user", "content": None}]}, 400, "messages"),
    (CHAT, {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]}, 400, "messages"),
    (CHAT, {"messages": [{"role": "user", "content": "boom"}]}, 400, None),  # chat_prompt's ValueError
    (CHAT, {"messages": [{"role": "user", "content": "x" * 60}]}, 400, "messages"),
    (CHAT, {"messages": MSG, "model": "gpt-4"}, 404, "model"),
    (CHAT, {"messages": MSG, "temprature": 0.5}, 400, None),
    (COMP, {"prompt": "hi", "messages": MSG}, 400, None),
    (COMP, {"prompt": "hi", "model": "gpt-4"}, 404, "model"),
    (COMP, {"prompt": "hi", "model": 3}, 400, "model"),
]


@pytest.mark.parametrize(("path", "body", "status", "param"), BAD)
def test_bad_input_is_a_4xx_in_openai_format(http, client, engine, path, body, status, param):
    r = http.post(path, json=body)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["param"] == param and err["message"]
    expected = openai.NotFoundError if status == 404 else openai.BadRequestError
    if path == COMP:
        body = ({"model": MODEL, "prompt": "hi"} if body else {"model": MODEL}) | body
        with pytest.raises(expected):
            client.completions.create(model=body.pop("model"), prompt=body.pop("prompt", None), extra_body=body)
    else:
        body = ({"model": MODEL, "messages": MSG} if body else {"model": MODEL}) | body
        with pytest.raises(expected):
            client.chat.completions.create(model=body.pop("model"), messages=body.pop("messages", None),
                                           extra_body=body)  # fmt: skip
    assert engine.closed == []  # nothing reached the engine


@pytest.mark.parametrize("raw", [b"{", b"", b"[1, 2]", b"null", b'"prompt"', b"\xff\xfe"])
def test_malformed_bodies(http, raw):
    for path in (COMP, CHAT):
        r = http.post(path, content=raw, headers={"content-type": "application/json"})
        assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"


def test_unknown_fields_and_missing_model_are_accepted(http):
    body = {"prompt": "hi", "user": "u1", "metadata": {"a": 1}, "frequency_penalty": 0, "n": 1, "stop": None}
    assert http.post(COMP, json=body).status_code == 200


def test_unknown_route_is_openai_shaped(http):
    r = http.get("/v1/nothing")
    assert r.status_code == 404 and "error" in r.json()
    assert http.get(COMP).status_code == 405


def test_api_key(engine, metrics):
    app = create_app(engine, metrics, api_key="sekret")
    with TestClient(app) as http:
        assert http.post(COMP, json={"prompt": "hi"}).status_code == 401
        r = http.get("/v1/models", headers={"Authorization": "Bearer wrong"})
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
        assert http.get("/v1/models", headers={"Authorization": "Bearer sekret"}).status_code == 200
        assert http.get("/health").status_code == 200 and http.get("/metrics").status_code == 200
        bad = openai.OpenAI(base_url="http://test/v1", api_key="wrong", http_client=http, max_retries=0)
        with pytest.raises(openai.AuthenticationError):
            bad.completions.create(model=MODEL, prompt="hi")
        good = openai.OpenAI(base_url="http://test/v1", api_key="sekret", http_client=http, max_retries=0)
        assert good.completions.create(model=MODEL, prompt="hi").choices[0].text == "hi"


@pytest.mark.parametrize("where", ["call", "first"])
@pytest.mark.parametrize("stream", [False, True])
def test_overloaded_is_429_with_retry_after(http, client, engine, where, stream):
    engine.overloaded = where
    r = http.post(COMP, json={"prompt": "hi", "stream": stream})
    assert r.status_code == 429 and r.json()["error"]["code"] == "rate_limit_exceeded"
    assert r.headers["retry-after"] == ("3" if where == "call" else "1")  # whole seconds, rounded up
    assert int(r.headers["retry-after-ms"]) == (2500 if where == "call" else 200)
    with pytest.raises(openai.RateLimitError):
        client.chat.completions.create(model=MODEL, messages=MSG, stream=stream)


def test_engine_failure(engine, metrics):
    engine.fail_after = 2
    with TestClient(create_app(engine, metrics), raise_server_exceptions=False) as http:
        r = http.post(COMP, json={"prompt": "hello"})
        assert r.status_code == 500 and r.json()["error"]["type"] == "server_error"
        events = sse_events(http.post(COMP, json={"prompt": "hello", "stream": True}).text)
        assert [e["choices"][0]["text"] for e in events[:-1]] == ["h", "e"]
        assert events[-1]["error"]["type"] == "server_error"


# --- side routes -----------------------------------------------------------------------------------------


def test_health_plan_status(http, engine):
    assert http.get("/health").json() == {"status": "ok"}
    engine.dead = ["s1"]  # a server is gone, another chain still serves
    r = http.get("/health")
    assert (r.status_code, r.json()) == (200, {"status": "degraded", "dead": ["s1"]})
    engine.serving = False  # no chain left
    r = http.get("/health")
    assert (r.status_code, r.json()["status"]) == (503, "unavailable")
    assert http.get("/plan").json()["c"] == 2
    assert http.get("/status").json()["healthy"] is False


def test_metrics_after_one_request(http, client):
    client.completions.create(model=MODEL, prompt="hello", max_tokens=3)
    r = http.get("/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    for name in METRIC_NAMES:
        assert f"chainserve:{name}" in r.text, name
    assert 'chainserve:request_success_total{finished_reason="length"} 1.0' in r.text
    assert "chainserve:generation_tokens_total 3.0" in r.text


# --- disconnects (real server) ---------------------------------------------------------------------------


@contextlib.contextmanager
def serve(app):
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="off"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 10
        while not server.started:
            assert time.monotonic() < deadline, "uvicorn did not start"
            time.sleep(0.01)
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(10)
        sock.close()


def wait_closed(engine: FakeEngine, timeout_s: float = 5.0) -> list[bool]:
    deadline = time.monotonic() + timeout_s
    while not engine.closed and time.monotonic() < deadline:
        time.sleep(0.01)
    return engine.closed


@pytest.fixture
def slow_server(engine, metrics):
    engine.delay_s = 0.05  # 50 tokens take 2.5 s unless cancelled
    with serve(create_app(engine, metrics)) as url:
        yield url


def test_real_server_stream_with_the_openai_client(slow_server, engine):
    engine.delay_s = 0.0
    client = openai.OpenAI(base_url=slow_server + "/v1", api_key="none", max_retries=0)
    kw = dict(model=MODEL, prompt="over real http", max_tokens=10)
    text = "".join(c.choices[0].text for c in client.completions.create(**kw, stream=True))
    assert text == client.completions.create(**kw).choices[0].text == "over real "


@pytest.mark.parametrize("path", [COMP, CHAT])
def test_disconnect_while_streaming_closes_the_engine_iterator(slow_server, engine, path):
    body = {"max_tokens": 40, "ignore_eos": True, "stream": True} | (
        {"messages": MSG} if path == CHAT else {"prompt": "abc"}
    )
    t0 = time.monotonic()
    with httpx.Client(base_url=slow_server) as http, http.stream("POST", path, json=body) as r:
        assert r.status_code == 200
        for n, _ in enumerate(r.iter_lines()):
            if n >= 4:
                break
    assert wait_closed(engine) == [False]  # closed before finishing: the engine cancels the job
    assert time.monotonic() - t0 < 2.0


def test_disconnect_while_queued_closes_the_engine_iterator(slow_server, engine):
    engine.queue_s = 30.0
    for stream in (True, False):
        engine.closed.clear()
        with pytest.raises(httpx.ReadTimeout), httpx.Client(base_url=slow_server, timeout=0.3) as http:
            http.post(COMP, json={"prompt": "abc", "stream": stream})
        assert wait_closed(engine) == [False]


def test_disconnect_of_a_non_streamed_request(slow_server, engine):
    with pytest.raises(httpx.ReadTimeout), httpx.Client(base_url=slow_server, timeout=0.3) as http:
        http.post(COMP, json={"prompt": "abc", "max_tokens": 50, "ignore_eos": True})
    assert wait_closed(engine) == [False]


# --- fuzz ------------------------------------------------------------------------------------------------

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats() | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4),
    max_leaves=12,
)
FIELDS = ["model", "prompt", "messages", "max_tokens", "max_completion_tokens", "temperature", "top_p", "seed",
          "stop", "stream", "stream_options", "n", "ignore_eos", "echo", "logprobs", "best_of", "user"]  # fmt: skip
plausible = {  # mostly valid values, so that the fuzz also reaches the engine and the streams
    "prompt": st.text(min_size=1, max_size=40) | st.lists(st.integers(-1, 300), min_size=1, max_size=40),
    "messages": st.lists(
        st.fixed_dictionaries(
            {
                "role": st.sampled_from(["user", "system", "assistant", "developer", "tool"]),
                "content": st.text(max_size=20) | json_values,
            }
        ),
        max_size=3,
    ),  # fmt: skip
    "max_tokens": st.none() | st.integers(-1, 70) | st.integers(-(2**66), 2**66),
    "max_completion_tokens": st.none() | st.integers(-1, 70),
    "temperature": st.none() | st.floats(-1, 3),
    "top_p": st.none() | st.floats(-0.5, 1.5),
    "seed": st.none() | st.integers(-(2**65), 2**65),
    "stop": st.none() | st.text(max_size=3) | st.lists(st.text(max_size=3), max_size=5),
    "stream": st.booleans(),
    "stream_options": st.none() | st.fixed_dictionaries({"include_usage": st.booleans()}),
    "ignore_eos": st.booleans(),
    "model": st.sampled_from([MODEL, "other"]),
}
junk = json_values | st.dictionaries(st.sampled_from(FIELDS), json_values, max_size=6)
near_valid = st.fixed_dictionaries(
    {"prompt": plausible["prompt"], "messages": plausible["messages"]},
    optional={k: v for k, v in plausible.items() if k not in ("prompt", "messages")} | {"n": json_values},
)
bodies = junk | near_valid


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(body=bodies, chat=st.booleans())
def test_random_bodies_never_get_a_5xx(http, body, chat):
    r = http.post(CHAT if chat else COMP, content=json.dumps(body))  # NaN and Infinity included
    assert r.status_code < 500, r.text
    if r.status_code != 200:
        assert set(r.json()["error"]) == {"message", "type", "param", "code"}
