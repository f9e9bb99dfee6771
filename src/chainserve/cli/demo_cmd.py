"""``chainserve demo``: serve SmolLM2 on a small local heterogeneous cluster and show where requests went."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from chainserve.cli.common import fail, stderr_console, stdout_console
from chainserve.runtime.models import SMOLLM2_CONVERSION_S


def demo(
    max_tokens: Annotated[int, typer.Option(help="Tokens to generate per answer.")] = 24,
    backend: Annotated[
        str, typer.Option(metavar="torch|emulated", help="torch: the real SmolLM2 weights; emulated: no weights.")
    ] = "torch",
    model: Annotated[str, typer.Option(metavar="NAME|PATH", help="The model (torch backend).")] = "smollm2-135m",
    device: Annotated[
        str, typer.Option(metavar="auto|cpu|cuda|cuda:N", help="torch backend: where the head and servers compute.")
    ] = "auto",
    log_dir: Annotated[
        Path | None, typer.Option(help="Keep the block servers' logs here (default: a temporary folder, removed).")
    ] = None,
) -> None:
    """Start 5 unequal block servers with SmolLM2-135M-Instruct, answer a few chat prompts, shut down."""
    from chainserve.cli.plan_cmd import chains_table, summary_table
    from chainserve.plan.types import Layout, Plan
    from chainserve.runtime.demo import run_demo

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    err, out = stderr_console(), stdout_console()

    def show_plan(layout: Layout) -> None:
        if isinstance(layout, Plan):  # the proposed method's chains; c_k and the bounds as `chainserve plan`
            out.print(chains_table(layout))
            out.print(summary_table(layout))

    once = f" (the first run converts SmolLM2 once, ~{SMOLLM2_CONVERSION_S} s)" if backend == "torch" else ""
    err.print(f"[bold]chainserve demo[/]: planning the demo cluster and starting its block servers{once}…")
    try:
        records = asyncio.run(
            run_demo(
                max_tokens=max_tokens,
                model=model,
                backend=backend,
                device=device,
                report=lambda line: err.print(line, markup=False, highlight=False),
                show_plan=show_plan,
                log_dir=log_dir,
            )
        )
    except (ValueError, RuntimeError) as exc:
        raise fail(str(exc)) from None
    table = Table(title="Where each request went", title_justify="left", show_lines=True)
    for header in ("prompt", "answer", "chain", "servers (blocks)", "queued s", "first token s", "total s"):
        table.add_column(header, overflow="fold")
    for r in records:
        hops = " → ".join(f"{h['server']} ({h['first_block']}–{h['last_block']})" for h in r["hops"])
        chain = "—" if r["chain"] is None else str(r["chain"])  # the API numbers chains from 1
        table.add_row(
            r["prompt"],
            r["answer"].strip(),
            chain,
            hops,
            f"{r['queued_s']:.2f}",
            f"{r['ttft_s']:.2f}",
            f"{r['e2e_s']:.2f}",
        )
    out.print(table)
    err.print("all block servers stopped.")
