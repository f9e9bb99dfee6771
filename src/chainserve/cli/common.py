"""Shared CLI plumbing: consoles and the one-line error convention.

Every command wraps its work in :func:`user_errors`: a bad input (``SpecError`` or any other
``ValueError``, or an unreadable/unwritable path) prints ``error: <field>: <message>`` on stderr and
exits with status 2; anything else is a bug and keeps its traceback. The command-line library's own
usage errors (a bad flag value, an unknown option, a missing argument) take the same one-line form
through :func:`run_one_line`, which the app's root group wraps around every invocation.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from typer._click import exceptions as click_errors

from chainserve.model.spec import SpecError

#: Width used when stdout is not a terminal (pipes, files): rich would otherwise squeeze tables to 80.
PIPE_WIDTH = 140


def stdout_console() -> Console:
    console = Console()
    if not console.is_terminal and "COLUMNS" not in os.environ:
        console = Console(width=PIPE_WIDTH)
    return console


def stderr_console() -> Console:
    return Console(stderr=True, soft_wrap=True)


def fail(message: str) -> typer.Exit:
    """Print ``error: message`` (one line) on stderr; return the exit-2 exception to raise."""
    typer.echo(f"error: {' '.join(message.split())}", err=True)
    return typer.Exit(2)


@contextmanager
def user_errors() -> Iterator[None]:
    """Turn input errors into one ``error:`` line and exit status 2."""
    try:
        yield
    except ValueError as exc:  # SpecError's text is already "<field>: <message>"
        raise fail(str(exc)) from None
    except OSError as exc:
        raise fail(f"{exc.filename or 'file'}: {exc.strerror or exc}") from None


@contextmanager
def native_stdout_to_stderr() -> Iterator[None]:
    """Send what native code prints on file descriptor 1 to stderr meanwhile: HiGHS (under
    ``scipy.optimize.milp``) prints stray debug lines there, which would corrupt ``--json`` output.
    C's stdio buffers are flushed on both sides so nothing printed inside lands on stdout later."""
    import ctypes

    libc = ctypes.CDLL(None)
    try:
        sys.stdout.flush()
        saved = os.dup(1)
    except (AttributeError, OSError):  # stdout closed: nothing to protect
        yield
        return
    libc.fflush(None)
    os.dup2(2, 1)
    try:
        yield
    finally:
        libc.fflush(None)
        os.dup2(saved, 1)
        os.close(saved)


@contextmanager
def stdout_errors() -> Iterator[None]:
    """A closed, full or broken stdout is an error (``error: stdout: …``, exit 2), never a silent exit 0
    with nothing written: checked before and around the writes, and flushed at the end."""
    if sys.stdout is None:
        raise fail("stdout: closed; nothing can be written")
    try:
        yield
        sys.stdout.flush()
    except OSError as exc:
        try:  # keep the interpreter's own flush at exit from failing again
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        except OSError:
            pass
        reason = "broken pipe (the reader went away)" if isinstance(exc, BrokenPipeError) else exc.strerror or exc
        raise fail(f"stdout: {reason}; the output is incomplete") from None


def usage_error_line(exc: click_errors.ClickException) -> str:
    """``<field>: <message>`` for a usage error of the command-line library.

    >>> usage_error_line(click_errors.NoSuchOption("--jsn", possibilities=["--json"]))
    "jsn: unknown option (did you mean '--json'?)"
    """
    message = exc.message.rstrip(".")
    if isinstance(exc, click_errors.NoSuchOption):
        names = " or ".join(repr(p) for p in sorted(exc.possibilities))
        hint = f" (did you mean {names}?)" if exc.possibilities else ""
        return f"{exc.option_name.lstrip('-')}: unknown option{hint}"
    if isinstance(exc, click_errors.BadOptionUsage):
        return f"{exc.option_name.lstrip('-')}: {message}"
    if isinstance(exc, click_errors.BadParameter):
        param = exc.param
        if param is not None and getattr(param, "opts", None) and param.param_type_name == "option":
            field = max(param.opts, key=len).lstrip("-")
        elif param is not None:
            field = (param.name or "argument").replace("_", "-")
        else:
            hint = exc.param_hint if isinstance(exc.param_hint, str) else "/".join(exc.param_hint or ["argument"])
            field = hint.strip("'\"").lstrip("-")
        if isinstance(exc, click_errors.MissingParameter):
            message = message or "missing"
        return f"{field}: {message}"
    field = "command" if message.startswith("No such command") else "arguments"
    return f"{field}: {message}"


def run_one_line(
    main: Callable[..., object],
    args: object,
    prog_name: object,
    complete_var: object,
    standalone_mode: bool,
    **extra: object,
) -> object:
    """Run a click ``main`` so that usage errors print one ``error:`` line and exit 2 (no box)."""
    try:
        result = main(args, prog_name, complete_var, standalone_mode=False, **extra)
    except click_errors.NoArgsIsHelpError:  # the help text is already printed
        code = 2
    except click_errors.ClickException as exc:
        typer.echo(f"error: {' '.join(usage_error_line(exc).split())}", err=True)
        code = exc.exit_code if isinstance(exc, click_errors.UsageError) else 2
    else:
        if not standalone_mode:
            return result
        code = result if isinstance(result, int) else 0
    if standalone_mode:
        sys.exit(code)
    return code


#: Image formats ``--plot`` writes (matplotlib's Agg backend).
IMAGE_SUFFIXES = (".png", ".pdf", ".svg", ".jpg", ".jpeg", ".webp", ".tif", ".tiff", ".eps", ".ps")


def check_image_path(field: str, path: Path) -> Path:
    """``path`` when it names an image file that can be written (checked before any work)."""
    if path.is_dir():
        raise SpecError(field, f"{path} is a folder; give a file name such as {path / 'plan.png'}")
    if path.suffix.lower() not in IMAGE_SUFFIXES:
        what = f"unknown image format {path.suffix!r}" if path.suffix else "no file extension"
        raise SpecError(field, f"{path}: {what}; use one of {', '.join(IMAGE_SUFFIXES)}")
    folder = path.parent
    if folder.exists() and not folder.is_dir():
        raise SpecError(field, f"{folder} is a file, not a folder")
    return path


def check_out_folder(field: str, path: Path) -> Path:
    """``path`` when it is a writable folder or can be created as one (checked before any work)."""
    if path.exists() and not path.is_dir():
        raise SpecError(field, f"{path} is a file, not a folder")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise SpecError(field, f"{path}: cannot create the folder: {exc.strerror or exc}") from None
    if not os.access(path, os.W_OK):
        raise SpecError(field, f"{path}: folder is not writable")
    return path


@contextmanager
def renamed(old: str, new: str) -> Iterator[None]:
    """Re-raise a :class:`SpecError` about field ``old`` as one about ``new`` (a flag's name)."""
    try:
        yield
    except SpecError as exc:
        if exc.field != old:
            raise
        raise SpecError(new, str(exc).removeprefix(f"{old}: ")) from None


def fmt_s(seconds: float) -> str:
    """A time in seconds with 3 decimals, or 3 significant digits when that would print 0.000.

    >>> fmt_s(12.3456), fmt_s(4.2e-05), fmt_s(0.0)
    ('12.346', '4.2e-05', '0.000')
    """
    return f"{seconds:.3g}" if 0 < abs(seconds) < 0.0005 else f"{seconds:.3f}"


#: ``--planner`` of the commands that plan the proposed chains (``best`` or the paper's ``greedy``).
PlannerOption = Annotated[
    str,
    typer.Option(
        metavar="best|greedy", help="Planner of the proposed chains: best (improves on the paper's greedy) or greedy."
    ),
]

#: The optional CLUSTER argument of ``plan`` and ``simulate``.
ClusterArgument = Annotated[
    Path | None,
    typer.Argument(
        metavar="[CLUSTER]",
        help="Cluster file (YAML or raw JSON); default: the embedded paper cluster (BLOOM-176B on 20 MIG slices, "
        "η = 0.2).",
    ),
]
