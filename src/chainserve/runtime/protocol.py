"""Wire format between the orchestrator and the block servers (ZeroMQ multipart messages, §4.2).

A message is one UTF-8 JSON header frame, followed by one frame of raw tensor bytes per tensor:

* request  ``{"v": 2, "op": ..., "rid": int, "token": str, "epoch"?: int, ...}`` [+ tensor frames]
* reply    ``{"v": 2, "rid": int, "ok": true, ...}`` [+ tensor frames], or
           ``{"v": 2, "rid": int, "ok": false, "error": code, "message": str}``

Ops: ``info``; ``forward``, whose ``items`` are one step of each of up to :data:`MAX_ITEMS` sessions
(issue 17: a client sends every step it has for a server at that moment as one message) — each
``{session, first_block, position, tensor: {dtype, shape}, open?, reserve?, close?}`` (``open``
admits the session first, reserving the KV pages of ``reserve`` positions — its prompt + output, issue
30; without it, one block-slot's worth — and ``close`` frees it after this step), item i's bytes in
frame i + 1; its reply has ``items`` in the same order, each ``{"ok": true, "tensor": …}`` (its bytes
in the next frame) or ``{"ok": false, "error", "message"}``: a session's error fails only that session. ``close``
(``session``); ``limit`` (``num_block_slots``: the admission limit within the arena, which a plan
change moves; the reply is ``info``'s); ``shutdown`` (the server exits, as on SIGTERM: ``chainserve
stop``). Error codes: :data:`ERROR_CODES`. Every field is checked (type, range, byte length) before any
tensor is touched; nothing is ever unpickled.

Epochs (issue 21): an orchestrator stamps every request with its ``epoch`` (a number that grows with
each orchestrator that attaches: the time it started, in µs). A block server that sees a newer epoch
frees at once every session opened under an older one and from then on refuses older epochs'
messages (``stale_epoch``), so a takeover leaks no block-slot and a dead orchestrator's late step
cannot reach the new one's KV. A request without ``epoch`` (an operator's tool) neither moves it nor
is refused.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from chainserve.runtime.backends.base import WIRE_DTYPES, WireTensor

VERSION = 2
#: Largest header frame accepted (bytes).
MAX_HEADER_BYTES = 256 * 1024
#: Largest tensor frame accepted (bytes): 256 MiB.
MAX_TENSOR_BYTES = 256 * 1024 * 1024
#: Most sessions' steps in one forward message.
MAX_ITEMS = 1024
OPS = ("info", "forward", "close", "limit", "shutdown")
#: ``no_free_slot``: admission refused (the job may retry); ``bad_request``: a malformed message;
#: ``unknown_session``: forward/close of a session the server does not hold (expired, or never
#: opened); ``unauthorized``: wrong token; ``stale_epoch``: from an orchestrator that a newer one
#: replaced; ``internal``: the backend failed.
ERROR_CODES = ("no_free_slot", "bad_request", "unknown_session", "unauthorized", "stale_epoch", "internal")


class ProtocolError(ValueError):
    """A malformed message; ``code`` is one of :data:`ERROR_CODES`."""

    def __init__(self, message: str, code: str = "bad_request"):
        super().__init__(message)
        self.code = code


@dataclass(frozen=True, slots=True)
class Step:
    """One session's forward step in a message: ``tensor`` holds its new tokens' hidden states at
    positions ``position..``; ``open``/``close`` admit / free the session around it; ``reserve``: the
    positions an opening session holds pages for (``None``: one block-slot's worth)."""

    session: str
    first_block: int
    position: int
    tensor: WireTensor
    open: bool = False
    close: bool = False
    reserve: int | None = None

    def header(self) -> dict[str, Any]:
        reserve = {"reserve": self.reserve} if self.open and self.reserve is not None else {}
        return {
            "session": self.session,
            "first_block": self.first_block,
            "position": self.position,
            "open": self.open,
            "close": self.close,
            "tensor": {"dtype": self.tensor.dtype, "shape": list(self.tensor.shape)},
        } | reserve


@dataclass(frozen=True, slots=True)
class Request:
    """A validated request: its op, request id, and the fields of that op (``None`` / empty when unused)."""

    op: str
    rid: int
    token: str
    session: str | None = None
    steps: tuple[Step, ...] = ()
    num_block_slots: int | None = None
    epoch: int | None = None


def _int_field(header: dict[str, Any], name: str, low: int, high: int) -> int:
    value = header.get(name)
    if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
        raise ProtocolError(f"{name}: must be an integer in [{low}, {high}], got {value!r}")
    return value


def _session(header: dict[str, Any]) -> str:
    session = header.get("session")
    if not isinstance(session, str) or not 1 <= len(session) <= 128:
        raise ProtocolError("session: must be a string of 1 to 128 characters")
    return session


def _tensor(meta: Any, data: bytes) -> WireTensor:
    if not isinstance(meta, dict):
        raise ProtocolError("tensor: must be a {dtype, shape} object")
    dtype, shape = meta.get("dtype"), meta.get("shape")
    if dtype not in WIRE_DTYPES:
        raise ProtocolError(f"tensor.dtype: {dtype!r} is not one of {', '.join(WIRE_DTYPES)}")
    if (
        not isinstance(shape, list)
        or not 1 <= len(shape) <= 4
        or any(not isinstance(d, int) or isinstance(d, bool) or not 0 <= d <= MAX_TENSOR_BYTES for d in shape)
    ):
        raise ProtocolError(f"tensor.shape: must be 1 to 4 non-negative integers, got {shape!r}")
    if len(data) > MAX_TENSOR_BYTES:
        raise ProtocolError(f"tensor: {len(data)} bytes exceed the limit of {MAX_TENSOR_BYTES}")
    try:
        return WireTensor(dtype, tuple(shape), data)
    except ValueError as exc:
        raise ProtocolError(f"tensor.{exc}") from None


def _steps(items: Any, frames: list[bytes]) -> tuple[Step, ...]:
    if not isinstance(items, list) or not 1 <= len(items) <= MAX_ITEMS:
        raise ProtocolError(f"items: must be a list of 1 to {MAX_ITEMS} steps")
    if len(frames) != len(items) + 1:
        raise ProtocolError(f"items: {len(items)} steps need {len(items)} tensor frames, got {len(frames) - 1}")
    steps, seen = [], set()
    for i, item in enumerate(items):
        if not isinstance(item, dict):
            raise ProtocolError(f"items[{i}]: must be an object")
        try:
            session = _session(item)
            if session in seen:
                raise ProtocolError(f"session: {session!r} appears twice in one message")
            seen.add(session)
            is_open, is_close = item.get("open", False), item.get("close", False)
            if not isinstance(is_open, bool) or not isinstance(is_close, bool):
                raise ProtocolError("open/close: must be booleans")
            first_block = _int_field(item, "first_block", 1, 1_000_000)
            position = _int_field(item, "position", 0, 10_000_000)
            reserve = _int_field(item, "reserve", 1, 10_000_000) if "reserve" in item else None
            tensor = _tensor(item.get("tensor"), frames[i + 1])
        except ProtocolError as exc:
            raise ProtocolError(f"items[{i}].{exc}") from None
        steps.append(Step(session, first_block, position, tensor, is_open, is_close, reserve))
    return tuple(steps)


def _header(frames: list[bytes], what: str) -> dict[str, Any]:
    if not frames or len(frames[0]) > MAX_HEADER_BYTES:
        raise ProtocolError(f"{what}: missing or too large a header")
    try:
        header = json.loads(frames[0])
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise ProtocolError(f"{what}: header is not UTF-8 JSON") from None
    if not isinstance(header, dict) or header.get("v") != VERSION:
        raise ProtocolError(f"{what}: header must be an object with v = {VERSION}")
    return header


def decode_request(frames: list[bytes]) -> Request:
    """Parse and validate one request (raises :class:`ProtocolError`)."""
    if not 1 <= len(frames) <= MAX_ITEMS + 1:
        raise ProtocolError(f"message: expected 1 to {MAX_ITEMS + 1} frames, got {len(frames)}")
    header = _header(frames, "request")
    op, token = header.get("op"), header.get("token", "")
    rid = _int_field(header, "rid", 0, 2**62)
    if op not in OPS:
        raise ProtocolError(f"op: {op!r} is not one of {', '.join(OPS)}")
    if not isinstance(token, str):
        raise ProtocolError("token: must be a string")
    if op != "forward" and len(frames) != 1:
        raise ProtocolError(f"message: {op} takes no tensor frames")
    epoch = _int_field(header, "epoch", 0, 2**62) if "epoch" in header else None
    if op in ("info", "shutdown"):
        return Request(op, rid, token, epoch=epoch)
    if op == "limit":
        slots = _int_field(header, "num_block_slots", 0, 1_000_000_000)
        return Request(op, rid, token, num_block_slots=slots, epoch=epoch)
    if op == "close":
        return Request(op, rid, token, _session(header), epoch=epoch)
    return Request(op, rid, token, steps=_steps(header.get("items"), frames), epoch=epoch)


def encode_request(op: str, rid: int, token: str, epoch: int | None = None, **fields: Any) -> list[bytes]:
    """Frames of an ``info``, ``close``, ``limit`` or ``shutdown`` request (``fields``: session,
    num_block_slots)."""
    header = {"v": VERSION, "op": op, "rid": rid, "token": token, **fields}
    return [json.dumps(header | ({"epoch": epoch} if epoch is not None else {})).encode()]


def encode_forward(rid: int, token: str, steps: list[Step], epoch: int | None = None) -> list[bytes]:
    """Frames of one forward message carrying ``steps`` (distinct sessions)."""
    header = {"v": VERSION, "op": "forward", "rid": rid, "token": token, "items": [s.header() for s in steps]}
    if epoch is not None:
        header["epoch"] = epoch
    return [json.dumps(header).encode(), *(bytes(s.tensor.data) for s in steps)]


def encode_reply(rid: int, **fields: Any) -> list[bytes]:
    """Frames of a successful reply without tensors."""
    return [json.dumps({"v": VERSION, "rid": rid, "ok": True, **fields}).encode()]


def encode_forward_reply(rid: int, results: list[WireTensor | ProtocolError]) -> list[bytes]:
    """Frames of a forward's reply: each step's output, or the error that failed it alone."""
    items, data = [], []
    for result in results:
        if isinstance(result, WireTensor):
            items.append({"ok": True, "tensor": {"dtype": result.dtype, "shape": list(result.shape)}})
            data.append(bytes(result.data))
        else:
            items.append({"ok": False, "error": result.code, "message": str(result)})
    return [json.dumps({"v": VERSION, "rid": rid, "ok": True, "items": items}).encode(), *data]


def encode_error(rid: int, code: str, message: str) -> list[bytes]:
    """Frames of an error reply (the whole message failed)."""
    return [json.dumps({"v": VERSION, "rid": rid, "ok": False, "error": code, "message": message}).encode()]


@dataclass(frozen=True, slots=True)
class Reply:
    """A parsed reply: ``ok``, fields; ``error``/``message`` when not ok; a forward's ``results``
    (each step's output tensor, or ``(code, message)``)."""

    rid: int
    ok: bool
    fields: dict[str, Any]
    results: tuple[WireTensor | tuple[str, str], ...] = ()

    @property
    def error(self) -> str:
        return str(self.fields.get("error", "internal"))

    @property
    def message(self) -> str:
        return str(self.fields.get("message", ""))


def decode_reply(frames: list[bytes]) -> Reply:
    """Parse a reply (raises :class:`ProtocolError` on a malformed one)."""
    header = _header(frames, "reply")
    if not isinstance(header.get("rid"), int):
        raise ProtocolError("reply: bad header")
    items = header.get("items", [])
    if not isinstance(items, list):
        raise ProtocolError("reply: items must be a list")
    results: list[WireTensor | tuple[str, str]] = []
    data = iter(frames[1:])
    for item in items:
        if not isinstance(item, dict):
            raise ProtocolError("reply: each item must be an object")
        if item.get("ok"):
            frame = next(data, None)
            if frame is None:
                raise ProtocolError("reply: an item's tensor frame is missing")
            results.append(_tensor(item.get("tensor"), frame))
        else:
            results.append((str(item.get("error", "internal")), str(item.get("message", ""))))
    if next(data, None) is not None:
        raise ProtocolError("reply: more tensor frames than items")
    return Reply(header["rid"], bool(header.get("ok")), header, tuple(results))
