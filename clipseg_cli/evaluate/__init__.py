"""``clipseg eval`` / ``clipseg calibrate``: predictions against ground truth, on files.

* :mod:`.config`: :class:`EvalConfig`, one run's validated options;
* :mod:`.pairing`: which prediction (or image and prompt) meets which ground truth (the
  matching rules are in its docstring);
* :mod:`.scoring`: :func:`run_eval`, which reads or predicts each pair and scores it into an
  :class:`EvalReport`;
* :mod:`.outputs`: the JSON report, the per-image CSV and the precision/recall curve;
* :mod:`.calibration`: the best threshold on a labelled set and the threshold file.

Nothing here prints or exits: per-file problems become ``errors`` entries of the
:class:`EvalReport`, option problems raise ``ValueError``, an empty ground-truth folder raises
:class:`~clipseg_cli.errors.NoInputsError`, a model that cannot be loaded raises
:class:`~clipseg_cli.errors.WeightsError`.
"""

from __future__ import annotations

from clipseg_cli.evaluate.calibration import (
    CALIBRATION_METRICS,
    THRESHOLD_FILE_FORMAT,
    calibration,
    read_threshold_file,
    write_threshold_file,
)
from clipseg_cli.evaluate.config import EvalConfig
from clipseg_cli.evaluate.outputs import (
    MATTING_CSV_COLUMNS,
    SEGMENTATION_CSV_COLUMNS,
    write_per_image_csv,
    write_pr_curve,
    write_report_json,
)
from clipseg_cli.evaluate.pairing import Pair, pair_images, pair_predictions
from clipseg_cli.evaluate.scoring import EvalReport, run_eval

__all__ = [
    "CALIBRATION_METRICS",
    "MATTING_CSV_COLUMNS",
    "SEGMENTATION_CSV_COLUMNS",
    "THRESHOLD_FILE_FORMAT",
    "EvalConfig",
    "EvalReport",
    "Pair",
    "calibration",
    "pair_images",
    "pair_predictions",
    "read_threshold_file",
    "run_eval",
    "write_per_image_csv",
    "write_pr_curve",
    "write_report_json",
    "write_threshold_file",
]
