"""Draw a plan: block spans per server and each server chain as a path through its hops (paper §1).

Uses matplotlib's object API (``Figure`` + Agg canvas), so no global pyplot state or display.
"""

from __future__ import annotations

from pathlib import Path

from matplotlib import colormaps
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from chainserve.plan.types import Plan

#: Beyond this many chains the legend lists the fastest ones only.
MAX_LEGEND_CHAINS = 20


def plot_plan(plan: Plan, path: str | Path) -> Path:
    """Save a PNG (or any format matplotlib infers from ``path``): x = blocks 1..L, y = placed
    servers (ordered by first block); grey bars are the spans a_j..a_j+m_j−1, coloured lines the
    chains, fastest first, each hop drawn over the blocks it runs, labelled with T_k and c_k."""
    problem = plan.problem
    L = problem.model.num_blocks
    spans = sorted(plan.placement.spans, key=lambda s: (s.start_block, s.server))
    row = {span.server: i for i, span in enumerate(spans)}
    num_chains = len(plan.chains)
    fig = Figure(figsize=(11, 1.6 + 0.42 * max(len(spans), 3)), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    for span in spans:
        ax.barh(
            row[span.server],
            span.num_blocks,
            left=span.start_block - 0.5,
            height=0.8,
            color="0.88",
            edgecolor="0.55",
            linewidth=0.8,
            zorder=1,
        )
    cmap = colormaps["tab10" if num_chains <= 10 else "tab20"]
    offset = _lane_offsets(plan)
    for k, chain in enumerate(plan.chains):
        dx = (k - (num_chains - 1) / 2) * min(0.4 / num_chains, 0.1)  # keep hand-over lines apart
        xs: list[float] = []
        ys: list[float] = []
        for hop in chain.hops:
            y = row[hop.server] + offset[k, hop.server]
            xs += [hop.start_block - 0.5 + dx, hop.end_block + 0.5 + dx]
            ys += [y, y]
        label = f"chain {k + 1}: T={chain.service_time_s:.2f} s, c={chain.capacity}" if k < MAX_LEGEND_CHAINS else None
        ax.plot(xs, ys, color=cmap(k % cmap.N), linewidth=2.2, marker="o", markersize=3.5, label=label, zorder=3)
    ax.set_yticks(range(len(spans)))
    ax.set_yticklabels([_server_label(plan, span.server) for span in spans], fontsize=8)
    ax.invert_yaxis()
    ax.set_xlim(0, L + 1)
    ax.set_xlabel("block")
    ax.grid(axis="x", color="0.93", zorder=0)
    ax.set_title(_title(plan), fontsize=10)
    if num_chains:
        shown = min(num_chains, MAX_LEGEND_CHAINS)
        extra = f" (fastest {shown} of {num_chains})" if num_chains > shown else ""
        ax.legend(
            loc="upper left",
            bbox_to_anchor=(1.01, 1.0),
            fontsize=8,
            frameon=False,
            title=f"chains{extra}",
            title_fontsize=8,
            ncols=1 if shown <= 25 else 2,
        )
    path = Path(path)
    fig.savefig(path, dpi=130)
    return path


def _lane_offsets(plan: Plan) -> dict[tuple[int, int], float]:
    """Vertical offset of chain k inside server j's bar, so chains sharing a server do not overlap."""
    through: dict[int, list[int]] = {}
    for k, chain in enumerate(plan.chains):
        for hop in chain.hops:
            through.setdefault(hop.server, []).append(k)
    offsets = {}
    for server, chains in through.items():
        lane = min(0.7 / len(chains), 0.2)
        for i, k in enumerate(chains):
            offsets[k, server] = (i - (len(chains) - 1) / 2) * lane
    return offsets


def _server_label(plan: Plan, server: int) -> str:
    s = plan.problem.servers[server]
    return f"{s.name} ({s.gpu})" if s.gpu else s.name


def _title(plan: Plan) -> str:
    p = plan.problem
    c = "–" if plan.c is None else str(plan.c)
    response = (
        f"E[T] ∈ [{plan.bounds.lower_s:.3g}, {plan.bounds.upper_s:.3g}] s" if plan.is_stable else "UNSTABLE (λ ≥ ν)"
    )
    return (
        f"{p.name}: {p.model.name}, λ={p.arrival_rate_per_s:g}/s — c={c}, K={len(plan.chains)}, "
        f"C={plan.num_job_servers}, ν={plan.total_rate_per_s:.3g}/s, ρ={plan.load:.2f}, {response}"
    )
