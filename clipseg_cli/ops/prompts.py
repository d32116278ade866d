"""Image prompts and arithmetic on conditional vectors (pure numpy functions).

* :func:`engineer_reference` turns a support image plus its object mask into the image CLIP
  encodes (the paper's best visual prompt engineering, CLIPSeg paper Table 2).
* :func:`average_conditionals`, :func:`mix_conditionals`: several references -> one vector,
  and text/image mixing ``w*text + (1-w)*image`` as in training.
* :func:`apply_negatives`: suppress what negative prompts claim.

Nothing here prints, exits, reads or writes files (the prompt file format is
:mod:`clipseg_cli.io.conditionals`).
"""

from __future__ import annotations

import math

import cv2
import numpy as np

from clipseg_cli.ops.transforms import resize_rgb
from clipseg_cli.specs import IMAGENET_MEAN

# The colour the original implementation darkened towards: it scaled ImageNet-normalised
# pixels by 0.1, i.e. moved them 90% of the way to the ImageNet mean, and padded with
# normalised zeros (the same colour). Pass it as ``background_colour`` to reproduce that.
IMAGENET_MEAN_RGB: tuple[int, int, int] = (
    round(IMAGENET_MEAN[0] * 255),
    round(IMAGENET_MEAN[1] * 255),
    round(IMAGENET_MEAN[2] * 255),
)

# The original blurs with a 15x15 kernel at sigma 3 (radius 7); other sigmas scale with it.
_BLUR_RADIUS_PER_SIGMA = 7 / 3


# ---------------------------------------------------------------------------------------------
# Visual prompt engineering
# ---------------------------------------------------------------------------------------------


def _mask_weights(mask: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """bool / uint8 / float [H, W] mask -> float32 [H, W] object weight in [0, 1].

    uint8 masks are 0..255, except that a uint8 mask whose values are all 0 or 1 is a label
    mask (1 = object), not an almost-transparent alpha.
    """
    if mask.shape != shape:
        raise ValueError(f"mask shape {list(mask.shape)} does not match the image {list(shape)}")
    if mask.dtype == np.bool_:
        return mask.astype(np.float32)
    if mask.dtype == np.uint8:
        scale = 1.0 if mask.max(initial=0) <= 1 else 255.0
        return mask.astype(np.float32) / np.float32(scale)
    if np.issubdtype(mask.dtype, np.floating):
        return np.clip(np.nan_to_num(mask.astype(np.float32)), 0.0, 1.0)
    raise ValueError(f"mask must be bool, uint8 or float, got {mask.dtype}")


def reference_crop_box(mask: np.ndarray, context: float = 0.1) -> tuple[int, int, int, int]:
    """The crop :func:`engineer_reference` takes: ``(top, bottom, left, right)``, end-exclusive.

    Rule: the tight bounding box of ``mask > 0.5`` (rows ``r0..r1-1``, columns ``c0..c1-1``),
    each side moved out by ``floor(context * extent + 0.5)`` pixels, where extent is the box
    height for top/bottom and its width for left/right (so ``context=0.1`` makes the box 20%
    taller and wider), then clamped to the image. The box is not made square here; the crop
    is padded to a square afterwards.

    Args:
        mask: bool / uint8 / float [H, W] (see :func:`engineer_reference`).
        context: margin per side as a fraction of the box size, >= 0.

    Raises:
        ValueError: the mask is empty or ``context`` is negative.
    """
    if not context >= 0:
        raise ValueError(f"context must be >= 0, got {context}")
    if mask.ndim != 2:
        raise ValueError(f"mask must be [H,W], got shape {list(mask.shape)}")
    inside = _mask_weights(mask, mask.shape) > 0.5
    rows = np.flatnonzero(inside.any(axis=1))
    cols = np.flatnonzero(inside.any(axis=0))
    if rows.size == 0:
        raise ValueError("reference mask is empty")
    r0, r1 = int(rows[0]), int(rows[-1]) + 1
    c0, c1 = int(cols[0]), int(cols[-1]) + 1
    # The original (crop_mask in timojl/clipseg) floors each bound, which grows the top/left
    # by ceil(margin) and the bottom/right by floor(margin); rounding the margin keeps the box
    # centred (differs by at most one pixel).
    dy = math.floor(context * (r1 - r0) + 0.5)
    dx = math.floor(context * (c1 - c0) + 0.5)
    height, width = inside.shape
    return max(0, r0 - dy), min(height, r1 + dy), max(0, c0 - dx), min(width, c1 + dx)


def engineer_reference(
    rgb: np.ndarray,
    mask: np.ndarray,
    *,
    context: float = 0.1,
    background: float = 0.1,
    blur_sigma: float = 3.0,
    size: tuple[int, int] | None = (352, 352),
    background_colour: tuple[int, int, int] = (0, 0, 0),
) -> np.ndarray:
    """Support image + object mask -> the image CLIP should encode (paper Table 2, best row).

    Steps (the original's ``crop_blur_highlight352`` preprocessing):

    1. Background treatment on the whole image, in float: ``bg = c + background * (G(rgb) - c)``
       where ``G`` is a Gaussian blur (sigma ``blur_sigma``, kernel radius
       ``round(7/3 * sigma)``: 15x15 at sigma 3, as the original; mirrored borders) and ``c``
       is ``background_colour``. With the default black ``c`` the background keeps 10% of its
       blurred intensity. Blurring and darkening are both linear, so their order does not
       matter; the object's colours do bleed into the blurred background next to it, because
       the whole image is blurred before masking (as in the original).
    2. Blend by the soft mask ``m``: ``out = m * rgb + (1 - m) * bg``; object pixels (``m = 1``)
       are exactly unchanged. One rounding to uint8 at the end.
    3. Crop to :func:`reference_crop_box` (box of ``m > 0.5`` plus ``context`` per side).
    4. Pad to a square, centred (``(long - short) // 2`` before, the rest after), with
       ``background_colour``, so the object keeps its aspect ratio when resized.
    5. Resize to ``size`` (PIL bilinear, as the model input); ``size=None`` returns the padded
       square crop at its own resolution (the Segmenter resizes to 352x352 anyway).

    Deviations from the original, on purpose: it darkened ImageNet-normalised values, i.e.
    towards the ImageNet mean colour and padded with that colour (``background_colour=
    IMAGENET_MEAN_RGB`` reproduces this), and it resized with nearest-neighbour.

    Args:
        rgb: uint8 [H, W, 3] support image.
        mask: [H, W] object mask: bool, uint8 (0..255, or 0/1 labels) or float in [0, 1].
        context: crop margin per side as a fraction of the object box size, >= 0.
        background: factor kept of the background, in [0, 1].
        blur_sigma: Gaussian sigma in pixels (of ``rgb``), >= 0; 0 disables the blur.
        size: ``(height, width)`` of the result, or None.
        background_colour: RGB the background is darkened towards and padded with.

    Returns:
        uint8 [h, w, 3]: ``size`` if given, else the padded square crop.

    Raises:
        ValueError: bad shapes or parameters; ``"reference mask is empty"`` when no pixel of
            ``mask`` exceeds 0.5.
    """
    if rgb.dtype != np.uint8 or rgb.ndim != 3 or rgb.shape[2] != 3:
        raise ValueError(
            f"reference image must be uint8 [H,W,3], got {rgb.dtype} {list(rgb.shape)}"
        )
    if mask.ndim != 2:
        raise ValueError(f"mask must be [H,W], got shape {list(mask.shape)}")
    if not 0.0 <= background <= 1.0:
        raise ValueError(f"background must be in [0, 1], got {background}")
    if not blur_sigma >= 0:
        raise ValueError(f"blur_sigma must be >= 0, got {blur_sigma}")
    if len(background_colour) != 3 or not all(0 <= v <= 255 for v in background_colour):
        raise ValueError(f"background_colour must be 3 values in 0..255, got {background_colour}")
    weights = _mask_weights(mask, rgb.shape[:2])
    top, bottom, left, right = reference_crop_box(weights, context)

    # Only the crop is needed, but its blur must see the pixels around it: work on the crop
    # plus the kernel radius (clamped to the image), which gives the same pixels inside the
    # crop as blurring the whole (possibly huge) image.
    k = round(_BLUR_RADIUS_PER_SIGMA * blur_sigma) if blur_sigma > 0 else 0
    y0, y1 = max(0, top - k), min(rgb.shape[0], bottom + k)
    x0, x1 = max(0, left - k), min(rgb.shape[1], right + k)
    region = rgb[y0:y1, x0:x1].astype(np.float32)
    m = weights[y0:y1, x0:x1, None]
    blurred = cv2.GaussianBlur(region, (2 * k + 1, 2 * k + 1), blur_sigma) if k > 0 else region
    colour = np.asarray(background_colour, np.float32)
    treated = colour + np.float32(background) * (blurred - colour)
    blended = m * region + (1.0 - m) * treated
    out = np.clip(np.rint(blended), 0, 255).astype(np.uint8)
    crop = out[top - y0 : bottom - y0, left - x0 : right - x0]

    h, w = crop.shape[:2]
    side = max(h, w)
    pad_y, pad_x = (side - h) // 2, (side - w) // 2
    square = np.empty((side, side, 3), np.uint8)
    square[:] = np.asarray(background_colour, np.uint8)
    square[pad_y : pad_y + h, pad_x : pad_x + w] = crop
    if size is None:
        return square
    return resize_rgb(square, size)


def reference_mask_from_alpha(alpha: np.ndarray | None) -> np.ndarray | None:
    """The object mask of an RGBA cutout used as a reference.

    Args:
        alpha: uint8 [H, W] (255 = opaque) as in ``DecodedImage.alpha``, or None.

    Returns:
        bool [H, W], ``alpha > 0`` (every visible pixel is object), or None when there is no
        alpha or it is fully opaque (then the image is encoded as it is, without engineering).
        A fully transparent alpha gives an empty mask, which :func:`engineer_reference`
        rejects.
    """
    if alpha is None:
        return None
    if alpha.dtype != np.uint8 or alpha.ndim != 2:
        raise ValueError(f"alpha must be uint8 [H,W], got {alpha.dtype} {list(alpha.shape)}")
    if bool((alpha == 255).all()):
        return None
    return alpha > 0


# ---------------------------------------------------------------------------------------------
# Conditional arithmetic
# ---------------------------------------------------------------------------------------------


def average_conditionals(vectors: np.ndarray) -> np.ndarray:
    """Several references for one class -> one conditional: ``vectors.mean(0)``.

    A plain mean of the unnormalised CLIP embeddings, float32 ``[N, D] -> [D]``. The decoder
    was trained on unnormalised embeddings, so no L2 normalisation before or after.
    """
    vectors = np.asarray(vectors, dtype=np.float32)
    if vectors.ndim != 2 or vectors.shape[0] == 0:
        raise ValueError(f"expected [N,D] conditionals with N >= 1, got {list(vectors.shape)}")
    return vectors.mean(axis=0, dtype=np.float32)


def mix_conditionals(text: np.ndarray, image: np.ndarray, weight: float) -> np.ndarray:
    """``weight * text + (1 - weight) * image``, the mixing CLIPSeg was trained with (float32).

    Args:
        text: [D] or [K, D] text conditionals.
        image: [D] or [K, D] image conditionals (broadcast against ``text``).
        weight: text weight W in [0, 1] (1 = text only, 0 = image only).
    """
    if not 0.0 <= weight <= 1.0:
        raise ValueError(f"mix weight must be in [0, 1], got {weight}")
    text, image = np.asarray(text, np.float32), np.asarray(image, np.float32)
    try:
        np.broadcast_shapes(text.shape, image.shape)
    except ValueError:
        raise ValueError(
            f"text {list(text.shape)} and image {list(image.shape)} conditionals do not match"
        ) from None
    return np.float32(weight) * text + np.float32(1.0 - weight) * image


def apply_negatives(probs: np.ndarray, negative_probs: np.ndarray) -> np.ndarray:
    """Suppress positive probabilities where negative prompts fire.

    Rule, per pixel: ``out[k] = probs[k] * (1 - max_n negative_probs[n])``. A pixel any
    negative prompt is sure of (1.0) drops to 0 for every positive prompt; where no negative
    fires the positives are unchanged. With N = 0 negatives ``probs`` is returned as it is.

    Args:
        probs: [K, H, W] positive probabilities in [0, 1].
        negative_probs: [N, H, W] negative probabilities in [0, 1].

    Returns:
        [K, H, W], the dtype of ``probs``.
    """
    if probs.ndim != 3 or negative_probs.ndim != 3:
        raise ValueError(
            f"expected [K,H,W] and [N,H,W], got {list(probs.shape)} and "
            f"{list(negative_probs.shape)}"
        )
    if tuple(negative_probs.shape[1:]) != tuple(probs.shape[1:]):
        raise ValueError(
            f"negative maps {list(negative_probs.shape[1:])} differ in size from "
            f"{list(probs.shape[1:])}"
        )
    if negative_probs.shape[0] == 0:
        return probs
    strongest = negative_probs.max(axis=0, keepdims=True)
    return (probs * (1 - strongest)).astype(probs.dtype, copy=False)
