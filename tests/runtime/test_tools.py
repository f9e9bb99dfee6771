"""Function calling's pieces (issue 28, :mod:`chainserve.runtime.tools`) on hand-checked cases: the
prompt a template without tools gets, the calls read back from text, and streaming that never shows
a call's opening as content."""

from __future__ import annotations

import json
import re

import pytest

from chainserve.runtime.tools import CallStream, fallback_messages, for_template, parse_calls, tool_use

WEATHER = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather", "parameters": WEATHER}}]
CALL_TEXT = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}\n</tool_call>'
HISTORY = [
    {"role": "user", "content": "Weather in Oslo?"},
    {"role": "assistant", "content": None, "tool_calls": [
        {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'}}]},
    {"role": "tool", "tool_call_id": "c1", "content": "sunny"},
    {"role": "tool", "tool_call_id": "c2", "content": "windy"},
]  # fmt: skip


def test_a_template_without_tools_gets_them_in_the_system_message_and_calls_as_blocks():
    use = tool_use(TOOLS, None, None)
    chat, tools_arg = for_template("{% for m in messages %}{{ m['content'] }}{% endfor %}", HISTORY, use.tools)
    assert tools_arg is None
    assert [m["role"] for m in chat] == ["system", "user", "assistant", "user"]
    assert '"name": "get_weather"' in chat[0]["content"] and "<tool_call>" in chat[0]["content"]
    assert chat[2]["content"] == CALL_TEXT  # the earlier call, as the model would have written it
    assert chat[3]["content"] == "<tool_response>\nsunny\n</tool_response>\n<tool_response>\nwindy\n</tool_response>"
    merged = fallback_messages([{"role": "system", "content": "Be brief."}, *HISTORY[:1]], use.tools)
    assert merged[0]["content"].startswith("Be brief.\n\n# Tools") and len(merged) == 2


def test_a_template_with_tools_renders_them_itself_with_arguments_as_objects():
    use = tool_use(TOOLS, "auto", None)
    chat, tools_arg = for_template("{{ tools }}{% for m in messages %}{{ m.tool_calls }}{% endfor %}", HISTORY,
                                   use.tools)  # fmt: skip
    assert tools_arg == TOOLS
    assert chat[1]["tool_calls"][0]["function"]["arguments"] == {"city": "Oslo"}
    assert chat[2] == HISTORY[2]  # tool messages as they are


def test_calls_are_read_from_text_and_text_without_a_valid_call_stays_text():
    content, calls = parse_calls("Let me check.\n" + CALL_TEXT + "\n" + CALL_TEXT, ("get_weather",))
    assert content == "Let me check." and [json.loads(c.arguments) for c in calls] == [{"city": "Oslo"}] * 2
    assert len({c.id for c in calls}) == 2
    unclosed = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}'  # EOS before the closing tag
    assert len(parse_calls(unclosed, ("get_weather",))[1]) == 1
    for text in ("<tool_call>{not json}</tool_call>", CALL_TEXT.replace("get_weather", "other"), "plain"):
        assert parse_calls(text, ("get_weather",)) == (text, [])
    args_as_text = '<tool_call>{"name": "get_weather", "arguments": "{\\"city\\": \\"Oslo\\"}"}</tool_call>'
    assert json.loads(parse_calls(args_as_text, ("get_weather",))[1][0].arguments) == {"city": "Oslo"}


@pytest.mark.parametrize("text", ["Let me check.\n" + CALL_TEXT, "a < b, and <tool is not a call", CALL_TEXT])
def test_a_stream_shows_the_same_content_and_calls_as_the_whole_answer(text):
    stream, shown = CallStream(("get_weather",)), ""
    for ch in text:  # one character a token: the opening tag arrives in pieces
        shown += stream.push(ch)
        assert "<tool_call" not in shown
    rest, calls = stream.finish()
    content, whole_calls = parse_calls(text, ("get_weather",))
    assert shown + rest == (content or "")
    assert [(c.name, c.arguments) for c in calls] == [(c.name, c.arguments) for c in whole_calls]


@pytest.mark.parametrize(
    ("tools", "choice", "message"),
    [
        (TOOLS, {"type": "function", "function": {"name": "nope"}}, "tool_choice: no tool named 'nope'"),
        (TOOLS * 2, None, "tools: function names must be unique"),
        ([{"type": "function", "function": {"name": "has space"}}], None, "tools[0].function.name"),
        ([{"type": "function", "function": {"name": "f", "parameters": []}}], None, "tools[0].function.parameters"),
        (None, {"type": "function", "function": {"name": "f"}}, "tool_choice: a named function needs tools"),
    ],
)
def test_bad_tools_are_value_errors_naming_the_parameter(tools, choice, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        tool_use(tools, choice, None)


def test_forced_choices_have_a_grammar_and_free_ones_none():
    assert tool_use(TOOLS, "auto", None).grammar() is None and tool_use(TOOLS, "none", None).grammar() is None
    required, single = tool_use(TOOLS, "required", None).grammar(), tool_use(TOOLS, "required", False).grammar()
    assert 'call ("\\n" call)*' in required and 'call ("\\n" call)*' not in single  # parallel calls: 1 or more
    assert "get_weather" in tool_use(TOOLS, {"type": "function", "function": {"name": "get_weather"}}, None).grammar()
