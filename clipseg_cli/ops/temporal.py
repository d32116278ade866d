"""Steadiness over time: smoothing a video's probabilities frame to frame, scene cuts, and the
measures of a video's masks (flicker without ground truth; DAVIS's J and F with it).

Arrays in, arrays out; the smoothing state is a value (:class:`SmoothingState`) that the caller
passes from one frame to the next and may save with a finished segment, never a global.

``--smooth``:

* ``none``: each frame on its own;
* ``ema``: ``s_t = w p_t + (1 - w) s_(t-1)``, an exponential moving average of the probability;
* ``flow``: the same average after ``s_(t-1)`` is warped onto frame t by dense optical flow
  (OpenCV's DIS, computed on small grey thumbnails: the flow of a frame costs about a
  millisecond whatever the video's size), so a moving object's past probability moves with it
  and leaves no trail.

Both reset at a scene cut (the thumbnails of two frames differ by more than
:data:`CUT_THRESHOLD` on average): the new scene starts from its own first frame.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import cv2
import numpy as np

from clipseg_cli.specs import DEFAULT_SMOOTH, SMOOTH_MODES

#: The weight of the new frame in the average. Chosen with the clamp by measurement
#: (docs/video.md, "--smooth"): from w 0.3 and clamp 0.3 to these, the flicker of nearly still
#: shapes fell from 0.54x to 0.46x that of ``none``, and J&F rose on still, moderately and fast
#: moving shapes.
DEFAULT_WEIGHT = 0.15
#: The most the past may pull a probability away from the new frame's (before the weight): a
#: pixel keeps at most ``(1 - weight) * clamp`` (0.34) of its past, so one an object left
#: (probability 1 -> 0) or reached falls on the new frame's side of a 0.5 threshold at once.
DEFAULT_CLAMP = 0.4
#: Mean absolute difference of two frames' grey thumbnails (0..1) that counts as a scene cut.
CUT_THRESHOLD = 0.18
#: The longer side of the thumbnails the flow and the cut test see.
THUMBNAIL_SIDE = 80


@dataclass
class SmoothingState:
    """What the next frame needs from the frames before it: the previous frame's grey
    thumbnail (uint8 ``[h, w]``) and each prompt's smoothed probability (float32 ``[H, W]``)
    as the previous frame's outputs were made from it."""

    thumbnail: np.ndarray | None = None
    smoothed: dict[int, np.ndarray] = field(default_factory=dict)

    def arrays(self) -> dict[str, np.ndarray]:
        """The state as named arrays (``np.savez``), see :meth:`from_arrays`."""
        named = {f"p{k}": prob for k, prob in self.smoothed.items()}
        if self.thumbnail is not None:
            named["thumbnail"] = self.thumbnail
        return named

    @classmethod
    def from_arrays(cls, named: dict[str, np.ndarray]) -> SmoothingState:
        smoothed = {
            int(name[1:]): np.asarray(a, np.float32)
            for name, a in named.items()
            if name.startswith("p")
        }
        thumbnail = named.get("thumbnail")
        return cls(None if thumbnail is None else np.asarray(thumbnail, np.uint8), smoothed)


def warmup_frames(
    weight: float = DEFAULT_WEIGHT, clamp: float = DEFAULT_CLAMP, tolerance: float = 0.5 / 65535
) -> int:
    """Frames after which two runs of the same frames started from different states differ by
    less than ``tolerance`` (default: half a level of a 16-bit soft map). Each frame keeps at
    most ``1 - weight`` of a difference in its state (the clamp and the warp never enlarge one),
    and the first frame's state is at most ``(1 - weight) * clamp`` from another's."""
    keep = 1.0 - weight
    if keep <= 0.0:
        return 1
    return max(1, math.ceil(math.log(tolerance / (keep * clamp)) / math.log(keep)))


def thumbnail(rgb: np.ndarray, side: int = THUMBNAIL_SIDE) -> np.ndarray:
    """uint8 grey ``[h, w]`` with the longer side ``side`` (area-averaged)."""
    height, width = rgb.shape[:2]
    scale = side / max(height, width)
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    grey = cv2.cvtColor(np.ascontiguousarray(rgb), cv2.COLOR_RGB2GRAY)
    return cv2.resize(grey, size, interpolation=cv2.INTER_AREA)


def is_cut(previous: np.ndarray, current: np.ndarray, threshold: float = CUT_THRESHOLD) -> bool:
    """Whether two consecutive thumbnails belong to different scenes."""
    if previous.shape != current.shape:
        return True
    diff = cv2.absdiff(previous, current)
    return float(diff.mean()) / 255.0 > threshold


def backward_flow(current: np.ndarray, previous: np.ndarray) -> np.ndarray:
    """float32 ``[h, w, 2]``: for each pixel of ``current`` (a thumbnail), where it was in
    ``previous``."""
    # A fresh DIS object each time: one reused keeps buffers that change its next answer in the
    # last bits, and a resumed video must get the flow an uninterrupted run got.
    engine = cv2.DISOpticalFlow_create(cv2.DISOPTICAL_FLOW_PRESET_ULTRAFAST)
    return engine.calc(current, previous, None)


def warp(prob: np.ndarray, flow: np.ndarray) -> np.ndarray:
    """``prob`` (float32 ``[H, W]``, the previous frame's) moved onto the current frame by
    :func:`backward_flow` of the thumbnails, scaled up to ``[H, W]``."""
    height, width = prob.shape
    fh, fw = flow.shape[:2]
    scaled = cv2.resize(flow, (width, height), interpolation=cv2.INTER_LINEAR)
    cv2.multiply(scaled, (width / fw, height / fh, 0.0, 0.0), dst=scaled)
    # A relative map (OpenCV >= 4.10): no pixel grid to add, a third of the time.
    flags = cv2.INTER_LINEAR | cv2.WARP_RELATIVE_MAP
    return cv2.remap(prob, scaled, None, flags, borderMode=cv2.BORDER_REPLICATE)


@dataclass(frozen=True)
class Smoothing:
    """The ``--smooth`` settings."""

    mode: str = DEFAULT_SMOOTH
    weight: float = DEFAULT_WEIGHT
    cut_threshold: float = CUT_THRESHOLD
    clamp: float = DEFAULT_CLAMP

    def __post_init__(self) -> None:
        if self.mode not in SMOOTH_MODES:
            raise ValueError(f"--smooth {self.mode}: choose from {', '.join(SMOOTH_MODES)}")
        if not 0.0 < self.weight <= 1.0:
            raise ValueError(f"--smooth-weight {self.weight}: must be in (0, 1]")

    def thumbnail(self, rgb: np.ndarray) -> np.ndarray | None:
        """What :meth:`frame` needs of a frame's pixels (None with ``none``). It depends on
        that frame alone, so it may be made before the frames before it are smoothed."""
        return None if self.mode == "none" else thumbnail(rgb)

    def frame(self, state: SmoothingState, current: np.ndarray | None) -> FrameSmoothing:
        """Begin a frame from its :meth:`thumbnail`: whether it starts a new scene, its flow."""
        if self.mode == "none" or current is None:
            return FrameSmoothing(self, None, None, reset=True, previous=state)
        reset = state.thumbnail is None or is_cut(state.thumbnail, current, self.cut_threshold)
        flow = None
        if not reset and self.mode == "flow":
            flow = backward_flow(current, state.thumbnail)
        return FrameSmoothing(self, current, flow, reset, state)


@dataclass
class FrameSmoothing:
    """One frame's smoothing: :meth:`apply` to each prompt's probability, then :meth:`state`
    for the next frame."""

    settings: Smoothing
    current: np.ndarray | None
    flow: np.ndarray | None
    reset: bool
    previous: SmoothingState
    _smoothed: dict[int, np.ndarray] = field(default_factory=dict)

    def apply(self, k: int, prob: np.ndarray) -> np.ndarray:
        """Prompt ``k``'s smoothed probability (float32 ``[H, W]``) for this frame."""
        if self.settings.mode == "none":
            return prob
        before = self.previous.smoothed.get(k)
        if self.reset or before is None or before.shape != prob.shape:
            smoothed = np.asarray(prob, np.float32)
        else:
            if self.flow is not None:
                before = warp(before, self.flow)
            prob = np.asarray(prob, np.float32)
            # s = p + (1 - w)(s_prev - p), the pull of the past clamped to +-clamp: noise (small
            # changes) is averaged away, while a pixel the object left (or reached) follows the
            # new frame at once instead of fading over several frames (no trail, no lag).
            smoothed = before - prob  # the pull, then the result, in place
            np.clip(smoothed, -self.settings.clamp, self.settings.clamp, out=smoothed)
            smoothed *= 1.0 - self.settings.weight
            smoothed += prob
        self._smoothed[k] = smoothed
        return smoothed

    def state(self) -> SmoothingState:
        """The state the next frame starts from."""
        if self.settings.mode == "none":
            return self.previous
        return SmoothingState(self.current, dict(self._smoothed))


# -- measures ---------------------------------------------------------------------------------


@dataclass
class Flicker:
    """Flicker of one prompt over a video, without ground truth: the mean absolute change of
    the probability between consecutive frames, and the mean IoU of consecutive masks (1.0
    where both are empty). Keeps only the previous frame."""

    changes: float = 0.0
    ious: float = 0.0
    pairs: int = 0
    previous_prob: np.ndarray | None = None
    previous_mask: np.ndarray | None = None

    def add(self, prob: np.ndarray, mask: np.ndarray) -> None:
        if self.previous_prob is not None and self.previous_prob.shape == prob.shape:
            self.changes += float(cv2.absdiff(prob, self.previous_prob).mean())
            self.ious += mask_iou(mask, self.previous_mask)
            self.pairs += 1
        self.previous_prob = np.asarray(prob, np.float32)
        self.previous_mask = np.asarray(mask, bool)

    def result(self) -> dict:
        """``{"mean_abs_dp", "mean_iou"}`` (None for a single frame)."""
        if not self.pairs:
            return {"mean_abs_dp": None, "mean_iou": None}
        return {
            "mean_abs_dp": round(self.changes / self.pairs, 6),
            "mean_iou": round(self.ious / self.pairs, 6),
        }


def mask_iou(a: np.ndarray, b: np.ndarray) -> float:
    """IoU of two bool masks; 1.0 when both are empty (DAVIS's J for one frame)."""
    union = np.count_nonzero(a | b)
    return 1.0 if union == 0 else np.count_nonzero(a & b) / union


#: DAVIS's boundary tolerance: a fraction of the image diagonal.
DAVIS_BOUND_TH = 0.008


def boundary_map(mask: np.ndarray) -> np.ndarray:
    """DAVIS's ``seg2bmap`` (same size): pixels whose right, lower or lower-right neighbour
    differs."""
    seg = np.asarray(mask, bool)
    east, south, southeast = (np.zeros_like(seg) for _ in range(3))
    east[:, :-1] = seg[:, 1:]
    south[:-1, :] = seg[1:, :]
    southeast[:-1, :-1] = seg[1:, 1:]
    edges = (seg ^ east) | (seg ^ south) | (seg ^ southeast)
    edges[-1, :] = seg[-1, :] ^ east[-1, :]
    edges[:, -1] = seg[:, -1] ^ south[:, -1]
    edges[-1, -1] = False
    return edges


def _disk(radius: int) -> np.ndarray:
    span = np.arange(-radius, radius + 1)
    return (span[:, None] ** 2 + span[None, :] ** 2 <= radius**2).astype(np.uint8)


def davis_f(pred: np.ndarray, gt: np.ndarray, bound_th: float = DAVIS_BOUND_TH) -> float:
    """DAVIS 2017's boundary F of one frame (``davis2017/metrics.py``, ``f_measure``)."""
    pred, gt = np.asarray(pred, bool), np.asarray(gt, bool)
    radius = bound_th if bound_th >= 1 else math.ceil(bound_th * math.hypot(*gt.shape))
    pred_edge, gt_edge = boundary_map(pred), boundary_map(gt)
    disk = _disk(int(radius))
    pred_near = cv2.dilate(pred_edge.astype(np.uint8), disk).astype(bool)
    gt_near = cv2.dilate(gt_edge.astype(np.uint8), disk).astype(bool)
    n_pred, n_gt = np.count_nonzero(pred_edge), np.count_nonzero(gt_edge)
    if n_pred == 0 and n_gt == 0:
        return 1.0
    if n_pred == 0 or n_gt == 0:
        return 0.0
    precision = np.count_nonzero(pred_edge & gt_near) / n_pred
    recall = np.count_nonzero(gt_edge & pred_near) / n_gt
    return 0.0 if precision + recall == 0 else 2 * precision * recall / (precision + recall)


@dataclass
class SequenceScores:
    """DAVIS's J (region IoU) and F (boundary F) of one sequence, frame by frame."""

    j: list[float] = field(default_factory=list)
    f: list[float] = field(default_factory=list)

    def add(self, pred: np.ndarray, gt: np.ndarray) -> None:
        self.j.append(mask_iou(np.asarray(pred, bool), np.asarray(gt, bool)))
        self.f.append(davis_f(pred, gt))

    def result(self) -> dict:
        """``{"frames", "J", "F", "J&F"}`` (means over the frames)."""
        j = float(np.mean(self.j)) if self.j else 0.0
        f = float(np.mean(self.f)) if self.f else 0.0
        return {
            "frames": len(self.j),
            "J": round(j, 6),
            "F": round(f, 6),
            "J&F": round((j + f) / 2, 6),
        }
