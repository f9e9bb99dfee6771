"""``chainserve simulate``: JSON and tables, seeds, trace replay, every method, one-line errors."""

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from chainserve.cli import app
from chainserve.cli.plan_cmd import DEFAULT_CLUSTER
from chainserve.dispatch.registry import POLICIES
from chainserve.methods import METHODS
from chainserve.model.cluster_file import load_cluster
from chainserve.sim.arrivals import GammaArrivals, read_azure_trace
from chainserve.sim.runs import run_method

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
TESTBED = str(EXAMPLES / "paper-testbed-llama2-7b.yaml")
STATS = ("mean", "p50", "p95", "p99")


def run(*args: str):
    """``chainserve simulate`` with the paper's greedy planner unless ``--planner`` is given (what these
    tests compare with); tests/test_best_planner.py covers the default ``best``."""
    planner = () if "--planner" in args else ("--planner", "greedy")
    result = CliRunner().invoke(app, ["simulate", *args, *planner])
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    return result


def run_json(*args: str) -> dict:
    result = run(*args, "--json")
    assert result.exit_code == 0, result.stderr
    return json.loads(result.stdout)


def test_subprocess_json_keys_and_types():
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "chainserve.cli",
            "simulate",
            "--requests",
            "300",
            "--seed",
            "4",
            "--json",
            "--planner",
            "greedy",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout)
    assert data["requests"] == 300 and data["method"] == "proposed" and data["seed"] == 4
    assert isinstance(data["throughput"], float) and data["throughput"] > 0
    for metric in ("response", "waiting", "service"):
        values = [data[metric][k] for k in STATS]
        assert set(data[metric]) == set(STATS) and all(isinstance(v, float) and v >= 0 for v in values)
        assert values[1] <= values[2] <= values[3]
    assert math.isclose(data["response"]["mean"], data["waiting"]["mean"] + data["service"]["mean"])
    assert 0 < data["bounds"]["lower"] <= data["bounds"]["upper"]
    assert data["arrival_rate"] == 0.2 and "GBP-CR" in data["description"]


def test_json_is_the_library_run_and_seeded():
    """The command reports exactly what :func:`run_method` gives for the same seed."""
    data = run_json("--requests", "400", "--seed", "7")
    expected = run_method(load_cluster(DEFAULT_CLUSTER), "proposed", 7, 400).summary.to_json()
    assert {k: data[k] for k in expected} == expected
    assert run_json("--requests", "400", "--seed", "7") == data
    assert run_json("--requests", "400", "--seed", "8")["response"] != data["response"]


@pytest.mark.parametrize("cluster", [str(DEFAULT_CLUSTER), TESTBED])
@pytest.mark.parametrize("method", [*METHODS, *(f"proposed:{p}" for p in POLICIES)])
def test_every_method_runs(cluster, method):
    if method == "jffc-only" and cluster != TESTBED:  # BLOOM-176B fits on no single server
        result = run(cluster, "--method", method, "--requests", "50")
        assert result.exit_code == 2 and result.stderr.startswith("error: jffc-only: no server can hold")
        return
    data = run_json(cluster, "--method", method, "--requests", "200", "--seed", "1")
    assert data["method"] == method and data["requests"] == 200
    assert ("bounds" in data) == (method not in ("petals", "bprr"))
    assert data["response"]["mean"] >= data["service"]["mean"] > 0


def test_policy_option_is_proposed_with_that_policy():
    assert run_json("--policy", "sed", "--requests", "200") == run_json("--method", "proposed:sed", "--requests", "200")


def test_bundled_trace_sets_the_rate():
    data = run_json(TESTBED, "--trace", "bundled", "--requests", "200")
    times = read_azure_trace().times_s
    assert data["requests"] == 200 and math.isclose(data["arrival_rate"], 199 / (times[199] - times[0]))
    later = run_json(TESTBED, "--trace", "bundled", "--requests", "200", "--trace-start", "1000", "--time-scale", "2")
    assert math.isclose(later["arrival_rate"], 199 / (times[1199] - times[1000]) / 2)
    assert "rows 1000–1199" in later["arrivals"]


def test_page_tokens_models_the_paged_cache_and_says_so():
    slots = run_json(TESTBED, "--trace", "bundled", "--requests", "300")
    paged = run_json(TESTBED, "--trace", "bundled", "--requests", "300", "--page-tokens", "16")
    assert (slots["page_tokens"], slots["refused"]) == (None, 0)
    assert paged["page_tokens"] == 16 and paged["refused"] == 0 and paged["requests"] == 300
    table = run(TESTBED, "--trace", "bundled", "--requests", "300", "--page-tokens", "16").stdout
    assert "pages of 16 tokens" in table and "max_tokens = 2076" in table
    assert run(TESTBED, "--page-tokens", "16", "--adapt").exit_code == 2


def test_trace_file(tmp_path):
    trace = tmp_path / "t.csv"
    trace.write_text(
        "TIMESTAMP,ContextTokens,GeneratedTokens\n"
        + "".join(f"2023-11-16 18:15:{i:02d}.000,{100 + i},{1 + i % 5}\n" for i in range(30))
    )
    data = run_json(TESTBED, "--trace", str(trace), "--requests", "30", "--service", "token")
    assert data["requests"] == 30 and math.isclose(data["arrival_rate"], 1.0)
    assert data["service_model"] == "token" and "t.csv" in data["arrivals"]


def test_trace_replay_names_the_lengths_the_bounds_use(tmp_path, monkeypatch):
    """The plan and its Theorem-4 bounds use the cluster file's mean lengths, not the trace's: both are named."""
    monkeypatch.setenv("COLUMNS", "300")
    trace = tmp_path / "t.csv"
    trace.write_text(
        "TIMESTAMP,ContextTokens,GeneratedTokens\n"
        + "".join(f"2023-11-16 18:15:{i:02d}.000,{100 + 2 * (i % 2)},{3 + 2 * (i % 2)}\n" for i in range(30))
    )
    workload = load_cluster(TESTBED).workload
    args = (TESTBED, "--trace", str(trace), "--requests", "30")
    table = run(*args).stdout
    assert (
        f"bounds use the cluster file's mean lengths, {workload.prompt_tokens} prompt + {workload.output_tokens} "
        "output tokens; the replayed rows' mean lengths are 101 + 4"
    ) in table
    data = run_json(*args)
    assert data["bounds_lengths"] == {"prompt_tokens": workload.prompt_tokens, "output_tokens": workload.output_tokens}
    assert data["trace_mean_lengths"] == {"prompt_tokens": 101.0, "output_tokens": 4.0}
    assert "lengths" not in run(TESTBED, "--requests", "30").stdout  # no trace: nothing to compare


def test_rate_burstiness_and_warmup():
    data = run_json(TESTBED, "--rate", "1.5", "--burstiness", "3", "--requests", "300", "--warmup", "100")
    assert data["arrival_rate"] == 1.5 and data["requests"] == 200 and "Gamma" in data["arrivals"]
    problem = load_cluster(TESTBED).with_workload(arrival_rate_per_s=1.5)
    expected = run_method(problem, "proposed", 0, 300, GammaArrivals(3.0), warmup=100).summary.to_json()
    assert {k: data[k] for k in expected} == expected
    assert run_json(TESTBED, "--burstiness", "1", "--requests", "50")["arrivals"].startswith("Poisson")


def test_table():
    result = run(TESTBED, "--method", "proposed:jsq", "--requests", "200")
    assert result.exit_code == 0
    for words in (
        "Simulated times",
        "response",
        "waiting",
        "service",
        "p99",
        "throughput",
        "proposed:jsq: GBP-CR + GCA",
        "Theorem-4 bounds",
        "simulated mean",
        "batch-means",
    ):
        assert words in result.stdout
    petals = run(TESTBED, "--method", "petals", "--requests", "200").stdout
    assert "PETALS placement" in petals and "Theorem-4" not in petals


@pytest.mark.parametrize(
    ("args", "field"),
    [
        (("--method", "vllm"), "method"),
        (("--method", "petals:jffc"), "method"),
        (("--method", "proposed:fifo"), "policy"),
        (("--policy", "fifo"), "policy"),
        (("--method", "bprr", "--policy", "sed"), "policy"),
        (("--rate", "-1"), "rate"),
        (("--rate", "500"), "rate"),  # no stable plan
        (("--rate", "0.2", "--trace", "bundled"), "rate"),
        (("--trace", "absent.csv"), "trace"),
        (("--time-scale", "2"), "time-scale"),
        (("--trace-start", "5"), "trace-start"),
        (("--trace", "bundled", "--time-scale", "0"), "time-scale"),
        (("--trace", "bundled", "--trace-start", "9000"), "trace-start"),
        (("--trace", "bundled", "--requests", "9000"), "requests"),
        (("--trace", "bundled", "--burstiness", "2"), "burstiness"),
        (("--burstiness", "0"), "burstiness"),
        (("--requests", "0"), "requests"),
        (("--requests", "10", "--warmup", "10"), "warmup"),
        (("--seed", "-1"), "seed"),
        (("--service", "gamma"), "service"),
        (("absent.yaml",), "absent.yaml"),
        (("--fail", "nobody@10"), "fail"),
        (("--fail", "high-1@ten"), "fail"),
        (("--fail", "high-1@10+-5"), "fail"),
        (("--fail", "high-1@10", "--method", "petals"), "failures"),
        (("--rate-profile", "0:0.3,1200:0.9", "--adapt", "--fail", "high-1@1240+50"), "failures"),  # during a change
    ],
)
def test_errors_one_line_exit_2(args, field):
    result = run(*args)
    assert result.exit_code == 2 and result.stdout == ""
    (line,) = result.stderr.splitlines()
    assert line.startswith(f"error: {field}: ")


def test_unstable_jffc_only_warns():
    result = run(TESTBED, "--method", "jffc-only", "--rate", "60", "--requests", "300", "--json")
    assert result.exit_code == 0 and "unstable plan" in result.stderr
    data = json.loads(result.stdout)
    assert data["bounds"] is None and data["waiting"]["mean"] > 0
    assert np.isfinite(data["response"]["mean"])


def test_rate_profile_adapt_lists_plan_changes():
    """A step 0.3/s → 0.9/s on the default cluster: the static plan (for the file's 0.2/s) makes no
    change; --adapt re-plans once the rate rises."""
    args = ("--requests", "1500", "--rate-profile", "0:0.3,1200:0.9")
    static = run_json(*args)
    assert (static["plan_changes"], static["changes"]) == (0, [])
    adaptive = run_json(*args, "--adapt")
    assert adaptive["plan_changes"] == len(adaptive["changes"]) >= 1
    up = next(c for c in adaptive["changes"] if c["reason"] == "rate_up" and c["time"] > 1200)
    assert up["kind"] in ("reallocate", "replace") and up["new_c"] >= up["old_c"]
    assert adaptive["response"]["mean"] < static["response"]["mean"]


@pytest.mark.parametrize(
    ("profile", "message"),
    [
        ("0:0.2,600", "'600' is not T:R"),
        ("5:0.2", "must start at second 0"),
        ("0:0.2,60:0.3,60:0.4", "times must increase"),
        ("0:0", "must lie in 1e-06..1e+06"),
    ],
)
def test_rate_profile_errors(profile, message):
    result = run("--rate-profile", profile)
    assert result.exit_code == 2
    assert result.stderr.strip().startswith(f"error: rate-profile: {message}")
    assert len(result.stderr.strip().splitlines()) == 1


def test_fail_recovers_every_job_and_counts_the_retried():
    """high-1 (on a chain of the default plan) dies at 300 s for 200 s, and again at 900 s, when the
    supervisor restarts it: every request finishes, the jobs on high-1 ran again."""
    data = run_json("--requests", "2000", "--fail", "high-1@300+200", "--fail", "high-1@900")
    assert data["requests"] == 2000  # none lost
    assert data["retried"] >= 1 and data["restarts"] >= data["retried"]
    assert data["recomposed"] == 4  # at each failure and each return
    first, second = data["failures"]
    assert first == {"server": "high-1", "at": 300.0, "down_s": 200.0}
    assert second["server"] == "high-1" and 0 < second["down_s"] < 200  # the modelled restart: load time
    table = run("--requests", "300", "--fail", "high-1@100+50").stdout
    assert "high-1 at 100 s, back after 50 s" in table and "ran again" in table


def test_batched_runs_with_failures_with_adapt_and_with_both():
    failed = run_json("--requests", "600", "--service", "batched", "--fail", "high-1@300+200")
    assert failed["requests"] == 600 and failed["retried"] >= 1 and failed["service_model"] == "batched"
    adapted = run_json("--requests", "1200", "--service", "batched", "--rate-profile", "0:0.3,1200:0.9", "--adapt")
    assert adapted["requests"] == 1200 and adapted["plan_changes"] >= 1
    both = run_json(
        "--requests", "1200", "--service", "batched", "--rate-profile", "0:0.3,1200:0.9", "--adapt",
        "--fail", "high-1@600+200",
    )  # fmt: skip
    assert both["plan_changes"] >= 1 and both["retried"] >= 1 and both["recomposed"] >= 1
