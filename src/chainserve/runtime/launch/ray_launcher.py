"""Start each block server under a Ray actor, one per server, spread over a Ray cluster (§4.2).

Ray only places and supervises: a placement group holds one bundle per server (``{"CPU": 1}``, plus
``{"GPU": 1}`` when the cluster has a GPU for every server — with fewer, no bundle reserves one and Ray
leaves ``CUDA_VISIBLE_DEVICES`` as the node has it) with strategy ``SPREAD``, and each actor, pinned to
its bundle, starts ``chainserve block-server`` on its node as a child process: the command line of
:mod:`.local`, binding 127.0.0.1 when this launcher started Ray here and the node's address otherwise
(every node needs chainserve in the Python Ray runs). The child gets the shared secret in its
environment (a method argument of the actor: never on a command line, in a runtime env or in a log),
``--exit-with-parent`` naming the actor, and a log ``<tmp>/chainserve-ray/<name>.log`` on its node.
Every token then travels over the block servers' own ZeroMQ sockets, never through Ray.
Supervision (issue 33): an actor whose process dies is restarted by Ray itself (``max_restarts``; its
block server exits with it), and :meth:`RayLauncher.restart` starts the block server again through the
same actor, on the same bundle (the same node and device).
:meth:`RayLauncher.stop` SIGTERMs (then SIGKILLs) every child, kills the actors, removes the placement
group and shuts down the Ray this launcher started (disconnects from the cluster it joined).
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import os
import select
import subprocess
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from chainserve.runtime.launch.local import BackendArgs, block_server_argv
from chainserve.runtime.layout import ServerSpec

try:
    import ray
    from ray.exceptions import RayTaskError
    from ray.util.placement_group import PlacementGroup, placement_group, remove_placement_group
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy
except ImportError:  # the optional extra chainserve[ray]; the module must still import (doctests, --help)
    ray = None

log = logging.getLogger("chainserve.launch")


def _no_sigterm_warning(record: logging.LogRecord) -> bool:
    return "SIGTERM handler is not set" not in record.getMessage()


#: Times Ray restarts an actor whose process died (:meth:`RayLauncher.restart` then starts its server).
ACTOR_RESTARTS = 5

#: Smallest object store Ray accepts; the launcher passes only a few small arguments through it.
LOCAL_OBJECT_STORE_BYTES = 80 * 1024**2


class ServerActor:
    """Lives on the node Ray picked for one block server and owns that server's process."""

    def __init__(self) -> None:
        self.proc: subprocess.Popen | None = None
        self.bound_endpoint: str | None = None
        self.is_stopping = False
        self.lock = threading.Lock()  # start and stop may run at once (max_concurrency=2)

    def start(
        self,
        spec: ServerSpec,
        common: BackendArgs,
        slowdown: float,
        extra_delay_s: float,
        token: str,
        is_local: bool,
        timeout_s: float,
    ) -> dict[str, Any]:
        """Start the block server (stopping one this actor runs already), wait up to ``timeout_s`` for its
        ready line; its endpoint, pid, node, log."""
        self._end_child()
        node = ray.util.get_node_ip_address()
        common = dataclasses.replace(common, host="127.0.0.1" if is_local else node)
        argv = block_server_argv(spec, common, slowdown, extra_delay_s, os.getpid())
        log_path = Path(tempfile.gettempdir()) / "chainserve-ray" / f"{spec.name}.log"
        log_path.parent.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, "CHAINSERVE_TOKEN": token, "OMP_NUM_THREADS": str(common.threads), "PYTHONUNBUFFERED": "1"}
        with self.lock, open(log_path, "ab") as log_file:
            log_start = log_file.tell()  # the log is appended to: report only this run's lines
            if self.is_stopping:
                raise RuntimeError(f"block server {spec.name}: stopped before it started")
            self.proc = subprocess.Popen(
                argv, stdout=subprocess.PIPE, stderr=log_file, stdin=subprocess.DEVNULL, env=env
            )
        line = self._ready_line(timeout_s)
        try:
            endpoint = str(json.loads(line)["endpoint"])
        except (json.JSONDecodeError, KeyError, TypeError):
            self._end_child()  # not stop(): a later restart through this actor must still be allowed
            with open(log_path, "rb") as log_file:
                log_file.seek(log_start)
                tail = log_file.read().decode(errors="replace").strip().splitlines()[-5:]
            raise RuntimeError(
                f"block server {spec.name} on {node} sent no ready line within {timeout_s:g} s "
                f"(exit {self.proc.returncode}; log {log_path}): " + " | ".join(tail)
            ) from None
        self.bound_endpoint = endpoint
        return {"endpoint": endpoint, "pid": self.proc.pid, "node": node, "log": str(log_path)}

    def _ready_line(self, timeout_s: float) -> bytes:
        """The child's first stdout line, or b"" if it exits or stays silent past ``timeout_s``."""
        deadline = time.monotonic() + timeout_s
        while (remaining := deadline - time.monotonic()) > 0:
            readable, _, _ = select.select([self.proc.stdout], [], [], min(remaining, 1.0))
            if readable:
                return self.proc.stdout.readline()
            if self.proc.poll() is not None:
                break
        return b""

    def stop(self, grace_s: float = 5.0) -> int | None:
        """SIGTERM the child, wait ``grace_s``, SIGKILL it if need be; its exit status."""
        with self.lock:
            self.is_stopping = True
        return self._end_child(grace_s)

    def _end_child(self, grace_s: float = 5.0) -> int | None:
        with self.lock:
            proc = self.proc
        if proc is None:
            return None
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(grace_s)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()
        return proc.returncode

    def pid(self) -> int | None:
        return None if self.proc is None else self.proc.pid

    def actor_pid(self) -> int:
        """This actor's own process (its block server's parent)."""
        return os.getpid()

    def endpoint(self) -> str | None:
        return self.bound_endpoint


class RayLauncher:
    """Block servers under Ray actors. ``address`` ``None``: start a local Ray (or use the one this
    process already joined); else join the cluster at ``address``. ``ready_timeout_s`` bounds the
    placement and then the servers' start-up, each."""

    def __init__(self, address: str | None, token: str, ready_timeout_s: float = 300.0):
        if ray is None:
            raise RuntimeError("the ray launcher needs Ray: pip install 'chainserve[ray]'")
        self.address = address
        self.token = token
        self.ready_timeout_s = ready_timeout_s
        self.is_ray_owner = False  # this launcher called ray.init: stop() shuts down / disconnects
        self.is_local = False  # ... and started a Ray on this machine: servers bind 127.0.0.1
        self.pg: PlacementGroup | None = None
        self.actors: dict[str, Any] = {}

    async def start(
        self, specs: list[ServerSpec], common: BackendArgs, slowdown: dict[str, float], extra_delay_s: dict[str, float]
    ) -> dict[int, str]:
        """Place and start every server, wait for all to be ready; returns server index → endpoint."""
        self.common, self.slowdown, self.extra_delay_s = common, slowdown, extra_delay_s
        try:
            await self._connect(len(specs))
            num_gpus = await self._place(len(specs))
            remote_actor = ray.remote(ServerActor)
            for i, spec in enumerate(specs):
                strategy = PlacementGroupSchedulingStrategy(self.pg, placement_group_bundle_index=i)
                self.actors[spec.name] = remote_actor.options(
                    num_cpus=1, num_gpus=num_gpus, max_concurrency=2, scheduling_strategy=strategy,
                    max_restarts=ACTOR_RESTARTS, max_task_retries=1,
                ).remote()  # fmt: skip
            refs = [
                self.actors[spec.name].start.remote(
                    spec,
                    common,
                    slowdown.get(spec.name, 1.0),
                    extra_delay_s.get(spec.name, 0.0),
                    self.token,
                    self.is_local,
                    self.ready_timeout_s,
                )
                for spec in specs
            ]
            try:
                started = await asyncio.wait_for(asyncio.gather(*refs), self.ready_timeout_s + 10)
            except RayTaskError as exc:
                raise RuntimeError(str(exc.cause)) from None
        except BaseException:
            await self.stop()
            raise
        for spec, s in zip(specs, started, strict=True):
            log.info("started block server %s on %s (pid %d, log %s)", spec.name, s["node"], s["pid"], s["log"])
        return {spec.index: s["endpoint"] for spec, s in zip(specs, started, strict=True)}

    async def restart(self, spec: ServerSpec) -> str:
        """Start server ``spec.name`` again through its actor (restarted by Ray first if its process
        died); returns its new endpoint."""
        actor = self.actors[spec.name]
        call = actor.start.remote(
            spec, self.common, self.slowdown.get(spec.name, 1.0), self.extra_delay_s.get(spec.name, 0.0), self.token,
            self.is_local, self.ready_timeout_s,
        )  # fmt: skip
        try:
            started = await asyncio.wait_for(call, self.ready_timeout_s + 10)
        except RayTaskError as exc:
            raise RuntimeError(str(exc.cause)) from None
        log.info("restarted block server %s on %s (pid %d)", spec.name, started["node"], started["pid"])
        return started["endpoint"]

    async def _connect(self, num_servers: int) -> None:
        if ray.is_initialized():
            return  # this process already joined a Ray: use it, leave it running
        quiet = {"logging_level": logging.WARNING, "log_to_driver": False}
        if self.address is None:
            quiet |= {
                "address": "local",
                "num_cpus": max(os.cpu_count() or 1, num_servers),
                "include_dashboard": False,
                "object_store_memory": LOCAL_OBJECT_STORE_BYTES,
            }
        # ray.init off the loop's thread cannot (and must not) take over SIGTERM; drop its warning that says so
        worker_log = logging.getLogger("ray._private.worker")
        worker_log.addFilter(_no_sigterm_warning)
        try:
            await asyncio.to_thread(ray.init, **({"address": self.address} | quiet))
        finally:
            worker_log.removeFilter(_no_sigterm_warning)
        self.is_ray_owner = True
        self.is_local = self.address is None

    async def _place(self, num_servers: int) -> int:
        """Reserve one bundle per server; the GPUs each actor asks for (1 or 0)."""
        num_gpus = int(ray.cluster_resources().get("GPU", 0) >= num_servers)
        bundle = {"CPU": 1} | ({"GPU": 1} if num_gpus else {})
        self.pg = placement_group([dict(bundle) for _ in range(num_servers)], strategy="SPREAD")
        try:
            await asyncio.wait_for(self.pg.ready(), self.ready_timeout_s)
        except TimeoutError:
            raise RuntimeError(
                f"ray: cannot place {num_servers} block servers with {bundle} each within "
                f"{self.ready_timeout_s:g} s; available: {ray.available_resources()}"
            ) from None
        return num_gpus

    async def stop(self, grace_s: float = 5.0) -> None:
        """Stop every child (SIGTERM, ``grace_s``, SIGKILL), kill the actors, remove the placement group,
        shut down the Ray this launcher started (or disconnect from the cluster it joined). Safe to call twice."""
        actors, self.actors = list(self.actors.values()), {}
        pg, self.pg = self.pg, None
        if not ray.is_initialized():
            return
        if actors:
            try:
                await asyncio.wait_for(
                    asyncio.gather(*(a.stop.remote(grace_s) for a in actors), return_exceptions=True), grace_s + 10
                )
            except TimeoutError:
                log.warning("ray: block server actors did not answer stop(); killing them")
            for actor in actors:
                ray.kill(actor)
        if pg is not None:
            remove_placement_group(pg)
        if self.is_ray_owner:
            self.is_ray_owner = self.is_local = False
            await asyncio.to_thread(ray.shutdown)
