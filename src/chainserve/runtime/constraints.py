"""Structured output (OpenAI's ``response_format``; issue 20) with llguidance, token by token.

``json_object`` is any JSON object, ``json_schema`` the given schema; both compact (no free whitespace
between tokens, as OpenAI's output is), compiled by :func:`grammar_for` into an llguidance grammar
and checked there (a bad schema is a ``ValueError``: HTTP 400). :class:`Grammars` turns a grammar into
a :class:`Constraint` for one job over the head's Hugging Face tokenizer (also for forced tool calls,
:mod:`.tools`); the emulated backend has no such tokenizer, so constrained output there is a
``ValueError``. Why llguidance: MIT, one abi3 CPU
wheel without dependencies, no precompiled index per schema (masks are computed lazily, well under a
millisecond a token here), and vLLM's ``guidance`` backend; xgrammar pulls in torch, outlines-core
builds a full index per schema first.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

import llguidance
import numpy as np

#: Compact JSON: no whitespace the schema does not force.
COMPILE_OPTIONS: Any = {"whitespace_flexible": False}


def grammar_for(response_format: dict[str, Any] | None) -> str | None:
    """The llguidance grammar of an OpenAI ``response_format`` (``None`` for plain text).

    >>> grammar_for({"type": "text"}) is None
    True
    >>> grammar_for({"type": "json_schema", "json_schema": {"name": "x"}})
    Traceback (most recent call last):
    ValueError: response_format: json_schema needs a 'schema' object
    """
    kind = None if response_format is None else response_format.get("type")
    if kind in (None, "text"):
        return None
    if kind == "json_object":
        schema: Any = {"type": "object"}
    elif kind == "json_schema":
        spec = response_format.get("json_schema")
        schema = spec.get("schema") if isinstance(spec, dict) else None
        if not isinstance(schema, dict):
            raise ValueError("response_format: json_schema needs a 'schema' object")
    else:
        raise ValueError(f"response_format: type must be text, json_object or json_schema, got {kind!r}")
    try:
        grammar = llguidance.LLMatcher.grammar_from_json_schema(json.dumps(schema), COMPILE_OPTIONS)
    except ValueError as e:
        raise ValueError(f"response_format: {e}") from None
    error = llguidance.LLMatcher.validate_grammar(grammar)
    if error:
        raise ValueError(f"response_format: the schema is not supported: {error}")
    return grammar


class Constraint:
    """One job's grammar state: :meth:`allowed` tokens next, :meth:`accept` the one chosen."""

    def __init__(self, matcher: llguidance.LLMatcher, vocab_size: int):
        self.matcher, self.vocab_size = matcher, vocab_size

    def allowed(self, num_logits: int) -> np.ndarray:
        """Boolean mask over ``num_logits`` logits (ids past the tokenizer's vocabulary: never)."""
        bits = np.frombuffer(self.matcher.compute_bitmask(), dtype=np.uint8)
        mask = np.zeros(num_logits, dtype=bool)
        n = min(num_logits, self.vocab_size)
        mask[:n] = np.unpackbits(bits, bitorder="little")[:n].astype(bool)
        return mask

    def accept(self, token_id: int) -> None:
        if not self.matcher.consume_token(int(token_id)):
            raise ValueError(f"response_format: token {token_id} broke the grammar: {self.matcher.get_error()}")

    @property
    def is_done(self) -> bool:
        """The grammar is complete: no token but EOS may follow."""
        return self.matcher.is_stopped()


class Grammars:
    """Constraints over ``tokenizer`` (a Hugging Face fast tokenizer, or ``None``); the llguidance
    tokenizer is built on first use (about 0.3 s for a 49k vocabulary), once."""

    def __init__(self, tokenizer: Any | None, eos_token_ids: Sequence[int]):
        self.tokenizer, self.eos_token_ids = tokenizer, list(eos_token_ids)
        self._ll: llguidance.LLTokenizer | None = None

    def constraint(self, grammar: str) -> Constraint:
        if self.tokenizer is None:
            raise ValueError(
                "this backend has no Hugging Face tokenizer to constrain the output (a response_format, or a "
                "required or named tool_choice)"
            )
        if self._ll is None:
            from llguidance.hf import from_tokenizer  # imports transformers: only with a HF tokenizer

            self._ll = from_tokenizer(self.tokenizer, eos_token=self.eos_token_ids or None)
        matcher = llguidance.LLMatcher(self._ll, grammar, log_level=0)
        if matcher.is_error():
            raise ValueError(f"response_format: {matcher.get_error()}")
        return Constraint(matcher, self._ll.vocab_size)
