"""Tiles for large images (clipseg_cli.ops.tiles) and the boundary F-score (ops.metrics)."""

from __future__ import annotations

import numpy as np
import pytest

from clipseg_cli.ops import tiles
from clipseg_cli.ops.metrics import BoundaryCounts, boundary_counts


@pytest.mark.parametrize("size", [(768, 1024), (1536, 2048), (3000, 4000), (500, 500), (300, 2000)])
@pytest.mark.parametrize("count", [1, 2, 3, 6])
def test_tiles_are_squares_that_cover_the_image_and_overlap(size, count):
    grid = tiles.tile_grid(size, count)
    height, width = size
    covered = np.zeros(size, np.int32)
    for top, left in grid.boxes:
        assert 0 <= top <= height - grid.side and 0 <= left <= width - grid.side
        covered[top : top + grid.side, left : left + grid.side] += 1
    assert covered.min() >= 1  # every pixel is seen by some tile
    rows = sorted({top for top, _ in grid.boxes})
    if height <= width:  # N tiles along the shorter side, as asked
        assert len(rows) == count
    if count > 1:
        # Neighbours overlap by about a quarter of a tile.
        assert rows[1] - rows[0] <= grid.side * (1 - tiles.OVERLAP) + 1


def test_auto_tiles_only_images_at_least_twice_the_model_input():
    assert tiles.tiles_along_short_side("off", (4000, 6000), 352) == 0
    assert tiles.tiles_along_short_side("auto", (703, 4000), 352) == 0
    assert tiles.tiles_along_short_side("auto", (704, 1000), 352) == 2
    assert tiles.tiles_along_short_side("auto", (3000, 4000), 352) == 4
    assert tiles.tiles_along_short_side("auto", (1536, 2048), 128) == 6
    assert tiles.tiles_along_short_side("5", (100, 100), 352) == 5


def test_stitching_puts_each_tile_where_it_came_from():
    size = (90, 130)
    grid = tiles.tile_grid(size, 2)
    # Each tile reports its own index as a constant logit map at a model size of 8x8.
    tile_logits = np.stack([np.full((8, 8), float(i), np.float32) for i in range(len(grid))])
    stitched = tiles.stitch(tile_logits, grid)
    assert stitched.shape == size
    for i, (top, left) in enumerate(grid.boxes):
        # Where only this tile reaches, the stitched map is exactly its value.
        others = np.zeros(size, bool)
        for j, (t, lft) in enumerate(grid.boxes):
            if j != i:
                others[t : t + grid.side, lft : lft + grid.side] = True
        own = np.zeros(size, bool)
        own[top : top + grid.side, left : left + grid.side] = True
        alone = own & ~others
        if alone.any():
            np.testing.assert_allclose(stitched[alone], float(i), atol=1e-5)
    # A constant everywhere stays that constant.
    np.testing.assert_allclose(tiles.stitch(np.ones_like(tile_logits) * 2.5, grid), 2.5, atol=1e-5)


def test_the_whole_image_and_the_tiles_combine_by_maximum():
    whole = np.array([[5.0, -9.0], [-9.0, -9.0]], np.float32)  # a large object only it sees
    tiled = np.array([[-1.0, 3.0], [-9.0, -9.0]], np.float32)  # a small one only tiles see
    np.testing.assert_array_equal(tiles.combine(whole, tiled), [[5.0, 3.0], [-9.0, -9.0]])


def test_boundary_f_matches_edges_within_the_tolerance():
    truth = np.zeros((40, 40), bool)
    truth[10:30, 10:30] = True
    assert boundary_counts(truth, truth).f_score == 1.0
    shifted = np.roll(truth, 2, axis=1)
    assert boundary_counts(shifted, truth).f_score == 1.0  # 2 px off: within the tolerance
    far = np.roll(truth, 5, axis=1)
    counts = boundary_counts(far, truth)
    assert 0.0 < counts.f_score < 0.8
    # Edge pixels: the 20x20 square's outline is 76 pixels.
    assert counts.gt == 76 and counts.pred == 76
    empty = np.zeros_like(truth)
    assert boundary_counts(empty, empty).f_score == 1.0
    assert boundary_counts(empty, truth).f_score == 0.0
    summed = boundary_counts(truth, truth) + boundary_counts(far, truth)
    assert isinstance(summed, BoundaryCounts) and summed.gt == 152
