"""clipseg_cli.io.video: probing, streaming decode (timestamps, rotation, sampling, resume),
the encoders (lossless masks, alpha that decodes back, audio copied by the join) and the
one-line reasons of videos that cannot be read."""

from __future__ import annotations

import threading
from fractions import Fraction
from pathlib import Path

import av
import cv2
import numpy as np
import pytest
from video_helpers import shapes_video, write_video

from clipseg_cli.io import video


def _frames(count: int, size: tuple[int, int] = (48, 64)) -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    return [rng.integers(0, 255, (*size, 3), dtype=np.uint8) for _ in range(count)]


def test_probe_reads_size_rate_count_and_audio(tmp_path: Path) -> None:
    path, _ = shapes_video(tmp_path / "a.mp4", count=10, audio=True)
    info = video.probe(path)
    assert (info.width, info.height, info.frames, info.fps) == (160, 96, 10, 25.0)
    assert info.has_audio and info.codec == "h264" and info.rotation == 0


def test_rotation_from_the_display_matrix_is_applied(tmp_path: Path) -> None:
    path, _ = shapes_video(tmp_path / "r.mp4", count=4, rotation=90)
    info = video.probe(path)
    assert (info.width, info.height, info.rotation) == (96, 160, 270)
    frame, _ = next(video.read_frames(path))
    assert frame.rgb.shape == (160, 96, 3)


def test_variable_frame_rate_timestamps_are_kept(tmp_path: Path) -> None:
    pts = [0, 40, 80, 200, 240, 500]
    path = write_video(tmp_path / "vfr.mkv", _frames(6), codec="ffv1", pts=pts)
    times = [frame.time for frame, _ in video.read_frames(path)]
    assert times == pytest.approx([p / 1000 for p in pts])


def test_sampling_every_fps_start_end(tmp_path: Path) -> None:
    path = write_video(tmp_path / "s.mkv", _frames(20), codec="ffv1", fps=10)
    every = [f.source_index for f, _ in video.read_frames(path, video.Sampling(every=3))]
    assert every == [0, 3, 6, 9, 12, 15, 18]
    fps = [f.source_index for f, _ in video.read_frames(path, video.Sampling(fps=2.5))]
    assert fps == [0, 4, 8, 12, 16]
    cut = [f.time for f, _ in video.read_frames(path, video.Sampling(start=0.5, end=1.0))]
    assert cut == pytest.approx([0.5, 0.6, 0.7, 0.8, 0.9])
    assert next(f.index for f, _ in video.read_frames(path, video.Sampling(start=0.5))) == 0


def test_resume_position_continues_exactly(tmp_path: Path) -> None:
    path = write_video(tmp_path / "g.mp4", _frames(30), fps=10)
    whole = list(video.read_frames(path, video.Sampling(every=2)))
    first = list(video.read_frames(path, video.Sampling(every=2), stop_after=6))
    assert len(first) == 6
    rest = list(video.read_frames(path, video.Sampling(every=2), resume=whole[6][1]))
    joined = [f for f, _ in first] + [f for f, _ in rest]
    assert [f.index for f in joined] == list(range(15))
    for a, (b, _) in zip(joined, whole, strict=True):
        assert a.pts == b.pts and np.array_equal(a.rgb, b.rgb)


def test_decoded_pixels_match_a_lossless_source(tmp_path: Path) -> None:
    frames = _frames(3)
    path = write_video(tmp_path / "l.mkv", frames, codec="ffv1")
    for original, (frame, _) in zip(frames, video.read_frames(path), strict=True):
        # yuv444p is not RGB: the round trip is close, not exact.
        assert np.abs(frame.rgb.astype(int) - original).max() <= 3


def _read(path: Path, fmt: str) -> list[np.ndarray]:
    with av.open(str(path)) as container:
        return [f.to_ndarray(format=fmt) for f in container.decode(video=0)]


def test_mask_video_is_lossless_and_segments_join(tmp_path: Path) -> None:
    info = video.probe(write_video(tmp_path / "s.mp4", _frames(8), fps=25))
    rng = np.random.default_rng(1)
    masks = [(rng.random((48, 64)) > 0.5).astype(np.uint8) * 255 for _ in range(8)]
    parts = []
    for seg in range(2):
        part = tmp_path / f"part{seg}.mkv"
        writer = video.VideoWriter(part, masks[0], info.fps, info.time_base)
        for index in range(seg * 4, seg * 4 + 4):
            writer.write(masks[index], index * 512, index)
        writer.close()
        parts.append(part)
    target = tmp_path / "mask.mkv"
    video.join_segments(parts, target)
    decoded = _read(target, "gray")
    assert len(decoded) == 8
    assert all(np.array_equal(a, b) for a, b in zip(decoded, masks, strict=True))
    capture = cv2.VideoCapture(str(target))
    assert int(capture.get(cv2.CAP_PROP_FRAME_COUNT)) == 8
    assert capture.get(cv2.CAP_PROP_FPS) == pytest.approx(25.0, abs=0.01)


def test_sixteen_bit_soft_video_is_lossless(tmp_path: Path) -> None:
    soft = np.linspace(0, 65535, 48 * 64).astype(np.uint16).reshape(48, 64)
    writer = video.VideoWriter(tmp_path / "soft.mkv", soft, 25.0, Fraction(1, 25))
    writer.write(soft, 0, 0)
    writer.close()
    assert np.array_equal(_read(tmp_path / "soft.mkv", "gray16le")[0], soft)


@pytest.mark.parametrize(
    ("codec", "tolerance"), [("prores", 1 / 1023), ("ffv1", 0.0), ("png", 0.0)]
)
def test_alpha_decodes_back_to_the_matte(tmp_path: Path, codec: str, tolerance: float) -> None:
    rng = np.random.default_rng(2)
    matte = rng.random((48, 64)).astype(np.float32)
    rgba = np.dstack([rng.integers(0, 65535, (48, 64, 3)), np.round(matte * 65535)])
    rgba = rgba.astype(np.uint16)
    path = tmp_path / ("matte" + video.ALPHA_CODECS[codec])
    writer = video.VideoWriter(path, rgba, 25.0, Fraction(1, 25), alpha_codec=codec)
    writer.write(rgba, 0, 0)
    writer.close()
    if codec == "png":
        decoded = cv2.imread(str(path / "000000.png"), cv2.IMREAD_UNCHANGED)[..., 3]
    else:
        decoded = next(video.alpha_frames(path)) * 65535
    assert np.abs(decoded / 65535 - matte).max() <= tolerance + 1 / 65535


def test_vp9_alpha_video_is_written(tmp_path: Path) -> None:
    rgba = np.full((48, 64, 4), 200, np.uint8)
    path = tmp_path / "m.webm"
    writer = video.VideoWriter(path, rgba, 25.0, Fraction(1, 25), alpha_codec="vp9")
    writer.write(rgba, 0, 0)
    writer.close()
    assert len(_read(path, "rgb24")) == 1


def test_overlay_join_copies_the_source_audio(tmp_path: Path) -> None:
    source, _ = shapes_video(tmp_path / "a.mp4", count=10, audio=True)
    info = video.probe(source)
    part = tmp_path / "part.mp4"
    writer = video.VideoWriter(part, np.zeros((96, 160, 3), np.uint8), info.fps, info.time_base)
    for frame, _ in video.read_frames(source):
        writer.write(frame.rgb, frame.pts, frame.index)
    writer.close()
    target = tmp_path / "overlay.mp4"
    video.join_segments([part], target, audio_from=source)
    with av.open(str(target)) as container:
        assert len(container.streams.audio) == 1
        assert container.streams.video[0].frames == 10


def test_container_signatures() -> None:
    assert video.looks_like_video(b"\x00\x00\x00\x20ftypisom\x00\x00")
    assert video.looks_like_video(b"\x1a\x45\xdf\xa3\x01\x00\x00\x00")
    assert not video.looks_like_video(b"\x00\x00\x00\x1cftypavif\x00\x00")
    assert not video.looks_like_video(b"\x89PNG\r\n\x1a\n\x00\x00")
    assert not video.looks_like_video(b"GIF89a\x10\x00\x10\x00\x80\x00")


def test_bad_videos_are_one_line_reasons(tmp_path: Path) -> None:
    good, _ = shapes_video(tmp_path / "g.mkv", count=60, codec="ffv1")
    data = good.read_bytes()
    truncated = tmp_path / "cut.mkv"
    truncated.write_bytes(data[: len(data) * 6 // 10])
    with pytest.raises(video.VideoError, match="truncated"):
        list(video.read_frames(truncated))
    unknown = tmp_path / "unknown.mkv"
    unknown.write_bytes(data.replace(b"V_FFV1", b"V_QQQQ"))
    with pytest.raises(video.VideoError, match="unsupported video codec"):
        video.probe(unknown)
    with pytest.raises(video.VideoError, match="over --max-pixels"):
        video.probe(good, max_pixels=1000)
    audio_only = tmp_path / "sound.mka"
    with av.open(str(audio_only), "w", format="matroska") as container:
        stream = container.add_stream("aac", rate=22050)
        piece = av.AudioFrame.from_ndarray(
            np.zeros((1, 1024), np.float32), format="fltp", layout="mono"
        )
        piece.sample_rate, piece.pts = 22050, 0
        for packet in [*stream.encode(piece), *stream.encode()]:
            container.mux(packet)
    with pytest.raises(video.VideoError, match="no video stream"):
        video.probe(audio_only)
    empty = tmp_path / "zero.mkv"
    with av.open(str(empty), "w") as container:
        stream = container.add_stream("ffv1", rate=25)
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
        container.start_encoding()
    with pytest.raises(video.VideoError, match="no frames"):
        video.probe(empty)


def test_frame_folder_gaps_and_patterns(tmp_path: Path) -> None:
    names = frozenset({".png"})
    for number in (1, 2, 3):
        (tmp_path / f"f_{number:04d}.png").write_bytes(b"")
    sequence = video.sequence_frames(tmp_path, 12.0, names)
    assert [p.name for p in sequence.files] == ["f_0001.png", "f_0002.png", "f_0003.png"]
    (tmp_path / "f_0005.png").write_bytes(b"")
    with pytest.raises(video.VideoError, match="gap in the frame numbers: 3 is followed by 5"):
        video.sequence_frames(tmp_path, 12.0, names)


def test_frame_folder_reads_like_a_video(tmp_path: Path) -> None:
    from PIL import Image

    names = frozenset({".png"})
    for number, rgb in enumerate(_frames(10), 1):
        Image.fromarray(rgb).save(tmp_path / f"f_{number:03d}.png")
    sequence, info = video.probe_sequence(tmp_path, 5.0, names)
    assert (info.width, info.height, info.frames, info.fps) == (64, 48, 10, 5.0)
    assert info.time_base == Fraction(1, 5) and not info.has_audio

    def decode(path: Path) -> np.ndarray:
        return np.asarray(Image.open(path).convert("RGB"))

    keep = video.Sampling(every=2, start=0.2)
    whole = list(video.read_sequence(sequence, decode, keep))
    assert [f.source_index for f, _ in whole] == [1, 3, 5, 7, 9]
    assert [f.time for f, _ in whole] == pytest.approx([0.2, 0.6, 1.0, 1.4, 1.8])
    # Resumed at a kept frame's position: the same frames from there, numbered on.
    resumed = list(video.read_sequence(sequence, decode, keep, whole[2][1]))
    assert [(f.index, f.source_index) for f, _ in resumed] == [(2, 5), (3, 7), (4, 9)]
    assert np.array_equal(resumed[0][0].rgb, whole[2][0].rgb)
    Image.fromarray(_frames(1, (40, 64))[0]).save(tmp_path / "f_007.png")
    mixed = r"mixed sizes: f_007\.png is 64x40, f_001\.png 64x48"
    with pytest.raises(video.VideoError, match=mixed):
        video.probe_sequence(tmp_path, 5.0, names)


def test_frame_positions_from_packets_are_the_decoders(tmp_path: Path) -> None:
    """A split run plans its parts from the packets' timestamps alone: the same positions as
    decoding gives (B-frames, sampling), and decoding resumed at any of them goes on exactly."""
    path, _ = shapes_video(tmp_path / "b.mp4", count=40)  # libx264's defaults: B-frames
    for sampling in (
        video.Sampling(),
        video.Sampling(every=3),
        video.Sampling(fps=7),
        video.Sampling(start=0.3, end=1.2, every=2),
    ):
        planned = video.frame_positions(path, sampling)
        assert planned == [position for _frame, position in video.read_frames(path, sampling)]
        for k in range(1, len(planned), 4):
            resumed = video.read_frames(path, sampling, planned[k], stop_after=3)
            assert [frame.index for frame, _ in resumed] == [p.index for p in planned[k : k + 3]]


def test_read_ahead_keeps_order_raises_after_the_items_before_and_stops_when_closed() -> None:
    closed = threading.Event()

    def frames(count: int, fail_at: int | None = None):
        try:
            for index in range(count):
                if index == fail_at:
                    raise video.VideoError("truncated")
                yield index
        finally:
            closed.set()

    assert list(video.read_ahead(frames(50))) == list(range(50))
    seen = []
    with pytest.raises(video.VideoError, match="truncated"):
        for item in video.read_ahead(frames(50, fail_at=7)):
            seen.append(item)
    assert seen == list(range(7))
    closed.clear()
    ahead = video.read_ahead(frames(10_000))
    assert [next(ahead), next(ahead)] == [0, 1]
    ahead.close()  # the decoding thread stops and closes its generator, in that thread
    assert closed.is_set()
    assert not [t for t in threading.enumerate() if t.name == "video-decode"]
