"""Pure array functions between decoded images and the model, and back (no files)."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
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


def probabilities_at_size(logits: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Logits ``[K, h, w]`` -> float32 probabilities ``[K, H, W]`` on the same device.

    Sigmoid first, then bilinear upsampling, as a transformers user would write it.
    """
    probs = torch.sigmoid(logits.float())
    if tuple(probs.shape[-2:]) == tuple(size):
        return probs
    return F.interpolate(probs[None], size=size, mode="bilinear", align_corners=False)[0]


def stack_uint8(images: list[np.ndarray]) -> torch.Tensor:
    """Equal-size uint8 ``[h, w, 3]`` arrays -> ``[B, h, w, 3]`` uint8 tensor (CPU)."""
    return torch.from_numpy(np.stack(images))
