"""Tests for clipseg_cli.ops.transforms: the model's input resize."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from clipseg_cli.ops.transforms import resize_rgb


def test_resize_rgb_matches_pil_bilinear() -> None:
    rgb = np.random.default_rng(2).integers(0, 255, (37, 53, 3), dtype=np.uint8)
    out = resize_rgb(rgb, (20, 30))
    assert out.shape == (20, 30, 3) and out.dtype == np.uint8
    expected = np.asarray(Image.fromarray(rgb).resize((30, 20), Image.Resampling.BILINEAR))
    np.testing.assert_array_equal(out, expected)
    assert resize_rgb(rgb, (352, 352)).shape == (352, 352, 3)


def test_resize_rgb_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="uint8"):
        resize_rgb(np.zeros((4, 4, 3), np.float32), (2, 2))
    with pytest.raises(ValueError, match="positive"):
        resize_rgb(np.zeros((4, 4, 3), np.uint8), (0, 4))
