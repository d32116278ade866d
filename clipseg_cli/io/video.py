"""Videos in and out through PyAV (FFmpeg): probe, streaming decode, the encoders of the mask,
matte and overlay videos, the stream-copy join of segments, and frame folders (``--sequence``).

Frames are numpy arrays here, never tensors. Decoding streams: one frame at a time (the next
one decoded ahead, so the last frame is known as the last), so memory does not grow with the
video's length. Each frame keeps its own timestamp (variable frame rate survives), and the
rotation of the display matrix (phones) is applied, as players show the video.

Output formats (by what the pixels are):

* grey ``[H, W]`` uint8/uint16 (masks, soft maps, labels, instance ids): FFV1 in Matroska,
  lossless, so a decoded frame equals the PNG ``segment`` writes for an image;
* RGB ``[H, W, 3]`` (overlay, composite): H.264 (yuv420p, CRF 18) in MP4, with the source's
  audio stream copied in when the file is finished (:func:`join_segments`);
* RGBA ``[H, W, 4]`` (matte, cutout: colour with the matte as alpha): ``--video-codec``
  ``prores`` (ProRes 4444, 10-bit alpha, .mov), ``vp9`` (yuva420p .webm), ``ffv1`` (lossless
  RGBA .mkv) or ``png`` (a folder of RGBA PNGs).

PyAV is an extra (``clipseg-cli[video]``): it is imported on first use, and its absence is the
one-line :class:`VideoError` of the input that needed it.
"""

from __future__ import annotations

import contextlib
import itertools
import queue
import re
import shutil
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

__all__ = [
    "ALPHA_CODECS",
    "DEFAULT_SEQUENCE_FPS",
    "Frame",
    "FrameSequence",
    "Position",
    "Sampling",
    "VideoError",
    "VideoInfo",
    "VideoWriter",
    "frame_positions",
    "grey_frames",
    "join_segments",
    "looks_like_video",
    "probe",
    "probe_sequence",
    "read_frames",
    "read_sequence",
    "sequence_frames",
    "sequence_positions",
    "video_extension",
]

#: ``--video-codec``: the format of the videos with alpha (matte, cutout) -> file extension.
ALPHA_CODECS: dict[str, str] = {"prores": ".mov", "vp9": ".webm", "ffv1": ".mkv", "png": ""}

_SNIFF = 16
# Container signatures: ISO media (mp4, mov, 3gp; but not AVIF/HEIF images), Matroska/WebM,
# AVI, MPEG-PS, FLV, Ogg, ASF/WMV. (MPEG-TS's one sync byte, 'G', would take GIFs for videos.)
_ISO_IMAGE_BRANDS = (b"avif", b"avis", b"heic", b"heix", b"mif1", b"msf1")


class VideoError(Exception):
    """A video that cannot be read (or written): the message is its one-line reason."""


def _av() -> Any:
    try:
        import av
    except ImportError:
        raise VideoError("reading videos needs PyAV: pip install 'clipseg-cli[video]'") from None
    av.logging.set_level(av.logging.PANIC)  # FFmpeg's chatter on stderr is not our output
    return av


def looks_like_video(head: bytes) -> bool:
    """Whether the first bytes of a file are a video container's (a folder walk's test)."""
    if len(head) >= 12 and head[4:8] == b"ftyp":
        return head[8:12] not in _ISO_IMAGE_BRANDS
    return (
        head.startswith(b"\x1a\x45\xdf\xa3")  # Matroska, WebM
        or (head.startswith(b"RIFF") and head[8:12] == b"AVI ")
        or head.startswith((b"FLV", b"OggS", b"\x00\x00\x01\xba"))
        or head.startswith(b"\x30\x26\xb2\x75\x8e\x66\xcf\x11")  # ASF
        or head[4:8] in (b"moov", b"mdat", b"wide", b"free")  # QuickTime without ftyp
    )


def sniff_video(path: Path) -> bool:
    """:func:`looks_like_video` of the file's first bytes (False when it cannot be read)."""
    try:
        with Path(path).open("rb") as handle:
            return looks_like_video(handle.read(_SNIFF))
    except OSError:
        return False


# -- probing and decoding ---------------------------------------------------------------------


@dataclass(frozen=True)
class VideoInfo:
    """What a video is, as displayed (rotation applied to ``width`` and ``height``)."""

    width: int
    height: int
    fps: float  # the stream's average frame rate (0.0 when unknown)
    frames: int | None  # from the header; None when the container does not say
    duration: float | None  # seconds
    rotation: int  # degrees clockwise applied to every frame (0, 90, 180, 270)
    codec: str
    has_audio: bool
    time_base: Fraction


def _open(path: Path) -> Any:
    av = _av()
    try:
        return av.open(str(path), "r")
    except av.error.EOFError:
        raise VideoError("the video has no frames (the file ends after its header)") from None
    except av.error.InvalidDataError:
        raise VideoError("not a readable video (invalid data: damaged or truncated)") from None
    except av.FFmpegError as error:
        raise VideoError(f"cannot open the video: {_reason(error)}") from None
    except OSError as error:
        raise VideoError(f"cannot open the video: {error.strerror or error}") from None


def _reason(error: BaseException) -> str:
    text = str(getattr(error, "strerror", None) or error)
    text = re.sub(r"\s*:\s*'[^']*'$", "", text)  # PyAV appends the file name
    return text.splitlines()[0] if text else type(error).__name__


def probe(path: Path, max_pixels: int | None = None) -> VideoInfo:
    """The video's facts from its header and first frame.

    Raises:
        VideoError: no video stream, an unsupported codec, no frame, a frame over
            ``max_pixels``, or not readable at all.
    """
    av = _av()
    with _open(path) as container:
        if not container.streams.video:
            raise VideoError("no video stream in the file")
        stream = container.streams.video[0]
        codec = stream.codec_context.name if stream.codec_context else None
        if not codec or codec not in av.codecs_available:
            raise VideoError(f"unsupported video codec ({codec or 'unknown to this FFmpeg'})")
        width, height = stream.codec_context.width, stream.codec_context.height
        if max_pixels is not None and width * height > max_pixels:
            raise VideoError(f"frame size {width}x{height} is over --max-pixels {max_pixels}")
        rotation = 0
        try:
            first = next(container.decode(stream))
            rotation = _clockwise(first)
        except StopIteration:
            raise VideoError("the video has no frames") from None
        except av.FFmpegError as error:
            raise VideoError(f"cannot decode the video: {_reason(error)}") from None
        if rotation in (90, 270):
            width, height = height, width
        rate = stream.average_rate or stream.guessed_rate
        duration = None
        if stream.duration is not None and stream.time_base:
            duration = float(stream.duration * stream.time_base)
        elif container.duration is not None:
            duration = container.duration / 1_000_000
        return VideoInfo(
            width=width,
            height=height,
            fps=float(rate) if rate else 0.0,
            frames=stream.frames or None,
            duration=duration,
            rotation=rotation,
            codec=codec,
            has_audio=bool(container.streams.audio),
            time_base=stream.time_base or Fraction(1, 90000),
        )


def _clockwise(frame: Any) -> int:
    """Degrees to turn the decoded picture clockwise to show it upright (FFmpeg's autorotate:
    the display matrix's counterclockwise angle, negated)."""
    return round(-(getattr(frame, "rotation", 0) or 0) / 90) % 4 * 90


def _upright(rgb: np.ndarray, clockwise: int) -> np.ndarray:
    if clockwise == 0:
        return rgb
    return np.ascontiguousarray(np.rot90(rgb, k=-(clockwise // 90)))


@dataclass(frozen=True)
class Frame:
    """One decoded frame: its place among the frames kept (``index``), in the source
    (``source_index``), its timestamp in the stream's time base and in seconds, and its
    pixels (uint8 ``[H, W, 3]``, upright)."""

    index: int
    source_index: int
    pts: int | None
    time: float
    rgb: np.ndarray


@dataclass(frozen=True)
class Sampling:
    """Which frames are kept: from ``start`` to ``end`` seconds, every ``every``-th, or at
    most ``fps`` per second (``every`` and ``fps`` are exclusive)."""

    start: float | None = None
    end: float | None = None
    every: int = 1
    fps: float | None = None


@dataclass(frozen=True)
class Position:
    """Where decoding resumes: the first frame to keep (its pts, its source index, its index
    among kept frames) and the sampling clock (``next_time``, for ``--fps``)."""

    pts: int | None
    source_index: int
    index: int
    next_time: float | None


def read_frames(
    path: Path,
    sampling: Sampling = Sampling(),
    resume: Position | None = None,
    stop_after: int | None = None,
) -> Iterator[tuple[Frame, Position]]:
    """Decode the kept frames, one at a time, each with its own :class:`Position` (decoding
    resumed there starts with that frame).

    ``stop_after``: end after this many kept frames (a segment of a split run).

    Raises:
        VideoError: the video cannot be decoded (after the frames decoded so far); a file
            that ends before the frames its header announces is ``truncated``.
    """
    av = _av()
    with _open(path) as container:
        if not container.streams.video:
            raise VideoError("no video stream in the file")
        stream = container.streams.video[0]
        # No frame threads: closing a container while its threads decode ahead (a run that
        # stops at --end, a segment's last frame) can hang FFmpeg; one thread keeps up.
        for count, kept in enumerate(_kept(container, stream, sampling, resume, av), 1):
            yield kept
            if stop_after is not None and count >= stop_after:
                return


#: Frames :func:`read_ahead` decodes before they are asked for.
READ_AHEAD = 4

T = TypeVar("T")


def read_ahead(frames: Iterator[T], depth: int = READ_AHEAD) -> Iterator[T]:
    """``frames`` (a generator) run on a thread of its own, at most ``depth`` items ahead of
    the caller, so that decoding overlaps what the caller does with the frames before. Its
    exception comes to the caller after the items before it; closing this generator stops
    the thread and closes ``frames`` there (a container is closed by the thread using it)."""
    handed: queue.Queue[tuple[str, Any]] = queue.Queue(depth)
    stop = threading.Event()

    def hand(kind: str, value: Any) -> bool:
        while not stop.is_set():
            with contextlib.suppress(queue.Full):
                handed.put((kind, value), timeout=0.05)
                return True
        return False

    def produce() -> None:
        try:
            for item in frames:
                if not hand("item", item):
                    return
            hand("end", None)
        except Exception as error:  # handed to the caller, raised again there
            hand("error", error)
        finally:
            frames.close()  # type: ignore[attr-defined]

    thread = threading.Thread(target=produce, name="video-decode", daemon=True)
    thread.start()
    try:
        while True:
            kind, value = handed.get()
            if kind == "end":
                return
            if kind == "error":
                raise value
            yield value
    finally:
        stop.set()
        thread.join()


class _Sampler:
    """The sampling rules (``--every``, ``--fps``) over the frames met in order, counting from
    a resume position: :meth:`take` gives a kept frame's :class:`Position`, None for a frame
    left out. Shared by videos and frame folders, so both keep the same frames."""

    def __init__(self, sampling: Sampling, resume: Position | None) -> None:
        self.sampling = sampling
        self.source_index, self.index, self.next_time = 0, 0, sampling.start
        if resume is not None:
            self.source_index, self.index = resume.source_index, resume.index
            self.next_time = resume.next_time

    def take(self, pts: int | None, seconds: float) -> Position | None:
        position = Position(pts, self.source_index, self.index, self.next_time)
        self.source_index += 1
        rate = self.sampling.fps
        if rate is not None:
            if self.next_time is not None and seconds < self.next_time - 1e-6:
                return None
            base = self.next_time if self.next_time is not None else seconds
            self.next_time = base + 1.0 / rate
            while self.next_time <= seconds:
                self.next_time += 1.0 / rate
        elif position.source_index % self.sampling.every:
            return None
        self.index += 1
        return position


def _kept(
    container: Any, stream: Any, sampling: Sampling, resume: Position | None, av: Any
) -> Iterator[tuple[Frame, Position]]:
    """(frame, the position of that frame) for every kept frame, in order."""
    time_base = stream.time_base or Fraction(1, 90000)
    start_pts = stream.start_time or 0
    sampler = _Sampler(sampling, resume)
    target_pts = None
    if resume is not None:
        target_pts = resume.pts
        if target_pts is not None and target_pts > start_pts:
            container.seek(target_pts, stream=stream, backward=True, any_frame=False)
    elif sampling.start:
        container.seek(start_pts + int(sampling.start / time_base), stream=stream, backward=True)
    last_time = None
    try:
        for frame in container.decode(stream):
            pts = frame.pts
            seconds = float((pts - start_pts) * time_base) if pts is not None else 0.0
            if target_pts is not None:
                if pts is not None and pts < target_pts:
                    continue  # between the keyframe the seek found and the resume point
                target_pts = None
            elif sampling.start is not None and seconds < sampling.start - 1e-6:
                continue
            if sampling.end is not None and seconds >= sampling.end - 1e-9:
                return
            last_time = seconds
            position = sampler.take(pts, seconds)
            if position is None:
                continue
            rgb = _upright(frame.to_ndarray(format="rgb24"), _clockwise(frame))
            yield Frame(position.index, position.source_index, pts, seconds, rgb), position
    except av.FFmpegError as error:
        raise VideoError(f"truncated or damaged video: {_reason(error)}") from None
    _check_complete(container, stream, sampler.source_index, last_time, sampling, resume)


def frame_positions(path: Path, sampling: Sampling = Sampling()) -> list[Position]:
    """The :class:`Position` of every frame :func:`read_frames` keeps, from the packets'
    timestamps alone (nothing is decoded: a split run plans its parts with it).

    Raises:
        VideoError: the file cannot be read, or is truncated (as :func:`read_frames` says).
    """
    av = _av()
    with _open(path) as container:
        if not container.streams.video:
            raise VideoError("no video stream in the file")
        stream = container.streams.video[0]
        time_base = stream.time_base or Fraction(1, 90000)
        start_pts = stream.start_time or 0
        try:
            stamps = sorted(
                packet.pts
                for packet in container.demux(stream)
                if packet.pts is not None and not packet.is_discard
            )
        except av.FFmpegError as error:
            raise VideoError(f"truncated or damaged video: {_reason(error)}") from None
        sampler = _Sampler(sampling, None)
        positions, last_time = [], None
        for pts in stamps:
            seconds = float((pts - start_pts) * time_base)
            if sampling.start is not None and seconds < sampling.start - 1e-6:
                continue
            if sampling.end is not None and seconds >= sampling.end - 1e-9:
                break
            last_time = seconds
            position = sampler.take(pts, seconds)
            if position is not None:
                positions.append(position)
        _check_complete(container, stream, sampler.source_index, last_time, sampling, None)
    return positions


def _check_complete(
    container: Any,
    stream: Any,
    decoded: int,
    last_time: float | None,
    sampling: Sampling,
    resume: Position | None,
) -> None:
    """A file that ends well before its header says is truncated (FFmpeg decodes what is
    there and stops without an error)."""
    if sampling.end is not None or resume is not None or sampling.start:
        expected_frames = None
    else:
        expected_frames = stream.frames or None
    if expected_frames and decoded < expected_frames:
        raise VideoError(f"truncated video: {decoded} of {expected_frames} frames decoded")
    duration = None
    if stream.duration is not None and stream.time_base:
        duration = float(stream.duration * stream.time_base)
    elif container.duration is not None and not container.streams.audio:
        # The container's duration is the longest stream's: with audio, not the video's.
        duration = container.duration / 1_000_000
    rate = float(stream.average_rate or stream.guessed_rate or 0)
    if duration and rate and sampling.end is None:
        if last_time is None:
            if resume is None:
                raise VideoError("the video has no frames")
            return
        # Frames announced by the header never came: more than 3 frames and 2% of the video.
        missing = duration - (last_time + 1.0 / rate)
        if missing > max(3.0 / rate, 0.02 * duration):
            raise VideoError(f"truncated video: frames end at {last_time:.2f}s of {duration:.2f}s")


# -- frame folders ---------------------------------------------------------------------------

_NUMBER = re.compile(r"^(?P<stem>.*?)(?P<number>\d+)$")


@dataclass(frozen=True)
class FrameSequence:
    """A folder of numbered frames (``frame_0001.png``...), in number order."""

    folder: Path
    files: tuple[Path, ...]
    fps: float


def sequence_frames(folder: Path, fps: float, image_names: frozenset[str]) -> FrameSequence:
    """The numbered image files of ``folder`` (extensions in ``image_names``), checked for gaps.

    Raises:
        VideoError: no numbered frames, mixed name patterns, or a gap in the numbers.
    """
    numbered: dict[tuple[str, str], list[tuple[int, Path]]] = {}
    try:
        entries = sorted(p for p in Path(folder).iterdir() if p.is_file())
    except OSError as error:
        raise VideoError(f"cannot list the frame folder: {error.strerror or error}") from None
    for path in entries:
        if path.name.startswith(".") or path.suffix.lower() not in image_names:
            continue
        match = _NUMBER.match(path.stem)
        if match is None:
            raise VideoError(f"{path.name} is not a numbered frame")
        numbered.setdefault((match["stem"], path.suffix.lower()), []).append(
            (int(match["number"]), path)
        )
    if not numbered:
        raise VideoError("no numbered frames in the folder")
    if len(numbered) > 1:
        patterns = ", ".join(f"{stem}N{ext}" for stem, ext in sorted(numbered))
        raise VideoError(f"frames of several patterns in one folder: {patterns}")
    frames = sorted(next(iter(numbered.values())))
    for (number, _path), (following, path) in itertools.pairwise(frames):
        if following != number + 1:
            raise VideoError(
                f"gap in the frame numbers: {number} is followed by {following} ({path.name})"
            )
    return FrameSequence(Path(folder), tuple(path for _number, path in frames), fps)


#: A frame folder's frame rate without ``--fps``.
DEFAULT_SEQUENCE_FPS = 25.0


def probe_sequence(
    folder: Path, fps: float, image_names: frozenset[str], max_pixels: int | None = None
) -> tuple[FrameSequence, VideoInfo]:
    """A frame folder's frames (:func:`sequence_frames`) and its facts as a video, every
    frame's size read from its header (nothing decoded) so that a folder of mixed sizes fails
    before any output is made. Timestamps are frame numbers in a time base of ``1 / fps``.

    Raises:
        VideoError: no numbered frames, mixed patterns, a gap, mixed sizes, a frame that is no
            image, a frame over ``max_pixels``.
    """
    from PIL import Image

    sequence = sequence_frames(folder, fps, image_names)
    first: tuple[int, int] | None = None
    for path in sequence.files:
        try:
            with Image.open(path) as image:
                size = image.size
        except (OSError, ValueError, SyntaxError):
            raise VideoError(f"{path.name} is not a readable image") from None
        if first is None:
            first = size
            if max_pixels is not None and size[0] * size[1] > max_pixels:
                raise VideoError(
                    f"frame size {size[0]}x{size[1]} is over --max-pixels {max_pixels}"
                )
        elif size != first:
            raise VideoError(
                f"frames of mixed sizes: {path.name} is {size[0]}x{size[1]}, "
                f"{sequence.files[0].name} {first[0]}x{first[1]}"
            )
    assert first is not None  # sequence_frames found at least one frame
    rate = Fraction(fps).limit_denominator(1001)
    info = VideoInfo(
        width=first[0],
        height=first[1],
        fps=float(fps),
        frames=len(sequence.files),
        duration=len(sequence.files) / fps,
        rotation=0,
        codec=sequence.files[0].suffix.lower().lstrip("."),
        has_audio=False,
        time_base=1 / rate,
    )
    return sequence, info


def read_sequence(
    sequence: FrameSequence,
    decode: Callable[[Path], np.ndarray],
    sampling: Sampling = Sampling(),
    resume: Position | None = None,
    stop_after: int | None = None,
) -> Iterator[tuple[Frame, Position]]:
    """:func:`read_frames` for a frame folder: the kept frames, each decoded by ``decode``
    (a file -> uint8 RGB ``[H, W, 3]``) when its turn comes. A position's ``pts`` is the
    frame's place in the folder, where a resumed read starts.

    Raises:
        VideoError: a frame cannot be decoded, or its size is not the first frame's.
    """
    sampler = _Sampler(sampling, resume)
    first = resume.pts if resume is not None and resume.pts is not None else 0
    shape = None
    count = 0
    for number in range(first, len(sequence.files)):
        seconds = number / sequence.fps
        if sampling.start is not None and seconds < sampling.start - 1e-6:
            continue
        if sampling.end is not None and seconds >= sampling.end - 1e-9:
            return
        position = sampler.take(number, seconds)
        if position is None:
            continue
        path = sequence.files[number]
        try:
            rgb = decode(path)
        except Exception as error:  # the decoder's one-line reason, on this frame
            raise VideoError(f"{path.name}: {error}") from None
        if shape is None:
            shape = rgb.shape
        elif rgb.shape != shape:
            raise VideoError(f"frames of mixed sizes: {path.name} differs from the frames before")
        yield Frame(position.index, number, number, seconds, rgb), position
        count += 1
        if stop_after is not None and count >= stop_after:
            return


def sequence_positions(sequence: FrameSequence, sampling: Sampling = Sampling()) -> list[Position]:
    """:func:`frame_positions` of a frame folder (nothing is read)."""
    sampler = _Sampler(sampling, None)
    positions = []
    for number in range(len(sequence.files)):
        seconds = number / sequence.fps
        if sampling.start is not None and seconds < sampling.start - 1e-6:
            continue
        if sampling.end is not None and seconds >= sampling.end - 1e-9:
            break
        position = sampler.take(number, seconds)
        if position is not None:
            positions.append(position)
    return positions


# -- writing -----------------------------------------------------------------------------------


def video_extension(pixels: np.ndarray, alpha_codec: str) -> str:
    """The file extension of a video of these pixels (``""``: a PNG folder)."""
    if pixels.ndim == 2:
        return ".mkv"
    if pixels.shape[2] == 3:
        return ".mp4"
    return ALPHA_CODECS[alpha_codec]


class VideoWriter:
    """One output video (or PNG folder), frame by frame, with the source's timestamps.

    ``time_base``: the source stream's; each frame is written with its own pts in it, so a
    variable frame rate is kept and segments written apart join without re-timing.
    """

    def __init__(
        self,
        path: Path,
        pixels: np.ndarray,
        fps: float,
        time_base: Fraction,
        alpha_codec: str = "prores",
    ) -> None:
        self.path = Path(path)
        self.kind = _pixel_kind(pixels)
        self.alpha_codec = alpha_codec
        self.frames = 0
        self._container = None
        self._stream = None
        if self.kind in ("rgba", "rgba64") and alpha_codec == "png":
            self.path.mkdir(parents=True, exist_ok=True)
            return
        av = _av()
        height, width = pixels.shape[:2]
        rate = Fraction(fps).limit_denominator(1001) if fps > 0 else Fraction(25)
        fmt = {".mkv": "matroska", ".mp4": "mp4", ".mov": "mov", ".webm": "webm"}[self.path.suffix]
        self._container = av.open(str(self.path), "w", format=fmt)
        codec, pix_fmt, options = self._codec(pixels)
        stream = self._container.add_stream(codec, rate=rate, options=options)
        stream.width, stream.height = _even(width, codec), _even(height, codec)
        stream.pix_fmt = pix_fmt
        stream.time_base = time_base
        stream.codec_context.time_base = time_base
        if codec == "libx264":
            stream.codec_context.max_b_frames = 0  # segments join by stream copy: dts in order
        self._stream = stream

    def _codec(self, pixels: np.ndarray) -> tuple[str, str, dict]:
        if self.kind in ("gray", "gray16"):
            pix = "gray" if self.kind == "gray" else "gray16le"
            return "ffv1", pix, {"level": "3", "slicecrc": "1"}
        if self.kind == "rgb":
            # One thread: x264's frame threads (3 on 2 cores) grew its frame pool in steps under
            # load, so a long video's peak resident size rose 20-70 MB over a short one's; the
            # writer threads and the model keep the cores busy anyway (docs/video.md, "Memory").
            return "libx264", "yuv420p", {"crf": "18", "preset": "veryfast", "threads": "1"}
        if self.alpha_codec == "prores":
            return "prores_ks", "yuva444p10le", {"profile": "4444", "alpha_bits": "16"}
        if self.alpha_codec == "vp9":
            return "libvpx-vp9", "yuva420p", {"crf": "20", "b": "0", "deadline": "realtime"}
        return "ffv1", "gbrap16le" if self.kind == "rgba64" else "bgra", {"level": "3"}

    def write(self, pixels: np.ndarray, pts: int | None, index: int) -> None:
        """Add one frame (its pixels as the writers make them; ``pts`` in the time base)."""
        if self._container is None:
            _write_png(self.path / f"{index:06d}.png", pixels)
            self.frames += 1
            return
        av = _av()
        frame = av.VideoFrame.from_ndarray(
            _as_frame(pixels, self.kind, self.alpha_codec), format=_FORMATS[self.kind]
        )
        frame.pts = pts if pts is not None else index
        if self._stream.width != pixels.shape[1] or self._stream.height != pixels.shape[0]:
            frame = frame.reformat(width=self._stream.width, height=self._stream.height)
        for packet in self._stream.encode(frame):
            self._container.mux(packet)
        self.frames += 1

    def close(self) -> None:
        """Flush the encoder and finish the file."""
        if self._container is None:
            return
        for packet in self._stream.encode():
            self._container.mux(packet)
        self._container.close()
        self._container = None

    def abort(self) -> None:
        """Close without caring for the file (it is removed by the caller)."""
        if self._container is not None:
            with contextlib.suppress(Exception):  # the file is thrown away anyway
                self._container.close()
            self._container = None


_CONTAINERS = {".mkv": "matroska", ".mp4": "mp4", ".mov": "mov", ".webm": "webm"}
_FORMATS = {
    "gray": "gray",
    "gray16": "gray16le",
    "rgb": "rgb24",
    "rgba": "rgba",
    "rgba64": "rgba64le",
}


def _pixel_kind(pixels: np.ndarray) -> str:
    if pixels.ndim == 2:
        return "gray16" if pixels.dtype == np.uint16 else "gray"
    if pixels.shape[2] == 3:
        return "rgb"
    return "rgba64" if pixels.dtype == np.uint16 else "rgba"


def _as_frame(pixels: np.ndarray, kind: str, codec: str) -> np.ndarray:
    if kind == "rgba64" and codec == "prores":
        # The encoder takes 10 bits of alpha, and FFmpeg's scaler makes them as round(a / 64):
        # given as 10-bit levels times 64, the alpha is the nearest level to the matte.
        levels = np.round(pixels[..., 3] * (1023 / 65535))
        pixels = pixels.copy()
        pixels[..., 3] = (levels * 64).astype(np.uint16)
        return pixels
    if kind == "gray16":
        return pixels.astype("<u2", copy=False)
    if kind in ("gray", "rgb", "rgba"):
        return np.ascontiguousarray(pixels.astype(np.uint8, copy=False))
    return pixels


def _write_png(path: Path, pixels: np.ndarray) -> None:
    """One RGBA frame of a PNG folder (16-bit RGBA through OpenCV, which writes it)."""
    import cv2

    bgra = cv2.cvtColor(np.ascontiguousarray(pixels), cv2.COLOR_RGBA2BGRA)
    if not cv2.imwrite(str(path), bgra, [cv2.IMWRITE_PNG_COMPRESSION, 1]):
        raise OSError(f"cannot write {path.name}")


def _even(size: int, codec: str) -> int:
    """4:2:0 codecs need even sizes: odd frames are scaled by one pixel."""
    return size + (size % 2) if codec in ("libx264", "libvpx-vp9") else size


def join_segments(
    parts: list[Path], target: Path, audio_from: Path | None = None, named: Path | None = None
) -> None:
    """Join segment files of one output (same codec and time base) into ``target`` by stream
    copy, adding the audio stream of ``audio_from`` (copied, not re-encoded) when it has one.
    The container is the one of ``named``'s extension (default: ``target``'s; a temporary
    name has none). PNG folders are merged by moving their frames."""
    if parts and parts[0].is_dir():
        target.mkdir(parents=True, exist_ok=True)
        for part in parts:
            for frame in sorted(part.iterdir()):
                frame.replace(target / frame.name)
            shutil.rmtree(part, ignore_errors=True)
        return
    av = _av()
    fmt = _CONTAINERS[(named or target).suffix]
    with av.open(str(target), "w", format=fmt) as out:
        first = av.open(str(parts[0]))
        video = out.add_stream_from_template(first.streams.video[0])
        first.close()
        audio_in = audio_out = None
        if audio_from is not None:
            source = av.open(str(audio_from))
            if source.streams.audio:
                audio_in = source
                audio_out = out.add_stream_from_template(source.streams.audio[0])
            else:
                source.close()
        for part in parts:
            with av.open(str(part)) as container:
                for packet in container.demux(container.streams.video[0]):
                    if packet.dts is None and packet.pts is None:
                        continue  # the demuxer's flush packet
                    packet.stream = video
                    out.mux(packet)
        if audio_in is not None:
            try:
                for packet in audio_in.demux(audio_in.streams.audio[0]):
                    if packet.dts is None:
                        continue
                    packet.stream = audio_out
                    out.mux(packet)
            finally:
                audio_in.close()


def grey_frames(path: Path) -> Iterator[np.ndarray]:
    """Each frame of a mask or soft video as float32 ``[H, W]`` in [0, 1], read at its own
    depth (16-bit grey FFV1 as ``v / 65535``, 8-bit as ``v / 255``; colour videos by their
    luma), as ``segment`` wrote them.

    Raises:
        VideoError: the file cannot be read as a video.
    """
    av = _av()
    with _open(path) as container:
        if not container.streams.video:
            raise VideoError("no video stream in the file")
        try:
            for frame in container.decode(container.streams.video[0]):
                if frame.format.name.startswith("gray16"):
                    yield frame.to_ndarray(format="gray16le").astype(np.float32) / 65535.0
                else:
                    yield frame.to_ndarray(format="gray").astype(np.float32) / 255.0
        except av.FFmpegError as error:
            raise VideoError(f"truncated or damaged video: {_reason(error)}") from None


def alpha_frames(path: Path) -> Iterator[np.ndarray]:
    """The alpha of each frame of a video with alpha, float32 ``[H, W]`` in [0, 1], read from
    the decoded alpha plane at its own depth (ProRes 4444 decodes to 12 bits, FFV1 to 16), so
    no colour conversion stands between the file and the number."""
    av = _av()
    with av.open(str(path)) as container:
        for frame in container.decode(container.streams.video[0]):
            name = frame.format.name
            if name.startswith(("yuva", "gbrap")):
                bits = re.search(r"p(\d+)(le|be)$", name)
                depth = int(bits.group(1)) if bits else 8
                plane = frame.planes[3]
                dtype = np.uint16 if depth > 8 else np.uint8
                row = plane.line_size // np.dtype(dtype).itemsize
                values = np.frombuffer(plane, dtype).reshape(plane.height, row)[:, : plane.width]
                yield values.astype(np.float32) / float((1 << depth) - 1)
            else:
                rgba = frame.to_ndarray(format="rgba")
                yield rgba[..., 3].astype(np.float32) / 255.0
