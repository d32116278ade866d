"""The training objective: binary cross-entropy on the mask logits (the paper's loss), plus the
optional text/image alignment loss and the per-token class loss of :class:`TokenClassifier`.

Tensors in, a scalar loss out: nothing here reads files, steps an optimiser or decides what a
batch holds (:mod:`.data` does).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from clipseg_cli.model.clipseg import ClipSegModel
from clipseg_cli.model.tokenizer import ClipTokenizer
from clipseg_cli.train.config import TrainConfig
from clipseg_cli.train.data import Batch

# Temperature of the text/image alignment loss (cosine similarities / tau).
ALIGN_TEMPERATURE = 0.1


class TokenClassifier(torch.nn.Module):
    """Training-only auxiliary head: the class of the object under each vision token.

    A linear layer on the deepest activation the decoder reads (class token dropped). Its
    cross-entropy, on tokens more than half covered by one annotated mask, makes every token of
    an object, not only the ones on its outline, carry what the object is (e.g. its shape);
    pretrained CLIP features have that, a backbone trained from scratch learns it only slowly
    from the mask loss. Never exported.
    """

    def __init__(self, width: int, classes: Sequence[str]) -> None:
        super().__init__()
        self.index = {label: i for i, label in enumerate(classes)}
        self.head = torch.nn.Linear(width, len(classes))

    def loss(self, activation: torch.Tensor, batch: Batch, patch: int) -> torch.Tensor | None:
        """Mean cross-entropy over labelled tokens of ``activation`` ``[B, 1 + T, width]``;
        None if no token is labelled."""
        features, classes = [], []
        for b, target in enumerate(batch.targets):
            rows = [k for k, positive in enumerate(batch.positive[b]) if positive]
            if not rows:
                continue
            # Coverage of each patch by each mask: [P, T] in the token order of the ViT.
            cover = F.avg_pool2d(target[rows].to(activation.device), patch).flatten(1)
            best, which = cover.max(0)
            keep = best > 0.5
            if not keep.any():
                continue
            names = [batch.labels[b][rows[int(i)]] for i in which[keep]]
            classes.append(torch.tensor([self.index[n] for n in names], device=cover.device))
            features.append(activation[b, 1:][keep])
        if not features:
            return None
        logits = self.head(torch.cat(features).float())
        return F.cross_entropy(logits, torch.cat(classes))


def step_loss(
    model: ClipSegModel,
    batch: Batch,
    tokenizer: ClipTokenizer,
    device: torch.device,
    config: TrainConfig,
    token_classifier: TokenClassifier | None = None,
) -> torch.Tensor:
    """BCE over every (image, prompt) pair of the batch, plus the alignment and token-class
    losses if asked."""
    backbone_grad = torch.enable_grad() if config.trains_backbone else torch.no_grad()
    unique = sorted({p for prompts in batch.prompts for p in prompts} | set(batch.ref_prompts))
    position = {prompt: i for i, prompt in enumerate(unique)}
    with backbone_grad:
        pixels = model.normalize(batch.pixels.to(device))
        activations = model.backbone.vision_intermediates(pixels, model.arch.decoder.extract_layers)
        text = model.encode_text(tokenizer(unique, trim=True).to(device))  # [U, D]
        images = None
        if batch.ref_pixels is not None:
            images = model.encode_image(model.normalize(batch.ref_pixels.to(device)))  # [R, D]
    patch = model.arch.vision.patch_size
    grid = (pixels.shape[-2] // patch, pixels.shape[-1] // patch)
    losses = []
    for b, prompts in enumerate(batch.prompts):
        rows = [
            images[r] if r >= 0 else text[position[p]]
            for p, r in zip(prompts, batch.ref_index[b], strict=True)
        ]
        logits = model.decoder([a[b : b + 1] for a in activations], torch.stack(rows), grid)[0]
        target = batch.targets[b].to(device)
        losses.append(F.binary_cross_entropy_with_logits(logits, target, reduction="none"))
    loss = torch.cat([x.flatten(1).mean(1) for x in losses]).mean()
    if config.align_weight > 0 and images is not None and len(batch.ref_labels) > 1:
        ref_text = text[[position[p] for p in batch.ref_prompts]]
        loss = loss + config.align_weight * alignment_loss(images, ref_text, batch.ref_labels)
    if token_classifier is not None:
        token_loss = token_classifier.loss(activations[-1], batch, patch)
        if token_loss is not None:
            loss = loss + config.token_class_weight * token_loss
    return loss


def alignment_loss(images: torch.Tensor, texts: torch.Tensor, labels: list[str]) -> torch.Tensor:
    """Symmetric InfoNCE between image ``[R, D]`` and text ``[R, D]`` embeddings; pairs of the
    same class count as matches (soft targets), so duplicates in a batch are not negatives."""
    image_n = F.normalize(images.float(), dim=-1)
    text_n = F.normalize(texts.float(), dim=-1)
    logits = image_n @ text_n.t() / ALIGN_TEMPERATURE
    same = torch.tensor([[a == b for b in labels] for a in labels], device=images.device)
    target = same.float() / same.float().sum(1, keepdim=True)
    return 0.5 * (
        torch.sum(-target * logits.log_softmax(1), 1).mean()
        + torch.sum(-target * logits.t().log_softmax(1), 1).mean()
    )
