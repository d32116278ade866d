"""Every condition that stops a command, and how an exception is told in one line.

Torch-free and importable from every layer. The commands map each of these to an exit code in
one table (:mod:`clipseg_cli.commands.console`); below the commands nothing prints or exits:
problems are raised as these exceptions, or ``ValueError`` for bad options (a usage error).
"""

from __future__ import annotations

import errno

# Errors that no retry of a single item can fix: the run must stop (and can resume later).
FATAL_WRITE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS})


class NoInputsError(Exception):
    """Nothing to process: the inputs (or the ground-truth folder) named no files at all."""


class DiskFullError(OSError):
    """Outputs cannot be written (disk full, quota, read-only filesystem): the run stops and
    can be resumed once there is room."""


class WeightsError(Exception):
    """A model could not be found or loaded. ``str()`` is one line, fit for the user."""


class BackendError(WeightsError):
    """An ONNX image graph could not be exported, quantised or loaded (a model that cannot be
    run, like weights that cannot be loaded). ``str()`` is one line."""


class LockedError(Exception):
    """Another run holds this output folder."""


class ConfigMismatchError(Exception):
    """The output folder holds results of a differently configured run."""


class WatchError(Exception):
    """Folders cannot be watched (gone, unreadable, out of inotify watches). ``str()`` is one
    line."""


class InputError(Exception):
    """One input cannot be finished (its options do not fit it, a refiner failed on it): that
    input's log row fails with ``str()`` as its one-line reason, the run goes on."""


def first_line(error: BaseException, limit: int = 200) -> str:
    """An exception as one line of at most ``limit`` characters: the first line of its message,
    or its class name when it has none."""
    lines = str(error).strip().splitlines()
    text = lines[0] if lines else type(error).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def disk_full(error: OSError, what: str) -> DiskFullError | None:
    """The run-stopping :class:`DiskFullError` for ``error`` when it says the disk is full (or
    over quota, or read-only), naming ``what`` could not be written; None for any other error."""
    if isinstance(error, DiskFullError):
        return error
    if error.errno not in FATAL_WRITE_ERRNOS:
        return None
    return DiskFullError(error.errno, f"cannot write {what}: {error.strerror}")
