"""Load on ``clipseg serve``: the issue's Must-show numbers in one command.

For each model (the bundled demo model, and random full-size rd64-refined weights from
bench/make_model.py), on the same photo-like 1024x768 JPEGs (bench/make_images.py), 1 prompt:

1. ``clipseg segment`` over the images (warm caches): its img/s, and its mask files;
2. ``clipseg serve`` (local engine, default options) and ``--clients`` concurrent clients x
   ``--requests`` requests each (the project's :class:`clipseg_cli.client.Client`): every answer's
   mask compared byte for byte with segment's file, p50/p99 latency, throughput against
   segment's img/s, the mean images per model call (from /metrics);
3. soak (the demo model): requests until ``--soak`` answers, the server's RSS sampled every
   50 ms: its median over answers 300-500 against the last 200, and its RSS with no request in
   flight after answer 500 and after the last (flat: within 10%; the drained figures are
   what a leak grows, the loaded ones swing with the requests in flight);
4. overload: ``--overload-clients`` clients at once against ``--max-queue 8``, three rounds:
   every refusal a 503 with Retry-After within 100 ms (client side), every accepted request
   answered right, and a request after each round answered.

The clients run on the same machine as the server and share its cores (the CLI does not pay
for clients): the throughput ratio is a lower bound. Prints the CPU's flags and the numbers;
writes bench/_work/serve/results.json.

    .venv/bin/python bench/serve_bench.py                   # the issue's sizes
    .venv/bin/python bench/serve_bench.py --quick           # a small run to check the harness
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(BENCH))

from make_images import make_photo_like_jpegs  # noqa: E402
from serve_helpers import CLIPSEG, Served, start_server  # noqa: E402

from clipseg_cli.client import Client, ServerError  # noqa: E402
from clipseg_cli.serve.batching import IDLE_SECONDS  # noqa: E402

PROMPT = "a red circle"
SIZE = (1024, 768)


def cpu_report() -> str:
    try:
        text = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return "lscpu unavailable"
    keep = ("Model name", "CPU(s)", "Thread(s) per core", "Flags")
    return "\n".join(line for line in text.splitlines() if line.split(":")[0].strip() in keep)


def ensure_full_model(work: Path) -> Path:
    folder = work / "model-rd64-refined"
    if not (folder / ".complete").exists():
        print(f"making random full-size weights in {folder} ...", flush=True)
        subprocess.run([sys.executable, str(BENCH / "make_model.py"), str(folder)], check=True)
        (folder / ".complete").touch()
    return folder


_BASELINES: dict[tuple[str, Path], tuple[float, dict[str, bytes]]] = {}


def cli_baseline(model: str, images: Path, out: Path) -> tuple[float, dict[str, bytes]]:
    """segment's img/s over the images as it reports them (a warm-up run first, so caches are
    warm), and each image's mask bytes."""
    if (model, images) in _BASELINES:
        return _BASELINES[model, images]
    options = ["-p", PROMPT, "--model", model, "--progress", "none"]
    warm = out.with_name(out.name + "-warm")
    for folder in (warm, out):
        shutil.rmtree(folder, ignore_errors=True)  # a fresh run, never a resumed one
    first = sorted(images.iterdir())[:2]  # caches warm: graph, text embedding, weights' identity
    subprocess.run(
        [str(CLIPSEG), "segment", *map(str, first), *options, "--out", str(warm)],
        check=True,
        capture_output=True,
    )
    subprocess.run(
        [str(CLIPSEG), "segment", str(images), *options, "--out", str(out)],
        check=True,
        capture_output=True,
    )
    summary = json.loads((out / "clipseg-summary.json").read_text())
    masks = {}
    for line in (out / "clipseg-log.jsonl").read_text().splitlines():
        row = json.loads(line)
        if row.get("run") == summary["run"] and row["status"] == "ok":
            masks[Path(row["input"]).name] = Path(row["outputs"][0]["path"]).read_bytes()
    # The img/s segment reports (its run, from listing the inputs to the summary).
    _BASELINES[model, images] = summary["images_per_second"], masks
    return _BASELINES[model, images]


def rss_bytes(pid: int) -> int:
    text = Path(f"/proc/{pid}/status").read_text()
    return int(re.search(r"VmRSS:\s+(\d+) kB", text).group(1)) * 1024


def batch_counts(served: Served) -> tuple[float, float]:
    text = httpx.get(served.url + "metrics", timeout=30).text
    total = re.search(r"^clipseg_batch_images_sum ([\d.e+]+)", text, re.M)
    count = re.search(r"^clipseg_batch_images_count ([\d.e+]+)", text, re.M)
    return float(total.group(1)), float(count.group(1))


class Load:
    """``clients`` threads, each with its own connection, sending until ``total`` answers."""

    def __init__(self, served: Served, images: list[Path], expected: dict[str, bytes]) -> None:
        self.served = served
        self.images = images
        self.data = {p.name: p.read_bytes() for p in images}
        self.expected = expected
        self.lock = threading.Lock()
        self.done = 0
        self.wrong: list[str] = []
        self.failed: list[str] = []
        self.latencies: list[float] = []
        self.rss: list[tuple[int, int]] = []  # (answers so far, the server's RSS)

    def run(self, clients: int, total: int, sample_rss: bool = False) -> float:
        issued = iter(range(total))
        started = time.perf_counter()
        finished = threading.Event()

        def sampler() -> None:
            while not finished.wait(0.05):
                self.rss.append((self.done, rss_bytes(self.served.process.pid)))

        watcher = threading.Thread(target=sampler, daemon=True)
        if sample_rss:
            watcher.start()

        def client(_index: int) -> None:
            with Client(self.served.url, retries=0) as api:
                while True:
                    with self.lock:
                        number = next(issued, None)
                    if number is None:
                        return
                    name = self.images[number % len(self.images)].name
                    began = time.perf_counter()
                    try:
                        outputs = api.outputs(self.data[name], [PROMPT])
                    except (ServerError, httpx.HTTPError) as error:
                        with self.lock:
                            self.failed.append(f"{name}: {error}")
                        continue
                    seconds = time.perf_counter() - began
                    with self.lock:
                        self.latencies.append(seconds)
                        if outputs.get((PROMPT, "mask")) != self.expected[name]:
                            self.wrong.append(name)
                        self.done += 1

        with ThreadPoolExecutor(clients) as pool:
            list(pool.map(client, range(clients)))
        finished.set()
        if sample_rss:
            watcher.join()
        return time.perf_counter() - started

    def rss_around(self, answers: int, width: int = 200) -> tuple[float, float]:
        """The server's RSS (median, max; MB) sampled while answers ``answers - width`` to
        ``answers`` came in: requests in flight make single samples swing by tens of MB."""
        window = [rss for done, rss in self.rss if answers - width <= done <= answers]
        return statistics.median(window) / 2**20, max(window) / 2**20


def settled_rss(pid: int) -> float:
    """The server's RSS (MB) once no request is in flight: the median of 20 samples over the
    second after it has been idle a second longer than it waits to hand freed memory back."""
    time.sleep(IDLE_SECONDS + 1.0)
    samples = []
    for _ in range(20):
        time.sleep(0.05)
        samples.append(rss_bytes(pid))
    return statistics.median(samples) / 2**20


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def load_test(model: str, label: str, images: list[Path], folder: Path, work: Path, args) -> dict:
    cli_rate, expected = cli_baseline(model, folder, work / f"cli-{label}")
    print(
        f"[{label}] clipseg segment: {cli_rate:.2f} img/s over {len(expected)} images", flush=True
    )
    # --timeout 600: 16 clients queue behind a slow model on a loaded machine (16 / 0.35 img/s
    # is 45 s of queue); the deadline is not what this measures.
    server_args = ["--model", model, "--max-queue", "64", "--timeout", "600"]
    served = start_server(server_args, work / f"server-{label}.log")
    try:
        load = Load(served, images, expected)
        load.run(args.clients, args.clients)  # warm: every client connected once
        before = batch_counts(served)
        load = Load(served, images, expected)
        total = args.clients * args.requests
        wall = load.run(args.clients, total)
        after = batch_counts(served)
        calls = after[1] - before[1]
        result = {
            "model": label,
            "requests": total,
            "answered": load.done,
            "wrong": len(load.wrong),
            "failed": len(load.failed),
            "p50_s": round(statistics.median(load.latencies), 4),
            "p99_s": round(percentile(load.latencies, 0.99), 4),
            "server_rps": round(load.done / wall, 3),
            "cli_ips": round(cli_rate, 3),
            "ratio": round(load.done / wall / cli_rate, 3),
            "mean_batch": round((after[0] - before[0]) / calls, 2) if calls else None,
            "failures": load.failed[:5],
        }
        print(f"[{label}] {json.dumps(result)}", flush=True)
        return result
    finally:
        served.stop()


def soak(model: str, images: list[Path], work: Path, args) -> dict:
    _rate, expected = cli_baseline(model, images[0].parent, work / "cli-soak")
    served = start_server(["--model", model, "--max-queue", "64"], work / "server-soak.log")
    try:
        load = Load(served, images, expected)
        # Drained at answer 500 and at the end: the RSS the server keeps between requests (what
        # a leak grows), next to the RSS under load (which swings with the requests in flight).
        wall = load.run(args.clients, 500, sample_rss=True)
        idle_first = settled_rss(served.process.pid)
        wall += load.run(args.clients, args.soak - 500, sample_rss=True)
        idle_last = settled_rss(served.process.pid)
        (first, first_max), (last, last_max) = load.rss_around(500), load.rss_around(args.soak)
        result = {
            "requests": args.soak,
            "answered": load.done,
            "wrong": len(load.wrong),
            "failed": len(load.failed),
            "seconds": round(wall, 1),
            "rss_idle_after_500_mb": round(idle_first, 1),
            f"rss_idle_after_{args.soak}_mb": round(idle_last, 1),
            "rss_idle_growth": round(idle_last / idle_first - 1, 4),
            "rss_median_at_300_500_mb": round(first, 1),
            f"rss_median_at_{args.soak - 200}_{args.soak}_mb": round(last, 1),
            "rss_growth": round(last / first - 1, 4),
            "rss_max_at_300_500_mb": round(first_max, 1),
            f"rss_max_at_{args.soak - 200}_{args.soak}_mb": round(last_max, 1),
            "samples": len(load.rss),
        }
        print(f"[soak] {json.dumps(result)}", flush=True)
        return result
    finally:
        served.stop()


def _multipart(image: bytes, name: str) -> tuple[bytes, str]:
    boundary = "clipseg-bench-boundary"
    body = (
        (
            f'--{boundary}\r\nContent-Disposition: form-data; name="prompt"\r\n\r\n{PROMPT}\r\n'
            f'--{boundary}\r\nContent-Disposition: form-data; name="image"; filename="{name}"\r\n'
            "Content-Type: image/jpeg\r\n\r\n"
        ).encode()
        + image
        + f"\r\n--{boundary}--\r\n".encode()
    )
    return body, f"multipart/form-data; boundary={boundary}"


async def _burst(url: str, request: bytes, clients: int) -> list[tuple[int, float, dict, bytes]]:
    """``clients`` connections opened first, then one request on each at the same moment;
    each timed from its first byte sent to its whole answer received."""
    parts = httpx.URL(url)
    connections = [await asyncio.open_connection(parts.host, parts.port) for _ in range(clients)]
    go = asyncio.Event()

    async def one(reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        await go.wait()
        began = time.perf_counter()
        writer.write(request)
        # Refused before the body was read: the answer is already on its way.
        with contextlib.suppress(ConnectionError):
            await writer.drain()
        head = await reader.readuntil(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        headers = {k.lower(): v.strip() for k, _, v in (h.partition(":") for h in lines[1:] if h)}
        body = await reader.readexactly(int(headers.get("content-length", "0")))
        seconds = time.perf_counter() - began
        writer.close()
        return int(lines[0].split()[1]), seconds, headers, body

    tasks = [asyncio.ensure_future(one(reader, writer)) for reader, writer in connections]
    await asyncio.sleep(0.05)
    go.set()
    return await asyncio.gather(*tasks)


def overload(model: str, images: list[Path], work: Path, args) -> dict:
    _rate, expected = cli_baseline(model, images[0].parent, work / "cli-overload")
    served = start_server(["--model", model, "--max-queue", "8"], work / "server-overload.log")
    refusals: list[float] = []
    retry_after: list[str | None] = []
    accepted = wrong = after_ok = 0
    statuses: list[int] = []
    try:
        data = images[0].read_bytes()
        body, kind = _multipart(data, images[0].name)
        host = httpx.URL(served.url).netloc.decode()
        request = (
            f"POST /v1/segment HTTP/1.1\r\nHost: {host}\r\nAccept: image/png\r\n"
            f"Content-Type: {kind}\r\nContent-Length: {len(body)}\r\n\r\n"
        ).encode() + body
        for _round in range(3):
            results = asyncio.run(_burst(served.url, request, args.overload_clients))
            for status, seconds, headers, answer in results:
                statuses.append(status)
                if status == 503:
                    refusals.append(seconds)
                    retry_after.append(headers.get("retry-after"))
                elif status == 200:
                    accepted += 1
                    wrong += answer != expected[images[0].name]
            with Client(served.url, retries=0) as api:
                after_ok += (
                    api.outputs(data, [PROMPT])[(PROMPT, "mask")] == expected[images[0].name]
                )
        result = {
            "clients": args.overload_clients,
            "rounds": 3,
            "refused_503": len(refusals),
            "other_statuses": sorted(set(statuses) - {200, 503}),
            "refusal_p50_ms": round(1000 * statistics.median(refusals), 1) if refusals else None,
            "refusal_max_ms": round(1000 * max(refusals), 1) if refusals else None,
            "refusals_within_100ms": sum(s < 0.1 for s in refusals),
            "all_with_retry_after": all(r is not None for r in retry_after),
            "accepted": accepted,
            "accepted_wrong": wrong,
            "served_after_each_round": after_ok,
        }
        print(f"[overload] {json.dumps(result)}", flush=True)
        return result
    finally:
        served.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", type=Path, default=BENCH / "_work" / "serve")
    parser.add_argument("--images", type=int, default=100)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--requests", type=int, default=50, help="per client")
    parser.add_argument("--soak", type=int, default=5000)
    parser.add_argument("--overload-clients", type=int, default=64)
    parser.add_argument("--models", default="demo,full", help="demo, full or both")
    parser.add_argument("--parts", default="load,soak,overload", help="which measurements")
    parser.add_argument("--quick", action="store_true", help="small sizes, to check the harness")
    args = parser.parse_args()
    if args.quick:
        args.images, args.requests, args.soak = 16, 4, 600
    work = args.work.resolve()
    work.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("CLIPSEG_CACHE", str(work / "cache"))
    print(cpu_report(), flush=True)
    folder = work / f"images-{args.images}"
    images = make_photo_like_jpegs(folder, args.images, SIZE, seed=0)
    results: dict = {"cpu": cpu_report(), "load": []}
    parts = args.parts.split(",")
    for label in args.models.split(",") if "load" in parts else []:
        model = "demo" if label == "demo" else str(ensure_full_model(BENCH / "_work"))
        results["load"].append(load_test(model, label, images, folder, work, args))
    if "soak" in parts:
        results["soak"] = soak("demo", images, work, args)
    if "overload" in parts:
        results["overload"] = overload("demo", images, work, args)
    (work / "results.json").write_text(json.dumps(results, indent=1))
    print(f"results: {work / 'results.json'}")


if __name__ == "__main__":
    main()
