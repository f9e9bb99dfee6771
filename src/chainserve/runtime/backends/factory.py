"""Build a backend by name; torch is imported only when the torch backend is asked for."""

from __future__ import annotations

import logging

from chainserve.extras import require
from chainserve.model.step_cost import StepCost
from chainserve.runtime.backends.base import ModelHead, SpanBackend, SpanInfo

BACKENDS = ("torch", "emulated")

log = logging.getLogger("chainserve.block_server")


def make_span(
    backend: str,
    info: SpanInfo,
    model: str | None,
    step_s_per_block: float,
    device: str = "auto",
    step_cost: StepCost | None = None,
    weights: str | None = None,
    threads: int = 1,
) -> tuple[SpanBackend, str]:
    """The span backend of a block server and the served model's id; ``device``: where torch computes
    (:mod:`.devices`; the emulated backend has none); ``step_cost``: the emulated backend batches and
    sleeps it (issue 18); ``weights``: the torch span's weight format (fp32|bf16|fp16|int8, issue 29;
    ``None``: the device's default dtype); ``threads``: torch's CPU threads (issue 30: 1 where several
    servers share the machine's cores)."""
    if threads < 1:
        raise ValueError(f"threads: must be at least 1, got {threads}")
    if backend == "emulated":
        from chainserve.runtime.backends.emulated import EmulatedSpan

        return EmulatedSpan(info, step_s_per_block, step_cost), "emulated"
    if backend == "torch":
        require("torch", "the torch backend")
        import torch

        from chainserve.runtime.backends.devices import check_weights, default_dtype, resolve_device
        from chainserve.runtime.backends.torch_backend import TorchSpan
        from chainserve.runtime.models import resolve_model

        torch.set_num_threads(threads)
        if model is None:
            raise ValueError("model: the torch backend needs --model (a name such as smollm2-135m, or a path)")
        path, where = resolve_model(model), resolve_device(device)
        check_weights(weights, where)
        span = TorchSpan(path, info, default_dtype(where), where, weights)
        log.info("span %d..%d warmed up in %.2f s", info.first_block, info.last_block, span.warm_up())
        return span, path.name
    raise ValueError(f"backend: unknown backend {backend!r}; known: {', '.join(BACKENDS)}")


def make_head(
    backend: str, model: str | None, model_name: str, num_blocks: int, max_tokens: int | None, device: str = "auto"
) -> ModelHead:
    """The orchestrator's tokenizer and LM head for ``backend`` (torch: on ``device``); ``max_tokens``
    caps the served context (torch: below the model's window; ``None``: the window)."""
    if backend == "emulated":
        from chainserve.runtime.backends.emulated import EmulatedHead

        if max_tokens is None:
            raise ValueError("max_tokens: the emulated model has no window of its own: give one")
        return EmulatedHead(model_name, num_blocks, max_tokens)
    if backend == "torch":
        require("torch", "the torch backend")
        import torch

        from chainserve.runtime.backends.devices import default_dtype, resolve_device
        from chainserve.runtime.backends.torch_backend import TorchHead
        from chainserve.runtime.models import resolve_model

        torch.set_num_threads(1)
        if model is None:
            raise ValueError("model: the torch backend needs --model (a name such as smollm2-135m, or a path)")
        where = resolve_device(device)
        head = TorchHead(resolve_model(model), default_dtype(where), max_tokens, where)
        if head.num_blocks != num_blocks:
            raise ValueError(f"model: {model} has {head.num_blocks} blocks but the cluster's model has {num_blocks}")
        return head
    raise ValueError(f"backend: unknown backend {backend!r}; known: {', '.join(BACKENDS)}")
