"""Videos: what --smooth buys (J&F, flicker, fast movers), resuming after SIGKILL, memory over
a long video, and speed against the same frames as PNG files.

    python bench/video_bench.py [--parts smooth,outputs,resume,memory,speed,ray] [--work DIR]
        [--speed-frames 300] [--big-frames 60] [--rounds 1]

Every video is synthetic (moving coloured shapes, which the demo model knows) with its ground
truth. Each measurement runs ``clipseg segment`` as a subprocess, as a user would.

* smooth: 3 scenes (a slow red circle and a fast blue square; 60 frames, 180x320), 6 of shapes
  moving 2-4 px a frame, 3 of nearly still shapes: J, F, J&F (DAVIS definitions) of every
  prompt, flicker (mean |p_t - p_(t-1)| from the log row), and J of the faster mover over the
  last 10 frames, for --smooth flow, ema and none; and the ground truth's own flicker (the
  objects' real motion, which no smoothing should remove).
* outputs: mask, soft and overlay videos (with the source's audio) and matte videos (ProRes 4444,
  FFV1) opened with PyAV and OpenCV: frame count, size, frame rate, timestamps against the
  source's; each matte video's alpha against the 16-bit matte PNGs of the same run.
* resume: a 600-frame video killed (SIGKILL) after its 1st and again after its 4th segment of
  100 frames, then finished: the lossless outputs against an uninterrupted run's, frame by
  frame, and leftover temporary files.
* memory: peak RSS of segmenting a 3000-frame 640x360 video against a 300-frame one.
* ray: a 300-frame video in parts of 60 with --engine ray against the local engine: how far
  apart the soft and mask videos are (the smoothing's warm-up tolerance), J&F of each, speed.
* speed: frames/s of ``segment video.mp4`` against ``segment`` over the same frames as PNGs,
  1 prompt, with the demo model and a full-size random rd64 model (bench/make_model.py); and
  --smooth flow against none. ``--rounds N`` interleaves N rounds of the runs and reports
  medians (one round swings by 10-20% on a shared VM); ``--big-frames 0`` skips the full model.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import av
import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(REPO))

from video_helpers import write_video  # noqa: E402

from clipseg_cli.ops import temporal  # noqa: E402
from clipseg_cli.ops.shapes import Mover, moving_frames  # noqa: E402

SLOW = Mover("red circle", 0.16, (0.3, 0.5), (1.0, 0.4))
# Sensor noise of the smoothing scenes: a camera's grain is what makes per-frame masks flicker.
GRAIN = 12.0
FAST = Mover("blue square", 0.13, (0.75, 0.35), (-11.0, 4.0))
# Shapes moving a moderate 2-4 px a frame (2.2 and 3.4), the same shapes and grain.
MODERATE = (
    Mover("red circle", 0.16, (0.3, 0.5), (2.0, 1.0)),
    Mover("blue square", 0.13, (0.75, 0.35), (-3.0, 1.5)),
)


def cpu_summary() -> str:
    try:
        text = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return f"CPU: {platform.processor() or 'unknown'} (no lscpu)"
    fields = {
        key.strip(): value.strip()
        for key, _, value in (line.partition(":") for line in text.splitlines())
    }
    flags = set(fields.get("Flags", "").split())
    wanted = ["avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "amx_bf16", "amx_int8"]
    shown = " ".join(f"{flag}{'+' if flag in flags else '-'}" for flag in wanted)
    return f"CPU: {fields.get('Model name', '?')} ({fields.get('CPU(s)', '?')} CPUs) {shown}"


def segment(
    source: Path, out: Path, *extra: str, model: str = "demo", command_name: str = "segment"
) -> float:
    """Run ``clipseg segment`` (or ``matte``); its wall time in seconds."""
    command = [sys.executable, "-m", "clipseg_cli", command_name, str(source), "-o", str(out)]
    command += ["--model", model, "--progress", "none", *extra]
    start = time.perf_counter()
    subprocess.run(command, check=True, capture_output=True, env=_env())
    return time.perf_counter() - start


def _env() -> dict:
    return {**os.environ, "PYTHONPATH": str(REPO)}


def gray_frames(path: Path) -> list[np.ndarray]:
    with av.open(str(path)) as container:
        return [f.to_ndarray(format="gray") for f in container.decode(video=0)]


def scene_video(
    path: Path, count: int, size: tuple[int, int], seed: int, movers, grain: float = 4.0
) -> list[dict]:
    frames, truths = [], []
    for rgb, masks in moving_frames(count, size, movers, seed=seed, grain=grain):
        frames.append(rgb)
        truths.append(masks)
    write_video(path, frames)
    return truths


# -- smooth ----------------------------------------------------------------------------------


def bench_smooth(work: Path) -> None:
    print(f"\n## --smooth on moving shapes (3 scenes x 60 frames, 180x320, grain {GRAIN})")
    _smooth(work, (SLOW, FAST), GRAIN, "moving")
    # Moderate movers, as most footage has: 2.2 and 3.4 px a frame. Six scenes: one shape's
    # detection can hover around the threshold for a whole scene, which weighs on three.
    print(f"\n## --smooth on moderately moving shapes (2.2 and 3.4 px/frame, grain {GRAIN})")
    _smooth(work, MODERATE, GRAIN, "moderate", seeds=6)
    # Where the masks' change is noise rather than motion: the same shapes nearly still under
    # a noisier sensor (the flicker --smooth is for).
    still = tuple(Mover(m.label, m.radius, m.start, (0.2, 0.1)) for m in (SLOW, FAST))
    print("\n## --smooth on nearly still shapes (0.2 px/frame, grain 24)")
    _smooth(work, still, 24.0, "still")


def _truth_flicker(truths: list[dict], label: str) -> tuple[float, float]:
    """Mean |dp| of the ground truth itself: of its binary masks (what a perfect output would
    show: the refined probability is 0 or 1 away from the edges), and of the masks blurred
    (Gaussian, 4 px) as a model's soft probability is. The floor of the flicker measure on a
    moving scene: the part of |dp| that is the objects' real motion."""
    import cv2

    binary = [t[label].astype(np.float32) for t in truths]
    blurred = [cv2.GaussianBlur(m, (0, 0), 4) for m in binary]
    return tuple(
        float(np.mean([np.abs(a - b).mean() for a, b in zip(seq[1:], seq[:-1], strict=True)]))
        for seq in (binary, blurred)
    )


def _smooth(work: Path, movers: tuple[Mover, ...], grain: float, name: str, seeds: int = 3) -> None:
    modes = ("flow", "ema", "none")
    totals = {mode: {"jf": [], "j": [], "f": [], "dp": [], "iou": [], "fast": []} for mode in modes}
    floors = []
    for seed in range(seeds):
        source = work / f"{name}{seed}.mp4"
        truths = scene_video(source, 60, (180, 320), seed, movers, grain=grain)
        floors += [_truth_flicker(truths, mover.label) for mover in movers]
        for mode in modes:
            out = work / f"smooth-{name}-{mode}-{seed}"
            shutil.rmtree(out, ignore_errors=True)
            segment(source, out, "-p", movers[0].label, "-p", movers[1].label, "--smooth", mode)
            row = json.loads((out / "clipseg-log.jsonl").read_text().splitlines()[-1])
            for prompt_row, mover in zip(row["prompts"], movers, strict=True):
                slug = mover.label.replace(" ", "-")
                masks = gray_frames(out / f"{name}{seed}.mp4.{slug}.mask.mkv")
                scores = temporal.SequenceScores()
                for mask, truth in zip(masks, truths, strict=True):
                    scores.add(mask > 0, truth[mover.label])
                result = scores.result()
                totals[mode]["j"].append(result["J"])
                totals[mode]["f"].append(result["F"])
                totals[mode]["jf"].append(result["J&F"])
                totals[mode]["dp"].append(prompt_row["mean_abs_dp"])
                totals[mode]["iou"].append(prompt_row["mean_iou"])
                if mover is movers[-1]:  # the faster one
                    totals[mode]["fast"].append(float(np.mean(scores.j[-10:])))
    print(
        "| --smooth | J | F | J&F | flicker mean abs dp | consecutive-mask IoU "
        "| fast mover J, last 10 |"
    )
    print("|---|---|---|---|---|---|---|")
    for mode in modes:
        t = {name: float(np.mean(values)) for name, values in totals[mode].items()}
        print(
            f"| {mode} | {t['j']:.4f} | {t['f']:.4f} | {t['jf']:.4f} | {t['dp']:.5f} | "
            f"{t['iou']:.4f} | {t['fast']:.4f} |"
        )
    base = {name: float(np.mean(v)) for name, v in totals["none"].items()}
    binary, blurred = (float(np.mean(column)) for column in zip(*floors, strict=True))
    print(
        f"ground truth's own flicker (the objects' motion): {binary:.5f} binary, "
        f"{blurred:.5f} blurred; x{binary / base['dp']:.2f} of none's is the floor"
    )
    for mode in ("flow", "ema"):
        t = {name: float(np.mean(v)) for name, v in totals[mode].items()}
        fast = [a - b for a, b in zip(totals[mode]["fast"], totals["none"]["fast"], strict=True)]
        print(
            f"{mode} vs none: J&F {t['jf'] - base['jf']:+.4f}, "
            f"flicker x{t['dp'] / base['dp']:.2f} (over the floor {t['dp'] - binary:+.5f}, "
            f"none's {base['dp'] - binary:+.5f}), "
            f"fast-mover J (last 10) {t['fast'] - base['fast']:+.4f} "
            f"(per scene {', '.join(f'{d:+.3f}' for d in fast)})"
        )


# -- resume ----------------------------------------------------------------------------------


def _segment_rows(out: Path) -> int:
    try:
        lines = (out / ".clipseg" / "ledger.jsonl").read_text().splitlines()
    except FileNotFoundError:
        return 0
    # Rows with a segment; the header names the "segment" command too, and the last line
    # may be half written.
    count = 0
    for line in lines:
        with contextlib.suppress(ValueError):  # the line being written: counted once whole
            count += "segment" in json.loads(line)
    return count


def bench_resume(work: Path) -> None:
    print("\n## Resume: a 600-frame video (180x320, segments of 100) killed twice, then finished")
    source = work / "long.mp4"
    scene_video(source, 600, (180, 320), 7, (SLOW, FAST))
    extra = ("-p", SLOW.label, "--save", "mask,soft,overlay", "--segment-frames", "100")
    whole, resumed = work / "resume-whole", work / "resume-killed"
    seconds = segment(source, whole, *extra)
    command = [sys.executable, "-m", "clipseg_cli", "segment", str(source), "-o", str(resumed)]
    command += ["--model", "demo", "--progress", "none", *extra]
    for after in (1, 4):
        process = subprocess.Popen(command, env=_env(), stderr=subprocess.DEVNULL)
        while _segment_rows(resumed) < after and process.poll() is None:
            time.sleep(0.01)
        process.kill()
        code = process.wait()
        print(f"killed after segment {after}: return code {code} (-9: killed mid-run)")
    subprocess.run(command, check=True, capture_output=True, env=_env())
    for kind in ("mask", "soft"):
        name = f"long.mp4.red-circle.{kind}.mkv"
        a, b = gray_frames(whole / name), gray_frames(resumed / name)
        same = len(a) == len(b) and all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))
        print(f"{kind}: {len(b)} frames, equal to the uninterrupted run's frame for frame: {same}")
    with av.open(str(resumed / "long.mp4.red-circle.overlay.mp4")) as container:
        print(f"overlay: {container.streams.video[0].frames} frames")
    leftovers = [p for p in resumed.rglob("*") if ".tmp-" in p.name]
    leftovers += list((resumed / ".clipseg").glob("video/*"))
    print(f"temporary files left: {len(leftovers)}; uninterrupted run {seconds:.1f} s")


# -- memory ----------------------------------------------------------------------------------

_RSS_CHILD = """
import resource, subprocess, sys
subprocess.run(sys.argv[1:], check=True, capture_output=True)
print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)
"""


def peak_rss_mb(command: list[str]) -> float:
    """Peak RSS of ``command``, measured from a fresh wrapper (a child's ru_maxrss starts at
    its parent's RSS when forked)."""
    wrapper = [sys.executable, "-c", _RSS_CHILD, *command]
    result = subprocess.run(wrapper, check=True, capture_output=True, text=True, env=_env())
    return int(result.stdout.split()[-1]) / 1024


def _long_video(path: Path, count: int) -> None:
    """A 640x360 video of ``count`` frames, written as it is made (never held in memory)."""
    container = av.open(str(path), "w")
    stream = container.add_stream("libx264", rate=25)
    stream.width, stream.height, stream.pix_fmt = 640, 360, "yuv420p"
    for rgb, _masks in moving_frames(count, (360, 640), (SLOW, FAST), seed=11):
        for packet in stream.encode(av.VideoFrame.from_ndarray(rgb, format="rgb24")):
            container.mux(packet)
    for packet in stream.encode():
        container.mux(packet)
    container.close()


def bench_memory(work: Path) -> None:
    print("\n## Memory: peak RSS, 640x360, demo model, --save mask,overlay")
    # Once first: a fresh cache builds the text graph on the first run (torch loaded), which
    # would be counted against whichever length ran first.
    _long_video(work / "rss-warm.mp4", 10)
    shutil.rmtree(work / "rss-warm", ignore_errors=True)
    segment(work / "rss-warm.mp4", work / "rss-warm", "-p", SLOW.label, "--save", "mask,overlay")
    results = {}
    for count in (300, 3000):
        source = work / f"rss{count}.mp4"
        _long_video(source, count)
        out = work / f"rss-out{count}"
        command = [sys.executable, "-m", "clipseg_cli", "segment", str(source), "-o", str(out)]
        command += ["--model", "demo", "--progress", "none", "-p", SLOW.label]
        command += ["--save", "mask,overlay"]
        start = time.perf_counter()
        results[count] = peak_rss_mb(command)
        print(
            f"{count} frames: peak RSS {results[count]:.0f} MB "
            f"({time.perf_counter() - start:.0f} s)"
        )
    print(f"3000 / 300: {results[3000] / results[300]:.3f}")


# -- outputs ---------------------------------------------------------------------------------


def _opened(path: Path) -> tuple[str, str]:
    """What PyAV and OpenCV read of a video: frames, size, frame rate (and PyAV's first and
    last timestamps, its audio streams)."""
    import cv2

    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        times = [float(frame.time) for frame in container.decode(stream)]
    with av.open(str(path)) as container:
        stream, audio = container.streams.video[0], len(container.streams.audio)
        rate = float(stream.average_rate or 0)
        pyav = (
            f"{len(times)} frames, {stream.codec_context.width}x{stream.codec_context.height}, "
            f"{rate:.3f} fps, t {times[0]:.3f}..{times[-1]:.3f} s, audio streams {audio}"
        )
    capture = cv2.VideoCapture(str(path))
    count = int(capture.get(cv2.CAP_PROP_FRAME_COUNT))
    decoded = 0
    while capture.read()[0]:
        decoded += 1
    width = int(capture.get(cv2.CAP_PROP_FRAME_WIDTH))
    height = int(capture.get(cv2.CAP_PROP_FRAME_HEIGHT))
    opencv = (
        f"{decoded} frames decoded ({count} announced), {width}x{height}, "
        f"{capture.get(cv2.CAP_PROP_FPS):.3f} fps"
    )
    capture.release()
    return pyav, opencv


def bench_outputs(work: Path) -> None:
    print("\n## Outputs: a 60-frame 180x320 video at 25 fps with audio, opened by PyAV and OpenCV")
    from video_helpers import write_video

    frames = [rgb for rgb, _ in moving_frames(60, (180, 320), (SLOW, FAST), seed=5)]
    source = write_video(work / "outputs.mp4", frames, audio=True)
    with av.open(str(source)) as container:
        times = [float(frame.time) for frame in container.decode(video=0)]
    print(f"source: {len(times)} frames, t {times[0]:.3f}..{times[-1]:.3f} s")
    out = work / "outputs-segment"
    shutil.rmtree(out, ignore_errors=True)
    segment(source, out, "-p", SLOW.label, "--save", "mask,soft,overlay")
    print("| output | PyAV | OpenCV |")
    print("|---|---|---|")
    for kind, extension in (("mask", "mkv"), ("soft", "mkv"), ("overlay", "mp4")):
        pyav, opencv = _opened(out / f"outputs.mp4.red-circle.{kind}.{extension}")
        print(f"| {kind} .{extension} | {pyav} | {opencv} |")
    from clipseg_cli.io import video

    for codec, extension in (("prores", "mov"), ("ffv1", "mkv")):
        matte = work / f"outputs-matte-{codec}"
        shutil.rmtree(matte, ignore_errors=True)
        extra = ("-p", SLOW.label, "--video-codec", codec, "--frames", "--matte-bits", "16")
        segment(source, matte, *extra, command_name="matte")
        path = matte / f"outputs.mp4.red-circle.matte.{extension}"
        pyav, opencv = _opened(path)
        worst = 0.0
        for index, alpha in enumerate(video.alpha_frames(path)):
            png = matte / "outputs.mp4.frames" / f"{index:06d}.png.red-circle.matte.png"
            expected = np.asarray(Image.open(png)).astype(np.float64) / 65535
            worst = max(worst, float(np.abs(alpha - expected).max()))
        print(f"| matte {codec} .{extension} | {pyav} | {opencv} |")
        print(f"  {codec} alpha against the 16-bit matte PNGs: max |error| {worst:.6f} "
              f"(1/1023 = {1 / 1023:.6f}; {worst * 65535:.1f} of 65535)")  # fmt: skip


# -- ray -------------------------------------------------------------------------------------


def bench_ray(work: Path) -> None:
    warmup = temporal.warmup_frames()  # run.frames.WARMUP_FRAMES
    print(
        f"\n## --engine ray: a 300-frame 180x320 video in parts of 60 (4 parts warm up on "
        f"up to {warmup} frames before them)"
    )
    source = work / "ray.mp4"
    truths = scene_video(source, 300, (180, 320), 5, (SLOW, FAST), grain=GRAIN)
    extra = ("-p", SLOW.label, "-p", FAST.label, "--save", "mask,soft", "--segment-frames", "60")
    outs = {name: work / f"ray-{name}" for name in ("local", "ray")}
    seconds = {}
    for name, out in outs.items():
        shutil.rmtree(out, ignore_errors=True)
        engine = ("--engine", "ray") if name == "ray" else ()
        seconds[name] = segment(source, out, *extra, *engine)
    print(
        f"wall time: local {seconds['local']:.1f} s, ray {seconds['ray']:.1f} s (start-up included)"
    )
    print(
        "| prompt | soft: max diff (of 255) | frames differing | mask pixels flipped "
        "| J&F local | J&F ray |"
    )
    print("|---|---|---|---|---|---|")
    for mover in (SLOW, FAST):
        slug = mover.label.replace(" ", "-")
        soft = [gray_frames(o / f"ray.mp4.{slug}.soft.mkv") for o in outs.values()]
        mask = [gray_frames(o / f"ray.mp4.{slug}.mask.mkv") for o in outs.values()]
        worst = max(int(np.abs(a.astype(int) - b).max()) for a, b in zip(*soft, strict=True))
        differing = sum(not np.array_equal(a, b) for a, b in zip(*soft, strict=True))
        flipped = sum(int((a != b).sum()) for a, b in zip(*mask, strict=True))
        total = mask[0][0].size * len(mask[0])
        scores = []
        for masks in mask:
            sequence = temporal.SequenceScores()
            for m, truth in zip(masks, truths, strict=True):
                sequence.add(m > 0, truth[mover.label])
            scores.append(sequence.result()["J&F"])
        print(
            f"| {mover.label} | {worst} | {differing} of {len(soft[0])} | "
            f"{flipped} of {total} ({flipped / total:.2e}) | {scores[0]:.4f} | {scores[1]:.4f} |"
        )


# -- speed -----------------------------------------------------------------------------------


def bench_speed(work: Path, frames: int, big_frames: int, rounds: int = 1) -> None:
    for model, count in (("demo", frames), ("rd64", big_frames)):
        if count:
            _speed(work, model, count, rounds)


def _speed(work: Path, model: str, frames: int, rounds: int) -> None:
    name = "demo model" if model == "demo" else "random rd64 (full size)"
    print(f"\n## Speed, {name}: {frames} frames of 640x360, 1 prompt, --save mask")
    source = work / f"speed{frames}.mp4"
    _long_video(source, frames)
    pngs = work / f"speed-png{frames}"
    shutil.rmtree(pngs, ignore_errors=True)
    pngs.mkdir()
    with av.open(str(source)) as container:
        for index, frame in enumerate(container.decode(video=0)):
            Image.fromarray(frame.to_ndarray(format="rgb24")).save(
                pngs / f"{index:05d}.png", compress_level=1
            )
    if model != "demo":
        model_dir = work / "rd64"
        if not model_dir.exists():
            maker = [sys.executable, str(REPO / "bench" / "make_model.py"), str(model_dir)]
            subprocess.run(maker, check=True, capture_output=True)
        model = str(model_dir)
    # Once first: a model's first run exports its graph and measures the backends (cached),
    # which would be counted against whichever run came first.
    tiny = work / "one.png"
    shutil.copy(pngs / "00000.png", tiny)
    shutil.rmtree(work / "speed-one", ignore_errors=True)
    segment(tiny, work / "speed-one", "-p", SLOW.label, model=model)
    # Rounds of the four runs interleaved, medians: this VM's speed drifts between minutes.
    # Start-up (imports, model load) is paid once either way: a one-frame run measures it,
    # and it is taken off.
    runs = (
        ("pngs", pngs, ()),
        ("video flow", source, ("--smooth", "flow")),
        ("video none", source, ("--smooth", "none")),
        ("start-up", tiny, ()),
    )
    times: dict[str, list[float]] = {label: [] for label, _inputs, _extra in runs}
    for _round in range(rounds):
        for label, inputs, extra in runs:
            out = work / f"speed-{label.replace(' ', '-')}-{Path(model).name}"
            shutil.rmtree(out, ignore_errors=True)
            times[label].append(segment(inputs, out, "-p", SLOW.label, *extra, model=model))
    median = {label: statistics.median(values) for label, values in times.items()}
    startup = median.pop("start-up")
    rates = {label: frames / max(seconds - startup, 1e-6) for label, seconds in median.items()}
    flow, none = rates["video flow"], rates["video none"]
    if rounds > 1:
        print(
            "whole-process seconds by round: "
            + "; ".join(
                f"{label} {', '.join(f'{t:.2f}' for t in values)}"
                for label, values in times.items()
            )
        )
    print(
        f"PNGs {rates['pngs']:.2f} frames/s; video --smooth flow {flow:.2f} "
        f"({flow / rates['pngs']:.2f}x); video --smooth none {none:.2f} "
        f"({none / rates['pngs']:.2f}x); flow / none {flow / none:.2f}; start-up {startup:.1f} s "
        f"taken off each" + (f" (medians of {rounds} interleaved rounds)" if rounds > 1 else "")
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--parts", default="smooth,outputs,resume,memory,speed,ray")
    parser.add_argument("--work", type=Path, default=None)
    parser.add_argument("--speed-frames", type=int, default=300)
    parser.add_argument(
        "--big-frames", type=int, default=60, help="frames for the full model (0: not run)"
    )
    parser.add_argument("--rounds", type=int, default=1, help="speed: interleaved rounds")
    args = parser.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="video-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    print(cpu_summary())
    print(f"load average at start: {os.getloadavg()}")
    parts = args.parts.split(",")
    if "smooth" in parts:
        bench_smooth(work)
    if "outputs" in parts:
        bench_outputs(work)
    if "resume" in parts:
        bench_resume(work)
    if "memory" in parts:
        bench_memory(work)
    if "speed" in parts:
        bench_speed(work, args.speed_frames, args.big_frames, args.rounds)
    if "ray" in parts:
        bench_ray(work)
    print(f"\nload average at end: {os.getloadavg()}")


if __name__ == "__main__":
    main()
