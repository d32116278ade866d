"""The numbers of an eval run: :func:`run_eval` reads each pair (or runs the model on each image
for ``--images``), scores it and returns an :class:`EvalReport`.

It owns reading the masks of a pair, the size checks, the per-image rows and the report's JSON
view; the metrics themselves are :mod:`clipseg_cli.ops.metrics`' and the matching rules
:mod:`.pairing`'s. It never prints or exits: a file that cannot be read or does not fit becomes
an ``errors`` entry and a ``failed`` row, and the run goes on. It writes nothing but the
``--keep-preds`` predictions (the outputs are :mod:`.outputs`').

Masks are read by :func:`clipseg_cli.io.masks.read_mask` (its docstring has the rules).
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from clipseg_cli.evaluate.calibration import CALIBRATION_METRICS
from clipseg_cli.evaluate.config import EvalConfig
from clipseg_cli.evaluate.pairing import Pair, file_error, pair_images, pair_predictions
from clipseg_cli.io import sources, writers
from clipseg_cli.io.masks import MaskArray, MaskError, read_mask
from clipseg_cli.io.naming import output_path, prompt_slugs
from clipseg_cli.io.paths import display_path
from clipseg_cli.ops import metrics
from clipseg_cli.version import __version__

if TYPE_CHECKING:
    from clipseg_cli.segmenter import Segmenter


@dataclass
class EvalReport:
    """What an eval run measured.

    ``rows``: one dict per pair (status ``ok`` or ``failed``) with the per-image numbers at the
    chosen threshold; ``errors``: every per-file problem as ``{"file", "error"}``.
    """

    config: EvalConfig
    rows: list[dict[str, Any]] = field(default_factory=list)
    errors: list[dict[str, str]] = field(default_factory=list)
    segmentation: metrics.SegmentationScores | None = None
    # Edge pixels summed over the images, at the chosen threshold (segmentation only).
    boundary: metrics.BoundaryCounts | None = None
    matting: dict[str, float] | None = None
    seconds: float = 0.0

    @property
    def mode(self) -> str:
        return "matting" if self.config.matting else "segmentation"

    @property
    def ok(self) -> int:
        return sum(row["status"] == "ok" for row in self.rows)

    @property
    def failed(self) -> int:
        return len(self.errors)

    def headline(self) -> dict[str, float | None]:
        """The main numbers: segmentation at the chosen threshold, or the matting means."""
        if self.matting is not None:
            return dict(self.matting)
        if self.segmentation is None:
            return {}
        at = self.segmentation.at(self.config.threshold)
        numbers = {k: at[k] for k in ("iou_fg", "binary_iou", "miou", "ap", "precision", "recall")}
        if self.boundary is not None:
            numbers["boundary_f"] = self.boundary.f_score
        return numbers

    def to_json(self) -> dict[str, Any]:
        """Every number: headline, per-threshold arrays, per-class, per-image rows, errors."""
        out: dict[str, Any] = {
            "command": "eval",
            "version": __version__,
            "mode": self.mode,
            "source": self.config.describe(),
            "counts": {"pairs": len(self.rows), "ok": self.ok, "errors": self.failed},
            "seconds": round(self.seconds, 3),
        }
        if self.matting is not None:
            out.update(self.matting)
            out["conventions"] = metrics.MATTING_CONVENTIONS
        if self.segmentation is not None:
            out.update(self._segmentation_json(self.segmentation))
        out["images"] = self.rows
        out["errors"] = self.errors
        return out

    def _segmentation_json(self, scores: metrics.SegmentationScores) -> dict[str, Any]:
        best = scores.best_threshold
        out: dict[str, Any] = dict(self.headline())
        out["threshold"] = float(self.config.threshold)
        out["best_threshold"] = best
        out["at_threshold"] = scores.at(self.config.threshold)
        out["at_best"] = scores.at(best)
        out["best_threshold_per_metric"] = {
            name: {"threshold": scores.best(name), "value": scores.at(scores.best(name))[name]}
            for name in CALIBRATION_METRICS
        }
        out["per_threshold"] = {
            "thresholds": scores.thresholds,
            "iou_fg": scores.iou_fg,
            "iou_fg_plus1": scores.iou_fg_plus1,
            "binary_iou": scores.binary_iou,
            "miou": scores.miou,
            "precision": scores.precision,
            "recall": scores.recall,
            "tp": scores.counts.tp,
            "fp": scores.counts.fp,
            "fn": scores.counts.fn,
            "tn": scores.counts.tn,
        }
        j, b = scores.index(self.config.threshold), scores.index(best)
        out["per_class"] = {
            str(cls): {"iou_fg": float(values[j]), "iou_fg_at_best": float(values[b])}
            for cls, values in scores.per_class_iou_fg.items()
        }
        out["conventions"] = metrics.SEGMENTATION_CONVENTIONS
        return out


def _row(pair: Pair) -> dict[str, Any]:
    return {
        "gt": display_path(pair.gt),
        "pred": display_path(pair.pred) if pair.pred is not None else None,
        "image": display_path(pair.image) if pair.image is not None else None,
        "prompt": pair.prompt,
        "class": pair.class_id,
        "status": "ok",
        "error": None,
        "width": None,
        "height": None,
    }


class _Scorer:
    """Feeds pairs into the accumulators and fills their rows."""

    def __init__(self, config: EvalConfig) -> None:
        self.config = config
        self.grid = metrics.threshold_grid(config.threshold)
        self.segmentation = metrics.SegmentationAccumulator(self.grid)
        self.matting = metrics.MattingAccumulator()
        self.boundary = metrics.BoundaryCounts()
        # Per-image counts, kept to report each image at the best threshold once it is known.
        self.image_counts: list[tuple[dict[str, Any], metrics.Counts]] = []

    def score(self, row: dict[str, Any], pred: np.ndarray, gt: MaskArray) -> None:
        """``pred`` float32 ``[H, W]`` in [0, 1]; the ground truth must have the same size."""
        height, width = gt.values.shape
        row["width"], row["height"], row["pixels"] = width, height, width * height
        row["gt_binary"] = gt.binary
        if self.config.matting:
            row.update(self.matting.update(pred, gt.values))
            return
        foreground = gt.foreground()
        counts = self.segmentation.update(pred, foreground, row["class"])
        self.image_counts.append((row, counts))
        row["gt_foreground"] = round(float(np.mean(foreground)), 6)
        edges = metrics.boundary_counts(pred > self.config.threshold, foreground)
        self.boundary = self.boundary + edges
        row["boundary_f"] = edges.f_score

    def finish(self, report: EvalReport) -> None:
        if self.config.matting:
            if self.matting.images:
                report.matting = self.matting.result()
            return
        if not self.segmentation.images:
            return
        scores = self.segmentation.result()
        report.segmentation = scores
        report.boundary = self.boundary
        j, b = scores.index(self.config.threshold), scores.index(scores.best_threshold)
        for row, counts in self.image_counts:
            fg, bin_iou = metrics.iou_fg(counts), metrics.binary_iou(counts)
            precision, recall = metrics.precision_recall(counts)
            predicted = counts.tp + counts.fp
            row.update(
                {
                    "tp": int(counts.tp[j]),
                    "fp": int(counts.fp[j]),
                    "fn": int(counts.fn[j]),
                    "tn": int(counts.tn[j]),
                    "iou_fg": float(fg[j]),
                    "binary_iou": float(bin_iou[j]),
                    "precision": float(precision[j]),
                    "recall": float(recall[j]),
                    "pred_foreground": round(float(predicted[j]) / row["pixels"], 6),
                    "iou_fg_at_best": float(fg[b]),
                }
            )
        self.image_counts.clear()


def _fail(report: EvalReport, row: dict[str, Any], path: Path, reason: str) -> None:
    row["status"], row["error"] = "failed", reason
    report.errors.append(file_error(path, reason))


def _size_problem(pred_hw: tuple[int, ...], gt_hw: tuple[int, ...], what: str) -> str | None:
    if pred_hw == gt_hw:
        return None
    return (
        f"size mismatch: ground truth is {gt_hw[1]}x{gt_hw[0]} but the {what} is "
        f"{pred_hw[1]}x{pred_hw[0]}"
    )


def run_eval(
    config: EvalConfig,
    *,
    segmenter: Segmenter | None = None,
    on_progress: Callable[[int, int], None] | None = None,
) -> EvalReport:
    """Evaluate predictions (or run the model on images) against ground truth.

    Args:
        config: the run.
        segmenter: a loaded :class:`~clipseg_cli.segmenter.Segmenter` for ``--images`` mode
            (loaded with :meth:`~clipseg_cli.segmenter.Segmenter.load_for` from the config's
            model options when None).
        on_progress: called with ``(done, total)`` pairs after each image.

    Raises:
        NoInputsError: the ground-truth folder holds no image file.
        WeightsError: the model could not be loaded (``--images`` mode).
        ValueError: the device or precision is not available.
    """
    started = time.perf_counter()
    report = EvalReport(config)
    scorer = _Scorer(config)
    if config.pred_dir is not None:
        pairs, report.errors = pair_predictions(config.gt_dir, config.pred_dir, config.pred_slug)
        for done, pair in enumerate(pairs, 1):
            _score_files(report, scorer, pair)
            if on_progress is not None:
                on_progress(done, len(pairs))
    else:
        assert config.images_dir is not None  # guaranteed by EvalConfig validation
        pairs, report.errors = pair_images(config.gt_dir, config.images_dir, config.prompts)
        if pairs:
            _run_model(report, scorer, pairs, segmenter, on_progress)
    scorer.finish(report)
    report.seconds = time.perf_counter() - started
    return report


def _score_files(report: EvalReport, scorer: _Scorer, pair: Pair) -> None:
    row = _appended(report, pair)
    assert pair.pred is not None  # prediction-folder pairs always have one
    try:
        gt = read_mask(pair.gt)
    except MaskError as error:
        _fail(report, row, pair.gt, f"ground truth: {error}")
        return
    try:
        pred = read_mask(pair.pred)
    except MaskError as error:
        _fail(report, row, pair.pred, f"prediction: {error}")
        return
    problem = _size_problem(pred.values.shape, gt.values.shape, "prediction")
    if problem is not None:
        _fail(report, row, pair.gt, problem)
        return
    row["pred_binary"] = pred.binary
    scorer.score(row, pred.values, gt)


def _run_model(
    report: EvalReport,
    scorer: _Scorer,
    pairs: list[Pair],
    segmenter: Segmenter | None,
    on_progress: Callable[[int, int], None] | None,
) -> None:
    """``--images``: predict each image for its prompts, in batches, and score each pair."""
    config = report.config
    if segmenter is None:
        # Imported here: a --pred run never needs torch.
        from clipseg_cli.segmenter import Segmenter

        segmenter = Segmenter.load_for(config)
    conditionals = segmenter.embed_texts(list(config.prompts))
    slugs = prompt_slugs(list(config.prompts))
    by_image: dict[Path, list[Pair]] = defaultdict(list)
    for pair in pairs:
        assert pair.image is not None  # image pairs always have one
        by_image[pair.image].append(pair)
    images = list(by_image)
    done = 0
    for start in range(0, len(images), config.batch_size):
        batch: list[tuple[Path, np.ndarray]] = []
        for image in images[start : start + config.batch_size]:
            try:
                rgb = sources.decode_image(image, max_pixels=config.max_pixels).rgb
            except sources.ImageDecodeError as error:
                for pair in by_image[image]:
                    _fail(report, _appended(report, pair), image, f"image: {error}")
                continue
            batch.append((image, rgb))
        probs = segmenter.predict([rgb for _, rgb in batch], conditionals) if batch else []
        for (image, rgb), prob in zip(batch, probs, strict=True):
            for pair in by_image[image]:
                _score_prediction(report, scorer, pair, prob, rgb.shape[:2], slugs)
        done += len(images[start : start + config.batch_size])
        if on_progress is not None:
            on_progress(done, len(images))


def _score_prediction(
    report: EvalReport,
    scorer: _Scorer,
    pair: Pair,
    prob: np.ndarray,
    image_hw: tuple[int, ...],
    slugs: list[str],
) -> None:
    """Score the model's ``[K, H, W]`` probabilities ``prob`` for one image pair (kept first
    under ``--keep-preds``, named with ``slugs``, the prompts' slugs)."""
    config = report.config
    assert pair.prompt_index is not None and pair.image_key is not None
    row = _appended(report, pair)
    pred = prob[pair.prompt_index]
    if config.keep_preds is not None:
        path = output_path(config.keep_preds, pair.image_key, "soft", slugs[pair.prompt_index])
        writers.write_soft(path, pred, bits=16)
        row["pred"] = display_path(path)
    try:
        gt = read_mask(pair.gt)
    except MaskError as error:
        _fail(report, row, pair.gt, f"ground truth: {error}")
        return
    problem = _size_problem(image_hw, gt.values.shape, "image")
    if problem is not None:
        _fail(report, row, pair.gt, problem)
        return
    scorer.score(row, np.clip(pred, 0.0, 1.0), gt)


def _appended(report: EvalReport, pair: Pair) -> dict[str, Any]:
    """A fresh ``ok`` row for ``pair``, appended to the report's rows."""
    row = _row(pair)
    report.rows.append(row)
    return row
