"""``clipseg eval --gt annotations.json``: scoring instances against COCO ground truth.

Ground truth is a COCO instance file; predictions a COCO file as ``segment --export coco``
writes it (each annotation with a ``score``). Categories are matched by name (a prediction's
category is its prompt text), images by ``file_name``. pycocotools' ``COCOeval`` gives the
segmentation AP, AP50 and AP75 over the matched categories and the images both files name;
next to them, the per-prompt IoU metrics of ``eval`` are computed from the union of each
category's instances per image (ground truth and prediction alike binarised). Ground-truth
categories that no prompt names, prompts no category names, and ground-truth images without a
prediction are reported as warnings, not errors.

Nothing here prints; a file that is not COCO instance JSON raises ``ValueError`` with one line.
"""

from __future__ import annotations

import contextlib
import io
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from clipseg_cli.io.paths import display_path
from clipseg_cli.ops import metrics
from clipseg_cli.version import __version__

_REQUIRED = ("images", "annotations", "categories")


def _load(path: Path, what: str) -> dict:
    """A COCO instance file's JSON, checked enough for pycocotools not to crash on it."""
    name = display_path(path)
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ValueError(f"{what} {name}: file not found") from None
    except (OSError, UnicodeDecodeError) as error:
        raise ValueError(f"{what} {name}: cannot read ({type(error).__name__})") from None
    except json.JSONDecodeError as error:
        raise ValueError(f"{what} {name}: not JSON ({error.msg} at line {error.lineno})") from None
    if not isinstance(data, dict) or any(not isinstance(data.get(k), list) for k in _REQUIRED):
        raise ValueError(
            f"{what} {name}: not a COCO instance file (needs lists 'images', 'annotations' and "
            "'categories')"
        )
    for key, fields in (("images", ("id", "file_name")), ("categories", ("id", "name"))):
        for entry in data[key]:
            if not isinstance(entry, dict) or any(f not in entry for f in fields):
                raise ValueError(f"{what} {name}: an entry of '{key}' lacks {' or '.join(fields)}")
    return data


def _coco(data: dict) -> Any:
    from pycocotools.coco import COCO

    coco = COCO()
    coco.dataset = data
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints its progress
        coco.createIndex()
    return coco


@dataclass
class CocoReport:
    """What a COCO evaluation measured (see the module docstring)."""

    gt: str
    pred: str
    segm: dict[str, float] = field(default_factory=dict)  # AP, AP50, AP75
    segmentation: metrics.SegmentationScores | None = None  # from the unions, per category
    matched_categories: list[str] = field(default_factory=list)
    images: int = 0
    warnings: list[dict[str, str]] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "command": "eval",
            "version": __version__,
            "mode": "coco",
            "source": {"gt": self.gt, "pred": self.pred},
            "coco": {"segm": dict(self.segm)},
            "categories": self.matched_categories,
            "images": self.images,
            "warnings": self.warnings,
        }
        if self.segmentation is not None:
            scores = self.segmentation
            at = scores.at(0.5)
            out.update({k: at[k] for k in ("iou_fg", "binary_iou", "miou", "precision", "recall")})
            out["per_class"] = {
                str(name): {"iou_fg": float(values[scores.index(0.5)])}
                for name, values in scores.per_class_iou_fg.items()
            }
        return out


def evaluate_coco(gt_path: Path, pred_path: Path) -> CocoReport:
    """Score a prediction file against a ground-truth file (module docstring).

    Raises:
        ValueError: a file is not COCO instance JSON, or no category or image matches.
    """
    from pycocotools.cocoeval import COCOeval

    gt_data, pred_data = _load(gt_path, "--gt"), _load(pred_path, "--pred")
    report = CocoReport(display_path(gt_path), display_path(pred_path))
    gt_categories = {c["name"]: c["id"] for c in gt_data["categories"]}
    pred_categories = {c["id"]: c["name"] for c in pred_data["categories"]}
    for name in gt_categories:
        if name not in pred_categories.values():
            report.warnings.append({"category": name, "warning": "matches no prompt"})
    for name in pred_categories.values():
        if name not in gt_categories:
            report.warnings.append({"prompt": name, "warning": "matches no ground-truth category"})
    report.matched_categories = [n for n in gt_categories if n in pred_categories.values()]
    gt_images = {image["file_name"]: image["id"] for image in gt_data["images"]}
    pred_images = {image["id"]: image["file_name"] for image in pred_data["images"]}
    matched_images = sorted(gt_images[f] for f in pred_images.values() if f in gt_images)
    for file_name in gt_images:
        if file_name not in pred_images.values():
            report.warnings.append({"file": file_name, "warning": "no prediction for this image"})
    if not report.matched_categories or not matched_images:
        raise ValueError(
            f"--gt {report.gt} and --pred {report.pred} share no "
            f"{'category (by name)' if not report.matched_categories else 'image (by file_name)'}"
        )
    detections = []
    for annotation in pred_data["annotations"]:
        name = pred_categories.get(annotation.get("category_id"))
        file_name = pred_images.get(annotation.get("image_id"))
        if name in gt_categories and file_name in gt_images:
            detections.append(
                {
                    **annotation,
                    "image_id": gt_images[file_name],
                    "category_id": gt_categories[name],
                }
            )
    gt = _coco(gt_data)
    category_ids = [gt_categories[n] for n in report.matched_categories]
    report.segm = _average_precision(gt, detections, matched_images, category_ids, COCOeval)
    report.segmentation = _union_scores(gt, detections, matched_images, gt_categories, report)
    report.images = len(matched_images)
    return report


def _average_precision(gt: Any, detections: list, images: list, categories: list, cocoeval) -> dict:
    if not detections:
        return {"AP": 0.0, "AP50": 0.0, "AP75": 0.0}
    with contextlib.redirect_stdout(io.StringIO()):
        results = gt.loadRes(detections)
        evaluation = cocoeval(gt, results, "segm")
        evaluation.params.imgIds = images
        evaluation.params.catIds = categories
        evaluation.evaluate()
        evaluation.accumulate()
        evaluation.summarize()
    ap, ap50, ap75 = (float(v) for v in evaluation.stats[:3])
    return {"AP": ap, "AP50": ap50, "AP75": ap75}


def _union_scores(
    gt: Any, detections: list, images: list, categories: dict[str, int], report: CocoReport
) -> metrics.SegmentationScores:
    """Per category and image: the union of the ground truth's instances against the union of
    the predicted ones, summed as ``eval`` sums masks."""
    from pycocotools import mask as mask_utils

    by_pair: dict[tuple[int, int], list] = {}
    for detection in detections:
        by_pair.setdefault((detection["image_id"], detection["category_id"]), []).append(detection)
    accumulator = metrics.SegmentationAccumulator()
    for image_id in images:
        info = gt.imgs[image_id]
        size = (info["height"], info["width"])
        for name in report.matched_categories:
            category = categories[name]
            truth = np.zeros(size, bool)
            for annotation in gt.loadAnns(gt.getAnnIds(imgIds=[image_id], catIds=[category])):
                truth |= gt.annToMask(annotation).astype(bool)
            predicted = np.zeros(size, bool)
            for detection in by_pair.get((image_id, category), []):
                segmentation = detection["segmentation"]
                if isinstance(segmentation, list):
                    rle = mask_utils.merge(mask_utils.frPyObjects(segmentation, *size))
                else:
                    rle = {"size": segmentation["size"], "counts": segmentation["counts"]}
                    if isinstance(rle["counts"], str):
                        rle["counts"] = rle["counts"].encode()
                predicted |= mask_utils.decode(rle).astype(bool)
            accumulator.update(predicted.astype(np.float32), truth, name)
    return accumulator.result()
