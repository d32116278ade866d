"""``clipseg eval`` / ``clipseg calibrate``: predictions against ground truth, on files.

Nothing here prints or exits: per-file problems become ``errors`` entries of the
:class:`EvalReport`, option problems raise ``ValueError``, an empty ground-truth folder raises
:class:`NoInputsError`, a model that cannot be loaded raises ``WeightsError``.

Matching predictions to ground truth (``--pred DIR --gt DIR``)
---------------------------------------------------------------
Files are walked recursively (hidden files skipped) and keyed by their relative path without
the extension: ground truth ``gt/x/dog.png`` has key ``x/dog``. A prediction is keyed the same
way, except that a ``clipseg segment`` output ``<input name>.<prompt slug>.<kind>.png``
(kind ``soft`` or ``mask``) is keyed by its input's name without extension, so
``pred/x/dog.jpg.a-dog.soft.png`` also has key ``x/dog``, with slug ``a-dog``. For each
ground-truth file:

1. a prediction at the very same relative path wins;
2. else the predictions with the same key (``--pred-slug SLUG`` keeps only that prompt's);
3. else, for ground truth laid out one folder per prompt (``gt/<slug>/x/dog.png``), the
   predictions with key ``x/dog`` and that slug.

Several prompts for one key is an error (choose with ``--pred-slug``); ``soft`` is preferred
over ``mask`` for the same prompt. The class of a pair (for mIoU) is the prompt slug when known,
else the first folder of the ground-truth path, else one class for everything.

Images + prompts (``--images DIR --gt DIR --prompt TEXT``)
----------------------------------------------------------
Image ``images/x/dog.jpg`` is compared with ground truth of key ``x/dog``; with several prompts
the ground truth of prompt P lies under ``gt/<slug of P>/``. Predictions can be kept as 16-bit
soft PNGs named like ``clipseg segment``'s, so a later ``--pred`` run finds them.

Masks are read by :func:`clipseg_cli.io.masks.read_mask` (its docstring has the rules).
"""

from __future__ import annotations

import csv
import math
import re
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from clipseg_cli.evaluate.calibration import (
    CALIBRATION_METRICS,
    calibration,
    read_threshold_file,
    write_threshold_file,
)
from clipseg_cli.io import sources, writers
from clipseg_cli.io.files import write_json_atomic
from clipseg_cli.io.masks import MaskArray, MaskError, read_mask
from clipseg_cli.io.naming import output_path, prompt_slugs
from clipseg_cli.io.paths import display_path
from clipseg_cli.ops import metrics
from clipseg_cli.specs import DEFAULT_MAX_PIXELS, DEFAULT_MODEL, DEFAULT_THRESHOLD
from clipseg_cli.version import __version__

#: ``<input name>.<prompt slug>.<kind>.png`` as written by ``clipseg segment``.
_PRED_NAME_RE = re.compile(
    r"^(?P<input>.+)\.(?P<slug>[a-z0-9][a-z0-9-]*)\.(?P<kind>soft|mask)\.png$"
)
_KIND_PREFERENCE = {"soft": 0, "mask": 1}


class NoInputsError(Exception):
    """The ground-truth folder holds no image file."""


# -------------------------------------------------------------------------------------------
# Configuration and pairing
# -------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class EvalConfig:
    """One ``clipseg eval`` / ``calibrate`` run. Validation raises a one-line ValueError."""

    gt_dir: Path
    pred_dir: Path | None = None
    images_dir: Path | None = None
    prompts: tuple[str, ...] = ()
    pred_slug: str | None = None
    matting: bool = False
    threshold: float = DEFAULT_THRESHOLD
    model: str = DEFAULT_MODEL
    clip_weights: Path | None = None
    device: str = "auto"
    precision: str = "auto"
    batch_size: int = 4
    keep_preds: Path | None = None
    max_pixels: int | None = DEFAULT_MAX_PIXELS

    def __post_init__(self) -> None:
        if (self.pred_dir is None) == (self.images_dir is None):
            raise ValueError("give either --pred DIR or --images DIR (with --prompt)")
        if not self.gt_dir.is_dir():
            raise ValueError(f"--gt {display_path(self.gt_dir)}: not a folder")
        if self.pred_dir is not None and not self.pred_dir.is_dir():
            raise ValueError(f"--pred {display_path(self.pred_dir)}: not a folder")
        if self.images_dir is not None:
            if not self.images_dir.is_dir():
                raise ValueError(f"--images {display_path(self.images_dir)}: not a folder")
            if not self.prompts:
                raise ValueError("--images needs at least one --prompt TEXT")
        elif self.prompts:
            raise ValueError("--prompt is only used with --images")
        if any(not prompt.strip() for prompt in self.prompts):
            raise ValueError("--prompt: empty prompt text")
        if self.keep_preds is not None and self.images_dir is None:
            raise ValueError("--keep-preds is only used with --images")
        if not (isinstance(self.threshold, int | float) and 0.0 <= self.threshold <= 1.0):
            raise ValueError(f"--threshold {self.threshold}: must be between 0 and 1")
        if self.batch_size < 1:
            raise ValueError("--batch-size must be at least 1")

    def describe(self) -> dict[str, Any]:
        """JSON-ready view of the inputs, for the report and the threshold file."""
        show = lambda p: display_path(p) if p is not None else None  # noqa: E731
        return {
            "gt": show(self.gt_dir),
            "pred": show(self.pred_dir),
            "images": show(self.images_dir),
            "prompts": list(self.prompts),
            "pred_slug": self.pred_slug,
            "model": self.model if self.images_dir is not None else None,
            "matting": self.matting,
        }


@dataclass(frozen=True)
class _PredFile:
    path: Path
    rel: PurePosixPath
    key: PurePosixPath
    slug: str | None
    kind: str | None


@dataclass
class Pair:
    """One comparison: a ground-truth file and its prediction file or image + prompt index."""

    gt: Path
    class_id: str
    pred: Path | None = None
    image: Path | None = None
    image_key: PurePosixPath | None = None
    prompt_index: int | None = None
    prompt: str | None = None


def _walk(folder: Path) -> list[tuple[PurePosixPath, Path]]:
    """``(relative path, path)`` of the image-like files under ``folder``, sorted."""
    found = []
    for path in folder.rglob("*"):
        rel = PurePosixPath(path.relative_to(folder).as_posix())
        # Hidden files include the temp files of atomic writes in progress.
        if any(part.startswith(".") for part in rel.parts) or not path.is_file():
            continue
        if sources.looks_like_image(path):
            found.append((rel, path))
    return sorted(found, key=lambda item: item[0].parts)


def _key(rel: PurePosixPath) -> PurePosixPath:
    return rel.with_name(rel.stem)


def _pred_file(rel: PurePosixPath, path: Path) -> _PredFile:
    match = _PRED_NAME_RE.match(rel.name)
    if match is None:
        return _PredFile(path, rel, _key(rel), None, None)
    key = rel.with_name(PurePosixPath(match["input"]).stem)
    return _PredFile(path, rel, key, match["slug"], match["kind"])


def _error(path: Path, reason: str) -> dict[str, str]:
    return {"file": display_path(path), "error": reason}


def _choose_prediction(
    gt_rel: PurePosixPath, candidates: list[_PredFile]
) -> tuple[_PredFile | None, str | None]:
    """The prediction for one ground-truth file, or None and the reason."""
    exact = [c for c in candidates if c.rel == gt_rel]
    if exact:
        return exact[0], None
    plain = [c for c in candidates if c.slug is None]
    slugs = sorted({c.slug for c in candidates if c.slug is not None})
    if len(plain) + len(slugs) > 1:
        names = [c.rel.name for c in plain] + [f"slug {s}" for s in slugs]
        return None, f"several predictions match ({', '.join(names)}); choose with --pred-slug"
    if plain:
        return plain[0], None
    if slugs:
        named = sorted(candidates, key=lambda c: _KIND_PREFERENCE[c.kind or "mask"])
        return named[0], None
    return None, "no prediction for this ground truth"


def pair_predictions(
    gt_dir: Path, pred_dir: Path, pred_slug: str | None = None
) -> tuple[list[Pair], list[dict[str, str]]]:
    """Match prediction files to ground-truth files (rules in the module docstring).

    Returns:
        The pairs, in ground-truth order, and per-file errors (``{"file", "error"}``) for
        ground truth without a prediction, ambiguous matches and predictions without ground
        truth.

    Raises:
        NoInputsError: the ground-truth folder holds no image file.
    """
    gts = _walk(gt_dir)
    if not gts:
        raise NoInputsError(f"no ground-truth images in {display_path(gt_dir)}")
    by_key: dict[PurePosixPath, list[_PredFile]] = defaultdict(list)
    for rel, path in _walk(pred_dir):
        pred = _pred_file(rel, path)
        if pred_slug is None or pred.slug == pred_slug:
            by_key[pred.key].append(pred)
    pairs: list[Pair] = []
    errors: list[dict[str, str]] = []
    used: set[Path] = set()
    for rel, path in gts:
        key = _key(rel)
        candidates = by_key.get(key, [])
        if not candidates and len(rel.parts) > 1:
            # One folder per prompt: gt/<slug>/x/dog.png <- pred/x/dog.jpg.<slug>.soft.png
            inner = PurePosixPath(*rel.parts[1:])
            candidates = [c for c in by_key.get(_key(inner), []) if c.slug == rel.parts[0]]
        used.update(c.path for c in candidates)
        chosen, reason = _choose_prediction(rel, candidates)
        if chosen is None:
            errors.append(_error(path, reason or "no prediction"))
            continue
        class_id = chosen.slug or (rel.parts[0] if len(rel.parts) > 1 else "")
        pairs.append(Pair(gt=path, pred=chosen.path, class_id=class_id))
    for preds in by_key.values():
        for pred in preds:
            if pred.path not in used:
                errors.append(_error(pred.path, "no ground truth for this prediction"))
    return pairs, errors


def pair_images(
    gt_dir: Path, images_dir: Path, prompts: Sequence[str]
) -> tuple[list[Pair], list[dict[str, str]]]:
    """Match images (and prompts) to ground-truth files (rules in the module docstring).

    Raises:
        NoInputsError: the ground-truth folder holds no image file.
    """
    gts = _walk(gt_dir)
    if not gts:
        raise NoInputsError(f"no ground-truth images in {display_path(gt_dir)}")
    gt_by_key: dict[PurePosixPath, list[Path]] = defaultdict(list)
    for rel, path in gts:
        gt_by_key[_key(rel)].append(path)
    slugs = prompt_slugs(list(prompts))
    pairs: list[Pair] = []
    errors: list[dict[str, str]] = []
    used: set[Path] = set()
    for rel, image in _walk(images_dir):
        key = _key(rel)
        found = False
        for k, (prompt, slug) in enumerate(zip(prompts, slugs, strict=True)):
            candidates = gt_by_key.get(PurePosixPath(slug) / key, [])
            if not candidates and len(prompts) == 1:
                candidates = gt_by_key.get(key, [])
            if not candidates:
                continue
            found = True
            used.update(candidates)
            if len(candidates) > 1:
                names = ", ".join(sorted(p.name for p in candidates))
                errors.append(_error(image, f"several ground-truth files match ({names})"))
                continue
            pairs.append(
                Pair(
                    gt=candidates[0],
                    class_id=slug,
                    image=image,
                    image_key=rel,
                    prompt_index=k,
                    prompt=prompt,
                )
            )
        if not found:
            where = "gt/<prompt slug>/" if len(prompts) > 1 else "the --gt folder"
            errors.append(
                _error(image, f"no ground truth for this image (looked for {key}.* in {where})")
            )
    for _, path in gts:
        if path not in used:
            errors.append(_error(path, "no image for this ground truth"))
    return pairs, errors


# -------------------------------------------------------------------------------------------
# The run
# -------------------------------------------------------------------------------------------


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
        return {k: at[k] for k in ("iou_fg", "binary_iou", "miou", "ap", "precision", "recall")}

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
        scores = self.segmentation
        if scores is not None:
            best = scores.best_threshold
            out.update(self.headline())
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
        out["images"] = self.rows
        out["errors"] = self.errors
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
        counts = self.segmentation.update(pred, gt.values > 0.5, row["class"])
        self.image_counts.append((row, counts))
        row["gt_foreground"] = round(float(np.mean(gt.values > 0.5)), 6)

    def finish(self, report: EvalReport) -> None:
        if self.config.matting:
            if self.matting.images:
                report.matting = self.matting.result()
            return
        if not self.segmentation.images:
            return
        scores = self.segmentation.result()
        report.segmentation = scores
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
    report.errors.append(_error(path, reason))


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
    segmenter: Any = None,
    on_progress: Callable[[int, int], None] | None = None,
) -> EvalReport:
    """Evaluate predictions (or run the model on images) against ground truth.

    Args:
        config: the run.
        segmenter: a loaded :class:`~clipseg_cli.predictor.Segmenter` for ``--images`` mode
            (loaded from ``config.model`` when None).
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
    row = _row(pair)
    report.rows.append(row)
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
    segmenter: Any,
    on_progress: Callable[[int, int], None] | None,
) -> None:
    from clipseg_cli.segmenter import Segmenter

    config = report.config
    if segmenter is None:
        segmenter = Segmenter.load(
            config.model,
            clip_weights=config.clip_weights,
            device=config.device,
            precision=config.precision,
        )
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
                assert pair.prompt_index is not None and pair.image_key is not None
                row = _appended(report, pair)
                pred = prob[pair.prompt_index]
                if config.keep_preds is not None:
                    path = output_path(
                        config.keep_preds, pair.image_key, "soft", slugs[pair.prompt_index]
                    )
                    writers.write_soft(path, pred, bits=16)
                    row["pred"] = display_path(path)
                try:
                    gt = read_mask(pair.gt)
                except MaskError as error:
                    _fail(report, row, pair.gt, f"ground truth: {error}")
                    continue
                problem = _size_problem(rgb.shape[:2], gt.values.shape, "image")
                if problem is not None:
                    _fail(report, row, pair.gt, problem)
                    continue
                scorer.score(row, np.clip(pred, 0.0, 1.0), gt)
        done += len(images[start : start + config.batch_size])
        if on_progress is not None:
            on_progress(done, len(images))


def _appended(report: EvalReport, pair: Pair) -> dict[str, Any]:
    row = _row(pair)
    report.rows.append(row)
    return row


# -------------------------------------------------------------------------------------------
# Outputs
# -------------------------------------------------------------------------------------------

SEGMENTATION_CSV_COLUMNS = (
    "gt", "pred", "image", "prompt", "class", "status", "error", "width", "height",
    "tp", "fp", "fn", "tn", "iou_fg", "binary_iou", "precision", "recall",
    "gt_foreground", "pred_foreground", "iou_fg_at_best",
)  # fmt: skip
MATTING_CSV_COLUMNS = (
    "gt", "pred", "image", "prompt", "class", "status", "error", "width", "height",
    *metrics.MATTING_KEYS,
)  # fmt: skip


def write_report_json(path: Path, report: EvalReport) -> None:
    """The whole report as JSON (atomically)."""
    write_json_atomic(path, report.to_json())


def write_per_image_csv(path: Path, report: EvalReport) -> None:
    """One CSV row per pair, failed ones included (``status``/``error`` columns)."""
    columns = MATTING_CSV_COLUMNS if report.config.matting else SEGMENTATION_CSV_COLUMNS
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="", encoding="utf-8") as f:
        out = csv.DictWriter(f, fieldnames=list(columns), extrasaction="ignore")
        out.writeheader()
        for row in report.rows:
            out.writerow({k: ("" if row.get(k) is None else row.get(k)) for k in columns})


def write_pr_curve(
    path: Path,
    scores: metrics.SegmentationScores,
    threshold: float = DEFAULT_THRESHOLD,
    size: tuple[int, int] = (560, 480),
) -> None:
    """Draw the precision/recall curve over the threshold grid as an RGB PNG (PIL only).

    Marks the chosen threshold (red) and the best-IoU_FG threshold (green); the title carries
    AP and the rule it was computed with.
    """
    width, height = size
    left, right, top, bottom = 70, 20, 40, 60
    im = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(im)
    font = ImageFont.load_default()
    plot_w, plot_h = width - left - right, height - top - bottom

    def xy(recall: float, precision: float) -> tuple[float, float]:
        return left + recall * plot_w, top + (1.0 - precision) * plot_h

    for k in range(6):
        v = k / 5
        x, y = xy(v, v)
        draw.line([(x, top), (x, top + plot_h)], fill=(230, 230, 230))
        draw.line([(left, y), (left + plot_w, y)], fill=(230, 230, 230))
        draw.line([(x, top + plot_h), (x, top + plot_h + 5)], fill="black")
        draw.line([(left - 5, y), (left, y)], fill="black")
        draw.text((x, top + plot_h + 8), f"{v:.1f}", fill="black", font=font, anchor="ma")
        draw.text((left - 8, y), f"{v:.1f}", fill="black", font=font, anchor="rm")
    draw.rectangle([left, top, left + plot_w, top + plot_h], outline="black")
    points = [xy(float(r), float(p)) for r, p in zip(scores.recall, scores.precision, strict=True)]
    if len(points) > 1:
        draw.line(points, fill=(31, 119, 180), width=2)
    for t, colour in ((threshold, (214, 39, 40)), (scores.best_threshold, (44, 160, 44))):
        j = scores.index(t)
        x, y = xy(float(scores.recall[j]), float(scores.precision[j]))
        draw.ellipse([x - 5, y - 5, x + 5, y + 5], outline=colour, width=2)
    ap = "n/a" if scores.ap is None else f"{scores.ap:.4f}"
    draw.text(
        (left + plot_w / 2, 12), f"Precision/recall (AP {ap}, step sum over t = 0..1 by 0.01)",
        fill="black", font=font, anchor="ma",
    )  # fmt: skip
    draw.text(
        (left + plot_w / 2, top + plot_h + 26), "recall", fill="black", font=font, anchor="ma"
    )
    label = Image.new("RGB", (80, 16), "white")
    ImageDraw.Draw(label).text((40, 8), "precision", fill="black", font=font, anchor="mm")
    im.paste(label.rotate(90, expand=True), (8, top + plot_h // 2 - 40))
    legend = f"o t={threshold:g} (red)   o best t={scores.best_threshold:g} (green)"
    draw.text((left + plot_w / 2, height - 6), legend, fill="black", font=font, anchor="ms")
    path.parent.mkdir(parents=True, exist_ok=True)
    im.save(path, format="PNG")
