"""``chainserve plan``: tables, JSON, PETALS export, plot, and the one-line error convention."""

import json
import math
import re
import subprocess
import sys
from fractions import Fraction
from pathlib import Path

import pytest
from typer.testing import CliRunner

from chainserve.cli import app
from chainserve.model.cluster_file import load_cluster
from chainserve.plan.csearch import search_c

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
SIM = str(EXAMPLES / "paper-sim-bloom-20.yaml")
TESTBED = str(EXAMPLES / "paper-testbed-llama2-7b.yaml")
RAW = str(EXAMPLES / "raw-instance.json")
PETALS_LINE = re.compile(
    r"^python -m petals\.cli\.run_server (\S+) --block_indices (\d+):(\d+) "
    r"--attn_cache_tokens (\d+) --inference_max_length (\d+)( .*)?$"
)


def run(*args: str):
    """``chainserve plan`` with the paper's greedy planner unless ``--planner`` is given (fast, and what
    these tests compare with); tests/test_best_planner.py covers the default ``best``."""
    planner = () if "--planner" in args else ("--planner", "greedy")
    result = CliRunner().invoke(app, ["plan", *args, *planner])
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    return result


def test_subprocess_json_is_a_consistent_plan():
    proc = subprocess.run(
        [sys.executable, "-m", "chainserve.cli", "plan", SIM, "--json", "--planner", "greedy"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout)
    assert {"c", "servers", "chains", "nu", "load", "bounds"} <= data.keys()
    assert {"name", "start_block", "num_blocks"} <= data["servers"][0].keys()
    assert {"servers", "blocks", "service_time", "capacity", "rate"} <= data["chains"][0].keys()
    for chain in data["chains"]:  # hops cover 1..L in order
        flat = [b for first, last in chain["blocks"] for b in range(first, last + 1)]
        assert flat == list(range(1, 71))
    nu = sum(ch["capacity"] * ch["rate"] for ch in data["chains"])
    assert math.isclose(data["nu"], nu) and math.isclose(data["load"], 0.2 / nu)
    assert 0 < data["bounds"]["lower"] <= data["bounds"]["upper"]
    expected = search_c(load_cluster(SIM))
    assert data["c"] == expected.c and math.isclose(data["bounds"]["lower"], expected.bounds.lower_s)


def test_subprocess_error_is_one_line_exit_2(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "chainserve.cli", "plan", str(tmp_path / "absent.yaml")],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.splitlines() == [f"error: {tmp_path / 'absent.yaml'}: no such file"]


def test_tables():
    result = run(SIM)
    assert result.exit_code == 0
    for words in ("Servers (8 of 20 placed)", "Chains", "Summary", "high-1", "not placed (not needed):", "E[T]"):
        assert words in result.stdout


def test_fixed_c_and_rate_override():
    data = json.loads(run(TESTBED, "--c", "2", "--rate", "3.5", "--rho-bar", "0.5", "--json").stdout)
    assert data["c"] == 2 and data["arrival_rate"] == 3.5 and data["stable"]


def test_surrogate_objective():
    data = json.loads(run(SIM, "--objective", "surrogate", "--json").stdout)
    assert data["c"] >= 1 and data["stable"]


def test_unstable_plan_is_printed_with_a_warning():
    result = run(RAW, "--c", "2", "--rate", "10")
    assert result.exit_code == 0 and "UNSTABLE" in result.stdout and "unstable plan" in result.stderr
    data = json.loads(run(RAW, "--c", "2", "--rate", "10", "--json").stdout)
    assert not data["stable"] and data["load"] > 1


@pytest.mark.parametrize(
    ("cluster", "repo", "max_tokens", "flag"),
    [
        (SIM, "bigscience/bloom", 2048, "--quant_type nf4"),  # hops that use part of a span
        (TESTBED, "meta-llama/Llama-2-7b-hf", 2048 + 28, "--quant_type none"),
    ],
)
def test_petals_export_matches_the_plan(cluster, repo, max_tokens, flag):
    data = json.loads(run(cluster, "--json", "--export", "petals").stdout)
    lines = data["export"]["petals"]
    assert len(lines) == len(data["servers"])
    block_jobs = {s["name"]: 0 for s in data["servers"]}
    for chain in data["chains"]:
        for name, (first, last) in zip(chain["servers"], chain["blocks"], strict=True):
            block_jobs[name] += chain["capacity"] * (last - first + 1)
    for line, server in zip(lines, data["servers"], strict=True):
        got_repo, start, end, tokens, max_len, rest = PETALS_LINE.match(line).groups()
        assert got_repo == repo and int(max_len) == max_tokens
        first = server["start_block"] - 1
        assert (int(start), int(end)) == (first, first + server["num_blocks"])
        share = Fraction(block_jobs[server["name"]], server["num_blocks"])  # jobs per block
        assert int(tokens) == math.ceil(share * max_tokens)
        assert f"--public_name {server['name']}" in rest and flag in rest


def test_petals_export_plain_lines():
    result = run(SIM, "--export", "petals")
    lines = [ln for ln in result.stdout.splitlines() if ln.startswith("python -m petals")]
    assert len(lines) == 8 and all(PETALS_LINE.match(ln) for ln in lines)


def test_plot_written(tmp_path):
    out = tmp_path / "plan.png"
    result = run(SIM, "--plot", str(out), "--json")
    assert result.exit_code == 0 and json.loads(result.stdout)["c"] >= 1
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 10_000


@pytest.mark.parametrize(
    ("args", "field"),
    [
        ((RAW, "--export", "petals"), "max_tokens"),
        ((RAW, "--rate", "-1"), "rate"),
        ((RAW, "--rate", "500"), "rate"),
        ((RAW, "--c", "99"), "c"),
    ],
)
def test_errors_one_line_exit_2(args, field):
    result = run(*args)
    assert result.exit_code == 2 and result.stdout == ""
    (line,) = result.stderr.splitlines()
    assert line.startswith(f"error: {field}: ")


def test_bad_cluster_field_is_named(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(Path(TESTBED).read_text().replace("count: 6", "count: 6, memory_gb: -20"))
    result = run(str(bad))
    assert result.exit_code == 2
    assert result.stderr.splitlines() == ["error: servers[1].memory_gb: must be positive, got -20"]


@pytest.mark.parametrize("args", [(RAW, "--c", "0"), (RAW, "--objective", "best"), ("--rate",)])
def test_usage_errors_exit_2(args):
    assert run(*args).exit_code == 2


def test_default_cluster_is_the_example():
    """`chainserve plan` with no file plans the embedded default, the same as the example file."""
    assert json.loads(run("--json").stdout) == json.loads(run(SIM, "--json").stdout)


def test_model_no_server_set_can_hold(tmp_path):
    small = tmp_path / "small.yaml"
    small.write_text(
        "model: bloom-176b\nworkload: {arrival_rate: 0.2}\nservers:\n  - {gpu: t4, count: 2, rtt_ms: 20}\n"
    )
    result = run(str(small))
    assert result.exit_code == 2
    (line,) = result.stderr.splitlines()
    assert line.startswith("error: model: bloom-176b/nf4 needs 70 blocks") and "at most 22" in line


def test_weights_per_server_in_json_table_and_export(tmp_path):
    """issue 29: each server's ``weights`` and sizes, the ``model`` object, a weights column, and the
    PETALS flags of each server's format."""
    cluster = tmp_path / "formats.yaml"
    cluster.write_text(
        "model: llama-2-7b\nworkload: {arrival_rate: 1.0, prompt_tokens: 100, output_tokens: 10}\nservers:\n"
        "  - {gpu: t4, name: q, weights: int8, rtt_ms: 10}\n  - {gpu: t4, name: f, rtt_ms: 10}\n"
        "  - {gpu: t4, name: h, weights: fp32, rtt_ms: 10}\n",
        encoding="utf-8",
    )
    data = json.loads(run(str(cluster), "--json", "--export", "petals").stdout)
    problem = load_cluster(cluster)
    model = data["model"]
    assert model["name"] == "llama-2-7b/fp16" and model["dtype"] == "fp16" and model["measured"] is False
    assert (model["num_blocks"], model["block_size_gb"]) == (32, problem.model.block_size_gb)
    assert model["kv_bytes_per_token_per_block"] == pytest.approx(2 * 4096 * 2)  # K and V, 16-bit
    index = {s.name: j for j, s in enumerate(problem.servers)}
    flags = {"int8": "--quant_type int8", "fp16": "--torch_dtype float16", "fp32": "--torch_dtype float32"}
    for server, line in zip(data["servers"], data["export"]["petals"], strict=True):
        j = index[server["name"]]
        assert server["weights"] == {"q": "int8", "f": "fp16", "h": "fp32"}[server["name"]]
        assert server["block_size_gb"] == problem.block_size_gb(j) and server["cache_size_gb"] == problem.cache_size_gb(
            j
        )
        assert flags[server["weights"]] in line
    table = run(str(cluster)).stdout
    assert "weights" in table and "int8" in table
    assert "weights" not in run(TESTBED).stdout.split("Chains")[0]


def test_plan_file_keeps_weights_and_block_servers_get_them(tmp_path):
    """A plan file round-trips each server's format and the model's sizes per format; the launcher
    passes ``--weights`` to that server's block server, and its arena counts slots of its own s_c,j."""
    from chainserve.plan.plan_file import layout_from_dict, layout_to_dict
    from chainserve.plan.types import reserved_block_jobs
    from chainserve.runtime.launch.local import BackendArgs, block_server_argv
    from chainserve.runtime.layout import server_specs

    cluster = tmp_path / "formats.yaml"
    cluster.write_text(
        "model: {name: smollm2-135m, dtype: fp32, max_tokens: 512}\nworkload: {arrival_rate: 1.0}\nservers:\n"
        "  - {name: q, memory_gb: 0.3, tau_p_s: 0.1, rtt_ms: 1, weights: bf16}\n"
        "  - {name: f, memory_gb: 0.5, tau_p_s: 0.2, rtt_ms: 1}\n",
        encoding="utf-8",
    )
    plan = search_c(load_cluster(cluster))
    back = layout_from_dict(json.loads(json.dumps(layout_to_dict(plan))))
    assert back == plan and back.problem.model.format_sizes == plan.problem.model.format_sizes
    specs = {s.name: s for s in server_specs(back, 512)}
    slots = reserved_block_jobs(back)
    for spec in specs.values():
        assert spec.info.num_block_slots == slots[spec.index]
        argv = block_server_argv(spec, BackendArgs("torch", "smollm2-135m"), 1.0, 0.0)
        assert ("--weights" in argv) == (spec.weights is not None)
    argv = block_server_argv(specs["q"], BackendArgs("torch", "smollm2-135m"), 1.0, 0.0)  # q: fastest per GB
    assert argv[argv.index("--weights") + 1] == "bf16"
