"""Where a run's time goes, stage by stage: the summary's ``stages`` of a real run, and what each
piece of the decode and write stages costs per image.

* A warm run of ``clipseg segment`` (a subprocess, caches warm: one untimed 1-image run first)
  on ``--images`` photo-like 1024x768 JPEGs (bench/make_images.py) with random full-size
  rd64-refined weights (bench/make_model.py), the default options plus ``--`` extra ones (a
  faster model: ``-- --precision int8``, or ``-- --backend openvino --precision bf16`` where
  that backend exists); its ``stages`` as a table (seconds, per image, share of the wall time).
* ``--replay SECONDS``: the same run in this process with the model replaced by one that
  takes SECONDS per image (sleeping) and gives the logits the real model gave these images
  (saved by a ``--save logits`` run first): the rest of the pipeline as it is, in front of a
  model of exactly that speed (0.09: OpenVINO bf16 on an AMX Xeon), whatever the machine's
  load does to the real model. The CPU gate treats it as the real model (a CPU device).
* ``--pieces``: the CPU time of each piece of the decode and write stages, per image, in this
  process on the same images, with the run's own logits (``--save logits`` of the warm-up
  run): decode (Pillow), resize to the model, upsample, guided filter, shaping, objects (the
  instances split and scores), mask PNG; min over ``--repeats``, as the machine is shared.
* The CPU (lscpu's model name and the flags that matter) and the load average before and after.

    .venv/bin/python bench/stages_bench.py [--images 48] [--work bench/_work] [--pieces]
        [--replay 0.09] [-- --precision int8]
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
REPO = BENCH_DIR.parent
sys.path.insert(0, str(BENCH_DIR))

from make_images import make_photo_like_jpegs  # noqa: E402
from onnx_bench import cpu_summary  # noqa: E402

PROMPTS = {1: ["a cat"], 5: ["a cat", "a dog", "a car", "a tree", "a person"]}


def load() -> str:
    one, five, fifteen = os.getloadavg()
    return f"{one:.2f} {five:.2f} {fifteen:.2f}"


def segment(images: Path, out: Path, model: Path, prompts: list[str], extra: list[str]) -> dict:
    """One ``clipseg segment`` process; its summary, with the wall time it took."""
    args = [sys.executable, "-m", "clipseg_cli", "segment", str(images), "--model", str(model)]
    args += [a for prompt in prompts for a in ("--prompt", prompt)]
    shutil.rmtree(out, ignore_errors=True)  # a fresh folder: nothing skipped as done
    args += ["--out", str(out), "--progress", "none", *extra]
    start = time.perf_counter()
    done = subprocess.run(args, capture_output=True, text=True, check=False)
    wall = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"{shlex.join(args)} failed ({done.returncode}):\n{done.stderr}")
    summary = json.loads((out / "clipseg-summary.json").read_text())
    summary["wall_s"] = wall
    summary["stderr"] = done.stderr
    return summary


def replay(
    images: Path, out: Path, model: Path, prompts: list[str], seconds: float, logits: Path
) -> dict:
    """``segment`` in this process, its model replaced by a replay of ``logits`` (the real
    model's, one ``NAME.a-cat.logits.npy`` per image, repeated for every prompt) that takes
    ``seconds`` per image."""
    import numpy as np
    from typer.testing import CliRunner

    from clipseg_cli.commands.app import app
    from clipseg_cli.run import backend

    names = sorted(path.name for path in images.iterdir())
    replayed = [np.load(logits / f"{name}.a-cat.logits.npy") for name in names]
    calls = iter(range(10**9))

    class Replay:
        name = "replay"
        input_size = 352

        def logits(self, pixels: np.ndarray, conditionals: np.ndarray) -> np.ndarray:
            time.sleep(seconds * len(pixels))
            rows = [replayed[next(calls) % len(replayed)] for _ in range(len(pixels))]
            return np.stack([np.repeat(row[None], len(conditionals), axis=0) for row in rows])

    def open_replay(self: backend.ModelOpener, threads: int | None = None) -> backend.OpenedModel:
        details = {"backend": f"replay ({seconds} s per image)", "device": "cpu"}
        return backend.OpenedModel(Replay(), "cpu", details)

    backend.ModelOpener.__call__ = open_replay  # this process only
    shutil.rmtree(out, ignore_errors=True)
    args = ["segment", str(images), "--model", str(model), "--out", str(out)]
    args += [a for prompt in prompts for a in ("--prompt", prompt)]
    args += ["--progress", "none", "--batch-size", "1"]
    start = time.perf_counter()
    result = CliRunner().invoke(app, args)
    wall = time.perf_counter() - start
    if result.exit_code != 0:
        raise SystemExit(f"replay run failed ({result.exit_code}):\n{result.output}")
    summary = json.loads((out / "clipseg-summary.json").read_text())
    summary["wall_s"] = wall
    return summary


def stage_table(summary: dict, count: int) -> list[str]:
    stages = summary["stages"]
    seconds = summary["seconds"]
    lines = [
        "| stage | seconds | per image s | share of the run |",
        "|---|---|---|---|",
    ]
    for name in ("decode", "model", "write", "wait"):
        value = stages[name]
        if value is None:
            lines.append(f"| {name} | - | - | - |")
            continue
        lines.append(f"| {name} | {value:.2f} | {value / count:.3f} | {value / seconds:.0%} |")
    for reason, value in (stages.get("waited_for") or {}).items():
        lines.append(
            f"| wait: {reason} | {value:.2f} | {value / count:.3f} | {value / seconds:.0%} |"
        )
    lines.append(
        f"| run (summary seconds; process wall {summary['wall_s']:.1f}) | {seconds:.2f} | "
        f"{seconds / count:.3f} | 100% |"
    )
    lines.append("")
    lines.append(
        f"bottleneck: {stages['bottleneck']}; the model ran {stages['model_busy']:.0%} of the "
        f"loop's time; backend {summary.get('backend')}, dtype {summary.get('dtype')}, batch "
        f"{summary.get('batch_size')}"
    )
    return lines


def pieces(images: list[Path], logits_dir: Path, repeats: int) -> list[str]:
    """CPU milliseconds per image of each piece of decode and write (min over repeats)."""
    import cv2
    import numpy as np

    from clipseg_cli.io import sources, writers
    from clipseg_cli.ops import instances
    from clipseg_cli.ops.matting import GuidedRefinement
    from clipseg_cli.ops.shape import MaskShaping, shape_mask
    from clipseg_cli.ops.transforms import probabilities_at_size, resize_rgb

    totals: dict[str, float] = {}

    def clock(name: str, call):
        best, result = float("inf"), None
        for _ in range(repeats):
            start = time.process_time()
            result = call()
            best = min(best, time.process_time() - start)
        totals[name] = totals.get(name, 0.0) + best
        return result

    shaping = MaskShaping()

    def one(path: Path) -> None:
        logits = np.load(logits_dir / f"{path.name}.a-cat.logits.npy")
        rgb = clock("decode (Pillow, to RGB)", lambda: sources.decode_image(path)).rgb
        # Candidates, for comparison (not what the pipeline does: see docs/backends.md).
        data = path.read_bytes()
        flags = cv2.IMREAD_COLOR_RGB | cv2.IMREAD_IGNORE_ORIENTATION
        clock(
            "  (OpenCV imdecode, to RGB)",
            lambda: cv2.imdecode(np.frombuffer(data, np.uint8), flags),
        )
        clock("  (Pillow with DCT scaling to 1/2)", lambda: _draft_decode(path))
        clock("resize to the model (Pillow bilinear)", lambda: resize_rgb(rgb, (352, 352)))
        size = rgb.shape[:2]
        prob = clock(
            "upsample (sigmoid, bilinear)", lambda: probabilities_at_size(logits[None], size)
        )
        refined = clock("guided filter", lambda: GuidedRefinement(rgb).refine(prob[0], 0.5))
        mask, _ = clock("shaping (min-area)", lambda: shape_mask(refined > 0.5, shaping))
        rules = instances.InstanceRules(min_area=shaping.min_area_for(size))
        objects = clock(
            "objects (split, scores)", lambda: instances.find_objects(mask, refined, rules, 0.5)
        )
        clock("mask PNG", lambda: writers.mask_pixels_png(writers.mask_pixels(objects.mask)))

    for path in images:
        one(path)
    lines = ["| piece | CPU ms per image |", "|---|---|"]
    lines += [f"| {name} | {value / len(images) * 1000:.1f} |" for name, value in totals.items()]
    return lines


def _draft_decode(path: Path):
    """Pillow's JPEG decode at half size through libjpeg's DCT scaling (``Image.draft``)."""
    import numpy as np
    from PIL import Image

    with Image.open(path) as image:
        image.draft("RGB", (image.width // 2, image.height // 2))
        return np.asarray(image.convert("RGB"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=48)
    parser.add_argument("--prompts", type=int, choices=sorted(PROMPTS), default=1)
    parser.add_argument("--work", type=Path, default=BENCH_DIR / "_work")
    parser.add_argument("--pieces", action="store_true", help="also time each piece in-process")
    parser.add_argument(
        "--replay", type=float, default=None, help="also a run with a model of this speed (s)"
    )
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--skip-run", action="store_true", help="no real run (replay, pieces)")
    parser.add_argument("extra", nargs="*", help="options for clipseg segment, after --")
    args = parser.parse_args()
    work = args.work.resolve()
    os.environ["CLIPSEG_CACHE"] = str(work / "cache")
    images_dir = work / "images-1024x768"
    paths = make_photo_like_jpegs(images_dir, args.images)
    folder = work / f"images-{args.images}"
    if not folder.is_dir():
        folder.mkdir(parents=True)
        for path in paths:
            (folder / path.name).symlink_to(path)
    model = work / "model-rd64-refined"
    if not (model / "config.json").exists():
        subprocess.run(
            [sys.executable, str(BENCH_DIR / "make_model.py"), str(model)],
            check=True,
            capture_output=True,
        )
    prompts = PROMPTS[args.prompts]
    for line in cpu_summary()[:2]:
        print(line)
    warm = work / "stages-warm"
    segment(folder / paths[0].name, warm, model, prompts, [*args.extra, "--save", "logits"])
    if not args.skip_run:
        before = load()
        summary = segment(folder, work / "stages-out", model, prompts, args.extra)
        after = load()
        extra = " ".join(args.extra)
        command = f"clipseg segment {args.images} images, {len(prompts)} prompt(s) {extra}"
        print(f"\n{command}; load average before {before}, after {after}\n")
        print("\n".join(stage_table(summary, args.images)))
    # The model's logits of every image (kept: delete the folder after changing the model).
    logits_dir = work / "stages-logits"
    saved = [logits_dir / f"{path.name}.a-cat.logits.npy" for path in paths]
    if (args.pieces or args.replay is not None) and not all(p.exists() for p in saved):
        segment(folder, logits_dir, model, ["a cat"], [*args.extra, "--save", "logits"])
    if args.replay is not None:
        before = load()
        summary = replay(folder, work / "stages-replay", model, prompts, args.replay, logits_dir)
        print(
            f"\nthe same with the model replayed at {args.replay} s per image; load average "
            f"before {before}, after {load()}\n"
        )
        print("\n".join(stage_table(summary, args.images)))
    if args.pieces:
        print(f"\nper piece ({args.repeats} repeats, min), load average {load()}\n")
        print("\n".join(pieces(paths, logits_dir, args.repeats)))


if __name__ == "__main__":
    main()
