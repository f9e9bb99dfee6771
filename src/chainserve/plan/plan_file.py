"""Plans as files: ``chainserve plan --json``'s object plus a ``problem`` key (§1, §4.2).

``problem`` holds every field of the servers, model and workload, so a plan file alone is enough to
start a block server or the orchestrator on another machine. A layout is a
:class:`~chainserve.plan.types.Plan` (chains with capacities: proposed, jffc-only) or a
:class:`~chainserve.plan.baselines.types.PathPlacement` (per-request paths over cache pools: PETALS,
BPRR); each server's entry also says its ``block_slots``: its cache reservation in units of s_c
(Σ_k c_k·m_ij(k) for a plan, ⌊pool/s_c⌋ for a path placement), the KV arena a block server holds.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from chainserve.model.formats import FormatSizes
from chainserve.model.spec import ModelSpec, Problem, Server, SpecError, Workload
from chainserve.model.step_cost import StepCost
from chainserve.plan.baselines.types import PathPlacement
from chainserve.plan.csearch import make_plan
from chainserve.plan.export import model_to_dict, plan_to_dict, server_sizes
from chainserve.plan.types import Chain, Hop, Layout, Placement, Plan, Span, chain_time_s, reserved_block_jobs


def layout_to_dict(layout: Layout) -> dict[str, Any]:
    """``plan --json``'s keys (a path placement has no chains and no c), ``block_slots`` per server,
    and ``problem``."""
    slots = reserved_block_jobs(layout)
    problem = layout.problem
    if isinstance(layout, Plan):
        data = plan_to_dict(layout)
    else:
        data = {
            "cluster": problem.name,
            "model": model_to_dict(problem.model),
            "method": layout.method,
            "c": None,
            "arrival_rate": problem.arrival_rate_per_s,
            "chains": [],
            "notes": list(layout.notes),
            "servers": [
                {
                    "name": problem.servers[s.server].name,
                    "gpu": problem.servers[s.server].gpu,
                    "memory_gb": problem.servers[s.server].memory_gb,
                    "start_block": s.start_block,
                    "num_blocks": s.num_blocks,
                    "cache_gb": layout.cache_gb[s.server],
                    **server_sizes(problem, s.server),
                }
                for s in layout.placement.spans
            ],
        }
    for entry, span in zip(data["servers"], layout.placement.spans, strict=True):
        entry["block_slots"] = slots[span.server]
    data["problem"] = {
        "name": problem.name,
        "notes": list(problem.notes),
        "servers": [dataclasses.asdict(s) for s in problem.servers],
        "model": dataclasses.asdict(problem.model),
        "workload": dataclasses.asdict(problem.workload),
        "head_cost": None if problem.head_cost is None else dataclasses.asdict(problem.head_cost),
    }
    return data


def _server(raw: dict[str, Any]) -> Server:
    step = raw.get("step")
    return Server(**{**raw, "step": None if step is None else StepCost(**step)})


def _model(raw: dict[str, Any]) -> ModelSpec:
    sizes = tuple(FormatSizes(**f) for f in raw.get("format_sizes", ()))
    return ModelSpec(**{**raw, "format_sizes": sizes})


def layout_from_dict(data: Any) -> Plan | PathPlacement:
    """Rebuild a layout saved by :func:`layout_to_dict` (raises ``SpecError`` naming the field)."""
    try:
        raw = data["problem"]
        problem = Problem(
            tuple(_server(s) for s in raw["servers"]),
            _model(raw["model"]),
            Workload(**raw["workload"]),
            raw.get("name", "cluster"),
            tuple(raw.get("notes", ())),
            head_cost=None if raw.get("head_cost") is None else StepCost(**raw["head_cost"]),
        )
        index = {s.name: j for j, s in enumerate(problem.servers)}
        spans = tuple(Span(index[s["name"]], int(s["start_block"]), int(s["num_blocks"])) for s in data["servers"])
        placement = Placement(spans, problem.model.num_blocks)
        if not data["chains"]:
            pools = {index[s["name"]]: float(s["cache_gb"]) for s in data["servers"]}
            layout: Plan | PathPlacement = PathPlacement(
                problem,
                placement,
                tuple(pools.get(j, 0.0) for j in range(problem.num_servers)),
                str(data["method"]),
                tuple(data.get("notes", ())),
            )
        else:
            chains = []
            for ch in data["chains"]:
                hops = tuple(
                    Hop(index[name], first, last - first + 1)
                    for name, (first, last) in zip(ch["servers"], ch["blocks"], strict=True)
                )
                chains.append(Chain(hops, chain_time_s(problem, hops), int(ch["capacity"])))
            layout = make_plan(problem, placement, tuple(chains), data.get("c"), str(data.get("method", "proposed")))
        layout.check()
    except SpecError:
        raise
    except (KeyError, TypeError, ValueError) as exc:
        raise SpecError("plan", f"not a plan saved by chainserve plan --json ({type(exc).__name__}: {exc})") from None
    return layout


def load_layout(path: str | Path) -> Plan | PathPlacement:
    """Read a plan file (``chainserve plan --json`` output)."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise SpecError("plan", f"{path}: not a JSON plan ({exc})") from None
    return layout_from_dict(data)
