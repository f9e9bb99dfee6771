"""What :mod:`.torch_backend` and :mod:`.torch_head` share (paper §4.2): the model's config, loading
chosen tensors from safetensors, and :class:`~.base.WireTensor` ↔ ``torch.Tensor`` (raw bytes; bf16 as
its 2-byte pattern, bit-exact)."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors import safe_open
from transformers import AutoConfig, PretrainedConfig

from chainserve.runtime.backends.base import WireTensor

TO_WIRE = {
    torch.float32: "float32",
    torch.float16: "float16",
    torch.bfloat16: "bfloat16",
    torch.int32: "int32",
    torch.int64: "int64",
}
FROM_WIRE = {name: dtype for dtype, name in TO_WIRE.items()}
FLOAT_WIRE = ("float32", "float16", "bfloat16")


def load_config(model_dir: Path) -> PretrainedConfig:
    """The model's config with sdpa attention (a bare config would fall back to eager)."""
    config = AutoConfig.from_pretrained(model_dir, local_files_only=True)
    config._attn_implementation = "sdpa"
    return config


def load_tensors(model_dir: Path, rename: Callable[[str], str | None], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Only the tensors whose name ``rename`` maps to a new name (``None``: skip), read one by one from
    ``model.safetensors`` or the shards listed in ``model.safetensors.index.json``."""
    model_dir = Path(model_dir)
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        files = sorted(set(weight_map.values()))
    else:
        files = ["model.safetensors"]
    out: dict[str, torch.Tensor] = {}
    for file in files:
        with safe_open(model_dir / file, framework="pt") as f:
            for key in f.keys():
                new = rename(key)
                if new is not None:
                    out[new] = f.get_tensor(key).to(dtype)
    return out


def wire_to_torch(wire: WireTensor, hidden_size: int, dtypes: tuple[str, ...] = FLOAT_WIRE) -> torch.Tensor:
    """A [1, q, hidden_size] tensor (q ≥ 1) from the wire; ``ValueError`` on any other shape or dtype."""
    if wire.dtype not in dtypes:
        raise ValueError(f"hidden.dtype: {wire.dtype!r} is not one of {', '.join(dtypes)}")
    shape = tuple(wire.shape)
    if len(shape) != 3 or shape[0] != 1 or shape[1] < 1 or shape[2] != hidden_size:
        raise ValueError(f"hidden.shape: need [1, q >= 1, {hidden_size}], got {list(shape)}")
    # bytearray: torch.frombuffer needs a writable buffer (one small copy; the wire's bytes stay untouched)
    return torch.frombuffer(bytearray(wire.data), dtype=FROM_WIRE[wire.dtype]).view(shape)


def torch_to_wire(t: torch.Tensor) -> WireTensor:
    """Raw bytes of a tensor (bf16 via a uint16 view: numpy has no bf16)."""
    t = t.detach().contiguous().cpu()
    raw = t.view(torch.uint16) if t.dtype == torch.bfloat16 else t
    return WireTensor(TO_WIRE[t.dtype], tuple(t.shape), raw.numpy().tobytes())
