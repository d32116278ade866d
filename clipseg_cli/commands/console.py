"""What every ``clipseg`` command shares at the terminal: exit codes, the one table that maps an
exception to its exit code and one-line message, and the rich progress bar.

Only the commands package prints or exits; everything below it raises the exceptions of
:mod:`clipseg_cli.errors` (or ``ValueError`` for a bad option), and each command runs its work
inside :func:`exit_on_error`.
"""

from __future__ import annotations

import enum
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

import typer

from clipseg_cli.errors import (
    ConfigMismatchError,
    DiskFullError,
    LockedError,
    NoInputsError,
    WatchError,
    WeightsError,
)

if TYPE_CHECKING:
    from rich.progress import Progress


class ExitCode(enum.IntEnum):
    """Process exit codes (the README's table)."""

    OK = 0  # every input processed
    SOME_FAILED = 1  # the run finished, but some inputs failed (each said on stderr and in the log)
    USAGE = 2  # bad options or arguments
    NO_INPUTS = 3  # the inputs named no files (watch: its folders cannot be watched)
    MODEL = 4  # the model could not be loaded (missing, offline, corrupt)
    LOCKED = 5  # another run is writing to the same --out; nothing was written
    CONFIG_MISMATCH = 6  # --out holds results of another configuration (see --overwrite)
    DISK_FULL = 7  # outputs could not be written (no space, quota, read-only); rerun resumes
    INTERRUPTED = 130  # SIGINT (Ctrl-C): finished work is kept; rerun resumes
    TERMINATED = 143  # SIGTERM: same


#: Exception -> exit code, first match wins (so subclasses come before their bases). ValueError
#: is any bad option found below the commands (a bad --ref image, a manifest line, a missing
#: Ray install).
EXIT_CODES: tuple[tuple[type[BaseException], ExitCode], ...] = (
    (NoInputsError, ExitCode.NO_INPUTS),
    (WatchError, ExitCode.NO_INPUTS),
    (LockedError, ExitCode.LOCKED),
    (ConfigMismatchError, ExitCode.CONFIG_MISMATCH),
    (DiskFullError, ExitCode.DISK_FULL),
    (WeightsError, ExitCode.MODEL),
    (ValueError, ExitCode.USAGE),
    (KeyboardInterrupt, ExitCode.INTERRUPTED),
)


def fail(message: str, code: ExitCode) -> typer.Exit:
    """Print ``clipseg: error: MESSAGE`` (one line, stderr) and return the exit to raise."""
    typer.echo(f"clipseg: error: {message}", err=True)
    return typer.Exit(int(code))


@contextmanager
def exit_on_error(*, interrupted: str = "interrupted") -> Iterator[None]:
    """Turn the exceptions of :data:`EXIT_CODES` into their one-line error and exit code.

    ``interrupted``: what a Ctrl-C that reached the command says (e.g. how to resume).
    """
    try:
        yield
    except tuple(error for error, _ in EXIT_CODES) as error:
        code = next(code for kind, code in EXIT_CODES if isinstance(error, kind))
        if isinstance(error, DiskFullError):
            message = f"{error.strerror}; finished outputs are kept, rerun to resume"
        elif isinstance(error, KeyboardInterrupt):
            message = interrupted
        else:
            message = str(error)
        raise fail(message, code) from None


def wants_bar(progress: str) -> bool:
    """``--progress`` -> whether to draw a rich bar: ``bar``, or ``auto`` on a terminal."""
    return progress == "bar" or (progress == "auto" and sys.stderr.isatty())


def progress_bar(title: str, *fields: str) -> Progress:
    """A started rich bar on stderr: ``title``, the bar, done/total, then one text column per
    entry of ``fields`` (rich format strings over the task's fields), elapsed time and ETA."""
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    bar = Progress(
        TextColumn(title),
        BarColumn(),
        MofNCompleteColumn(),
        *(TextColumn(field) for field in fields),
        TimeElapsedColumn(),
        TextColumn("ETA"),
        TimeRemainingColumn(),
        console=Console(stderr=True),
    )
    bar.start()
    return bar


def say_failed(row: dict | None, bar: Progress | None, prefix: str = "failed") -> None:
    """One line for an input that failed (``row`` as the run's log records it): its name and
    the reason, above the bar when there is one. Said in every progress mode: it is an error,
    and the log is not where a user looks first."""
    if row is None or row.get("status") != "failed":
        return
    line = f"clipseg: {prefix} {row['input']}: {row.get('error') or 'failed'}"
    if bar is not None:
        bar.console.print(line, markup=False, highlight=False, soft_wrap=True)
    else:
        typer.echo(line, err=True)
