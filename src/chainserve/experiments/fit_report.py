"""The step-cost fit per server as a report table and plot (issue 18, item 2): each profiled server's
decode fit ``t = c0 + m·(α + β·b)`` and prefill fit ``t = c0' + m·(α' + β'·q)``
(:mod:`chainserve.measure.step_fit`) with its R² and the timings it was fitted on, and the
orchestrator's LM-head fit α_h + β_h·n.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from matplotlib.figure import Figure

from chainserve.experiments.common import markdown_table, save_figure
from chainserve.measure.profile import ServerProfile
from chainserve.measure.step_fit import LinearFit
from chainserve.model.step_cost import StepCost


def fit_table(profiles: Mapping[str, ServerProfile], head: StepCost | None) -> str:
    """One row per fitted server (per-block coefficients in ms, transport c0, R² and points of each
    fit) and one for the head."""
    header = ["server", "α (ms)", "β (ms)", "c0 (ms)", "R² decode", "points", "α' (ms)", "β' (µs/token)"]
    header += ["c0' (ms)", "R² prefill", "points"]
    rows: list[list[object]] = []
    for name, p in profiles.items():
        if p.step_fit is None:
            continue
        d, f = p.step_fit.decode, p.step_fit.prefill
        rows.append(
            [name, d.alpha_s * 1e3, d.beta_s * 1e3, d.overhead_s * 1e3, d.r2, d.num_points]
            + [f.alpha_s * 1e3, f.beta_s * 1e6, f.overhead_s * 1e3, f.r2, f.num_points]
        )
    if head is not None:
        r2 = "–" if head.r2 is None else f"{head.r2:.3f}"
        rows.append(["LM head (per batch of n)", head.alpha_s * 1e3, head.beta_s * 1e3, "–", r2, "–"] + ["–"] * 5)
    return markdown_table(header, rows)


def _panel(ax, fit: LinearFit, title: str, label: str) -> None:
    """Timings (dots, one colour per block count m) and the fitted line of each m."""
    counts = sorted({m for m, _, _ in fit.points})
    for i, m in enumerate(counts):
        xs = [x for mm, x, _ in fit.points if mm == m]
        ts = [t * 1e3 for mm, _, t in fit.points if mm == m]
        colour = f"C{i}"
        ax.plot(xs, ts, "o", color=colour, alpha=0.4, markersize=3, label=f"m = {m:g}")
        line = sorted(set(xs))
        ax.plot(line, [fit.predict_s(m, x) * 1e3 for x in line], "-", color=colour)
    ax.set_xlabel(label)
    ax.set_ylabel("time (ms)")
    ax.set_title(f"{title}, R² {fit.r2:.3f}", fontsize=9)
    ax.legend(fontsize=7)


def fit_figure(profiles: Mapping[str, ServerProfile], path: Path) -> bool:
    """Plot every fitted server's decode (top) and prefill (bottom) timings with the fit; ``False``
    (nothing written) when no server was fitted."""
    fitted = [(name, p.step_fit) for name, p in profiles.items() if p.step_fit is not None]
    if not fitted:
        return False
    fig = Figure(figsize=(max(3.6 * len(fitted), 7.2), 6.0))  # wide enough for the title
    axes = fig.subplots(2, len(fitted), squeeze=False)
    for col, (name, fit) in enumerate(fitted):
        _panel(axes[0][col], fit.decode, f"{name}: decode", "sessions b in the decode iteration")
        _panel(axes[1][col], fit.prefill, f"{name}: prefill", "prompt tokens q")
    fig.suptitle("Step cost per server: timings through m blocks and the least-squares fit", fontsize=10)
    save_figure(fig, path)
    return True
