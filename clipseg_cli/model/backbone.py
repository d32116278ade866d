"""The frozen CLIP backbone, built from open_clip's modules.

open_clip provides the towers and their OpenAI-compatible parameter names; this module adds what
CLIPSeg needs on top: positional embeddings resized to any input size, and a vision pass that
stops after the deepest block the decoder reads.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from open_clip.model import CLIP, CLIPTextCfg, CLIPVisionCfg
from torch import nn

from clipseg_cli.specs import ArchitectureSpec


def build_open_clip(arch: ArchitectureSpec) -> CLIP:
    """An open_clip ``CLIP`` with the architecture's dimensions (QuickGELU, as OpenAI's)."""
    vision = arch.vision
    text = arch.text
    vision_cfg = CLIPVisionCfg(
        layers=vision.layers,
        width=vision.width,
        head_width=vision.width // vision.heads,
        mlp_ratio=vision.mlp_ratio,
        patch_size=vision.patch_size,
        image_size=vision.pretrain_image_size,
    )
    text_cfg = CLIPTextCfg(
        context_length=text.context_length,
        vocab_size=text.vocab_size,
        width=text.width,
        heads=text.heads,
        layers=text.layers,
        mlp_ratio=text.mlp_ratio,
    )
    return CLIP(embed_dim=arch.embed_dim, vision_cfg=vision_cfg, text_cfg=text_cfg, quick_gelu=True)


def causal_mask(length: int) -> torch.Tensor:
    """Additive causal attention mask ``[length, length]`` as CLIP's text tower uses it."""
    return torch.full((length, length), float("-inf")).triu_(1)


class ClipBackbone(nn.Module):
    """CLIP ViT + text tower with CLIPSeg's entry points.

    Pixel inputs are normalised images ``[B, 3, H, W]`` with H and W multiples of the patch size.
    """

    def __init__(self, arch: ArchitectureSpec) -> None:
        super().__init__()
        self.arch = arch
        self.clip = build_open_clip(arch)

    # -- vision ---------------------------------------------------------------------------------

    def _positional_embedding(self, grid_h: int, grid_w: int) -> torch.Tensor:
        """``[1 + grid_h * grid_w, width]``: the trained embedding, bicubically resized.

        Matches transformers' ``interpolate_pos_encoding`` (and the original repository): the
        class position is kept, the patch grid is resized with ``align_corners=False``.
        """
        pos = self.clip.visual.positional_embedding
        trained = round((pos.shape[0] - 1) ** 0.5)
        if (grid_h, grid_w) == (trained, trained):
            return pos
        patches = pos[1:].reshape(1, trained, trained, -1).permute(0, 3, 1, 2)
        patches = F.interpolate(
            patches.float(), size=(grid_h, grid_w), mode="bicubic", align_corners=False
        )
        patches = patches.to(pos.dtype).permute(0, 2, 3, 1).reshape(grid_h * grid_w, -1)
        return torch.cat([pos[:1], patches], dim=0)

    def _embed_patches(self, pixels: torch.Tensor) -> torch.Tensor:
        """``[B, 3, H, W]`` -> tokens ``[B, 1 + (H/p)(W/p), width]`` after ln_pre."""
        visual = self.clip.visual
        x = visual.conv1(pixels)  # [B, width, gh, gw]
        batch, _, grid_h, grid_w = x.shape
        x = x.flatten(2).transpose(1, 2)
        cls = visual.class_embedding.to(x.dtype).expand(batch, 1, -1)
        x = torch.cat([cls, x], dim=1)
        x = x + self._positional_embedding(grid_h, grid_w).to(x.dtype)
        return visual.ln_pre(x)

    def _run_blocks(
        self, x: torch.Tensor, blocks: nn.ModuleList, keep: tuple[int, ...]
    ) -> list[torch.Tensor]:
        """Run ``blocks[0..max(keep)]`` on batch-first tokens; returns the outputs of the blocks
        in ``keep`` (only those are held, to keep activation memory small)."""
        outputs = {}
        for index, block in enumerate(blocks[: max(keep) + 1]):
            x = block(x)
            if index in keep:
                outputs[index] = x
        return [outputs[index] for index in keep]

    def vision_intermediates(
        self, pixels: torch.Tensor, layers: tuple[int, ...]
    ) -> list[torch.Tensor]:
        """Outputs of the given vision blocks, in the order of ``layers``.

        Args:
            pixels: normalised images ``[B, 3, H, W]``.
            layers: 0-based block indices. Blocks after ``max(layers)`` are not computed.

        Returns:
            One tensor ``[B, 1 + (H/p)(W/p), width]`` per requested layer (class token first).
        """
        x = self._embed_patches(pixels)
        return self._run_blocks(x, self.clip.visual.transformer.resblocks, layers)

    def encode_image(self, pixels: torch.Tensor) -> torch.Tensor:
        """CLIP image embedding ``[B, embed_dim]`` (class token, ln_post, projection).

        Not normalised: CLIPSeg conditions on the raw projected embedding.
        """
        visual = self.clip.visual
        if visual.proj is None:
            raise RuntimeError("the image tower was released; it is needed for image prompts")
        x = self._embed_patches(pixels)
        blocks = visual.transformer.resblocks
        (x,) = self._run_blocks(x, blocks, (len(blocks) - 1,))
        return visual.ln_post(x[:, 0]) @ visual.proj

    # -- text -----------------------------------------------------------------------------------

    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        """CLIP text embedding ``[K, embed_dim]`` of token ids ``[K, context_length]``.

        Pooled at the end-of-text token (the largest id in CLIP's vocabulary), then projected.
        """
        clip = self.clip
        if clip.token_embedding is None:
            raise RuntimeError("the text tower was released after the prompts were embedded")
        # Shorter inputs (cut after the last end-of-text token) give the same embedding: the
        # mask is causal, so positions after the end-of-text token never reach it.
        x = clip.token_embedding(tokens) + clip.positional_embedding[: tokens.shape[1]]
        mask = causal_mask(tokens.shape[1]).to(device=x.device, dtype=x.dtype)
        for block in clip.transformer.resblocks:
            x = block(x, attn_mask=mask)
        x = clip.ln_final(x)
        pooled = x[torch.arange(x.shape[0], device=x.device), tokens.argmax(dim=-1)]
        return pooled @ clip.text_projection

    # -- memory ---------------------------------------------------------------------------------

    def release_text_tower(self) -> None:
        """Free the text tower (~40% of CLIP) once every text prompt is embedded."""
        clip = self.clip
        clip.transformer = None
        clip.token_embedding = None
        clip.positional_embedding = None
        clip.ln_final = None
        clip.text_projection = None
        clip.logit_scale = None  # CLIP's contrastive temperature: never used for segmentation

    def release_image_head(self) -> None:
        """Free the vision blocks segmentation never runs, and the image-embedding head."""
        visual = self.clip.visual
        keep = self.arch.last_needed_layer + 1
        visual.transformer.resblocks = visual.transformer.resblocks[:keep]
        visual.ln_post = None
        visual.proj = None
