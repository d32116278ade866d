"""Tests for clipseg_cli.ops.prompts (visual prompt engineering, conditional arithmetic)
and clipseg_cli.io.conditionals (the prompt file)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from clipseg_cli import __version__
from clipseg_cli.io.conditionals import load_conditionals, save_conditionals
from clipseg_cli.ops.prompts import (
    IMAGENET_MEAN_RGB,
    apply_negatives,
    average_conditionals,
    engineer_reference,
    mix_conditionals,
    reference_crop_box,
    reference_mask_from_alpha,
)
from clipseg_cli.ops.transforms import resize_rgb

# A 200x300 image: constant background, a textured 40x60 rectangle (rows 40..79, columns
# 100..159) as the object.
BG = (200, 120, 47)
TOP, BOTTOM, LEFT, RIGHT = 40, 80, 100, 160


def rectangle_scene() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    rgb = np.empty((200, 300, 3), np.uint8)
    rgb[:] = BG
    rgb[TOP:BOTTOM, LEFT:RIGHT] = rng.integers(0, 256, (BOTTOM - TOP, RIGHT - LEFT, 3))
    mask = np.zeros((200, 300), bool)
    mask[TOP:BOTTOM, LEFT:RIGHT] = True
    return rgb, mask


# ---------------------------------------------------------------------------------------------
# engineer_reference
# ---------------------------------------------------------------------------------------------


def test_crop_box_is_the_object_box_grown_by_context_per_side() -> None:
    _, mask = rectangle_scene()
    # Height 40, width 60: 10% per side is 4 rows and 6 columns.
    assert reference_crop_box(mask, 0.1) == (36, 84, 94, 166)
    assert reference_crop_box(mask, 0.0) == (TOP, BOTTOM, LEFT, RIGHT)
    # 0.25 * 40 = 10 rows; 0.25 * 60 = 15 columns.
    assert reference_crop_box(mask, 0.25) == (30, 90, 85, 175)


def test_crop_box_is_clamped_at_the_image_border() -> None:
    mask = np.zeros((50, 60), np.float32)
    mask[0:10, 45:60] = 0.9
    # 1 row / 2 columns of context (0.1 * 10 = 1, 0.1 * 15 = 1.5 -> 2), clamped to the image.
    assert reference_crop_box(mask, 0.1) == (0, 11, 43, 60)


def test_soft_mask_box_uses_the_half_threshold() -> None:
    mask = np.zeros((20, 20), np.float32)
    mask[5:10, 5:10] = 0.6
    mask[0:3, 0:20] = 0.5  # not > 0.5: outside the box
    assert reference_crop_box(mask, 0.0) == (5, 10, 5, 10)


def test_engineered_reference_crops_and_pads_keeping_the_object() -> None:
    rgb, mask = rectangle_scene()
    out = engineer_reference(rgb, mask, size=None)

    # The crop (36..84) x (94..166) is 48 x 72, padded to 72 x 72: 12 rows above, 12 below.
    assert out.shape == (72, 72, 3)
    assert np.all(out[:12] == 0) and np.all(out[60:] == 0)
    crop = out[12:60]
    np.testing.assert_array_equal(crop[4:44, 6:66], rgb[TOP:BOTTOM, LEFT:RIGHT])


def test_engineered_background_is_blurred_and_darkened_to_10_percent() -> None:
    rgb, mask = rectangle_scene()
    # context 0.5: 20 rows / 30 columns per side -> crop (20..100) x (70..190), 80 x 120,
    # padded with 20 rows above and below; the object sits at crop rows 20..60, cols 30..90.
    out = engineer_reference(rgb, mask, context=0.5, size=None)
    assert out.shape == (120, 120, 3)
    crop = out[20:100]
    np.testing.assert_array_equal(crop[20:60, 30:90], rgb[TOP:BOTTOM, LEFT:RIGHT])

    # Background farther than the blur kernel (radius 7) from the object is the flat
    # background at 10% intensity: round(0.1 * (200, 120, 47)) = (20, 12, 5).
    far = np.ones(crop.shape[:2], bool)
    far[20 - 7 : 60 + 7, 30 - 7 : 90 + 7] = False
    np.testing.assert_array_equal(crop[far], np.broadcast_to([20, 12, 5], crop[far].shape))

    # Next to the object the blur (of the whole image, before masking) mixes object colours
    # into the darkened background; it stays dark.
    near = crop[19, 30:90].astype(int)
    assert np.any(near != [20, 12, 5])
    assert np.all(near <= round(0.1 * 255))


def test_engineered_reference_is_resized_to_size() -> None:
    rgb, mask = rectangle_scene()
    square = engineer_reference(rgb, mask, size=None)
    resized = engineer_reference(rgb, mask)
    assert resized.shape == (352, 352, 3) and resized.dtype == np.uint8
    np.testing.assert_array_equal(resized, resize_rgb(square, (352, 352)))


def test_engineered_reference_without_blur_or_darkening_is_the_plain_crop() -> None:
    rgb, mask = rectangle_scene()
    out = engineer_reference(rgb, mask, background=1.0, blur_sigma=0.0, size=None)
    np.testing.assert_array_equal(out[12:60], rgb[36:84, 94:166])


def test_soft_mask_blends_the_background_treatment() -> None:
    rgb = np.full((40, 40, 3), 200, np.uint8)
    mask = np.zeros((40, 40), np.float32)
    mask[10:30, 10:30] = 1.0
    mask[10:30, 20:30] = 0.6  # partly transparent right half
    out = engineer_reference(rgb, mask, context=0.0, blur_sigma=0.0, size=None)
    # Left half opaque: 200; right half: 0.6 * 200 + 0.4 * (0.1 * 200) = 128.
    np.testing.assert_array_equal(out[:, :10], 200)
    np.testing.assert_array_equal(out[:, 10:], 128)


def test_imagenet_mean_background_reproduces_the_original_colour() -> None:
    rgb, mask = rectangle_scene()
    out = engineer_reference(rgb, mask, size=None, background_colour=IMAGENET_MEAN_RGB)
    mean = np.asarray(IMAGENET_MEAN_RGB, float)
    expected = np.rint(mean + 0.1 * (np.asarray(BG, float) - mean))
    np.testing.assert_array_equal(out[12, 0], expected)  # a far background pixel
    np.testing.assert_array_equal(out[0, 0], IMAGENET_MEAN_RGB)  # padding


@pytest.mark.parametrize(
    "mask",
    [
        np.zeros((200, 300), bool),
        np.zeros((200, 300), np.uint8),
        np.full((200, 300), 0.5, np.float32),
    ],
)
def test_empty_mask_is_rejected(mask: np.ndarray) -> None:
    rgb, _ = rectangle_scene()
    with pytest.raises(ValueError, match=r"^reference mask is empty$"):
        engineer_reference(rgb, mask)


def test_uint8_masks_accept_0_255_and_0_1() -> None:
    rgb, mask = rectangle_scene()
    expected = engineer_reference(rgb, mask, size=None)
    for scale in (1, 255):
        got = engineer_reference(rgb, mask.astype(np.uint8) * scale, size=None)
        np.testing.assert_array_equal(got, expected)


def test_engineer_reference_rejects_bad_arguments() -> None:
    rgb, mask = rectangle_scene()
    with pytest.raises(ValueError, match="does not match the image"):
        engineer_reference(rgb, mask[:-1])
    with pytest.raises(ValueError, match="background must be in"):
        engineer_reference(rgb, mask, background=1.5)
    with pytest.raises(ValueError, match="uint8"):
        engineer_reference(rgb.astype(np.float32), mask)


# ---------------------------------------------------------------------------------------------
# RGBA references
# ---------------------------------------------------------------------------------------------


def test_rgba_reference_uses_its_alpha() -> None:
    alpha = np.zeros((200, 300), np.uint8)
    alpha[TOP:BOTTOM, LEFT:RIGHT] = 255
    alpha[TOP + 5, LEFT - 1] = 1  # any visible pixel belongs to the object
    mask = reference_mask_from_alpha(alpha)
    assert mask is not None and mask.dtype == np.bool_
    np.testing.assert_array_equal(mask, alpha > 0)

    # The decoded cutout is composited over white; engineering uses the alpha as the mask.
    rgb = np.full((200, 300, 3), 255, np.uint8)
    rgb[TOP:BOTTOM, LEFT:RIGHT] = (10, 200, 30)
    out = engineer_reference(rgb, mask, size=None, blur_sigma=0.0, context=0.0)
    # Box rows 40..79, columns 99..159: 40 x 61, padded with 10 rows above.
    assert out.shape == (61, 61, 3)
    np.testing.assert_array_equal(out[10 + 5, 0], [255, 255, 255])  # the alpha=1 pixel, kept
    np.testing.assert_array_equal(out[10, 0], [26, 26, 26])  # white background at 10%


def test_opaque_or_missing_alpha_gives_no_mask() -> None:
    assert reference_mask_from_alpha(None) is None
    assert reference_mask_from_alpha(np.full((4, 4), 255, np.uint8)) is None


# ---------------------------------------------------------------------------------------------
# Conditional arithmetic
# ---------------------------------------------------------------------------------------------


def test_average_conditionals_is_the_plain_mean() -> None:
    vectors = np.array([[1.0, -2.0, 4.0], [3.0, 2.0, 0.0], [2.0, 3.0, 2.0]], np.float32)
    out = average_conditionals(vectors)
    assert out.dtype == np.float32
    np.testing.assert_array_equal(out, [2.0, 1.0, 2.0])
    with pytest.raises(ValueError, match="N >= 1"):
        average_conditionals(np.zeros((0, 3), np.float32))


def test_mix_conditionals_is_the_weighted_sum() -> None:
    text = np.array([1.0, 2.0], np.float32)
    image = np.array([3.0, 5.0], np.float32)
    mixed = mix_conditionals(text, image, 0.25)
    assert mixed.dtype == np.float32
    np.testing.assert_array_equal(mixed, [2.5, 4.25])
    np.testing.assert_array_equal(mix_conditionals(text, image, 1.0), text)
    np.testing.assert_array_equal(mix_conditionals(text, image, 0.0), image)
    # [K, D] text with one [D] image vector broadcasts.
    texts = np.array([[1.0, 2.0], [5.0, 9.0]], np.float32)
    np.testing.assert_array_equal(mix_conditionals(texts, image, 0.5), [[2.0, 3.5], [4.0, 7.0]])


def test_conditional_arithmetic_matches_torch_bit_for_bit() -> None:
    """The numbers earlier versions computed with torch (float32 throughout)."""
    rng = np.random.default_rng(3)
    text = rng.normal(size=(3, 512)).astype(np.float32)
    image = rng.normal(size=(1, 512)).astype(np.float32)
    expected = 0.3 * torch.from_numpy(text) + (1.0 - 0.3) * torch.from_numpy(image)
    np.testing.assert_array_equal(mix_conditionals(text, image, 0.3), expected.numpy())


@pytest.mark.parametrize("weight", [-0.1, 1.5, float("nan")])
def test_mix_weight_outside_unit_interval_is_rejected(weight: float) -> None:
    with pytest.raises(ValueError, match="mix weight must be in"):
        mix_conditionals(np.zeros(2), np.zeros(2), weight)


def test_mix_rejects_mismatched_shapes() -> None:
    with pytest.raises(ValueError, match="do not match"):
        mix_conditionals(np.zeros(3), np.zeros(2), 0.5)


def test_apply_negatives_follows_the_documented_rule() -> None:
    probs = np.array([[[0.8, 0.5]], [[0.4, 1.0]]], np.float32)  # K=2, H=1, W=2
    negatives = np.array([[[0.5, 0.0]], [[0.25, 0.75]]], np.float32)  # N=2
    # max over negatives per pixel: [0.5, 0.75] -> factors [0.5, 0.25].
    expected = np.array([[[0.4, 0.125]], [[0.2, 0.25]]], np.float32)
    out = apply_negatives(probs, negatives)
    assert isinstance(out, np.ndarray) and out.dtype == np.float32
    np.testing.assert_array_equal(out, expected)


def test_apply_negatives_without_negatives_is_identity() -> None:
    probs = np.random.default_rng(0).random((2, 3, 4)).astype(np.float32)
    assert apply_negatives(probs, np.zeros((0, 3, 4), np.float32)) is probs


def test_apply_negatives_rejects_mismatched_maps() -> None:
    with pytest.raises(ValueError, match="differ in size"):
        apply_negatives(np.zeros((1, 3, 4)), np.zeros((1, 4, 3)))


# ---------------------------------------------------------------------------------------------
# Conditionals files
# ---------------------------------------------------------------------------------------------


def test_save_load_round_trip_is_exact(tmp_path: Path) -> None:
    vectors = np.random.default_rng(0).standard_normal((3, 512)).astype(np.float32)
    labels = ["a dog", "ünïcode cat", 'quote " label']
    meta = {"model": "CIDAS/clipseg-rd64-refined", "weights_sha256": "ab" * 32}
    path = tmp_path / "prompts.safetensors"
    save_conditionals(path, vectors, labels, meta)

    got, got_labels, got_meta = load_conditionals(path)
    np.testing.assert_array_equal(got, vectors)
    assert got.dtype == np.float32
    assert got_labels == labels
    assert got_meta == {
        **meta,
        "format": "clipseg-conditionals",
        "embed_dim": 512,
        "created_by": f"clipseg_cli {__version__}",
    }


def test_save_stores_half_precision_as_float32(tmp_path: Path) -> None:
    vectors = np.array([[0.5, -1.25]], dtype=np.float16)
    save_conditionals(tmp_path / "c.safetensors", vectors, ["x"], {})
    got, _, _ = load_conditionals(tmp_path / "c.safetensors")
    assert got.dtype == np.float32
    np.testing.assert_array_equal(got, np.array([[0.5, -1.25]], np.float32))


def test_save_rejects_label_count_mismatch(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="expected 2 string labels"):
        save_conditionals(tmp_path / "c.safetensors", np.zeros((2, 4)), ["one"], {})


def _header(labels: list[str]) -> dict[str, str]:
    return {"format": json.dumps("clipseg-conditionals"), "labels": json.dumps(labels)}


@pytest.mark.parametrize(
    ("write", "message"),
    [
        (lambda p: p.write_bytes(b"not a safetensors file at all"), "not a safetensors file"),
        (lambda p: p.write_bytes(b""), "not a safetensors file"),
        (
            lambda p: save_file({"conditionals": torch.zeros(2, 4)}, str(p)),
            "not a conditionals file",
        ),
        (
            lambda p: save_file({"other": torch.zeros(2, 4)}, str(p), metadata=_header(["a"])),
            "no 'conditionals' tensor",
        ),
        (
            lambda p: save_file({"conditionals": torch.zeros(4)}, str(p), metadata=_header(["a"])),
            r"must be \[K,D\]",
        ),
        (
            lambda p: save_file(
                {"conditionals": torch.zeros(2, 4)}, str(p), metadata=_header(["a"])
            ),
            "expected 2 string labels",
        ),
        (
            lambda p: save_file(
                {"conditionals": torch.zeros(1, 4)},
                str(p),
                metadata={**_header(["a"]), "model": "{broken"},
            ),
            "metadata 'model' is not JSON",
        ),
    ],
)
def test_bad_conditionals_files_give_one_line_errors(tmp_path: Path, write, message) -> None:
    path = tmp_path / "bad.safetensors"
    write(path)
    with pytest.raises(ValueError, match=message) as info:
        load_conditionals(path)
    assert "\n" not in str(info.value)
    assert str(path) in str(info.value)


def test_missing_conditionals_file_is_a_value_error(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="cannot read"):
        load_conditionals(tmp_path / "nope.safetensors")
