"""Issue 12: every input a new user tried ends within seconds with a right answer or one ``error: <field>:``
line and exit 2 — never a traceback or a hang — through the real command line (``chainserve.cli.app``)."""

import json
import math
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from chainserve.cli import app
from chainserve.cli.simulate_cmd import MAX_REQUESTS
from chainserve.model import limits

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
RAW = EXAMPLES / "raw-instance.json"
TESTBED = EXAMPLES / "paper-testbed-llama2-7b.yaml"
LIMIT_S = 30.0
SMALL = {
    "model": "llama-2-7b",
    "workload": {"arrival_rate": 1.0},
    "servers": [{"gpu": "a100-80gb", "count": 2, "rtt_ms": 10}],
}


def cli(*args: str):
    started = time.monotonic()
    result = CliRunner().invoke(app, [str(a) for a in args])
    assert time.monotonic() - started < LIMIT_S, args
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    assert result.exit_code in (0, 2), (result.exit_code, result.stderr)
    return result


def error_field(result) -> str:
    """The field of the one ``error:`` line (and nothing else on stdout)."""
    assert result.exit_code == 2 and result.stdout == "", result.stdout
    (line,) = result.stderr.splitlines()
    match = re.match(r"error: ([^:]+): \S", line)
    assert match, line
    return match.group(1)


def write(tmp_path: Path, data: object, name: str = "cluster.yaml") -> Path:
    path = tmp_path / name
    path.write_text(json.dumps(data) if name.endswith(".json") else yaml.safe_dump(data))
    return path


def with_(base: dict, **changes: object) -> dict:
    data = json.loads(json.dumps(base))
    for dotted, value in changes.items():
        *parents, key = dotted.split("__")
        node = data
        for part in parents:
            node = node[int(part)] if part.isdigit() else node[part]
        node[key] = value
    return data


# --- the inputs of the issue ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"servers__0__memory_gb": 1.0e308}, "servers[0].memory_gb"),
        ({"workload__arrival_rate": 1.0e-308}, "workload.arrival_rate"),
        ({"servers__0__tau_p_s": 1e-300}, "servers[0].tau_p_s"),
        ({"servers__0__tau_c_s": 1e-300}, "servers[0].tau_c_s"),
        ({"servers__0__tau_p_s": 1e300}, "servers[0].tau_p_s"),
        ({"servers__0__tau_c_s": 1e300}, "servers[0].tau_c_s"),
        ({"servers__0__count": 100_000_000}, "servers[0].count"),
        ({"servers__0__count": 100_000}, "servers[0].count"),
        ({"servers__0__rtt_ms": 1e308}, "servers[0].rtt_ms"),
        ({"workload__rho_bar": 1e-308}, "workload.rho_bar"),
    ],
)
@pytest.mark.parametrize("command", ["plan", "simulate"])
def test_out_of_range_cluster_numbers_name_their_field(tmp_path, command, changes, field):
    path = write(tmp_path, with_(SMALL, **changes))
    assert error_field(cli(command, path, "--requests", "50") if command == "simulate" else cli(command, path)) == field


def test_raw_json_huge_memory_and_blocks(tmp_path):
    raw = json.loads(RAW.read_text())
    assert (
        error_field(cli("plan", write(tmp_path, with_(raw, servers__0__memory_gb=1e308), "r.json")))
        == "servers[0].memory_gb"
    )
    assert error_field(cli("plan", write(tmp_path, with_(raw, num_blocks=100_000_000), "r.json"))) == "num_blocks"
    assert error_field(cli("simulate", write(tmp_path, with_(raw, arrival_rate=1e-308), "r.json"))) == "arrival_rate"


@pytest.mark.parametrize("max_tokens", [1, 2])
def test_tiny_cache_plans_fast(tmp_path, max_tokens):
    """c_max is millions here; the search range (C_SEARCH_LIMIT), not the token count, bounds the work."""
    result = cli("plan", write(tmp_path, with_(SMALL, max_tokens=max_tokens)), "--json")
    assert result.exit_code == 0, result.stderr
    data = json.loads(result.stdout)
    assert data["stable"] and 0 < data["bounds"]["lower"] <= data["bounds"]["upper"]


@pytest.mark.parametrize(
    ("args", "field"),
    [
        (("--burstiness", "1e308"), "burstiness"),
        (("--burstiness", "nan"), "burstiness"),
        (("--rate", "1e-308"), "rate"),
        (("--rate", "1e-17"), "rate"),
        (("--rate", "1e-200"), "rate"),
        (("--rate", "inf"), "rate"),
        (("--rate", "500"), "rate"),
        (("--trace", "bundled", "--time-scale", "1e308"), "time-scale"),
        (("--trace", "bundled", "--time-scale", "0"), "time-scale"),
        (("--trace", "."), "trace"),
        (("--trace", "bundled", "--requests", "1000"), "trace"),  # the default cluster cannot serve its rate
        (("--requests", "0"), "requests"),
        (("--requests", str(MAX_REQUESTS + 1)), "requests"),
        (("--rate", "abc"), "rate"),
        (("--jsn",), "jsn"),
    ],
)
def test_simulate_flags(args, field):
    assert (
        error_field(cli("simulate", "--requests", "50", *args) if "--requests" not in args else cli("simulate", *args))
        == field
    )


def test_rate_in_range_gives_a_right_answer():
    """A low rate: no queueing, so the mean response time is the chains' mean service time (not 0.000)."""
    result = cli("simulate", "--rate", "1e-4", "--requests", "200", "--json")
    assert result.exit_code == 0, result.stderr
    data = json.loads(result.stdout)
    assert data["waiting"]["mean"] == pytest.approx(0.0, abs=1e-9)
    lower, upper = data["bounds"]["lower"], data["bounds"]["upper"]
    assert 5 < lower <= upper and 0.75 * lower < data["response"]["mean"] < 1.25 * upper


def test_trace_run_shown_in_the_readme_works_and_says_poisson_is_assumed():
    result = cli("simulate", TESTBED, "--trace", "bundled", "--requests", "300")
    assert result.exit_code == 0, result.stderr
    assert "assuming Poisson arrivals" in " ".join(result.stdout.split())
    assert f"chainserve simulate examples/{TESTBED.name} --trace bundled" in (EXAMPLES.parent / "README.md").read_text()


@pytest.mark.parametrize(
    ("args", "field"),
    [
        (("--plot", "{tmp}"), "plot"),
        (("--plot", "{tmp}/noext"), "plot"),
        (("--plot", "{tmp}/plan.xyz"), "plot"),
        (("--rate", "1e308"), "rate"),
        (("--rho-bar", "1"), "rho-bar"),
        (("--c", "0"), "c"),
        (("--json", "true"), "true"),  # --json takes no value: 'true' is read as the cluster file
        (("{tmp}/not-utf8.yaml",), "{tmp}/not-utf8.yaml"),
        (("{tmp}",), "{tmp}"),
    ],
)
def test_plan_flags(tmp_path, args, field):
    (tmp_path / "not-utf8.yaml").write_bytes(b"name: \xff\xfe\n")
    result = cli("plan", *(a.format(tmp=tmp_path) for a in args))
    assert error_field(result) == field.format(tmp=tmp_path)
    assert not list(tmp_path.glob("*.png"))


def test_raw_json_petals_export_is_no_dead_end(tmp_path):
    raw = json.loads(RAW.read_text())
    assert "raw instance" in cli("plan", RAW, "--export", "petals").stderr
    result = cli("plan", write(tmp_path, {**raw, "max_tokens": 2048}, "r.json"), "--export", "petals")
    assert result.exit_code == 0 and "--inference_max_length 2048" in result.stdout


def test_raw_plan_prints_no_token_lengths_and_explains_itself():
    out = " ".join(cli("plan", RAW).stdout.split())
    assert "prompt" not in out and "Key: m_j" in out and "c_k can exceed c" in out
    default = " ".join(cli("plan", "--planner", "greedy").stdout.split())
    assert "not placed (not needed)" in default and "λ/ρ̄" in default


@pytest.mark.parametrize(
    ("args", "field"),
    [
        (("table1", "--requests", "100000"), "requests"),
        (("policies", "--seeds", "0"), "seeds"),
        (("policies", "--requests", "0"), "requests"),
        (("policies", "--out", "{tmp}/file"), "out"),
        (("nope",), "name"),
    ],
)
def test_experiment_checks_before_running(tmp_path, args, field):
    (tmp_path / "file").write_text("x")
    assert error_field(cli("experiment", *(a.format(tmp=tmp_path) for a in args))) == field


def test_usage_errors_are_one_line_and_version():
    assert error_field(cli("plan", "--nope")) == "nope"
    assert error_field(cli("frobnicate")) == "command"
    assert error_field(cli("experiment")) == "name"
    result = cli("--version")
    assert result.exit_code == 0 and re.fullmatch(r"chainserve \S+\n", result.stdout)
    proc = subprocess.run(
        [sys.executable, "-m", "chainserve", "--version"], capture_output=True, text=True, timeout=60, check=False
    )
    assert proc.returncode == 0 and proc.stdout == result.stdout


# --- help --------------------------------------------------------------------------------------------

OFFLINE = {
    "plan": ("--rate", "--rho-bar", "--c", "--objective", "--json", "--export", "--plot"),
    "simulate": (
        "--method",
        "--policy",
        "--requests",
        "--rate",
        "--trace",
        "--time-scale",
        "--trace-start",
        "--burstiness",
        "--service",
        "--seed",
        "--warmup",
        "--json",
    ),
    "experiment": ("--out", "--seeds", "--requests", "--quiet"),
}


@pytest.mark.parametrize("command", list(OFFLINE))
def test_help_is_complete_and_matches_the_readme(command, monkeypatch):
    monkeypatch.setenv("COLUMNS", "250")
    text = CliRunner().invoke(app, [command, "--help"]).stdout
    readme = (EXAMPLES.parent / "README.md").read_text()
    usage = next(line for line in readme.splitlines() if line.startswith(f"chainserve {command} "))
    usage += "".join(line for line in readme.splitlines() if line.startswith("                ") and command in usage)
    for flag in OFFLINE[command]:
        row = next(line for line in text.splitlines() if re.search(rf"│ {re.escape(flag)}\s", line))
        assert "<bool>" not in row
        assert "default" in row or flag in ("--method", "--service", "--seed", "--objective", "--c", "--out"), row
        assert flag in readme, flag
    assert "<bool>" not in text


# --- fuzz -----------------------------------------------------------------------------------------

NUMBERS = st.one_of(
    st.floats(1e-308, 1e308),
    st.floats(-1e308, -1e-308),
    st.just(math.nan),
    st.just(math.inf),
    st.integers(-(10**20), 10**20),
    st.sampled_from([0, 0.0, True, "1e-3", "x", None, [], {}]),
    st.lists(st.just(1.0), min_size=1001, max_size=1001),
)
FIELDS = [
    "workload__arrival_rate",
    "workload__rho_bar",
    "workload__prompt_tokens",
    "workload__output_tokens",
    "max_tokens",
    "servers__0__memory_gb",
    "servers__0__count",
    "servers__0__rtt_ms",
    "servers__0__tau_p_s",
    "servers__0__tau_c_s",
    "servers__0__tau_c_ms",
]
RAW_FIELDS = [
    "num_blocks",
    "block_size_gb",
    "cache_size_gb",
    "arrival_rate",
    "rho_bar",
    "max_tokens",
    "servers__0__memory_gb",
    "servers__0__tau_c",
    "servers__0__tau_p",
]
CONSEQUENCES = {"model", "arrival_rate", "workload.arrival_rate", "servers[0].rtt_ms", "servers[0].tau_p_s"}


def _leaf(dotted: str) -> str:
    return dotted.split("__")[-1]


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(field=st.sampled_from(FIELDS + [f"raw:{f}" for f in RAW_FIELDS]), value=NUMBERS)
def test_fuzz_cluster_fields(tmp_path, field, value):
    raw = field.startswith("raw:")
    base = json.loads(RAW.read_text()) if raw else SMALL
    key = field.removeprefix("raw:")
    path = write(tmp_path, with_(base, **{key: value}), "f.json" if raw else "f.yaml")
    result = cli("plan", path)
    if result.exit_code == 0:
        return
    named = error_field(result)
    in_range = isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value) and value > 0
    assert _leaf(key) in named or (in_range and named in CONSEQUENCES), (key, value, named)


def test_huge_server_lists(tmp_path):
    many = with_(SMALL, servers=[{"gpu": "t4", "rtt_ms": 1, "name": f"s{i}"} for i in range(limits.MAX_SERVERS + 1)])
    assert error_field(cli("plan", write(tmp_path, many))).startswith("servers[")
    raw = json.loads(RAW.read_text())
    raw["servers"] = raw["servers"] * 300
    assert error_field(cli("plan", write(tmp_path, raw, "r.json"))) == "servers"


def test_block_server_weights():
    """``block-server --weights`` (issue 29): an unknown format is a one-line error naming the option; the
    emulated backend takes and ignores a known one."""
    from chainserve.runtime.backends.base import SpanInfo
    from chainserve.runtime.backends.factory import make_span

    args = ["block-server", "--id", "t", "--first-block", "1", "--num-blocks", "2", "--block-slots", "2"]
    result = CliRunner().invoke(app, [*args, "--weights", "int4"])
    assert result.exit_code == 2 and result.output.startswith("error: weights: unknown weight format 'int4'")
    _, model_id = make_span("emulated", SpanInfo(1, 2, 2, 16), None, 0.0, weights="int8")
    assert model_id == "emulated"
