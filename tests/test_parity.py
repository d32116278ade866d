"""Numerical parity with transformers' CLIPSegForImageSegmentation (full size, random weights).

No real weights can be downloaded here, so fidelity is proven against the reference
implementation with identical, well-spread random weights in both public layouts.
"""

from __future__ import annotations

import pytest
import torch
from factories import random_hf_model, save_original_checkpoint

from clipseg_cli.weights import load_weights

pytestmark = pytest.mark.parity

TOLERANCE = 1e-4
PROMPTS = ["a dog", "the blue square on the left", "something shiny"]
VARIANTS = ["rd64-refined", "rd64", "rd16"]


@pytest.fixture(scope="module", params=VARIANTS)
def checkpoint(request, tmp_path_factory):
    """(variant, transformers model, its save_pretrained folder, original-layout files)."""
    variant = request.param
    seed = VARIANTS.index(variant) + 11
    reference = random_hf_model(variant, "full", seed=seed)
    folder = tmp_path_factory.mktemp(variant)
    reference.save_pretrained(folder)
    original = save_original_checkpoint(reference, folder / "original", f"{variant}.pth")
    return variant, reference, folder, original


def _tokens(prompts: list[str]) -> torch.Tensor:
    from open_clip.tokenizer import SimpleTokenizer

    return SimpleTokenizer()(prompts)


def _pixels(seed: int, height: int, width: int, batch: int = 2) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 3, height, width, generator=generator)


@torch.no_grad()
def _reference_text_logits(reference, pixels: torch.Tensor, prompts: list[str]) -> torch.Tensor:
    """What transformers computes, one (image, prompt) pair per row: ``[B, K, H, W]``."""
    tokens = _tokens(prompts)
    per_prompt = []
    for k in range(len(prompts)):
        ids = tokens[k : k + 1].expand(pixels.shape[0], -1)
        per_prompt.append(reference(input_ids=ids, pixel_values=pixels).logits)
    return torch.stack(per_prompt, dim=1)


@torch.no_grad()
def test_text_prompts_match_transformers(checkpoint):
    variant, reference, folder, _ = checkpoint
    ours, info = load_weights(str(folder))
    assert info.variant == variant  # detected from the weights
    pixels = _pixels(1, 352, 352)
    expected = _reference_text_logits(reference, pixels, PROMPTS)
    logits = ours(pixels, ours.encode_text(_tokens(PROMPTS)))
    assert logits.shape == (2, len(PROMPTS), 352, 352)
    assert expected.std() > 0.05  # the comparison is not between near-constant maps
    assert (logits - expected).abs().max().item() <= TOLERANCE


@torch.no_grad()
def test_image_prompt_matches_transformers(checkpoint):
    _, reference, folder, _ = checkpoint
    ours, _ = load_weights(str(folder))
    pixels = _pixels(2, 352, 352)
    support = _pixels(3, 352, 352)
    expected = reference(pixel_values=pixels, conditional_pixel_values=support).logits
    conditionals = ours.encode_image(support)  # [2, D]: one conditional per support image
    reference_cond = reference.clip.get_image_features(support).pooler_output
    assert (conditionals - reference_cond).abs().max().item() <= TOLERANCE
    logits = ours(pixels, conditionals)  # [B=2, K=2]: the diagonal pairs image i with support i
    paired = torch.stack([logits[i, i] for i in range(2)])
    assert (paired - expected).abs().max().item() <= TOLERANCE


@torch.no_grad()
def _reference_nonsquare_logits(reference, pixels, conditional):
    """transformers' modules on a non-square grid.

    transformers' decoder reshapes tokens to a square (``int(sqrt(n))``), so it cannot decode a
    non-square input itself; its vision tower does interpolate to any grid. This runs the same
    modules step by step with the reshape done to the real grid.
    """
    outputs = reference.clip.vision_model(
        pixel_values=pixels, output_hidden_states=True, interpolate_pos_encoding=True
    )
    decoder = reference.decoder
    activations = [outputs.hidden_states[i + 1] for i in reference.extract_layers][::-1]
    cond = conditional.expand(pixels.shape[0], -1)
    x = None
    for i, (activation, layer, reduce) in enumerate(
        zip(activations, decoder.layers, decoder.reduces, strict=True)
    ):
        x = reduce(activation) if x is None else reduce(activation) + x
        if i == 0:
            x = decoder.film_mul(cond)[:, None] * x + decoder.film_add(cond)[:, None]
        x = layer(x, attention_mask=None)
        x = x[0] if isinstance(x, tuple) else x
    grid_h, grid_w = pixels.shape[2] // 16, pixels.shape[3] // 16
    x = x[:, 1:].transpose(1, 2).reshape(pixels.shape[0], -1, grid_h, grid_w)
    return decoder.transposed_convolution(x).squeeze(1)


@torch.no_grad()
def test_non_square_input_matches_transformers_modules(checkpoint):
    _, reference, folder, _ = checkpoint
    ours, _ = load_weights(str(folder))
    pixels = _pixels(4, 320, 480, batch=1)
    conditional = reference.clip.get_text_features(_tokens(PROMPTS[:1])).pooler_output
    expected = _reference_nonsquare_logits(reference, pixels, conditional)
    logits = ours(pixels, ours.encode_text(_tokens(PROMPTS[:1])))
    assert logits.shape == (1, 1, 320, 480)
    assert (logits[:, 0] - expected).abs().max().item() <= TOLERANCE


@torch.no_grad()
def test_original_layout_loads_to_the_same_logits(checkpoint):
    variant, reference, _, (decoder_path, clip_path) = checkpoint
    ours, info = load_weights(str(decoder_path), clip_weights=clip_path)
    assert info.layout == "original"
    assert info.variant == variant
    pixels = _pixels(5, 352, 352)
    expected = _reference_text_logits(reference, pixels, PROMPTS[:2])
    logits = ours(pixels, ours.encode_text(_tokens(PROMPTS[:2])))
    assert (logits - expected).abs().max().item() <= TOLERANCE
