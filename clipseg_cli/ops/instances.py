"""One mask per object: a prompt's final mask split into its objects, each an instance with its
COCO run-length encoding, area, box, polygon and score; objects scored under a floor dropped.

An object is a connected region of the mask (8-connected), or, with ``--split auto``, a part of
one where touching objects meet (:mod:`clipseg_cli.ops.split`). Its score is the mean
probability inside (:data:`SCORE_KIND`; the other candidates are measured by
``bench/instances_bench.py``, which chose it), and objects scored under ``--min-score`` are
dropped from the mask too, so that the mask, the id map and the exports always hold the same
objects.

OpenCV finds the regions and their contours; pycocotools encodes them, and its area and box of
each encoding are the ones every output reports (the log, COCO, YOLO), so they agree with what
any COCO tool computes. Pure arrays in, plain values out: no files.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

import cv2
import numpy as np
from pycocotools import mask as mask_utils

from clipseg_cli.ops.shape import MaskShaping, default_min_area, drop_small_regions, shape_mask
from clipseg_cli.ops.split import distance_map, split_regions
from clipseg_cli.specs import DEFAULT_MIN_SCORE

#: At most this many instances per image (in id order): COCO annotation ids are the image's id
#: times 1000 plus the instance's id.
MAX_INSTANCES_PER_IMAGE = 999
#: Polygon simplification (Douglas-Peucker), in pixels.
POLYGON_TOLERANCE = 0.5
#: The score candidates (:func:`object_scores`): ``mean`` and ``peak`` probability inside, and
#: ``stability`` (SAM's: the object's area above threshold + STABILITY_OFFSET over its area
#: above threshold - STABILITY_OFFSET).
SCORE_KINDS = ("mean", "peak", "stability")
#: The score every instance carries: the one that separated objects from specks best.
SCORE_KIND = "mean"
STABILITY_OFFSET = 0.1


@dataclass(frozen=True)
class Instance:
    """One object: ``id`` is unique within its image (1, 2, ... over the prompts in order,
    each prompt's regions in raster order of their first pixel)."""

    id: int
    prompt: int  # index of the prompt in the run's prompt list
    rle: dict  # {"size": [H, W], "counts": str}, COCO's compressed RLE
    area: int
    bbox: tuple[float, float, float, float]  # COCO [x, y, w, h], pixels
    score: float  # SCORE_KIND: the mean probability of its pixels above the threshold
    polygon: tuple[float, ...]  # outer contour x1, y1, x2, y2, ... (pixels)

    def row(self, prompt_label: str) -> dict:
        """The instance as the log shows it."""
        return {
            "prompt": prompt_label,
            "id": self.id,
            "bbox": [round(v, 2) for v in self.bbox],
            "area": self.area,
            "score": round(self.score, 6),
        }


@dataclass(frozen=True)
class InstanceRules:
    """How a prompt's shaped mask becomes objects: ``--split``, ``--min-score``, and the run's
    ``--min-area`` in pixels of this image (no split makes a part that cannot hold a disc of
    that area, nor of the default's)."""

    split: str = "auto"
    min_score: float = DEFAULT_MIN_SCORE
    min_area: int = 0

    def min_peak(self, size: tuple[int, int]) -> float:
        """The radius, in pixels, of the smallest part a split may make in an image of
        ``size``."""
        return math.sqrt(max(self.min_area, default_min_area(size)) / math.pi)


@dataclass(frozen=True)
class Objects:
    """A mask's objects before they get ids.

    Attributes:
        labels: int32 ``[H, W]``, one label per object (0: background).
        order: the labels of the objects kept (score >= ``--min-score``), in raster order of
            their first pixel.
        scores: float64, each label's score (index 0 unused).
        dropped: how many objects ``--min-score`` dropped.
        mask: bool ``[H, W]``, the pixels of the objects kept.
        boxes: each label's box ``(x, y, w, h)``.
    """

    labels: np.ndarray
    order: np.ndarray
    scores: np.ndarray
    dropped: int
    mask: np.ndarray
    boxes: dict[int, tuple[int, int, int, int]]


def find_objects(
    mask: np.ndarray, prob: np.ndarray, rules: InstanceRules, threshold: float
) -> Objects:
    """The objects of bool ``[H, W]`` ``mask`` scored on float ``[H, W]`` ``prob`` (the
    probability the mask was cut from at ``threshold``); those under the floor dropped."""
    as_bytes = mask.astype(np.uint8)
    count, labels = cv2.connectedComponents(as_bytes, connectivity=8)
    if rules.split == "auto" and count > 1:
        # Only the box around the mask: outside it there is nothing to split.
        x, y, w, h = cv2.boundingRect(as_bytes)
        box = (slice(y, y + h), slice(x, x + w))
        min_peak = rules.min_peak(mask.shape)
        labels[box], count = split_regions(labels[box], count, distance_map(mask[box]), min_peak)
    scores = object_scores(SCORE_KIND, labels, count, prob, threshold)
    table = _LabelTable.of(labels)
    order = table.labels[np.argsort(table.first, kind="stable")]
    kept = order[scores[order] >= rules.min_score]
    dropped = len(order) - len(kept)
    if dropped:
        keep = np.zeros(count, bool)
        keep[kept] = True
        mask = keep[labels]
    boxes = {int(label): box for label, box in zip(table.labels, table.boxes, strict=True)}
    return Objects(labels, kept, scores, dropped, mask.astype(bool, copy=False), boxes)


def shaped_objects(
    prob: np.ndarray, threshold: float, shaping: MaskShaping, rules: InstanceRules
) -> tuple[Objects, int]:
    """The objects of ``prob > threshold`` shaped (:func:`clipseg_cli.ops.shape.shape_mask`),
    those under the score floor dropped; and how many regions ``--min-area`` dropped.

    With ``--invert`` the floor judges the prompt's own objects before the mask is inverted
    (a speck under it is not the prompt, so the inverted mask keeps it), and the objects are
    the regions of the inverted mask, whole and scored on ``1 - prob``.
    """
    if not shaping.invert:
        mask, small = shape_mask(prob > threshold, shaping)
        return find_objects(mask, prob, rules, threshold), small
    prompt, _ = shape_mask(prob > threshold, replace(shaping, invert=False, min_area=0))
    kept = find_objects(prompt, prob, rules, threshold).mask
    mask, small = drop_small_regions(~kept, shaping.min_area_for(prob.shape))
    background = replace(rules, split="none", min_score=0.0)
    return find_objects(mask, 1 - prob, background, 1 - threshold), small


def _labelled_pixels(labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The labelled pixels of a label map, in raster order: their flat indices and labels."""
    where = np.flatnonzero(labels)
    return where, labels.ravel()[where]


@dataclass(frozen=True)
class _LabelTable:
    """The labels present in a label map, each with its first pixel (flat index, raster
    order) and box ``(x, y, w, h)``: one sort of the foreground pixels."""

    labels: np.ndarray
    first: np.ndarray
    boxes: list[tuple[int, int, int, int]]

    @classmethod
    def of(cls, labels: np.ndarray) -> _LabelTable:
        where, which = _labelled_pixels(labels)
        if not len(where):
            return cls(where, where, [])
        if len(which) > 1 and (which[1:] < which[:-1]).any():  # one region: sorted already
            order = np.argsort(which, kind="stable")  # raster order within each label
            where, which = where[order], which[order]
        starts = np.flatnonzero(which[1:] != which[:-1]) + 1
        ends = np.r_[starts - 1, len(where) - 1]
        starts = np.r_[0, starts]
        width = labels.shape[1]
        # Rows from the first and last pixel of each label (raster order); columns from each
        # pixel's column, looked up rather than divided out (an int64 divmod of every pixel
        # cost a third of the table).
        columns = np.broadcast_to(np.arange(width, dtype=np.int32), labels.shape).ravel()
        cols = columns[where]
        top, bottom = where[starts] // width, where[ends] // width
        left, right = np.minimum.reduceat(cols, starts), np.maximum.reduceat(cols, starts)
        boxes = [
            (int(x), int(y), int(x2 - x + 1), int(y2 - y + 1))
            for x, y, x2, y2 in zip(left, top, right, bottom, strict=True)
        ]
        return cls(which[starts], where[starts], boxes)


def object_scores(
    kind: str,
    labels: np.ndarray,
    count: int,
    prob: np.ndarray,
    threshold: float,
) -> np.ndarray:
    """float64 ``[count]``: each label's score of ``kind`` (:data:`SCORE_KINDS`), from float
    ``[H, W]`` ``prob`` cut at ``threshold``.

    Only the object's pixels whose probability passes ``threshold`` count: the score judges
    what the model found, not what ``--grow`` or ``--fill-holes`` added around it (0 for an
    object without such pixels).
    """
    if kind == "mean":
        # Each pixel's label, 0 where it is not an object's core pixel: one pass over the image
        # instead of gathering the labelled pixels first (half the time where the mask fills
        # the image). bincount adds each label's pixels in raster order either way, so the
        # scores are the same to the bit.
        which = labels.ravel() * (prob.ravel() > threshold)
        area = np.maximum(np.bincount(which, minlength=count), 1)
        scores = np.bincount(which, weights=prob.ravel(), minlength=count) / area
        scores[0] = 0.0  # the background's, unused
        return scores
    where, which = _labelled_pixels(labels)
    inside = prob.ravel()[where]
    core = inside > threshold  # compared as prob's dtype, as ``prob > threshold`` would
    if not core.all():  # all pass where the mask was cut from prob alone
        which, inside = which[core], inside[core]
    if kind == "peak":
        peak = np.zeros(count)
        np.maximum.at(peak, which, inside.astype(np.float64))
        return peak
    if kind == "stability":
        above = inside.astype(np.float64) > threshold + STABILITY_OFFSET
        high = np.bincount(which, weights=above, minlength=count)
        return high / np.maximum(_loose_areas(labels, count, prob, threshold), 1)
    raise ValueError(f"unknown score kind {kind}")


def _loose_areas(labels: np.ndarray, count: int, prob: np.ndarray, threshold: float) -> np.ndarray:
    """int64 ``[count]``: each object's area at ``threshold - STABILITY_OFFSET``: its own pixels
    above it, and the pixels of the looser mask around it (in a region of the looser mask that
    holds an object) that lie nearer to it than to any other object."""
    loose = prob > threshold - STABILITY_OFFSET
    seeds = labels > 0
    own = np.bincount(labels[seeds & loose], minlength=count)
    _, nearest = cv2.distanceTransformWithLabels(
        (~seeds).astype(np.uint8), cv2.DIST_L2, cv2.DIST_MASK_5, labelType=cv2.DIST_LABEL_PIXEL
    )
    # DIST_LABEL_PIXEL numbers the zero pixels (the objects' pixels) 1, 2, ... in raster order.
    by_seed = np.zeros(int(nearest.max()) + 1, np.int64)
    by_seed[1 : int(seeds.sum()) + 1] = labels[seeds]
    _, regions = cv2.connectedComponents((loose | seeds).astype(np.uint8), connectivity=8)
    holds = np.zeros(int(regions.max()) + 1, bool)
    holds[regions[seeds]] = True
    around = loose & ~seeds & holds[regions]
    return own + np.bincount(by_seed[nearest[around]], minlength=count)


def make_instances(
    objects: Objects, prompt: int, first_id: int
) -> tuple[np.ndarray, list[Instance], int]:
    """The kept objects as instances numbered from ``first_id`` (at most up to
    :data:`MAX_INSTANCES_PER_IMAGE`).

    Returns:
        uint16 ``[H, W]`` id map (0 = background), the instances in id order, and how many
        objects the cap left out.
    """
    labels = objects.labels
    room = max(0, MAX_INSTANCES_PER_IMAGE - first_id + 1)
    order = objects.order[:room]
    lut = np.zeros(len(objects.scores), np.uint16)
    lut[order] = np.arange(first_id, first_id + len(order), dtype=np.uint16)
    ids = lut[labels]
    instances = []
    for instance_id, label in zip(range(first_id, first_id + len(order)), order, strict=True):
        x, y, w, h = objects.boxes[int(label)]
        window = (slice(y, y + h), slice(x, x + w))
        inside = labels[window] == label
        full = np.zeros(labels.shape, np.uint8)
        full[window][inside] = 1
        rle = mask_utils.encode(np.asfortranarray(full))
        instances.append(
            Instance(
                id=instance_id,
                prompt=prompt,
                rle={"size": [int(v) for v in rle["size"]], "counts": rle["counts"].decode()},
                area=int(mask_utils.area(rle)),
                bbox=tuple(float(v) for v in mask_utils.toBbox(rle)),
                score=float(objects.scores[label]),
                polygon=_outline(inside, x, y),
            )
        )
    return ids, instances, len(objects.order) - len(order)


def _outline(region: np.ndarray, x: int, y: int) -> tuple[float, ...]:
    """The region's outer contour in COCO's coordinates (pixel ``j`` spans ``[j, j + 1]``),
    simplified by :data:`POLYGON_TOLERANCE`.

    Traced on the region upsampled 2x, so the polygon runs along the pixels' edges rather than
    through their centres: rasterised again by pycocotools it gives back the region's pixels
    (a contour through the centres loses half a pixel all round: IoU 0.85 for a small disc).
    """
    doubled = cv2.resize(region.astype(np.uint8), None, fx=2, fy=2, interpolation=cv2.INTER_NEAREST)
    contours, _ = cv2.findContours(np.pad(doubled, 1), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
    contour = max(contours, key=cv2.contourArea)
    simple = cv2.approxPolyDP(contour, 2 * POLYGON_TOLERANCE, closed=True)
    if len(simple) < 3:
        simple = contour
    # Back from the padded, doubled grid: its point (X, Y) is the edge coordinate (X - 1 + 0.5)/2.
    points = (simple.reshape(-1, 2).astype(np.float64) - 0.5) / 2 + (x, y)
    return tuple(round(float(v), 2) for v in points.reshape(-1))


#: Frames an object may go unseen (missed by the model, hidden) and keep its track id.
TRACK_GAP = 5


@dataclass
class InstanceTracker:
    """Track ids over a video's frames: an instance keeps the id of the instance of its prompt
    that it overlaps most in the previous frame (IoU > 0; the pairs of highest IoU matched
    first, one to one), or else where an object lost in the last :data:`TRACK_GAP` frames was
    last seen; any other gets a new id (1, 2, ... in order of appearance). Frames are given in
    order, each as its instances' ``(prompt, rle)``."""

    next_id: int = 1
    gap: int = TRACK_GAP
    # Each track still followed: its prompt, its last RLE, frames since it was seen (0: the
    # previous frame).
    _tracks: dict[int, tuple[int, dict, int]] = field(default_factory=dict)

    def assign(self, instances: list[tuple[int, dict]]) -> list[int]:
        """The track id of each instance of the next frame."""
        tracks = [0] * len(instances)
        known = list(self._tracks.items())
        if instances and known:
            ious = mask_utils.iou(
                [rle_of(rle) for _prompt, rle in instances],
                [rle_of(rle) for _track, (_prompt, rle, _age) in known],
                [0] * len(known),
            )
            candidates = sorted(
                (age, -float(ious[i][j]), i, j)
                for i, (prompt, _rle) in enumerate(instances)
                for j, (_track, (before, _old, age)) in enumerate(known)
                if prompt == before and ious[i][j] > 0
            )  # the previous frame's objects first, then the longer lost
            taken: set[int] = set()
            for _age, _iou, i, j in candidates:
                if not tracks[i] and j not in taken:
                    tracks[i] = known[j][0]
                    taken.add(j)
        for i, track in enumerate(tracks):
            if not track:
                tracks[i] = self.next_id
                self.next_id += 1
        seen = set(tracks)
        self._tracks = {
            track: (prompt, rle, age + 1)
            for track, (prompt, rle, age) in self._tracks.items()
            if track not in seen and age + 1 <= self.gap
        }
        for (prompt, rle), track in zip(instances, tracks, strict=True):
            self._tracks[track] = (prompt, rle, 0)
        return tracks


def rle_of(rle: dict) -> dict:
    """A stored RLE (``counts`` as text) as pycocotools takes it."""
    counts = rle["counts"]
    return {"size": rle["size"], "counts": counts.encode() if isinstance(counts, str) else counts}
