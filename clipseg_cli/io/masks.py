"""What a mask file means: the one reader of masks, probability maps and alpha mattes.

``clipseg eval`` reads ground truth and predictions with it, ``clipseg train`` its training
masks: one rule for one user-facing fact. numpy and Pillow only (never torch).

Rules
-----
8-bit greyscale: only {0, 255} (or only {0, 1}) -> binary mask, else probability ``v / 255``;
16-bit: ``v / 65535`` (binary when only {0, 65535}); 1-bit: binary; 32-bit float: values in
[0, 1] as they are. RGB/palette images are accepted only when every pixel is grey, images with
transparency never. Where a binary mask is needed (segmentation ground truth, training
targets), foreground is ``value > 0.5`` (:meth:`MaskArray.foreground`). Sizes are never changed.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from clipseg_cli.errors import first_line


class MaskError(Exception):
    """A file is not a usable mask; ``str()`` is a one-line reason."""


@dataclass(frozen=True)
class MaskArray:
    """A mask or matte read from a file: ``values`` float32 ``[H, W]`` in [0, 1]."""

    values: np.ndarray
    binary: bool
    bits: int

    def foreground(self) -> np.ndarray:
        """bool ``[H, W]``: where the mask says "object" (``value > 0.5``)."""
        return self.values > 0.5


def _from_integers(arr: np.ndarray, maxval: int, bits: int) -> MaskArray:
    """Integer ``[H, W]`` -> :class:`MaskArray`; {0, max} and {0, 1} images are binary."""
    present = np.unique(arr)
    if np.all(np.isin(present, (0, maxval))):
        return MaskArray((arr == maxval).astype(np.float32), True, bits)
    if np.all(np.isin(present, (0, 1))):
        # 0/1 label PNGs are common in datasets; read as probability 1/255 they would vanish.
        return MaskArray((arr == 1).astype(np.float32), True, bits)
    return MaskArray((arr.astype(np.float64) / maxval).astype(np.float32), False, bits)


def _grey_from_colour(arr: np.ndarray, mode: str) -> np.ndarray:
    if arr.shape[2] == 4:
        if np.any(arr[:, :, 3] != 255):
            raise MaskError(f"{mode} image with transparency: not a mask (save greyscale)")
        arr = arr[:, :, :3]
    if np.any(arr[:, :, 0] != arr[:, :, 1]) or np.any(arr[:, :, 0] != arr[:, :, 2]):
        raise MaskError(f"{mode} image with coloured pixels: not a mask (save greyscale)")
    return np.ascontiguousarray(arr[:, :, 0])


def read_mask(path: Path | bytes, max_pixels: int | None = None) -> MaskArray:
    """Read a mask, probability map or alpha matte (the rules are in the module docstring)
    from a file or its bytes (an upload); ``max_pixels``: refuse larger images before their
    pixels are decoded.

    Raises:
        MaskError: unreadable file, not an image, or an image that is not a mask.
    """
    try:
        with Image.open(io.BytesIO(path) if isinstance(path, bytes) else path) as im:
            if max_pixels is not None and im.size[0] * im.size[1] > max_pixels:
                raise MaskError(f"too large: {im.size[0]}x{im.size[1]} pixels")
            im.load()
            mode = im.mode
            if mode == "P":
                im = im.convert("RGBA")
            arr = np.asarray(im)
    except FileNotFoundError:
        raise MaskError("file not found") from None
    except IsADirectoryError:
        raise MaskError("is a directory") from None
    except UnidentifiedImageError:
        raise MaskError("not an image (cannot identify image file)") from None
    except Image.DecompressionBombError as error:
        raise MaskError(f"too large: {first_line(error)}") from None
    except (OSError, ValueError, SyntaxError) as error:
        raise MaskError(f"cannot read: {first_line(error)}") from None
    if arr.ndim != 2 and mode not in ("P", "RGB", "RGBA", "LA"):
        raise MaskError(f"mode {mode}: not a mask")
    if mode == "1":
        return MaskArray(arr.astype(np.float32), True, 1)
    if mode == "L":
        return _from_integers(arr, 255, 8)
    if mode in ("P", "RGB", "RGBA"):
        return _from_integers(_grey_from_colour(arr, mode), 255, 8)
    if mode == "LA":
        if np.any(arr[:, :, 1] != 255):
            raise MaskError("LA image with transparency: not a mask (save greyscale)")
        return _from_integers(np.ascontiguousarray(arr[:, :, 0]), 255, 8)
    if mode.startswith("I;16"):
        return _from_integers(arr.astype(np.int64), 65535, 16)
    if mode == "I":
        if arr.min() < 0 or arr.max() > 65535:
            raise MaskError("32-bit integer values outside 0..65535: not a mask")
        return _from_integers(arr.astype(np.int64), 65535, 16)
    if mode == "F":
        if not np.all(np.isfinite(arr)) or arr.min() < 0 or arr.max() > 1:
            raise MaskError("float image with values outside [0, 1]: not a mask")
        values = arr.astype(np.float32)
        return MaskArray(values, bool(np.all(np.isin(values, (0.0, 1.0)))), 32)
    raise MaskError(f"mode {mode}: not a mask")
