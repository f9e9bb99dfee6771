"""``chainserve block-server``: one server's span of blocks and its KV cache (paper §4.2).

Kept light (no planner or simulator imports unless ``--plan`` is given) so that servers start fast.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
from pathlib import Path
from typing import Annotated

import typer

from chainserve.cli.common import user_errors
from chainserve.extras import MissingExtra
from chainserve.model.formats import WEIGHT_FORMATS
from chainserve.model.spec import SpecError
from chainserve.model.step_cost import StepCost
from chainserve.runtime.backends.base import PAGE_TOKENS
from chainserve.runtime.batching import DEFAULT_MAX_BATCH_TOKENS


def read_secret(path: Path | None, variable: str) -> str | None:
    """A secret from a file (first line), else the environment, else ``None``."""
    if path is not None:
        return path.read_text(encoding="utf-8").strip() or None
    return os.environ.get(variable) or None


def setup_logging(level: str) -> None:
    logging.basicConfig(level=level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def block_server(
    server_id: Annotated[str, typer.Option("--id", help="This server's name in the plan.")],
    plan: Annotated[
        Path | None, typer.Option(help="Take span and cache from this plan file (chainserve plan --json output).")
    ] = None,
    first_block: Annotated[
        int | None, typer.Option(help="First block (1-based), without --plan (default: none).")
    ] = None,
    num_blocks: Annotated[int | None, typer.Option(help="Number of blocks, without --plan (default: none).")] = None,
    block_slots: Annotated[
        int | None, typer.Option(help="KV block-slots (one block of one session), without --plan (default: none).")
    ] = None,
    max_tokens: Annotated[
        int, typer.Option(help="KV positions of one block-slot (the plan's s_c); a session reserves its own.")
    ] = 2048,
    page_tokens: Annotated[int, typer.Option(help="KV positions per page.")] = PAGE_TOKENS,
    max_context: Annotated[
        int | None,
        typer.Option(help="The longest session served, prompt + output (default: the model's window and the pages)."),
    ] = None,
    backend: Annotated[str, typer.Option(metavar="torch|emulated", help="torch: real weights; emulated: sleeps.")] = (
        "emulated"
    ),
    model: Annotated[
        str | None, typer.Option(metavar="NAME|PATH", help="torch backend: the model (default: none).")
    ] = None,
    step_ms_per_block: Annotated[
        float | None, typer.Option(help="emulated: compute per block per step in ms (default from --plan: τ^p/l_out).")
    ] = None,
    step_cost_ms: Annotated[
        str | None,
        typer.Option(
            metavar="A,B,PA,PB",
            help="emulated: batch the sessions and sleep an iteration's cost per block, α + β·b for b decodes "
            "and α' + β'·q per prefill chunk of q tokens, in ms (default from --plan: the server's step_cost).",
        ),
    ] = None,
    device: Annotated[
        str, typer.Option(metavar="auto|cpu|cuda|cuda:N", help="torch backend: where to compute (auto: CUDA if any).")
    ] = "auto",
    weights: Annotated[
        str | None,
        typer.Option(
            metavar="fp32|bf16|fp16|int8",
            help="torch backend: the format to hold the blocks in (default from --plan: the server's, else the "
            "model's dtype; int8: torchao weight-only).",
        ),
    ] = None,
    max_batch_tokens: Annotated[
        int,
        typer.Option(
            help="torch backend: tokens one batched iteration computes at most; prompts go in chunks of half."
        ),
    ] = DEFAULT_MAX_BATCH_TOKENS,
    threads: Annotated[
        int,
        typer.Option(min=1, help="torch backend: CPU threads for the blocks' compute (1 where servers share cores)."),
    ] = 1,
    slowdown: Annotated[float, typer.Option(help="Stretch compute X-fold.")] = 1.0,
    delay_ms: Annotated[
        float | None,
        typer.Option(help="One-way injected delay in ms (default from --plan with emulated: τ^c/(2·l_out), else 0)."),
    ] = None,
    idle_timeout_s: Annotated[float, typer.Option(help="Free a session idle this many seconds.")] = 300.0,
    host: Annotated[str, typer.Option(help="Address to bind.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to bind (0: any free port).")] = 0,
    token_file: Annotated[
        Path | None, typer.Option(help="Shared secret (default: $CHAINSERVE_TOKEN; none: accept every caller).")
    ] = None,
    exit_with_parent: Annotated[
        int | None, typer.Option(help="Exit when this parent process is gone (default: none).")
    ] = None,
    log_level: Annotated[str, typer.Option(help="debug, info, warning, error.")] = "info",
) -> None:
    """Run one block server: a span of blocks and its KV cache, answering the orchestrator."""
    from chainserve.runtime.backends.base import SpanInfo
    from chainserve.runtime.backends.factory import make_span
    from chainserve.runtime.block_server import BlockServer, ServerKnobs, serve_forever

    setup_logging(log_level)
    if exit_with_parent is not None:  # a Ctrl-C in the terminal is the parent's to handle: it stops us (SIGTERM)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
    with user_errors():
        step_s, delay_s = (step_ms_per_block or 0.0) / 1000, (delay_ms or 0.0) / 1000
        step_cost = None if step_cost_ms is None else _step_cost(step_cost_ms)
        if plan is not None:
            from chainserve.plan.plan_file import load_layout
            from chainserve.runtime.layout import server_specs

            specs = {s.name: s for s in server_specs(load_layout(plan), max_tokens, page_tokens, max_context)}
            if server_id not in specs:
                raise SpecError("id", f"{server_id!r} is not placed in the plan; placed: {', '.join(specs)}")
            spec = specs[server_id]
            info = spec.info
            if backend == "emulated":
                step_s = spec.step_s_per_block if step_ms_per_block is None else step_s
                delay_s = spec.delay_s if delay_ms is None else delay_s
                step_cost = spec.step_cost if step_cost_ms is None else step_cost
            weights = spec.weights if weights is None else weights
        else:
            if None in (first_block, num_blocks, block_slots):
                raise SpecError("plan", "give --plan, or all of --first-block, --num-blocks, --block-slots")
            info = SpanInfo(first_block, num_blocks, block_slots, max_tokens, page_tokens, max_context)
        if info.page_tokens < 1 or (info.max_context is not None and info.max_context < 1):
            raise SpecError("page-tokens/max-context", "must be positive")
        secret = read_secret(token_file, "CHAINSERVE_TOKEN") or ""
        knobs = ServerKnobs(slowdown, delay_s, idle_timeout_s, secret, max_batch_tokens)
        if weights is not None and weights not in WEIGHT_FORMATS:
            raise SpecError("weights", f"unknown weight format {weights!r}; known: {', '.join(WEIGHT_FORMATS)}")
        try:
            span, model_id = make_span(backend, info, model, step_s, device, step_cost, weights, threads)
        except MissingExtra:  # the same on every server: the line says what to install
            raise
        except ValueError as exc:  # name the server: its operator reads this in the cluster's logs
            raise SpecError(f"server {server_id}", str(exc)) from None
    server = BlockServer(server_id, span, knobs, backend, model_id)
    asyncio.run(serve_forever(server, host, port, exit_with_parent))


def _step_cost(text: str) -> StepCost:
    try:
        return StepCost.from_ms_text(text)
    except ValueError as exc:
        raise SpecError("step-cost-ms", str(exc)) from None
