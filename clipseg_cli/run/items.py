"""What is done to one input, whatever the engine: decode it, predict a batch, write its outputs,
and the log row that says how it went.

Every engine schedules exactly these functions (through :class:`clipseg_cli.run.steps.ItemSteps`),
so a local run and a Ray run decode, predict and write the same way, byte for byte.

Log rows (README, "Log and summary"): ``input``, ``key``, ``status`` (ok / failed / skipped),
``error``, ``width``, ``height``, ``mode``, ``prompts`` (per-prompt stats), ``outputs``
(``[{prompt, kind, path}]``), ``timings``; the pipeline adds ``run``. Rows of inputs without
outputs come from :func:`clipseg_cli.run.inputs.failure_row`.
"""

from __future__ import annotations

import functools
import os
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np

from clipseg_cli.backends.base import ImageBackend
from clipseg_cli.errors import InputError, disk_full
from clipseg_cli.io import sources, writers
from clipseg_cli.io.exports import yolo
from clipseg_cli.io.palette import label_palette
from clipseg_cli.io.paths import display_path
from clipseg_cli.ops import compose, instances, tiles
from clipseg_cli.ops.matting import GuidedRefinement
from clipseg_cli.ops.prompts import apply_negatives
from clipseg_cli.ops.shape import MaskShaping, feathered
from clipseg_cli.ops.tiles import TileGrid
from clipseg_cli.ops.transforms import probabilities_at_size, resize_rgb, sigmoid, upsampled
from clipseg_cli.run.config import SegmentConfig
from clipseg_cli.run.inputs import Work, failure_row
from clipseg_cli.run.ledger import InputSignature
from clipseg_cli.run.outputs import FileSink, Output, OutputSink
from clipseg_cli.run.promptset import Conditional
from clipseg_cli.sam import refiner_for


@dataclass
class Prepared:
    """A decoded input, ready for the model: its rows of the model's batch are the whole image,
    then its tiles (``--tiles``), each uint8 ``[h, w, 3]`` at the model's input size."""

    work: Work
    image: sources.DecodedImage
    model_inputs: list[np.ndarray]
    grid: TileGrid | None  # where the tiles lie; None without tiles
    decode_seconds: float


@dataclass
class Failed:
    """An input that could not be decoded."""

    work: Work
    error: str


@dataclass
class Prediction:
    """One image's model output, kept at the model's resolution until it is written.

    Full-size probabilities are made one prompt at a time by :meth:`probabilities`: holding
    all K of them (K x H x W float32, 16 MB for 5 prompts on a 1024x768 photo) for every
    image in flight would make memory grow with the prompt count.

    Attributes:
        low_res_logits: float32 ``[K + N, h, w]``: the whole image's logits, the K positive
            prompts, then N negatives.
        positives: K.
        size: ``(H, W)``, the image's size.
        tile_logits: float32 ``[T, K + N, h, w]``, the logits of the tiles of ``grid``, or None.
        grid: where the tiles lie (:mod:`clipseg_cli.ops.tiles`), or None.
    """

    low_res_logits: np.ndarray
    positives: int
    size: tuple[int, int]
    tile_logits: np.ndarray | None = None
    grid: TileGrid | None = None
    # The negatives' full-size probabilities, made once when the first prompt needs them.
    _negative_probs: np.ndarray | None = field(default=None, init=False, repr=False)

    @property
    def logits(self) -> np.ndarray:
        """float32 ``[K, h, w]``: the positive prompts' raw logits of the whole image."""
        return self.low_res_logits[: self.positives]

    def probabilities(self, k: int) -> np.ndarray:
        """float32 ``[H, W]``: prompt ``k``'s probability at the image's size, negatives applied:
        ``p * (1 - max_n p_negative_n)``.

        Without tiles: sigmoid, then bilinear upsampling, as a transformers user writes it.
        With tiles: the whole image's and the stitched tiles' logits at the image's size,
        combined (:func:`clipseg_cli.ops.tiles.combine`), then the sigmoid.
        """
        has_negatives = self.low_res_logits.shape[0] > self.positives
        if self.grid is None:
            prob = probabilities_at_size(self.low_res_logits[k : k + 1], self.size)
            if has_negatives and self._negative_probs is None:
                negatives = self.low_res_logits[self.positives :]
                self._negative_probs = probabilities_at_size(negatives, self.size)
        else:
            prob = sigmoid(self._tiled_logits(k))[None]
            if has_negatives and self._negative_probs is None:
                # One full-size map at a time: a running maximum over the negatives.
                strongest = self._tiled_logits(self.positives)
                for n in range(self.positives + 1, self.low_res_logits.shape[0]):
                    np.maximum(strongest, self._tiled_logits(n), out=strongest)
                self._negative_probs = sigmoid(strongest)[None]
        if has_negatives:
            prob = apply_negatives(prob, self._negative_probs)
        return prob[0]

    def _tiled_logits(self, index: int) -> np.ndarray:
        whole = upsampled(self.low_res_logits[index : index + 1], self.size)[0]
        return tiles.combine(whole, tiles.stitch(self.tile_logits[:, index], self.grid))


# -- decode and predict ---------------------------------------------------------------------------


def prepare_item(work: Work, config: SegmentConfig, size: tuple[int, int]) -> Prepared | Failed:
    """Decode one input and make its model rows (the whole image, then its tiles); a decode
    problem becomes :class:`Failed`."""
    start = time.perf_counter()
    try:
        source = work.item.path if work.item.data is None else work.item.data
        image = sources.decode_image(
            source, max_pixels=config.max_pixels, allow_truncated=config.allow_truncated
        )
    except sources.ImageDecodeError as error:
        return Failed(work, str(error))
    if work.item.data is None and InputSignature.of(work.item.path) != work.signature:
        # Read while something wrote to it: these pixels may be half a file, and the ledger
        # would record them under a size and time they do not belong to. (Bytes in memory, an
        # upload to the server, cannot change while they are read.)
        return Failed(work, "the file changed while it was read; it is read again once it settles")
    return prepared_from(work, image, config, size, start)


def prepare_decoded(
    work: Work, image: sources.DecodedImage, config: SegmentConfig, size: tuple[int, int]
) -> Prepared:
    """The model rows of an image decoded elsewhere (a video's frame)."""
    return prepared_from(work, image, config, size, time.perf_counter())


def prepared_from(
    work: Work,
    image: sources.DecodedImage,
    config: SegmentConfig,
    size: tuple[int, int],
    start: float,
) -> Prepared:
    """An image's model rows: the whole image, then its tiles."""
    rows = [resize_rgb(image.rgb, size)]
    count = tiles.tiles_along_short_side(config.tiles, image.rgb.shape[:2], min(size))
    grid = tiles.tile_grid(image.rgb.shape[:2], count) if count else None
    if grid is not None:
        rows += [
            resize_rgb(np.ascontiguousarray(crop), size)
            for crop in tiles.tile_crops(image.rgb, grid)
        ]
    return Prepared(work, image, rows, grid, time.perf_counter() - start)


def predict_batch(
    model: ImageBackend,
    rows: list[np.ndarray],
    conditionals: np.ndarray,
    pad_to: int | None = None,
) -> np.ndarray:
    """float32 logits ``[len(rows), K + N, h, w]`` for uint8 rows ``[h, w, 3]`` at the model
    size and float32 conditionals ``[K + N, D]``.

    ``pad_to``: run a short batch padded with blank rows to this size. The model's kernels
    round differently for different batch sizes (last-bit differences), but not for different
    companions in a batch of the same size: padding makes each row's numbers independent of
    how rows happened to be grouped (the last batch, a resumed run, another engine).
    """
    inputs = list(rows)
    if pad_to is not None and len(inputs) < pad_to:
        inputs += [np.zeros_like(inputs[0])] * (pad_to - len(inputs))
    return model.logits(np.stack(inputs), conditionals)[: len(rows)]


class RowBatcher:
    """Model batches of exactly ``size`` rows from prepared images (tiles are just more rows),
    and each image's :class:`Prediction` once all its rows are back.

    Rows keep their images' order, and an image's rows may span batches; images come back in
    the order they were added.
    """

    def __init__(self, size: int, positives: int) -> None:
        self.size = size
        self.positives = positives
        self._rows: deque[tuple[Prepared, int]] = deque()  # not yet predicted
        self._images: deque[Prepared] = deque()  # not yet complete, in order
        self._logits: dict[int, np.ndarray] = {}  # id(prepared) -> [R, K + N, h, w]
        self._done: dict[int, int] = {}  # id(prepared) -> rows predicted

    def add(self, prepared: Prepared) -> None:
        self._images.append(prepared)
        self._done[id(prepared)] = 0
        self._rows.extend((prepared, index) for index in range(len(prepared.model_inputs)))

    def __len__(self) -> int:
        """Rows waiting for the model."""
        return len(self._rows)

    def next_rows(self) -> list[tuple[Prepared, int]]:
        """Up to :attr:`size` rows for the next model call (fewer only at the end)."""
        return [self._rows.popleft() for _ in range(min(self.size, len(self._rows)))]

    def accept(
        self, rows: list[tuple[Prepared, int]], logits: np.ndarray
    ) -> list[tuple[Prepared, Prediction]]:
        """Take a batch's logits; returns the images that are now complete, in order."""
        for (prepared, index), row_logits in zip(rows, logits, strict=True):
            key = id(prepared)
            if key not in self._logits:
                self._logits[key] = np.empty(
                    (len(prepared.model_inputs), *row_logits.shape), np.float32
                )
            self._logits[key][index] = row_logits
            self._done[key] += 1
        complete = []
        while self._images and self._done[id(self._images[0])] == len(self._images[0].model_inputs):
            prepared = self._images.popleft()
            del self._done[id(prepared)]
            logits = self._logits.pop(id(prepared))
            size = prepared.image.rgb.shape[:2]
            tile_logits = logits[1:] if prepared.grid is not None else None
            prediction = Prediction(logits[0], self.positives, size, tile_logits, prepared.grid)
            complete.append((prepared, prediction))
        return complete


# -- write -----------------------------------------------------------------------------------------


class LabelMap:
    """The ``labels`` output, built one prompt at a time: 1 + the index of the most probable
    prompt where its probability passes the threshold, else 0 (background). Ties go to the
    earlier prompt."""

    def __init__(self, size: tuple[int, int]) -> None:
        self._best = np.full(size, -np.inf, np.float32)
        self._label = np.zeros(size, np.uint8)

    def add(self, k: int, prob: np.ndarray, mask: np.ndarray | None = None) -> None:
        """Take prompt ``k``'s probabilities, float ``[H, W]``, into account, where its mask
        (bool ``[H, W]``; default: everywhere) lets it."""
        better = prob > self._best
        if mask is not None:
            better &= mask
        self._best[better] = prob[better]
        self._label[better] = k + 1

    def labels(self, threshold: float) -> np.ndarray:
        """uint8 ``[H, W]``: the best prompt where it passed ``threshold`` (and its mask)."""
        return np.where(self._best > threshold, self._label, np.uint8(0))


@dataclass
class _PromptOutputs:
    """What one prompt's outputs of one image are made from."""

    rgb: np.ndarray  # uint8 [H, W, 3], the image as displayed
    prob: np.ndarray  # float32 [H, W]: refined, negatives applied
    mask: np.ndarray  # bool [H, W]: prob > threshold, shaped (ops.shape)
    soft: np.ndarray  # float32 [H, W]: prob, or the feathered mask with --feather
    alpha: np.ndarray  # float32 [H, W]: mattes' and soft cutouts' alpha
    logits: np.ndarray  # float32 [h, w] at the model's resolution
    instance_ids: np.ndarray | None  # uint16 [H, W] (0: background) when instances are made
    background: Callable[[], np.ndarray]  # the composite's background, made once per image


def _cutout(out: _PromptOutputs, config: SegmentConfig) -> np.ndarray:
    hard = config.command == "segment" and config.cutout_alpha == "mask" and not config.feather
    return writers.cutout_pixels(out.rgb, out.mask if hard else out.alpha)


def _composite(out: _PromptOutputs, _config: SegmentConfig) -> np.ndarray:
    return compose.composite(out.rgb, out.alpha, out.background())


Pixels = Callable[[_PromptOutputs, SegmentConfig], np.ndarray]

#: Each per-prompt ``--save`` kind: what it shows (pixels) and how its file is encoded (labels
#: are made once per image).
PROMPT_OUTPUTS: dict[str, tuple[Pixels, Callable[[np.ndarray], bytes]]] = {
    "mask": (lambda out, _config: writers.mask_pixels(out.mask), writers.mask_pixels_png),
    "soft": (
        lambda out, config: writers.soft_pixels(out.soft, config.soft_bits),
        writers.image_png,
    ),
    "overlay": (lambda out, _config: writers.overlay_pixels(out.rgb, out.mask), writers.image_png),
    "cutout": (_cutout, writers.image_png),
    "logits": (lambda out, _config: out.logits, writers.logits_npy),
    "matte": (
        lambda out, config: writers.soft_pixels(out.alpha, config.soft_bits),
        writers.image_png,
    ),
    "composite": (_composite, writers.image_png),
    "instances": (lambda out, _config: out.instance_ids, writers.instance_ids_png),
}


@functools.lru_cache(maxsize=1)
def _background_image(path: str) -> np.ndarray:
    """A ``--background`` image file, decoded once per process rather than once per image."""
    return sources.decode_image(Path(path)).rgb


def composite_background(rgb: np.ndarray, background: str) -> np.ndarray:
    """uint8 ``[H, W, 3]`` background for ``composite``: ``blur`` (the image itself, heavily
    blurred), a colour (``white``, ``#00ff00``, ``0,255,0``), or an image file (resized to
    cover)."""
    if background == "blur":
        return compose.blurred(rgb)
    colour = compose.parse_colour(background)
    if colour is not None:
        return compose.plain(colour, rgb.shape[:2])
    return compose.cover(_background_image(background), rgb.shape[:2])


def _prompt_stats(prob: np.ndarray, mask: np.ndarray, conditional: Conditional) -> dict:
    return {
        "prompt": conditional.label,
        "max": round(float(prob.max()), 6),
        "mean": round(float(prob.mean()), 6),
        "coverage": round(float(mask.mean()), 6),
        "empty": not mask.any(),
    }


def image_refiner(rgb: np.ndarray, config: SegmentConfig) -> Callable[[np.ndarray], np.ndarray]:
    """``--refine`` for one image: a prompt's probability at the image's size -> the refined
    probability every output but ``logits`` is made from. Made once per image, so that the
    guided filter fits the image's side once for all of its prompts."""
    if config.refine == "none":
        return lambda prob: prob
    if config.refine == "guided":
        guided = GuidedRefinement(rgb)
        return lambda prob: guided.refine(prob, config.threshold)
    sam = refiner_for(config.sam_model, config.device)
    return lambda prob: sam.refine(rgb, prob, config.threshold)


class FrameHooks(Protocol):
    """What a video's frame adds to :func:`write_item` (:mod:`.frames`)."""

    def probability(self, k: int) -> np.ndarray:
        """Prompt ``k``'s probability at the frame's size, smoothed over time."""
        ...

    def observe(self, k: int, prob: np.ndarray, mask: np.ndarray) -> None: ...


@dataclass(frozen=True)
class Written:
    """One image's outputs are written (to the sink): its log row, its part of the exports (its
    image and instances, see :mod:`clipseg_cli.io.exports`) when the run exports, and its
    instances when they were made (the server answers with their RLE)."""

    row: dict
    part: dict | None = None
    instances: tuple[instances.Instance, ...] = ()


def write_item(
    prepared: Prepared,
    prediction: Prediction,
    config: SegmentConfig,
    conditionals: list[Conditional],
    sink: OutputSink | None = None,
    frame: FrameHooks | None = None,
) -> Written:
    """Make every requested output of one image and hand it to ``sink`` (default: files under
    ``--out``, see :mod:`.outputs`). A video's frame comes with its ``frame`` hooks: each
    prompt's probability is smoothed over time before anything is made from it, and what the
    outputs were made from is shown to the flicker measures.

    Raises:
        InputError: the image cannot be finished (``--grow`` larger than it, SAM failed).
    """
    start = time.perf_counter()
    rgb = prepared.image.rgb
    if sink is None:
        sink = FileSink(config.out_dir, prepared.work.out_key)
    background = functools.cache(lambda: composite_background(rgb, config.background))
    refine = image_refiner(rgb, config)
    stats, found = [], []
    labels = LabelMap(rgb.shape[:2]) if "labels" in config.save else None
    for k, conditional in enumerate(conditionals):
        prob = prediction.probabilities(k) if frame is None else frame.probability(k)
        prob, logits = refine(prob), prediction.logits[k]
        out, instances, counts = _prompt_outputs(
            rgb, prob, logits, k, config, 1 + len(found), background
        )
        if frame is not None:
            frame.observe(k, out.prob, out.mask)
        stats.append(_prompt_stats(out.prob, out.mask, conditional) | counts)
        found += instances
        if labels is not None:
            labels.add(k, out.prob, out.mask)
        for kind in config.save:
            if kind in PROMPT_OUTPUTS:
                pixels, encoder = PROMPT_OUTPUTS[kind]
                output = Output(
                    kind, conditional.label, conditional.slug, pixels(out, config), encoder
                )
                sink.put(output)
    if labels is not None:
        encoder = functools.partial(writers.labels_png, palette=label_palette(len(conditionals)))
        sink.put(Output("labels", None, None, labels.labels(config.threshold), encoder))
    height, width = rgb.shape[:2]
    row = {
        "input": display_path(prepared.work.item.path),
        "key": prepared.work.key,
        "status": "ok",
        "error": None,
        "width": width,
        "height": height,
        "mode": prepared.image.mode,
        "prompts": stats,
        "outputs": sink.records,
    }
    if config.wants_instances:
        row["instances"] = [i.row(conditionals[i.prompt].label) for i in found]
    row["timings"] = {
        "decode_s": round(prepared.decode_seconds, 4),
        "write_s": round(time.perf_counter() - start, 4),
    }
    # A video's frame: the video makes its frames' parts (run.frames), from the instances.
    part = export_part(prepared, found, config) if config.exports and frame is None else None
    return Written(row, part, tuple(found))


def _prompt_outputs(
    rgb: np.ndarray,
    prob: np.ndarray,
    logits: np.ndarray,
    k: int,
    config: SegmentConfig,
    first_id: int,
    background: Callable[[], np.ndarray],
) -> tuple[_PromptOutputs, list[instances.Instance], dict]:
    """Prompt ``k``'s shaped mask, soft map, alpha and instances from its refined ``prob``
    (``logits``: its raw low-resolution logits, for ``--save logits``), and the log's counts of
    its instances and of the objects each floor dropped."""
    shaping = MaskShaping(
        config.grow, config.fill_holes, config.min_area, config.invert, config.feather
    )
    min_area = shaping.min_area_for(prob.shape)
    rules = instances.InstanceRules(config.split, config.min_score, min_area)
    objects, small = instances.shaped_objects(prob, config.threshold, shaping, rules)
    mask = objects.mask
    soft = feathered(mask, config.feather) if config.feather else prob
    if config.feather:
        alpha = soft
    else:
        alpha = mask.astype(np.float32) if shaping.changes_the_mask else prob
    ids, found, capped = None, [], 0
    if config.wants_instances:
        ids, found, capped = instances.make_instances(objects, k, first_id)
    out = _PromptOutputs(rgb, prob, mask, soft, alpha, logits, ids, background)
    counts = {
        "instances": len(found) if config.wants_instances else len(objects.order),
        "dropped": {"min_area": small, "min_score": objects.dropped, "cap": capped},
    }
    return out, found, counts


def export_part(prepared: Prepared, found: list[instances.Instance], config: SegmentConfig) -> dict:
    """One image's part of the exports: where it is, its size, its instances."""
    height, width = prepared.image.rgb.shape[:2]
    source = os.path.abspath(prepared.work.item.path)  # noqa: PTH100 - keep links as named
    part = {
        "key": prepared.work.key,
        "source": display_path(source),
        "width": width,
        "height": height,
        "instances": instance_parts(found),
    }
    if "yolo" in config.exports and not yolo.readable(prepared.work.item.path):
        # The YOLO loader cannot read this format: the export links a PNG of it instead.
        converted = yolo.converted_image_path(config.out_dir, prepared.work.out_key)
        writers.write_rgb(converted, prepared.image.rgb)
        part["converted"] = display_path(converted)
    return part


def instance_parts(found: list[instances.Instance]) -> list[dict]:
    """An image's instances as its export part holds them."""
    return [
        {
            "prompt": i.prompt,
            "id": i.id,
            "rle": i.rle,
            "area": i.area,
            "bbox": list(i.bbox),
            "score": round(i.score, 6),
            "polygon": list(i.polygon),
        }
        for i in found
    ]


def write_or_fail(
    prepared: Prepared,
    prediction: Prediction,
    config: SegmentConfig,
    conditionals: list[Conditional],
) -> Written:
    """Write outputs; a disk problem for one image becomes its failed row.

    Raises:
        DiskFullError: the disk is full (or over quota, or read-only): the run must stop.
    """
    try:
        return write_item(prepared, prediction, config, conditionals)
    except InputError as error:
        path, key = display_path(prepared.work.item.path), prepared.work.key
        return Written(failure_row(path, key, str(error)))
    except OSError as error:
        what = display_path(error.filename) if error.filename else "the outputs"
        stop = disk_full(error, what)
        if stop is not None:
            raise stop from None
        reason = f"cannot write outputs: {error.strerror or error}"
        return Written(
            failure_row(display_path(prepared.work.item.path), prepared.work.key, reason)
        )


def failure_for(failed: Failed) -> dict:
    """The log row of an input that could not be decoded."""
    return failure_row(display_path(failed.work.item.path), failed.work.key, failed.error)
