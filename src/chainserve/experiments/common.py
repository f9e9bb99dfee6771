"""Shared plumbing of the experiments: confidence intervals and report writing (progress bars:
:mod:`chainserve.progress`).

Replications run through :func:`chainserve.sim.runs.run_method` (its module doc gives the seeds);
replication ``s`` builds its cluster from ``default_rng(s)``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

from chainserve.analysis.records import Interval, replications_ci


def mean_ci(values: Sequence[float]) -> Interval:
    """95 % Student-t interval over replications (a single value gets a zero-width interval)."""
    if len(values) == 1:
        return Interval(float(values[0]), 0.0, 0.95)
    return replications_ci(values)


def reduction_pct(ours: float, theirs: float) -> float:
    """How much lower ours is, in percent of theirs."""
    return 100.0 * (1.0 - ours / theirs) if theirs > 0 and math.isfinite(theirs) else math.nan


def pct(value: float) -> str:
    """One percent convention for every report: ``12.3 %`` (a reduction is positive when ours is lower)."""
    return "–" if math.isnan(value) else f"{value:.1f} %"


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A GitHub-flavoured markdown table; floats get 3 significant decimals."""

    def cell(v: object) -> str:
        if isinstance(v, float):
            return "–" if math.isnan(v) else f"{v:.3f}" if abs(v) < 1000 else f"{v:.0f}"
        return str(v)

    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def save_figure(fig, path: Path) -> None:
    """Lay out a matplotlib ``Figure`` and write it as PNG to ``path`` (folders created)."""
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)


def write_report(out_dir: Path, name: str, title: str, sections: Sequence[str]) -> Path:
    """Write ``out_dir/name.md`` with a title and sections; returns its path."""
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{name}.md"
    path.write_text(f"# {title}\n\n" + "\n\n".join(sections) + "\n", encoding="utf-8")
    return path
