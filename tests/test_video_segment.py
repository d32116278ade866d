"""Videos through ``clipseg segment`` / ``matte`` with the demo model: the output videos (frame
count, timestamps, lossless masks equal to the per-frame PNGs, alpha, audio), the log row,
bad videos as one-line failures, and resuming after SIGKILL mid-video."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import av
import cv2
import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner
from video_helpers import shapes_video

from clipseg_cli.commands.app import app
from clipseg_cli.io import video
from clipseg_cli.io.naming import LEDGER_NAME, STATE_DIR
from clipseg_cli.ops.shapes import make_scene

runner = CliRunner()
PROMPT = "red circle"


def _run(*args: str):
    common = ["--model", "demo", "--progress", "none", "-p", PROMPT]
    return runner.invoke(app, [*args, *common])


def _rows(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "clipseg-log.jsonl").read_text().splitlines()]


def _gray_frames(path: Path) -> list[np.ndarray]:
    with av.open(str(path)) as container:
        return [f.to_ndarray(format="gray") for f in container.decode(video=0)]


def _times(path: Path) -> list[float]:
    with av.open(str(path)) as container:
        return [float(f.time) for f in container.decode(video=0)]


def test_segment_video_outputs(tmp_path: Path) -> None:
    source, _ = shapes_video(tmp_path / "clip.mp4", count=20, audio=True)
    out = tmp_path / "out"
    args = ["segment", str(source), "-o", str(out), "--save", "mask,soft,overlay", "--frames"]
    result = _run(*args, "--segment-frames", "6")
    assert result.exit_code == 0, result.output
    (row,) = _rows(out)
    assert row["status"] == "ok" and row["mode"] == "video"
    assert row["video"]["frames"] == 20 and row["video"]["fps"] == 25.0 and row["video"]["audio"]
    prompt = row["prompts"][0]
    assert len(prompt["coverage"]) == 20 and prompt["empty_frames"] == 0
    assert prompt["mean_abs_dp"] is not None and 0 <= prompt["mean_iou"] <= 1
    masks = _gray_frames(out / "clip.mp4.red-circle.mask.mkv")
    assert len(masks) == 20 and masks[0].shape == (96, 160)
    # Lossless: every frame of the mask video is the PNG of that frame.
    for index, mask in enumerate(masks):
        png = out / "clip.mp4.frames" / f"{index:06d}.png.red-circle.mask.png"
        assert np.array_equal(np.asarray(Image.open(png)), mask)
    assert _times(out / "clip.mp4.red-circle.mask.mkv") == pytest.approx(_times(source))
    overlay = out / "clip.mp4.red-circle.overlay.mp4"
    with av.open(str(overlay)) as container:
        assert len(container.streams.audio) == 1
        assert container.streams.video[0].frames == 20
    capture = cv2.VideoCapture(str(out / "clip.mp4.red-circle.soft.mkv"))
    assert int(capture.get(cv2.CAP_PROP_FRAME_COUNT)) == 20
    assert (capture.get(cv2.CAP_PROP_FRAME_WIDTH), capture.get(cv2.CAP_PROP_FRAME_HEIGHT)) == (
        160,
        96,
    )
    assert not (out / STATE_DIR / "video").exists()  # no temporary part left
    # Unchanged: skipped; touched: redone.
    assert _run(*args, "--segment-frames", "6").exit_code == 0
    assert _rows(out)[-1]["status"] == "skipped"
    os.utime(source, ns=(time.time_ns(), time.time_ns()))
    assert _run(*args, "--segment-frames", "6").exit_code == 0
    assert _rows(out)[-1]["status"] == "ok"


def test_matte_video_alpha_is_the_matte(tmp_path: Path) -> None:
    source, _ = shapes_video(tmp_path / "clip.mkv", count=5, codec="ffv1")
    out = tmp_path / "out"
    args = ["matte", str(source), "-o", str(out), "--frames", "--matte-bits", "16"]
    result = _run(*args)
    assert result.exit_code == 0, result.output
    alphas = list(video.alpha_frames(out / "clip.mkv.red-circle.matte.mov"))
    assert len(alphas) == 5
    for index, alpha in enumerate(alphas):
        png = out / "clip.mkv.frames" / f"{index:06d}.png.red-circle.matte.png"
        matte = np.asarray(Image.open(png)).astype(np.float64) / 65535
        assert np.abs(alpha - matte).max() <= 1 / 1023


def test_every_start_end_sample_the_frames(tmp_path: Path) -> None:
    source, _ = shapes_video(tmp_path / "clip.mp4", count=20)
    out = tmp_path / "out"
    args = ["segment", str(source), "-o", str(out), "--every", "2", "--start", "0.2"]
    assert _run(*args, "--end", "0.6", "--smooth", "none").exit_code == 0
    times = _times(out / "clip.mp4.red-circle.mask.mkv")
    assert times == pytest.approx([0.2, 0.28, 0.36, 0.44, 0.52])


def _bad_inputs(folder: Path) -> dict[str, str]:
    """Bad videos next to a good image and a good video: name -> the expected reason."""
    folder.mkdir()
    Image.fromarray(make_scene(1).image).save(folder / "photo.png")
    good, _ = shapes_video(folder / "good.mkv", count=40, codec="ffv1")
    data = good.read_bytes()
    (folder / "truncated.mkv").write_bytes(data[: len(data) * 6 // 10])
    (folder / "unknown.mkv").write_bytes(data.replace(b"V_FFV1", b"V_QQQQ"))
    with av.open(str(folder / "sound.mka"), "w", format="matroska") as container:
        stream = container.add_stream("aac", rate=22050)
        piece = av.AudioFrame.from_ndarray(
            np.zeros((1, 1024), np.float32), format="fltp", layout="mono"
        )
        piece.sample_rate, piece.pts = 22050, 0
        for packet in [*stream.encode(piece), *stream.encode()]:
            container.mux(packet)
    with av.open(str(folder / "zero.mkv"), "w") as container:
        stream = container.add_stream("ffv1", rate=25)
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
        container.start_encoding()
    shapes_video(folder / "huge.mp4", count=3, size=(200, 320))
    return {
        "truncated.mkv": "truncated video",
        "unknown.mkv": "unsupported video codec",
        "sound.mka": "no video stream",
        "zero.mkv": "no frames",
        "huge.mp4": "over --max-pixels",
    }


def test_bad_videos_fail_one_line_each_and_the_run_goes_on(tmp_path: Path) -> None:
    expected = _bad_inputs(tmp_path / "in")
    out = tmp_path / "out"
    result = _run("segment", str(tmp_path / "in"), "-o", str(out), "--max-pixels", "60000")
    assert result.exit_code == 1, result.output
    rows = {Path(row["input"]).name: row for row in _rows(out)}
    assert rows["photo.png"]["status"] == "ok" and rows["good.mkv"]["status"] == "ok"
    assert len(rows) == 2 + len(expected)
    for name, reason in expected.items():
        assert rows[name]["status"] == "failed", name
        assert reason in rows[name]["error"] and "\n" not in rows[name]["error"], name
    # A failed video leaves nothing: no partial outputs, no parts.
    assert not list(out.glob("truncated.mkv.*"))
    assert not (out / STATE_DIR / "video").exists()


def _segment_rows(out: Path) -> int:
    try:
        lines = (out / STATE_DIR / LEDGER_NAME).read_text().splitlines()
    except FileNotFoundError:
        return 0
    return sum('"segment"' in line for line in lines)


def _command(source: Path, out: Path) -> list[str]:
    return [
        sys.executable,
        "-m",
        "clipseg_cli",
        "segment",
        str(source),
        "-o",
        str(out),
        "--model",
        "demo",
        "-p",
        PROMPT,
        "--save",
        "mask,soft",
        "--segment-frames",
        "8",
        "--progress",
        "none",
    ]


def test_sigkill_mid_video_resumes_to_the_uninterrupted_result(tmp_path: Path) -> None:
    source, _ = shapes_video(tmp_path / "clip.mp4", count=80)
    whole, resumed = tmp_path / "whole", tmp_path / "resumed"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    subprocess.run(_command(source, whole), check=True, env=env, capture_output=True)
    process = subprocess.Popen(_command(source, resumed), env=env, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    # Killed once the second segment is recorded: a deterministic point, far from the end.
    while _segment_rows(resumed) < 2 and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    process.kill()
    assert process.wait() == -9  # the kill interrupted the run
    assert not (resumed / "clip.mp4.red-circle.mask.mkv").exists()
    subprocess.run(_command(source, resumed), check=True, env=env, capture_output=True)
    for kind in ("mask", "soft"):
        name = f"clip.mp4.red-circle.{kind}.mkv"
        a, b = _gray_frames(whole / name), _gray_frames(resumed / name)
        assert len(a) == len(b) == 80
        assert all(np.array_equal(x, y) for x, y in zip(a, b, strict=True)), kind
    rows = _rows(resumed)
    assert rows[-1]["status"] == "ok"
    assert rows[-1]["prompts"] == _rows(whole)[-1]["prompts"]
    assert not (resumed / STATE_DIR / "video").exists()
    assert not [p for p in resumed.rglob("*") if ".tmp-" in p.name]
