"""``chainserve profile`` on live emulated clusters (paper §4.2): it recovers the configured τ^p within
10 %, ranks the servers as configured, and writes a cluster file that plans to the same chains."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from tests.runtime.conftest import DATA, children_of, serving
from typer.testing import CliRunner, Result

from chainserve.cli import app
from chainserve.measure.profile import ProfileSettings, Samples, server_profile
from chainserve.model.cluster_file import load_cluster

# emulated-6.yaml with every τ four times longer and λ four times lower (the same plan): a step's
# blocks cost 10-25 ms, well above the timer noise of a loaded CI machine.
SLOW_6 = """\
name: toy-slow
model: {name: toy, num_blocks: 8, block_size_gb: 0.5, cache_size_gb: 0.1}
workload: {arrival_rate: 3.0, prompt_tokens: 1000, output_tokens: 8, rho_bar: 0.8}
servers:
  - {name: s0, memory_gb: 3.0, tau_p_ms: 80, tau_c_ms: 64}
  - {name: s1, memory_gb: 3.0, tau_p_ms: 96, tau_c_ms: 64}
  - {name: s2, memory_gb: 2.5, tau_p_ms: 160, tau_c_ms: 128}
  - {name: s3, memory_gb: 2.5, tau_p_ms: 120, tau_c_ms: 192}
  - {name: s4, memory_gb: 2.8, tau_p_ms: 140, tau_c_ms: 96}
  - {name: s5, memory_gb: 2.2, tau_p_ms: 200, tau_c_ms: 64}
"""


def chainserve(*args: str | Path) -> Result:
    """The command line, in this process (its block servers are this process's children)."""
    return CliRunner().invoke(app, [str(a) for a in args])


def chains(cluster: Path) -> list[tuple[list[str], list[list[int]]]]:
    """The chains (servers, blocks per hop) ``chainserve plan --json`` composes for a cluster file."""
    done = chainserve("plan", cluster, "--json", "--planner", "greedy")
    assert done.exit_code == 0, done.stderr
    return [(ch["servers"], ch["blocks"]) for ch in json.loads(done.stdout)["chains"]]


def check_profiled(configured: Path, profiled: Path, stdout: str) -> None:
    """τ^p within 10 %, the same ranking and the same chains; the table shows the fits' R²."""
    want = {s.name: s.tau_p_s for s in load_cluster(configured).servers}
    got = {s.name: s.tau_p_s for s in load_cluster(profiled).servers}
    assert got.keys() == want.keys()
    for name, tau in want.items():
        assert got[name] == pytest.approx(tau, rel=0.10), name
    assert sorted(got, key=got.get) == sorted(want, key=want.get)
    assert chains(profiled) == chains(configured)
    assert "R²" in stdout and "ranking by τ^p: the same as the cluster file's" in stdout


def test_profile_a_running_serve(tmp_path: Path) -> None:
    cluster = tmp_path / "slow-6.yaml"
    cluster.write_text(SLOW_6)
    out = tmp_path / "profiled.yaml"
    with serving(str(cluster), "--backend", "emulated", tmp_path=tmp_path) as served:
        wrong = chainserve("profile", "--url", served.url, "--out", out, "--quiet")
        assert wrong.exit_code == 2 and wrong.stderr.startswith("error: token: ")
        assert len(wrong.stderr.strip().splitlines()) == 1 and not out.exists()
        done = chainserve(
            "profile", "--url", served.url, "--token-file", tmp_path / "token", "--out", out, "--parallel", "--quiet"
        )
        assert done.exit_code == 0, done.stderr
        assert served.get("/status")["num_running"] == 0
    assert "served values kept" not in out.read_text()  # every server was placed and measured
    check_profiled(cluster, out, done.stdout)


def test_profile_a_cluster_file(tmp_path: Path) -> None:
    """One server after the other, each on the widest span its memory holds."""
    cluster = tmp_path / "slow-3.yaml"
    three = [line for line in SLOW_6.splitlines() if not any(f"s{i}," in line for i in (1, 2, 4))]
    cluster.write_text("\n".join(three).replace("arrival_rate: 3.0", "arrival_rate: 1.0"))
    out = tmp_path / "out" / "profiled.yaml"
    done = chainserve("profile", cluster, "--out", out, "--repeats", "2", "--warmup", "1", "--quiet")
    assert done.exit_code == 0, done.stderr
    assert not children_of(os.getpid()), "block servers left running"
    check_profiled(cluster, out, done.stdout)
    assert "1,2,3,4,5" in done.stdout  # s0 runs 1..5 blocks: all its memory holds with one job's cache


@pytest.mark.parametrize(
    ("args", "field"),
    [
        ((), "cluster"),
        (("--url", "http://127.0.0.1:9", "MISSING.yaml"), "cluster"),
        (("--url", "http://127.0.0.1:9"), "url"),
        (("MISSING.yaml",), "MISSING.yaml"),
        ((str(DATA / "tiny-3.yaml"), "--repeats", "0"), "repeats"),
        ((str(DATA / "emulated-6.yaml"), "--backend", "torch"), "model"),  # its model is no torch model
        ((str(DATA / "tiny-3.yaml"), "--slowdown", "nobody=2"), "slowdown"),
    ],
)
def test_bad_input_is_one_line(args: tuple[str, ...], field: str, tmp_path: Path) -> None:
    done = chainserve("profile", *args, "--out", tmp_path / "x.yaml")
    assert done.exit_code == 2
    assert done.stderr.startswith(f"error: {field}: ") and len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert not (tmp_path / "x.yaml").exists()


@pytest.mark.parametrize("counts", [(1, 2, 3), (1,)])
def test_taus_from_step_times(counts: tuple[int, ...]) -> None:
    """Steps of a + b·m give back τ^p = b·l_in/p + b·(l_out − 1) and τ^c = a·l_out (module docstring);
    a span with one block count fits through its close round trips at m = 0."""
    settings = ProfileSettings(prompt_tokens=200, output_tokens=8)
    prefill = tuple((m, 0.003 + 0.010 * m) for m in counts for _ in range(3))
    decode = tuple((m, 0.002 + 0.004 * m) for m in counts for _ in range(6))
    samples = Samples(prefill, decode, close_s=(0.002, 0.002), ping_s=(0.001, 0.003), prompt_len=100)
    p = server_profile("s", 1, max(counts), counts, samples, settings)
    assert p.decode.slope_s == pytest.approx(0.004) and p.decode.r2 == pytest.approx(1.0)
    if len(counts) > 1:
        assert p.tau_p_s == pytest.approx(0.010 * 2 + 0.004 * 7) and p.tau_c_s == pytest.approx(0.003 + 0.002 * 7)
    else:  # the prefill's line goes through the closes at m = 0: a = 0.002, b = 0.011
        assert p.tau_p_s == pytest.approx(0.011 * 2 + 0.004 * 7) and p.tau_c_s == pytest.approx(0.002 * 8)
    assert p.ping_s == pytest.approx(0.002)


def test_a_generated_token_is_saved_owner_only_in_the_log_folder(tmp_path) -> None:
    from chainserve.runtime.service import ServeConfig, Service

    cluster = Path(__file__).parent / "data" / "emulated-6.yaml"
    service = Service(ServeConfig(cluster=cluster, planner="greedy", log_dir=tmp_path / "logs"))
    saved = tmp_path / "logs" / "token"
    assert saved.read_text().strip() == service.token
    assert saved.stat().st_mode & 0o777 == 0o600
    given = Service(ServeConfig(cluster=cluster, planner="greedy", token="mine", log_dir=tmp_path / "given"))
    assert given.token == "mine" and not (tmp_path / "given" / "token").exists()
