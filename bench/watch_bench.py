"""``clipseg watch`` latency and idle cost (issue 20), with the bundled demo model.

One command, printing the CPU's flags and every number:

    .venv/bin/python bench/watch_bench.py            # 100 files, one every 0.5 s, per mode
    .venv/bin/python bench/watch_bench.py --files 10 --idle 5   # a quick check of the script

- **Latency**: from a file's close to its mask on disk, median and p95 over ``--files`` files
  dropped one every ``--every`` seconds into a watched folder, in two ways: *renamed into
  place* (written as ``NAME.png.part``, closed, renamed: the time of the rename), which the
  watcher takes at once, and *written in place* (the time of its close), which it takes once
  the file has been unchanged for ``--settle`` seconds (default 2, the command's default). A
  warm-up file is processed first, so the model's loading is not counted.
- **Idle CPU**: the watcher's own CPU time (user + system, all threads, from /proc) over
  ``--idle`` seconds with no files arriving, as a share of one core.
- **Unreachable hub**: wall time of a whole ``clipseg segment`` process whose model is not
  cached, against an endpoint that never answers, a closed port, and ``HF_HUB_OFFLINE=1``
  (all on 127.0.0.1: nothing leaves the machine).

The demo model sees 128 px; real models spend more per image, which adds to both latencies
(see the README's benchmarks for per-image costs). Results: bench/_work/watch_bench.json.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "bench"))

from onnx_bench import cpu_summary  # noqa: E402

PROMPT = "a red circle"
MASK_SUFFIX = ".a-red-circle.mask.png"


def _clipseg(*args: str) -> list[str]:
    return [sys.executable, "-m", "clipseg_cli", *args]


def _env(**extra: str) -> dict[str, str]:
    env = {**os.environ, "PYTHONPATH": str(REPO), **extra}
    env.setdefault("HF_HUB_OFFLINE", "1")
    return env


class Watch:
    """A ``clipseg watch`` process on ``folder``."""

    def __init__(self, folder: Path, out: Path, settle: float) -> None:
        self.log = out.parent / f"{out.name}.stderr.txt"
        self._stderr = self.log.open("w")
        command = _clipseg(
            "watch", str(folder), "--out", str(out), "--model", "demo", "-p", PROMPT,
            "--progress", "none", "--settle", str(settle),
        )  # fmt: skip
        self.process = subprocess.Popen(command, env=_env(), stderr=self._stderr)
        self.out = out
        self._wait(lambda: "clipseg: watching" in self.log.read_text(), "the watch to start")

    def _wait(self, condition, what: str, timeout: float = 300) -> None:
        deadline = time.monotonic() + timeout
        while not condition():
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"watch_bench: no {what}: {self.log.read_text()}")
            time.sleep(0.01)

    def wait_for_mask(self, name: str) -> None:
        self._wait(lambda: (self.out / f"{name}{MASK_SUFFIX}").exists(), f"mask of {name}")

    def cpu_seconds(self) -> float:
        """User + system CPU time of the process, all its threads."""
        fields = Path(f"/proc/{self.process.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(60)
        self._stderr.close()


def _watch_masks(out: Path, names: list[str], seen: dict[str, float], done: threading.Event):
    """Note when each mask appears (polling every 5 ms, wall clock)."""
    waiting = set(names)
    while waiting and not done.is_set():
        for name in list(waiting):
            if (out / f"{name}{MASK_SUFFIX}").exists():
                seen[name] = time.time()
                waiting.discard(name)
        time.sleep(0.005)


def latency(work: Path, sources: list[Path], files: int, every: float, settle: float, mode: str):
    """Seconds from each file's close (or rename) to its mask, for ``files`` drops."""
    folder, out = work / f"in-{mode}", work / f"out-{mode}"
    folder.mkdir()
    watch = Watch(folder, out, settle)
    try:
        shutil.copy(sources[0], folder / "warmup.png")  # the model loads for this one
        watch.wait_for_mask("warmup.png")
        names = [f"drop{i:03d}.png" for i in range(files)]
        closed: dict[str, float] = {}
        seen: dict[str, float] = {}
        done = threading.Event()
        poller = threading.Thread(target=_watch_masks, args=(out, names, seen, done))
        poller.start()
        start = time.monotonic()
        for i, name in enumerate(names):
            time.sleep(max(0.0, start + i * every - time.monotonic()))
            data = sources[i % len(sources)].read_bytes()
            if mode == "rename":
                (folder / f"{name}.part").write_bytes(data)
                (folder / f"{name}.part").replace(folder / name)
            else:
                (folder / name).write_bytes(data)
            closed[name] = time.time()
        poller.join(timeout=settle + 120)
        done.set()
        missing = [name for name in names if name not in seen]
        if missing:
            raise SystemExit(f"watch_bench: no mask for {len(missing)} files ({missing[:3]})")
        return [seen[name] - closed[name] for name in names]
    finally:
        watch.stop()


def idle_cpu(work: Path, seconds: float) -> float:
    """The watcher's CPU use with nothing arriving, in % of one core."""
    folder = work / "in-idle"
    folder.mkdir()
    watch = Watch(folder, work / "out-idle", 2.0)
    try:
        time.sleep(5)  # the model has loaded (nothing to do: the run waits)
        before, start = watch.cpu_seconds(), time.monotonic()
        time.sleep(seconds)
        return 100 * (watch.cpu_seconds() - before) / (time.monotonic() - start)
    finally:
        watch.stop()


def unreachable_hub(work: Path) -> dict[str, float]:
    """Wall time of ``clipseg segment`` with an uncached hub model, hub out of reach."""
    folder = work / "in-hub"
    folder.mkdir()
    shutil.copy(REPO / "sample_data" / "shapes-90000007.png", folder)
    black_hole = socket.socket()
    black_hole.bind(("127.0.0.1", 0))
    black_hole.listen(64)  # accepts, never answers
    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))
    closed_port = closed.getsockname()[1]
    closed.close()
    cases = {
        "never answers": {"HF_ENDPOINT": f"http://127.0.0.1:{black_hole.getsockname()[1]}"},
        "closed port": {"HF_ENDPOINT": f"http://127.0.0.1:{closed_port}"},
        "HF_HUB_OFFLINE=1": {"HF_HUB_OFFLINE": "1"},
    }
    times = {}
    for label, extra in cases.items():
        env = _env(HF_HOME=str(work / "hf-empty"), **extra)
        if "HF_HUB_OFFLINE" not in extra:
            env.pop("HF_HUB_OFFLINE")
        command = _clipseg(
            "segment", str(folder), "-p", "a dog", "--out", str(work / "out-hub"),
            "--model", "CIDAS/clipseg-rd64-refined", "--progress", "none",
        )  # fmt: skip
        start = time.monotonic()
        result = subprocess.run(command, env=env, capture_output=True, text=True)
        times[label] = time.monotonic() - start
        if result.returncode != 4:
            raise SystemExit(f"watch_bench: expected exit 4 ({label}): {result.stderr}")
    black_hole.close()
    return times


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--files", type=int, default=100)
    parser.add_argument("--every", type=float, default=0.5)
    parser.add_argument("--settle", type=float, default=2.0)
    parser.add_argument("--idle", type=float, default=30.0, help="seconds of idle measured")
    args = parser.parse_args()
    for line in cpu_summary()[:2]:
        print(line)
    sources = sorted((REPO / "sample_data").glob("shapes-*.png"))
    results: dict = {"files": args.files, "every": args.every, "settle": args.settle}
    with tempfile.TemporaryDirectory(prefix="watch-bench-") as tmp:
        work = Path(tmp)
        os.environ.setdefault("CLIPSEG_CACHE", str(work / "cache"))
        for mode in ("rename", "in-place"):
            seconds = latency(work, sources, args.files, args.every, args.settle, mode)
            results[mode] = {
                "median_s": round(statistics.median(seconds), 3),
                "p95_s": round(_percentile(seconds, 0.95), 3),
                "max_s": round(max(seconds), 3),
            }
        results["idle_cpu_percent"] = round(idle_cpu(work, args.idle), 3)
        results["unreachable_hub_s"] = {k: round(v, 2) for k, v in unreachable_hub(work).items()}
    print(f"\nclipseg watch, demo model, {args.files} files one every {args.every} s")
    print("| dropped | median close -> mask | p95 | max |")
    print("|---|---|---|---|")
    for mode, label in (("rename", "renamed into place"), ("in-place", "written in place")):
        row = results[mode]
        print(f"| {label} | {row['median_s']} s | {row['p95_s']} s | {row['max_s']} s |")
    print(f"\nidle watcher, no files, {args.idle:g} s: {results['idle_cpu_percent']}% of one core")
    hub = ", ".join(f"{k} {v} s" for k, v in results["unreachable_hub_s"].items())
    print(f"clipseg segment with an uncached model, hub out of reach (whole process): {hub}")
    target = REPO / "bench" / "_work" / "watch_bench.json"
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(json.dumps(results, indent=2) + "\n")
    print(f"results: {target.relative_to(REPO)}")


if __name__ == "__main__":
    main()
