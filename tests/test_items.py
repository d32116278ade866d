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
