"""Small synthetic videos for the video tests, written with PyAV: moving coloured shapes
(clipseg_cli.ops.shapes.moving_frames, which the demo model knows), with or without audio,
with a rotation in the display matrix, with variable frame timing, or cut short."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from fractions import Fraction
from pathlib import Path

import av
import numpy as np

from clipseg_cli.ops.shapes import Mover, moving_frames

FORMATS = {".mp4": "mp4", ".mkv": "matroska", ".mov": "mov", ".webm": "webm", ".avi": "avi"}


def write_video(
    path: Path,
    frames: Iterable[np.ndarray],
    *,
    fps: int = 25,
    codec: str = "libx264",
    pts: Sequence[int] | None = None,  # in 1/1000 s; None: one frame every 1/fps
    rotation: int | None = None,  # the display matrix's counterclockwise degrees
    audio: bool = False,
) -> Path:
    """Write ``frames`` (uint8 RGB, even sizes) as a video; returns ``path``."""
    frames = list(frames)
    container = av.open(str(path), "w", format=FORMATS[path.suffix])
    stream = container.add_stream(codec, rate=fps)
    stream.height, stream.width = frames[0].shape[:2]
    stream.pix_fmt = "yuv420p" if codec != "ffv1" else "yuv444p"
    if pts is not None:
        stream.time_base = Fraction(1, 1000)
        stream.codec_context.time_base = Fraction(1, 1000)
    if rotation is not None:
        stream.set_display_rotation(rotation)
    sound = container.add_stream("aac", rate=22050) if audio else None
    for index, rgb in enumerate(frames):
        frame = av.VideoFrame.from_ndarray(rgb, format="rgb24")
        frame.pts = pts[index] if pts is not None else index
        if pts is None:
            frame.time_base = Fraction(1, fps)
        for packet in stream.encode(frame):
            container.mux(packet)
    for packet in stream.encode():
        container.mux(packet)
    if sound is not None:
        chunk, total = 1024, int(22050 * len(frames) / fps)
        for start in range(0, total - chunk, chunk):
            samples = np.zeros((1, chunk), np.float32)
            piece = av.AudioFrame.from_ndarray(samples, format="fltp", layout="mono")
            piece.sample_rate = 22050
            piece.pts = start
            for packet in sound.encode(piece):
                container.mux(packet)
        for packet in sound.encode():
            container.mux(packet)
    container.close()
    return path


def shapes_video(
    path: Path,
    count: int = 12,
    size: tuple[int, int] = (96, 160),
    movers: tuple[Mover, ...] = (Mover("red circle", 0.25, (0.3, 0.5), (4.0, 1.0)),),
    **kwargs: object,
) -> tuple[Path, list[dict[str, np.ndarray]]]:
    """A video of moving shapes and its ground-truth masks per frame."""
    frames, truths = [], []
    for rgb, masks in moving_frames(count, size, movers, seed=3):
        frames.append(rgb)
        truths.append(masks)
    write_video(path, frames, **kwargs)
    return path, truths
