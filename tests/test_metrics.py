"""Metrics against hand-computed cases and against straightforward loop implementations.

The reference implementations below are written from the definitions in ../shared/CLIPSEG.md
and share no code with ``clipseg_cli.ops.metrics``.
"""

from __future__ import annotations

import math
from collections import deque

import numpy as np
import pytest

from clipseg_cli.ops import metrics as m

# -------------------------------------------------------------------------------------------
# Independent reference implementations (pure Python loops)
# -------------------------------------------------------------------------------------------


def ref_counts(pairs, thresholds):
    """[(tp, fp, fn, tn)] per threshold, summed over (prob, gt) pairs, foreground = p > t."""
    out = []
    for t in thresholds:
        t32 = np.float32(t)
        tp = fp = fn = tn = 0
        for prob, gt in pairs:
            for p, g in zip(
                np.asarray(prob, np.float32).ravel(), np.asarray(gt).ravel(), strict=True
            ):
                predicted = bool(p > t32)
                if predicted and g:
                    tp += 1
                elif predicted:
                    fp += 1
                elif g:
                    fn += 1
                else:
                    tn += 1
        out.append((tp, fp, fn, tn))
    return out


def ref_div(a, b, empty=1.0):
    return a / b if b else empty


def ref_ap(counts):
    """Walk thresholds from high to low, adding precision times the recall gained."""
    if counts[0][0] + counts[0][2] == 0:
        return None
    ap, previous_recall = 0.0, 0.0
    for tp, fp, fn, _ in reversed(counts):
        recall = ref_div(tp, tp + fn)
        precision = ref_div(tp, tp + fp)
        ap += (recall - previous_recall) * precision
        previous_recall = recall
    return ap


def ref_kernel(sigma=1.4):
    half = math.ceil(sigma * math.sqrt(-2 * math.log(math.sqrt(2 * math.pi) * sigma * 0.01)))
    size = 2 * half + 1

    def gauss(x):
        return math.exp(-(x**2) / (2 * sigma**2)) / (sigma * math.sqrt(2 * math.pi))

    kernel = [[0.0] * size for _ in range(size)]
    for i in range(size):
        for j in range(size):
            x, y = i - half, j - half
            kernel[i][j] = gauss(x) * (-y * gauss(y) / sigma**2)
    norm = math.sqrt(sum(v * v for row in kernel for v in row))
    return [[v / norm for v in row] for row in kernel], half


def ref_convolve(img, kernel, half):
    """True 2-D convolution with replicated borders (scipy.ndimage.convolve, mode='nearest')."""
    h, w = len(img), len(img[0])
    out = [[0.0] * w for _ in range(h)]
    for y in range(h):
        for x in range(w):
            acc = 0.0
            for i in range(2 * half + 1):
                for j in range(2 * half + 1):
                    yy = min(max(y - (i - half), 0), h - 1)
                    xx = min(max(x - (j - half), 0), w - 1)
                    acc += kernel[i][j] * img[yy][xx]
            out[y][x] = acc
    return out


def ref_grad(pred, gt):
    kernel, half = ref_kernel()
    transposed = [list(col) for col in zip(*kernel, strict=True)]

    def magnitude(a):
        a = a.tolist()
        gx, gy = ref_convolve(a, kernel, half), ref_convolve(a, transposed, half)
        return [[math.hypot(gx[y][x], gy[y][x]) for x in range(len(a[0]))] for y in range(len(a))]

    mp, mg = magnitude(pred), magnitude(gt)
    return sum((mp[y][x] - mg[y][x]) ** 2 for y in range(len(mp)) for x in range(len(mp[0])))


def ref_largest_component(mask):
    """Largest 4-connected component by BFS; ties -> the one discovered first (row-major)."""
    h, w = len(mask), len(mask[0])
    seen = [[False] * w for _ in range(h)]
    best: list = []
    for y in range(h):
        for x in range(w):
            if not mask[y][x] or seen[y][x]:
                continue
            component, queue = [], deque([(y, x)])
            seen[y][x] = True
            while queue:
                cy, cx = queue.popleft()
                component.append((cy, cx))
                for ny, nx in ((cy - 1, cx), (cy + 1, cx), (cy, cx - 1), (cy, cx + 1)):
                    if 0 <= ny < h and 0 <= nx < w and mask[ny][nx] and not seen[ny][nx]:
                        seen[ny][nx] = True
                        queue.append((ny, nx))
            if len(component) > len(best):
                best = component
    return set(best)


def ref_conn(pred, gt):
    a, b = pred.tolist(), gt.tolist()
    h, w = len(a), len(a[0])
    steps = [k / 10 for k in range(11)]
    level = [[-1.0] * w for _ in range(h)]
    for i in range(1, len(steps)):
        t = steps[i]
        both = [[a[y][x] >= t and b[y][x] >= t for x in range(w)] for y in range(h)]
        omega = ref_largest_component(both)
        for y in range(h):
            for x in range(w):
                if level[y][x] == -1.0 and (y, x) not in omega:
                    level[y][x] = steps[i - 1]
    total = 0.0
    for y in range(h):
        for x in range(w):
            lv = 1.0 if level[y][x] == -1.0 else level[y][x]
            da, db = a[y][x] - lv, b[y][x] - lv
            phi_a = 1 - (da if da >= 0.15 else 0.0)
            phi_b = 1 - (db if db >= 0.15 else 0.0)
            total += abs(phi_a - phi_b)
    return total


# -------------------------------------------------------------------------------------------
# Segmentation: hand-computed cases
# -------------------------------------------------------------------------------------------


def test_threshold_grid():
    assert m.THRESHOLDS.shape == (101,)
    assert m.THRESHOLDS[0] == 0.0 and m.THRESHOLDS[-1] == 1.0
    assert 0.3 in m.THRESHOLDS.tolist()
    assert m.threshold_grid(0.3).shape == (101,)
    grid = m.threshold_grid(0.333)
    assert grid.shape == (102,) and 0.333 in grid.tolist() and np.all(np.diff(grid) > 0)


def test_hand_iou_precision_recall():
    prob = np.array([[0.9, 0.2], [0.6, 0.1]], np.float32)
    gt = np.array([[1, 1], [0, 0]], bool)
    acc = m.SegmentationAccumulator()
    acc.update(prob, gt)
    at = acc.result().at(0.3)
    # predicted {(0,0), (1,0)}: TP (0,0), FP (1,0), FN (0,1), TN (1,1)
    assert (at["tp"], at["fp"], at["fn"], at["tn"]) == (1, 1, 1, 1)
    assert at["iou_fg"] == pytest.approx(1 / 3)
    assert at["iou_fg_plus1"] == pytest.approx(1 / 4)
    assert at["binary_iou"] == pytest.approx(1 / 3)  # IoU_BG = 1/3 as well
    assert at["miou"] == pytest.approx(1 / 3)
    assert at["precision"] == pytest.approx(0.5) and at["recall"] == pytest.approx(0.5)
    at = acc.result().at(0.5)
    assert (at["tp"], at["fp"], at["fn"], at["tn"]) == (1, 1, 1, 1)
    at = acc.result().at(0.7)  # only 0.9 left
    assert at["iou_fg"] == pytest.approx(1 / 2) and at["precision"] == 1.0
    assert at["binary_iou"] == pytest.approx((1 / 2 + 2 / 3) / 2)


def test_hand_ap_step_rule():
    acc = m.SegmentationAccumulator(thresholds=np.array([0.25, 0.5, 0.75]))
    acc.update(np.array([[0.9, 0.6, 0.4, 0.1]]), np.array([[1, 0, 1, 0]], bool))
    scores = acc.result()
    # t=.25: P=2/3 R=1; t=.5: P=1/2 R=1/2; t=.75: P=1 R=1/2; then R=0.
    np.testing.assert_allclose(scores.precision, [2 / 3, 1 / 2, 1])
    np.testing.assert_allclose(scores.recall, [1, 1 / 2, 1 / 2])
    assert scores.ap == pytest.approx(0.5 * 2 / 3 + 0 * 0.5 + 0.5 * 1)


def test_hand_miou_two_classes():
    acc = m.SegmentationAccumulator()
    acc.update(np.array([[0.9, 0.9, 0.0]]), np.array([[1, 0, 0]], bool), "a")  # IoU 1/2
    acc.update(np.array([[0.9, 0.0, 0.0]]), np.array([[1, 0, 0]], bool), "b")  # IoU 1
    at = acc.result().at(0.3)
    assert at["miou"] == pytest.approx(0.75)
    assert at["iou_fg"] == pytest.approx(2 / 3)  # summed: TP 2, FP 1, FN 0
    per_class = acc.result().per_class_iou_fg
    assert per_class["a"][30] == pytest.approx(0.5) and per_class["b"][30] == 1.0


def test_foreground_is_strictly_above_threshold_in_float32():
    prob = np.array([[0.3, np.nextafter(np.float32(0.3), np.float32(1))]], np.float32)
    counts = m.confusion_counts(prob, np.array([[1, 1]], bool))
    assert counts.tp[30] == 1  # the value equal to 0.3 is background, as in segment's masks
    assert counts.tp[0] == 2 and counts.tp[100] == 0


def test_perfect_prediction_has_ap_one():
    gt = np.zeros((4, 5), bool)
    gt[1:3, 1:4] = True
    acc = m.SegmentationAccumulator()
    acc.update(gt.astype(np.float32), gt)
    scores = acc.result()
    assert scores.ap == pytest.approx(1.0)
    assert np.all(scores.iou_fg[:-1] == 1.0) and scores.iou_fg[-1] == 0.0
    assert scores.best_threshold == 0.3  # every t < 1 ties; the default wins


# -------------------------------------------------------------------------------------------
# Segmentation: edge cases
# -------------------------------------------------------------------------------------------


def test_empty_gt_and_empty_prediction():
    acc = m.SegmentationAccumulator()
    acc.update(np.zeros((3, 3), np.float32), np.zeros((3, 3), bool))
    scores = acc.result()
    assert np.all(scores.iou_fg == 1.0) and np.all(scores.binary_iou == 1.0)
    assert np.all(scores.miou == 1.0) and np.all(scores.iou_fg_plus1 == 0.0)
    assert np.all(scores.precision == 1.0) and np.all(scores.recall == 1.0)
    assert scores.ap is None


def test_empty_gt_with_prediction():
    prob = np.zeros((2, 2), np.float32)
    prob[0, 0] = 0.8
    acc = m.SegmentationAccumulator()
    acc.update(prob, np.zeros((2, 2), bool))
    scores = acc.result()
    at = scores.at(0.3)
    assert at["iou_fg"] == 0.0 and at["precision"] == 0.0 and at["recall"] == 1.0
    assert at["binary_iou"] == pytest.approx((0 + 3 / 4) / 2)
    assert scores.at(0.8)["iou_fg"] == 1.0  # 0.8 > 0.8 is false: nothing predicted
    assert scores.ap is None
    assert scores.best_threshold == 0.8  # closest to 0.3 among the perfect thresholds


def test_empty_prediction_with_gt():
    gt = np.array([[1, 0], [0, 0]], bool)
    acc = m.SegmentationAccumulator()
    acc.update(np.zeros((2, 2), np.float32), gt)
    scores = acc.result()
    assert np.all(scores.iou_fg == 0.0)
    assert np.all(scores.precision == 1.0) and np.all(scores.recall == 0.0)
    assert scores.ap == 0.0
    assert scores.at(0.3)["binary_iou"] == pytest.approx((0 + 3 / 4) / 2)


def test_all_foreground():
    acc = m.SegmentationAccumulator()
    acc.update(np.ones((3, 2), np.float32), np.ones((3, 2), bool))
    scores = acc.result()
    at = scores.at(0.3)
    assert at["iou_fg"] == 1.0 and at["binary_iou"] == 1.0  # IoU_BG is 0/0 = 1
    assert (at["tp"], at["tn"]) == (6, 0)
    assert scores.at(1.0)["iou_fg"] == 0.0 and scores.at(1.0)["binary_iou"] == 0.0


def test_best_index_ties_prefer_default_then_lower():
    thresholds = np.array([0.1, 0.2, 0.4, 0.5])
    assert m.best_index(np.array([1.0, 1.0, 1.0, 0.0]), thresholds) in (1, 2)
    assert m.best_index(np.array([1.0, 1.0, 1.0, 0.0]), thresholds) == 1  # 0.2 vs 0.4: lower
    assert m.best_index(np.array([1.0, 0.5, 0.5, 0.9]), thresholds) == 0


def test_bad_arrays_raise():
    with pytest.raises(ValueError, match="shape"):
        m.confusion_counts(np.zeros((2, 2)), np.zeros((2, 3), bool))
    with pytest.raises(ValueError, match="within"):
        m.confusion_counts(np.full((2, 2), np.nan), np.zeros((2, 2), bool))
    with pytest.raises(ValueError, match="no image"):
        m.SegmentationAccumulator().result()
    with pytest.raises(ValueError, match="increasing"):
        m.SegmentationAccumulator(thresholds=np.array([0.5, 0.2]))


# -------------------------------------------------------------------------------------------
# Segmentation: random data against the loop implementation
# -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_segmentation_matches_reference_on_random_data(seed):
    rng = np.random.default_rng(seed)
    data = []
    for i in range(4):
        h, w = rng.integers(3, 8, size=2)
        # 8-bit levels (as read from PNGs) plus exact grid values to exercise ties at p == t
        prob = rng.integers(0, 256, size=(h, w)) / 255.0
        prob[rng.random((h, w)) < 0.2] = rng.choice([0.0, 0.3, 0.5, 1.0])
        gt = rng.random((h, w)) < (0.0 if i == 3 else 0.4)  # one image with empty GT
        data.append((prob.astype(np.float32), gt, "ab"[i % 2]))
    acc = m.SegmentationAccumulator()
    for prob, gt, cls in data:
        acc.update(prob, gt, cls)
    scores = acc.result()

    thresholds = [k / 100 for k in range(101)]
    counts = ref_counts([(p, g) for p, g, _ in data], thresholds)
    np.testing.assert_array_equal(scores.counts.tp, [c[0] for c in counts])
    np.testing.assert_array_equal(scores.counts.fp, [c[1] for c in counts])
    np.testing.assert_array_equal(scores.counts.fn, [c[2] for c in counts])
    np.testing.assert_array_equal(scores.counts.tn, [c[3] for c in counts])
    iou = [ref_div(tp, tp + fp + fn) for tp, fp, fn, _ in counts]
    biou = [
        (ref_div(tp, tp + fp + fn) + ref_div(tn, tn + fp + fn)) / 2 for tp, fp, fn, tn in counts
    ]
    np.testing.assert_allclose(scores.iou_fg, iou)
    np.testing.assert_allclose(scores.binary_iou, biou)
    np.testing.assert_allclose(scores.precision, [ref_div(c[0], c[0] + c[1]) for c in counts])
    np.testing.assert_allclose(scores.recall, [ref_div(c[0], c[0] + c[2]) for c in counts])
    per_class = {
        cls: ref_counts([(p, g) for p, g, c in data if c == cls], thresholds) for cls in "ab"
    }
    miou = [
        sum(ref_div(pc[j][0], pc[j][0] + pc[j][1] + pc[j][2]) for pc in per_class.values()) / 2
        for j in range(len(thresholds))
    ]
    np.testing.assert_allclose(scores.miou, miou)
    assert scores.ap == pytest.approx(ref_ap(counts))
    best = max(range(len(iou)), key=lambda j: (iou[j], -abs(thresholds[j] - 0.3), -j))
    assert scores.best_threshold == thresholds[best]


# -------------------------------------------------------------------------------------------
# Matting
# -------------------------------------------------------------------------------------------


def test_hand_sad_mse_mad():
    pred, gt = np.full((10, 10), 0.5), np.zeros((10, 10))
    assert m.sad(pred, gt) == pytest.approx(50 / 1000)
    assert m.mse(pred, gt) == pytest.approx(0.25)
    assert m.mad(pred, gt) == pytest.approx(0.5)
    gt[0, :4] = 1.0  # 4 pixels now differ by 0.5 the other way: same absolute errors
    assert m.sad(pred, gt) == pytest.approx(0.05)


def test_hand_grad_impulse():
    # An impulse far from the borders: its gradient images are the flipped kernels, whose
    # squared sums are 1 each (unit L2 norm), so Grad = (1 + 1) / 1000.
    pred = np.zeros((11, 11))
    pred[5, 5] = 1.0
    assert m.grad_error(pred, np.zeros((11, 11))) == pytest.approx(0.002, rel=1e-9)
    assert m.grad_error(np.full((6, 6), 0.7), np.full((6, 6), 0.2)) == pytest.approx(0.0)
    assert m.gaussian_derivative_kernel().shape == (9, 9)


def test_hand_conn():
    # Nothing predicted, all foreground in GT: l = 0 everywhere, phi_pred = 1, phi_gt = 0.
    assert m.conn_error(np.zeros((5, 5)), np.ones((5, 5))) == pytest.approx(25 / 1000)
    # 0.5 vs 1: connected up to 0.5, so l = 0.5; d_pred = 0 -> 1, d_gt = 0.5 -> 0.5.
    assert m.conn_error(np.full((4, 4), 0.5), np.ones((4, 4))) == pytest.approx(8 / 1000)
    # Pixel 0 is outside the largest component {2, 3}, so l = 0 there: phi 0.2 vs 0.1.
    pred, gt = np.array([[0.8, 0, 1, 1]]), np.array([[0.9, 0, 1, 1]])
    assert m.conn_error(pred, gt) == pytest.approx(0.1 / 1000)


def test_matting_identical_and_extremes():
    rng = np.random.default_rng(3)
    alpha = rng.random((7, 9))
    assert all(v == pytest.approx(0.0) for v in m.matting_errors(alpha, alpha).values())
    errors = m.matting_errors(np.zeros((4, 4)), np.ones((4, 4)))
    assert errors["sad"] == pytest.approx(0.016)
    assert errors["mse"] == 1.0 and errors["mad"] == 1.0
    assert errors["grad"] == pytest.approx(0.0)  # both flat
    assert errors["conn"] == pytest.approx(0.016)


@pytest.mark.parametrize("seed", [0, 1])
def test_matting_matches_reference_on_random_data(seed):
    rng = np.random.default_rng(seed)
    # Blocky alphas so that components at several thresholds are non-trivial.
    gt = np.kron(rng.random((4, 5)), np.ones((3, 3)))
    pred = np.clip(gt + rng.normal(0, 0.2, gt.shape), 0, 1)
    pred[rng.random(gt.shape) < 0.1] = 0.0
    errors = m.matting_errors(pred, gt)
    n = gt.size
    abs_sum = sum(abs(a - b) for a, b in zip(pred.ravel(), gt.ravel(), strict=True))
    assert errors["sad"] == pytest.approx(abs_sum / 1000)
    assert errors["mad"] == pytest.approx(abs_sum / n)
    assert errors["mse"] == pytest.approx(
        sum((a - b) ** 2 for a, b in zip(pred.ravel(), gt.ravel(), strict=True)) / n
    )
    assert errors["grad"] == pytest.approx(ref_grad(pred, gt) / 1000, rel=1e-9)
    assert errors["conn"] == pytest.approx(ref_conn(pred, gt) / 1000, rel=1e-9, abs=1e-12)


def test_conn_tie_goes_to_first_component():
    # Two components of equal size: the one met first in row-major order is kept.
    gt = np.array([[1, 1, 0, 1, 1]], float)
    pred = np.array([[1, 1, 0, 0.8, 0.8]])
    assert m.conn_error(pred, gt) == pytest.approx(ref_conn(pred, gt) / 1000)


def test_matting_accumulator_means():
    acc = m.MattingAccumulator()
    acc.update(np.zeros((2, 2)), np.zeros((2, 2)))
    acc.update(np.zeros((2, 2)), np.ones((2, 2)))
    result = acc.result()
    assert result["mad"] == pytest.approx(0.5) and result["sad"] == pytest.approx(0.002)
    assert set(result) == set(m.MATTING_KEYS) == set(m.MATTING_CONVENTIONS) - {"average"}
