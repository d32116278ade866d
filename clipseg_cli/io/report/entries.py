"""Which rows of a segment log the review page shows: :func:`load_entries`.

It owns the rules below. It only reads the log (never an image or an output) and never writes.

Which rows are shown
    The latest row per input key wins (reruns append rows). A ``skipped`` row means "unchanged
    since an earlier run", so it is replaced by that key's latest earlier ``ok``/``failed`` row
    (marked ``resumed``); only when the log has no such row is it shown as ``skipped``. Rows
    without a key (a missing input or an unreadable folder) are shown only from the latest run:
    they describe the command line, not a file, and an old typo should not haunt every report.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path


@dataclass
class LogEntries:
    """The rows a report shows, in log order of their keys' first appearance."""

    rows: list[dict]
    #: Lines that were not JSON objects (a killed writer's half line, hand edits).
    bad_lines: int
    #: Run id of the last row in the log.
    latest_run: str | None


def _row_ident(row: dict) -> str:
    key = row.get("key")
    # Input-level failures have no key; the input spec identifies them instead.
    return f"key:{key}" if isinstance(key, str) else f"input:{row.get('input')}"


def load_entries(log_path: Path) -> LogEntries:
    """Read a segment log and resolve it to one row per input (see the module docstring).

    A resolved ``skipped`` row is a copy of the earlier row with ``resumed`` set to True and
    ``skipped_in`` set to the skipping run's id.

    Raises:
        FileNotFoundError: there is no log at ``log_path``.
    """
    latest: dict[str, dict] = {}
    processed: dict[str, dict] = {}  # latest ok/failed row per ident
    bad_lines = 0
    latest_run = None
    with Path(log_path).open(encoding="utf-8", errors="replace") as handle:
        for line in handle:
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except ValueError:
                bad_lines += 1
                continue
            if not isinstance(row, dict) or not isinstance(row.get("status"), str):
                bad_lines += 1
                continue
            ident = _row_ident(row)
            latest_run = row.get("run", latest_run)
            if row["status"] == "skipped":
                earlier = processed.get(ident)
                if earlier is not None:
                    row = {**earlier, "resumed": True, "skipped_in": row.get("run")}
            else:
                processed[ident] = row
            # Re-insert so dict order follows the latest appearance only for new keys.
            latest[ident] = row
    rows = [
        row
        for ident, row in latest.items()
        if ident.startswith("key:") or row.get("run") == latest_run
    ]
    return LogEntries(rows, bad_lines, latest_run)
