"""Engine-independent item functions: decode one input, predict a batch, write one input's
outputs. The local pipeline and the Ray engine both schedule exactly these.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import numpy as np
import torch

from . import __version__, sources, writers
from .config import SegmentConfig
from .errors import FATAL_WRITE_ERRNOS, DiskFullError
from .logrows import failure_row
from .predictor import Segmenter
from .transforms import probabilities_at_size, resize_rgb, stack_uint8


@dataclass(frozen=True)
class Conditional:
    """One prompt: its label (text, or ``ref:<path>``) and its file-name slug."""

    label: str
    slug: str


@dataclass
class Prepared:
    """A decoded input, ready for the model."""

    item: sources.InputItem
    out_key: PurePosixPath
    image: sources.DecodedImage
    model_input: np.ndarray  # uint8 [h, w, 3] at the model size
    decode_seconds: float


@dataclass
class Failed:
    """An input that could not be decoded."""

    item: sources.InputItem
    error: str


# -- item functions (shared by every engine) ------------------------------------------------------


def prepare_item(
    item: sources.InputItem, out_key: PurePosixPath, config: SegmentConfig, size: tuple[int, int]
) -> Prepared | Failed:
    """Decode one input and resize it for the model; a decode problem becomes :class:`Failed`."""
    start = time.perf_counter()
    try:
        image = sources.decode_image(
            item.path, max_pixels=config.max_pixels, allow_truncated=config.allow_truncated
        )
    except sources.ImageDecodeError as error:
        return Failed(item, str(error))
    model_input = resize_rgb(image.rgb, size)
    return Prepared(item, out_key, image, model_input, time.perf_counter() - start)


def predict_batch(
    segmenter: Segmenter, batch: list[Prepared], conditionals: torch.Tensor, keep_logits: bool
) -> list[tuple[np.ndarray, np.ndarray | None]]:
    """Probabilities at each image's size ``[K, H, W]`` (and logits ``[K, h, w]`` if asked).

    Upsampling runs on the model's device; results come back with one synchronisation per
    batch rather than per image.
    """
    pixels = stack_uint8([prepared.model_input for prepared in batch])
    if segmenter.device.type == "cuda":
        pixels = pixels.pin_memory()
    logits = segmenter.logits(pixels, conditionals)
    host_probs = [
        probabilities_at_size(logits[i], prepared.image.rgb.shape[:2]).to("cpu", non_blocking=True)
        for i, prepared in enumerate(batch)
    ]
    host_logits = logits.to("cpu", non_blocking=True) if keep_logits else None
    if segmenter.device.type == "cuda":
        torch.cuda.synchronize(segmenter.device)
    return [
        (probs.numpy(), host_logits[i].numpy() if host_logits is not None else None)
        for i, probs in enumerate(host_probs)
    ]


def _prompt_stats(probs: np.ndarray, threshold: float, conditionals: list[Conditional]) -> list:
    stats = []
    for k, conditional in enumerate(conditionals):
        above = probs[k] > threshold
        coverage = float(above.mean())
        stats.append(
            {
                "prompt": conditional.label,
                "max": round(float(probs[k].max()), 6),
                "mean": round(float(probs[k].mean()), 6),
                "coverage": round(coverage, 6),
                "empty": not above.any(),
            }
        )
    return stats


def label_map(probs: np.ndarray, threshold: float) -> np.ndarray:
    """uint8 ``[H, W]``: 1 + argmax over prompts where the best probability passes the
    threshold, else 0 (background). ``probs`` is ``[K, H, W]``."""
    best = probs.argmax(axis=0)
    passes = probs.max(axis=0) > threshold
    return np.where(passes, best + 1, 0).astype(np.uint8)


def write_item(
    prepared: Prepared,
    probs: np.ndarray,
    logits: np.ndarray | None,
    config: SegmentConfig,
    conditionals: list[Conditional],
) -> dict:
    """Write every requested output of one image; returns its log row."""
    start = time.perf_counter()
    out_dir, key, rgb = config.out_dir, prepared.out_key, prepared.image.rgb
    outputs = []

    def target(kind: str, ext: str, conditional: Conditional | None) -> Path:
        path = writers.output_path(
            out_dir, key, kind, ext, conditional.slug if conditional else None
        )
        outputs.append(
            {
                "prompt": conditional.label if conditional else None,
                "kind": kind,
                "path": sources.display_path(path),
            }
        )
        return path

    for k, conditional in enumerate(conditionals):
        prob = probs[k]
        mask = prob > config.threshold
        for kind in config.save:
            if kind == "mask":
                writers.write_mask(target("mask", "png", conditional), mask)
            elif kind == "soft":
                writers.write_soft(target("soft", "png", conditional), prob, config.soft_bits)
            elif kind == "overlay":
                writers.write_overlay(target("overlay", "png", conditional), rgb, mask)
            elif kind == "cutout":
                alpha = prob if config.cutout_alpha == "soft" else mask
                writers.write_cutout(target("cutout", "png", conditional), rgb, alpha)
            elif kind == "logits":
                writers.write_logits(target("logits", "npy", conditional), logits[k])
    if "labels" in config.save:
        palette = writers.label_palette(len(conditionals))
        writers.write_labels(
            target("labels", "png", None), label_map(probs, config.threshold), palette
        )
    height, width = rgb.shape[:2]
    return {
        "input": sources.display_path(prepared.item.path),
        "key": sources.display_path(prepared.item.key),
        "status": "ok",
        "error": None,
        "width": width,
        "height": height,
        "mode": prepared.image.mode,
        "prompts": _prompt_stats(probs, config.threshold, conditionals),
        "outputs": outputs,
        "timings": {
            "decode_s": round(prepared.decode_seconds, 4),
            "write_s": round(time.perf_counter() - start, 4),
        },
    }


# -- conditionals ---------------------------------------------------------------------------------


def build_conditionals(
    segmenter: Segmenter, config: SegmentConfig
) -> tuple[torch.Tensor, list[Conditional]]:
    """Embed every text and image prompt once; ``[K, D]`` and their labels/slugs."""
    labels = list(config.prompts) + [f"ref:{ref}" for ref in config.refs]
    slug_sources = list(config.prompts) + [f"ref-{Path(ref).stem}" for ref in config.refs]
    slugs = writers.prompt_slugs(slug_sources)
    parts = []
    if config.prompts:
        parts.append(segmenter.embed_texts(config.prompts))
    if config.refs:
        images = []
        for ref in config.refs:
            try:
                images.append(sources.decode_image(Path(ref), max_pixels=config.max_pixels).rgb)
            except sources.ImageDecodeError as error:
                raise ValueError(f"--ref {ref}: {error}") from None
        parts.append(segmenter.embed_images(images))
    conditionals = torch.cat(parts)
    return conditionals, [
        Conditional(label, slug) for label, slug in zip(labels, slugs, strict=True)
    ]


def versions() -> dict:
    import open_clip
    import PIL

    return {
        "clipseg_cli": __version__,
        "torch": torch.__version__,
        "open_clip": open_clip.__version__,
        "numpy": np.__version__,
        "pillow": PIL.__version__,
    }


def failure_for(failed: Failed) -> dict:
    return failure_row(
        sources.display_path(failed.item.path), sources.display_path(failed.item.key), failed.error
    )


def write_or_fail(
    prepared: Prepared,
    probs: np.ndarray,
    logits: np.ndarray | None,
    config: SegmentConfig,
    labels: list[Conditional],
) -> dict:
    """Write outputs; a disk problem for one image becomes its failed row."""
    try:
        return write_item(prepared, probs, logits, config, labels)
    except OSError as error:
        if error.errno in FATAL_WRITE_ERRNOS:
            raise DiskFullError(
                error.errno, f"cannot write {error.filename}: {error.strerror}"
            ) from None
        reason = f"cannot write outputs: {error.strerror or error}"
        return failure_row(
            sources.display_path(prepared.item.path),
            sources.display_path(prepared.item.key),
            reason,
        )


def tensor_sha256(tensor: torch.Tensor) -> str:
    """sha256 of a tensor's float32 bytes (records which conditionals a run used)."""
    import hashlib

    data = tensor.detach().float().cpu().contiguous().numpy().tobytes()
    return hashlib.sha256(data).hexdigest()
