"""Wire format between the orchestrator and the block servers (ZeroMQ multipart messages, §4.2).

A message is one UTF-8 JSON header frame, optionally followed by one frame of raw tensor bytes:

* request  ``{"v": 1, "op": ..., "rid": int, "token": str, ...}`` [+ tensor bytes]
* reply    ``{"v": 1, "rid": int, "ok": true, ...}`` [+ tensor bytes], or
           ``{"v": 1, "rid": int, "ok": false, "error": code, "message": str}``

Ops: ``info``; ``forward`` (``session``, ``first_block``, ``position``, ``tensor`` {dtype, shape},
optional ``open`` to admit the session first and ``close`` to free it after this step); ``close``
(``session``); ``limit`` (``num_block_slots``: the admission limit within the arena, which a plan
change moves; the reply is ``info``'s). Error codes: :data:`ERROR_CODES`. Every field is checked
(type, range, byte length) before any tensor is touched; nothing is ever unpickled.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from chainserve.runtime.backends.base import WIRE_DTYPES, WireTensor

VERSION = 1
#: Largest header frame accepted (bytes).
MAX_HEADER_BYTES = 64 * 1024
#: Largest tensor frame accepted (bytes): 256 MiB.
MAX_TENSOR_BYTES = 256 * 1024 * 1024
OPS = ("info", "forward", "close", "limit")
#: ``no_free_slot``: admission refused (the job may retry); ``bad_request``: a malformed message;
#: ``unknown_session``: forward/close of a session the server does not hold (expired, or never
#: opened); ``unauthorized``: wrong token; ``internal``: the backend failed.
ERROR_CODES = ("no_free_slot", "bad_request", "unknown_session", "unauthorized", "internal")


class ProtocolError(ValueError):
    """A malformed message; ``code`` is one of :data:`ERROR_CODES`."""

    def __init__(self, message: str, code: str = "bad_request"):
        super().__init__(message)
        self.code = code


@dataclass(frozen=True, slots=True)
class Request:
    """A validated request: its op, request id, session and forward fields (``None`` when unused)."""

    op: str
    rid: int
    token: str
    session: str | None = None
    first_block: int | None = None
    position: int | None = None
    tensor: WireTensor | None = None
    open: bool = False
    close: bool = False
    num_block_slots: int | None = None


def _int_field(header: dict[str, Any], name: str, low: int, high: int) -> int:
    value = header.get(name)
    if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
        raise ProtocolError(f"{name}: must be an integer in [{low}, {high}], got {value!r}")
    return value


def _tensor(meta: Any, frames: list[bytes]) -> WireTensor:
    if not isinstance(meta, dict) or len(frames) != 2:
        raise ProtocolError("tensor: a forward needs a {dtype, shape} header and one data frame")
    dtype, shape = meta.get("dtype"), meta.get("shape")
    if dtype not in WIRE_DTYPES:
        raise ProtocolError(f"tensor.dtype: {dtype!r} is not one of {', '.join(WIRE_DTYPES)}")
    if (
        not isinstance(shape, list)
        or not 1 <= len(shape) <= 4
        or any(not isinstance(d, int) or isinstance(d, bool) or not 0 <= d <= MAX_TENSOR_BYTES for d in shape)
    ):
        raise ProtocolError(f"tensor.shape: must be 1 to 4 non-negative integers, got {shape!r}")
    if len(frames[1]) > MAX_TENSOR_BYTES:
        raise ProtocolError(f"tensor: {len(frames[1])} bytes exceed the limit of {MAX_TENSOR_BYTES}")
    try:
        return WireTensor(dtype, tuple(shape), frames[1])
    except ValueError as exc:
        raise ProtocolError(f"tensor.{exc}") from None


def decode_request(frames: list[bytes]) -> Request:
    """Parse and validate one request (raises :class:`ProtocolError`)."""
    if not 1 <= len(frames) <= 2:
        raise ProtocolError(f"message: expected 1 or 2 frames, got {len(frames)}")
    if len(frames[0]) > MAX_HEADER_BYTES:
        raise ProtocolError("header: too large")
    try:
        header = json.loads(frames[0])
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise ProtocolError("header: not UTF-8 JSON") from None
    if not isinstance(header, dict) or header.get("v") != VERSION:
        raise ProtocolError(f"header: must be an object with v = {VERSION}")
    op, token = header.get("op"), header.get("token", "")
    rid = _int_field(header, "rid", 0, 2**62)
    if op not in OPS:
        raise ProtocolError(f"op: {op!r} is not one of {', '.join(OPS)}")
    if not isinstance(token, str):
        raise ProtocolError("token: must be a string")
    if op == "info":
        return Request(op, rid, token)
    if op == "limit":
        return Request(op, rid, token, num_block_slots=_int_field(header, "num_block_slots", 0, 1_000_000_000))
    session = header.get("session")
    if not isinstance(session, str) or not 1 <= len(session) <= 128:
        raise ProtocolError("session: must be a string of 1 to 128 characters")
    if op == "close":
        return Request(op, rid, token, session)
    is_open, is_close = header.get("open", False), header.get("close", False)
    if not isinstance(is_open, bool) or not isinstance(is_close, bool):
        raise ProtocolError("open/close: must be booleans")
    return Request(
        op,
        rid,
        token,
        session,
        _int_field(header, "first_block", 1, 1_000_000),
        _int_field(header, "position", 0, 10_000_000),
        _tensor(header.get("tensor"), frames),
        is_open,
        is_close,
    )


def encode_request(op: str, rid: int, token: str, tensor: WireTensor | None = None, **fields: Any) -> list[bytes]:
    """Frames of one request (``fields``: session, first_block, position, open, close, num_block_slots)."""
    header: dict[str, Any] = {"v": VERSION, "op": op, "rid": rid, "token": token, **fields}
    if tensor is None:
        return [json.dumps(header).encode()]
    header["tensor"] = {"dtype": tensor.dtype, "shape": list(tensor.shape)}
    return [json.dumps(header).encode(), bytes(tensor.data)]


def encode_reply(rid: int, tensor: WireTensor | None = None, **fields: Any) -> list[bytes]:
    """Frames of a successful reply."""
    header: dict[str, Any] = {"v": VERSION, "rid": rid, "ok": True, **fields}
    if tensor is None:
        return [json.dumps(header).encode()]
    header["tensor"] = {"dtype": tensor.dtype, "shape": list(tensor.shape)}
    return [json.dumps(header).encode(), bytes(tensor.data)]


def encode_error(rid: int, code: str, message: str) -> list[bytes]:
    """Frames of an error reply."""
    return [json.dumps({"v": VERSION, "rid": rid, "ok": False, "error": code, "message": message}).encode()]


@dataclass(frozen=True, slots=True)
class Reply:
    """A parsed reply: ``ok``, fields, optional tensor; ``error``/``message`` when not ok."""

    rid: int
    ok: bool
    fields: dict[str, Any]
    tensor: WireTensor | None = None

    @property
    def error(self) -> str:
        return str(self.fields.get("error", "internal"))

    @property
    def message(self) -> str:
        return str(self.fields.get("message", ""))


def decode_reply(frames: list[bytes]) -> Reply:
    """Parse a reply (raises :class:`ProtocolError` on a malformed one)."""
    try:
        header = json.loads(frames[0])
    except (UnicodeDecodeError, json.JSONDecodeError, IndexError):
        raise ProtocolError("reply: not UTF-8 JSON") from None
    if not isinstance(header, dict) or header.get("v") != VERSION or not isinstance(header.get("rid"), int):
        raise ProtocolError("reply: bad header")
    tensor = _tensor(header["tensor"], frames) if "tensor" in header else None
    return Reply(header["rid"], bool(header.get("ok")), header, tensor)
