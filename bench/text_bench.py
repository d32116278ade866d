"""New text prompts without torch (issue 22, part 4): peak RSS and first-mask time of warm CPU
runs whose text prompts are not in the embedding cache, next to runs whose prompts are.

Random full-size rd64-refined weights (bench/make_model.py), photo-like 1024x768 JPEGs, a cache
folder of its own (``WORK/text-cache``): one cold 1-image run exports the image and text graphs
(timed: the first-ever run), then every measured run is warm (graphs cached) and uses prompts
made unique by a nonce, so "never seen" is true whatever ran before. Each run goes through a
wrapper that says whether torch or open_clip was imported. Peak RSS is the process's own
(``os.wait4``, see run_bench.run_measured). Targets: <= 1.5 GB every configuration, <= 1.0 GB
with 1 prompt; first mask <= 3 s with a new prompt, <= 2 s with a cached one.

    .venv/bin/python bench/text_bench.py [--images 48] [--work bench/_work] [--runs 3]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH_DIR))

from onnx_bench import cpu_summary  # noqa: E402
from run_bench import WRAPPER, ensure_model, image_subset, run_measured  # noqa: E402

RSS_LIMIT = 1.5e9
RSS_LIMIT_ONE_PROMPT = 1.0e9
FIRST_MASK_NEW_S = 3.0
FIRST_MASK_CACHED_S = 2.0
PROMPTS = ["a dog", "a cat", "a person", "a car", "the sky"]


def _imports(log: str) -> str:
    lines = Path(log).read_text(errors="replace").splitlines()
    found = [line for line in lines if line.startswith("IMPORTED ")]
    return found[-1].removeprefix("IMPORTED ") if found else "?"


def _uptime() -> str:
    try:
        return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    except OSError:
        return "?"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=48)
    parser.add_argument("--work", type=Path, default=BENCH_DIR / "_work")
    parser.add_argument("--runs", type=int, default=3, help="warm 1-image runs per kind")
    args = parser.parse_args()
    work = args.work.resolve()
    logs = work / "text-logs"
    cache = work / "text-cache"
    lines = [*cpu_summary(), f"load before: {_uptime()}"]
    print("\n".join(lines), flush=True)
    model = ensure_model(work / "model-rd64-refined", logs)
    pool = work / "images-1024x768"
    images_n = image_subset(pool, work / "sets", args.images)
    images_1 = image_subset(pool, work / "sets", 1)
    nonce = f"{time.time_ns():x}"
    os.environ["CLIPSEG_CACHE"] = str(cache)

    def run(label: str, images: Path, count: int, prompts: list[str], watch: bool = False):
        out = work / "text-out" / f"{label}-{nonce}"
        cmd = [sys.executable, "-c", WRAPPER, "segment", str(images), "--model", str(model)]
        for prompt in prompts:
            cmd += ["--prompt", prompt]
        cmd += ["--out", str(out), "--save", "mask", "--device", "cpu", "--progress", "none"]
        result = run_measured(
            label, cmd, logs / f"{label}.log", count, watch=out if watch else None
        )
        return result, _imports(result.log)

    cold, cold_imports = run("cold-export", images_1, 1, [f"warm-up {nonce}"])
    rows = [("first-ever run (export image + text graphs), 1 image", cold, cold_imports)]
    new5 = [f"{p} {nonce}" for p in PROMPTS]
    new1 = [f"a photo of a bicycle {nonce}"]
    configs = [
        (f"{args.images} images, 5 new prompts", "n-new5", new5),
        (f"{args.images} images, 1 new prompt", "n-new1", new1),
        (f"{args.images} images, the same 5 prompts, now cached", "n-cached5", new5),
        (f"{args.images} images, the same 1 prompt, now cached", "n-cached1", new1),
    ]
    for title, label, prompts in configs:
        result, imported = run(label, images_n, args.images, prompts)
        rows.append((title, result, imported))
    first: dict[str, list] = {"new": [], "cached": []}
    for i in range(args.runs):
        for kind in ("new", "cached"):
            prompt = f"a small red boat {nonce} {i}" if kind == "new" else new1[0]
            result, imported = run(f"first-{kind}-{i}", images_1, 1, [prompt], watch=True)
            first[kind].append((result, imported))
            rows.append((f"1 image, {kind} prompt (run {i + 1})", result, imported))

    lines.append(f"load after: {_uptime()}")
    lines += [
        "",
        "| run | wall s | first mask s | peak RSS MB | imported |",
        "|---|---|---|---|---|",
    ]
    for title, result, imported in rows:
        first_s = f"{result.first_output_s:.2f}" if result.first_output_s is not None else "-"
        status = "" if result.ok else f" FAILED rc={result.returncode}"
        lines.append(
            f"| {title}{status} | {result.wall_s:.1f} | {first_s} | "
            f"{result.peak_rss_bytes / 1e6:.0f} | {imported} |"
        )
    lines.append("")
    warm = [(t, r, i) for t, r, i in rows if not t.startswith("first-ever")]
    worst = max(r.peak_rss_bytes for _, r, _ in warm)
    one = max(r.peak_rss_bytes for t, r, _ in warm if "5 " not in t)
    lines.append(
        f"peak RSS, every warm run: {worst / 1e6:.0f} MB (<= {RSS_LIMIT / 1e6:.0f}: "
        f"{'yes' if worst <= RSS_LIMIT else 'NO'}); 1-prompt runs: {one / 1e6:.0f} MB "
        f"(<= {RSS_LIMIT_ONE_PROMPT / 1e6:.0f}: {'yes' if one <= RSS_LIMIT_ONE_PROMPT else 'NO'})"
    )
    for kind, target in (("new", FIRST_MASK_NEW_S), ("cached", FIRST_MASK_CACHED_S)):
        seen = [r.first_output_s for r, _ in first[kind] if r.first_output_s is not None]
        median = statistics.median(seen) if seen else float("nan")
        lines.append(
            f"first mask, warm 1-image run, {kind} prompt: median {median:.2f} s of {len(seen)} "
            f"(<= {target:g} s: {'yes' if median <= target else 'NO'})"
        )
    torch_free = all(i == "torch=False open_clip=False" for _, _, i in warm)
    lines.append(f"no warm run imported torch or open_clip: {'yes' if torch_free else 'NO'}")
    report = "\n".join(lines)
    print("\n" + report)
    (work / "text_results.md").write_text(report + "\n")


if __name__ == "__main__":
    main()
