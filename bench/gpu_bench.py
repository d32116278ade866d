"""GPU benchmark: ``clipseg segment`` on an NVIDIA GPU against the plain transformers script.

Measured, on the same generated photo-like JPEGs (decoded inside every run) and the same weights
(random full-size rd64-refined in transformers layout unless ``--model`` points at real ones):

* ``bench/reference_transformers.py``, the baseline, with 1 and 5 prompts, on the same GPU
  (its ``--device`` option: the model and each input moved to the device, what a GPU user of
  the typical script adds; nothing else of it is tuned).
* ``clipseg segment --device cuda [--backend torch]`` in bf16 and fp16, 1 and 5 prompts, batch
  sizes 16/32/64, 1024x768 images, default ``--refine guided``.
* ``--refine none`` against ``guided`` (bf16, batch 32, 1 and 5 prompts), and 2048x1536 images
  with ``--tiles off|auto`` x ``--refine guided|none`` (bf16, 1 prompt, batch 32): does the
  full-resolution refinement on the CLI's two CPU writer threads cap what the GPU can do?

Per run: whole-process wall time; steady-state img/s exactly as bench/run_bench.py computes it,
``(N - 1) / (wall(N images) - wall(1 image))`` with the same command on one image (so startup,
imports, model load and the first, padded batch cancel out), end-to-end ``N / wall`` beside it;
GPU utilisation from one ``nvidia-smi --query-gpu=timestamp,utilization.gpu,memory.used -lms
200`` running for the whole session, each run's samples picked by nvidia-smi's own timestamps:
mean and p50 over the steady-state window (the part of the N-image run after ``wall(1 image)``
seconds, i.e. past the startup the 1-image run measured), max memory.used over the whole run;
peak host RSS of the process (``os.wait4``, via run_bench.run_measured); and from the CLI's own
log and summary the per-image decode and write (refine + PNG) times and its model seconds,
turned into the throughput ceiling of each stage.

Targets: clipseg bf16 with 1 prompt >= 5x the script's steady-state img/s (same prompts) and
>= 80% mean GPU utilisation, judged for every batch size; MISSED marks a miss.

Budget: a full run is 20 configurations, 40 processes, ~8 minutes on an H200 after the install
(256 images per throughput run, 32 for the CPU-bound script, 64 at 2048x1536 for tiles, plus
the 1-image startup runs; the first run also makes the weights and images, ~1 minute, reused
later). Configurations run most important first; once ``--budget-s`` (540 s; 300 with
``--quick``, which is ~3 minutes) has passed, the rest are reported as skipped. A failing
configuration (e.g. out of GPU memory at batch 64) is recorded with its error, and the
benchmark goes on.

Run:
  bash bench/gpu_bench.sh [options]            # GPU machine, repository root: venv + install
  .venv/bin/python bench/gpu_bench.py --smoke  # CPU-only: tiny model, 3 images, ~2 minutes
Writes bench/_work/gpu/results.md and results.json (logs and nvidia-smi samples in logs/).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
REPO = BENCH_DIR.parent
sys.path.insert(0, str(BENCH_DIR))

from run_bench import (  # noqa: E402
    IMAGE_SIZE,
    PROMPTS_1,
    PROMPTS_5,
    RunResult,
    cli_base,
    cli_has_option,
    ensure_model,
    fmt_rate,
    image_subset,
    rates,
    reference_cmd,
    run_measured,
    verdict,
)

TILE_SIZE = (2048, 1536)  # shorter side >= 2 x 352, so --tiles auto tiles it
SMOKE_SIZE = (256, 192)
SMOKE_TILE_SIZE = (1024, 768)  # the smallest common size that --tiles auto still tiles
TARGET_RATIO = 5.0
TARGET_UTIL = 80.0
# SegmentConfig.writer_threads: not a command-line option, so not in the run summary either.
WRITER_THREADS = 2
SAMPLE_MS = 200
# With -lms the stamps carry milliseconds; older drivers may print whole seconds.
NVIDIA_SMI_TIMES = ("%Y/%m/%d %H:%M:%S.%f", "%Y/%m/%d %H:%M:%S")
REFERENCE = BENCH_DIR / "reference_transformers.py"


# ---------------------------------------------------------------------------------------------
# What runs


@dataclass(frozen=True)
class Plan:
    """The sizes of one benchmark session (full, quick or smoke, plus overrides)."""

    mode: str
    device: str
    precisions: tuple[str, ...]
    batches: tuple[int, ...]
    refine_batch: int
    images: int
    ref_images: int
    tile_images: int
    size: tuple[int, int]
    tile_size: tuple[int, int]
    tile_variants: tuple[tuple[str, str], ...]  # (--tiles, --refine)
    refine_prompts: tuple[int, ...]
    budget_s: float

    @property
    def target_precision(self) -> str:
        return self.precisions[0]


@dataclass(frozen=True)
class Config:
    """One measured configuration: an N-image run plus its 1-image startup run."""

    tool: str  # "clipseg" or "script" (the transformers reference)
    group: str  # "speed", "refine", "tiles" or "reference"
    prompts: int
    images: int
    size: tuple[int, int]
    precision: str = "fp32"
    batch: int = 1
    refine: str = "guided"
    tiles: str = "off"

    @property
    def label(self) -> str:
        if self.tool == "script":
            return f"script-p{self.prompts}"
        w, h = self.size
        return (
            f"clipseg-{self.precision}-p{self.prompts}-b{self.batch}-{self.refine}"
            f"-tiles{self.tiles}-{w}x{h}"
        )

    def title(self, ref_device: str) -> str:
        prompts = f"{self.prompts} prompt{'s' if self.prompts > 1 else ''}"
        if self.tool == "script":
            return f"transformers script, {prompts} ({ref_device})"
        text = f"clipseg {self.precision}, {prompts}, batch {self.batch}"
        if self.group != "speed":
            text += f", --refine {self.refine}"
        if self.group == "tiles":
            text += f", {self.size[0]}x{self.size[1]}, --tiles {self.tiles}"
        return text


ALL_TILE_VARIANTS = (("off", "guided"), ("auto", "guided"), ("off", "none"), ("auto", "none"))
FULL = Plan(
    mode="full",
    device="cuda",
    precisions=("bf16", "fp16"),
    batches=(16, 32, 64),
    refine_batch=32,
    images=256,
    ref_images=32,  # the script runs on the CPU: ~1 img/s with 5 prompts
    tile_images=64,
    size=IMAGE_SIZE,
    tile_size=TILE_SIZE,
    tile_variants=ALL_TILE_VARIANTS,
    refine_prompts=(1, 5),
    budget_s=540,
)
QUICK = replace(
    FULL,
    mode="quick",
    batches=(32,),
    images=128,
    ref_images=16,
    tile_images=32,
    tile_variants=ALL_TILE_VARIANTS[:2] + ALL_TILE_VARIANTS[3:],
    refine_prompts=(1,),
    budget_s=300,
)
SMOKE = replace(
    FULL,
    mode="smoke",
    device="cpu",
    precisions=("fp32",),  # the CLI refuses fp16 on CPU, and bf16 is slow on small CPUs
    batches=(2,),
    refine_batch=2,
    images=3,
    ref_images=3,
    tile_images=3,
    size=SMOKE_SIZE,
    tile_size=SMOKE_TILE_SIZE,
    tile_variants=ALL_TILE_VARIANTS[:2],  # enough for the --tiles comparison; keeps it short
    refine_prompts=(1,),
    budget_s=0,
)


def make_plan(args: argparse.Namespace) -> Plan:
    plan = SMOKE if args.smoke else QUICK if args.quick else FULL
    overrides: dict[str, object] = {}
    if args.images is not None:
        overrides["images"] = args.images
        overrides["ref_images"] = min(plan.ref_images, args.images)
    if args.ref_images is not None:
        overrides["ref_images"] = args.ref_images
    if args.tile_images is not None:
        overrides["tile_images"] = args.tile_images
    if args.batch_sizes:
        overrides["batches"] = tuple(args.batch_sizes)
        overrides["refine_batch"] = args.batch_sizes[len(args.batch_sizes) // 2]
    if args.precisions:
        overrides["precisions"] = tuple(args.precisions)
    if args.budget_s is not None:
        overrides["budget_s"] = args.budget_s
    return replace(plan, **overrides)  # type: ignore[arg-type]


def make_configs(plan: Plan) -> list[Config]:
    """Every configuration, most important first (a spent budget skips from the end)."""
    main, rest = plan.target_precision, plan.precisions[1:]
    mid = plan.refine_batch if plan.refine_batch in plan.batches else plan.batches[0]

    def speed(precision: str, prompts: int, batch: int) -> Config:
        return Config("clipseg", "speed", prompts, plan.images, plan.size, precision, batch)

    def script(prompts: int) -> Config:
        return Config("script", "reference", prompts, plan.ref_images, plan.size)

    first = [script(1), speed(main, 1, mid), script(5), speed(main, 5, mid)]
    unrefined = [
        Config("clipseg", "refine", k, plan.images, plan.size, main, plan.refine_batch, "none")
        for k in plan.refine_prompts
    ]
    tiled = [
        Config("clipseg", "tiles", 1, plan.tile_images, plan.tile_size, main, mid, refine, tiles)
        for tiles, refine in plan.tile_variants
    ]
    others = [
        speed(precision, k, batch)
        for precision in (main, *rest)
        for k in (1, 5)
        for batch in plan.batches
    ]
    ordered = [*first, *unrefined, *tiled, *others]
    return list(dict.fromkeys(ordered))  # drop repeats, keep the order


# ---------------------------------------------------------------------------------------------
# GPU sampling


@dataclass
class GpuStats:
    samples: int  # over the whole run
    window: str  # "steady state" or "whole run" (too short a run, or no startup run)
    window_samples: int
    util_mean: float | None
    util_p50: float | None
    util_mean_whole: float | None
    mem_max_mib: float | None
    mem_idle_mib: float | None  # memory.used just before the run (other processes, if any)


class GpuSampler:
    """One ``nvidia-smi -lms`` for the whole session, appending to a CSV file.

    Every line carries nvidia-smi's own timestamp, so a run's samples are selected by time and
    neither buffering nor a late read can shift them; stdbuf makes nvidia-smi flush every line,
    so what it measured is on disk even though it is stopped with a signal.
    """

    def __init__(self, gpu: str, path: Path) -> None:
        self.gpu = gpu
        self.path = path
        self.proc: subprocess.Popen[bytes] | None = None
        self.restarts = 0
        self.unparsed = 0

    def ensure_running(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            return
        if self.proc is not None:
            self.restarts += 1
        cmd = ["nvidia-smi", "-i", self.gpu, "--format=csv,noheader,nounits"]
        cmd += ["--query-gpu=timestamp,utilization.gpu,memory.used", "-lms", str(SAMPLE_MS)]
        if shutil.which("stdbuf"):
            cmd = ["stdbuf", "-oL", *cmd]
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("ab") as sink:
            self.proc = subprocess.Popen(cmd, stdout=sink, stderr=subprocess.STDOUT)
        time.sleep(1.0)  # NVML start-up: let the first sample land before a run begins

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        time.sleep(2 * SAMPLE_MS / 1000)  # the sample covering the last run's end
        self.proc.terminate()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()

    def samples(self) -> list[tuple[float, float | None, float | None]]:
        """(epoch seconds, utilisation %, memory.used MiB); None for a "[N/A]" field."""
        out: list[tuple[float, float | None, float | None]] = []
        self.unparsed = 0
        if not self.path.exists():
            return out
        for line in self.path.read_text(errors="replace").splitlines():
            parts = [p.strip() for p in line.split(",")]
            if len(parts) != 3:
                self.unparsed += 1
                continue
            stamp = _timestamp(parts[0])
            if stamp is None:
                self.unparsed += 1
                continue
            out.append((stamp, _number(parts[1]), _number(parts[2])))
        return out


def _timestamp(text: str) -> float | None:
    for form in NVIDIA_SMI_TIMES:
        try:
            # Naive local time, like nvidia-smi's; .timestamp() reads it as local too.
            return datetime.strptime(text, form).timestamp()
        except ValueError:
            continue
    return None


def _number(text: str) -> float | None:
    try:
        return float(text)
    except ValueError:  # "[N/A]" (e.g. MIG slices report no utilisation)
        return None


def gpu_stats(
    samples: list[tuple[float, float | None, float | None]],
    start: float,
    end: float,
    startup_wall: float | None,
) -> GpuStats | None:
    run = [s for s in samples if start <= s[0] <= end]
    if not run:
        return None
    window, label = run, "whole run"
    if startup_wall is not None and startup_wall < end - start:
        steady = [s for s in run if s[0] >= start + startup_wall]
        if len(steady) >= 2:
            window, label = steady, "steady state"
    utils = [u for _, u, _ in window if u is not None]
    whole = [u for _, u, _ in run if u is not None]
    mems = [m for _, _, m in run if m is not None]
    before = [m for t, _, m in samples if start - 5 <= t < start and m is not None]
    return GpuStats(
        samples=len(run),
        window=label,
        window_samples=len(window),
        util_mean=statistics.fmean(utils) if utils else None,
        util_p50=statistics.median(utils) if utils else None,
        util_mean_whole=statistics.fmean(whole) if whole else None,
        mem_max_mib=max(mems) if mems else None,
        mem_idle_mib=min(before) if before else None,
    )


# ---------------------------------------------------------------------------------------------
# Runs


@dataclass
class CliStats:
    """What the CLI says about its own run (clipseg-summary.json and the log rows)."""

    device: str | None
    dtype: str | None
    workers: int | None
    failed: int | None
    inference_s: float | None
    decode_ms: float | None  # mean per image, in a decode thread
    write_ms: float | None  # mean per image, in a writer thread: refinement + PNG encoding


@dataclass
class Outcome:
    config: Config
    full: RunResult | None = None
    startup: RunResult | None = None
    start: float = 0.0  # epoch seconds around the N-image run, to pick its GPU samples
    end: float = 0.0
    cli: CliStats | None = None
    startup_cli: CliStats | None = None
    gpu: GpuStats | None = None
    error: str | None = None
    skipped: str | None = None
    notes: list[str] = field(default_factory=list)

    def img_s(self) -> tuple[float | None, float | None]:
        """(end-to-end, steady-state) img/s, as run_bench.rates."""
        return rates(self.full, self.startup)


def log_rows(path: Path) -> list[dict]:
    """The CLI's JSON-lines log; [] if there is none."""
    rows = []
    if path.exists():
        for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                continue  # the last line of a run killed mid-write (timeout) may be cut off
    return rows


def read_cli_stats(out: Path) -> CliStats | None:
    try:
        summary = json.loads((out / "clipseg-summary.json").read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None  # a crashed or killed run writes no (or half a) summary
    decode, write = [], []
    for row in log_rows(out / "clipseg-log.jsonl"):
        timings = row.get("timings") or {}
        if "decode_s" in timings:
            decode.append(timings["decode_s"])
        if "write_s" in timings:
            write.append(timings["write_s"])
    return CliStats(
        device=summary.get("device"),
        dtype=summary.get("dtype"),
        workers=(summary.get("config") or {}).get("workers"),
        failed=(summary.get("counts") or {}).get("failed"),
        inference_s=summary.get("inference_seconds"),
        decode_ms=1000 * statistics.fmean(decode) if decode else None,
        write_ms=1000 * statistics.fmean(write) if write else None,
    )


DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


def measure(
    o: Outcome,
    plan: Plan,
    run_one: Callable[[Config, int], tuple[RunResult, Path, float, float]],
    timeout_s: int,
) -> None:
    """The N-image run, then (if it worked) the 1-image run, into ``o``."""
    c = o.config
    o.full, out, o.start, o.end = run_one(c, c.images)
    if not o.full.ok:
        o.error = failure_text(o.full, out, timeout_s)
    if c.tool == "clipseg" and out.exists():
        o.cli = read_cli_stats(out)
        # A silent fallback (another device or dtype) would make the numbers mean something else.
        if o.cli and o.cli.device and not o.cli.device.startswith(plan.device):
            o.notes.append(f"ran on {o.cli.device}, not {plan.device}")
        if o.cli and o.cli.dtype and o.cli.dtype != DTYPES.get(c.precision, o.cli.dtype):
            o.notes.append(f"ran in {o.cli.dtype}, not {c.precision}")
    if not o.full.ok:
        return
    o.startup, out1, _, _ = run_one(c, 1)
    if c.tool == "clipseg" and out1.exists():
        o.startup_cli = read_cli_stats(out1)
    if not o.startup.ok:
        o.notes.append(f"1-image run: {failure_text(o.startup, out1, timeout_s)}")


def failure_text(result: RunResult, out: Path, timeout_s: int) -> str:
    """One line on why a run failed: a timeout, the first failed image's error, or the log's
    last line (a crash such as CUDA out of memory outside any one image)."""
    if result.returncode in (124, 137):
        return f"timed out (--run-timeout {timeout_s} s)"
    for row in log_rows(out / "clipseg-log.jsonl"):
        if row.get("status") == "failed" and row.get("error"):
            return f"rc={result.returncode}: {row['error']}"[:240]
    lines = [s.strip() for s in Path(result.log).read_text(errors="replace").splitlines()]
    last = next((s for s in reversed(lines) if s), "(no output)")
    return f"rc={result.returncode}: {last}"[:240]


def timed(cmd: list[str], timeout_s: int) -> list[str]:
    # coreutils timeout waits for its child, so os.wait4 on it still sees the child's rusage.
    if shutil.which("timeout"):
        return ["timeout", "--kill-after=10", str(timeout_s), *cmd]
    return cmd


# ---------------------------------------------------------------------------------------------
# Inputs and machine


def ensure_tiny_model(model_dir: Path, log_dir: Path) -> Path:
    """tests/factories.py's tiny random model plus the offline processor (``--smoke``)."""
    done = model_dir / ".complete"
    if done.exists():
        return model_dir
    shutil.rmtree(model_dir, ignore_errors=True)
    # A child, like run_bench.ensure_model: transformers in this process would raise the RSS
    # every measured child starts from.
    code = (
        "import sys; from pathlib import Path; sys.path.insert(0, 'tests');"
        "from factories import save_random_hf_checkpoint;"
        "from hf_processor import save_clipseg_processor;"
        "save_clipseg_processor(save_random_hf_checkpoint(Path(sys.argv[1]), size='tiny'))"
    )
    cmd = [sys.executable, "-c", code, str(model_dir)]
    result = run_measured("make-tiny-model", cmd, log_dir / "make-tiny-model.log", 0)
    if not result.ok:
        raise SystemExit(f"could not create the tiny model; see {result.log}")
    done.touch()
    return model_dir


def image_set(work: Path, size: tuple[int, int], count: int) -> Path:
    """A folder of the first ``count`` photo-like JPEGs of ``size``."""
    w, h = size
    pool = work / f"images-{w}x{h}"
    # Rendered in a child: 2048x1536 float images would leave this process a few hundred MB
    # larger, and every measured child's ru_maxrss starts from that.
    cmd = [sys.executable, str(BENCH_DIR / "make_images.py"), str(pool), "--count", str(count)]
    subprocess.run([*cmd, "--width", str(w), "--height", str(h)], check=True, cwd=REPO)
    # image_subset makes missing files at run_bench's 1024x768; all of them exist by now, so it
    # only links this size's files.
    return image_subset(pool, work / "sets" / f"{w}x{h}", count)


def capture(cmd: list[str]) -> str | None:
    """Stdout of a short informational command, None if it is missing or fails."""
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=60, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return proc.stdout.strip() if proc.returncode == 0 else None


TORCH_INFO = """
import json, torch, transformers
info = {"torch": torch.__version__, "cuda": torch.version.cuda, "transformers":
        transformers.__version__, "cuda_available": torch.cuda.is_available()}
if info["cuda_available"]:
    info["device_name"] = torch.cuda.get_device_name(0)
    info["bf16"] = torch.cuda.is_bf16_supported()
    info["cudnn"] = torch.backends.cudnn.version()
print(json.dumps(info))
"""


def machine_info() -> dict[str, object]:
    lscpu = capture(["lscpu"]) or ""
    model_name = next(
        (line.split(":", 1)[1].strip() for line in lscpu.splitlines() if "Model name" in line),
        platform.processor() or platform.machine(),
    )
    # A child: importing torch here would inflate every measured child's ru_maxrss.
    torch_json = capture([sys.executable, "-c", TORCH_INFO])
    return {
        "cpu_model": model_name,
        "cpus": os.cpu_count(),
        "load_before": os.getloadavg()[0],
        "gpus": capture(["nvidia-smi", "-L"]),
        "driver": capture(
            ["nvidia-smi", "--query-gpu=driver_version,memory.total", "--format=csv,noheader"]
        ),
        "gpu_apps": capture(
            ["nvidia-smi", "--query-compute-apps=pid,used_memory", "--format=csv,noheader"]
        ),
        "torch": json.loads(torch_json) if torch_json else None,
        "python": platform.python_version(),
    }


def default_gpu() -> str:
    """nvidia-smi's -i for the device ``cuda`` means: the first of CUDA_VISIBLE_DEVICES (an
    index or a UUID, both of which -i takes; main() sets PCI_BUS_ID order so they agree)."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",")[0].strip()
    return visible or "0"


def warm_page_cache(model: Path) -> None:
    # The first timed run must not be the only one that reads the weights from disk.
    for path in model.glob("*.safetensors") if model.is_dir() else []:
        with path.open("rb") as fh:
            while fh.read(1 << 24):
                pass


# ---------------------------------------------------------------------------------------------
# Report


def judge(value: float | None, target: float) -> str:
    return verdict(None if value is None else value >= target)


def fmt(x: float | None, spec: str = ".0f", suffix: str = "") -> str:
    return "n/a" if x is None else f"{x:{spec}}{suffix}"


def ceilings(o: Outcome) -> dict[str, float]:
    """img/s each stage could sustain alone: the model (the main thread waits for every
    batch), the decode threads and the writer threads (refinement + PNG)."""
    caps: dict[str, float] = {}
    cli = o.cli
    if cli is None or o.full is None:
        return caps
    one = o.startup_cli.inference_s if o.startup_cli else None
    if cli.inference_s and one is not None and cli.inference_s > one:
        # Steady state like the img/s: the 1-image run's one (padded) batch carries the
        # warm-up (cuDNN/cuBLAS set-up, first kernels), which a few big batches cannot dilute.
        caps["model"] = (o.full.images - 1) / (cli.inference_s - one)
    elif cli.inference_s:
        caps["model"] = o.full.images / cli.inference_s
    if cli.decode_ms:
        caps["decode"] = (cli.workers or 2) * 1000 / cli.decode_ms
    if cli.write_ms:
        caps["write"] = WRITER_THREADS * 1000 / cli.write_ms
    return caps


def build_report(
    plan: Plan,
    outcomes: list[Outcome],
    info: dict[str, object],
    notes: list[str],
    ref_device: str,
) -> tuple[str, dict[str, object]]:
    ref_rates = {
        o.config.prompts: o.img_s()[1] for o in outcomes if o.config.tool == "script" and o.full
    }
    torch_info = info.get("torch") or {}
    assert isinstance(torch_info, dict)
    lines = [f"# clipseg GPU benchmark, {plan.mode} ({time.strftime('%Y-%m-%d %H:%M')})", ""]
    if plan.mode == "smoke":
        lines += ["SMOKE RUN: CPU, tiny random model, a few images; checks the flow only.", ""]
    lines += [
        f"- CPU: {info['cpu_model']} ({info['cpus']} CPUs); Python {info['python']}",
        f"- GPU: {info['gpus'] or 'n/a (nvidia-smi not found)'}; driver, memory: "
        f"{info['driver'] or 'n/a'}",
        f"- torch {torch_info.get('torch', '?')}, CUDA {torch_info.get('cuda') or 'n/a'}, "
        f"cuDNN {torch_info.get('cudnn', 'n/a')}, transformers "
        f"{torch_info.get('transformers', '?')}",
        *(f"- {note}" for note in notes),
        "",
        "Throughput: steady-state (N - 1) / (wall(N) - wall(1 image)), same command on one "
        "image; end-to-end N / wall(N) in parentheses. GPU utilisation: nvidia-smi every "
        f"{SAMPLE_MS} ms, mean / p50 over the part of the N-image run after wall(1 image) "
        "(marked * where the run was too short and the whole run is used). Max GPU MiB is "
        "memory.used (all processes; idle value in results.json). Peak RSS: the process's "
        "ru_maxrss.",
        "",
        "| configuration | images | img/s | vs script | GPU util mean / p50 | max GPU MiB | "
        "peak RSS | target |",
        "|---|---|---|---|---|---|---|---|",
    ]
    rows: list[dict[str, object]] = []
    order = {"reference": 0, "speed": 1, "refine": 2, "tiles": 3}
    shown = sorted(
        outcomes,
        key=lambda o: (
            order[o.config.group],
            o.config.precision,
            o.config.prompts,
            o.config.size,
            o.config.batch,
            o.config.tiles != "off",
            o.config.refine != "guided",
        ),
    )
    target_rows: list[tuple[Outcome, float | None, float | None]] = []
    for o in shown:
        c = o.config
        e2e, steady = o.img_s()
        ratio = None
        if c.tool == "clipseg" and c.size == plan.size and steady and ref_rates.get(c.prompts):
            ratio = steady / ref_rates[c.prompts]  # type: ignore[operator]
        util = o.gpu.util_mean if o.gpu else None
        is_target = c.group == "speed" and c.precision == plan.target_precision and c.prompts == 1
        target = ""
        if is_target:
            target = (
                f">= {TARGET_RATIO:g}x: {judge(ratio, TARGET_RATIO)}; "
                f">= {TARGET_UTIL:g}% util: {judge(util, TARGET_UTIL)}"
            )
            target_rows.append((o, ratio, util))
        if o.skipped:
            rate = f"skipped ({o.skipped})"
        elif o.error:
            rate = f"FAILED: {o.error.replace('|', '/')}"
        else:
            rate = f"{fmt_rate(steady)} ({fmt_rate(e2e)})"
        if o.gpu:
            star = "" if o.gpu.window == "steady state" else "*"
            util_text = f"{fmt(o.gpu.util_mean, suffix='%')} / {fmt(o.gpu.util_p50, suffix='%')}"
            util_text += star
        else:
            util_text = "n/a"
        rss = f"{o.full.peak_rss_bytes / 2**20:.0f} MiB" if o.full else "n/a"
        lines.append(
            f"| {c.title(ref_device)} | {c.images} | {rate} | "
            f"{fmt(ratio, '.2f', 'x')} | {util_text} | "
            f"{fmt(o.gpu.mem_max_mib if o.gpu else None)} | {rss} | {target} |"
        )
        rows.append(
            {
                "label": c.label,
                "config": asdict(c),
                "steady_img_s": steady,
                "e2e_img_s": e2e,
                "ratio_vs_script": ratio,
                "target": is_target,
                "gpu": asdict(o.gpu) if o.gpu else None,
                "cli": asdict(o.cli) if o.cli else None,
                "ceilings_img_s": ceilings(o),
                "full_run": asdict(o.full) if o.full else None,
                "startup_run": asdict(o.startup) if o.startup else None,
                "error": o.error,
                "skipped": o.skipped,
                "notes": o.notes,
            }
        )

    lines += [
        "",
        "Where the time goes (clipseg runs): per-image times from the CLI's log, and the img/s "
        f"each stage could sustain alone (decode: workers / decode time; write: {WRITER_THREADS} "
        "writer threads / write time, which is refinement + PNG; model: (N - 1) / the difference "
        "of the N- and 1-image runs' inference seconds, from their summaries). The lowest "
        "ceiling is the likely bottleneck.",
        "",
        "| configuration | wall s | steady img/s | decode ms | write ms | ceilings img/s "
        "(model / decode / write) | lowest |",
        "|---|---|---|---|---|---|---|",
    ]
    for o in shown:
        if o.config.tool != "clipseg" or o.full is None or not o.full.ok:
            continue
        caps = ceilings(o)
        lowest = min(caps, key=caps.__getitem__) if caps else "n/a"
        cli = o.cli
        lines.append(
            f"| {o.config.title(ref_device)} | {o.full.wall_s:.1f} | {fmt_rate(o.img_s()[1])} | "
            f"{fmt(cli.decode_ms if cli else None, '.1f')} | "
            f"{fmt(cli.write_ms if cli else None, '.1f')} | "
            f"{fmt(caps.get('model'), '.1f')} / {fmt(caps.get('decode'), '.1f')} / "
            f"{fmt(caps.get('write'), '.1f')} | {lowest} |"
        )

    lines += ["", "Comparisons (steady-state img/s, first / second):", ""]
    by_config = {o.config: o for o in outcomes}
    for o in shown:
        c = o.config
        pairs = []
        if c.refine == "guided":
            none = replace(c, refine="none", group="refine" if c.group == "speed" else c.group)
            pairs.append(("--refine guided / none", ", --refine guided", none))
        if c.tiles == "auto":
            pairs.append(("--tiles auto / off", ", --tiles auto", replace(c, tiles="off")))
        for what, varied, twin_config in pairs:
            twin = by_config.get(twin_config)
            mine, theirs = o.img_s()[1], twin.img_s()[1] if twin else None
            if mine and theirs:
                common = c.title(ref_device).replace(varied, "")
                lines.append(
                    f"- {what} ({common}): {mine:.2f} / {theirs:.2f} img/s = {mine / theirs:.2f}"
                )
    lines.append("")

    best = max(
        (t for t in target_rows if t[0].img_s()[1] is not None),
        key=lambda t: t[0].img_s()[1] or 0.0,
        default=None,
    )
    if best is not None:
        o, ratio, util = best
        lines.append(
            f"Best {plan.target_precision}, 1 prompt: batch {o.config.batch}, "
            f"{fmt_rate(o.img_s()[1])} img/s = {fmt(ratio, '.2f', 'x')} the script "
            f"(target {TARGET_RATIO:g}x: {judge(ratio, TARGET_RATIO)}), "
            f"{fmt(util, suffix='%')} mean GPU utilisation (target {TARGET_UTIL:g}%: "
            f"{judge(util, TARGET_UTIL)})."
        )
        lines.append("")
    failed = [o.config.label for o in outcomes if o.error]
    skipped = [o.config.label for o in outcomes if o.skipped]
    if failed:
        lines.append(f"Failed configurations (logs in logs/): {', '.join(failed)}")
    if skipped:
        lines.append(f"Skipped (budget spent; raise --budget-s): {', '.join(skipped)}")
    for o in shown:
        for note in o.notes:
            lines.append(f"Note, {o.config.title(ref_device)}: {note}")
    missed = sum(
        (ratio is not None and ratio < TARGET_RATIO) + (util is not None and util < TARGET_UTIL)
        for _, ratio, util in target_rows
    )
    measured = any(ratio is not None or util is not None for _, ratio, util in target_rows)
    if missed:
        lines.append(f"**{missed} target(s) MISSED.**")
    elif not measured:
        lines.append("**No target measured** (the judged runs failed or were skipped).")
    else:
        lines.append("All measured targets met.")
    summary: dict[str, object] = {"plan": asdict(plan), "machine": info, "notes": notes}
    summary["results"] = rows
    return "\n".join(lines) + "\n", summary


# ---------------------------------------------------------------------------------------------


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="CPU, tiny model: check the flow")
    parser.add_argument("--quick", action="store_true", help="batch 32 only, fewer images")
    parser.add_argument("--model", default=None, help="real weights (transformers folder)")
    parser.add_argument("--images", type=int, default=None, help="images per throughput run")
    parser.add_argument("--ref-images", type=int, default=None, help="images for the script")
    parser.add_argument("--tile-images", type=int, default=None, help="2048x1536 images")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=None)
    parser.add_argument("--precisions", nargs="+", default=None, help="first one is judged")
    parser.add_argument("--budget-s", type=float, default=None, help="0: no budget")
    parser.add_argument("--run-timeout", type=int, default=300, help="seconds per process")
    parser.add_argument(
        "--threshold",
        type=float,
        default=0.5,
        help="mask threshold for both tools (0.5, as run_bench.py: random weights' "
        "probabilities sit around 0.3-0.8)",
    )
    parser.add_argument("--gpu", default=None, help="nvidia-smi -i (default: first visible)")
    parser.add_argument("--cli", default=None, help="command prefix for clipseg")
    parser.add_argument(
        "--cli-arg",
        action="append",
        default=[],
        help="extra clipseg argument, repeatable, with '=': --cli-arg=--workers --cli-arg=8",
    )
    parser.add_argument("--work", type=Path, default=BENCH_DIR / "_work" / "gpu")
    args = parser.parse_args()
    if args.smoke and args.quick:
        parser.error("--smoke and --quick exclude each other")
    for name in ("images", "ref_images", "tile_images"):
        value = getattr(args, name)
        if value is not None and value < 2:
            parser.error(f"--{name.replace('_', '-')} must be >= 2 (steady state needs N > 1)")
    return args


def main() -> None:
    args = parse_args()
    began = time.perf_counter()
    plan = make_plan(args)
    # torch's cuda:0 and nvidia-smi's index 0 are the same GPU only in PCI bus order.
    os.environ.setdefault("CUDA_DEVICE_ORDER", "PCI_BUS_ID")
    work: Path = args.work.resolve()
    logs, outs = work / "logs", work / "out"
    logs.mkdir(parents=True, exist_ok=True)

    info = machine_info()
    torch_info = info.get("torch")
    print(f"CPU: {info['cpu_model']} ({info['cpus']} CPUs)")
    print(f"GPUs (nvidia-smi -L):\n{info['gpus'] or 'n/a'}")
    print(f"torch / CUDA / transformers: {torch_info}")
    if torch_info is None:
        raise SystemExit("could not import torch and transformers; install with bench/gpu_bench.sh")
    assert isinstance(torch_info, dict)
    if plan.device == "cuda" and not torch_info.get("cuda_available"):
        raise SystemExit(
            "torch sees no CUDA device. If nvidia-smi works, the driver is probably older than "
            f"the CUDA {torch_info.get('cuda')} this torch is built for: reinstall with e.g. "
            "TORCH_INDEX_URL=https://download.pytorch.org/whl/cu126 bash bench/gpu_bench.sh "
            "(and remove .venv-gpu first). Or run --smoke on a CPU-only machine."
        )
    if plan.device == "cuda" and "bf16" in plan.precisions and not torch_info.get("bf16"):
        print("WARNING: this GPU reports no bf16 support; bf16 runs will likely fail.")

    cli = cli_base(args.cli)
    if not cli_has_option(cli, "--refine"):
        raise SystemExit(f"`{' '.join(cli)} segment --help` fails or lacks --refine: fix first")
    extra = ["--device", plan.device, "--progress", "none", *args.cli_arg]
    notes: list[str] = []
    if cli_has_option(cli, "--backend"):
        extra += ["--backend", "torch"]
        notes.append("clipseg ran with --backend torch.")
    else:
        notes.append("clipseg has no --backend option (yet): its only backend, torch, ran.")
    if cli_has_option(cli, "--threshold"):
        extra += ["--threshold", str(args.threshold)]
    if args.cli_arg:
        notes.append(f"Extra clipseg arguments: {' '.join(args.cli_arg)}")
    ref_extra: list[str] = []
    # The script is the baseline exactly as written; only an option it has itself is used.
    if '"--device"' in REFERENCE.read_text(encoding="utf-8"):
        ref_extra = ["--device", plan.device]
        ref_device = plan.device
    else:
        ref_device = "CPU"
        notes.append(
            "The transformers script has no device option: it runs on the CPU "
            f"({info['cpus']} CPUs, torch's default threads), as its users' code would."
        )

    if args.model:
        model = Path(args.model).resolve()
        if not any(
            (model / f).exists() for f in ("preprocessor_config.json", "processor_config.json")
        ):
            print(f"WARNING: {model} has no processor files; the transformers script will fail.")
        notes.append(f"Model: {model}")
    elif plan.mode == "smoke":
        model = ensure_tiny_model(work / "model-tiny", logs)
        notes.append("Model: tests/factories.py's tiny random rd64-refined")
    else:
        model = ensure_model(work / "model-rd64-refined", logs)
        notes.append("Model: random full-size rd64-refined weights (transformers layout)")
    warm_page_cache(model)

    configs = make_configs(plan)
    print(
        f"Plan ({plan.mode}): {len(configs)} configurations, about {2 * len(configs)} processes;"
        f" budget {plan.budget_s or 'none'} s; images {plan.images} at {plan.size}, script "
        f"{plan.ref_images}, tiles {plan.tile_images} at {plan.tile_size}",
        flush=True,
    )
    folders: dict[tuple[tuple[int, int], int], Path] = {}
    for c in configs:
        for count in (c.images, 1):
            if (c.size, count) not in folders:
                folders[(c.size, count)] = image_set(work, c.size, count)
    notes.append(
        f"Images: photo-like JPEGs (bench/make_images.py), {plan.images} at "
        f"{plan.size[0]}x{plan.size[1]} per throughput run, {plan.ref_images} for the script, "
        f"{plan.tile_images} at {plan.tile_size[0]}x{plan.tile_size[1]} for tiles."
    )

    sampler = None
    if shutil.which("nvidia-smi"):
        sampler = GpuSampler(args.gpu or default_gpu(), logs / "nvidia-smi.csv")
        sampler.path.unlink(missing_ok=True)
    elif plan.device == "cuda":
        notes.append("nvidia-smi not found: no GPU utilisation or memory.")
    harness_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    notes.append(
        f"Harness RSS (a child's ru_maxrss cannot be below it): {harness_rss / 2**20:.0f} MiB"
    )

    def command(c: Config, folder: Path, out: Path) -> list[str]:
        prompts = PROMPTS_1 if c.prompts == 1 else PROMPTS_5
        if c.tool == "script":
            return [*reference_cmd(folder, model, out, prompts, args.threshold), *ref_extra]
        cmd = [*cli, "segment", str(folder), "--out", str(out), "--model", str(model)]
        for p in prompts:
            cmd += ["--prompt", p]
        cmd += ["--precision", c.precision, "--batch-size", str(c.batch)]
        cmd += ["--refine", c.refine, "--tiles", c.tiles, "--log", str(out / "clipseg-log.jsonl")]
        return [*cmd, *extra]

    def run_one(c: Config, count: int) -> tuple[RunResult, Path, float, float]:
        label = f"{c.label}-n{count}"
        out = outs / label
        shutil.rmtree(out, ignore_errors=True)  # a resuming CLI would skip finished images
        if sampler is not None:
            sampler.ensure_running()
        start = time.time()
        cmd = timed(command(c, folders[(c.size, count)], out), args.run_timeout)
        result = run_measured(label, cmd, logs / f"{label}.log", count)
        return result, out, start, time.time()

    outcomes = [Outcome(c) for c in configs]
    try:
        for o in outcomes:
            if plan.budget_s and time.perf_counter() - began > plan.budget_s:
                o.skipped = "budget"
                continue
            measure(o, plan, run_one, args.run_timeout)
    except KeyboardInterrupt:
        # Ctrl-C reached the running child too; report what was measured so far.
        for o in outcomes:
            if o.full is None and o.skipped is None:
                o.skipped = "interrupted"
        notes.append("INTERRUPTED: the report covers the configurations finished before.")
    finally:
        if sampler is not None:
            sampler.stop()  # never leave nvidia-smi running behind us

    if sampler is not None:
        samples = sampler.samples()
        for o in outcomes:
            if o.full is not None:
                wall_1 = o.startup.wall_s if o.startup and o.startup.ok else None
                o.gpu = gpu_stats(samples, o.start, o.end, wall_1)
        if sampler.restarts or sampler.unparsed:
            notes.append(
                f"nvidia-smi sampler: {sampler.restarts} restart(s), {sampler.unparsed} "
                f"unparsed line(s) (see {sampler.path})"
            )
        idle = [o.gpu.mem_idle_mib for o in outcomes if o.gpu and o.gpu.mem_idle_mib is not None]
        if idle:
            notes.append(f"Idle GPU memory.used between runs: {min(idle):.0f} MiB")
    else:
        notes.append("GPU utilisation: n/a (no nvidia-smi sampling on this device)")
    if float(info["load_before"]) > 0.5:  # type: ignore[arg-type]
        notes.append(
            f"WARNING: load average {info['load_before']:.2f} before the runs: other processes "
            "were using the CPUs, so the timings are unreliable."
        )
    if info.get("gpu_apps"):
        notes.append(
            f"WARNING: other processes were on the GPU before the runs: {info['gpu_apps']}"
        )
    notes.append(f"Benchmark wall time: {time.perf_counter() - began:.0f} s")

    report, summary = build_report(plan, outcomes, info, notes, ref_device)
    print()
    print(report)
    (work / "results.md").write_text(report, encoding="utf-8")
    (work / "results.json").write_text(json.dumps(summary, indent=2), encoding="utf-8")
    print(f"Written to {work / 'results.md'} and {work / 'results.json'}")


if __name__ == "__main__":
    main()
