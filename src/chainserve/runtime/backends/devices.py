"""Where the torch backend computes (issue 17): ``--device auto|cpu|cuda|cuda:N`` and its dtype.

``auto`` is a CUDA device when torch sees one, else the CPU. On a GPU weights, KV arena and compute
are bf16 (fp16 where the device has no bf16); the CPU stays fp32. Hidden states cross the wire in the
dtype they were computed in. One GPU per block server: :func:`spread` gives the block servers of one
machine a GPU each, round robin, unless a server's device is named. Torch is imported only to resolve.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

DEVICE_CHOICES = "auto|cpu|cuda|cuda:N"
_DEVICE = re.compile(r"auto|cpu|cuda(:\d+)?")


def check_device(name: str, option: str = "device") -> str:
    """``name`` normalised, or ``ValueError`` when it is not one of :data:`DEVICE_CHOICES`.

    >>> check_device(" CUDA:1 ")
    'cuda:1'
    """
    norm = name.strip().lower()
    if not _DEVICE.fullmatch(norm):
        raise ValueError(f"{option}: {name!r} is not one of {DEVICE_CHOICES}")
    return norm


def spread(names: Sequence[str], default: str, named: Mapping[str, str], num_gpus: int) -> dict[str, str]:
    """Each server's device: its own from ``named``, else ``default``; with ``default`` ``auto`` or
    ``cuda`` and several GPUs here, ``cuda:0``, ``cuda:1``, … in turn.

    >>> spread(["a", "b", "c"], "auto", {"c": "cpu"}, num_gpus=2)
    {'a': 'cuda:0', 'b': 'cuda:1', 'c': 'cpu'}
    >>> spread(["a", "b"], "auto", {}, num_gpus=0)
    {'a': 'auto', 'b': 'auto'}
    """
    out, k = {}, 0
    for name in names:
        if name in named:
            out[name] = named[name]
        elif default in ("auto", "cuda") and num_gpus > 1:
            out[name], k = f"cuda:{k % num_gpus}", k + 1
        else:
            out[name] = default
    return out


def resolve_device(name: str) -> torch.device:
    """The torch device ``name`` means here; ``ValueError`` for a malformed or absent device."""
    import torch

    name = check_device(name)
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cpu":
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise ValueError(f"device: {name!r} asked for, but torch sees no CUDA device here")
    device = torch.device(name)
    if device.index is not None and device.index >= torch.cuda.device_count():
        raise ValueError(f"device: {name!r}, but only {torch.cuda.device_count()} CUDA device(s) are visible")
    return device


def check_weights(weights: str | None, device: torch.device) -> None:
    """``ValueError`` when ``device`` cannot hold blocks in ``weights`` (issue 29): bf16 on a GPU without
    it; int8 without torchao (the torch extra's)."""
    import torch

    if weights == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise ValueError(f"weights: {device} ({torch.cuda.get_device_name(device)}) cannot compute in bf16")
    if weights == "int8":
        from chainserve.extras import require

        require("int8", "int8 weights (torchao)")


def default_dtype(device: torch.device) -> torch.dtype:
    """fp32 on the CPU; bf16 on a GPU that has it, else fp16."""
    import torch

    if device.type != "cuda":
        return torch.float32
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
