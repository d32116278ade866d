"""Putting an object over a background (``clipseg matte --save composite``): pure array
functions, no files."""

from __future__ import annotations

import cv2
import numpy as np
from PIL import ImageColor

from clipseg_cli.ops.transforms import resize_rgb


def parse_colour(text: str) -> tuple[int, int, int] | None:
    """``white``/``black``/``green``..., ``#rrggbb`` or ``r,g,b`` -> RGB; None if not a colour."""
    if "," in text:
        parts = text.split(",")
        if len(parts) == 3 and all(p.strip().isdigit() and int(p) <= 255 for p in parts):
            return tuple(int(p) for p in parts)  # type: ignore[return-value]
        return None
    try:
        return ImageColor.getrgb(text)[:3]
    except ValueError:
        return None


def blurred(rgb: np.ndarray) -> np.ndarray:
    """uint8 ``[H, W, 3]``: the image itself, heavily blurred (sigma 1/40 of its longer side)."""
    height, width = rgb.shape[:2]
    return cv2.GaussianBlur(rgb, (0, 0), sigmaX=max(height, width) / 40)


def plain(colour: tuple[int, int, int], size: tuple[int, int]) -> np.ndarray:
    """uint8 ``[*size, 3]`` of one colour (a read-only view: no memory per pixel)."""
    return np.broadcast_to(np.asarray(colour, np.uint8), (*size, 3))


def cover(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """``image`` uint8 ``[h, w, 3]`` scaled to cover ``size = (H, W)`` and cropped to it,
    centred (CSS ``background-size: cover``)."""
    height, width = size
    scale = max(height / image.shape[0], width / image.shape[1])
    scaled = (max(height, round(image.shape[0] * scale)), max(width, round(image.shape[1] * scale)))
    resized = resize_rgb(image, scaled)
    top, left = (scaled[0] - height) // 2, (scaled[1] - width) // 2
    return resized[top : top + height, left : left + width]


def composite(rgb: np.ndarray, alpha: np.ndarray, background: np.ndarray) -> np.ndarray:
    """``rgb * alpha + background * (1 - alpha)``, uint8 ``[H, W, 3]``; ``alpha`` float
    ``[H, W]`` in [0, 1]."""
    blend = alpha[..., None]
    composed = rgb * blend + background * (1.0 - blend)
    return np.clip(np.rint(composed), 0, 255).astype(np.uint8)
