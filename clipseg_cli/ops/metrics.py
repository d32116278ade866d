"""Segmentation and matting metrics, as pure functions of numpy arrays (numpy + OpenCV only).

Segmentation (CLIPSeg paper / original repository ``metrics.py``)
------------------------------------------------------------------
A pixel is predicted foreground at threshold ``t`` when ``prob > t`` (strict, compared in
float32, exactly like ``clipseg segment``). True/false positives/negatives are **summed over
the whole dataset** at every threshold of a fixed grid (:data:`THRESHOLDS`: 0.00, 0.01, ...,
1.00, which contains the paper's default 0.3), then:

* IoU_FG = TP / (TP + FP + FN). **No +1**: the original repository divides by
  ``1 + TP + FP + FN``; that variant is reported too as ``iou_fg_plus1``. When the
  denominator is 0 (no foreground in the ground truth and none predicted) IoU_FG is defined
  as **1.0**: the prediction agrees perfectly with the ground truth.
* IoU_BG = TN / (TN + FN + FP) (0/0 -> 1.0); binary IoU = (IoU_FG + IoU_BG) / 2.
* mIoU = unweighted mean over classes (prompts) of each class's dataset-summed IoU_FG.
* precision = TP / (TP + FP) (0/0 -> 1.0: nothing claimed, nothing wrong);
  recall = TP / (TP + FN) (0/0 -> 1.0: nothing to find).
* AP = step-wise area under the precision/recall curve (scikit-learn's rule):
  ``sum_j (R_j - R_{j+1}) * P_j`` over the ascending grid, with ``R_{n} = 0`` after the last
  threshold. The original repository integrates its (+1) points with Simpson's rule over a
  0.02..0.98 grid instead, so its numbers differ slightly. AP is undefined (None) when the
  ground truth holds no foreground pixel at all.
* Best threshold: the grid value maximising the metric; ties go to the value closest to the
  default 0.3, then to the lower one.

Matting (Rhemann et al. / Deep Image Matting benchmark code), alpha in [0, 1], whole image
(no trimap), each metric averaged over images: see :data:`MATTING_CONVENTIONS`.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Hashable, Sequence
from dataclasses import dataclass, field

import cv2
import numpy as np

from clipseg_cli.specs import DEFAULT_THRESHOLD

#: The fixed threshold grid: 0.00, 0.01, ..., 1.00 (101 values, float64).
THRESHOLDS: np.ndarray = np.round(np.arange(101) / 100.0, 2)

SEGMENTATION_CONVENTIONS: dict[str, str] = {
    "threshold": "foreground = prob > t (strict, float32); grid 0.00..1.00 step 0.01",
    "iou_fg": "TP/(TP+FP+FN) summed over the dataset, no +1; 0/0 = 1",
    "iou_fg_plus1": "original repository variant TP/(1+TP+FP+FN)",
    "binary_iou": "(IoU_FG + IoU_BG)/2, IoU_BG = TN/(TN+FN+FP); 0/0 = 1",
    "miou": "mean over classes (prompts) of per-class dataset IoU_FG",
    "precision": "TP/(TP+FP); 0/0 = 1",
    "recall": "TP/(TP+FN); 0/0 = 1",
    "ap": "step sum over the grid, sum (R_j - R_j+1) * P_j, R after 1.00 = 0",
    "best": "grid threshold maximising IoU_FG; ties -> closest to 0.3, then lower",
    "boundary_f": "2PR/(P+R) of edge pixels (mask pixels with an outside 8-neighbour) matched "
    "within 2 px, summed over the dataset, at the chosen threshold",
}

#: Grad: sigma of the Gaussian-derivative filters.
GRAD_SIGMA = 1.4
#: Conn: alpha thresholds 0, 0.1, ..., 1 and the cut below which a difference is ignored.
CONN_THRESHOLDS: tuple[float, ...] = tuple(k / 10 for k in range(11))
CONN_CUT = 0.15
#: SAD, Grad and Conn are divided by this (the matting benchmarks' convention).
MATTING_SCALE = 1000.0

MATTING_CONVENTIONS: dict[str, str] = {
    "sad": "sum|a-a*| / 1000 (alpha in [0,1])",
    "mse": "sum(a-a*)^2 / N (N = H*W, not x1000)",
    "mad": "sum|a-a*| / N (not x1000)",
    "grad": "sum(|∇a|-|∇a*|)^2 / 1000, Gaussian-derivative filters sigma 1.4, L2-normalised",
    "conn": "sum|phi(a)-phi(a*)| / 1000, thresholds 0..1 step 0.1, cut 0.15, 4-connected",
    "average": "each metric per image over the whole image (no trimap), mean over images",
}

MATTING_KEYS = ("sad", "mse", "mad", "grad", "conn")


# -------------------------------------------------------------------------------------------
# Segmentation
# -------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Counts:
    """Confusion counts per threshold: each field is int64 ``[T]`` (one entry per threshold)."""

    tp: np.ndarray
    fp: np.ndarray
    fn: np.ndarray
    tn: np.ndarray

    @classmethod
    def zeros(cls, n: int) -> Counts:
        """All-zero counts for ``n`` thresholds."""
        return cls(*(np.zeros(n, np.int64) for _ in range(4)))

    def __add__(self, other: Counts) -> Counts:
        return Counts(
            self.tp + other.tp, self.fp + other.fp, self.fn + other.fn, self.tn + other.tn
        )


def _check_thresholds(thresholds: Sequence[float] | np.ndarray) -> np.ndarray:
    grid = np.asarray(thresholds, dtype=np.float64)
    if grid.ndim != 1 or grid.size == 0:
        raise ValueError("thresholds must be a non-empty 1-D sequence")
    if not np.all(np.isfinite(grid)) or grid.min() < 0 or grid.max() > 1:
        raise ValueError("thresholds must lie in [0, 1]")
    if np.any(np.diff(grid) <= 0):
        raise ValueError("thresholds must be strictly increasing")
    return grid


def threshold_grid(extra: float | None = None) -> np.ndarray:
    """:data:`THRESHOLDS`, plus ``extra`` inserted in order when it is not already on it."""
    if extra is None or np.any(np.isclose(THRESHOLDS, extra, rtol=0, atol=1e-9)):
        return THRESHOLDS.copy()
    return _check_thresholds(np.sort(np.append(THRESHOLDS, float(extra))))


def _check_prob(prob: np.ndarray, name: str = "prob", dtype: type = np.float32) -> np.ndarray:
    p = np.asarray(prob)
    if p.ndim != 2 or p.size == 0:
        raise ValueError(f"{name} must be a non-empty [H, W] array, got shape {list(p.shape)}")
    p = p.astype(dtype, copy=False)
    if not np.all(np.isfinite(p)) or p.min() < 0.0 or p.max() > 1.0:
        raise ValueError(f"{name} values must be finite and within [0, 1]")
    return p


def confusion_counts(
    prob: np.ndarray, gt: np.ndarray, thresholds: Sequence[float] | np.ndarray = THRESHOLDS
) -> Counts:
    """TP/FP/FN/TN of one image at every threshold.

    Args:
        prob: float ``[H, W]`` probabilities in [0, 1].
        gt: bool ``[H, W]`` ground truth (True = foreground); other dtypes use ``!= 0``.
        thresholds: strictly increasing values in [0, 1].

    Returns:
        :class:`Counts` with int64 ``[T]`` arrays; foreground at ``t`` means ``prob > t``.
    """
    grid = _check_thresholds(thresholds)
    p = _check_prob(prob).ravel()
    g = np.asarray(gt)
    if g.shape != np.shape(prob):
        raise ValueError(f"gt shape {list(g.shape)} differs from prob shape {list(prob.shape)}")
    g = g.astype(bool, copy=False).ravel()
    # One pass instead of T comparisons: count[i] = number of thresholds strictly below p[i],
    # i.e. pixel i is foreground exactly at thresholds j < count[i]. Float32 like segment's
    # `prob > threshold` so that the counts match the masks it writes bit for bit.
    above = np.searchsorted(grid.astype(np.float32), p, side="left")
    n = grid.size
    hist_fg = np.bincount(above[g], minlength=n + 1)
    hist_bg = np.bincount(above[~g], minlength=n + 1)
    n_fg, n_bg = int(hist_fg.sum()), int(hist_bg.sum())
    # Pixels foreground at threshold j are those with count > j.
    tp = (n_fg - np.cumsum(hist_fg)[:n]).astype(np.int64)
    fp = (n_bg - np.cumsum(hist_bg)[:n]).astype(np.int64)
    return Counts(tp=tp, fp=fp, fn=n_fg - tp, tn=n_bg - fp)


def _ratio(num: np.ndarray, den: np.ndarray, empty: float) -> np.ndarray:
    num = np.asarray(num, dtype=np.float64)
    den = np.asarray(den, dtype=np.float64)
    out = np.full(np.broadcast(num, den).shape, empty, dtype=np.float64)
    np.divide(num, den, out=out, where=den > 0)
    return out


def iou_fg(counts: Counts) -> np.ndarray:
    """Foreground IoU ``TP / (TP + FP + FN)`` per threshold, float64 ``[T]``; 0/0 -> 1."""
    return _ratio(counts.tp, counts.tp + counts.fp + counts.fn, 1.0)


def iou_fg_plus1(counts: Counts) -> np.ndarray:
    """The original repository's ``TP / (1 + TP + FP + FN)``, float64 ``[T]``."""
    return counts.tp / (1.0 + counts.tp + counts.fp + counts.fn)


def iou_bg(counts: Counts) -> np.ndarray:
    """Background IoU ``TN / (TN + FN + FP)`` per threshold, float64 ``[T]``; 0/0 -> 1."""
    return _ratio(counts.tn, counts.tn + counts.fn + counts.fp, 1.0)


def binary_iou(counts: Counts) -> np.ndarray:
    """Mean of foreground and background IoU per threshold, float64 ``[T]``."""
    return 0.5 * (iou_fg(counts) + iou_bg(counts))


def precision_recall(counts: Counts) -> tuple[np.ndarray, np.ndarray]:
    """Precision ``TP/(TP+FP)`` and recall ``TP/(TP+FN)`` per threshold (0/0 -> 1 each)."""
    return (
        _ratio(counts.tp, counts.tp + counts.fp, 1.0),
        _ratio(counts.tp, counts.tp + counts.fn, 1.0),
    )


def average_precision(counts: Counts) -> float | None:
    """Step-wise area under the PR curve over an ascending threshold grid.

    ``AP = sum_j (R_j - R_{j+1}) * P_j`` with ``R_T = 0``: each precision is weighted by the
    recall gained when moving down to its threshold from the next higher one (scikit-learn's
    ``average_precision_score`` rule, evaluated on the grid). None when the ground truth has
    no foreground pixel (recall undefined).
    """
    if int(counts.tp[0] + counts.fn[0]) == 0:
        return None
    precision, recall = precision_recall(counts)
    next_recall = np.append(recall[1:], 0.0)
    return float(np.sum((recall - next_recall) * precision))


def best_index(
    values: np.ndarray, thresholds: np.ndarray, prefer: float = DEFAULT_THRESHOLD
) -> int:
    """Index of the largest value; ties -> threshold closest to ``prefer``, then the lower."""
    values = np.asarray(values, dtype=np.float64)
    top = np.flatnonzero(values >= values.max() - 1e-12)
    distance = np.abs(np.asarray(thresholds)[top] - prefer)
    # np.argmin returns the first minimum, i.e. the lower threshold among equal distances.
    return int(top[np.argmin(np.round(distance, 9))])


@dataclass(frozen=True)
class SegmentationScores:
    """Dataset-level segmentation metrics; every array is float64 ``[T]`` over ``thresholds``.

    ``per_class_iou_fg`` maps each class id to its IoU_FG per threshold; ``miou`` is their
    mean. ``ap`` is None when the ground truth has no foreground at all.
    """

    thresholds: np.ndarray
    counts: Counts
    iou_fg: np.ndarray
    iou_fg_plus1: np.ndarray
    binary_iou: np.ndarray
    miou: np.ndarray
    precision: np.ndarray
    recall: np.ndarray
    ap: float | None
    per_class_iou_fg: dict[Hashable, np.ndarray]
    images: int
    best_threshold: float

    def index(self, threshold: float) -> int:
        """Grid index of ``threshold``; ValueError when it is not on the grid."""
        hits = np.flatnonzero(np.isclose(self.thresholds, threshold, rtol=0, atol=1e-9))
        if hits.size == 0:
            raise ValueError(f"threshold {threshold} is not on the evaluation grid")
        return int(hits[0])

    def at(self, threshold: float) -> dict[str, float | int | None]:
        """Every metric at one grid threshold (AP, threshold-free, included for convenience)."""
        j = self.index(threshold)
        return {
            "threshold": float(self.thresholds[j]),
            "iou_fg": float(self.iou_fg[j]),
            "iou_fg_plus1": float(self.iou_fg_plus1[j]),
            "binary_iou": float(self.binary_iou[j]),
            "miou": float(self.miou[j]),
            "precision": float(self.precision[j]),
            "recall": float(self.recall[j]),
            "ap": self.ap,
            "tp": int(self.counts.tp[j]),
            "fp": int(self.counts.fp[j]),
            "fn": int(self.counts.fn[j]),
            "tn": int(self.counts.tn[j]),
        }

    def best(self, metric: str = "iou_fg") -> float:
        """Grid threshold maximising ``metric`` (iou_fg, binary_iou or miou)."""
        if metric not in ("iou_fg", "binary_iou", "miou"):
            raise ValueError(f"cannot optimise {metric!r}; choose iou_fg, binary_iou or miou")
        return float(self.thresholds[best_index(getattr(self, metric), self.thresholds)])


@dataclass
class SegmentationAccumulator:
    """Sums confusion counts over a dataset, overall and per class, at every grid threshold.

    Example::

        acc = SegmentationAccumulator()
        for prob, gt, cls in data:  # float [H, W] in [0, 1], bool [H, W], any hashable
            acc.update(prob, gt, cls)
        scores = acc.result()
        scores.at(0.3)["iou_fg"]
    """

    thresholds: np.ndarray = field(default_factory=lambda: THRESHOLDS.copy())
    images: int = 0
    total: Counts = field(init=False)
    per_class: dict[Hashable, Counts] = field(init=False, default_factory=dict)

    def __post_init__(self) -> None:
        self.thresholds = _check_thresholds(self.thresholds)
        self.total = Counts.zeros(self.thresholds.size)

    def update(self, prob: np.ndarray, gt: np.ndarray, class_id: Hashable = 0) -> Counts:
        """Add one image: ``prob`` float ``[H, W]`` in [0, 1], ``gt`` bool ``[H, W]``.

        Returns that image's own :class:`Counts` (for per-image reporting).
        """
        counts = confusion_counts(prob, gt, self.thresholds)
        self.total = self.total + counts
        previous = self.per_class.get(class_id)
        self.per_class[class_id] = counts if previous is None else previous + counts
        self.images += 1
        return counts

    def result(self) -> SegmentationScores:
        """The metrics so far (ValueError before the first :meth:`update`)."""
        if self.images == 0:
            raise ValueError("no image was added")
        per_class = {cls: iou_fg(c) for cls, c in self.per_class.items()}
        precision, recall = precision_recall(self.total)
        fg = iou_fg(self.total)
        return SegmentationScores(
            thresholds=self.thresholds,
            counts=self.total,
            iou_fg=fg,
            iou_fg_plus1=iou_fg_plus1(self.total),
            binary_iou=binary_iou(self.total),
            miou=np.mean(np.stack(list(per_class.values())), axis=0),
            precision=precision,
            recall=recall,
            ap=average_precision(self.total),
            per_class_iou_fg=per_class,
            images=self.images,
            best_threshold=float(self.thresholds[best_index(fg, self.thresholds)]),
        )


# -------------------------------------------------------------------------------------------
# Boundaries
# -------------------------------------------------------------------------------------------

#: A predicted edge pixel matches a true one at most this many pixels away (and vice versa).
BOUNDARY_TOLERANCE = 2


@dataclass(frozen=True)
class BoundaryCounts:
    """Edge pixels of one image (or summed over a dataset): how many of the predicted edge's
    pixels lie near the true edge, and how many of the true edge's lie near the predicted."""

    pred_matched: int = 0
    pred: int = 0
    gt_matched: int = 0
    gt: int = 0

    def __add__(self, other: BoundaryCounts) -> BoundaryCounts:
        return BoundaryCounts(
            self.pred_matched + other.pred_matched,
            self.pred + other.pred,
            self.gt_matched + other.gt_matched,
            self.gt + other.gt,
        )

    @property
    def f_score(self) -> float:
        """Boundary F = 2PR / (P + R), P = pred_matched / pred, R = gt_matched / gt; 1.0 when
        neither has an edge, 0.0 when only one has."""
        if self.pred == 0 and self.gt == 0:
            return 1.0
        if self.pred == 0 or self.gt == 0:
            return 0.0
        precision, recall = self.pred_matched / self.pred, self.gt_matched / self.gt
        total = precision + recall
        return 2 * precision * recall / total if total > 0 else 0.0


def _edge(mask: np.ndarray) -> np.ndarray:
    """The mask's own outermost pixels: in the mask, with a pixel outside it among their 8
    neighbours (the image border counts as outside)."""
    padded = np.pad(mask.astype(np.uint8), 1)
    inner = cv2.erode(padded, np.ones((3, 3), np.uint8))[1:-1, 1:-1].astype(bool)
    return mask & ~inner


def boundary_counts(
    pred: np.ndarray, gt: np.ndarray, tolerance: int = BOUNDARY_TOLERANCE
) -> BoundaryCounts:
    """The :class:`BoundaryCounts` of bool ``[H, W]`` masks, matching edges within
    ``tolerance`` pixels (a disc)."""
    pred, gt = np.asarray(pred, bool), np.asarray(gt, bool)
    if pred.shape != gt.shape or pred.ndim != 2:
        raise ValueError(f"pred {list(pred.shape)} and gt {list(gt.shape)} must be equal [H, W]")
    pred_edge, gt_edge = _edge(pred), _edge(gt)
    disc = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * tolerance + 1, 2 * tolerance + 1))
    near_gt = cv2.dilate(gt_edge.astype(np.uint8), disc).astype(bool)
    near_pred = cv2.dilate(pred_edge.astype(np.uint8), disc).astype(bool)
    return BoundaryCounts(
        pred_matched=int(np.count_nonzero(pred_edge & near_gt)),
        pred=int(np.count_nonzero(pred_edge)),
        gt_matched=int(np.count_nonzero(gt_edge & near_pred)),
        gt=int(np.count_nonzero(gt_edge)),
    )


# -------------------------------------------------------------------------------------------
# Matting
# -------------------------------------------------------------------------------------------


def _check_pair(pred: np.ndarray, gt: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    a = _check_prob(pred, "pred", np.float64)
    b = _check_prob(gt, "gt", np.float64)
    if a.shape != b.shape:
        raise ValueError(f"pred shape {list(a.shape)} differs from gt shape {list(b.shape)}")
    return a, b


def sad(pred: np.ndarray, gt: np.ndarray) -> float:
    """Sum of absolute differences / 1000; alphas float ``[H, W]`` in [0, 1]."""
    a, b = _check_pair(pred, gt)
    return float(np.abs(a - b).sum() / MATTING_SCALE)


def mse(pred: np.ndarray, gt: np.ndarray) -> float:
    """Mean squared difference over all ``H*W`` pixels; alphas float ``[H, W]`` in [0, 1]."""
    a, b = _check_pair(pred, gt)
    return float(np.mean((a - b) ** 2))


def mad(pred: np.ndarray, gt: np.ndarray) -> float:
    """Mean absolute difference over all ``H*W`` pixels; alphas float ``[H, W]`` in [0, 1]."""
    a, b = _check_pair(pred, gt)
    return float(np.mean(np.abs(a - b)))


def gaussian_derivative_kernel(sigma: float = GRAD_SIGMA) -> np.ndarray:
    """The benchmark's x-derivative kernel, float64 ``[2h+1, 2h+1]`` with unit L2 norm.

    ``k[i, j] = g(i - h) * g'(j - h)`` with ``g`` the normalised Gaussian and
    ``h = ceil(sigma * sqrt(-2 ln(sqrt(2 pi) sigma 0.01)))`` (4 for sigma 1.4).
    """
    half = math.ceil(sigma * math.sqrt(-2.0 * math.log(math.sqrt(2.0 * math.pi) * sigma * 1e-2)))
    u = np.arange(-half, half + 1, dtype=np.float64)
    g = np.exp(-(u**2) / (2.0 * sigma**2)) / (sigma * math.sqrt(2.0 * math.pi))
    dg = -u * g / sigma**2
    kernel = np.outer(g, dg)
    return kernel / np.sqrt(np.sum(kernel**2))


def _gradient_magnitude(alpha: np.ndarray, kernel: np.ndarray) -> np.ndarray:
    # The reference uses scipy.ndimage.convolve(mode="nearest"): a true convolution (kernel
    # flipped; cv2.filter2D correlates) with replicated borders.
    gx = cv2.filter2D(alpha, cv2.CV_64F, cv2.flip(kernel, -1), borderType=cv2.BORDER_REPLICATE)
    gy = cv2.filter2D(alpha, cv2.CV_64F, cv2.flip(kernel.T, -1), borderType=cv2.BORDER_REPLICATE)
    return np.sqrt(gx**2 + gy**2)


def grad_error(pred: np.ndarray, gt: np.ndarray, sigma: float = GRAD_SIGMA) -> float:
    """Gradient error: ``sum (|grad a| - |grad a*|)^2 / 1000`` over the whole image.

    Alphas are float ``[H, W]`` in [0, 1]; gradients come from :func:`gaussian_derivative_kernel`
    (x) and its transpose (y).
    """
    a, b = _check_pair(pred, gt)
    kernel = gaussian_derivative_kernel(sigma)
    diff = _gradient_magnitude(a, kernel) - _gradient_magnitude(b, kernel)
    return float(np.sum(diff**2) / MATTING_SCALE)


def _largest_component(mask: np.ndarray) -> np.ndarray:
    """bool ``[H, W]``: the largest 4-connected component of ``mask`` (empty if none).

    Ties go to the component met first in row-major order.
    """
    n, labels, stats, _ = cv2.connectedComponentsWithStats(
        mask.astype(np.uint8), connectivity=4, ltype=cv2.CV_32S
    )
    if n <= 1:
        return np.zeros(mask.shape, dtype=bool)
    areas = stats[1:, cv2.CC_STAT_AREA]
    tied = np.flatnonzero(areas == areas.max()) + 1
    if tied.size > 1:
        flat = labels.ravel()
        firsts = [int(np.argmax(flat == label)) for label in tied]
        label = int(tied[int(np.argmin(firsts))])
    else:
        label = int(tied[0])
    return labels == label


def _connectivity_level(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """float64 ``[H, W]``: the last threshold at which each pixel was still connected."""
    level = np.full(a.shape, -1.0)
    for previous, threshold in itertools.pairwise(CONN_THRESHOLDS):
        omega = _largest_component((a >= threshold) & (b >= threshold))
        level[(level == -1.0) & ~omega] = previous
    level[level == -1.0] = 1.0
    return level


def conn_error(pred: np.ndarray, gt: np.ndarray) -> float:
    """Connectivity error (Rhemann et al. 2009): ``sum |phi(a) - phi(a*)| / 1000``.

    ``l`` is, per pixel, the highest threshold of 0, 0.1, ..., 1 below which it still belongs
    to the largest 4-connected component of ``a >= t & a* >= t``; ``d = alpha - l`` and
    ``phi = 1 - d * (d >= 0.15)``. Alphas are float ``[H, W]`` in [0, 1].
    """
    a, b = _check_pair(pred, gt)
    level = _connectivity_level(a, b)
    da, db = a - level, b - level
    phi_a = 1.0 - da * (da >= CONN_CUT)
    phi_b = 1.0 - db * (db >= CONN_CUT)
    return float(np.sum(np.abs(phi_a - phi_b)) / MATTING_SCALE)


def matting_errors(pred: np.ndarray, gt: np.ndarray) -> dict[str, float]:
    """SAD, MSE, MAD, Grad and Conn of one image (see :data:`MATTING_CONVENTIONS`)."""
    return {
        "sad": sad(pred, gt),
        "mse": mse(pred, gt),
        "mad": mad(pred, gt),
        "grad": grad_error(pred, gt),
        "conn": conn_error(pred, gt),
    }


@dataclass
class MattingAccumulator:
    """Per-image matting errors and their means over the dataset."""

    sums: dict[str, float] = field(default_factory=lambda: dict.fromkeys(MATTING_KEYS, 0.0))
    images: int = 0

    def update(self, pred: np.ndarray, gt: np.ndarray) -> dict[str, float]:
        """Add one image (alphas float ``[H, W]`` in [0, 1]); returns its own errors."""
        errors = matting_errors(pred, gt)
        for key, value in errors.items():
            self.sums[key] += value
        self.images += 1
        return errors

    def result(self) -> dict[str, float]:
        """Mean of each metric over the images added (ValueError before the first one)."""
        if self.images == 0:
            raise ValueError("no image was added")
        return {key: self.sums[key] / self.images for key in MATTING_KEYS}
