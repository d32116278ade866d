"""What every image backend is: ``logits(pixels, conditionals)``, numpy in, numpy out; and the
input checks they share (numpy only)."""

from __future__ import annotations

from typing import Protocol

import numpy as np

from clipseg_cli.errors import BackendError


class ImageBackend(Protocol):
    """The image side of CLIPSeg: vision blocks up to the decoder's deepest layer + decoder."""

    #: ``torch`` or ``onnx``.
    name: str
    #: The model's square input size S.
    input_size: int

    def logits(self, pixels: np.ndarray, conditionals: np.ndarray) -> np.ndarray:
        """uint8 ``[B, S, S, 3]`` images at the model's input size (as decoded, RGB) and
        ``[K, D]`` conditional vectors -> float32 logits ``[B, K, S, S]`` (before sigmoid)."""
        ...


def check_inputs(
    pixels: np.ndarray, conditionals: np.ndarray, input_size: int, embed_dim: int | None
) -> tuple[np.ndarray, np.ndarray]:
    """Validate and normalise a backend's inputs: C-contiguous uint8 pixels and float32
    conditionals.

    Raises:
        ValueError: wrong dtype or shape (one line saying which).
    """
    pixels = np.asarray(pixels)
    if pixels.dtype != np.uint8 or pixels.ndim != 4 or pixels.shape[3] != 3:
        raise ValueError(
            f"pixels: expected uint8 [B, H, W, 3], got {pixels.dtype} {list(pixels.shape)}"
        )
    if pixels.shape[1:3] != (input_size, input_size):
        raise ValueError(
            f"pixels: expected images at the model's input size {input_size}x{input_size}, got "
            f"{pixels.shape[1]}x{pixels.shape[2]} (resize them first)"
        )
    conditionals = np.asarray(conditionals)
    if conditionals.ndim != 2 or not np.issubdtype(conditionals.dtype, np.floating):
        raise ValueError(
            f"conditionals: expected float [K, D], got {conditionals.dtype} "
            f"{list(conditionals.shape)}"
        )
    if embed_dim is not None and conditionals.shape[1] != embed_dim:
        raise ValueError(f"conditionals: expected D = {embed_dim}, got {conditionals.shape[1]}")
    return (
        np.ascontiguousarray(pixels),
        np.ascontiguousarray(conditionals, dtype=np.float32),
    )


def empty_logits(batch: int, prompts: int, input_size: int) -> np.ndarray:
    """The result for no images or no prompts."""
    return np.zeros((batch, prompts, input_size, input_size), np.float32)


__all__ = ["BackendError", "ImageBackend", "check_inputs", "empty_logits"]
