"""Rows of the JSON-lines log that do not come from a processed image (torch-free).

Every row has: ``input``, ``key``, ``status`` (ok / failed / skipped), ``error``, ``width``,
``height``, ``prompts`` (per-prompt stats), ``outputs`` ([{prompt, kind, path}]), ``timings``
and ``run``. See the README for the full schema.
"""

from __future__ import annotations


def failure_row(item_path: str, key: str | None, error: str | None, status: str = "failed") -> dict:
    return {
        "input": item_path,
        "key": key,
        "status": status,
        "error": error,
        "width": None,
        "height": None,
        "prompts": [],
        "outputs": [],
        "timings": {},
    }
