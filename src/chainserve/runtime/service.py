"""``chainserve serve`` as a library: plan, start the block servers, connect, serve HTTP (§4.2).

:class:`Service` assembles the pieces in order — the layout (planned from a cluster file by the chosen
method, or read from a saved plan), the dispatcher over it, the model head, the block servers (child
processes, Ray actors, or already running at given addresses), one client per server, the orchestrator
and the FastAPI app — and takes them down in reverse order. :func:`serve` runs it under uvicorn until
SIGINT/SIGTERM. With ``adapt`` (proposed method, local launcher) an adaptive controller re-plans
for the measured load: each block server's arena then holds its whole cache memory for its span
(:func:`~chainserve.plan.recovery.arena_block_slots`) and the plan in force sets its admission limit within it.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import os
import secrets
import shutil
import signal
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import uvicorn
import zmq

from chainserve.adapt.controller import AdaptConfig, AdaptiveController
from chainserve.dispatch.base import Dispatcher
from chainserve.extras import require
from chainserve.methods import build_method, check_method_name, dispatcher_for
from chainserve.model.cluster_file import load_cluster
from chainserve.model.limits import MAX_TOKENS
from chainserve.model.spec import SpecError
from chainserve.plan.plan_file import layout_to_dict, load_layout
from chainserve.plan.recovery import arena_block_slots, replace_survivors
from chainserve.plan.types import Layout, Plan, default_max_waiting
from chainserve.runtime.api import create_app
from chainserve.runtime.backends.base import PAGE_TOKENS
from chainserve.runtime.backends.devices import check_device, spread
from chainserve.runtime.backends.factory import BACKENDS, make_head
from chainserve.runtime.batching import DEFAULT_MAX_BATCH_TOKENS
from chainserve.runtime.client import BlockClient
from chainserve.runtime.launch.local import BackendArgs, LocalLauncher
from chainserve.runtime.layout import ServerSpec, server_specs
from chainserve.runtime.metrics import RuntimeMetrics
from chainserve.runtime.models import measured_model, torch_model_for
from chainserve.runtime.orchestrator import Orchestrator
from chainserve.runtime.standby import Switch, standing_by, watch_active

log = logging.getLogger("chainserve.service")

LAUNCHERS = ("local", "ray")
#: KV positions per session when neither the model spec nor the user says.
DEFAULT_MAX_TOKENS = 2048


@dataclass(frozen=True)
class ServeConfig:
    """Everything ``chainserve serve`` takes (see its ``--help``)."""

    cluster: Path | None = None
    plan: Path | None = None
    backend: str = "emulated"
    model: str | None = None
    method: str = "proposed"
    launcher: str = "local"
    ray_address: str | None = None
    servers: dict[str, str] = field(default_factory=dict)
    host: str = "127.0.0.1"
    port: int = 8000
    max_tokens: int | None = None
    slowdown: dict[str, float] = field(default_factory=dict)
    delay_ms: dict[str, float] = field(default_factory=dict)
    seed: int = 0
    max_waiting: int | None = None
    api_key: str | None = field(default=None, repr=False)
    token: str | None = field(default=None, repr=False)
    log_dir: Path | None = None
    request_timeout_s: float = 600.0
    heartbeat_s: float = 0.5
    heartbeat_deadline_s: float = 2.0
    planner: str = "best"  # proposed chains: "best" (chainserve.plan.best) or "greedy" (the paper's)
    adapt: AdaptConfig | None = None  # re-plan for the measured load (proposed method, local launcher)
    adapt_interval_s: float = 0.5  # how often the controller is asked besides after each arrival
    device: str = "auto"  # torch: the orchestrator's head and every block server without its own
    devices: dict[str, str] = field(default_factory=dict)  # torch: a block server's own device
    max_batch_tokens: int = DEFAULT_MAX_BATCH_TOKENS
    threads: int = 1  # torch: CPU threads of every block server started (issue 30)
    detach_servers: bool = False  # local launcher: block servers outlive this process (chainserve stop)
    standby_of: str | None = None  # stand by for the orchestrator at this URL, take over when it is silent
    standby_interval_s: float = 0.25
    standby_deadline_s: float = 1.0
    max_context: int | None = None

    def __post_init__(self) -> None:
        if self.backend not in BACKENDS:
            raise SpecError("backend", f"unknown backend {self.backend!r}; known: {', '.join(BACKENDS)}")
        if self.launcher not in LAUNCHERS:
            raise SpecError("launcher", f"unknown launcher {self.launcher!r}; known: {', '.join(LAUNCHERS)}")
        if self.standby_of is not None:
            if self.cluster is not None or self.plan is not None or self.servers:
                raise SpecError("standby_of", "takes the active orchestrator's plan and servers: no cluster file, "
                                "--plan or --servers")  # fmt: skip
        elif (self.cluster is None) == (self.plan is None):
            raise SpecError("cluster", "give a cluster file or --plan (one of them)")
        check_method_name(self.method)
        if self.backend == "torch":
            require("torch", "the torch backend")
        if self.launcher == "ray":
            require("ray", "the ray launcher")
        for name, value in self.slowdown.items():
            if not value >= 1:
                raise SpecError("slowdown", f"{name}: must be ≥ 1, got {value}")
        try:
            object.__setattr__(self, "device", check_device(self.device))
            devices = {name: check_device(value, f"device {name}") for name, value in self.devices.items()}
            object.__setattr__(self, "devices", devices)
        except ValueError as exc:
            raise SpecError("device", str(exc)) from None
        if self.max_batch_tokens < 2:
            raise SpecError("max_batch_tokens", f"must be at least 2, got {self.max_batch_tokens}")
        if self.threads < 1:
            raise SpecError("threads", f"must be at least 1, got {self.threads}")
        for name, value in self.delay_ms.items():
            if not value >= 0:
                raise SpecError("delay_ms", f"{name}: must be ≥ 0, got {value}")
        if self.max_tokens is not None and self.max_tokens < 2:
            raise SpecError("max_tokens", f"must be at least 2, got {self.max_tokens}")
        if self.max_context is not None and self.max_context < 2:
            raise SpecError("max_context", f"must be at least 2, got {self.max_context}")
        if self.max_waiting is not None and self.max_waiting < 0:
            raise SpecError("max_waiting", f"must be non-negative, got {self.max_waiting}")
        for name in (
            "request_timeout_s", "heartbeat_s", "heartbeat_deadline_s", "adapt_interval_s", "standby_interval_s",
            "standby_deadline_s",
        ):  # fmt: skip
            if not 0 < getattr(self, name) <= 86_400:
                raise SpecError(name, f"must lie in (0, 86400] seconds, got {getattr(self, name)}")
        if self.adapt is not None:
            if check_method_name(self.method)[0] != "proposed":
                raise SpecError("adapt", f"adapts the proposed method's chains only, not --method {self.method}")
            if self.launcher != "local" or self.servers:
                raise SpecError("adapt", "restarts block servers with new spans: needs the local launcher")


def layout_to_serve(config: ServeConfig) -> tuple[Layout, str]:
    """The layout to serve and the method serving it."""
    if config.plan is not None:
        layout = load_layout(config.plan)
        return layout, config.method if config.method != "proposed" else layout.method
    rng = np.random.default_rng(config.seed)
    setup = build_method(config.method, load_cluster(config.cluster, measured_model), rng, config.planner)
    return setup.plan_or_placement, config.method


def paged_dispatcher(method: str, layout: Layout, rng: np.random.Generator, slot_tokens: int) -> Dispatcher:
    """The method's dispatcher over ``layout`` with the block servers' KV paging (issue 30): a job
    reserves its prompt + output in pages of :data:`PAGE_TOKENS` against each chain's c_k block-slots
    of ``slot_tokens`` tokens (:func:`~chainserve.methods.dispatcher_for`)."""
    return dispatcher_for(method, layout, rng, page_tokens=PAGE_TOKENS, tokens_per_slot=slot_tokens)


class Service:
    """The running system; use ``async with Service(config) as service``."""

    def __init__(self, config: ServeConfig):
        self.config = config
        self.layout, self.method = layout_to_serve(config)
        if config.adapt is not None and not isinstance(self.layout, Plan):
            raise SpecError("adapt", f"adapts the proposed method's chains only, not a {self.layout.method} plan")
        problem = self.layout.problem
        model = problem.model
        self.max_tokens = config.max_tokens or model.max_tokens or DEFAULT_MAX_TOKENS
        self.model = torch_model_for(model, config.model) if config.backend == "torch" else config.model
        self.specs = self._specs(self.layout)
        names = {spec.name for spec in self.specs}
        for option, values in (
            ("slowdown", config.slowdown),
            ("delay_ms", config.delay_ms),
            ("servers", config.servers),
            ("device", config.devices),
        ):
            unknown = sorted(set(values) - names)
            if unknown:
                raise SpecError(option, f"unknown server(s) {', '.join(unknown)}; placed: {', '.join(sorted(names))}")
        if config.servers and set(config.servers) != names:
            raise SpecError("servers", f"give an address for every placed server: {', '.join(sorted(names))}")
        self.token = config.token or secrets.token_hex(16)
        self.metrics = RuntimeMetrics()
        self.launcher: LocalLauncher | None = None
        self.ray = None
        self.clients: dict[int, BlockClient] = {}
        self.orchestrator: Orchestrator | None = None
        self.ctx: zmq.Context | None = None
        self.log_dir = config.log_dir or _temporary_log_dir()
        # a folder made here goes at stop, unless detached block servers still log into it
        self.removes_log_dir = config.log_dir is None and not config.detach_servers
        if config.token is None:
            self._save_token()

    def _save_token(self) -> None:
        """A generated secret is written, owner-only, to ``LOG_DIR/token`` so operator tools that talk to the
        block servers (``chainserve profile --url … --token-file``) can use it; it never goes to a log."""
        self.log_dir.mkdir(parents=True, exist_ok=True)
        path = self.log_dir / "token"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(self.token + "\n")

    async def __aenter__(self) -> Service:
        try:
            await self.start()
        except BaseException:
            await self.stop()
            raise
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def start(self) -> None:
        config, model = self.config, self.layout.problem.model
        context = config.max_context or (MAX_TOKENS if config.backend == "emulated" else None)
        head = make_head(config.backend, self.model, model.name, model.num_blocks, context, config.device)
        if head.max_tokens < self.max_tokens:  # the served context is shorter: size the block-slots for it
            self.max_tokens = head.max_tokens
            self.specs = self._specs(self.layout)
        self.dispatcher = paged_dispatcher(
            self.method, self.layout, np.random.default_rng(config.seed), self.max_tokens
        )
        endpoints = await self._start_servers()
        self.ctx = zmq.Context()
        names = {spec.index: spec.name for spec in self.specs}
        self.epoch = time.time_ns() // 1000  # newer than any orchestrator before this one (protocol: epochs)
        self.metrics.epoch.set(self.epoch)
        self.clients = {
            j: BlockClient(names[j], endpoint, self.token, self.ctx, epoch=self.epoch)
            for j, endpoint in endpoints.items()
        }
        method = self.method
        max_waiting = default_max_waiting(self.layout) if config.max_waiting is None else config.max_waiting
        controller = None
        if config.adapt is not None:
            controller = AdaptiveController(self.layout.problem, self.layout, config.adapt)
        self.orchestrator = Orchestrator(
            self.layout,
            self.dispatcher,
            head,
            self.clients,
            metrics=self.metrics,
            max_waiting=max_waiting,
            method=method,
            request_timeout_s=config.request_timeout_s,
            plan_ops=ServicePlanOps(self, method) if isinstance(self.layout, Plan) else None,
            heartbeat_s=config.heartbeat_s,
            heartbeat_deadline_s=config.heartbeat_deadline_s,
            controller=controller,
            adapt_interval_s=config.adapt_interval_s,
            max_waiting_follows_plan=config.max_waiting is None,
            epoch=self.epoch,
        )
        await self.orchestrator.connect()

    def _specs(self, layout: Layout) -> list[ServerSpec]:
        """The block servers of ``layout``; when adapting, each arena holds the server's whole cache
        memory beside its span (any later plan for that span fits; the plan sets the limit)."""
        specs = server_specs(layout, self.max_tokens, PAGE_TOKENS, self.config.max_context)
        if self.config.adapt is None:
            return specs
        problem = layout.problem
        return [
            dataclasses.replace(
                spec,
                info=dataclasses.replace(
                    spec.info, num_block_slots=arena_block_slots(problem, layout.placement.span_of(spec.index))
                ),
            )
            for spec in specs
        ]

    async def _start_servers(self) -> dict[int, str]:
        config = self.config
        if config.servers:
            index = {spec.name: spec.index for spec in self.specs}
            return {
                index[name]: address if "://" in address else f"tcp://{address}"
                for name, address in config.servers.items()
            }
        devices = config.devices
        if config.backend == "torch" and config.launcher == "local":  # one GPU per block server here
            import torch

            devices = spread([s.name for s in self.specs], config.device, devices, torch.cuda.device_count())
        common = BackendArgs(
            config.backend,
            self.model,
            device=config.device,
            devices=devices,
            max_batch_tokens=config.max_batch_tokens,
            threads=config.threads,
        )
        delays = {name: ms / 1000 for name, ms in config.delay_ms.items()}
        if config.launcher == "ray":
            from chainserve.runtime.launch.ray_launcher import RayLauncher

            self.ray = RayLauncher(config.ray_address, self.token)
            return await self.ray.start(self.specs, common, config.slowdown, delays)
        self.launcher = LocalLauncher(
            self.log_dir, self.token, on_exit=self._server_exited, detach=config.detach_servers
        )
        log.info("block server logs: %s", self.log_dir)
        endpoints = await self.launcher.start(self.specs, common, config.slowdown, delays)
        if config.detach_servers:
            plan_file = self.log_dir / "plan.json"
            plan_file.write_text(json.dumps(layout_to_dict(self.layout), indent=2), encoding="utf-8")
            servers = ",".join(f"{spec.name}={endpoints[spec.index].removeprefix('tcp://')}" for spec in self.specs)
            log.warning(
                "block servers detached: they outlive this process. Attach again with `chainserve serve --plan "
                "%s --servers %s`; stop them with `chainserve stop --servers %s`", plan_file, servers, servers,
            )  # fmt: skip
        return endpoints

    def _server_exited(self, name: str, reason: str) -> None:
        if self.orchestrator is not None:
            self.orchestrator.server_failed(name, reason)

    def app(self):
        return create_app(self.orchestrator, self.metrics, api_key=self.config.api_key)

    async def stop(self) -> None:
        """Stop in reverse order; the block servers are stopped whatever failed before."""
        try:
            if self.orchestrator is not None:
                await self.orchestrator.close()
                self.clients.update({r.index: r.client for r in self.orchestrator.servers})  # restarted ones too
            for client in self.clients.values():
                client.close()
            if self.ctx is not None:
                self.ctx.term()
                self.ctx = None
        finally:
            if self.launcher is not None:
                await self.launcher.stop()
            if self.ray is not None:
                await self.ray.stop()
            if self.removes_log_dir:
                shutil.rmtree(self.log_dir, ignore_errors=True)


class ServicePlanOps:
    """The service's side of plan changes (:class:`~.plan_changes.PlanOps`): dispatchers of the
    served method, new placements of live servers (:func:`replace_survivors`), and restarts of the
    servers this service started (local launcher only)."""

    def __init__(self, service: Service, method: str):
        self.service = service
        self.method = method
        self.rng = np.random.default_rng(service.config.seed + 1)

    @property
    def can_reload(self) -> bool:
        return self.service.launcher is not None

    def dispatcher(self, layout: Layout) -> Dispatcher:
        return paged_dispatcher(self.method, layout, self.rng, self.service.max_tokens)

    def place(self, placed: Layout, alive: frozenset[int]) -> Layout | None:
        return replace_survivors(placed, alive) if isinstance(placed, Plan) else None

    async def reload(self, server: int, layout: Layout) -> BlockClient:
        """Restart block server ``server`` with its span (and arena) in ``layout``; its new client."""
        service = self.service
        spec = next(spec for spec in service._specs(layout) if spec.index == server)
        endpoint = await service.launcher.restart(spec)
        service.specs = [s for s in service.specs if s.index != server] + [spec]
        return BlockClient(spec.name, endpoint, service.token, service.ctx, epoch=service.epoch)


class _Server(uvicorn.Server):
    """uvicorn without its own signal handling: uvicorn re-raises SIGTERM after its shutdown, which
    would kill the process before the block servers are stopped. :func:`serve` handles signals."""

    @contextlib.contextmanager
    def capture_signals(self):
        yield


async def start_http(app, host: str, port: int) -> tuple[_Server, asyncio.Task, str]:
    """Start an ASGI ``app`` (a started service's :meth:`Service.app`) under uvicorn; returns the
    server, its task and its URL."""
    server = _Server(uvicorn.Config(app, host=host, port=port, log_level="warning", lifespan="off"))
    task = asyncio.create_task(server.serve())
    while not server.started:
        if task.done():
            task.result()
            raise RuntimeError(f"the HTTP API could not start on {host}:{port}")
        await asyncio.sleep(0.05)
    return server, task, f"http://{host}:{server.servers[0].sockets[0].getsockname()[1]}"


async def serve(config: ServeConfig, on_ready=None) -> None:
    """Run the service and its HTTP API until SIGINT/SIGTERM; ``on_ready(url, service)`` once listening
    (a standby: ``service`` is ``None`` until it takes over). On a signal: stop accepting, cancel what
    runs, stop the block servers it started, exit."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    stopped = asyncio.create_task(stop.wait())
    if config.standby_of is not None:
        await _stand_by(config, stopped, on_ready)
        return
    async with Service(config) as service:
        server, task, url = await start_http(service.app(), config.host, config.port)
        if on_ready is not None:
            on_ready(url, service)
        await asyncio.wait([task, stopped], return_when=asyncio.FIRST_COMPLETED)
        log.info("shutting down")
        server.should_exit = True
        await task


async def _stand_by(config: ServeConfig, stopped: asyncio.Task, on_ready) -> None:
    """Answer 503 while the active orchestrator answers; then serve its plan on its servers
    (:mod:`.standby`)."""
    switch = Switch(standing_by(config.standby_of))
    server, task, url = await start_http(switch, config.host, config.port)
    if on_ready is not None:
        on_ready(url, None)
    watcher = asyncio.create_task(watch_active(config.standby_of, config.standby_interval_s, config.standby_deadline_s))
    service = None
    temporary: Path | None = None  # the plan's folder when no --log-dir: removed at exit
    try:
        await asyncio.wait([task, stopped, watcher], return_when=asyncio.FIRST_COMPLETED)
        if watcher.done() and not stopped.done():
            active, silent_s = watcher.result()
            log_dir = config.log_dir
            if log_dir is None:
                log_dir = temporary = _temporary_log_dir()
            log_dir.mkdir(parents=True, exist_ok=True)
            (log_dir / "plan.json").write_text(json.dumps(active.plan), encoding="utf-8")
            taken = dataclasses.replace(
                config, plan=log_dir / "plan.json", servers=active.endpoints, standby_of=None, log_dir=log_dir,
                method=active.plan["method"],
            )  # fmt: skip
            service = Service(taken)
            await service.__aenter__()
            service.metrics.observe_takeover()
            switch.app = service.app()
            log.warning(
                "takeover: the active orchestrator at %s has not answered for %.1f s; serving its plan on its "
                "%d block servers as epoch %d", config.standby_of, silent_s, len(active.endpoints), service.epoch,
            )  # fmt: skip
            if on_ready is not None:
                on_ready(url, service)
            await asyncio.wait([task, stopped], return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        server.should_exit = True
        await task
        if service is not None:
            await service.__aexit__(None, None, None)
        if temporary is not None:
            shutil.rmtree(temporary, ignore_errors=True)


def _temporary_log_dir() -> Path:
    return Path(tempfile.mkdtemp(prefix="chainserve-logs-"))
