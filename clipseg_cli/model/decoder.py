"""The CLIPSeg decoder: turns CLIP activations and conditional vectors into mask logits.

Parameter names follow the original repository (``film_mul``, ``reduces.N``, ``blocks.N`` as
``nn.TransformerEncoderLayer``, ``trans_conv``), so its decoder files load with no renaming.
"""

from __future__ import annotations

import torch
from torch import nn

from clipseg_cli.specs import DecoderSpec


def _build_head(spec: DecoderSpec, patch_size: int) -> nn.Module:
    dim = spec.reduce_dim
    if spec.refined_head:
        step = patch_size // 4
        return nn.Sequential(
            nn.Conv2d(dim, dim, kernel_size=3, padding=1),
            nn.ReLU(),
            nn.ConvTranspose2d(dim, dim // 2, kernel_size=step, stride=step),
            nn.ReLU(),
            nn.ConvTranspose2d(dim // 2, 1, kernel_size=step, stride=step),
        )
    return nn.ConvTranspose2d(dim, 1, kernel_size=patch_size, stride=patch_size)


class ClipSegDecoder(nn.Module):
    """Reduce -> FiLM -> post-norm transformer blocks -> transposed convolutions."""

    def __init__(
        self, spec: DecoderSpec, vision_width: int, cond_dim: int, patch_size: int
    ) -> None:
        super().__init__()
        self.spec = spec
        dim = spec.reduce_dim
        self.film_mul = nn.Linear(cond_dim, dim)
        self.film_add = nn.Linear(cond_dim, dim)
        self.reduces = nn.ModuleList(nn.Linear(vision_width, dim) for _ in spec.extract_layers)
        self.blocks = nn.ModuleList(
            nn.TransformerEncoderLayer(
                d_model=dim,
                nhead=spec.heads,
                dim_feedforward=spec.feedforward_dim,
                dropout=0.0,
                activation="relu",
                batch_first=True,
            )
            for _ in spec.extract_layers
        )
        self.trans_conv = _build_head(spec, patch_size)

    def forward(
        self,
        activations: list[torch.Tensor],
        conditionals: torch.Tensor,
        grid: tuple[int, int],
    ) -> torch.Tensor:
        """Decode every (image, conditional) pair.

        Args:
            activations: vision block outputs in ``extract_layers`` order (shallow first), each
                ``[B, 1 + gh*gw, width]``.
            conditionals: ``[K, cond_dim]``, one row per prompt.
            grid: ``(gh, gw)``, the token grid of the images.

        Returns:
            logits ``[B, K, gh*p, gw*p]``.
        """
        batch, tokens, _ = activations[0].shape
        prompts = conditionals.shape[0]
        grid_h, grid_w = grid
        deepest_first = activations[::-1]

        # The deepest reduction is prompt-independent: computed once per image, then FiLM
        # fans it out to the K prompts.
        x = self.reduces[0](deepest_first[0])  # [B, T, D]
        scale = self.film_mul(conditionals)[None, :, None, :]  # [1, K, 1, D]
        shift = self.film_add(conditionals)[None, :, None, :]
        x = (scale * x[:, None] + shift).reshape(batch * prompts, tokens, -1)
        x = self.blocks[0](x)
        for activation, reduce, block in zip(
            deepest_first[1:], self.reduces[1:], self.blocks[1:], strict=True
        ):
            skip = reduce(activation)[:, None]  # [B, 1, T, D], shared by the K prompts
            x = (x.view(batch, prompts, tokens, -1) + skip).view(batch * prompts, tokens, -1)
            x = block(x)

        x = x[:, 1:].transpose(1, 2).reshape(batch * prompts, -1, grid_h, grid_w)
        logits = self.trans_conv(x)  # [B*K, 1, H, W]
        return logits.view(batch, prompts, logits.shape[-2], logits.shape[-1])
