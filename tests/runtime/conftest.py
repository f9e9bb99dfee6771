"""Helpers for end-to-end runtime tests: start ``chainserve serve`` the way a user does."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx

from chainserve.runtime.serve_process import serve_process

DATA = Path(__file__).parent / "data"
EMULATED_6 = DATA / "emulated-6.yaml"
REPLICAS = DATA / "emulated-replicas.yaml"


@dataclass
class Served:
    url: str
    proc: subprocess.Popen
    token: str
    log_dir: Path

    def get(self, path: str) -> dict:
        return httpx.get(self.url + path, timeout=30).json()


def children_of(pid: int) -> list[int]:
    """Block servers started with ``--exit-with-parent pid`` (scanning /proc)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                cmdline = (entry / "cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if b"block-server" in cmdline and b"--exit-with-parent" in cmdline and str(pid).encode() in cmdline:
                found.append(int(entry.name))
    return found


@contextmanager
def serving(*args: str, tmp_path: Path, ready_s: float = 180.0, token: str | None = None) -> Iterator[Served]:
    """``chainserve serve ARGS --port 0`` until the block; then SIGTERM and check nothing is left."""
    token = token or "test-token-" + os.urandom(4).hex()
    (tmp_path / "token").write_text(token)
    log_dir = tmp_path / "logs"
    if "--planner" not in args and "--plan" not in args:  # the paper's greedy plan: deterministic chains
        args = (*args, "--planner", "greedy")
    args = (*args, "--port", "0", "--token-file", str(tmp_path / "token"), "--log-dir", str(log_dir))
    children: list[int] = []
    with serve_process((*args, "--log-level", "warning"), tmp_path / "serve.err", ready_s) as served:
        children = children_of(served.proc.pid)
        yield Served(served.url, served.proc, token, log_dir)
        children = children_of(served.proc.pid)
    deadline = time.monotonic() + 5
    while (left := [pid for pid in children if _running(pid)]) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not left, f"block servers left running: {left}"


def _running(pid: int) -> bool:
    """Whether process ``pid`` exists and is not a zombie."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except (OSError, IndexError):
        return False


def server_infos(served: Served) -> list[dict]:
    """Each block server's own counters, asked directly over its transport with the shared token."""
    import asyncio

    from chainserve.runtime.client import BlockClient

    async def ask() -> list[dict]:
        infos = []
        for server in served.get("/status")["servers"]:
            client = BlockClient(server["name"], server["endpoint"], served.token)
            try:
                infos.append(await client.info())
            finally:
                client.close()
        return infos

    return asyncio.run(ask())


def sse_events(body: str) -> list[dict | str]:
    """The ``data:`` payloads of an SSE body (``[DONE]`` kept as a string)."""
    out: list[dict | str] = []
    for line in body.splitlines():
        if line.startswith("data: "):
            payload = line[len("data: ") :]
            out.append(payload if payload == "[DONE]" else json.loads(payload))
    return out


def block_server_by_hand(plan_file: Path, name: str, token_file: Path, port: str = "0") -> tuple[subprocess.Popen, str]:
    """``chainserve block-server --plan … --id NAME`` as an operator starts one; returns the process and
    its ``host:port`` once it is ready."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "chainserve", "block-server", "--plan", str(plan_file), "--id", name,
         "--host", "127.0.0.1", "--port", port, "--token-file", str(token_file), "--log-level", "warning"],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    return proc, json.loads(proc.stdout.readline())["endpoint"].removeprefix("tcp://")


def by_hand_cluster(tmp_path: Path, token: str) -> tuple[str, dict[str, subprocess.Popen], dict[str, str]]:
    """The greedy plan of emulated-6 saved in ``tmp_path`` and a block server started by hand (secret
    ``token``) for each placed server: the plan file, their processes and ``host:port`` by name."""
    plan_file = tmp_path / "plan.json"
    plan = subprocess.run(
        [sys.executable, "-m", "chainserve", "plan", str(EMULATED_6), "--planner", "greedy", "--json"],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    plan_file.write_text(plan)
    (tmp_path / "token").write_text(token)
    procs, endpoints = {}, {}
    for s in json.loads(plan)["servers"]:
        procs[s["name"]], endpoints[s["name"]] = block_server_by_hand(plan_file, s["name"], tmp_path / "token")
    return str(plan_file), procs, endpoints
