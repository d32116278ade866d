"""Tiles for large images: where they lie, and how their logits become one map again.

CLIPSeg sees every image at its input size (352x352; 128x128 for the demo model). A small
object in a large photo shrinks to a few pixels there and vanishes. Tiles give the model a
closer look: square crops of the image, each resized to the input size, run as more rows of the
same batched vision pass as the whole image. Their logits are stitched back at the image's size
with weights that fall off towards each tile's border (a tile knows least about what its edge
cuts), and combined with the whole-image pass by a per-pixel maximum in logit space: each pass
keeps what it can resolve, the whole image the large objects and what needs context, the tiles
the small ones. A product with the whole image's probability, or an average with it, would
erase exactly the objects the whole image cannot see (measured in the README, "Masks as sharp
as the photo").

Pure numpy and OpenCV: no files, no torch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import cv2
import numpy as np

#: Share of a tile's side that it overlaps its neighbour with.
OVERLAP = 0.25
#: ``auto`` aims at tiles of this many model inputs per side (objects then shrink at most 2x
#: more than in a photo of the model's own size).
AUTO_TILE_INPUTS = 2


def tiles_along_short_side(setting: str, size: tuple[int, int], input_size: int) -> int:
    """How many tiles span the shorter side of an image of ``size = (H, W)``; 0 for none.

    ``setting`` is ``--tiles``: ``off``, ``auto`` or a number (as text or int). ``auto`` tiles
    an image whose shorter side is at least twice the model's input size, with tiles of about
    :data:`AUTO_TILE_INPUTS` input sizes per side (at least 2 along the shorter side); a number
    is taken as it is.
    """
    if setting == "off":
        return 0
    if setting == "auto":
        short = min(size)
        if short < 2 * input_size:
            return 0
        return max(2, round(short / (AUTO_TILE_INPUTS * input_size)))
    return int(setting)


@dataclass(frozen=True)
class TileGrid:
    """Square tiles of one image: ``boxes`` are ``(top, left)`` corners, ``side`` pixels each."""

    size: tuple[int, int]  # (H, W) of the image
    side: int
    boxes: tuple[tuple[int, int], ...]

    def __len__(self) -> int:
        return len(self.boxes)


def _starts(length: int, side: int, step: float) -> list[int]:
    """Tile starts along one axis: the first at 0, the last flush with the end, evenly spread."""
    if length <= side:
        return [0]
    count = math.ceil((length - side) / step) + 1
    return [round(i * (length - side) / (count - 1)) for i in range(count)]


def tile_grid(size: tuple[int, int], along_short_side: int, overlap: float = OVERLAP) -> TileGrid:
    """``along_short_side`` (>= 1) square tiles across the shorter side of ``size = (H, W)``,
    overlapping by ``overlap`` of their side, and as many as it takes along the longer one."""
    if along_short_side < 1:
        raise ValueError(f"need at least one tile along the shorter side, got {along_short_side}")
    height, width = size
    short = min(height, width)
    n = along_short_side
    side = min(short, math.ceil(short / (n - (n - 1) * overlap)))
    step = side * (1 - overlap)
    boxes = tuple(
        (top, left) for top in _starts(height, side, step) for left in _starts(width, side, step)
    )
    return TileGrid(size=(height, width), side=side, boxes=boxes)


def tile_crops(rgb: np.ndarray, grid: TileGrid) -> list[np.ndarray]:
    """The tiles of uint8 ``[H, W, 3]`` ``rgb`` as views, in the grid's order."""
    return [rgb[top : top + grid.side, left : left + grid.side] for top, left in grid.boxes]


def tile_weight(side: int) -> np.ndarray:
    """float32 ``[side, side]``: a separable tent, 1 at the centre, falling towards the border
    (never 0, so every pixel is covered by some weight)."""
    ramp = 1.0 - np.abs(np.linspace(-1.0, 1.0, side, dtype=np.float32))
    ramp = np.maximum(ramp, np.float32(1e-3))
    return np.outer(ramp, ramp)


def stitch(tile_logits: np.ndarray, grid: TileGrid) -> np.ndarray:
    """One prompt's tile logits ``[T, h, w]`` (model resolution) -> float32 logits ``[H, W]``.

    Each tile's logits are resized to its box (bilinear, half-pixel centres) and averaged with
    :func:`tile_weight`. Only this one full-size map (and its weight sum) is held, whatever T.
    """
    if tile_logits.shape[0] != len(grid):
        raise ValueError(f"{tile_logits.shape[0]} tile maps for a grid of {len(grid)} tiles")
    height, width = grid.size
    total = np.zeros((height, width), np.float32)
    weights = np.zeros((height, width), np.float32)
    weight = tile_weight(grid.side)
    for (top, left), logits in zip(grid.boxes, tile_logits, strict=True):
        resized = cv2.resize(
            np.ascontiguousarray(logits, np.float32),
            (grid.side, grid.side),
            interpolation=cv2.INTER_LINEAR,
        )
        window = (slice(top, top + grid.side), slice(left, left + grid.side))
        total[window] += resized * weight
        weights[window] += weight
    return total / weights


def combine(whole: np.ndarray, tiled: np.ndarray) -> np.ndarray:
    """The whole image's logits and the stitched tiles', both ``[H, W]``: their per-pixel
    maximum (see the module docstring for why not a product or an average)."""
    return np.maximum(whole, tiled)
