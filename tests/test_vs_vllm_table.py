"""benchmarks/vs_vllm.py's table (issue 30): medians over interleaved rounds, and each ratio the median
of the rounds' paired ratios, checked by hand on made-up figures (the benchmark itself needs vLLM)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

PATH = Path(__file__).resolve().parents[1] / "benchmarks" / "vs_vllm.py"


@pytest.fixture(scope="module")
def vs_vllm():
    spec = importlib.util.spec_from_file_location("vs_vllm", PATH)
    module = importlib.util.module_from_spec(spec)
    sys.modules["vs_vllm"] = module  # dataclasses look their module up there
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.modules.pop("vs_vllm", None)


def run(vs_vllm, system: str, figures: dict[int, list[float]]):
    return vs_vllm.Run(system, {c: [{"output_throughput": t} for t in ts] for c, ts in figures.items()})


def test_ratio_is_the_median_of_paired_rounds(vs_vllm):
    args = vs_vllm.parse_args(["--concurrency", "8", "16", "--rounds", "3"])
    runs = {
        "vllm": run(vs_vllm, "vllm", {8: [100.0, 50.0, 100.0], 16: [120.0, 120.0, 100.0]}),
        "chainserve-1": run(vs_vllm, "chainserve-1", {8: [80.0, 47.5, 95.0], 16: [90.0, 108.0, 100.0]}),
    }
    text, rows = vs_vllm.table(args, runs)
    eight, sixteen = rows
    # round by round 0.80, 0.95, 0.95 → 0.95; the medians of the throughputs alone would say 80 / 100
    assert eight["chainserve_1server_round_ratios"] == pytest.approx([0.8, 0.95, 0.95])
    assert eight["chainserve_1server_ratio"] == pytest.approx(0.95)
    assert (eight["vllm_tok_s"], eight["chainserve_1server_tok_s"]) == (100.0, 80.0)
    assert eight["target_met"] is True
    # 0.75, 0.90, 1.00 → 0.90: the target (≥ 0.9) is met exactly
    assert sixteen["chainserve_1server_ratio"] == pytest.approx(0.9)
    assert sixteen["target_met"] is True
    assert "cs-1 / vLLM by round: 0.80, 0.95, 0.95" in text
    assert "the median of 3 round(s)" in text


def test_missing_systems_leave_blanks(vs_vllm):
    args = vs_vllm.parse_args(["--concurrency", "1"])
    rows = vs_vllm.table(args, {"vllm": run(vs_vllm, "vllm", {1: [20.0]})})[1]
    assert rows == [
        {
            "concurrency": 1,
            "vllm_tok_s": 20.0,
            "chainserve_1server_tok_s": None,
            "chainserve_1server_ratio": None,
            "chainserve_1server_round_ratios": [],
            "chainserve_3servers_tok_s": None,
            "chainserve_3servers_ratio": None,
            "chainserve_3servers_round_ratios": [],
            "target_ratio": 1.0,
            "target_met": None,
        }
    ]
