"""The offline-built CLIPSegProcessor must tokenize and preprocess like the hub's."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import open_clip
import pytest
from hf_processor import (
    CONTEXT_LENGTH,
    VOCAB_SIZE,
    build_clip_tokenizer,
    clip_vocab_and_merges,
    save_clipseg_processor,
)
from PIL import Image
from transformers import CLIPSegProcessor, CLIPTokenizer

START_ID, END_ID = 49406, 49407
PROMPTS = ["a dog", "A photo of two cats!", "the blue square", "  two   SPACES, don't 123"]


@pytest.fixture(scope="module")
def tokenizer() -> CLIPTokenizer:
    return build_clip_tokenizer()


def _up_to_end(ids: list[int]) -> list[int]:
    # Padding differs (hub CLIPSeg pads with <|endoftext|>, open_clip with 0) but CLIP's causal
    # mask makes everything after the first end token irrelevant, so compare only up to it.
    return ids[: ids.index(END_ID) + 1]


def test_vocab_has_clip_layout() -> None:
    vocab, merges = clip_vocab_and_merges()
    assert len(vocab) == VOCAB_SIZE
    assert vocab["<|startoftext|>"] == START_ID
    assert vocab["<|endoftext|>"] == END_ID
    assert len(merges) == 49152 - 256 - 2


@pytest.mark.parametrize("text", PROMPTS)
def test_token_ids_match_open_clip(tokenizer: CLIPTokenizer, text: str) -> None:
    ours = tokenizer(text, padding="max_length", max_length=CONTEXT_LENGTH)["input_ids"]
    theirs = open_clip.get_tokenizer("ViT-B-16")([text])[0].tolist()
    assert len(ours) == len(theirs) == CONTEXT_LENGTH
    assert ours[0] == START_ID
    assert _up_to_end(ours) == _up_to_end(theirs)
    # Hub padding convention, which the reference benchmark relies on.
    assert all(i == END_ID for i in ours[len(_up_to_end(ours)) :])
    assert all(i == 0 for i in theirs[len(_up_to_end(theirs)) :])


def test_saved_processor_roundtrips(tmp_path: Path) -> None:
    save_clipseg_processor(tmp_path)
    processor = CLIPSegProcessor.from_pretrained(str(tmp_path))
    image = Image.fromarray(np.full((48, 64, 3), 255, dtype=np.uint8))
    inputs = processor(text=["a dog"], images=[image], padding="max_length", return_tensors="pt")
    assert tuple(inputs["pixel_values"].shape) == (1, 3, 352, 352)
    assert inputs["input_ids"][0, :4].tolist() == [START_ID, 320, 1929, END_ID]
    # White after /255 and ImageNet normalisation: (1 - mean) / std per channel.
    expected = (1 - np.array([0.485, 0.456, 0.406])) / np.array([0.229, 0.224, 0.225])
    got = inputs["pixel_values"][0, :, 0, 0].numpy()
    np.testing.assert_allclose(got, expected, rtol=1e-5)
