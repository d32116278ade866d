"""Mask shaping: what users do to a mask before using it (grow or shrink it, fill its holes, drop
specks, keep everything but the object), applied once, as pure array functions. OpenCV does the
morphology and the connected components; nothing here shifts a mask (elliptical, centred
structuring elements, a centred blur).
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

from clipseg_cli.errors import InputError
from clipseg_cli.specs import DEFAULT_MIN_AREA_FRACTION


def default_min_area(size: tuple[int, int]) -> int:
    """``--min-area`` by default in an image of ``size = (H, W)``, in pixels."""
    return round(DEFAULT_MIN_AREA_FRACTION * size[0] * size[1])


@dataclass(frozen=True)
class MaskShaping:
    """The shaping options of a run (``--grow``, ``--fill-holes``, ``--min-area``,
    ``--invert``, ``--feather``)."""

    grow: int = 0  # pixels; negative shrinks
    fill_holes: bool = False
    min_area: int | None = None  # pixels; None: DEFAULT_MIN_AREA_FRACTION of the image
    invert: bool = False
    feather: int = 0  # pixels of soft edge, for soft and cutout

    def min_area_for(self, size: tuple[int, int]) -> int:
        """The smallest region kept in an image of ``size = (H, W)``, in pixels."""
        return self.min_area if self.min_area is not None else default_min_area(size)

    @property
    def changes_the_mask(self) -> bool:
        """Whether the shaped mask may differ from ``prob > threshold`` beyond speck removal."""
        return bool(self.grow or self.fill_holes or self.invert)


def _disc(radius: int) -> np.ndarray:
    return cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * radius + 1, 2 * radius + 1))


def fill_holes(mask: np.ndarray) -> np.ndarray:
    """bool ``[H, W]``: ``mask`` with every hole (background not connected to the image's
    border) filled."""
    padded = np.pad(mask.astype(np.uint8), 1)
    outside = padded.copy()
    flood = np.zeros((padded.shape[0] + 2, padded.shape[1] + 2), np.uint8)
    cv2.floodFill(outside, flood, (0, 0), 1)  # everything reachable from the border
    holes = outside == 0
    return (padded.astype(bool) | holes)[1:-1, 1:-1]


def grow(mask: np.ndarray, pixels: int) -> np.ndarray:
    """bool ``[H, W]``: ``mask`` dilated (``pixels > 0``) or eroded (``< 0``) by a disc of that
    radius; outside the image counts as background."""
    if pixels == 0:
        return mask
    disc = _disc(abs(pixels))
    as_bytes = mask.astype(np.uint8)
    if pixels > 0:
        return cv2.dilate(as_bytes, disc, borderType=cv2.BORDER_CONSTANT, borderValue=0) > 0
    return cv2.erode(as_bytes, disc, borderType=cv2.BORDER_CONSTANT, borderValue=0) > 0


def drop_small_regions(mask: np.ndarray, min_area: int) -> tuple[np.ndarray, int]:
    """bool ``[H, W]``: ``mask`` without its 8-connected regions of fewer than ``min_area``
    pixels, and how many regions were dropped."""
    if min_area <= 1 or not mask.any():
        return mask, 0
    # Areas by counting labels: OpenCV's own statistics (boxes, centroids) cost 8x the labelling.
    _count, labels = cv2.connectedComponents(mask.astype(np.uint8), connectivity=8)
    keep = np.bincount(labels.ravel()) >= min_area
    if keep[1:].all():
        return mask.astype(bool, copy=False), 0  # nothing to drop: skip a full-size lookup
    keep[0] = False  # the background
    return keep[labels], int((~keep[1:]).sum())


def shape_mask(mask: np.ndarray, shaping: MaskShaping) -> tuple[np.ndarray, int]:
    """The mask every output uses: holes filled, grown or shrunk, inverted, then regions below
    the minimum area dropped; and how
    many regions the minimum area dropped.

    Raises:
        InputError: ``--grow`` is larger than the image (it would cover or erase everything).
    """
    height, width = mask.shape
    if abs(shaping.grow) > max(height, width):
        raise InputError(
            f"--grow {shaping.grow} is larger than the image ({width}x{height}); grow by at most "
            f"{max(height, width)} px"
        )
    shaped = fill_holes(mask) if shaping.fill_holes else mask
    shaped = grow(shaped, shaping.grow)
    if shaping.invert:
        shaped = ~shaped
    return drop_small_regions(shaped, shaping.min_area_for(mask.shape))


def feathered(mask: np.ndarray, pixels: int) -> np.ndarray:
    """float32 ``[H, W]`` in [0, 1]: the binary ``mask`` with a soft edge about ``pixels`` wide
    on either side (a Gaussian of sigma ``pixels / 2``, centred on the edge)."""
    alpha = mask.astype(np.float32)
    if pixels <= 0:
        return alpha
    return np.clip(cv2.GaussianBlur(alpha, (0, 0), sigmaX=pixels / 2), 0.0, 1.0)
