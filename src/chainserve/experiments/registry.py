"""Experiments by name, with their default sizes (the paper's) and a quick size for smoke runs."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from chainserve.experiments.c_sweep import c_sweep
from chainserve.experiments.paper_sweeps import paper_sweeps
from chainserve.experiments.policies import policy_comparison
from chainserve.experiments.table1 import table1


@dataclass(frozen=True, slots=True)
class Experiment:
    run: Callable[..., Path]  # (out_dir, num_seeds, num_jobs) -> report path
    num_seeds: int
    num_jobs: int
    help: str


EXPERIMENTS: dict[str, Experiment] = {
    "paper-sweeps": Experiment(paper_sweeps, 20, 300, "§4.1: J and η sweeps, proposed vs PETALS vs BPRR"),
    "policies": Experiment(policy_comparison, 10, 20_000, "JFFC vs SED/SA-JSQ/JSQ/JIQ/random/threshold-JFFC"),
    "c-sweep": Experiment(c_sweep, 5, 5000, "response time and bounds vs c; chosen c vs λ"),
    "table1": Experiment(table1, 5, 1000, "§4.2 Table 1 in simulation: testbed + Azure code trace"),
}
