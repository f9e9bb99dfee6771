"""Experiments by name, with their default sizes (the paper's). Modules load on first use, so the CLI
starts without importing matplotlib."""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True, slots=True)
class Experiment:
    target: str  # "module:function", called as function(out_dir, num_seeds, num_jobs) -> report path
    num_seeds: int
    num_jobs: int
    help: str

    def load(self) -> Callable[[Path, int, int], Path]:
        module, _, function = self.target.partition(":")
        return getattr(importlib.import_module(module), function)


EXPERIMENTS: dict[str, Experiment] = {
    "paper-sweeps": Experiment(
        "chainserve.experiments.paper_sweeps:paper_sweeps", 20, 300, "§4.1: J and η sweeps, proposed vs PETALS vs BPRR"
    ),
    "policies": Experiment(
        "chainserve.experiments.policies:policy_comparison",
        10,
        20_000,
        "JFFC vs SED/SA-JSQ/JSQ/JIQ/random/threshold-JFFC over load",
    ),
    "c-sweep": Experiment(
        "chainserve.experiments.c_sweep:c_sweep", 5, 5000, "response time and bounds vs c; chosen c vs λ"
    ),
    "table1": Experiment(
        "chainserve.experiments.table1:table1", 5, 1000, "§4.2 Table 1 in simulation: MIG testbed + Azure code trace"
    ),
    "planners": Experiment(
        "chainserve.experiments.planners:planner_comparison",
        20,
        300,
        "§4.1 sweeps with the proposed method planned greedily (paper) vs by the best planner",
    ),
}
