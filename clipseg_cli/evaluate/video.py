"""``clipseg eval`` on videos: predicted mask sequences against ground-truth mask sequences.

A sequence is a video file (a mask or soft video ``segment`` wrote, any video FFmpeg reads) or
a folder of numbered frames (``0001.png``...; the frame folders ``--sequence`` reads). Each
pair of sequences is scored frame by frame with DAVIS's J (region IoU) and F (boundary F, with
DAVIS's tolerance of 0.8% of the image diagonal), from :class:`clipseg_cli.ops.temporal.
SequenceScores`; J&F is their mean. The means over sequences are the headline (one prompt per
sequence, so DAVIS's mean over objects). Every frame counts (DAVIS's semi-supervised protocol
leaves out the first and last frames, given to the tracker; nothing is given here).

Without ground truth for a sequence the flicker measures of the prediction are still reported
(the ones every video's log row has, :class:`clipseg_cli.ops.temporal.Flicker`): the mean
absolute change of the probability between consecutive frames and the mean IoU of
consecutive masks.

Pairing (``--pred`` and ``--gt``):

* a video file or a frame folder against a video file or a frame folder: one sequence (also
  a folder holding one predicted video, as ``--images clip.mp4`` makes, against one);
* folders of sequences: a prediction ``NAME.<slug>.soft.mkv`` / ``.mask.mkv`` (what
  ``segment`` writes for ``NAME.mp4`` or a frame folder ``NAME``; other videos by their stem)
  meets the ground truth ``NAME`` (a frame folder) or ``NAME.<ext>`` (a mask video) of the
  ground-truth folder; ``--pred-slug`` keeps one prompt's, and ``soft`` wins over ``mask``.

Reading rules: prediction frames are probabilities (8-bit ``v / 255``, 16-bit ``v / 65535``),
foreground ``p > --threshold``; ground-truth frames follow :func:`clipseg_cli.io.masks.
read_mask` (foreground ``> 0.5``), except palette PNGs (DAVIS's annotations), where every
non-zero index is foreground (the objects together). Frame counts and sizes must agree;
otherwise the sequence is an error entry and the others go on.
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from clipseg_cli.errors import NoInputsError
from clipseg_cli.evaluate.pairing import file_error
from clipseg_cli.io import sources, video
from clipseg_cli.io.masks import MaskError, read_mask
from clipseg_cli.io.paths import display_path
from clipseg_cli.ops import temporal
from clipseg_cli.version import __version__

#: The prediction videos ``segment`` writes: ``NAME.<slug>.<kind>.<ext>``.
_OUTPUT_VIDEO = re.compile(r"^(?P<input>.+)\.(?P<slug>[^.]+)\.(?P<kind>soft|mask)\.[^.]+$")
_KINDS = ("soft", "mask")  # preferred in this order for one prompt
_IMAGE_NAMES = frozenset(sources.IMAGE_EXTENSIONS)
#: The measures of a sequence, and of the means.
SEQUENCE_KEYS = ("J", "F", "J&F", "mean_abs_dp", "mean_iou")


class SequenceError(Exception):
    """A sequence that cannot be scored: ``str()`` is a one-line reason."""


@dataclass(frozen=True)
class SequencePair:
    """One prediction sequence and its ground truth (None: flicker only)."""

    name: str
    pred: Path
    gt: Path | None
    slug: str | None = None


@dataclass
class VideoEvalReport:
    """What a video eval measured: one row per sequence, the means over the scored ones."""

    threshold: float
    rows: list[dict[str, Any]] = field(default_factory=list)
    errors: list[dict[str, str]] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def ok(self) -> int:
        return sum(row["status"] == "ok" for row in self.rows)

    @property
    def failed(self) -> int:
        """Sequences that could not be scored, and files left unpaired."""
        return len(self.errors)

    def means(self) -> dict[str, float | None]:
        """Each measure's mean over the sequences that have it (None where none has)."""
        scored = [row for row in self.rows if row["status"] == "ok"]
        means: dict[str, float | None] = {}
        for key in SEQUENCE_KEYS:
            values = [row[key] for row in scored if row.get(key) is not None]
            means[key] = round(float(np.mean(values)), 6) if values else None
        return means

    def to_json(self) -> dict[str, Any]:
        return {
            "mode": "video",
            "version": __version__,
            "threshold": self.threshold,
            "tolerance": f"DAVIS boundary: {temporal.DAVIS_BOUND_TH} of the image diagonal",
            "sequences": self.rows,
            "mean": self.means(),
            "errors": self.errors,
            "seconds": round(self.seconds, 3),
        }


def is_sequence(path: Path | None) -> bool:
    """Whether ``path`` is a video file or a folder whose own files are numbered frames."""
    if path is None:
        return False
    if path.is_file():
        return video.sniff_video(path)
    if not path.is_dir():
        return False
    try:
        video.sequence_frames(path, video.DEFAULT_SEQUENCE_FPS, _IMAGE_NAMES)
    except video.VideoError:
        return False
    return True


def pair_sequences(
    gt: Path | None, pred: Path, pred_slug: str | None = None
) -> tuple[list[SequencePair], list[dict[str, str]]]:
    """Match prediction sequences to ground-truth sequences (rules in the module docstring).

    Raises:
        NoInputsError: ``pred`` holds no sequence.
    """
    if is_sequence(pred):
        if gt is not None and not is_sequence(gt):
            raise NoInputsError(
                f"--gt {display_path(gt)}: not a video or a folder of numbered frames"
            )
        return [SequencePair(_name(pred), pred, gt)], []
    candidates: dict[str, list[tuple[int, str | None, Path]]] = {}
    for path in sorted(p for p in pred.rglob("*") if p.is_file() and video.sniff_video(p)):
        if any(part.startswith(".") for part in path.relative_to(pred).parts):
            continue
        match = _OUTPUT_VIDEO.match(path.name)
        if match is None:
            name, slug, rank = path.name.split(".")[0], None, len(_KINDS)
        else:
            name, slug = Path(match["input"]).stem, match["slug"]
            rank = _KINDS.index(match["kind"])
        if pred_slug is None or slug == pred_slug:
            candidates.setdefault(name, []).append((rank, slug, path))
    if not candidates:
        raise NoInputsError(f"no predicted videos in {display_path(pred)}")
    if gt is not None and is_sequence(gt):  # one ground truth: the one prediction it meets
        found = [entry for group in candidates.values() for entry in group]
        if len(candidates) > 1 or len({slug for _rank, slug, _path in found}) > 1:
            names = ", ".join(sorted(path.name for _rank, _slug, path in found))
            raise NoInputsError(
                f"--gt is one sequence but --pred holds several ({names}; --pred-slug picks "
                "a prompt's)"
            )
        _rank, slug, path = min(found, key=lambda entry: entry[0])
        return [SequencePair(next(iter(candidates)), path, gt, slug)], []
    truths = _ground_truths(gt) if gt is not None else {}
    pairs, errors = [], []
    for name in sorted(candidates):
        found = sorted(candidates[name], key=lambda c: c[0])
        slugs = sorted({slug or "" for _rank, slug, _path in found})
        if len(slugs) > 1:
            errors.append(
                file_error(
                    found[0][2], f"several prompts ({', '.join(slugs)}): choose with --pred-slug"
                )
            )
            continue
        _rank, slug, path = found[0]
        truth = truths.pop(name, None)
        if gt is not None and truth is None:
            errors.append(file_error(path, f"no ground truth named {name} in {display_path(gt)}"))
        pairs.append(SequencePair(name, path, truth, slug))
    for name, path in sorted(truths.items()):
        errors.append(file_error(path, f"no prediction for the sequence {name}"))
    return pairs, errors


def _name(path: Path) -> str:
    match = _OUTPUT_VIDEO.match(path.name)
    if path.is_file() and match is not None:
        return Path(match["input"]).stem
    return path.name.split(".")[0] if path.is_file() else path.name


def _ground_truths(gt: Path) -> dict[str, Path]:
    """The ground-truth folder's sequences by name: frame folders and mask videos."""
    found: dict[str, Path] = {}
    for path in sorted(gt.iterdir()):
        if path.name.startswith("."):
            continue
        if path.is_dir() or (path.is_file() and video.sniff_video(path)):
            found.setdefault(path.name.split(".")[0] if path.is_file() else path.name, path)
    return found


# -- reading -----------------------------------------------------------------------------------


def _frames(path: Path, ground_truth: bool) -> Iterator[np.ndarray]:
    """float32 ``[H, W]`` values in [0, 1] of each frame of a sequence, in order."""
    if path.is_dir():
        frames = video.sequence_frames(path, video.DEFAULT_SEQUENCE_FPS, _IMAGE_NAMES)
        for file in frames.files:
            yield _read_frame(file, ground_truth)
        return
    yield from video.grey_frames(path)


def _read_frame(path: Path, ground_truth: bool) -> np.ndarray:
    if ground_truth:
        try:
            with Image.open(path) as image:
                if image.mode == "P":  # DAVIS: palette indices, 0 background
                    return (np.asarray(image) != 0).astype(np.float32)
        except (OSError, ValueError, SyntaxError):
            pass  # read_mask says why
    try:
        return read_mask(path).values
    except MaskError as error:
        raise SequenceError(f"{path.name}: {error}") from None


def score_sequence(pair: SequencePair, threshold: float) -> dict[str, Any]:
    """One sequence's row: frames, J, F, J&F (with ground truth), flicker of the prediction.

    Raises:
        SequenceError: unreadable frames, different frame counts or sizes.
    """
    flicker = temporal.Flicker()
    scores = temporal.SequenceScores()
    predicted = _frames(pair.pred, ground_truth=False)
    truths = _frames(pair.gt, ground_truth=True) if pair.gt is not None else None
    count = 0
    try:
        for prob in predicted:
            mask = prob > threshold
            flicker.add(prob, mask)
            if truths is not None:
                truth = next(truths, None)
                if truth is None:
                    raise SequenceError(
                        f"the prediction has more frames than the ground truth ({count})"
                    )
                if truth.shape != prob.shape:
                    raise SequenceError(
                        f"frame {count}: ground truth is {truth.shape[1]}x{truth.shape[0]} but "
                        f"the prediction is {prob.shape[1]}x{prob.shape[0]}"
                    )
                scores.add(mask, truth > 0.5)
            count += 1
        if truths is not None and next(truths, None) is not None:
            raise SequenceError(f"the ground truth has more frames than the prediction ({count})")
    except video.VideoError as error:
        raise SequenceError(str(error)) from None
    if count == 0:
        raise SequenceError("no frames")
    row: dict[str, Any] = {"frames": count}
    if pair.gt is not None:
        result = scores.result()
        row |= {"J": result["J"], "F": result["F"], "J&F": result["J&F"]}
        row["J_per_frame"] = [round(j, 6) for j in scores.j]
    else:
        row |= {"J": None, "F": None, "J&F": None}
    return row | flicker.result()


def run_video_eval(
    gt: Path | None, pred: Path, threshold: float, pred_slug: str | None = None
) -> VideoEvalReport:
    """Score every predicted sequence (rules in the module docstring).

    Raises:
        NoInputsError: ``pred`` holds no sequence.
    """
    started = time.perf_counter()
    report = VideoEvalReport(threshold)
    pairs, report.errors = pair_sequences(gt, pred, pred_slug)
    for pair in pairs:
        row: dict[str, Any] = {
            "sequence": pair.name,
            "pred": display_path(pair.pred),
            "gt": None if pair.gt is None else display_path(pair.gt),
            "status": "ok",
            "error": None,
        }
        try:
            row |= score_sequence(pair, threshold)
        except SequenceError as error:
            row["status"], row["error"] = "failed", str(error)
            report.errors.append(file_error(pair.pred, str(error)))
        report.rows.append(row)
    report.seconds = time.perf_counter() - started
    return report
