"""Profile live block servers (paper §4.2): the sessions that measure them, and the two ways to reach
them — a running ``chainserve serve`` (its ``/plan`` and ``/status``) or a cluster file whose servers
this module starts itself (local launcher) and stops.

Each server is measured alone by default: ``warmup`` sessions, then ``repeats`` sessions at each block
count in shuffled order, each an admitted prefill, decode steps and a timed ``close``, with an ``info``
ping after each. Sessions go through the block server's ordinary protocol (:mod:`..runtime.client`),
so they are admitted into the KV arena like a job's: profile an idle cluster. The orchestrator side
needs no torch: hidden states for the torch backend are random vectors of the model's width.

Then, unless ``max_batch`` is 0, each server's batched step cost (issue 18): decode iterations of b
sessions stepped together and prefills of q tokens (:mod:`.profile_batch`), fitted per server into
``ServerProfile.step`` (:mod:`.step_fit`). The head's cost is :func:`.profile_batch.measure_head`.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import secrets
import tempfile
import time
from collections.abc import Awaitable, Callable, Coroutine, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import zmq

from chainserve.measure.profile import ProfileSettings, Samples, ServerProfile, block_counts, server_profile
from chainserve.measure.profile_batch import BatchPlan, batch_plan, model_config, plan_size, sample_batches
from chainserve.measure.step_fit import PREFILL_TOKENS
from chainserve.model.spec import Problem, SpecError
from chainserve.plan.plan_file import layout_from_dict
from chainserve.plan.types import jobs_that_fit
from chainserve.progress import progress_bar
from chainserve.runtime.backends.base import SpanInfo, WireTensor
from chainserve.runtime.backends.factory import BACKENDS
from chainserve.runtime.client import BlockClient, ServerFailed, ServerRefused
from chainserve.runtime.launch.local import BackendArgs, LocalLauncher
from chainserve.runtime.layout import ServerSpec

log = logging.getLogger("chainserve.profile")

#: Seconds to wait for one reply before calling a server unresponsive.
REPLY_TIMEOUT_S = 120.0


@dataclass(frozen=True, slots=True)
class Served:
    """A running ``chainserve serve``: the problem it serves, its live block servers' endpoints (by
    name) and how many requests it was running when asked."""

    problem: Problem
    endpoints: dict[str, str]
    num_running: int


def served_cluster(url: str) -> Served:
    """Read ``/plan`` (the served problem and placement) and ``/status`` (endpoints) of a running serve."""
    try:
        with httpx.Client(base_url=url.rstrip("/"), timeout=30) as http:
            plan, status = http.get("/plan").json(), http.get("/status").json()
    except httpx.HTTPError as exc:
        raise SpecError("url", f"cannot reach {url}: {exc}") from None
    except ValueError:
        raise SpecError("url", f"{url} is not a chainserve serve (no JSON at /plan or /status)") from None
    try:
        layout = layout_from_dict(plan)
        endpoints = {s["name"]: s["endpoint"] for s in status["servers"] if s.get("alive") and s.get("endpoint")}
    except (SpecError, KeyError, TypeError) as exc:
        raise SpecError("url", f"{url} is not a chainserve serve ({exc})") from None
    if not endpoints:
        raise SpecError("url", f"{url} reports no live block server")
    return Served(layout.problem, endpoints, int(status.get("num_running", 0)))


def profiling_specs(problem: Problem, max_tokens: int, max_batch: int = 0) -> list[ServerSpec]:
    """One block server per server of ``problem`` that can hold a block: blocks 1..m_j with m_j the
    most blocks its memory holds with one job's cache on each (M_j ≥ m·(s_m,j + s_c,j)), one session at a
    time, emulated timing as ``serve`` gives it (τ^p_j/l_out per block per step, τ^c_j/(2·l_out) each
    way, :mod:`chainserve.runtime.layout`). With ``max_batch`` (the step-cost profile, issue 18) its
    arena holds the block-slots the rest of its memory holds (⌊(M_j − m_j·s_m,j)/s_c,j⌋, at most
    ``max_batch``·m_j, at least 2), so batches of sessions fit as they would when served."""
    specs = []
    for j, s in enumerate(problem.servers):
        s_m, s_c = problem.block_size_gb(j), problem.cache_size_gb(j)
        m = min(problem.model.num_blocks, jobs_that_fit(s.memory_gb, s_m + s_c))
        if m >= 1:
            slots = m
            if max_batch:
                held = jobs_that_fit(s.memory_gb - m * s_m, s_c)
                slots = max(2, m, min(held, max_batch * m))
            specs.append(ServerSpec.of(problem, j, SpanInfo(1, m, slots, max_tokens)))
    if not specs:
        raise SpecError("cluster", "no server can hold one block with one job's cache")
    return specs


def wire_maker(backend: str, model: str | None) -> Callable[[int], WireTensor]:
    """Hidden states of q tokens as the backend takes them (the emulated model: token ids)."""
    if backend == "emulated":
        return lambda q: WireTensor("int32", (1, q, 1), np.full(q, 7, dtype=np.int32).tobytes())
    if backend == "torch":
        hidden, rng = int(model_config(model)["hidden_size"]), np.random.default_rng(0)
        return lambda q: WireTensor(
            "float32", (1, q, hidden), rng.standard_normal((1, q, hidden), np.float32).tobytes()
        )
    raise SpecError("backend", f"unknown backend {backend!r}; known: {', '.join(BACKENDS)}")


@contextmanager
def _server_errors(name: str) -> Iterator[None]:
    """A block server's refusal or failure as one ``<field>: <message>`` error."""
    try:
        yield
    except ServerRefused:
        raise SpecError(name, "no free block-slot for a profiling session; profile an idle cluster") from None
    except ServerFailed as exc:
        if exc.code == "unauthorized":
            raise SpecError(
                "token", "the block servers refused it; give the secret serve was started with (--token-file FILE)"
            ) from None
        raise SpecError(name, str(exc).removeprefix(f"{name}: ")) from None


async def _timed(call: Awaitable[Any]) -> float:
    began = time.perf_counter()
    await call
    return time.perf_counter() - began


@dataclass(frozen=True, slots=True)
class _Run:
    """What one server will run: its span, block counts, and the prompt and token it sends."""

    name: str
    client: BlockClient
    first_block: int
    num_blocks: int
    counts: tuple[int, ...]
    prompt: WireTensor
    token: WireTensor
    make_wire: Callable[[int], WireTensor]
    batch: BatchPlan | None


def _prepare(
    client: BlockClient, info: Mapping[str, Any], settings: ProfileSettings, make_wire: Callable[[int], WireTensor]
) -> _Run:
    """Choose a server's block counts and prompt length from its ``info``."""
    free = int(info.get("slot_limit", info["num_block_slots"])) - int(info["used_block_slots"])
    counts = block_counts(int(info["num_blocks"]), free, settings.num_counts)
    if not counts:
        raise SpecError(client.name, "no free block-slot for a profiling session; profile an idle cluster")
    prompt_len = min(settings.prompt_tokens, int(info["max_tokens"]) - settings.decode_steps)
    if prompt_len < 1:
        raise SpecError(
            "decode-steps", f"{client.name} caches {info['max_tokens']} positions: too few for {settings.decode_steps}"
        )
    first, num = int(info["first_block"]), int(info["num_blocks"])
    batch = None
    if settings.max_batch:
        batch = batch_plan(info, prompt_len, settings.decode_steps, settings.max_batch)
        if max(b for _, b in batch.decode) < 2:
            log.warning("%s: no free block-slots for two sessions at once: no step cost", client.name)
            batch = None
    return _Run(client.name, client, first, num, counts, make_wire(prompt_len), make_wire(1), make_wire, batch)


async def _session(run: _Run, m: int, decode_steps: int) -> tuple[float, list[float], float]:
    """One session running the span's last ``m`` blocks: prefill, decode steps and close times."""
    client, first = run.client, run.first_block + run.num_blocks - m
    session, p = f"profile-{run.name}-{secrets.token_hex(4)}", run.prompt.shape[1]
    try:
        prefill = await _timed(client.forward(session, first, 0, run.prompt, open=True))
        decode = [await _timed(client.forward(session, first, p + i, run.token)) for i in range(decode_steps)]
    except BaseException:
        client.close_session(session)
        raise
    return prefill, decode, await _timed(client.request("close", session=session))


async def _measure(run: _Run, settings: ProfileSettings, advance: Callable[[], None]) -> ServerProfile:
    with _server_errors(run.name):
        samples = await _sample(run, settings, advance)
    profile = server_profile(run.name, run.first_block, run.num_blocks, run.counts, samples, settings)
    if run.batch is None:
        return profile
    with _server_errors(run.name):
        batches = await sample_batches(
            run.client,
            run.first_block,
            run.num_blocks,
            run.batch,
            run.make_wire,
            settings.decode_steps,
            settings.repeats,
            advance,
        )
    return replace(profile, step_fit=batches.fit(run.name))


async def _sample(run: _Run, settings: ProfileSettings, advance: Callable[[], None]) -> Samples:
    for _ in range(settings.warmup):
        await _session(run, max(run.counts), settings.decode_steps)
        advance()
    rng = np.random.default_rng([settings.seed, *run.name.encode()])
    prefill, decode, closes, pings = [], [], [], []
    for m in rng.permutation(np.repeat(run.counts, settings.repeats)):
        t_prefill, t_decode, t_close = await _session(run, int(m), settings.decode_steps)
        prefill.append((int(m), t_prefill))
        decode += [(int(m), t) for t in t_decode]
        closes.append(t_close)
        pings.append(await _timed(run.client.info()))
        advance()
    return Samples(tuple(prefill), tuple(decode), tuple(closes), tuple(pings), run.prompt.shape[1])


async def _all_or_none(calls: list[Coroutine[Any, Any, ServerProfile]]) -> list[ServerProfile]:
    """Run the calls at once; the first failure cancels the rest (no session left half-measured)."""
    tasks = [asyncio.ensure_future(call) for call in calls]
    try:
        return list(await asyncio.gather(*tasks))
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def measure_servers(
    endpoints: Mapping[str, str], token: str, settings: ProfileSettings, model: str | None = None
) -> dict[str, ServerProfile]:
    """Profile every server at ``endpoints`` (name → ``tcp://host:port``), with a progress bar; the
    torch backend's hidden width comes from ``model`` (default: the model the servers report)."""
    ctx = zmq.Context()
    clients = [BlockClient(name, endpoint, token, ctx, REPLY_TIMEOUT_S) for name, endpoint in endpoints.items()]
    try:
        infos = {}
        for client in clients:
            with _server_errors(client.name):
                infos[client.name] = await client.info()
        first = infos[clients[0].name]  # every server of a cluster runs the same backend and model
        make_wire = functools.cache(wire_maker(str(first["backend"]), model or str(first["model_id"])))
        runs = [_prepare(client, infos[client.name], settings, make_wire) for client in clients]
        total = sum(
            settings.warmup
            + len(run.counts) * settings.repeats
            + (plan_size(run.batch, settings.repeats) if run.batch else 0)
            for run in runs
        )
        with progress_bar() as bar:
            task = bar.add_task("profiling", total=total)

            def advance() -> None:
                bar.advance(task)

            if settings.parallel:
                profiles = await _all_or_none([_measure(run, settings, advance) for run in runs])
            else:
                profiles = [await _measure(run, settings, advance) for run in runs]
    finally:
        for client in clients:
            client.close()
        ctx.term()
    return {p.name: p for p in profiles}


async def profile_cluster(
    problem: Problem,
    backend: str,
    model: str | None,
    settings: ProfileSettings,
    slowdown: Mapping[str, float],
    delay_s: Mapping[str, float],
) -> dict[str, ServerProfile]:
    """Start a block server for every server of ``problem`` (:func:`profiling_specs`) as child
    processes, profile them (τ, and with ``settings.max_batch`` the batched ``step`` of issue 18),
    and stop them whatever happens."""
    max_tokens = settings.prompt_tokens + settings.decode_steps
    if settings.max_batch:  # the step-cost profile's prefills (issue 18)
        max_tokens = max(max_tokens, max(PREFILL_TOKENS))
    wire_maker(backend, model)  # checks the backend and, for torch, the model, before anything starts
    if backend == "torch":
        config = model_config(model, problem.model.num_blocks)
        max_tokens = min(max_tokens, int(config.get("max_position_embeddings", max_tokens)))
    specs = profiling_specs(problem, max_tokens, settings.max_batch)
    names = {spec.name for spec in specs}
    for option, values in (("slowdown", slowdown), ("delay-ms", delay_s)):
        unknown = sorted(set(values) - names)
        if unknown:
            raise SpecError(option, f"unknown server(s) {', '.join(unknown)}; profiled: {', '.join(sorted(names))}")
    token = secrets.token_hex(16)
    with tempfile.TemporaryDirectory(prefix="chainserve-profile-") as log_dir:
        launcher = LocalLauncher(Path(log_dir), token)
        try:
            endpoints = await launcher.start(specs, BackendArgs(backend, model), dict(slowdown), dict(delay_s))
            return await measure_servers({s.name: endpoints[s.index] for s in specs}, token, settings, model)
        finally:
            await launcher.stop()
