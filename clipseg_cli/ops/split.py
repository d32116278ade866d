"""Touching objects as separate regions (``--split auto``): a watershed of each region of a mask.

Two round objects that touch make one region of the mask, pinched where they meet. The split
floods each region's distance transform (every pixel's distance to the background: high in
the middle of an object, low in the neck between two) from its maxima downwards, one level at a
time, as watershed post-processing of instance segmenters does (StarDist, Cellpose, OpenCV's
own distance-transform watershed example). Where two basins meet, the lower one stays an object
of its own only if all of these hold, else the two are one object:

* a valley: the level where they meet is at most :data:`VALLEY` of its peak (the neck is at
  most 70% as wide as the object's inscribed disc);
* a real object: its peak is at least :data:`PEAK_SHARE` of the region's highest, and at least
  ``min_peak`` pixels (a disc of the smallest area a region may have, ``--min-area``), so the
  ragged, speckled edge of a region is never cut into specks;
* apart: the peaks are at least :data:`PEAK_DISTANCE` of the region's equivalent radius apart.

Why the distance transform rather than the probability: CLIPSeg's probability, refined against
the image, saturates inside objects (a plateau at 1.0 over both of two touching circles for the
demo model), so its maxima do not mark objects; the shape of the region does. The thresholds
were chosen on tuning scenes and are measured on fresh ones by ``bench/instances_bench.py``.
Pixels are given to the basin they flood into; below the last level that can still decide a
split, to the nearest basin. Pure arrays in and out (OpenCV and numpy).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import cv2
import numpy as np

#: A basin stays separate only if the level where it meets a higher one is at most this share
#: of its peak.
VALLEY = 0.7
#: ... and its peak is at least this share of the region's highest peak.
PEAK_SHARE = 0.4
#: ... and its peak is at least this share of the region's equivalent radius
#: (``sqrt(area / pi)``) away from the peaks kept.
PEAK_DISTANCE = 0.3
#: Flooding levels between a region's highest peak and the last level that can decide a split.
LEVELS = 32


def distance_map(mask: np.ndarray) -> np.ndarray:
    """float32 ``[H, W]``: each pixel's Euclidean distance to the nearest background pixel
    (outside the image counts as background)."""
    padded = np.pad(mask.astype(np.uint8), 1)
    # The 5x5 mask's approximation is within about 2% of the exact distance, at a fifth of its
    # cost.
    return cv2.distanceTransform(padded, cv2.DIST_L2, cv2.DIST_MASK_5)[1:-1, 1:-1]


def split_regions(
    labels: np.ndarray, count: int, distance: np.ndarray, min_peak: float
) -> tuple[np.ndarray, int]:
    """Split the regions of int32 ``labels`` (1 to ``count - 1``, 0 background) whose distance
    map has several separate peaks.

    Returns:
        int32 ``[H, W]`` labels where each split region keeps its label for one part and its
        other parts get labels from ``count`` up, and the new count (one more than the largest
        label).
    """
    candidates = _regions_with_several_peaks(labels, distance, min_peak)
    if not candidates:
        return labels, count
    out = labels.copy()
    for region in candidates:
        x, y, w, h = cv2.boundingRect((labels == region).astype(np.uint8))
        window = (slice(y, y + h), slice(x, x + w))
        inside = labels[window] == region
        parts = flood(distance[window], inside, min_peak)
        for part in range(2, int(parts.max()) + 1):
            out[window][parts == part] = count
            count += 1
    return out, count


def _regions_with_several_peaks(
    labels: np.ndarray, distance: np.ndarray, min_peak: float
) -> list[int]:
    """The regions with at least two separate local maxima of the distance map that could be
    objects (above ``min_peak`` and :data:`PEAK_SHARE` of the region's highest): the only ones
    worth flooding."""
    local_max = (distance >= cv2.dilate(distance, np.ones((3, 3), np.uint8))) & (
        distance >= max(min_peak, 1.0)
    )
    count, peaks = cv2.connectedComponents(local_max.astype(np.uint8), connectivity=8)
    if count <= 2:
        return []
    first = np.zeros(count, np.int64)
    flat = peaks.ravel()
    order = np.flatnonzero(flat)
    first[flat[order[::-1]]] = order[::-1]  # a pixel of each peak
    peak_region = labels.ravel()[first[1:]]
    peak_height = distance.ravel()[first[1:]]
    top = np.zeros(int(labels.max()) + 1, np.float32)
    np.maximum.at(top, peak_region, peak_height)
    real = peak_height >= PEAK_SHARE * top[peak_region]
    regions, per_region = np.unique(peak_region[real], return_counts=True)
    return [int(r) for r in regions[per_region >= 2]]


@dataclass
class _Basins:
    """The basins found so far: each one's peak height and a pixel of it, and which basin
    each was merged into (union-find)."""

    peak: list[float] = field(default_factory=lambda: [0.0])
    pixel: list[tuple[int, int]] = field(default_factory=lambda: [(0, 0)])
    parent: list[int] = field(default_factory=lambda: [0])

    def add(self, peak: float, pixel: tuple[int, int]) -> int:
        self.parent.append(len(self.parent))
        self.peak.append(peak)
        self.pixel.append(pixel)
        return len(self.parent) - 1

    def root(self, basin: int) -> int:
        while self.parent[basin] != basin:
            basin = self.parent[basin]
        return basin

    def roots(self) -> np.ndarray:
        return np.array([self.root(b) for b in range(len(self.parent))], np.int32)

    def apart(self, basin: int, kept: list[int], min_distance: float) -> bool:
        y, x = self.pixel[basin]
        return all(
            math.hypot(y - self.pixel[k][0], x - self.pixel[k][1]) >= min_distance for k in kept
        )


def flood(distance: np.ndarray, region: np.ndarray, min_peak: float) -> np.ndarray:
    """int32 ``[h, w]``: the parts of bool ``region`` (a window of one region), numbered 1, 2,
    ... in the order their peaks were found (highest first), 0 outside the region."""
    top = float(distance[region].max())
    real = max(min_peak, PEAK_SHARE * top)  # a lower peak is never an object of its own
    last = VALLEY * real  # below it, two basins that meet are always kept apart
    min_distance = PEAK_DISTANCE * math.sqrt(float(region.sum()) / math.pi)
    basins = _Basins()
    labels = np.zeros(region.shape, np.int32)
    # The local maxima high enough to be an object's peak (a pixel of each plateau), highest
    # first: a part of a level without a basin becomes one at the first of them it holds.
    local_max = region & (distance >= cv2.dilate(distance, np.ones((3, 3), np.uint8)))
    _, plateaus = cv2.connectedComponents((local_max & (distance >= real)).astype(np.uint8))
    peak_ys, peak_xs = np.nonzero(plateaus)
    _, one_each = np.unique(plateaus[peak_ys, peak_xs], return_index=True)
    peak_ys, peak_xs = peak_ys[one_each], peak_xs[one_each]
    highest = np.argsort(-distance[peak_ys, peak_xs], kind="stable")
    peak_ys, peak_xs = peak_ys[highest], peak_xs[highest]
    lowest_peak = float(distance[peak_ys[-1], peak_xs[-1]]) if len(peak_ys) else top
    alive: list[int] = []  # the basins not merged into another
    # Each level's work is confined to the box around the region's pixels at or above it:
    # those only grow as the level falls, the labels are 0 outside them, and the connected
    # components of the box are those of the whole window. (Where objects are, this box is
    # a fraction of the window at most levels; the answer is the same, pixel for pixel.)
    height = np.where(region, distance, np.float32(-1))
    row_top, column_top = height.max(axis=1), height.max(axis=0)
    for level in np.linspace(top, last, LEVELS):
        rows, columns = np.flatnonzero(row_top >= level), np.flatnonzero(column_top >= level)
        y0, x0 = int(rows[0]), int(columns[0])
        box = (slice(y0, int(rows[-1]) + 1), slice(x0, int(columns[-1]) + 1))
        above = height[box] >= level
        count, parts = cv2.connectedComponents(above.view(np.uint8), connectivity=8)
        by_part: dict[int, list[int]] = {}
        for basin in alive:
            by_part.setdefault(_part_at(parts, y0, x0, basins.pixel[basin]), []).append(basin)
        lut = np.zeros(count, np.int32)
        for y, x in zip(peak_ys, peak_xs, strict=True):
            part = _part_at(parts, y0, x0, (int(y), int(x)))
            if part and part not in by_part:
                by_part[part] = []
                lut[part] = basins.add(float(distance[y, x]), (int(y), int(x)))
                alive.append(lut[part])
        shared, merged = [], False
        for part, found in by_part.items():
            if not found:
                continue
            found.sort(key=lambda b: -basins.peak[b])
            kept = [found[0]]
            for basin in found[1:]:
                if level <= VALLEY * basins.peak[basin] and basins.apart(basin, kept, min_distance):
                    kept.append(basin)
                else:
                    basins.parent[basin] = found[0]
                    alive.remove(basin)
                    merged = True
            if len(kept) == 1:
                lut[part] = kept[0]
            else:
                shared.append(part)
        window = labels[box]  # a view: writing it writes labels
        if merged:
            window[...] = basins.roots()[window]
        fresh = above & (window == 0)
        window[fresh] = lut[parts[fresh]]
        for part in shared:
            where = np.zeros(region.shape, bool)
            where[box] = parts == part
            _give_to_nearest(labels, where)
        if len(alive) == 1 and level <= lowest_peak:
            # One basin left and every peak above the level: each peak lies in that basin's
            # part from now on, so no lower level can start or keep another; the region is
            # one part, as the remaining levels and the hand-out to the nearest would make it.
            return region.astype(np.int32)
    if len(alive) == 1:
        return region.astype(np.int32)
    labels = basins.roots()[labels]
    if labels.any():
        _give_to_nearest(labels, region)
    # Number the parts 1, 2, ... by their basins' order of discovery.
    # The basins that kept pixels, ascending (np.unique's answer; a count is 4x cheaper than
    # its sort of every labelled pixel).
    used = np.flatnonzero(np.bincount(labels.ravel())[1:]) + 1
    renumber = np.zeros(len(basins.parent), np.int32)
    renumber[used] = np.arange(1, len(used) + 1, dtype=np.int32)
    return renumber[labels]


def _part_at(parts: np.ndarray, y0: int, x0: int, pixel: tuple[int, int]) -> int:
    """The part at ``pixel`` (window coordinates) of a level's ``parts``, a box whose top-left
    corner is ``(y0, x0)``; 0 outside the box (below the level)."""
    y, x = pixel[0] - y0, pixel[1] - x0
    inside = 0 <= y < parts.shape[0] and 0 <= x < parts.shape[1]
    return int(parts[y, x]) if inside else 0


def _give_to_nearest(labels: np.ndarray, where: np.ndarray) -> None:
    """In place: each pixel of bool ``where`` without a label takes the label of the nearest
    labelled pixel of ``where``."""
    seeds = where & (labels > 0)
    unlabelled = where & (labels == 0)
    if not unlabelled.any() or not seeds.any():
        return
    _, nearest = cv2.distanceTransformWithLabels(
        (~seeds).astype(np.uint8), cv2.DIST_L2, cv2.DIST_MASK_5, labelType=cv2.DIST_LABEL_PIXEL
    )
    # DIST_LABEL_PIXEL numbers the zero pixels (the seeds) 1, 2, ... in raster order.
    by_seed = np.zeros(int(nearest.max()) + 1, np.int32)
    by_seed[1 : int(seeds.sum()) + 1] = labels[seeds]
    labels[unlabelled] = by_seed[nearest[unlabelled]]
