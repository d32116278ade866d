"""What the model is fed: an example's image and mask decoded, the plan of each epoch (order,
visual prompts, flips), and the tensors of one step.

Planning (:func:`plan_epoch`, :class:`ReferencePool`) is a pure function of the seed and the
epoch, made in the main thread, so a resumed run replays it exactly; loading
(:func:`load_batch`) only decodes what a plan names and may run in a worker thread. Masks mean
what every mask file means (:func:`clipseg_cli.io.masks.read_mask`). Nothing here runs the
model or computes a loss.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from clipseg_cli.io import sources
from clipseg_cli.io.masks import MaskError, read_mask
from clipseg_cli.ops.prompts import engineer_reference
from clipseg_cli.ops.transforms import resize_rgb
from clipseg_cli.train.config import ManifestError, TrainConfig
from clipseg_cli.train.manifest import Example

# At most this many examples (prompts) of one image per step: bounds the decoder's cost.
MAX_PROMPTS_PER_IMAGE = 8


# -- one example's files --------------------------------------------------------------------------


def load_rgb(path: Path) -> np.ndarray:
    """uint8 ``[H, W, 3]``: the image as ``clipseg segment`` decodes it; a ManifestError
    naming the file when it cannot."""
    try:
        return sources.decode_image(path).rgb
    except sources.ImageDecodeError as error:
        raise ManifestError(f"{path}: {error}") from None


def load_mask(path: Path, size: tuple[int, int] | None = None) -> np.ndarray:
    """bool ``[H, W]``: the mask's foreground (:meth:`clipseg_cli.io.masks.MaskArray.foreground`).

    Args:
        path: a mask file (:func:`clipseg_cli.io.masks.read_mask` says which ones are).
        size: ``(H, W)`` the mask must have (its image's size).

    Raises:
        ManifestError: (one line naming the file) not a usable mask, or a size mismatch.
    """
    try:
        mask = read_mask(path)
    except MaskError as error:
        raise ManifestError(f"{path}: {error}") from None
    shape = mask.values.shape
    if size is not None and shape != tuple(size):
        raise ManifestError(
            f"{path}: mask is {shape[1]}x{shape[0]} but its image is {size[1]}x{size[0]}"
        )
    return mask.foreground()


def soft_target(mask: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """bool ``[H, W]`` -> float32 ``[h, w]`` in [0, 1] at the model size (area-weighted edges)."""
    image = Image.fromarray(mask.astype(np.uint8) * 255)
    if image.size != (size[1], size[0]):
        image = image.resize((size[1], size[0]), Image.BILINEAR)
    return np.asarray(image, np.float32) / 255.0


def engineered_reference(example: Example, size: tuple[int, int]) -> np.ndarray:
    """uint8 ``[*size, 3]``: a positive example as a visual prompt, engineered as ``clipseg
    segment`` engineers ``--ref`` images (:func:`clipseg_cli.ops.prompts.engineer_reference`)."""
    assert example.mask is not None  # references are positive examples
    rgb = load_rgb(example.image)
    return engineer_reference(rgb, load_mask(example.mask, rgb.shape[:2]), size=size)


# -- planning -------------------------------------------------------------------------------------


class ReferencePool:
    """Positive examples by class, to draw visual prompts from (never the same image)."""

    def __init__(self, examples: Sequence[Example]) -> None:
        self.by_label: dict[str, list[Example]] = {}
        for example in examples:
            if example.mask is not None:
                self.by_label.setdefault(example.label, []).append(example)

    def draw(self, example: Example, rng: np.random.Generator) -> Example | None:
        """A positive example of ``example``'s class from another image; None if none."""
        candidates = self.by_label.get(example.label, [])
        if not candidates or (len(candidates) == 1 and candidates[0].image == example.image):
            return None
        for _ in range(8):
            pick = candidates[int(rng.integers(len(candidates)))]
            if pick.image != example.image:
                return pick
        others = [c for c in candidates if c.image != example.image]
        return others[int(rng.integers(len(others)))] if others else None


@dataclass
class ImagePlan:
    """What one image contributes to a step (decided in the main thread, for determinism)."""

    image: Path
    examples: list[Example]
    refs: list[Example | None]  # per example: the visual prompt to use, or None for the text
    flip: bool


def plan_epoch(
    groups: list[tuple[Path, list[Example]]],
    pool: ReferencePool,
    config: TrainConfig,
    epoch: int,
) -> list[list[ImagePlan]]:
    """The batches of one epoch. A pure function of (seed, epoch): resuming replays it."""
    rng = np.random.default_rng([config.seed, epoch])
    order = rng.permutation(len(groups))
    plans = []
    for index in order:
        image, examples = groups[index]
        if len(examples) > MAX_PROMPTS_PER_IMAGE:
            keep = np.sort(rng.permutation(len(examples))[:MAX_PROMPTS_PER_IMAGE])
            examples = [examples[i] for i in keep]
        refs = [
            pool.draw(e, rng) if rng.random() < config.image_prompt_fraction else None
            for e in examples
        ]
        flip = bool(config.hflip and rng.random() < 0.5)
        plans.append(ImagePlan(image, examples, refs, flip))
    size = config.batch_size
    return [plans[i : i + size] for i in range(0, len(plans), size)]


# -- loading --------------------------------------------------------------------------------------


@dataclass
class Batch:
    """Loaded tensors of one step; K_b prompts for image b, R visual prompts."""

    pixels: torch.Tensor  # uint8 [B, S, S, 3]
    targets: list[torch.Tensor]  # per image float32 [K_b, S, S]
    prompts: list[list[str]]  # per image, its K_b prompts
    ref_index: list[list[int]]  # per image and prompt: index into ref_pixels, or -1 for text
    ref_pixels: torch.Tensor | None  # uint8 [R, S, S, 3]
    ref_prompts: list[str]  # the text prompt each visual prompt stands for
    ref_labels: list[str]
    labels: list[list[str]]  # per image, the class of each of its K_b prompts
    positive: list[list[bool]]  # per image and prompt: has a mask (False: names nothing)


def _image_and_targets(plan: ImagePlan, size: tuple[int, int]) -> tuple[np.ndarray, torch.Tensor]:
    """The plan's image at the model size, and one soft target per example (zeros for a
    negative), mirrored together when the plan says so."""
    rgb = load_rgb(plan.image)
    masks = [
        load_mask(e.mask, rgb.shape[:2]) if e.mask is not None else None for e in plan.examples
    ]
    if plan.flip:
        rgb = rgb[:, ::-1]
        masks = [m[:, ::-1] if m is not None else None for m in masks]
    targets = [soft_target(m, size) if m is not None else np.zeros(size, np.float32) for m in masks]
    return resize_rgb(np.ascontiguousarray(rgb), size), torch.from_numpy(np.stack(targets))


def load_batch(plans: list[ImagePlan], size: tuple[int, int]) -> Batch:
    """Decode what ``plans`` name into the tensors of one step (``size``: the model's input)."""
    images, targets, prompts, ref_index, labels, positive = [], [], [], [], [], []
    ref_images: list[np.ndarray] = []
    ref_prompts: list[str] = []
    ref_labels: list[str] = []
    for plan in plans:
        image, target = _image_and_targets(plan, size)
        images.append(image)
        targets.append(target)
        prompts.append([e.prompt for e in plan.examples])
        labels.append([e.label for e in plan.examples])
        positive.append([e.mask is not None for e in plan.examples])
        indices = []
        for example, ref in zip(plan.examples, plan.refs, strict=True):
            if ref is None:
                indices.append(-1)
                continue
            indices.append(len(ref_images))
            ref_images.append(engineered_reference(ref, size))
            ref_prompts.append(example.prompt)
            ref_labels.append(example.label)
        ref_index.append(indices)
    return Batch(
        pixels=torch.from_numpy(np.stack(images)),
        targets=targets,
        prompts=prompts,
        ref_index=ref_index,
        ref_pixels=torch.from_numpy(np.stack(ref_images)) if ref_images else None,
        ref_prompts=ref_prompts,
        ref_labels=ref_labels,
        labels=labels,
        positive=positive,
    )
