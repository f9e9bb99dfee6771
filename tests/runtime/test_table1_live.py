"""The machinery of ``experiment table1-live`` and ``experiment fidelity`` (issues 7 and 31), scaled
down: a 3-server emulated cluster with fast τ, a few requests per method, served live by ``chainserve
serve`` (once with a block server killed) and simulated on the same layouts; the reports' tables and
counts must add up."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
from tests.runtime.conftest import REPLICAS
from typer.testing import CliRunner

from chainserve.cli import app
from chainserve.experiments.fidelity import ClusterRun, Section, _cluster_rows, _report, fidelity_table, load_sections
from chainserve.experiments.fidelity_fail import affected, fail_runs, fail_table, outage_text, victim
from chainserve.experiments.table1_live import live_testbed, results_table, run_live, targets
from chainserve.measure.bench import BenchRequest
from chainserve.model.cluster_file import load_cluster
from chainserve.plan.csearch import search_c

NUM_REQUESTS = 8


def requests() -> list[BenchRequest]:
    return [BenchRequest(0.05 * i, 20 + i, 8) for i in range(NUM_REQUESTS)]


def test_table1_live_runs_add_up(tmp_path):
    problem = load_cluster(REPLICAS)
    ticks = []
    results, overhead = run_live(problem, requests(), ("proposed", "bprr"), tmp_path, lambda: ticks.append(1))
    assert len(ticks) == 2 and [r.method for r in results] == ["proposed", "bprr"]
    assert 0 <= overhead < 0.05  # the runtime's own time per hop and step: a few ms at most
    for r in results:
        m = r.measured
        assert (m.num_requests, m.num_completed, m.num_failed) == (NUM_REQUESTS, NUM_REQUESTS, 0)
        assert np.all(m.waiting_s >= 0) and np.all(m.service_s > 0)
        assert np.allclose(m.waiting_s + m.service_s, m.server_e2e_s)
        assert np.all(m.response_s >= m.server_e2e_s)  # the client's time holds the server's
        assert np.all(m.hop_steps == 8)  # whole-model replicas: one hop, 8 output tokens
        assert r.model.num_requests == NUM_REQUESTS
        # every request's service is the emulated sleeps plus a small overhead
        assert np.all(m.service_s >= 0.9 * m.model_service_s)
        assert abs(r.model.service.mean_s - m.stats("service").mean_s) < 0.5 * m.stats("service").mean_s
    lines = results_table(results).splitlines()
    assert len(lines) == 2 + 2 and lines[2].startswith("| proposed |") and f"{NUM_REQUESTS}/{NUM_REQUESTS}" in lines[2]
    checks = targets(results)
    assert checks[0].startswith("* proposed vs bprr") and sum("simulator vs live" in c for c in checks) == 2


def test_fidelity_rows_and_table(tmp_path):
    problem = load_cluster(REPLICAS)
    rows, overhead, skipped = _cluster_rows(
        "replicas", problem, requests(), ("jffc-only",), tmp_path, lambda: None, "emulated", None, None, None
    )
    assert skipped == [] and overhead >= 0 and [r.method for r in rows] == ["jffc-only"]
    (row,) = rows
    assert (
        row.measured.num_completed == NUM_REQUESTS and row.simulated.response.p95_s >= row.simulated.response.mean_s > 0
    )
    assert row.measured.duration_s > 0 and row.measured.mean_in_service > 0 and row.measured.num_retried == 0
    assert row.measured.cpu_s is not None and row.measured.cpu_s > 0  # the served processes' and client's CPU
    table = fidelity_table([ClusterRun("replicas", "test", "emulated", rows, "")]).splitlines()
    assert len(table) == 3 and table[2].startswith("| replicas | jffc-only |")
    lower, upper = (float(x) for x in table[2].rstrip(" |").rsplit("|", 1)[1].split("–"))
    assert 0 < lower <= upper


def test_fidelity_fail_scenario(tmp_path):
    """A block server killed under load: the outage seen live is replayed by the simulator, nothing lost."""
    problem = load_cluster(REPLICAS)  # at 15/s the proposed plan serves on all three: two chains outlive a kill
    problem = replace(problem, workload=replace(problem.workload, arrival_rate_per_s=15.0))
    sent = [BenchRequest(0.07 * i, 20, 8) for i in range(24)]
    ticks = []
    plan, overhead, runs = fail_runs(problem, sent, tmp_path, lambda: ticks.append(1), 0.15)
    unharmed, killed = runs
    assert len(ticks) == 2 and overhead >= 0 and unharmed.measured.outage is None
    outage = killed.measured.outage
    assert outage.server == victim(plan) and abs(outage.killed_at_s - 0.5) < 0.05
    assert outage.killed_at_s <= outage.dead_at_s <= outage.back_at_s and outage.down_s > 0
    for r in runs:
        assert r.measured.num_failed == 0 and r.simulated.num_finished == r.simulated.num_jobs == len(sent)
    assert unharmed.simulated.num_retried == 0 and killed.simulated.num_recomposed == 2  # on the kill and the return
    table = fail_table(runs).splitlines()
    assert len(table) == 4 and table[3].startswith(f"| {outage.server} killed at") and "24/24 / 24/24" in table[3]
    assert outage_text(killed).startswith(f"Outage of {outage.server}") and "in the system during the outage" in (
        outage_text(killed)
    )
    count, live, sim = affected(killed)
    assert (
        1 <= count < len(sent) and live > 0 and sim > 0
    )  # the requests sent before the return, still running at the kill
    # the report keeps the sections of a run before beside the new ones, in the clusters' order
    _report(tmp_path, {"testbed-fail": Section("testbed-fail", "cmd b", fail_table(runs), [True, False], False)})
    _report(tmp_path, {**load_sections(tmp_path), "testbed": Section("testbed", "cmd a", "rows", [True], False)})
    text = (tmp_path / "fidelity.md").read_text()
    assert text.index("## testbed\n\nCommand: `cmd a`") < text.index("## testbed-fail\n\nCommand: `cmd b`")
    assert "1 of 1 method runs on the emulated clusters" in text and "for 1 of 2 runs" in text


def test_live_testbed_regime_is_a_real_decision():
    """At the experiment's load the c-search composes two-slice chains; at a light load it does not."""
    heavy, light = search_c(live_testbed(7.14)), search_c(live_testbed(2.0))
    assert heavy.c > 1 and any(len(ch.hops) == 2 for ch in heavy.chains)
    assert light.c == 1 and all(len(ch.hops) == 1 for ch in light.chains)


@pytest.mark.parametrize(
    ("args", "field"),
    [
        (["table1", "--time-scale", "0.5"], "time-scale"),
        (["table1-live", "--methods", "nope"], "methods"),
        (["fidelity", "--time-scale", "0"], "time-scale"),
    ],
)
def test_experiment_options_checked_before_running(tmp_path, args, field):
    result = CliRunner().invoke(app, ["experiment", *args, "--out", str(tmp_path / "out"), "--quiet"])
    assert result.exit_code == 2 and result.stderr.startswith(f"error: {field}:"), result.stderr
