"""Pure array functions between decoded images and the model, and back (numpy, no files)."""

from __future__ import annotations

import cv2
import numpy as np
from PIL import Image


def resize_rgb(rgb: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """uint8 ``[H, W, 3]`` -> uint8 ``[h, w, 3]`` for ``size = (h, w)``.

    PIL's bilinear resize (antialiased when shrinking) is what transformers' CLIPSegProcessor
    (ViTImageProcessor, resample=2) does, so the model sees the same pixels as with the
    reference preprocessing.

    Raises:
        ValueError: ``rgb`` is not uint8 [H,W,3] or ``size`` is not positive.
    """
    if rgb.dtype != np.uint8 or rgb.ndim != 3 or rgb.shape[2] != 3:
        raise ValueError(f"expected uint8 [H,W,3], got {rgb.dtype} {list(rgb.shape)}")
    height, width = size
    if height <= 0 or width <= 0:
        raise ValueError(f"size must be positive, got {size}")
    if rgb.shape[:2] == (height, width):
        return np.ascontiguousarray(rgb)
    resized = Image.fromarray(rgb).resize((width, height), Image.BILINEAR)
    return np.asarray(resized)


def sigmoid(logits: np.ndarray) -> np.ndarray:
    """float32 ``1 / (1 + exp(-x))``."""
    return (1.0 / (1.0 + np.exp(-logits, dtype=np.float32))).astype(np.float32, copy=False)


def upsampled(maps: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """float32 ``[K, h, w]`` -> ``[K, H, W]`` for ``size = (H, W)``: bilinear, pixel centres
    aligned (``align_corners=False``, as torch's interpolate and transformers do)."""
    height, width = size
    if maps.shape[-2:] == (height, width):
        return maps
    out = np.empty((maps.shape[0], height, width), np.float32)
    for k in range(maps.shape[0]):
        cv2.resize(maps[k], (width, height), dst=out[k], interpolation=cv2.INTER_LINEAR)
    return out


def probabilities_at_size(logits: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Logits ``[K, h, w]`` -> float32 probabilities ``[K, H, W]``.

    Sigmoid first, then bilinear upsampling, as a transformers user would write it.
    """
    return upsampled(sigmoid(np.asarray(logits, np.float32)), size)
