"""Every experiment runs end to end at a tiny size through the CLI and writes its report and plot."""

import pytest
from typer.testing import CliRunner

from chainserve.cli import app
from chainserve.experiments.registry import EXPERIMENTS

SMALL = {
    "paper-sweeps": (2, 40),
    "policies": (2, 300),
    "c-sweep": (2, 200),
    "table1": (2, 100),
    "planners": (1, 40),
    "adaptive": (1, 200),
}
PLOTS = {
    "paper-sweeps": "paper_sweeps.png",
    "policies": "policies.png",
    "c-sweep": "c_sweep.png",
    "table1": "table1.png",
    "planners": "planners.png",
    "adaptive": "adaptive.png",
}


#: Experiments that serve live clusters: their machinery is tested in tests/runtime/test_table1_live.py.
LIVE = {"table1-live", "fidelity", "batch-plans"}


def test_every_experiment_has_a_small_size():
    assert set(SMALL) | LIVE == set(EXPERIMENTS)


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(SMALL))
def test_experiment_writes_report_and_plot(name, tmp_path):
    seeds, requests = SMALL[name]
    result = CliRunner().invoke(
        app, ["experiment", name, "--out", str(tmp_path), "--seeds", str(seeds), "--requests", str(requests)]
    )
    assert result.exit_code == 0, result.output
    report = tmp_path / result.stdout.strip().rsplit("/", 1)[-1]
    text = report.read_text()
    assert text.startswith("# ") and "| " in text and f"--seeds {seeds} --requests {requests}" in text
    assert (tmp_path / PLOTS[name]).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_unknown_experiment_exits_2():
    result = CliRunner().invoke(app, ["experiment", "nope"])
    assert result.exit_code == 2 and "error: name: unknown experiment 'nope'" in result.stderr
