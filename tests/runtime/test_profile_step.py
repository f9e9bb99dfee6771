"""The batched step-cost profile (issue 18, item 2): the least-squares fit recovers known
coefficients, an emulated cluster (whose servers do not batch) gives β ≈ 0 and α ≈ τ^p/l_out, and
the cluster file ``profile`` writes loads back with the same step and head costs."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from tests.runtime.conftest import children_of
from typer.testing import CliRunner

from chainserve.cli import app
from chainserve.experiments.fit_report import fit_figure, fit_table
from chainserve.measure.profile import Fit, ProfileSettings, ServerProfile, cluster_yaml, profiled_problem
from chainserve.measure.profile_batch import batch_plan, measure_head
from chainserve.measure.step_fit import LinearFit, StepFit, fit_head, fit_per_block, fit_step_cost
from chainserve.model.cluster_file import load_cluster
from chainserve.model.spec import SpecError
from chainserve.model.step_cost import StepCost

TWO = """\
name: toy-two
model: {name: toy, num_blocks: 8, block_size_gb: 0.5, cache_size_gb: 0.1}
workload: {arrival_rate: 1.0, prompt_tokens: 100, output_tokens: 8, rho_bar: 0.8}
servers:
  - {name: s0, memory_gb: 3.0, tau_p_ms: 80, tau_c_ms: 64}
  - {name: s5, memory_gb: 2.2, tau_p_ms: 200, tau_c_ms: 64}
"""


def test_the_fit_recovers_known_coefficients() -> None:
    rng = np.random.default_rng(1)
    decode = [(m, b, 0.004 + m * (0.010 + 0.0015 * b)) for m in (1, 6) for b in (1, 2, 4, 8, 16) for _ in range(3)]
    prefill = [(m, q, 0.005 + m * (0.012 + 0.00004 * q)) for m in (1, 6) for q in (8, 32, 128)]
    fit = fit_step_cost(decode, prefill, "s")
    cost = fit.cost
    assert cost.alpha_s == pytest.approx(0.010) and cost.beta_s == pytest.approx(0.0015)
    assert cost.prefill_alpha_s == pytest.approx(0.012) and cost.prefill_beta_s == pytest.approx(0.00004)
    assert fit.decode.overhead_s == pytest.approx(0.004) and fit.prefill.overhead_s == pytest.approx(0.005)
    assert cost.r2 == pytest.approx(1.0)
    noisy = [(m, b, t * rng.uniform(0.97, 1.03)) for m, b, t in decode]
    loose = fit_per_block(noisy)
    assert loose.beta_s == pytest.approx(0.0015, rel=0.1) and 0.9 < loose.r2 < 1.0


def test_the_fit_report_shows_each_servers_coefficients_and_timings(tmp_path: Path) -> None:
    decode = [(m, b, 0.004 + m * (0.010 + 0.0015 * b)) for m in (1, 6) for b in (1, 2, 4)]
    prefill = [(m, q, 0.005 + m * (0.012 + 0.00004 * q)) for m in (1, 6) for q in (8, 32)]
    fit = fit_step_cost(decode, prefill, "s")
    assert fit.decode.points == tuple((float(m), float(b), t) for m, b, t in decode)
    assert fit.decode.predict_s(6, 4) == pytest.approx(0.004 + 6 * (0.010 + 0.0015 * 4))
    line = Fit(0.01, 0.002, 1.0, 4)
    profiles = {"s": ServerProfile("s", 1, 6, (1, 6), 40, line, line, 0.001, 0.09, 0.07, fit)}
    head = StepCost(0.0021, 0.00033, 0.0021, 0.00033, 0.5)
    rows = fit_table(profiles, head).splitlines()
    assert len(rows) == 4  # header, rule, the server, the head
    assert rows[2].split(" | ")[:6] == ["| s", "10.000", "1.500", "4.000", "1.000", "6"]
    assert rows[2].split(" | ")[6:8] == ["12.000", "40.000"]  # α' ms, β' µs per token
    assert rows[3].startswith("| LM head") and "| 0.500 |" in rows[3]
    assert fit_figure(profiles, tmp_path / "fit.png") and (tmp_path / "fit.png").stat().st_size > 10_000
    assert not fit_figure({}, tmp_path / "none.png") and not (tmp_path / "none.png").exists()


def test_a_negative_coefficient_is_held_at_zero(caplog: pytest.LogCaptureFixture) -> None:
    """Times that fall with the batch (noise) would give β < 0: β is 0 and the rest refitted."""
    rows = [(m, b, 0.002 + m * 0.010 - 0.0001 * b * m) for m in (1, 3) for b in (1, 2, 4)]
    fit = fit_per_block(rows, "s decode")
    assert fit.beta_s == 0 and fit.clamped == ("beta",) and fit.alpha_s > 0
    assert "held at 0" in caplog.text
    with pytest.raises(SpecError, match="too few"):
        fit_step_cost([(2, 1, 0.01), (2, 2, 0.012)], [(1, 8, 0.01), (2, 8, 0.02)], "s")


def test_the_head_fit_has_no_transport_term() -> None:
    cost = fit_head([(n, 0.001 + 0.0002 * n) for n in (1, 2, 4, 8, 16)])
    assert cost.alpha_s == pytest.approx(0.001) and cost.beta_s == pytest.approx(0.0002) and cost.r2 == 1
    assert measure_head("emulated", None) is None  # a table lookup: free


def test_the_batch_plan_fits_the_free_slots() -> None:
    info = {"num_blocks": 12, "num_block_slots": 25, "used_block_slots": 0, "max_tokens": 44, "max_batch_tokens": 512}
    plan = batch_plan(info, 40, 4, 16)
    assert {m for m, _ in plan.decode} == {1, 12} and max(b * m for m, b in plan.decode) <= 25
    assert max(b for _, b in plan.decode) == 16 and [q for _, q in plan.prefill] == [8, 32, 8, 32]
    assert plan.context == 40 and not plan.zero
    one = batch_plan({**info, "num_blocks": 1, "used_block_slots": 21}, 40, 4, 16)
    assert one.decode == ((1, 1), (1, 2), (1, 4)) and one.zero  # one block count: closes at m = 0


def _profile(name: str, cost: StepCost) -> ServerProfile:
    line = Fit(0.01, 0.002, 1.0, 4)
    fit = LinearFit(0.003, cost.alpha_s, cost.beta_s, cost.r2 or 1.0, ())
    pre = LinearFit(0.003, cost.prefill_alpha_s, cost.prefill_beta_s, cost.r2 or 1.0, ())
    return ServerProfile(name, 1, 5, (1, 5), 100, line, line, 0.001, 0.09, 0.07, StepFit(fit, pre))


def test_the_written_cluster_file_loads_back_the_same_costs(tmp_path: Path) -> None:
    cluster = tmp_path / "two.yaml"
    cluster.write_text(TWO)
    problem = load_cluster(cluster)
    costs = {
        "s0": StepCost(0.0123456789, 0.00123456789, 0.0134, 4.56789e-5, 0.9876),
        "s5": StepCost(0.02, 0, 0.03, 0, 1.0),
    }
    profiles = {"s0": _profile("s0", costs["s0"]), "s5": _profile("s5", costs["s5"])}
    head = StepCost(0.0021, 0.00033, 0.0021, 0.00033, 0.99)
    out = tmp_path / "profiled.yaml"
    out.write_text(cluster_yaml(problem, profiles, ProfileSettings(100, 8), "test", head))
    loaded = load_cluster(out)
    for server in loaded.servers:
        want, got = profiles[server.name].step, server.step
        for field in ("alpha_s", "beta_s", "prefill_alpha_s", "prefill_beta_s"):
            assert getattr(got, field) == pytest.approx(getattr(want, field), rel=1e-5), (server.name, field)
        assert got.r2 == pytest.approx(want.r2, rel=1e-3, abs=1e-4)  # an R² of 3e-16 is written as 0
        assert server.tau_p_s == pytest.approx(0.09)  # τ stays the measured one, not the step cost's
    h = loaded.head_cost  # its prefill coefficients default to the decode ones
    assert (h.alpha_s, h.beta_s, h.prefill_alpha_s, h.prefill_beta_s, h.r2) == pytest.approx(
        (head.alpha_s, head.beta_s, head.prefill_alpha_s, head.prefill_beta_s, head.r2)
    )
    assert "step_cost (issue 18)" in out.read_text() and "head_cost" in out.read_text()
    direct = profiled_problem(problem, profiles, head)  # the same without the file's rounding
    assert [s.step for s in direct.servers] == [costs["s0"], costs["s5"]] and direct.head_cost == head
    assert [s.tau_p_s for s in direct.servers] == [0.09, 0.09]


def test_an_emulated_cluster_fits_no_batch_term(tmp_path: Path) -> None:
    """Emulated servers sleep each step on its own (no batching without a step cost of their own): a
    decode iteration costs α ≈ τ^p/l_out per block whatever the batch, so β ≈ 0."""
    cluster = tmp_path / "two.yaml"
    cluster.write_text(TWO)
    out = tmp_path / "profiled.yaml"
    args = ["profile", str(cluster), "--out", str(out), "--repeats", "2", "--warmup", "1", "--parallel", "--quiet"]
    done = CliRunner().invoke(app, [*args, "--max-batch", "8"])
    assert done.exit_code == 0, done.stderr
    assert not children_of(os.getpid()), "block servers left running"
    configured = {s.name: s for s in load_cluster(cluster).servers}
    loaded = load_cluster(out)
    assert loaded.head_cost is None
    for server in loaded.servers:
        alpha = configured[server.name].tau_p_s / 8  # τ^p/l_out per block per step
        step = server.step
        assert step.alpha_s == pytest.approx(alpha, rel=0.2), server.name
        assert step.prefill_alpha_s == pytest.approx(alpha, rel=0.2), server.name
        assert step.beta_s < 0.05 * alpha and step.prefill_beta_s * 128 < 0.1 * alpha, server.name
        assert step.r2 > 0.8
    assert "Step cost per block" in done.stdout and "β ms" in done.stdout


def test_max_batch_zero_profiles_tau_only(tmp_path: Path) -> None:
    cluster = tmp_path / "two.yaml"
    cluster.write_text(TWO.replace("  - {name: s5, memory_gb: 2.2, tau_p_ms: 200, tau_c_ms: 64}\n", ""))
    out = tmp_path / "profiled.yaml"
    args = ["profile", str(cluster), "--out", str(out), "--repeats", "1", "--warmup", "0", "--max-batch", "0"]
    done = CliRunner().invoke(app, [*args, "--quiet"])
    assert done.exit_code == 0, done.stderr
    assert load_cluster(out).servers[0].step is None and "Step cost" not in done.stdout
    bad = CliRunner().invoke(app, [*args[:-2], "--max-batch", "1", "--quiet"])
    assert bad.exit_code == 2 and bad.stderr.startswith("error: max-batch: ")


def test_a_torch_cluster_and_its_head(tmp_path: Path) -> None:
    """The tiny random Llama on three torch block servers: every server gets a step cost, the LM
    head a head cost, and the file loads back with both (the numbers are the machine's, not checked)."""
    pytest.importorskip("torch", reason="the torch extra is not installed")
    from tests.runtime.conftest import DATA

    out = tmp_path / "profiled.yaml"
    args = ["profile", str(DATA / "tiny-3.yaml"), "--backend", "torch", "--out", str(out), "--max-batch", "4"]
    # compute well above timer noise: the tiny model's steps are shorter on the fused kernels, and under
    # the full suite's load ×20 once gave a negative slope
    slow = [x for name in ("t0", "t1", "t2") for x in ("--slowdown", f"{name}=60")]
    done = CliRunner().invoke(app, [*args, *slow, "--repeats", "3", "--warmup", "1", "--quiet"])
    assert done.exit_code == 0, done.stderr
    assert not children_of(os.getpid()), "block servers left running"
    loaded = load_cluster(out)
    assert all(s.step is not None and s.step.alpha_s + s.step.beta_s > 0 for s in loaded.servers)
    assert loaded.head_cost is not None and loaded.head_cost.alpha_s + loaded.head_cost.beta_s > 0
    assert "head: " in done.stdout
