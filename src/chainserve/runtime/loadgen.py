"""A small load generator for a running chainserve (or any OpenAI-compatible) server, with fault
injection: used by the fault and soak tests and by ``benchmarks/fault_injection.py`` / ``soak.py``.

Requests are streamed chat or completion calls; each result keeps the streamed text (so a duplicated or
lost token shows), the HTTP status, and the ``chainserve`` route of the final chunk (attempts, times).
Faults are callables scheduled at offsets from the start.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import httpx


@dataclass(slots=True)
class Result:
    """One request: ``status`` (HTTP, or 0 when the connection failed), the streamed ``text``, the final
    chunk's ``finish_reason`` and ``chainserve`` route, and its wall time."""

    prompt: str
    status: int = 0
    text: str = ""
    finish_reason: str | None = None
    route: dict[str, Any] = field(default_factory=dict)
    error: str = ""
    elapsed_s: float = 0.0

    @property
    def ok(self) -> bool:
        return self.status == 200 and self.finish_reason is not None and not self.error

    @property
    def resumed(self) -> bool:
        return self.route.get("num_attempts", 1) > 1


async def stream_completion(http: httpx.AsyncClient, prompt: str, max_tokens: int, **extra: Any) -> Result:
    """POST /v1/completions with ``stream: true``; collect the text deltas and the final route."""
    result = Result(prompt)
    began = time.monotonic()
    body = {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True, **extra}
    try:
        async with http.stream("POST", "/v1/completions", json=body) as response:
            result.status = response.status_code
            if response.status_code != 200:
                result.error = (await response.aread()).decode(errors="replace")[:300]
                return result
            async for line in response.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[len("data: ") :])
                if "error" in chunk:
                    result.error = chunk["error"].get("message", "error")
                    continue
                for choice in chunk.get("choices", []):
                    result.text += choice.get("text") or ""
                    result.finish_reason = choice.get("finish_reason") or result.finish_reason
                result.route = chunk.get("chainserve", result.route)
    except httpx.HTTPError as exc:
        result.error = f"{type(exc).__name__}: {exc}"
    finally:
        result.elapsed_s = time.monotonic() - began
    return result


async def run_load(
    url: str,
    prompts: Sequence[str],
    max_tokens: int,
    concurrency: int,
    faults: Sequence[tuple[float, Callable[[], Awaitable[None] | None]]] = (),
    timeout_s: float = 300.0,
) -> list[Result]:
    """Send every prompt (``concurrency`` at a time, each as soon as a slot frees) while running
    ``faults`` at their offsets (seconds from the start); return the results in prompt order."""
    results: list[Result | None] = [None] * len(prompts)
    queue: asyncio.Queue[int] = asyncio.Queue()
    for i in range(len(prompts)):
        queue.put_nowait(i)

    async with httpx.AsyncClient(base_url=url, timeout=timeout_s) as http:

        async def worker() -> None:
            while not queue.empty():
                i = queue.get_nowait()
                results[i] = await stream_completion(http, prompts[i], max_tokens)

        async def inject() -> None:
            began = time.monotonic()
            for at_s, fault in sorted(faults, key=lambda f: f[0]):
                await asyncio.sleep(max(0.0, at_s - (time.monotonic() - began)))
                outcome = fault()
                if outcome is not None:
                    await outcome

        await asyncio.gather(inject(), *(worker() for _ in range(concurrency)))
    return [r for r in results if r is not None]


def report(results: Sequence[Result], expected: Callable[[str], str] | None = None) -> dict[str, Any]:
    """Counts: sent, completed, resumed, lost (not completed, or — when ``expected`` gives each
    prompt's fault-free text — completed with other text), and the mean latency of resumed vs
    other requests."""
    wrong = [r for r in results if r.ok and expected is not None and r.text != expected(r.prompt)]
    resumed = [r.elapsed_s for r in results if r.ok and r.resumed]
    plain = [r.elapsed_s for r in results if r.ok and not r.resumed]
    return {
        "sent": len(results),
        "completed": sum(r.ok for r in results),
        "resumed": len(resumed),
        "lost": sum(not r.ok for r in results) + len(wrong),
        "wrong_text": len(wrong),
        "mean_latency_s": sum(plain) / len(plain) if plain else None,
        "mean_latency_resumed_s": sum(resumed) / len(resumed) if resumed else None,
    }
