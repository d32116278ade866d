"""Per-item helpers that every engine shares: lazy full-size probabilities and the label map."""

from __future__ import annotations

import numpy as np
import torch

from clipseg_cli.run.items import LabelMap, Prediction


def test_label_map_is_the_first_argmax_where_the_best_passes():
    rng = np.random.default_rng(0)
    probs = rng.random((4, 9, 7)).astype(np.float32)
    probs[:, 0, :] = 0.1
    probs[2, 0, :] = probs[0, 0, :] = 0.95  # a tie on row 0: the earlier prompt wins
    labels = LabelMap((9, 7))
    for k, prob in enumerate(probs):
        labels.add(k, prob)
    expected = np.where(probs.max(0) > 0.6, probs.argmax(0) + 1, 0)
    np.testing.assert_array_equal(labels.labels(0.6), expected)
    assert (labels.labels(0.6)[0] == 1).all()


def test_prediction_upsamples_one_prompt_and_applies_negatives():
    """Same numbers as upsampling every map at once, as a transformers user would."""
    rng = np.random.default_rng(1)
    logits = rng.normal(size=(3, 8, 8)).astype(np.float32)  # 2 prompts, 1 negative
    prediction = Prediction(logits, positives=2, size=(20, 30))
    full = torch.nn.functional.interpolate(
        torch.sigmoid(torch.from_numpy(logits))[None], size=(20, 30), mode="bilinear"
    )[0].numpy()
    for k in range(2):
        np.testing.assert_allclose(
            prediction.probabilities(k), full[k] * (1 - full[2]), rtol=0, atol=1e-6
        )
    np.testing.assert_array_equal(prediction.logits, logits[:2])
    without_negative = Prediction(logits[:2], positives=2, size=(20, 30))
    np.testing.assert_allclose(without_negative.probabilities(1), full[1], rtol=0, atol=1e-6)


def test_row_batcher_fills_every_batch_and_returns_images_in_order():
    """Tiles are more rows: an image's rows may span model batches, every batch but the last
    is full, and each image comes back once all its rows are, with its own logits."""
    from types import SimpleNamespace

    from clipseg_cli.run.items import RowBatcher

    def prepared(name: str, rows: int):
        image = SimpleNamespace(rgb=np.zeros((10, 20, 3), np.uint8))
        grid = SimpleNamespace() if rows > 1 else None
        inputs = [np.full((4, 4, 3), 10 * int(name[1:]) + r, np.uint8) for r in range(rows)]
        return SimpleNamespace(name=name, image=image, model_inputs=inputs, grid=grid)

    images = [prepared("i1", 1), prepared("i2", 4), prepared("i3", 1), prepared("i4", 3)]
    batcher = RowBatcher(size=3, positives=1)
    for image in images:
        batcher.add(image)
    sizes, done = [], []
    while len(batcher):
        rows = batcher.next_rows()
        sizes.append(len(rows))
        # The "model": each row's logits are its pixel value, for 1 prompt at 2x2.
        logits = np.stack([np.full((1, 2, 2), p.model_inputs[i][0, 0, 0], np.float32)
                           for p, i in rows])  # fmt: skip
        done += batcher.accept(rows, logits)
    assert sizes == [3, 3, 3]
    assert [p.name for p, _ in done] == ["i1", "i2", "i3", "i4"]
    for p, prediction in done:
        assert prediction.size == (10, 20)
        assert prediction.low_res_logits[0, 0, 0] == p.model_inputs[0][0, 0, 0]
        if len(p.model_inputs) > 1:
            tiles = prediction.tile_logits[:, 0, 0, 0]
            np.testing.assert_array_equal(tiles, [m[0, 0, 0] for m in p.model_inputs[1:]])
        else:
            assert prediction.tile_logits is None


def test_tiled_prediction_combines_in_logit_space_and_applies_every_negative():
    import cv2

    from clipseg_cli.ops import tiles

    rng = np.random.default_rng(4)
    size = (60, 80)
    grid = tiles.tile_grid(size, 2)
    whole = rng.normal(size=(4, 8, 8)).astype(np.float32)  # 2 prompts, then 2 negatives
    tiled = rng.normal(size=(len(grid), 4, 8, 8)).astype(np.float32)
    prediction = Prediction(whole, positives=2, size=size, tile_logits=tiled, grid=grid)

    def combined(index: int) -> np.ndarray:
        up = cv2.resize(whole[index], (80, 60), interpolation=cv2.INTER_LINEAR)
        return np.maximum(up, tiles.stitch(tiled[:, index], grid))

    sigmoid = lambda x: 1 / (1 + np.exp(-x))  # noqa: E731
    negative = np.maximum(sigmoid(combined(2)), sigmoid(combined(3)))
    for k in range(2):
        expected = sigmoid(combined(k)) * (1 - negative)
        np.testing.assert_allclose(prediction.probabilities(k), expected, rtol=0, atol=1e-6)
