"""``chainserve demo``: a small heterogeneous cluster serving the real SmolLM2 model, end to end (§4.2).

Five block servers (child processes) with unequal speeds and delays host SmolLM2-135M-Instruct's 30
blocks as the planner placed them; the orchestrator serves the OpenAI API on a free loopback port; a
few chat prompts go through it at once with plain HTTP, and each answer is printed with the chain,
servers, blocks and times it took (after the plan it serves). Everything shuts down at the end.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path

import httpx

from chainserve.plan.types import Layout
from chainserve.runtime.service import ServeConfig, Service, start_http

DEMO_CLUSTER = Path(__file__).resolve().parents[1] / "data" / "demo-cluster.yaml"
#: Heterogeneity on one host: compute slowdown and one-way delay (ms) per server of the demo cluster.
DEMO_SLOWDOWN = {"fast": 1.0, "fast2": 1.0, "mid": 2.0, "slow": 3.0, "slow2": 3.0}
DEMO_DELAY_MS = {"fast": 1.0, "fast2": 2.0, "mid": 2.0, "slow": 3.0, "slow2": 3.0}
DEMO_PROMPTS = (
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "Name three primary colours.",
    "Explain in one sentence what a GPU is.",
    "Give me a synonym for 'happy'.",
    "What is 12 times 12?",
    "Which planet is known as the red planet?",
)


async def run_demo(
    prompts: tuple[str, ...] = DEMO_PROMPTS,
    max_tokens: int = 24,
    model: str = "smollm2-135m",
    cluster: Path = DEMO_CLUSTER,
    backend: str = "torch",
    report: Callable[[str], None] = print,
    device: str = "auto",
    show_plan: Callable[[Layout], None] | None = None,
    log_dir: Path | None = None,
) -> list[dict]:
    """Serve the demo cluster, send ``prompts`` at once, return one record per answer; ``show_plan``
    gets the layout served once the block servers are up; ``log_dir`` keeps their logs (default: a
    temporary folder, removed at the end)."""
    config = ServeConfig(
        cluster=cluster,
        backend=backend,
        model=model if backend == "torch" else None,
        port=0,
        slowdown=DEMO_SLOWDOWN,
        delay_ms=DEMO_DELAY_MS,
        device=device,
        log_dir=log_dir,
    )
    async with Service(config) as service:
        server, task, url = await start_http(service.app(), "127.0.0.1", 0)
        try:
            report(f"serving {service.orchestrator.model_id} at {url} with {len(service.specs)} block servers")
            if show_plan is not None:
                show_plan(service.layout)
            async with httpx.AsyncClient(base_url=url, timeout=600) as client:

                async def ask(prompt: str) -> dict:
                    body = {
                        "messages": [{"role": "user", "content": prompt}],
                        "max_tokens": max_tokens,
                        "temperature": 0,
                    }
                    response = await client.post("/v1/chat/completions", json=body)
                    response.raise_for_status()
                    data = response.json()
                    return {
                        "prompt": prompt,
                        "answer": data["choices"][0]["message"]["content"],
                        "usage": data["usage"],
                        **data["chainserve"],
                    }

                return list(await asyncio.gather(*(ask(p) for p in prompts)))
        finally:
            server.should_exit = True
            await task
