"""Optional extras (``pyproject.toml``): what the base install lacks, named in one line.

The base install plans, simulates, runs experiments and serves the emulated backend; the ``torch``
extra brings real weights (the torch backend, structured output and tools over a Hugging Face
tokenizer) and ``ray`` the Ray launcher. A feature that needs a missing extra raises
:class:`MissingExtra`, a ``ValueError``, so every command prints it as its one ``error:`` line.
"""

from __future__ import annotations

from importlib.util import find_spec

#: The modules each extra must bring for chainserve's use of it.
EXTRA_MODULES = {
    "torch": ("torch", "transformers", "safetensors", "tokenizers", "gguf"),
    "ray": ("ray",),
    "int8": ("torch", "torchao"),  # within the torch extra: int8 weights (issue 29)
}
#: The extra to install for each key of :data:`EXTRA_MODULES`.
INSTALLS = {"int8": "torch"}


class MissingExtra(ValueError):
    """A feature needs an optional extra that is not installed."""


def missing_module(extra: str) -> str | None:
    """The first module of ``extra`` that is not installed (``None``: all are)."""
    return next((m for m in EXTRA_MODULES[extra] if find_spec(m) is None), None)


def require(extra: str, feature: str) -> None:
    """Raise :class:`MissingExtra` when ``extra`` is not installed, naming ``feature`` and the install.

    >>> require("torch", "the torch backend") if missing_module("torch") is None else None
    """
    module = missing_module(extra)
    if module is not None:
        extra = INSTALLS.get(extra, extra)
        raise MissingExtra(
            f"{feature} needs the '{extra}' extra ({module} is not installed): pip install 'chainserve[{extra}]'"
        )
