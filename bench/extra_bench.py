"""Benchmarks beyond the transformers comparison (run by ``make bench`` after run_bench.py).

* ``matte``: ``clipseg matte`` images/s at 1024x768, with and without edge refinement, on the
  same random full-size weights and generated photos as run_bench.py.
* ``rerun``: a no-op rerun over a finished folder of 10,000 images (target: under 3 s). The
  first pass uses a tiny random model (only the rerun is timed, and it never loads a model).
* ``sharp``: what ``segment --refine guided`` costs against ``--refine none`` (target: at most
  15% of a default full-size fp32 run on 1024x768 photos), per megapixel and prompt, and how
  ``--tiles N`` scales with the number of tiles (target: linearly).
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import time
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
REPO = BENCH_DIR.parent
sys.path.insert(0, str(BENCH_DIR))

from make_images import make_photo_like_jpegs  # noqa: E402
from run_bench import cli_base, ensure_model, image_subset, run_measured  # noqa: E402


def matte_rates(work: Path, images: int) -> list[str]:
    model = ensure_model(work / "model-rd64-refined", work / "logs")
    pool = work / "images-1024x768"
    make_photo_like_jpegs(pool, images)
    folder = image_subset(pool, work / "sets", images)
    lines = []
    for refine in ("none", "guided"):
        rates = {}
        for count, source in ((1, image_subset(pool, work / "sets", 1)), (images, folder)):
            out = work / f"matte-{refine}-{count}"
            shutil.rmtree(out, ignore_errors=True)
            cmd = [*cli_base(), "matte", str(source), "-p", "a dog", "--model", str(model)]
            cmd += ["--refine", refine, "--out", str(out), "--device", "cpu", "--progress", "none"]
            rates[count] = run_measured(f"matte {refine} x{count}", cmd, out / "run.log", count)
        steady = (images - 1) / (rates[images].wall_s - rates[1].wall_s)
        lines.append(
            f"| matte, --refine {refine}, 1 prompt, fp32 | {steady:.2f} img/s steady state "
            f"({images / rates[images].wall_s:.2f} end to end) | peak RSS "
            f"{rates[images].peak_rss_bytes / 2**30:.2f} GiB |"
        )
    return lines


def _segment_rate(work: Path, model: Path, pool: Path, images: int, label: str, *extra: str):
    """Steady-state (img/s, seconds per image) of ``segment`` with ``extra`` options."""
    walls = {}
    for count in (1, images):
        source = image_subset(pool, work / "sets", count)
        out = work / f"sharp-{label}-{count}"
        shutil.rmtree(out, ignore_errors=True)
        cmd = [*cli_base(), "segment", str(source), "-p", "a dog", "--model", str(model)]
        cmd += ["--out", str(out), "--device", "cpu", "--precision", "fp32", "--progress"]
        cmd += ["none", *extra]
        walls[count] = run_measured(f"{label} x{count}", cmd, out / "run.log", count).wall_s
    per_image = (walls[images] - walls[1]) / (images - 1)
    return 1 / per_image, per_image


def sharp_costs(work: Path, images: int) -> list[str]:
    from clipseg_cli.ops.tiles import tile_grid, tiles_along_short_side

    model = ensure_model(work / "model-rd64-refined", work / "logs")
    pool = work / "images-1024x768"
    make_photo_like_jpegs(pool, images)
    rate_none, none_s = _segment_rate(work, model, pool, images, "none", "--refine", "none")
    rate_guided, guided_s = _segment_rate(work, model, pool, images, "guided")
    megapixels = 1024 * 768 / 1e6
    cost = guided_s - none_s
    lines = [
        f"| segment 1024x768, fp32, 1 prompt, --refine none | {rate_none:.2f} img/s steady "
        "state | |",
        f"| segment 1024x768, fp32, 1 prompt, --refine guided (default) | {rate_guided:.2f} "
        f"img/s: +{100 * cost / none_s:.1f}% time, {1000 * cost / megapixels:.0f} ms per "
        "megapixel per prompt (target <= 15%) | |",
    ]
    for count in (2, 3, 4):
        tiles = len(tile_grid((768, 1024), tiles_along_short_side(str(count), (768, 1024), 352)))
        rate, seconds = _segment_rate(
            work, model, pool, images, f"tiles{count}", "--refine", "none", "--tiles", str(count)
        )
        lines.append(
            f"| --tiles {count} ({tiles} tiles + the whole image = {tiles + 1} rows), --refine "
            f"none | {rate:.3f} img/s, {seconds:.2f} s per image = {seconds / (tiles + 1):.2f} "
            f"s per row (whole image alone: {none_s:.2f} s) | |"
        )
    return lines


def _tiny_images(folder: Path, count: int) -> None:
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for i in range(count):
        path = folder / f"d{i % 100:02d}" / f"img{i:05d}.png"
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            data = (rng.random((24, 32, 3)) * 255).astype(np.uint8)
            Image.fromarray(data).save(path)


def rerun_time(work: Path, count: int) -> list[str]:
    sys.path.insert(0, str(REPO / "tests"))
    from factories import save_random_hf_checkpoint

    model = save_random_hf_checkpoint(work / "model-tiny", size="tiny")
    folder = work / f"tiny-images-{count}"
    _tiny_images(folder, count)
    out = work / f"rerun-{count}"
    cmd = [*cli_base(), "segment", str(folder), "-p", "a dog", "--model", str(model)]
    cmd += ["--out", str(out), "--device", "cpu", "--batch-size", "32", "--progress", "none"]
    first = run_measured(f"first pass x{count}", cmd, work / "logs" / "rerun-first.log", count)
    best = float("inf")
    for attempt in range(3):
        start = time.perf_counter()
        again = run_measured(f"rerun {attempt}", cmd, work / "logs" / "rerun.log", count)
        best = min(best, time.perf_counter() - start)
        if not again.ok:
            raise SystemExit("the rerun failed; see the log")
    # No RSS here: this harness imported torch to build the tiny model, and Linux reports a
    # child's peak RSS from its parent's size at fork time.
    return [
        f"| no-op rerun over {count} finished images (first pass {first.wall_s:.0f} s) | "
        f"{best:.2f} s wall, whole process (target < 3 s) | model not loaded |"
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", type=Path, default=BENCH_DIR / "_work")
    parser.add_argument("--images", type=int, default=12, help="images per matte run")
    parser.add_argument("--rerun-images", type=int, default=10_000)
    parser.add_argument("--only", choices=("matte", "rerun", "sharp"), default=None)
    args = parser.parse_args()
    # The same caches (ONNX graphs, prompt embeddings) as run_bench.py, never the user's own.
    os.environ.setdefault("CLIPSEG_CACHE", str(args.work.resolve() / "cache"))
    lines = []
    if args.only in (None, "matte"):
        lines += matte_rates(args.work, args.images)
    if args.only in (None, "rerun"):
        lines += rerun_time(args.work, args.rerun_images)
    if args.only in (None, "sharp"):
        lines += sharp_costs(args.work, args.images)
    report = "| benchmark | result | memory |\n|---|---|---|\n" + "\n".join(lines)
    print(report)
    (args.work / "extra-results.md").write_text(report + "\n")


if __name__ == "__main__":
    main()
