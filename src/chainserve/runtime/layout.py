"""What each block server hosts, from a method's layout (§1, §4.2)."""

from __future__ import annotations

from dataclasses import dataclass

from chainserve.model.spec import Problem
from chainserve.model.step_cost import StepCost
from chainserve.plan.types import Layout, reserved_block_jobs
from chainserve.runtime.backends.base import PAGE_TOKENS, SpanInfo


@dataclass(frozen=True, slots=True)
class ServerSpec:
    """One block server to run: ``index`` into the problem's servers, its ``name``, span and arena
    (``info``), and its emulated timing: compute per block per step ``step_s_per_block`` = τ^p_j/l_out
    and one-way delay ``delay_s`` = τ^c_j/(2·l_out) (the emulated backend's reading of §1), or the
    server's batch ``step_cost`` when it has one (issue 18); ``weights``: the format its blocks are held
    in (``None``: the model's; issue 29)."""

    index: int
    name: str
    info: SpanInfo
    step_s_per_block: float
    delay_s: float
    step_cost: StepCost | None = None
    weights: str | None = None

    @classmethod
    def of(cls, problem: Problem, index: int, info: SpanInfo) -> ServerSpec:
        """Problem server ``index`` hosting ``info``, with its τ read as the emulated backend's timing."""
        s, steps = problem.servers[index], problem.workload.output_tokens
        return cls(index, s.name, info, s.tau_p_s / steps, s.tau_c_s / (2 * steps), s.step, s.weights)


def server_specs(
    layout: Layout, max_tokens: int, page_tokens: int = PAGE_TOKENS, max_context: int | None = None
) -> list[ServerSpec]:
    """The block servers of ``layout`` in placement order; ``max_tokens`` positions per block-slot, held
    in pages of ``page_tokens``; sessions up to ``max_context`` positions (``None``: the model's window)."""
    slots = reserved_block_jobs(layout)
    return [
        ServerSpec.of(
            layout.problem,
            span.server,
            SpanInfo(span.start_block, span.num_blocks, slots[span.server], max_tokens, page_tokens, max_context),
        )
        for span in layout.placement.spans
    ]
