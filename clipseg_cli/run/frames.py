"""A video is one input that yields many frames.

:func:`expand` turns each video among a run's inputs into a stream of :class:`FrameWork`
items, one per kept frame, decoded as the engine asks for them (memory does not grow with the
video). The engines batch them through the model like images, and each frame is written by the
same :func:`~clipseg_cli.run.items.write_item` as an image, with two hooks: its probabilities
are smoothed over time first (:mod:`clipseg_cli.ops.temporal`), and its outputs go to a
:class:`VideoSink` that feeds the video encoders (:mod:`clipseg_cli.io.video`). A video's
frames are smoothed in order and handed to the encoders in order (:meth:`VideoJob.write`),
and made in between in any order, by several write threads: the smoothing state is a value
handed from each frame to the next.

Segments of ``--segment-frames`` frames are the unit of resuming: when a segment's last frame
is written, its encoders are closed (its part files are complete under ``.clipseg/video/``),
its smoothing state is saved next to them, and the pipeline records the segment in the ledger
(:data:`SEGMENT_ROW`). A rerun after a crash continues decoding at the next segment's first
frame with the state restored, and the final files are the parts joined by stream copy, renamed
into place when the video's last frame is written. The temporary folder then goes.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import shutil
import threading
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from dataclasses import asdict, dataclass, field
from pathlib import Path, PurePosixPath
from typing import TextIO

import numpy as np

from clipseg_cli.errors import InputError, disk_full
from clipseg_cli.io import sources, video, writers
from clipseg_cli.io.files import atomic_target, json_text, write_json_atomic
from clipseg_cli.io.naming import STATE_DIR, output_path
from clipseg_cli.io.paths import display_path
from clipseg_cli.ops import instances, temporal
from clipseg_cli.run import items, memory
from clipseg_cli.run.config import SegmentConfig
from clipseg_cli.run.inputs import Work, failure_row
from clipseg_cli.run.ledger import Ledger
from clipseg_cli.run.outputs import FileSink, Output
from clipseg_cli.run.promptset import Conditional

#: The status of a frame's row: not an input's row (the pipeline logs only the video's).
FRAME_ROW = "frame"
#: In a frame's row: the segment that frame finished, for the ledger.
SEGMENT_ROW = "segment"
#: Under the state folder: the part files of unfinished videos.
VIDEO_STATE = "video"
#: Frames a part of a split video (``--engine ray``) smooths before its first one, so that it
#: starts from nearly the state an unsplit run has there: within half a level of a 16-bit soft
#: map (docs/video.md: the tolerance).
WARMUP_FRAMES = temporal.warmup_frames()
#: The two steps of a frame's write that wait for the frame before (:meth:`VideoJob.write`).
_SMOOTH, _WRITE = "smooth", "write"
#: In a split video's state folder: a part that finished (``--engine ray``), for a rerun.
PART_RECORD = "{number:05d}.part.json"
#: Kinds that are not videos: logits are arrays, written per frame with --frames only.
_NOT_VIDEO = frozenset({"logits"})


@dataclass(frozen=True)
class FrameWork(Work):
    """One frame of a video (or, without ``frame``, a video that yields none: ``error``)."""

    job: VideoJob | None = field(default=None, compare=False, repr=False)
    frame: video.Frame | None = field(default=None, compare=False, repr=False)
    next_position: video.Position | None = None  # where the frame after this one is
    last: bool = False
    error: str | None = None
    warmup: bool = False  # a split run's frame before its part: it only primes the smoothing


def is_frame(work: Work) -> bool:
    return isinstance(work, FrameWork)


def sampling(config: SegmentConfig, sequence: bool = False) -> video.Sampling:
    """The frames kept; a frame folder's ``--fps`` is its frame rate, not a sampling."""
    options = config.video
    fps = None if sequence else options.fps
    return video.Sampling(options.start, options.end, options.every, fps)


# -- the stream of frames ---------------------------------------------------------------------


def expand(todo: Iterator, config: SegmentConfig, ledger: Ledger) -> Iterator:
    """The stream ``todo`` with each video replaced by its frames (images pass as they are)."""
    for work in todo:
        if isinstance(work, Work) and is_video(work):
            yield from _video_frames(work, config, ledger)
        else:
            yield work


def is_video(work: Work) -> bool:
    """Whether an input is a video: a video file (by its content) or, with ``--sequence``, a
    folder of numbered frames (the only folders a run's inputs hold)."""
    path = work.item.path
    return work.item.data is None and (path.is_dir() or video.sniff_video(path))


@dataclass(frozen=True)
class VideoSource:
    """A video file or a frame folder, probed: its facts and a way to read its frames."""

    path: Path
    info: video.VideoInfo
    sequence: video.FrameSequence | None = None

    @classmethod
    def open(cls, path: Path, config: SegmentConfig) -> VideoSource:
        """Probe ``path``. Raises VideoError (the input's one-line reason)."""
        if path.is_dir():
            fps = config.video.fps or video.DEFAULT_SEQUENCE_FPS
            names = frozenset(sources.IMAGE_EXTENSIONS)
            frames, info = video.probe_sequence(path, fps, names, config.max_pixels)
            return cls(path, info, frames)
        return cls(path, video.probe(path, config.max_pixels))

    def read(
        self,
        config: SegmentConfig,
        resume: video.Position | None = None,
        stop_after: int | None = None,
    ) -> Iterator[tuple[video.Frame, video.Position]]:
        """The kept frames from ``resume`` on (at most ``stop_after``), decoded ahead on a
        thread of their own (:func:`~clipseg_cli.io.video.read_ahead`)."""
        if self.sequence is None:
            return video.read_ahead(
                video.read_frames(self.path, sampling(config), resume, stop_after)
            )
        decode = functools.partial(_decode_frame, max_pixels=config.max_pixels)
        keep = sampling(config, sequence=True)
        return video.read_ahead(
            video.read_sequence(self.sequence, decode, keep, resume, stop_after)
        )

    def positions(self, config: SegmentConfig) -> list[video.Position]:
        """Where each kept frame is (nothing decoded). Raises VideoError."""
        if self.sequence is None:
            return video.frame_positions(self.path, sampling(config))
        return video.sequence_positions(self.sequence, sampling(config, sequence=True))


def _decode_frame(path: Path, max_pixels: int | None) -> np.ndarray:
    return sources.decode_image(path, max_pixels=max_pixels).rgb


def _video_frames(work: Work, config: SegmentConfig, ledger: Ledger) -> Iterator[FrameWork]:
    def single(error: str, job: VideoJob | None = None) -> FrameWork:
        return FrameWork(*_fields(work), job=job, last=True, error=error)

    try:
        source = VideoSource.open(work.item.path, config)
    except video.VideoError as error:
        yield single(str(error))
        return
    job = VideoJob(work, source.info, config)
    resume = job.restore(ledger.segments_of(work.key, work.signature))
    held: tuple[video.Frame, video.Position] | None = None
    error = None
    try:
        for frame, position in source.read(config, resume):
            if held is not None:
                yield FrameWork(*_fields(work), job=job, frame=held[0], next_position=position)
            held = (frame, position)
    except video.VideoError as problem:
        error = str(problem)
    if held is None:
        job.discard()
        yield single(error or "no frames between --start and --end", job)
        return
    # The last frame is known as the last: its write finishes the video (or fails it).
    yield FrameWork(*_fields(work), job=job, frame=held[0], last=True, error=error)


# -- a video split into parts (--engine ray) ---------------------------------------------------


@dataclass(frozen=True)
class Part:
    """One part of a split video: its number, where decoding starts (its first warm-up frame;
    None: the video's start), its warm-up frames, then its own."""

    number: int
    resume: video.Position | None
    warmup: int
    count: int


def split(
    work: Work, config: SegmentConfig, warmup: int = WARMUP_FRAMES
) -> tuple[VideoSource, list[Part]]:
    """A video's parts of ``--segment-frames`` frames, each with up to ``warmup`` frames
    before it, so that parts can be segmented apart (in parallel) and joined.

    Raises:
        VideoError: the video cannot be read (the input's one-line reason).
    """
    source = VideoSource.open(work.item.path, config)
    positions = source.positions(config)
    if not positions:
        raise video.VideoError("no frames between --start and --end")
    size = config.video.segment_frames
    parts = []
    for number, first in enumerate(range(0, len(positions), size)):
        begin = max(0, first - warmup)
        resume = positions[begin] if begin else None
        parts.append(Part(number, resume, first - begin, min(size, len(positions) - first)))
    return source, parts


def part_job(work: Work, source: VideoSource, config: SegmentConfig, part: Part) -> VideoJob:
    """The job that writes one part's outputs (as part files numbered like the part)."""
    job = VideoJob(work, source.info, config)
    job.split = True
    job.segment = part.number
    job._start_at(part.resume.index if part.resume is not None else 0)
    return job


def part_frames(work: Work, source: VideoSource, job: VideoJob, part: Part) -> Iterator[FrameWork]:
    """A part's frames, its warm-up first.

    Raises:
        VideoError: the frames cannot be decoded, or fewer come than planned.
    """
    count = 0
    total = part.warmup + part.count
    for frame, _position in source.read(job.config, part.resume, total):
        yield FrameWork(*_fields(work), job=job, frame=frame, warmup=count < part.warmup)
        count += 1
    if count < total:
        raise video.VideoError(f"part {part.number}: {count} of its {total} frames decoded")


def state_folder(work: Work, config: SegmentConfig) -> Path:
    """Where a video's unfinished parts and their records live under ``--out``."""
    digest = hashlib.sha1(work.key.encode("utf-8", "surrogatepass")).hexdigest()[:16]
    return config.out_dir / STATE_DIR / VIDEO_STATE / digest


def record_part(work: Work, config: SegmentConfig, part: Part, result: dict) -> None:
    """Keep a finished part's :func:`close_part` result next to its files (atomically), so that
    a rerun after a crash segments only the parts that did not finish."""
    record = {"plan": _part_plan(work, config, part), "result": result}
    path = state_folder(work, config) / PART_RECORD.format(number=part.number)
    write_json_atomic(path, record)


def recorded_parts(work: Work, config: SegmentConfig, parts: list[Part]) -> dict[int, dict]:
    """Part number -> result, for the parts of ``parts`` an earlier run finished: the same
    video (unchanged), options and frames, every file of the part still there."""
    folder = state_folder(work, config)
    found = {}
    for part in parts:
        try:
            record = json.loads((folder / PART_RECORD.format(number=part.number)).read_text())
        except (OSError, ValueError):
            continue  # none, or cut short by the crash: the part is done again
        if not isinstance(record, dict) or record.get("plan") != _part_plan(work, config, part):
            continue
        if _files_present(folder, record["result"]):
            found[part.number] = record["result"]
    return found


def _part_plan(work: Work, config: SegmentConfig, part: Part) -> dict:
    """What a part's outputs are made from: the video as it is, the run's options, its frames
    (as JSON reads them back)."""
    plan = {"signature": asdict(work.signature), "options": config.describe(), "part": asdict(part)}
    return json.loads(json_text(plan))


def _files_present(folder: Path, finished: dict) -> bool:
    """Whether every file a finished segment's or part's record names is in ``folder``."""
    names = [name for group in finished["parts"].values() for name in group]
    return all((folder / name).exists() for name in [*names, *finished.get("exports", [])])


def _fields(work: Work) -> tuple:
    return (work.item, work.key, work.signature, work.out_key)


def prepare_frame(work: FrameWork, config: SegmentConfig, size: tuple[int, int]):
    """A frame's model rows (the video was decoded by :func:`expand`)."""
    if work.frame is None:
        return items.Failed(work, work.error or "no frames")
    image = sources.DecodedImage(work.frame.rgb, None, "video", "RGB")
    return items.prepare_decoded(work, image, config, size)


# -- one video being written ------------------------------------------------------------------


@dataclass
class _PromptTrack:
    """One prompt over the video: coverage per frame, empty frames, the peak, flicker."""

    coverage: list[float] = field(default_factory=list)
    empty: int = 0
    peak: float = 0.0
    flicker: temporal.Flicker = field(default_factory=temporal.Flicker)

    def totals(self) -> dict:
        meter = self.flicker
        return {
            "coverage": list(self.coverage),  # a copy: later frames go on appending
            "empty": self.empty,
            "peak": self.peak,
            "flicker": [meter.changes, meter.ious, meter.pairs],
        }

    @classmethod
    def from_totals(cls, totals: dict, arrays: dict, k: int) -> _PromptTrack:
        changes, ious, pairs = totals["flicker"]
        prob, mask = arrays.get(f"flicker_prob{k}"), arrays.get(f"flicker_mask{k}")
        meter = temporal.Flicker(changes, ious, pairs, prob, None if mask is None else mask)
        return cls(list(totals["coverage"]), totals["empty"], totals["peak"], meter)


class VideoJob:
    """The state of one video while its frames are written: the smoothing state, the open
    encoders of the current segment, the finished segments' parts, each prompt's track."""

    def __init__(self, work: Work, info: video.VideoInfo, config: SegmentConfig) -> None:
        self.work = work
        self.info = info
        self.config = config
        self.smoothing = temporal.Smoothing(config.video.smooth)
        self.state = temporal.SmoothingState()
        self.folder = state_folder(work, config)
        self.segment = 0
        self.parts: dict[str, list[str]] = {}  # "kind/slug" -> part file names, in order
        self.writers: dict[str, video.VideoWriter] = {}
        self.tracks: dict[int, _PromptTrack] = {}
        self.timings = {"decode_s": 0.0, "write_s": 0.0}
        self._turn = threading.Condition()
        self._next = {_SMOOTH: 0, _WRITE: 0}  # step -> the frame index whose turn it is
        self._failed = False
        self.reused_frames = 0  # frames whose outputs an earlier, interrupted run made
        # A part of a split video (``--engine ray``): no ledger segments, no joining here.
        self.split = False
        # --export: each segment's frames' export parts, one JSON line per frame, in order.
        self.exports = _FrameExports(self)

    # -- resuming

    def restore(self, segments: list[dict]) -> video.Position | None:
        """Continue after the last recorded segment whose files are all there; returns where
        decoding resumes (None: from the start)."""
        return _restore(self, segments)

    # -- order

    def _wait_turn(self, step: str, index: int) -> None:
        """Block until every earlier frame of this video is past ``step``."""
        with self._turn:
            self._turn.wait_for(lambda: self._next[step] >= index)

    def _pass_turn(self, step: str, index: int) -> None:
        with self._turn:
            self._next[step] = max(self._next[step], index + 1)
            self._turn.notify_all()

    def _start_at(self, index: int) -> None:
        """The first frame this job writes is frame ``index`` (a resumed video, a part)."""
        with self._turn:
            self._next = dict.fromkeys(self._next, index)

    # -- writing

    def write(
        self,
        prepared: items.Prepared,
        prediction: items.Prediction,
        conditionals: list[Conditional],
        cores: Callable[[], AbstractContextManager] = contextlib.nullcontext,
    ) -> items.Written:
        """Write one frame; the returned row is the frame's, or the video's for its last frame.

        Frames come from several write threads, and only two steps need the frame before:
        smoothing (the state goes from frame to frame) and handing the outputs to the encoders
        (with the flicker measures, the exports and the segment's end). Each waits for its turn;
        the rest (the full-size probabilities, refinement, shaping, the outputs' pixels, PNG
        files) runs in any order. ``cores`` is held around each step and never while waiting
        for a turn (the CPU gate: the model may be waiting for the cores, see
        :mod:`~clipseg_cli.run.engines.cpu_gate`).
        """
        index = prepared.work.frame.index  # type: ignore[attr-defined]
        frame = _FrameWrite(self, prepared, prediction, conditionals)
        try:
            try:
                if not self._failed:
                    with cores():
                        frame.prepare()
            except (video.VideoError, InputError, OSError) as error:
                frame.error = error  # reported in order, below
            self._wait_turn(_SMOOTH, index)
            try:
                if not self._failed and frame.error is None:
                    with cores():
                        frame.smooth()
                    self._pass_turn(_SMOOTH, index)
                    # The cores let go in between: a model call waiting for them waits less.
                    with cores():
                        frame.make()
            except (video.VideoError, InputError, OSError) as error:
                frame.error = error
            self._pass_turn(_SMOOTH, index)
            self._wait_turn(_WRITE, index)
            with cores():
                return _emit(self, frame)
        finally:
            self._pass_turn(_SMOOTH, index)
            self._pass_turn(_WRITE, index)

    def _track(self, row: dict) -> None:
        self.timings["decode_s"] += row["timings"]["decode_s"]
        self.timings["write_s"] += row["timings"]["write_s"]
        for k, stats in enumerate(row["prompts"]):
            track = self.tracks.setdefault(k, _PromptTrack())
            track.coverage.append(stats["coverage"])
            track.empty += bool(stats["empty"])
            track.peak = max(track.peak, stats["max"])

    def writer(self, name: str, pixels: np.ndarray) -> video.VideoWriter:
        """The open encoder of output ``name`` in this segment (opened on first use)."""
        writer = self.writers.get(name)
        if writer is None:
            self.folder.mkdir(parents=True, exist_ok=True)
            extension = video.video_extension(pixels, self.config.video.video_codec)
            part = f"{self.segment:05d}.{name.replace('/', '.')}{extension}"
            if (self.folder / part).is_dir():
                shutil.rmtree(self.folder / part)
            fps = self.info.fps if self.config.video.fps is None else self.config.video.fps
            writer = video.VideoWriter(
                self.folder / part, pixels, fps, self.info.time_base, self.config.video.video_codec
            )
            self.writers[name] = writer
            self.parts.setdefault(name, []).append(part)
        return writer

    def _close_segment(self) -> None:
        for writer in self.writers.values():
            writer.close()
        self.writers.clear()
        self.exports.close()
        # The encoders' buffers (x264's lookahead and thread frames: megabytes) are freed now and
        # the next segment's are allocated in a moment, while the model's arrays come and go:
        # glibc would keep the freed ones resident and place the new ones beside them, so the
        # resident size stepped up at segment ends (docs/video.md, "Memory"). Give them back.
        memory.return_freed_memory()

    def finish(self, conditionals: list[Conditional]) -> tuple[dict, dict | None]:
        """Join every output's parts into its file, renamed into place; the video's row and
        its part of the exports."""
        self._close_segment()
        outputs = []
        for name, group in self.parts.items():
            kind, slug = name.split("/", 1)
            target = self.final_path(kind, slug or None, group[0])
            with_audio = kind in ("overlay", "composite") and self.info.has_audio
            audio = self.work.item.path if with_audio else None
            parts = [self.folder / part for part in group]
            if parts[0].is_dir():  # PNG frames: moved into the folder
                video.join_segments(parts, target)
            else:
                with atomic_target(target) as staging:
                    video.join_segments(parts, staging, audio, named=target)
            outputs.append(
                {"prompt": _label(conditionals, slug), "kind": kind, "path": display_path(target)}
            )
        if self.config.video.frames or self.config.exports:
            outputs.append(
                {"prompt": None, "kind": "frames", "path": display_path(self.frames_folder())}
            )
        part = self.exports.video_part()
        self.discard()
        return _video_row(self, conditionals, outputs), part

    def final_path(self, kind: str, slug: str | None, part: str) -> Path:
        """Where output ``kind`` of prompt ``slug`` goes: the image's name, the video's
        extension (a PNG folder has none)."""
        extension = Path(part).suffix if not (self.folder / part).is_dir() else ""
        return output_path(self.config.out_dir, self.work.out_key, kind, slug).with_suffix(
            extension
        )

    def frames_folder(self) -> Path:
        key = self.work.out_key
        return self.config.out_dir / Path(*key.parent.parts) / f"{key.name}.frames"

    def frame_key(self, index: int) -> PurePosixPath:
        key = self.work.out_key
        return key.parent / f"{key.name}.frames" / f"{index:06d}.png"

    def _fail(self, error: str) -> items.Written:
        """The video cannot be finished: nothing of it is kept (a partial mask video looks
        like a whole one), and the rest of its frames are let through unwritten."""
        self._failed = True
        self.discard()
        return items.Written(failure_row(display_path(self.work.item.path), self.work.key, error))

    def discard(self) -> None:
        for writer in self.writers.values():
            writer.abort()
        self.writers.clear()
        shutil.rmtree(self.folder, ignore_errors=True)
        parent = self.folder.parent
        if parent.exists() and not any(parent.iterdir()):
            parent.rmdir()


def join_parts(
    job: VideoJob, results: list[dict], conditionals: list[Conditional]
) -> tuple[dict, dict | None]:
    """Finish a split video from its parts' :func:`close_part` results, in order:
    each output's part files joined, the tracks put end to end; the video's row and export
    part."""
    job.parts, job.tracks, job.exports.names = {}, {}, []
    for result in results:
        job.exports.names += result["exports"]
        for name, group in result["parts"].items():
            job.parts.setdefault(name, []).extend(group)
        for k, totals in result["tracks"].items():
            part = _PromptTrack.from_totals(totals, {}, int(k))
            track = job.tracks.setdefault(int(k), _PromptTrack())
            track.coverage += part.coverage
            track.empty += part.empty
            track.peak = max(track.peak, part.peak)
            track.flicker.changes += part.flicker.changes
            track.flicker.ious += part.flicker.ious
            track.flicker.pairs += part.flicker.pairs
        for name, seconds in result["timings"].items():
            job.timings[name] = job.timings.get(name, 0.0) + seconds
    return job.finish(conditionals)


class _FrameExports:
    """A video's part of ``--export``: each frame written as a PNG under ``NAME.frames/`` (COCO's
    file name, YOLO's image), and its export part (size, time, instances) as one JSON line of
    the segment's file, kept with the segment's parts (so a resumed or split run has them)."""

    def __init__(self, job: VideoJob) -> None:
        self.job = job
        self.names: list[str] = []  # the segments' files, in order
        self._file: TextIO | None = None

    def write_image(self, frame: video.Frame) -> None:
        """The frame as a PNG (in any order: a file of its own)."""
        writers.write_rgb(self._image(frame), frame.rgb)

    def _image(self, frame: video.Frame) -> Path:
        return self.job.config.out_dir / Path(*self.job.frame_key(frame.index).parts)

    def add(self, frame: video.Frame, found: tuple[instances.Instance, ...]) -> None:
        """The frame's export part (in the video's order), its image written already."""
        job = self.job
        key = job.frame_key(frame.index)
        image = self._image(frame)
        if self._file is None:
            job.folder.mkdir(parents=True, exist_ok=True)
            name = f"{job.segment:05d}.exports.jsonl"
            self._file = (job.folder / name).open("w", encoding="utf-8")
            self.names.append(name)
        height, width = frame.rgb.shape[:2]
        part = {
            "key": str(key),
            "source": display_path(image),
            "width": width,
            "height": height,
            "frame": frame.index,
            "time": round(frame.time, 6),
            "instances": items.instance_parts(list(found)),
        }
        self._file.write(json.dumps(part) + "\n")

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def video_part(self) -> dict | None:
        """The video's part of the exports: its frames' parts, each instance with its track
        (:class:`~clipseg_cli.ops.instances.InstanceTracker`, over the frames in order)."""
        job = self.job
        if not job.config.exports:
            return None
        tracker = instances.InstanceTracker()
        frames = []
        for name in self.names:
            with (job.folder / name).open(encoding="utf-8") as handle:
                for line in handle:
                    frame = json.loads(line)
                    found = frame["instances"]
                    tracks = tracker.assign([(i["prompt"], i["rle"]) for i in found])
                    for instance, track in zip(found, tracks, strict=True):
                        instance["track"] = track
                    frames.append(frame)
        return {"key": job.work.key, "source": display_path(job.work.item.path), "frames": frames}


def _video_row(self: VideoJob, conditionals: list[Conditional], outputs: list[dict]) -> dict:
    """The log row of a finished video."""
    info = self.info
    count = len(next(iter(self.tracks.values())).coverage) if self.tracks else 0
    prompts = []
    for k, conditional in enumerate(conditionals):
        track = self.tracks.get(k, _PromptTrack())
        coverage = track.coverage
        prompts.append(
            {
                "prompt": conditional.label,
                "max": round(track.peak, 6),
                "mean": round(float(np.mean(coverage)), 6) if coverage else 0.0,
                "coverage": coverage,
                "empty_frames": track.empty,
                "empty": track.empty == len(coverage),
                **track.flicker.result(),
            }
        )
    return {
        "input": display_path(self.work.item.path),
        "key": self.work.key,
        "status": "ok",
        "error": None,
        "width": info.width,
        "height": info.height,
        "mode": "video",
        "video": {
            "frames": count,
            "fps": round(info.fps, 6),
            "duration": None if info.duration is None else round(info.duration, 6),
            "codec": info.codec,
            "rotation": info.rotation,
            "audio": info.has_audio,
            "smooth": self.config.video.smooth,
            "reused_frames": self.reused_frames,
        },
        "prompts": prompts,
        "outputs": outputs,
        "timings": {name: round(value, 4) for name, value in self.timings.items()},
    }


def _emit(self: VideoJob, made: _FrameWrite) -> items.Written:
    """A made frame's outputs to the encoders and measures (in order); its row."""
    work: FrameWork = made.prepared.work  # type: ignore[assignment]
    frame = work.frame
    try:
        if self._failed:
            return items.Written({"status": FRAME_ROW})
        if made.error is not None:
            raise made.error
        written = made.written
        if work.warmup:
            return _warm_up(self, made)
        made.sink.emit()
        for k, prob, mask in made.observed:
            self.tracks.setdefault(k, _PromptTrack()).flicker.add(prob, mask)
        if written.row["status"] != "ok":
            return self._fail(written.row["error"])
        self._track(written.row)
        if self.config.exports:
            self.exports.add(frame, written.instances)
        if work.error is not None:
            return self._fail(work.error)
        if work.last:
            return items.Written(*self.finish(made.conditionals))
        if not self.split and (frame.index + 1) % self.config.video.segment_frames == 0:
            segment = _end_segment(self, work, made.state)
            return items.Written({"status": FRAME_ROW, SEGMENT_ROW: segment})
        return items.Written({"status": FRAME_ROW})
    except (video.VideoError, InputError) as error:
        return self._fail(str(error))
    except OSError as error:
        stop = disk_full(error, display_path(error.filename or self.folder))
        if stop is not None:
            self._failed = True  # the run stops; a rerun resumes from the last segment
            raise stop from None
        return self._fail(f"cannot write the video outputs: {error.strerror or error}")


def _warm_up(self: VideoJob, made: _FrameWrite) -> items.Written:
    """A frame before a split part: smoothed like any frame (its outputs were made and
    thrown away), so the part's first frame starts from its state; the flicker measures
    keep it only as the frame before the part's first."""
    for k, prob, mask in made.observed:
        flicker = self.tracks.setdefault(k, _PromptTrack()).flicker
        flicker.add(prob, mask)
        flicker.changes, flicker.ious, flicker.pairs = 0.0, 0.0, 0
    return items.Written({"status": FRAME_ROW})


def close_part(self: VideoJob) -> dict:
    """The end of a split part: its encoders closed; what the join needs of it (its part
    files, each prompt's track over its frames, its timings)."""
    self._close_segment()
    return {
        "parts": {name: list(group) for name, group in self.parts.items()},
        "tracks": {str(k): track.totals() for k, track in self.tracks.items()},
        "timings": dict(self.timings),
        "exports": list(self.exports.names),
    }


def _end_segment(self: VideoJob, work: FrameWork, after: temporal.SmoothingState) -> dict:
    """Close this segment's encoders and save the state the next segment starts from (the
    smoothing's ``after`` its last frame)."""
    self._close_segment()
    state = f"{self.segment:05d}.state.npz"
    arrays = dict(after.arrays())
    for k, track in self.tracks.items():
        if track.flicker.previous_prob is not None:
            arrays[f"flicker_prob{k}"] = track.flicker.previous_prob
            arrays[f"flicker_mask{k}"] = track.flicker.previous_mask
    with (self.folder / state).open("wb") as handle:
        np.savez(handle, **arrays)
    row = {
        "segment": self.segment,
        "frames": work.frame.index + 1,
        "next": asdict(work.next_position),
        "state": state,
        "parts": {name: list(group) for name, group in self.parts.items()},
        "tracks": {str(k): track.totals() for k, track in self.tracks.items()},
        "exports": list(self.exports.names),
    }
    self.segment += 1
    return row


def _restore(self: VideoJob, segments: list[dict]) -> video.Position | None:
    usable = None
    for row in segments:
        if _files_present(self.folder, row) and (self.folder / row["state"]).exists():
            usable = row
        else:
            break
    if usable is None:
        shutil.rmtree(self.folder, ignore_errors=True)
        return None
    with np.load(self.folder / usable["state"]) as saved:
        arrays = {name: saved[name] for name in saved.files}
    self.state = temporal.SmoothingState.from_arrays(
        {n: a for n, a in arrays.items() if not n.startswith("flicker_")}
    )
    self.tracks = {
        int(k): _PromptTrack.from_totals(totals, arrays, int(k))
        for k, totals in usable["tracks"].items()
    }
    self.parts = {name: list(group) for name, group in usable["parts"].items()}
    self.exports.names = list(usable.get("exports", []))
    self.segment = usable["segment"] + 1
    position = video.Position(**usable["next"])
    self._start_at(position.index)
    self.reused_frames = position.index
    return position


def _label(conditionals: list[Conditional], slug: str) -> str | None:
    for conditional in conditionals:
        if conditional.slug == slug:
            return conditional.label
    return None


class _FrameWrite:
    """One frame on its way through :meth:`VideoJob.write`, and its
    :class:`~clipseg_cli.run.items.FrameHooks` for :func:`~clipseg_cli.run.items.write_item`."""

    def __init__(
        self,
        job: VideoJob,
        prepared: items.Prepared,
        prediction: items.Prediction,
        conditionals: list[Conditional],
    ) -> None:
        self.job = job
        self.prepared = prepared
        self.prediction = prediction
        self.conditionals = conditionals
        self.probs: list[np.ndarray] = []
        self.thumbnail: np.ndarray | None = None
        self.smoothed: list[np.ndarray] = []
        self.state = temporal.SmoothingState()  # after this frame
        self.observed: list[tuple[int, np.ndarray, np.ndarray]] = []
        self.sink: VideoSink | _Discard = _Discard()
        self.written = items.Written({"status": FRAME_ROW})
        self.error: Exception | None = None

    def prepare(self) -> None:
        """What needs this frame alone: each prompt's probability, the thumbnail."""
        self.probs = [self.prediction.probabilities(k) for k in range(len(self.conditionals))]
        self.thumbnail = self.job.smoothing.thumbnail(self.prepared.work.frame.rgb)

    def smooth(self) -> None:
        """Smooth the probabilities from the state the frame before left (in order)."""
        job = self.job
        step = job.smoothing.frame(job.state, self.thumbnail)
        self.smoothed = [step.apply(k, prob) for k, prob in enumerate(self.probs)]
        self.probs = []
        self.state = job.state = step.state()

    def make(self) -> None:
        """Make the outputs from the smoothed probabilities (held for the encoders)."""
        work: FrameWork = self.prepared.work  # type: ignore[assignment]
        config = self.job.config
        if not work.warmup:
            self.sink = VideoSink(self.job, work.frame)
        self.written = items.write_item(
            self.prepared, self.prediction, config, self.conditionals, self.sink, frame=self
        )
        if config.exports and not work.warmup:
            self.job.exports.write_image(work.frame)

    def probability(self, k: int) -> np.ndarray:
        return self.smoothed[k]

    def observe(self, k: int, prob: np.ndarray, mask: np.ndarray) -> None:
        self.observed.append((k, prob, mask))


@dataclass
class _Discard:
    """A warm-up frame's outputs: made, never written."""

    records: list[dict] = field(default_factory=list)

    def put(self, output: Output) -> None:
        pass

    def emit(self) -> None:
        pass


@dataclass
class VideoSink:
    """A frame's outputs, each to its video encoder (and, with ``--frames``, to PNG files)."""

    job: VideoJob
    frame: video.Frame
    records: list[dict] = field(default_factory=list)
    _pending: list[tuple[str, np.ndarray]] = field(default_factory=list)

    def put(self, output: Output) -> None:
        """Write ``--frames``' PNG now; keep the video's pixels for :meth:`emit`."""
        job = self.job
        if job.config.video.frames:
            files = FileSink(job.config.out_dir, job.frame_key(self.frame.index))
            files.put(output)
        if output.kind in _NOT_VIDEO:
            return
        self._pending.append((f"{output.kind}/{output.slug or ''}", self._video_pixels(output)))
        self.records.append({"prompt": output.prompt, "kind": output.kind})

    def emit(self) -> None:
        """The frame's pixels to their encoders (in the video's order)."""
        for name, pixels in self._pending:
            self.job.writer(name, pixels).write(pixels, self.frame.pts, self.frame.index)
        self._pending.clear()

    def _video_pixels(self, output: Output) -> np.ndarray:
        if output.kind != "matte":
            return output.pixels
        # A matte video is the frame with the matte as its alpha, at 16 bits.
        matte = output.pixels
        alpha = matte.astype(np.uint16) * 257 if matte.dtype == np.uint8 else matte
        rgb = self.frame.rgb.astype(np.uint16) * 257
        return np.dstack([rgb, alpha])
