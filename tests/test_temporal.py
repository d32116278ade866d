"""clipseg_cli.ops.temporal: smoothing over time (EMA, flow-warped EMA, scene cuts, state as a
value), flicker and DAVIS's J and F."""

from __future__ import annotations

import numpy as np
import pytest

from clipseg_cli.ops import temporal
from clipseg_cli.ops.shapes import Mover, moving_frames


def _run(smoothing: temporal.Smoothing, frames, probs) -> list[np.ndarray]:
    state = temporal.SmoothingState()
    out = []
    for rgb, prob in zip(frames, probs, strict=True):
        step = smoothing.frame(state, smoothing.thumbnail(rgb))
        out.append(step.apply(0, prob))
        state = step.state()
    return out


def _scene(count: int, speed: float):
    mover = Mover("red circle", 0.2, (0.25, 0.5), (speed, 0.0))
    frames, masks = [], []
    for rgb, truth in moving_frames(count, (96, 160), (mover,), seed=5):
        frames.append(rgb)
        masks.append(truth["red circle"])
    return frames, masks


def _noisy(masks, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [
        np.clip(m * 0.8 + 0.1 + rng.normal(0, 0.15, m.shape), 0, 1).astype(np.float32)
        for m in masks
    ]


def _flicker(probs) -> float:
    meter = temporal.Flicker()
    for p in probs:
        meter.add(p, p > 0.5)
    return meter.result()["mean_abs_dp"]


def test_none_passes_probabilities_through() -> None:
    frames, masks = _scene(4, 3.0)
    probs = _noisy(masks)
    out = _run(temporal.Smoothing("none"), frames, probs)
    assert all(a is b for a, b in zip(out, probs, strict=True))


@pytest.mark.parametrize("mode", ["ema", "flow"])
def test_smoothing_halves_the_flicker_of_noise(mode: str) -> None:
    frames, masks = _scene(20, 0.0)  # a still object: all change is noise
    probs = _noisy(masks)
    smoothed = _run(temporal.Smoothing(mode), frames, probs)
    assert _flicker(smoothed) < 0.5 * _flicker(probs)


def test_flow_leaves_no_trail_behind_a_fast_mover() -> None:
    frames, masks = _scene(12, 8.0)
    probs = [m.astype(np.float32) for m in masks]  # a perfect, steady model

    def trail_iou(settings: temporal.Smoothing) -> float:
        out = _run(settings, frames, probs)
        return np.mean([temporal.mask_iou(o > 0.5, m) for o, m in zip(out, masks, strict=True)])

    assert trail_iou(temporal.Smoothing("flow")) > 0.98
    # Without the clamp, the warp alone is what keeps the average on the object.
    unclamped_flow = trail_iou(temporal.Smoothing("flow", clamp=1.0))
    assert unclamped_flow > trail_iou(temporal.Smoothing("ema", clamp=1.0)) + 0.1


def test_a_pixel_an_object_leaves_or_reaches_crosses_the_threshold_at_once() -> None:
    """The defaults keep at most (1 - w) * clamp of the past: a pixel whose probability jumps
    from 1 to 0 (the object left) or 0 to 1 (it arrived) is on the new side of 0.5 in that
    very frame, however long the past before it."""
    frames, masks = _scene(12, 0.0)
    shape = masks[0].shape
    ones, zeros = np.ones(shape, np.float32), np.zeros(shape, np.float32)
    for before, after in ((ones, zeros), (zeros, ones)):
        out = _run(temporal.Smoothing("ema"), frames, [before] * 11 + [after])
        assert np.all((out[-1] > 0.5) == (after > 0.5))
        # ... and it is smoothing: the past still pulls.
        assert 0.0 < float(np.abs(out[-1] - after).max()) < 0.5


def test_warm_up_frames_bring_two_states_within_half_a_16_bit_level() -> None:
    """A split part starts from its own first warm-up frame; after :func:`temporal.warmup_frames`
    frames its first frame is within half a 16-bit level of the unsplit run's, whatever state
    that run had reached."""
    frames, masks = _scene(4, 0.0)
    probs = _noisy(masks)
    count = temporal.warmup_frames()
    settings = temporal.Smoothing("ema")
    start = temporal.SmoothingState()  # the part: no past
    other = temporal.SmoothingState(temporal.thumbnail(frames[0]), {0: 1.0 - probs[1]})
    # The warm-up frames, then the part's first: the same frame again and again is the worst
    # case, the unsplit run's past pulling as hard as the clamp lets it.
    for _ in range(count + 1):
        a, b = settings.frame(start, frames[0]), settings.frame(other, frames[0])
        a.apply(0, probs[0]), b.apply(0, probs[0])
        start, other = a.state(), b.state()
    assert float(np.abs(start.smoothed[0] - other.smoothed[0]).max()) <= 0.5 / 65535


def test_a_scene_cut_resets_the_average() -> None:
    frames, masks = _scene(3, 0.0)
    other = np.full_like(frames[0], 250)  # a new scene: a white frame
    probs = [m.astype(np.float32) for m in masks] + [np.zeros(masks[0].shape, np.float32)]
    out = _run(temporal.Smoothing("ema"), [*frames, other], probs)
    assert np.array_equal(out[-1], probs[-1])
    assert not temporal.is_cut(frames[0], frames[0])


def test_state_survives_arrays_round_trip() -> None:
    frames, masks = _scene(6, 4.0)
    probs = _noisy(masks)
    smoothing = temporal.Smoothing("flow")
    whole = _run(smoothing, frames, probs)
    state = temporal.SmoothingState()
    for rgb, prob in zip(frames[:3], probs[:3], strict=True):
        step = smoothing.frame(state, smoothing.thumbnail(rgb))
        step.apply(0, prob)
        state = step.state()
    state = temporal.SmoothingState.from_arrays(dict(state.arrays()))
    for rgb, prob, expected in zip(frames[3:], probs[3:], whole[3:], strict=True):
        step = smoothing.frame(state, smoothing.thumbnail(rgb))
        assert np.array_equal(step.apply(0, prob), expected)
        state = step.state()


def test_settings_are_checked() -> None:
    with pytest.raises(ValueError, match="--smooth wobble"):
        temporal.Smoothing("wobble")


def test_flicker_of_a_steady_and_a_blinking_mask() -> None:
    steady, blinking = temporal.Flicker(), temporal.Flicker()
    on, off = np.ones((4, 4), np.float32), np.zeros((4, 4), np.float32)
    for index in range(4):
        steady.add(on, on > 0.5)
        blink = on if index % 2 else off
        blinking.add(blink, blink > 0.5)
    assert steady.result() == {"mean_abs_dp": 0.0, "mean_iou": 1.0}
    assert blinking.result() == {"mean_abs_dp": 1.0, "mean_iou": 0.0}
    assert temporal.Flicker().result()["mean_abs_dp"] is None


def test_davis_j_and_f() -> None:
    gt = np.zeros((100, 100), bool)
    gt[20:60, 20:60] = True
    assert temporal.davis_f(gt, gt) == 1.0
    assert temporal.davis_f(np.zeros_like(gt), np.zeros_like(gt)) == 1.0
    assert temporal.davis_f(np.zeros_like(gt), gt) == 0.0
    # The tolerance is ceil(0.008 * diagonal) = 2 pixels: a 2-pixel shift still matches, 5 not.
    near = np.roll(gt, 2, axis=1)
    far = np.roll(gt, 5, axis=1)
    assert temporal.davis_f(near, gt) == 1.0
    assert temporal.davis_f(far, gt) < 0.6
    scores = temporal.SequenceScores()
    scores.add(gt, gt)
    scores.add(far, gt)
    result = scores.result()
    assert result["frames"] == 2
    assert result["J"] == pytest.approx((1.0 + temporal.mask_iou(far, gt)) / 2, abs=1e-6)
    assert result["J&F"] == pytest.approx((result["J"] + result["F"]) / 2, abs=1e-6)


def test_boundary_map_is_davis_seg2bmap() -> None:
    mask = np.zeros((5, 5), bool)
    mask[1:3, 1:3] = True
    edges = temporal.boundary_map(mask)
    # seg2bmap marks pixels whose right, lower or lower-right neighbour differs.
    expected = np.zeros((5, 5), bool)
    expected[0, 0] = False
    expected[1, 2] = expected[2, 1] = expected[2, 2] = True
    expected[0:1, 0:1] = False
    assert edges[1:3, 1:3].tolist() == [[False, True], [True, True]]
    assert edges[0, 0]  # its lower-right neighbour is in the mask
