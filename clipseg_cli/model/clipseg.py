"""CLIPSeg = frozen CLIP backbone + decoder. Pure tensors in, tensors out: no files, no CLI.

Shapes used throughout: B images, K prompts (conditional vectors), D = embed_dim (512),
H x W input pixels (multiples of the patch size, 352 x 352 by default).
"""

from __future__ import annotations

import torch
from torch import nn

from clipseg_cli.model.backbone import ClipBackbone
from clipseg_cli.model.decoder import ClipSegDecoder
from clipseg_cli.specs import IMAGENET_MEAN, IMAGENET_STD, ArchitectureSpec


class ClipSegModel(nn.Module):
    """The CLIPSeg network.

    ``forward(pixels[B,3,H,W], conditionals[K,D]) -> logits[B,K,H,W]``: the vision pass runs once
    per image whatever K is, and stops after the deepest block the decoder reads.
    """

    def __init__(self, arch: ArchitectureSpec) -> None:
        super().__init__()
        self.arch = arch
        self.backbone = ClipBackbone(arch)
        self.decoder = ClipSegDecoder(
            arch.decoder,
            vision_width=arch.vision.width,
            cond_dim=arch.embed_dim,
            patch_size=arch.vision.patch_size,
        )
        self.register_buffer("pixel_mean", torch.tensor(IMAGENET_MEAN), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(IMAGENET_STD), persistent=False)

    @property
    def dtype(self) -> torch.dtype:
        """Parameter dtype (float32, bfloat16 or float16)."""
        return next(self.parameters()).dtype

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 ``[B, H, W, 3]`` (as decoded) -> normalised ``[B, 3, H, W]`` in the model dtype.

        Done on the model's device so only uint8 bytes cross the host/device boundary.
        """
        dtype = self.dtype
        x = images.permute(0, 3, 1, 2).float().div_(255.0)
        mean = self.pixel_mean.float().view(1, 3, 1, 1)
        std = self.pixel_std.float().view(1, 3, 1, 1)
        return ((x - mean) / std).to(dtype)

    def forward(self, pixels: torch.Tensor, conditionals: torch.Tensor) -> torch.Tensor:
        """Mask logits for every (image, prompt) pair.

        Args:
            pixels: normalised images ``[B, 3, H, W]``; H, W multiples of the patch size.
            conditionals: ``[K, D]`` text and/or image conditional vectors.

        Returns:
            logits ``[B, K, H, W]`` (before sigmoid).
        """
        patch = self.arch.vision.patch_size
        height, width = pixels.shape[-2:]
        if height % patch or width % patch:
            raise ValueError(f"input {height}x{width} is not a multiple of the patch size {patch}")
        activations = self.backbone.vision_intermediates(pixels, self.arch.decoder.extract_layers)
        conditionals = conditionals.to(activations[0].dtype)
        return self.decoder(activations, conditionals, (height // patch, width // patch))

    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        """Text conditionals ``[K, D]`` from token ids ``[K, context_length]``."""
        return self.backbone.encode_text(tokens)

    def encode_image(self, pixels: torch.Tensor) -> torch.Tensor:
        """Image conditionals ``[B, D]`` from normalised support images ``[B, 3, H, W]``."""
        return self.backbone.encode_image(pixels)
