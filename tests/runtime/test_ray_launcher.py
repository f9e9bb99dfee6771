"""The Ray launcher (§4.2) on one local Ray instance: three emulated block servers, each under its own
actor in a SPREAD placement group, answer on their own ZeroMQ endpoints with the span and block-slots
of the plan, refuse a wrong token, and are gone — processes, actors and Ray — after ``stop()``."""

from __future__ import annotations

import asyncio
import os
import time

import numpy as np
import pytest

ray = pytest.importorskip("ray", reason="Ray is not installed (optional extra: pip install 'chainserve[ray]')")

from chainserve.methods import build_method  # noqa: E402
from chainserve.model.spec import ModelSpec, Problem, Server, Workload  # noqa: E402
from chainserve.runtime.client import BlockClient, ServerFailed  # noqa: E402
from chainserve.runtime.launch.local import BackendArgs  # noqa: E402
from chainserve.runtime.launch.ray_launcher import RayLauncher  # noqa: E402
from chainserve.runtime.layout import server_specs  # noqa: E402

TOKEN = "s3cret-for-this-test"


def three_server_specs():
    """6 blocks of 2 GB, 7 GB per server: each holds 2 blocks, so one chain needs all three."""
    servers = tuple(Server(f"s{i}", 7.0, 0.5, 0.1) for i in range(3))
    problem = Problem(servers, ModelSpec("toy", 6, 2.0, 0.5), Workload(0.05, output_tokens=4))
    layout = build_method("proposed", problem, np.random.default_rng(0)).plan_or_placement
    specs = server_specs(layout, 64)
    assert len(specs) == 3 and all(spec.info.num_blocks < 6 for spec in specs)
    return specs


def is_running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


async def launch_query_stop(specs):
    launcher = RayLauncher(None, TOKEN, ready_timeout_s=60)
    try:
        endpoints = await launcher.start(specs, BackendArgs("emulated"), {"s1": 2.0}, {})
        assert ray.is_initialized() and launcher.is_ray_owner
        assert sorted(endpoints) == [spec.index for spec in specs]
        infos = {}
        for spec in specs:
            assert endpoints[spec.index].startswith("tcp://127.0.0.1:")
            client = BlockClient(spec.name, endpoints[spec.index], TOKEN)
            infos[spec.name] = await client.info()
            client.close()
            intruder = BlockClient(spec.name, endpoints[spec.index], "wrong")
            with pytest.raises(ServerFailed) as refused:
                await intruder.info()
            intruder.close()
            assert refused.value.code == "unauthorized"
        # A second launcher in the same process joins this Ray; with every CPU reserved it cannot be
        # placed, fails clearly, and leaves the Ray it did not start running.
        other = RayLauncher(None, TOKEN, ready_timeout_s=1)
        with pytest.raises(RuntimeError, match="cannot place 1 block servers"):
            await other.start(specs[:1], BackendArgs("emulated"), {}, {})
        assert ray.is_initialized() and not other.is_ray_owner
    finally:
        await launcher.stop()
    return infos


def test_ray_launcher_starts_answers_and_cleans_up():
    specs = three_server_specs()
    infos = asyncio.run(launch_query_stop(specs))
    for spec in specs:
        info = infos[spec.name]
        assert info["server_id"] == spec.name and info["backend"] == "emulated"
        assert (info["first_block"], info["num_blocks"]) == (spec.info.first_block, spec.info.num_blocks)
        assert info["num_block_slots"] == spec.info.num_block_slots
        assert info["slowdown"] == (2.0 if spec.name == "s1" else 1.0)
    assert not ray.is_initialized()
    pids = [info["pid"] for info in infos.values()]
    assert len(set(pids)) == 3 and os.getpid() not in pids
    deadline = time.monotonic() + 5
    while any(is_running(pid) for pid in pids) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not any(is_running(pid) for pid in pids), "a block server outlived stop()"
