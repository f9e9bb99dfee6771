"""Start each block server as a child process, the way a user would (``chainserve block-server``, §4.2).

Each child gets its own command line (naming its id), the shared secret in its environment (never on
the command line), ``--exit-with-parent`` so it never outlives the orchestrator, and a log file. It
binds a free loopback port and reports it on its first stdout line. :meth:`LocalLauncher.stop` sends
SIGTERM, waits, then SIGKILLs what is left: no orphans, ports freed. Detached (``serve
--detach-servers``, issue 21) the children run in their own session without ``--exit-with-parent``
and ``stop`` leaves them running: an orchestrator that dies costs no loaded weights, a new one
attaches to them, ``chainserve stop`` ends them.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from chainserve.runtime.batching import DEFAULT_MAX_BATCH_TOKENS
from chainserve.runtime.layout import ServerSpec

log = logging.getLogger("chainserve.launch")


@dataclass(frozen=True, slots=True)
class BackendArgs:
    """What the block servers of a cluster share: backend, model and devices (torch: ``devices``
    names a server's own, else ``device``), iteration budget, host to bind, idle timeout, CPU threads
    per server (``--threads``, issue 30)."""

    backend: str
    model: str | None = None
    host: str = "127.0.0.1"
    idle_timeout_s: float = 300.0
    device: str = "auto"
    devices: Mapping[str, str] = field(default_factory=dict)
    max_batch_tokens: int = DEFAULT_MAX_BATCH_TOKENS
    threads: int = 1


def block_server_argv(
    spec: ServerSpec, common: BackendArgs, slowdown: float, extra_delay_s: float, parent_pid: int | None = None
) -> list[str]:
    """``python -m chainserve block-server …`` for one server. The emulated backend sleeps the plan's
    τ^p and τ^c (:class:`ServerSpec`); ``extra_delay_s`` adds to the one-way delay either way."""
    info = spec.info
    emulated = common.backend == "emulated"
    delay_s = (spec.delay_s if emulated else 0.0) + extra_delay_s
    argv = [
        sys.executable,
        "-m",
        "chainserve",
        "block-server",
        "--id",
        spec.name,
        "--first-block",
        str(info.first_block),
        "--num-blocks",
        str(info.num_blocks),
        "--block-slots",
        str(info.num_block_slots),
        "--max-tokens",
        str(info.max_tokens),
        "--page-tokens",
        str(info.page_tokens),
        "--backend",
        common.backend,
        "--host",
        common.host,
        "--port",
        "0",
        "--slowdown",
        repr(slowdown),
        "--delay-ms",
        repr(delay_s * 1000),
        "--idle-timeout-s",
        repr(common.idle_timeout_s),
        "--max-batch-tokens",
        str(common.max_batch_tokens),
        "--threads",
        str(common.threads),
    ]
    if emulated:
        argv += ["--step-ms-per-block", repr(spec.step_s_per_block * 1000)]
    if emulated and spec.step_cost is not None:
        argv += ["--step-cost-ms", spec.step_cost.ms_text()]
    if info.max_context is not None:
        argv += ["--max-context", str(info.max_context)]
    if common.model is not None:
        argv += ["--model", common.model]
    if spec.weights is not None:
        argv += ["--weights", spec.weights]
    if not emulated:
        argv += ["--device", common.devices.get(spec.name, common.device)]
    if parent_pid is not None:
        argv += ["--exit-with-parent", str(parent_pid)]
    return argv


class LocalLauncher:
    """Child processes on this machine; ``log_dir`` gets one ``<server>.log`` per server."""

    def __init__(
        self,
        log_dir: Path,
        token: str,
        ready_timeout_s: float = 300.0,
        on_exit: Callable[[str, str], None] | None = None,
        detach: bool = False,
    ):
        self.log_dir = log_dir
        self.token = token
        self.ready_timeout_s = ready_timeout_s
        self.on_exit = on_exit  # on_exit(server name, reason) when a server's process ends unasked
        self.detach = detach
        self.procs: dict[str, asyncio.subprocess.Process] = {}
        self.watchers: list[asyncio.Task] = []
        self.stopping = False

    async def start(
        self, specs: list[ServerSpec], common: BackendArgs, slowdown: dict[str, float], extra_delay_s: dict[str, float]
    ) -> dict[int, str]:
        """Start every server, wait for all to be ready; returns server index → endpoint."""
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.common, self.slowdown, self.extra_delay_s = common, slowdown, extra_delay_s
        for spec in specs:
            await self._spawn(spec)
        try:
            endpoints = await asyncio.wait_for(
                asyncio.gather(*(self._ready(spec.name) for spec in specs)), self.ready_timeout_s
            )
        except BaseException:
            await self.stop()
            raise
        self.watchers = [asyncio.create_task(self._watch(name, proc)) for name, proc in self.procs.items()]
        return {spec.index: endpoint for spec, endpoint in zip(specs, endpoints, strict=True)}

    async def _spawn(self, spec: ServerSpec) -> None:
        threads = str(self.common.threads)
        env = {**os.environ, "CHAINSERVE_TOKEN": self.token, "OMP_NUM_THREADS": threads, "PYTHONUNBUFFERED": "1"}
        argv = block_server_argv(
            spec,
            self.common,
            self.slowdown.get(spec.name, 1.0),
            self.extra_delay_s.get(spec.name, 0.0),
            None if self.detach else os.getpid(),
        )
        with open(self.log_dir / f"{spec.name}.log", "ab") as log_file:
            self.procs[spec.name] = await asyncio.create_subprocess_exec(
                *argv, stdout=asyncio.subprocess.PIPE, stderr=log_file, stdin=asyncio.subprocess.DEVNULL, env=env,
                start_new_session=self.detach,
            )  # fmt: skip
        log.info("started block server %s (pid %d)", spec.name, self.procs[spec.name].pid)

    async def restart(self, spec: ServerSpec, grace_s: float = 5.0) -> str:
        """Stop server ``spec.name`` (if running) and start it again with ``spec`` (a new span or
        arena); returns its new endpoint."""
        old = self.procs.pop(spec.name, None)  # its watcher then knows the exit was asked for
        if old is not None and old.returncode is None:
            old.terminate()
            try:
                await asyncio.wait_for(old.wait(), grace_s)
            except TimeoutError:
                old.kill()
                await old.wait()
        await self._spawn(spec)
        endpoint = await asyncio.wait_for(self._ready(spec.name), self.ready_timeout_s)
        self.watchers.append(asyncio.create_task(self._watch(spec.name, self.procs[spec.name])))
        return endpoint

    async def _watch(self, name: str, proc: asyncio.subprocess.Process) -> None:
        code = await proc.wait()
        if not self.stopping and self.procs.get(name) is proc:  # not a restart we asked for
            log.warning("block server %s exited (status %s)", name, code)
            if self.on_exit is not None:
                self.on_exit(name, f"process exited with status {code}")

    async def _ready(self, name: str) -> str:
        proc = self.procs[name]
        line = await proc.stdout.readline()
        try:
            event = json.loads(line)
            return str(event["endpoint"])
        except (json.JSONDecodeError, KeyError, TypeError):
            await proc.wait()
            tail = (self.log_dir / f"{name}.log").read_text(errors="replace").strip().splitlines()[-5:]
            raise RuntimeError(
                f"block server {name} failed to start (exit {proc.returncode}): " + " | ".join(tail)
            ) from None

    async def stop(self, grace_s: float = 5.0) -> None:
        """SIGTERM every child, wait ``grace_s``, SIGKILL the rest, reap all (detached: leave them)."""
        self.stopping = True
        for task in self.watchers:
            task.cancel()
        if self.detach:
            log.warning("left %d detached block servers running", len(self.procs))
            self.procs.clear()
            return
        for proc in self.procs.values():
            if proc.returncode is None:
                proc.terminate()
        for name, proc in self.procs.items():
            try:
                await asyncio.wait_for(proc.wait(), grace_s)
            except TimeoutError:
                log.warning("block server %s ignored SIGTERM; killing it", name)
                proc.kill()
                await proc.wait()
        self.procs.clear()
