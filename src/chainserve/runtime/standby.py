"""A standby orchestrator (issue 21; beyond the paper, whose orchestrator is a single process).

``chainserve serve --standby-of URL`` watches the active orchestrator at URL: every ``interval_s`` it
asks ``/health`` and keeps the active's live plan (``/plan``) and its block servers' endpoints
(``/status``). Meanwhile it answers every route with 503 (``/health``: ``standby``; the API: OpenAI's
error shape with ``Retry-After``), so a load balancer with health checks sends it nothing. When the
active has not answered for ``deadline_s`` it takes over (:func:`~.service.serve`): a service on the
same plan and the same block servers (``--plan … --servers …``), whose new epoch frees the dead
orchestrator's sessions at once (:mod:`.protocol`); no block server restarts. The HTTP port stays the
same: the app behind it is switched (:class:`Switch`). One ``takeover`` log line says why;
``chainserve:takeovers_total`` counts it.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import httpx
from starlette.responses import JSONResponse

from chainserve.runtime import openai_schema as oa

log = logging.getLogger("chainserve.standby")


class Switch:
    """An ASGI app that passes every request to ``app``, which can be replaced while serving."""

    def __init__(self, app: Callable) -> None:
        self.app = app

    async def __call__(self, scope, receive, send) -> None:
        await self.app(scope, receive, send)


def standing_by(active_url: str) -> Callable:
    """The ASGI app of a standby: 503 everywhere (``/health`` says whom it stands by for)."""

    async def app(scope, receive, send) -> None:
        if scope["type"] != "http":
            return
        if scope["path"] == "/health":
            body: dict[str, Any] = {"status": "standby", "active": active_url}
        else:
            body = oa.error_body(f"standing by for {active_url}", "server_error", None, "unavailable")
        await JSONResponse(body, status_code=503, headers={"Retry-After": "1"})(scope, receive, send)

    return app


@dataclass(frozen=True, slots=True)
class ActiveState:
    """What the standby last learnt from the active: its plan (``/plan``), its block servers'
    endpoints (name → ``tcp://host:port``) and when it last answered (monotonic seconds)."""

    plan: dict[str, Any]
    endpoints: dict[str, str]
    answered_at: float


async def watch_active(url: str, interval_s: float, deadline_s: float) -> tuple[ActiveState, float]:
    """Poll the active until it has been silent for ``deadline_s`` (after answering at least once);
    returns what it last said and how long it has been silent."""
    state: ActiveState | None = None
    async with httpx.AsyncClient(base_url=url, timeout=max(interval_s, 0.5)) as http:
        while True:
            try:
                await http.get("/health")  # any answer, 200 or 503, means it is alive
                plan, status = (await http.get("/plan")).json(), (await http.get("/status")).json()
                placed = {s["name"] for s in plan["servers"]}
                endpoints = {s["name"]: s["endpoint"] for s in status["servers"] if s["name"] in placed}
                state = ActiveState(plan, endpoints, time.monotonic())
            except (httpx.HTTPError, ValueError, KeyError):
                pass
            if state is not None and time.monotonic() - state.answered_at > deadline_s:
                return state, time.monotonic() - state.answered_at
            await asyncio.sleep(interval_s)
