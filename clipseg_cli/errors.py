"""Run-stopping conditions the CLI maps to exit codes (torch-free, importable anywhere)."""

from __future__ import annotations

import errno

# Errors that no retry of a single item can fix: the run must stop (and can resume later).
FATAL_WRITE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS})


class NoInputsError(Exception):
    """Nothing to process: the inputs named no files at all."""


class DiskFullError(OSError):
    """Outputs cannot be written (disk full, quota, read-only filesystem): the run stops and
    can be resumed once there is room."""


class WeightsError(Exception):
    """A model could not be found or loaded. ``str()`` is one line, fit for the user."""
