"""The streaming segment run: decode workers -> batched model -> writer threads.

Engine-independent item functions (:func:`prepare_item`, :func:`predict_batch`,
:func:`write_item`) hold all per-item logic; :func:`run_segment` only schedules them, with
bounded queues so memory stays flat whatever the number of inputs. Nothing here prints or exits:
progress goes to a callback, problems become log rows or exceptions.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import TextIO

import numpy as np
import torch

from . import __version__, sources, writers
from .config import SegmentConfig
from .predictor import Segmenter
from .transforms import probabilities_at_size, resize_rgb, stack_uint8


class NoInputsError(Exception):
    """Nothing to process: the inputs named no files at all."""


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


@dataclass
class Progress:
    """Counts so far, for the CLI's progress display."""

    done: int
    total: int
    ok: int
    failed: int
    elapsed: float


@dataclass
class RunSummary:
    """What a run did; also written as JSON next to the log."""

    total: int = 0
    ok: int = 0
    failed: int = 0
    empty: int = 0
    seconds: float = 0.0
    log_path: Path | None = None
    summary_path: Path | None = None
    details: dict = field(default_factory=dict)

    @property
    def images_per_second(self) -> float:
        return self.ok / self.seconds if self.seconds > 0 else 0.0


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


def failure_row(item_path: str, key: str | None, error: str, status: str = "failed") -> dict:
    return {
        "input": item_path,
        "key": key,
        "status": status,
        "error": error,
        "width": None,
        "height": None,
        "prompts": [],
        "outputs": [],
        "timings": {},
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


# -- the run --------------------------------------------------------------------------------------


def _prepared_stream(
    items: list[sources.InputItem],
    out_keys: dict[PurePosixPath, PurePosixPath],
    config: SegmentConfig,
    size: tuple[int, int],
    pool: ThreadPoolExecutor,
) -> Iterator[Prepared | Failed]:
    """Decode in the pool, yield in input order, with at most ``ahead`` decodes in flight."""
    ahead = config.batch_size * 2 + config.workers
    pending: deque[Future] = deque()
    for item in items:
        pending.append(pool.submit(prepare_item, item, out_keys[item.key], config, size))
        if len(pending) >= ahead:
            yield pending.popleft().result()
    while pending:
        yield pending.popleft().result()


def _batches(stream: Iterator[Prepared | Failed], size: int) -> Iterator[tuple[list, list]]:
    """Group prepared items into model batches; failures pass through with the next batch."""
    batch: list[Prepared] = []
    failures: list[Failed] = []
    for entry in stream:
        if isinstance(entry, Failed):
            failures.append(entry)
            continue
        batch.append(entry)
        if len(batch) == size:
            yield batch, failures
            batch, failures = [], []
    if batch or failures:
        yield batch, failures


def _versions() -> dict:
    import open_clip
    import PIL

    return {
        "clipseg_cli": __version__,
        "torch": torch.__version__,
        "open_clip": open_clip.__version__,
        "numpy": np.__version__,
        "pillow": PIL.__version__,
    }


def run_segment(
    config: SegmentConfig,
    *,
    stdin: TextIO | None = None,
    segmenter: Segmenter | None = None,
    on_progress: Callable[[Progress], None] | None = None,
) -> RunSummary:
    """Run ``clipseg segment`` end to end.

    Raises:
        NoInputsError: the inputs named no files.
        ValueError: a prompt or option problem found while starting (bad ``--ref`` image).
        WeightsError: the model could not be loaded.
    """
    started = time.perf_counter()
    sources.configure_pillow_limits(config.max_pixels)
    listing = sources.collect_inputs(config.inputs, stdin=stdin, exclude=[config.out_dir])
    if not listing.items and not listing.missing and not listing.unreadable:
        raise NoInputsError("no input files found in " + ", ".join(config.inputs))
    if not listing.items:
        problems = listing.missing + [sources.display_path(p) for p, _ in listing.unreadable]
        raise NoInputsError("no input files found: " + ", ".join(problems))

    if segmenter is None:
        segmenter = Segmenter.load(
            config.model,
            clip_weights=config.clip_weights,
            device=config.device,
            precision=config.precision,
        )
    conditionals, labels = build_conditionals(segmenter, config)
    segmenter.release_prompt_encoders()

    out_keys = writers.casefold_collisions(item.key for item in listing.items)
    summary = RunSummary(
        total=len(listing.items) + len(listing.missing) + len(listing.unreadable),
        log_path=config.resolved_log_path,
        summary_path=config.resolved_summary_path,
    )
    config.out_dir.mkdir(parents=True, exist_ok=True)
    keep_logits = "logits" in config.save
    infer_seconds = 0.0

    with (
        writers.JsonlLog(config.resolved_log_path) as log,
        ThreadPoolExecutor(config.workers, thread_name_prefix="decode") as decoders,
        ThreadPoolExecutor(config.writer_threads, thread_name_prefix="write") as writer_pool,
    ):

        def record(row: dict) -> None:
            log.write(row)
            if row["status"] == "ok":
                summary.ok += 1
                summary.empty += any(p["empty"] for p in row["prompts"])
            else:
                summary.failed += 1
            if on_progress is not None:
                done = summary.ok + summary.failed
                elapsed = time.perf_counter() - started
                on_progress(Progress(done, summary.total, summary.ok, summary.failed, elapsed))

        for spec in listing.missing:
            record(failure_row(spec, None, "no such file or no match"))
        for folder, reason in listing.unreadable:
            record(failure_row(sources.display_path(folder), None, f"unreadable folder: {reason}"))

        # Writes finish out of order; log rows are emitted in input order, and the number of
        # images held by unfinished writes is bounded.
        writes: deque[Future] = deque()
        max_pending_writes = config.batch_size * 2

        def drain(limit: int) -> None:
            while len(writes) > limit:
                record(writes.popleft().result())

        stream = _prepared_stream(listing.items, out_keys, config, segmenter.input_size, decoders)
        for batch, failures in _batches(stream, config.batch_size):
            for failed in failures:
                writes.append(_done(_failure_for(failed)))
            if batch:
                infer_start = time.perf_counter()
                results = predict_batch(segmenter, batch, conditionals, keep_logits)
                infer_seconds += time.perf_counter() - infer_start
                for prepared, (probs, logits) in zip(batch, results, strict=True):
                    writes.append(
                        writer_pool.submit(_write_or_fail, prepared, probs, logits, config, labels)
                    )
            drain(max_pending_writes)
        drain(0)

    summary.seconds = time.perf_counter() - started
    summary.details = {
        "command": "segment",
        "counts": {
            "total": summary.total,
            "ok": summary.ok,
            "failed": summary.failed,
            "with_empty_prompt": summary.empty,
        },
        "seconds": round(summary.seconds, 3),
        "inference_seconds": round(infer_seconds, 3),
        "images_per_second": round(summary.images_per_second, 3),
        "config": config.describe(),
        "prompts": [{"label": c.label, "slug": c.slug} for c in labels],
        "labels_legend": {str(i + 1): c.label for i, c in enumerate(labels)} | {"0": "background"},
        "model": {
            "id": segmenter.info.model_id,
            "layout": segmenter.info.layout,
            "variant": segmenter.info.variant,
            "files": list(segmenter.info.files),
            "sha256": segmenter.info.sha256,
        },
        "device": str(segmenter.device),
        "dtype": str(segmenter.dtype).removeprefix("torch."),
        "versions": _versions(),
        "log": str(config.resolved_log_path),
    }
    writers.write_json_atomic(config.resolved_summary_path, summary.details)
    return summary


def _done(row: dict) -> Future:
    future: Future = Future()
    future.set_result(row)
    return future


def _failure_for(failed: Failed) -> dict:
    return failure_row(
        sources.display_path(failed.item.path), sources.display_path(failed.item.key), failed.error
    )


def _write_or_fail(
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
        reason = f"cannot write outputs: {error.strerror or error}"
        return failure_row(
            sources.display_path(prepared.item.path),
            sources.display_path(prepared.item.key),
            reason,
        )
