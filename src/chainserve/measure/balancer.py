"""A small HTTP load balancer with health checks, for tests and soaks of orchestrator failover (issue 21):
what a Kubernetes Service or nginx with health checks does in front of an active and a standby
orchestrator (``serve --standby-of``). Not a production proxy: non-streamed requests only.
"""

from __future__ import annotations

import asyncio
import threading
import time

import httpx


class Balancer:
    """An HTTP load balancer with health checks, as a Kubernetes Service or nginx puts in front of two
    orchestrators: each request goes to the first backend whose ``/health`` answered 200 at the last
    check (every 0.1 s); with none, 503 with ``Retry-After`` (a connection cut mid-request: 502)."""

    def __init__(self, backends: list[str]):
        import uvicorn
        from starlette.applications import Starlette
        from starlette.responses import Response
        from starlette.routing import Route

        self.backends, self.healthy = backends, []

        async def forward(request):
            if not self.healthy:
                return Response(b'{"error": {"message": "no backend"}}', 503, {"Retry-After": "2"})
            try:
                async with httpx.AsyncClient(base_url=self.healthy[0], timeout=60) as http:
                    r = await http.request(request.method, request.url.path, content=await request.body(),
                                           headers={"content-type": "application/json"})  # fmt: skip
            except httpx.HTTPError:
                return Response(b'{"error": {"message": "backend gone"}}', 502)
            keep = {k: v for k, v in r.headers.items() if k.lower() in ("content-type", "retry-after")}
            return Response(r.content, r.status_code, keep)

        app = Starlette(routes=[Route("/{path:path}", forward, methods=["GET", "POST"])])
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
        self.stop = threading.Event()
        self.thread = threading.Thread(target=asyncio.run, args=(self._run(),), daemon=True)
        self.thread.start()
        while not self.server.started:
            time.sleep(0.02)
        self.url = f"http://127.0.0.1:{self.server.servers[0].sockets[0].getsockname()[1]}"

    async def _run(self) -> None:
        async def check() -> None:
            async with httpx.AsyncClient(timeout=0.3) as http:
                while not self.stop.is_set():
                    healthy = []
                    for url in self.backends:
                        try:
                            if (await http.get(url + "/health")).status_code == 200:
                                healthy.append(url)
                        except httpx.HTTPError:
                            pass
                    self.healthy = healthy
                    await asyncio.sleep(0.1)

        checker = asyncio.create_task(check())
        await self.server.serve()
        checker.cancel()

    def close(self) -> None:
        self.stop.set()
        self.server.should_exit = True
        self.thread.join(10)
