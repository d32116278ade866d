"""What every ``clipseg`` command shares at the terminal: exit codes, the one-line error, and
the rich progress bar. CLI layer only (nothing below the CLI prints or exits)."""

from __future__ import annotations

import enum
from typing import TYPE_CHECKING

import typer

if TYPE_CHECKING:
    from rich.progress import Progress


class ExitCode(enum.IntEnum):
    """Process exit codes."""

    OK = 0  # every input processed
    SOME_FAILED = 1  # the run finished, but some inputs failed (see the log)
    USAGE = 2  # bad options or arguments
    NO_INPUTS = 3  # the inputs named no files
    MODEL = 4  # the model could not be loaded (missing, offline, corrupt)
    LOCKED = 5  # another run is writing to the same --out; nothing was written
    CONFIG_MISMATCH = 6  # --out holds results of another configuration (see --overwrite)
    DISK_FULL = 7  # outputs could not be written (no space, quota, read-only); rerun resumes
    INTERRUPTED = 130  # SIGINT (Ctrl-C): finished work is kept; rerun resumes
    TERMINATED = 143  # SIGTERM: same


def fail(message: str, code: ExitCode) -> typer.Exit:
    """Print ``clipseg: error: MESSAGE`` (one line, stderr) and return the exit to raise."""
    typer.echo(f"clipseg: error: {message}", err=True)
    return typer.Exit(int(code))


def wants_bar(progress: str) -> bool:
    """``--progress`` -> whether to draw a rich bar: ``bar``, or ``auto`` on a terminal."""
    import sys

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
