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
from run_bench import (  # noqa: E402
    PROMPTS_5,
    cli_base,
    ensure_model,
    image_subset,
    log_seconds,
    run_measured,
)


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
    """Steady-state (img/s, seconds per image) of ``segment`` with ``extra`` options: the
    difference of an ``images``-image and a 1-image run, so start-up cancels out."""
    walls = {}
    for count in (1, images):
        walls[count] = _segment(work, model, pool, count, label, ["a dog"], *extra).wall_s
    per_image = (walls[images] - walls[1]) / (images - 1)
    return 1 / per_image, per_image


def _segment(
    work: Path, model: Path, pool: Path, count: int, label: str, prompts: list[str], *extra: str
):
    """One whole ``segment`` process on ``count`` images (its output folder: work/sharp-...)."""
    source = image_subset(pool, work / "sets", count)
    out = work / f"sharp-{label}-{count}"
    shutil.rmtree(out, ignore_errors=True)
    cmd = [*cli_base(), "segment", str(source), "--model", str(model), "--out", str(out)]
    cmd += [arg for prompt in prompts for arg in ("-p", prompt)]
    cmd += ["--device", "cpu", "--precision", "fp32", "--progress", "none", *extra]
    result = run_measured(f"{label} x{count}", cmd, out / "run.log", count)
    if not result.ok:
        raise SystemExit(f"{label} failed; see {result.log}")
    return result


def sharp_costs(work: Path, images: int) -> list[str]:
    """What ``--refine guided`` costs, from the log rows' ``write_s`` (the refinement runs in
    the write step, so the difference to ``--refine none`` is its own time, free of the
    start-up noise of whole processes) and as a share of the whole run's wall time; then how
    ``--tiles N`` scales."""
    from clipseg_cli.ops.tiles import tile_grid, tiles_along_short_side

    model = ensure_model(work / "model-rd64-refined", work / "logs")
    pool = work / "images-1024x768"
    make_photo_like_jpegs(pool, images)
    megapixels = 1024 * 768 / 1e6
    lines = []
    for prompts in (PROMPTS_5[:1], PROMPTS_5):
        k = len(prompts)
        runs = {
            refine: _segment(
                work, model, pool, images, f"{refine}-p{k}", prompts, "--refine", refine
            )
            for refine in ("none", "guided")
        }
        writes = {
            refine: log_seconds(work / f"sharp-{refine}-p{k}-{images}", "clipseg-log.jsonl").get(
                "write_s", 0.0
            )
            for refine in runs
        }
        per_prompt_mp = (writes["guided"] - writes["none"]) / (images * k * megapixels)
        share = runs["guided"].wall_s / runs["none"].wall_s - 1
        lines.append(
            f"| segment 1024x768, fp32, {k} prompt(s), {images} images: `--refine guided` "
            f"(default) against `none` | {1000 * per_prompt_mp:.0f} ms per megapixel per prompt "
            f"(write steps {writes['guided']:.1f} s against {writes['none']:.1f} s); whole run "
            f"{runs['guided'].wall_s:.1f} s against {runs['none'].wall_s:.1f} s ({share:+.0%}; "
            "target <= 15%) | |"
        )
    _, none_s = _segment_rate(work, model, pool, images, "none", "--refine", "none")
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
