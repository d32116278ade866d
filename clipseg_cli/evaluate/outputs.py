"""The files an eval run writes: the whole report as JSON, one CSV row per pair, and the
precision/recall curve as a PNG.

It owns their layout (the CSV columns, the plot's look); the numbers come from an
:class:`~clipseg_cli.evaluate.scoring.EvalReport` as they are. It never computes a metric,
never reads an input and never prints.
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import TYPE_CHECKING

from PIL import Image, ImageDraw, ImageFont

from clipseg_cli.io.files import write_json_atomic
from clipseg_cli.ops import metrics
from clipseg_cli.specs import DEFAULT_THRESHOLD

if TYPE_CHECKING:
    from clipseg_cli.evaluate.scoring import EvalReport

SEGMENTATION_CSV_COLUMNS = (
    "gt", "pred", "image", "prompt", "class", "status", "error", "width", "height",
    "tp", "fp", "fn", "tn", "iou_fg", "binary_iou", "precision", "recall",
    "gt_foreground", "pred_foreground", "iou_fg_at_best", "boundary_f",
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
