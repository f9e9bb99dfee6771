"""Experiments by name, with their default sizes (the paper's). Modules load on first use, so the CLI
starts without importing matplotlib."""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True, slots=True)
class Experiment:
    target: str  # "module:function", called as function(out_dir, num_seeds, num_jobs, **options) -> report path
    num_seeds: int
    num_jobs: int
    help: str
    options: frozenset[str] = frozenset()  # keyword options besides those: "time_scale", "methods", "clusters"

    def load(self) -> Callable[..., Path]:
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
    "table1-live": Experiment(
        "chainserve.experiments.table1_live:table1_live",
        1,
        500,
        "§4.2 Table 1 on the live runtime (emulated MIG testbed) next to the simulator and the paper",
        frozenset({"time_scale", "methods"}),
    ),
    "fidelity": Experiment(
        "chainserve.experiments.fidelity:fidelity",
        1,
        150,
        "simulated vs measured response time on 3 live clusters (emulated and torch), with the Theorem-4 bounds, "
        "and with a block server killed under load",
        frozenset({"time_scale", "methods", "clusters"}),
    ),
    "batch-plans": Experiment(
        "chainserve.experiments.batch_plans:batch_plans",
        1,
        150,
        "issue 18: batch-blind vs batch-aware plans on a memory-loose, CPU-like cluster, live and simulated",
        frozenset({"time_scale"}),
    ),
    "adaptive": Experiment(
        "chainserve.experiments.adaptive:adaptive_experiment",
        10,
        20_000,
        "beyond the paper: static vs adaptive vs oracle plans on a step, a day and the Azure traces",
    ),
}
