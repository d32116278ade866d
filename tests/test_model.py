"""Structure of the model and the Python API, on a tiny random model."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hf_processor import IMAGE_PROCESSOR_SETTINGS, build_image_processor, reference_pixels
from open_clip.tokenizer import SimpleTokenizer

from clipseg_cli.ops.transforms import resize_rgb
from clipseg_cli.segmenter import Segmenter, resolve_device, resolve_precision
from clipseg_cli.weights import load_weights


def _count_calls(module: torch.nn.Module, calls: list) -> None:
    module.register_forward_hook(lambda _m, inputs, _o: calls.append(inputs[0].shape[0]))


@torch.no_grad()
def test_vision_pass_once_per_image_and_stops_after_layer_9(tiny_model_dir):
    model, _ = load_weights(str(tiny_model_dir))
    blocks = model.backbone.clip.visual.transformer.resblocks
    first, after_last_needed = [], []
    _count_calls(blocks[0], first)
    for block in blocks[10:]:
        _count_calls(block, after_last_needed)
    conditionals = torch.randn(5, model.arch.embed_dim)
    logits = model(torch.randn(3, 3, 352, 352), conditionals)
    assert logits.shape == (3, 5, 352, 352)
    assert first == [3]  # one vision pass over the batch of 3, for all 5 prompts
    assert after_last_needed == []  # blocks after 9 never run for segmentation


@torch.no_grad()
def test_prompts_are_independent_of_each_other(tiny_model_dir):
    """Decoding K prompts together equals decoding each alone (no cross-talk in the fan-out)."""
    model, _ = load_weights(str(tiny_model_dir))
    pixels = torch.randn(2, 3, 352, 352)
    conditionals = torch.randn(3, model.arch.embed_dim)
    together = model(pixels, conditionals)
    for k in range(3):
        alone = model(pixels, conditionals[k : k + 1])
        assert torch.allclose(together[:, k], alone[:, 0], atol=1e-5)


def test_release_prompt_encoders_frees_towers_and_keeps_segmentation(tiny_model_dir):
    segmenter = Segmenter.load(str(tiny_model_dir), device="cpu", precision="fp32")
    conditionals = segmenter.embed_texts(["a dog"])
    image = np.zeros((20, 30, 3), np.uint8)
    before = segmenter.predict([image], conditionals)[0]
    params_before = sum(p.numel() for p in segmenter.model.parameters())
    segmenter.release_prompt_encoders()
    params_after = sum(p.numel() for p in segmenter.model.parameters())
    assert params_after < params_before
    assert len(segmenter.model.backbone.clip.visual.transformer.resblocks) == 10
    np.testing.assert_array_equal(segmenter.predict([image], conditionals)[0], before)
    with pytest.raises(RuntimeError, match="released"):
        segmenter.embed_texts(["a cat"])


@torch.no_grad()
def test_predict_matches_the_reference_processor_and_model(tiny_segmenter, tiny_reference):
    """From a uint8 photo to probabilities at its own size, as a transformers user computes."""
    rng = np.random.default_rng(0)
    photo = (rng.random((300, 451, 3)) * 255).astype(np.uint8)
    # The PIL processor is the one the weights were published with (transformers 4.x default).
    expected_pixels = reference_pixels(photo)
    resized = torch.from_numpy(resize_rgb(photo, (352, 352)).copy())
    ours = tiny_segmenter.model.normalize(resized[None])
    assert (ours - expected_pixels).abs().max().item() <= 1e-5
    # transformers 5's default (torchvision) backend rounds some pixels one level differently.
    torchvision_pixels = build_image_processor()(images=photo, return_tensors="pt")["pixel_values"]
    one_level = 1.0 / 255 / min(IMAGE_PROCESSOR_SETTINGS["image_std"])
    assert (ours - torchvision_pixels).abs().max().item() <= one_level + 1e-5

    conditionals = tiny_segmenter.embed_texts(["a dog", "a cat"])
    (probs,) = tiny_segmenter.predict([photo], conditionals)
    tokens = SimpleTokenizer()(["a dog", "a cat"])
    logits = tiny_reference(input_ids=tokens, pixel_values=expected_pixels.expand(2, -1, -1, -1))
    expected = torch.nn.functional.interpolate(
        torch.sigmoid(logits.logits)[None], size=(300, 451), mode="bilinear", align_corners=False
    )[0]
    assert probs.shape == (2, 300, 451) and probs.dtype == np.float32
    assert np.abs(probs - expected.numpy()).max() <= 1e-4


def test_predict_returns_one_array_per_image_at_its_size(tiny_segmenter):
    images = [np.zeros((17, 33, 3), np.uint8), np.full((40, 12, 3), 200, np.uint8)]
    conditionals = tiny_segmenter.embed_texts(["x"])
    results = tiny_segmenter.predict(images, conditionals)
    assert [r.shape for r in results] == [(1, 17, 33), (1, 40, 12)]
    assert all(r.min() >= 0.0 and r.max() <= 1.0 for r in results)
    assert tiny_segmenter.predict([], conditionals) == []


def test_image_embedding_is_the_clip_image_feature(tiny_segmenter, tiny_reference):
    rng = np.random.default_rng(1)
    support = (rng.random((352, 352, 3)) * 255).astype(np.uint8)
    ours = tiny_segmenter.embed_images([support])
    with torch.no_grad():
        expected = tiny_reference.clip.get_image_features(reference_pixels(support)).pooler_output
    assert (ours - expected).abs().max().item() <= 1e-4


def test_bf16_agrees_with_fp32(tiny_model_dir):
    fp32 = Segmenter.load(str(tiny_model_dir), device="cpu", precision="fp32")
    bf16 = Segmenter.load(str(tiny_model_dir), device="cpu", precision="bf16")
    assert bf16.dtype == torch.bfloat16
    rng = np.random.default_rng(2)
    image = (rng.random((64, 64, 3)) * 255).astype(np.uint8)
    a = fp32.predict([image], fp32.embed_texts(["a dog"]))[0]
    b = bf16.predict([image], bf16.embed_texts(["a dog"]))[0]
    assert np.abs(a - b).max() < 0.05


def test_device_and_precision_resolution():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_precision("auto", torch.device("cpu")) == torch.float32
    assert resolve_precision("bf16", torch.device("cpu")) == torch.bfloat16
    with pytest.raises(ValueError, match="fp16"):
        resolve_precision("fp16", torch.device("cpu"))
    with pytest.raises(ValueError, match="--device"):
        resolve_device("tpu")
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    for device in ("cuda", "cuda:0", f"cuda:{count}"):
        if int(device.partition(":")[2] or 0) >= count:
            # A device this machine does not have is a one-line usage error, never a crash.
            with pytest.raises(ValueError, match=f"--device {device}: this machine has"):
                resolve_device(device)
