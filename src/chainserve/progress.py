"""Progress on stderr for every long command (``plan``, ``simulate``, ``profile``, ``bench``,
``experiment``): one builder for bars and one for spinners, hidden when stderr is not a terminal or
when ``--quiet`` turned :data:`SHOW_PROGRESS` off."""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, ProgressColumn, TextColumn, TimeElapsedColumn

#: ``--quiet`` turns the progress bars off.
SHOW_PROGRESS = True


def progress_bar(
    *extra: ProgressColumn, console: Console | None = None, show: bool = True, elapsed: bool = True
) -> Progress:
    """A transient bar: description, bar, done/total, then ``extra`` columns and the elapsed time."""
    console = console or Console(stderr=True)
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), *extra)
    return Progress(
        *columns,
        *([TimeElapsedColumn()] if elapsed else []),
        console=console,
        disable=not (show and SHOW_PROGRESS and console.is_terminal),
        transient=True,
    )


def spinner(console: Console, text: str) -> AbstractContextManager[object]:
    """A spinner while work that reports no progress runs (nothing when stderr is not a terminal)."""
    return console.status(text) if SHOW_PROGRESS and console.is_terminal else nullcontext()
