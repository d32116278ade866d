"""How well a model segments examples: :func:`evaluate` (IoU_FG over a set of examples, with
text or engineered visual prompts) and :func:`validate_epoch` (the numbers of one epoch).

IoU_FG is counted by :mod:`clipseg_cli.ops.metrics`, the same counting as ``clipseg eval``
(foreground = prob > t, TP/(TP+FP+FN) summed over the set, 1.0 when there is nothing to count).
Inference only: nothing here trains, writes or prints.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import replace

import numpy as np
import torch

from clipseg_cli.model.clipseg import ClipSegModel
from clipseg_cli.model.tokenizer import ClipTokenizer
from clipseg_cli.ops.metrics import Counts, confusion_counts, iou_fg
from clipseg_cli.ops.transforms import probabilities_at_size, resize_rgb
from clipseg_cli.specs import DEFAULT_THRESHOLD
from clipseg_cli.train.config import EpochStats, TrainConfig, TrainProgress
from clipseg_cli.train.data import ReferencePool, engineered_reference, load_mask, load_rgb
from clipseg_cli.train.manifest import Example, group_by_image


def _conditionals(
    model: ClipSegModel,
    group: list[Example],
    tokenizer: ClipTokenizer,
    pool: ReferencePool | None,
    rng: np.random.Generator,
    size: tuple[int, int],
    device: torch.device,
) -> tuple[list[Example], torch.Tensor | None]:
    """The examples of one image to score and their conditionals ``[K, D]``: their texts, or
    with a pool an engineered reference each (examples without one are dropped; None if none
    is left)."""
    if pool is None:
        tokens = tokenizer([e.prompt for e in group], trim=True).to(device)
        return group, model.encode_text(tokens)
    pairs = [(e, pool.draw(e, rng)) for e in group]
    pairs = [(e, r) for e, r in pairs if r is not None]
    if not pairs:
        return [], None
    crops = [engineered_reference(ref, size) for _, ref in pairs]
    crops_px = model.normalize(torch.from_numpy(np.stack(crops)).to(device))
    return [e for e, _ in pairs], model.encode_image(crops_px)


@torch.inference_mode()
def evaluate(
    model: ClipSegModel,
    examples: Sequence[Example],
    *,
    threshold: float = DEFAULT_THRESHOLD,
    batch_size: int = 8,
    device: torch.device | None = None,
    references: Sequence[Example] | None = None,
    seed: int = 0,
    on_batch: Callable[[], None] | None = None,
) -> float:
    """IoU_FG = TP / (TP + FP + FN), summed over all examples at ``threshold`` (prob > t),
    at each mask's own resolution.

    Args:
        references: if given, every example is prompted with an engineered crop of another
            positive example of its class drawn from these (seeded), instead of its text;
            examples without such a reference are skipped.
    """
    device = device or next(model.parameters()).device
    size = (model.arch.input_size, model.arch.input_size)
    tokenizer = ClipTokenizer(model.arch.text.context_length)
    pool = ReferencePool(references) if references is not None else None
    rng = np.random.default_rng([seed, 11])
    was_training = model.training
    model.eval()
    total = Counts.zeros(1)
    groups = group_by_image(examples)
    try:
        for start in range(0, len(groups), batch_size):
            chunk = groups[start : start + batch_size]
            rgbs = [load_rgb(image) for image, _ in chunk]
            pixels = model.normalize(
                torch.from_numpy(np.stack([resize_rgb(x, size) for x in rgbs])).to(device)
            )
            for b, (_image, group) in enumerate(chunk):
                scored, conditionals = _conditionals(
                    model, group, tokenizer, pool, rng, size, device
                )
                if conditionals is None:
                    continue
                logits = model(pixels[b : b + 1], conditionals)[0]
                probs = probabilities_at_size(logits.float().cpu().numpy(), rgbs[b].shape[:2])
                for k, example in enumerate(scored):
                    truth = (
                        load_mask(example.mask, rgbs[b].shape[:2])
                        if example.mask is not None
                        else np.zeros(probs[k].shape, bool)
                    )
                    total = total + confusion_counts(probs[k], truth, (threshold,))
            if on_batch is not None:
                on_batch()
    finally:
        model.train(was_training)
    return float(iou_fg(total)[0])


def validate_epoch(
    model: ClipSegModel,
    val_examples: list[Example],
    train_examples: list[Example],
    config: TrainConfig,
    device: torch.device,
    report: TrainProgress,
    on_progress: Callable[[TrainProgress], None] | None,
    start_time: float,
) -> EpochStats:
    """The stats of the epoch that ``report`` (a "validate" report) describes, its loss being
    the epoch's training loss: the validation IoU with text prompts, and with visual prompts
    when the run trains them (``seconds`` is left 0). ``on_progress`` gets ``report`` after each
    validation batch, with the time elapsed since ``start_time``."""

    def tick() -> None:
        if on_progress is not None:
            on_progress(replace(report, elapsed=time.monotonic() - start_time))

    val_iou = val_iou_image = None
    if val_examples:
        common = {
            "threshold": config.threshold,
            "batch_size": config.batch_size,
            "device": device,
            "on_batch": tick,
        }
        val_iou = evaluate(model, val_examples, **common)
        if config.image_prompt_fraction > 0:
            # Visual prompts from the validation images themselves when they have the class,
            # else from the training images: never the image being segmented.
            val_iou_image = evaluate(
                model,
                val_examples,
                references=list(val_examples) + list(train_examples),
                seed=config.seed,
                **common,
            )
    return EpochStats(
        epoch=report.epoch,
        train_loss=round(report.loss, 6),
        val_iou=round(val_iou, 6) if val_iou is not None else None,
        val_iou_image=round(val_iou_image, 6) if val_iou_image is not None else None,
        seconds=0.0,
    )
