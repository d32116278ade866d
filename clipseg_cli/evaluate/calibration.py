"""Calibration: the threshold that maximises a metric on a labelled set, and the threshold file
that ``clipseg calibrate`` writes and ``--threshold-from`` reads.

It owns the threshold file's format and its validation; the per-threshold numbers it searches
are an :class:`~clipseg_cli.evaluate.scoring.EvalReport`'s. It never scores an image and never
prints."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

from clipseg_cli.io.files import write_json_atomic
from clipseg_cli.io.paths import display_path
from clipseg_cli.version import __version__

if TYPE_CHECKING:
    from clipseg_cli.evaluate.scoring import EvalReport

CALIBRATION_METRICS = ("iou_fg", "binary_iou", "miou")
THRESHOLD_FILE_FORMAT = "clipseg-threshold"


def calibration(report: EvalReport, metric: str = "iou_fg") -> dict[str, Any]:
    """The threshold file's content: the grid threshold maximising ``metric`` on the report.

    Raises:
        ValueError: no pair could be evaluated, the report is a matting one, or the metric is
            not one of :data:`CALIBRATION_METRICS`.
    """
    if metric not in CALIBRATION_METRICS:
        raise ValueError(f"--metric {metric}: choose from {', '.join(CALIBRATION_METRICS)}")
    scores = report.segmentation
    if scores is None:
        raise ValueError("nothing to calibrate on: no image could be evaluated")
    best = scores.best(metric)
    at = scores.at(best)
    return {
        "format": THRESHOLD_FILE_FORMAT,
        "threshold": best,
        "metric": metric,
        metric: at[metric],
        "iou_fg": at["iou_fg"],
        "at_threshold": scores.at(report.config.threshold),
        "grid": {"start": 0.0, "stop": 1.0, "step": 0.01, "rule": "foreground = prob > t"},
        "images": scores.images,
        "source": report.config.describe(),
        "version": __version__,
    }


def write_threshold_file(path: Path, content: dict[str, Any]) -> None:
    """Write :func:`calibration`'s result as JSON (atomically)."""
    write_json_atomic(path, content)


def read_threshold_file(path: Path) -> float:
    """The threshold stored by ``clipseg calibrate``: a JSON object with a ``threshold`` number
    in [0, 1] (a bare JSON number is accepted too).

    Raises:
        ValueError: ``"<path>: <reason>"`` on one line when the file is unreadable, not JSON,
            or holds no valid threshold.
    """
    name = display_path(path)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ValueError(f"{name}: file not found") from None
    except (OSError, UnicodeDecodeError) as error:
        raise ValueError(f"{name}: cannot read ({type(error).__name__})") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as error:
        raise ValueError(f"{name}: not JSON ({error.msg} at line {error.lineno})") from None
    value = data.get("threshold") if isinstance(data, dict) else data
    if isinstance(data, dict) and "threshold" not in data:
        raise ValueError(f"{name}: no 'threshold' key (write it with clipseg calibrate)")
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"{name}: threshold must be a number, got {type(value).__name__}")
    if not math.isfinite(value) or not 0.0 <= value <= 1.0:
        raise ValueError(f"{name}: threshold {value} is not between 0 and 1")
    return float(value)
