"""A run's prompts, embedded once: text prompts, image prompts (``--ref``), their mix, the
negatives, or a prompt file saved by an earlier run.

Also which parts of the model each phase of a run loads: the prompt phase only what the
prompts need (the text tower, or the whole image tower for ``--ref``), the segmentation phase
vision blocks 0-9 and the decoder, so the whole model is never resident at once.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from clipseg_cli.io import sources
from clipseg_cli.io.conditionals import load_conditionals, save_conditionals
from clipseg_cli.io.masks import MaskError, read_mask
from clipseg_cli.io.naming import prompt_slugs
from clipseg_cli.ops.prompts import (
    average_conditionals,
    engineer_reference,
    mix_conditionals,
    reference_mask_from_alpha,
)
from clipseg_cli.run.config import SegmentConfig
from clipseg_cli.segmenter import Segmenter
from clipseg_cli.weights import WeightsInfo

#: What segmenting needs: the vision blocks the decoder reads, and the decoder.
SEGMENTATION_PARTS = frozenset({"vision", "decoder"})


def prompt_parts(config: SegmentConfig) -> frozenset[str]:
    """The parts of the model the prompt phase loads (see the module docstring)."""
    if config.prompt_embedding is not None:
        return SEGMENTATION_PARTS  # the file is checked against these weights, then segments
    parts = {"text"} if config.prompts or config.negatives else set()
    if config.refs:
        parts |= {"vision", "image_head"}
    return frozenset(parts)


@dataclass(frozen=True)
class Conditional:
    """One prompt: its label (text, or ``ref:<path>``) and its file-name slug."""

    label: str
    slug: str


def tensor_sha256(tensor: torch.Tensor) -> str:
    """sha256 of a tensor's float32 bytes (records which conditionals a run used)."""
    data = tensor.detach().float().cpu().contiguous().numpy().tobytes()
    return hashlib.sha256(data).hexdigest()


@dataclass
class PromptSet:
    """Every conditional of a run, embedded once.

    ``vectors`` is ``[K + N, D]``: K positive prompts (each gets outputs) followed by N negative
    prompts (never written; they suppress: ``p_k * (1 - max_n p_neg_n)``).
    """

    vectors: torch.Tensor
    positives: list[Conditional]
    negatives: list[str]

    @property
    def count(self) -> int:
        return len(self.positives)


def _reference_image(ref: Path, mask_path: Path | None, config: SegmentConfig) -> np.ndarray:
    """The support image CLIP encodes: engineered around its object when a mask is known
    (``--ref-mask`` or the reference's own alpha), raw otherwise (or with ``--ref-mode raw``).

    A ``--ref-mask`` file means what every mask file means (:func:`clipseg_cli.io.masks.read_mask`).
    """
    try:
        image = sources.decode_image(ref, max_pixels=config.max_pixels)
    except sources.ImageDecodeError as error:
        raise ValueError(f"--ref {ref}: {error}") from None
    mask = None
    if mask_path is not None:
        try:
            mask = read_mask(mask_path).foreground()
        except MaskError as error:
            raise ValueError(f"--ref-mask {mask_path}: {error}") from None
        if mask.shape != image.rgb.shape[:2]:
            raise ValueError(f"--ref-mask {mask_path}: its size differs from --ref {ref}")
    elif image.alpha is not None:
        mask = reference_mask_from_alpha(image.alpha)
    mode = config.ref_mode or ("engineered" if mask is not None else "raw")
    if mode == "raw":
        return image.rgb
    if mask is None:
        raise ValueError(f"--ref-mode engineered needs an object mask for {ref}: give --ref-mask")
    try:
        return engineer_reference(image.rgb, mask, size=None)
    except ValueError as error:
        raise ValueError(f"--ref {ref}: {error}") from None


def _load_prompt_set(segmenter: Segmenter, path: Path) -> PromptSet:
    array, labels, metadata = load_conditionals(path)
    vectors = torch.from_numpy(array)
    made_with = metadata.get("weights_sha256")
    if made_with is not None and made_with != segmenter.info.sha256:
        raise ValueError(
            f"--prompt-embedding {path} was made with other weights (sha256 {made_with[:12]}, "
            f"this model {segmenter.info.sha256[:12]}); embeddings only fit the model that "
            "made them: re-create it with --save-prompt"
        )
    if vectors.shape[1] != segmenter.model.arch.embed_dim:
        raise ValueError(
            f"--prompt-embedding {path}: vectors of size {vectors.shape[1]}, the model needs "
            f"{segmenter.model.arch.embed_dim}"
        )
    negatives = int(metadata.get("negatives", 0))
    positives = labels[: len(labels) - negatives]
    slugs = prompt_slugs(positives)
    conditionals = [Conditional(label, slug) for label, slug in zip(positives, slugs, strict=True)]
    return PromptSet(vectors, conditionals, labels[len(positives) :])


def build_prompt_set(segmenter: Segmenter, config: SegmentConfig) -> PromptSet:
    """Embed the run's prompts once (or read them from ``--prompt-embedding``).

    Several ``--ref`` images describe one object: their embeddings are averaged into one
    conditional. With ``--mix W`` each text prompt becomes ``W * text + (1 - W) * image``.
    """
    if config.prompt_embedding is not None:
        return _load_prompt_set(segmenter, config.prompt_embedding)
    labels: list[str] = []
    slug_sources: list[str] = []
    parts = []
    text = segmenter.embed_texts(config.prompts) if config.prompts else None
    image = image_label = None
    if config.refs:
        masks = list(config.ref_masks) + [None] * (len(config.refs) - len(config.ref_masks))
        pairs = zip(config.refs, masks, strict=True)
        references = [_reference_image(ref, mask, config) for ref, mask in pairs]
        image = average_conditionals(segmenter.embed_images(references))[None]
        image_label = "ref:" + ",".join(str(ref) for ref in config.refs)
    if text is not None and image is not None and config.mix is not None:
        parts.append(mix_conditionals(text, image, config.mix))
        labels += [f"{prompt} (mix {config.mix:g} with {image_label})" for prompt in config.prompts]
        slug_sources += [f"{prompt} mix ref" for prompt in config.prompts]
    else:
        if text is not None:
            parts.append(text)
            labels += list(config.prompts)
            slug_sources += list(config.prompts)
        if image is not None:
            parts.append(image)
            labels.append(image_label)
            slug_sources.append(f"ref-{Path(config.refs[0]).stem}")
    if config.negatives:
        parts.append(segmenter.embed_texts(config.negatives))
    slugs = prompt_slugs(slug_sources)
    positives = [Conditional(label, slug) for label, slug in zip(labels, slugs, strict=True)]
    return PromptSet(torch.cat(parts), positives, list(config.negatives))


def save_prompt_set(path: Path, prompts: PromptSet, info: WeightsInfo) -> None:
    """Write the run's conditionals for reuse with ``--prompt-embedding`` (then neither the
    text tower nor the reference images are needed)."""
    labels = [c.label for c in prompts.positives] + prompts.negatives
    metadata = {
        "model": info.model_id,
        "weights_sha256": info.sha256,
        "negatives": len(prompts.negatives),
    }
    save_conditionals(path, prompts.vectors.detach().float().cpu().numpy(), labels, metadata)
