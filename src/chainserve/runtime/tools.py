"""Function calling (OpenAI's ``tools``; issue 28): the tools a chat request offers, how they reach the
model, the grammar that forces a call, and the calls read back out of the model's text.

The call format is the ``<tool_call>`` convention of Hermes-style chat templates (Qwen2.5, Hermes,
SmolLM3, …): each call is ``<tool_call>\\n{"name": …, "arguments": {…}}\\n</tool_call>`` in the
assistant's text. A template that renders ``tools`` and ``tool_calls`` itself gets them as Hugging Face
passes them (arguments as objects); for one that does not (SmolLM2's), :func:`fallback_messages`
writes the tools into the system message, earlier calls as ``<tool_call>`` blocks and tool results
as ``<tool_response>`` blocks in a user turn, the same convention.

``tool_choice``: ``none`` generates text (the tools are still shown, as vLLM does); ``auto`` generates
freely and :func:`parse_calls` reads the calls it wrote (none: a text answer); ``required`` and a named
function generate under :func:`call_grammar` (llguidance), so the arguments always parse and validate
against the tool's JSON schema: one call, or with ``parallel_tool_calls`` (the default) one or more.
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import llguidance

CALL_OPEN, CALL_CLOSE = "<tool_call>", "</tool_call>"
#: JSON inside forced calls: the separators of ``json.dumps``, no other whitespace.
JSON_STYLE = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
_CALL = re.compile(re.escape(CALL_OPEN) + r"\s*(.*?)\s*(" + re.escape(CALL_CLOSE) + r"|$)", re.DOTALL)


@dataclass(frozen=True, slots=True)
class Tool:
    """One function the model may call: its ``name``, ``description`` and JSON-schema ``parameters``."""

    name: str
    description: str | None
    parameters: dict[str, Any]

    def as_openai(self) -> dict[str, Any]:
        function: dict[str, Any] = {"name": self.name}
        if self.description:
            function["description"] = self.description
        return {"type": "function", "function": function | {"parameters": self.parameters}}


@dataclass(frozen=True, slots=True)
class ToolCall:
    """A call the model made: ``arguments`` is the JSON text of the arguments object."""

    id: str
    name: str
    arguments: str

    def as_openai(self) -> dict[str, Any]:
        return {"id": self.id, "type": "function", "function": {"name": self.name, "arguments": self.arguments}}


@dataclass(frozen=True, slots=True)
class ToolUse:
    """A request's tools, its ``choice`` (``none``, ``auto``, ``required`` or a tool's name) and
    whether several calls may come in one answer."""

    tools: tuple[Tool, ...]
    choice: str
    parallel: bool = True

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(t.name for t in self.tools)

    @property
    def parses_calls(self) -> bool:
        """Whether the answer's text is read for calls (every choice but ``none``)."""
        return self.choice != "none"

    def grammar(self) -> str | None:
        """The llguidance grammar that forces the calls (``required``, a named tool), else ``None``."""
        if self.choice in ("none", "auto"):
            return None
        forced = [t for t in self.tools if self.choice in ("required", t.name)]
        return call_grammar(forced, self.parallel and self.choice == "required")


def new_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


def tool_use(tools: list[Any] | None, choice: Any, parallel: bool | None) -> ToolUse | None:
    """The request's :class:`ToolUse` (``None``: no tools), or ``ValueError`` naming the bad parameter.

    >>> tool_use([{"type": "function", "function": {"name": "f"}}], None, None).choice
    'auto'
    >>> tool_use(None, "required", None)
    Traceback (most recent call last):
    ValueError: tool_choice: 'required' needs tools
    """
    if not tools:
        if choice not in (None, "none", "auto"):
            raise ValueError(f"tool_choice: {_show(choice)} needs tools")
        return None
    parsed = tuple(_tool(i, t) for i, t in enumerate(tools))
    names = [t.name for t in parsed]
    if len(set(names)) != len(names):
        raise ValueError("tools: function names must be unique")
    return ToolUse(parsed, _choice(choice, names), True if parallel is None else parallel)


def _show(choice: Any) -> str:
    return repr(choice) if isinstance(choice, str) else "a named function"


def _tool(index: int, spec: Any) -> Tool:
    where = f"tools[{index}]"
    if not isinstance(spec, dict) or spec.get("type") != "function" or not isinstance(spec.get("function"), dict):
        raise ValueError(f'{where}: must be {{"type": "function", "function": {{"name": ..., "parameters": ...}}}}')
    fn = spec["function"]
    name, description = fn.get("name"), fn.get("description")
    if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9_.-]{1,64}", name):
        raise ValueError(f"{where}.function.name: 1 to 64 letters, digits, '_', '.' or '-', got {name!r}")
    if description is not None and not isinstance(description, str):
        raise ValueError(f"{where}.function.description: must be a string")
    parameters = fn.get("parameters", {"type": "object", "properties": {}})
    if not isinstance(parameters, dict):
        raise ValueError(f"{where}.function.parameters: must be a JSON schema object")
    error = llguidance.LLMatcher.validate_grammar(_json_grammar(parameters))
    if error:
        raise ValueError(f"{where}.function.parameters: the schema is not supported: {error}")
    return Tool(name, description, parameters)


def _choice(choice: Any, names: list[str]) -> str:
    if choice is None:
        return "auto"
    if choice in ("none", "auto", "required"):
        return choice
    fn = choice.get("function") if isinstance(choice, dict) and choice.get("type") == "function" else None
    name = fn.get("name") if isinstance(fn, dict) else None
    if not isinstance(name, str):
        raise ValueError(
            'tool_choice: must be "none", "auto", "required" or {"type": "function", "function": {"name": ...}}'
        )
    if name not in names:
        raise ValueError(f"tool_choice: no tool named {name!r} among {', '.join(names)}")
    return name


def _json_grammar(schema: dict[str, Any]) -> str:
    return llguidance.LLMatcher.grammar_from_json_schema(json.dumps(schema), JSON_STYLE)


def call_grammar(tools: list[Tool], parallel: bool) -> str:
    """Lark grammar (llguidance) of ``<tool_call>`` blocks, each a ``{"name", "arguments"}`` object of
    one of ``tools`` whose arguments match its schema; one block, or with ``parallel`` one or more."""
    calls = [
        {
            "type": "object",
            "properties": {"name": {"const": t.name}, "arguments": t.parameters},
            "required": ["name", "arguments"],
            "additionalProperties": False,
        }
        for t in tools
    ]
    schema = (calls[0] if len(calls) == 1 else {"anyOf": calls}) | {"x-guidance": JSON_STYLE}
    repeat = ' ("\\n" call)*' if parallel else ""
    return llguidance.LLMatcher.grammar_from_lark(
        f'start: call{repeat}\ncall: "{CALL_OPEN}\\n" body "\\n{CALL_CLOSE}"\nbody: %json {json.dumps(schema)}\n'
    )


# --- prompts -------------------------------------------------------------------------------------------


def renders_tools(template: str | None) -> bool:
    """Whether a chat template renders ``tools`` and assistant ``tool_calls`` itself."""
    return bool(template) and "tools" in template and "tool_calls" in template


def for_template(
    template: str | None, messages: Sequence[dict[str, Any]], tools: tuple[Tool, ...]
) -> tuple[list[dict[str, Any]], list[dict[str, Any]] | None]:
    """The messages and the ``tools`` argument to render a chat with ``template``: its own rendering
    when it knows tools, else :func:`fallback_messages` (and no ``tools``)."""
    if renders_tools(template):
        return template_messages(messages), [t.as_openai() for t in tools] or None
    return fallback_messages(messages, tools), None


def template_messages(messages: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Messages as Hugging Face chat templates take them: tool-call arguments as objects."""
    out = []
    for m in messages:
        if m.get("tool_calls"):
            calls = [{"type": "function", "function": c["function"] | {"arguments": _arguments(c)}}
                     for c in m["tool_calls"]]  # fmt: skip
            m = m | {"tool_calls": calls}
        out.append(m)
    return out


def fallback_messages(messages: Sequence[dict[str, Any]], tools: tuple[Tool, ...]) -> list[dict[str, Any]]:
    """Messages for a template that knows no tools: the tools in the system message, calls and
    results in the ``<tool_call>`` convention, every message a plain ``{role, content}``."""
    out: list[dict[str, Any]] = []
    for m in messages:
        role, content = m["role"], m.get("content") or ""
        if role == "assistant" and m.get("tool_calls"):
            blocks = [json.dumps({"name": c["function"]["name"], "arguments": _arguments(c)}) for c in m["tool_calls"]]
            content = "\n".join([content] * bool(content) + [f"{CALL_OPEN}\n{b}\n{CALL_CLOSE}" for b in blocks])
        elif role == "tool":
            role, content = "user", f"<tool_response>\n{content}\n</tool_response>"
            if out and out[-1]["role"] == "user" and out[-1]["content"].startswith("<tool_response>"):
                out[-1] = {"role": "user", "content": out[-1]["content"] + "\n" + content}
                continue
        out.append({"role": role, "content": content})
    if tools:
        if out and out[0]["role"] == "system":
            out[0] = {"role": "system", "content": out[0]["content"] + "\n\n" + tools_prompt(tools)}
        else:
            out.insert(0, {"role": "system", "content": tools_prompt(tools)})
    return out


def tools_prompt(tools: tuple[Tool, ...]) -> str:
    """The system-message text that offers ``tools`` in the ``<tool_call>`` convention."""
    listed = "\n".join(json.dumps(t.as_openai()) for t in tools)
    return (
        "# Tools\n\nYou can call functions to answer. Their signatures, one JSON object a line:\n"
        f"<tools>\n{listed}\n</tools>\n\n"
        "To call one, answer with a JSON object of its name and arguments in tool_call tags:\n"
        f'{CALL_OPEN}\n{{"name": "<function name>", "arguments": {{<arguments>}}}}\n{CALL_CLOSE}'
    )


def _arguments(call: dict[str, Any]) -> Any:
    """A history call's arguments as an object (OpenAI sends a JSON string; kept when it is not JSON)."""
    args = call["function"].get("arguments")
    if isinstance(args, str):
        try:
            return json.loads(args)
        except json.JSONDecodeError:
            return args
    return args


# --- answers -------------------------------------------------------------------------------------------


def parse_calls(text: str, names: tuple[str, ...]) -> tuple[str | None, list[ToolCall]]:
    """The answer's text before its first call (``None`` when empty and there are calls) and the calls
    it made: ``<tool_call>`` blocks whose JSON names one of ``names``. An unclosed last block counts
    when its JSON is whole, and is dropped when it is not (the answer was cut off in it). Text with
    any other invalid block comes back whole, with no calls.

    >>> parse_calls('<tool_call>\\n{"name": "f", "arguments": {"x": 1}}\\n</tool_call>', ("f",))[1][0].arguments
    '{"x": 1}'
    >>> len(parse_calls('<tool_call>{"name": "f", "arguments": {}}</tool_call><tool_call>{"name": "f', ("f",))[1])
    1
    >>> parse_calls("no call here", ("f",))
    ('no call here', [])
    """
    start = text.find(CALL_OPEN)
    if start < 0:
        return text, []
    calls = []
    for body, closed in _CALL.findall(text, start):
        call = _call(body, names)
        if call is None and (closed or not calls):
            return text, []
        if call is not None:
            calls.append(call)
    content = text[:start].rstrip()
    return content or None, calls


def finish_reason(reason: str, calls: Sequence[ToolCall]) -> str:
    """An answer's finish reason once its calls are read: ``tool_calls`` when it made some and ended by
    itself; ``length`` stays (cut off after its whole calls).

    >>> finish_reason("stop", [ToolCall("c", "f", "{}")]), finish_reason("length", [ToolCall("c", "f", "{}")])
    ('tool_calls', 'length')
    """
    return "tool_calls" if calls and reason == "stop" else reason


def _call(body: str, names: tuple[str, ...]) -> ToolCall | None:
    try:
        obj = json.loads(body)
    except json.JSONDecodeError:
        return None
    if not isinstance(obj, dict) or obj.get("name") not in names:
        return None
    args = obj.get("arguments", obj.get("parameters", {}))
    if isinstance(args, str):  # some models write the arguments as a JSON string
        try:
            args = json.loads(args)
        except json.JSONDecodeError:
            return None
    if not isinstance(args, dict):
        return None
    return ToolCall(new_call_id(), obj["name"], json.dumps(args, ensure_ascii=False))


class CallStream:
    """Streams one choice's answer: text as it comes, except what may open a ``<tool_call>``; once
    a call opens, the rest is held and read as calls at :meth:`finish` (as OpenAI streams, the calls
    then come as ``tool_calls`` deltas)."""

    def __init__(self, names: tuple[str, ...]):
        self.names = names
        self.text = ""  # everything generated
        self.sent = 0  # characters of text already streamed as content

    def push(self, delta: str) -> str:
        """The content that is safe to stream after ``delta``: never what may open a call, nor trailing
        whitespace (which a call may follow)."""
        self.text += delta
        opened = self.text.find(CALL_OPEN, self.sent)
        safe = len(self.text) if opened < 0 else opened
        for n in range(min(len(CALL_OPEN) - 1, safe - self.sent), 0, -1):  # a tail that may grow into the tag
            if self.text[:safe].endswith(CALL_OPEN[:n]):
                safe -= n
                break
        return self._send(len(self.text[:safe].rstrip()))

    def finish(self) -> tuple[str, list[ToolCall]]:
        """At the end: content still to stream and the calls (none: what was held is content)."""
        _, calls = parse_calls(self.text, self.names)
        if not calls:
            return self._send(len(self.text)), []
        return self._send(len(self.text[: self.text.find(CALL_OPEN)].rstrip())), calls

    def _send(self, upto: int) -> str:
        upto = max(upto, self.sent)
        delta, self.sent = self.text[self.sent : upto], upto
        return delta
