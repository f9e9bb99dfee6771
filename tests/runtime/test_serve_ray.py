"""``chainserve serve --launcher ray``: a local Ray instance places the block servers as actors and the
orchestrator serves through them over their own transport (paper §4.2; issue: serving runtime)."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import httpx
import pytest
from tests.runtime.conftest import EMULATED_6, serving

pytest.importorskip("ray", reason="Ray is not installed (optional extra: pip install 'chainserve[ray]')")


def ray_processes() -> list[int]:
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                cmdline = (entry / "cmdline").read_bytes()
            except OSError:
                continue
            if b"raylet" in cmdline or b"gcs_server" in cmdline:
                pids.append(int(entry.name))
    return pids


def test_serve_through_emulated_block_servers_placed_as_ray_actors(tmp_path) -> None:
    assert not ray_processes(), "a Ray instance is already running here"
    with serving(
        str(EMULATED_6), "--backend", "emulated", "--launcher", "ray", tmp_path=tmp_path, ready_s=300
    ) as served:
        status = served.get("/status")
        assert len(status["servers"]) >= 3 and status["healthy"]
        assert ray_processes(), "no Ray processes: the servers were not placed by Ray"

        async def ask() -> list[httpx.Response]:
            async with httpx.AsyncClient(base_url=served.url, timeout=120) as http:
                body = {"prompt": "the chain serves", "max_tokens": 5, "temperature": 0}
                return await asyncio.gather(*(http.post("/v1/completions", json=body) for _ in range(10)))

        responses = asyncio.run(ask())
        assert [r.status_code for r in responses] == [200] * 10
        used = {h["server"] for r in responses for h in r.json()["chainserve"]["hops"]}
        assert len(used) >= 3
    deadline = time.monotonic() + 30
    while ray_processes() and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not ray_processes(), "Ray was left running"
