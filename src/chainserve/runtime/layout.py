"""What each block server hosts, from a method's layout (§1, §4.2)."""

from __future__ import annotations

from dataclasses import dataclass

from chainserve.plan.types import Layout, reserved_block_jobs
from chainserve.runtime.backends.base import SpanInfo


@dataclass(frozen=True, slots=True)
class ServerSpec:
    """One block server to run: ``index`` into the problem's servers, its ``name``, span and arena
    (``info``), and its emulated timing: compute per block per step ``step_s_per_block`` = τ^p_j/l_out
    and one-way delay ``delay_s`` = τ^c_j/(2·l_out) (the emulated backend's reading of §1)."""

    index: int
    name: str
    info: SpanInfo
    step_s_per_block: float
    delay_s: float


def server_specs(layout: Layout, max_tokens: int) -> list[ServerSpec]:
    """The block servers of ``layout`` in placement order; ``max_tokens`` positions per block-slot."""
    problem = layout.problem
    steps = problem.workload.output_tokens
    slots = reserved_block_jobs(layout)
    specs = []
    for span in layout.placement.spans:
        s = problem.servers[span.server]
        info = SpanInfo(span.start_block, span.num_blocks, slots[span.server], max_tokens)
        specs.append(ServerSpec(span.server, s.name, info, s.tau_p_s / steps, s.tau_c_s / (2 * steps)))
    return specs
