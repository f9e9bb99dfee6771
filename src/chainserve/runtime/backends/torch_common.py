"""What :mod:`.torch_backend` and :mod:`.torch_head` share (paper §4.2): :class:`~.base.WireTensor` ↔
``torch.Tensor`` (raw bytes; bf16 as its 2-byte pattern, bit-exact)."""

from __future__ import annotations

import torch

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
