"""``clipseg segment`` and ``clipseg matte``: options -> one :class:`SegmentConfig` -> the
pipeline -> a line of counts and an exit code.

The two commands are declared side by side on purpose: Typer needs every parameter in each
signature, and a reader sees at a glance which options each one has. Every option is declared
once in :mod:`.options` and passed by name to the config.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from clipseg_cli.commands import options as o
from clipseg_cli.commands.console import (
    ExitCode,
    exit_on_error,
    progress_bar,
    say_failed,
    wants_bar,
)
from clipseg_cli.io.naming import COMMAND_KINDS, parse_exports, parse_kinds
from clipseg_cli.run.config import SegmentConfig, VideoOptions
from clipseg_cli.specs import (
    DEFAULT_MAX_PIXELS,
    DEFAULT_MIN_SCORE,
    DEFAULT_MODEL,
    DEFAULT_SAM_MODEL,
    DEFAULT_SEGMENT_FRAMES,
    DEFAULT_SMOOTH,
    MODEL_SPECS,
)

if TYPE_CHECKING:
    from clipseg_cli.run.pipeline import Progress
    from clipseg_cli.run.watching import Follow


class _StopSignals:
    """First SIGINT/SIGTERM asks the run to stop after the images in flight; a second one
    stops at once (Python's default)."""

    def __init__(self) -> None:
        self.received: int | None = None
        self._previous: dict = {}

    def __enter__(self) -> _StopSignals:
        import signal

        for signum in (signal.SIGINT, signal.SIGTERM):
            self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def _handle(self, signum: int, _frame: object) -> None:
        import signal

        self.received = signum
        typer.echo("clipseg: stopping after the current batch (again to abort)", err=True)
        signal.signal(signum, self._previous[signum])

    def __exit__(self, *exc: object) -> None:
        import signal

        for signum, handler in self._previous.items():
            signal.signal(signum, handler)

    def exit_code(self) -> ExitCode | None:
        import signal

        if self.received is None:
            return None
        return ExitCode.INTERRUPTED if self.received == signal.SIGINT else ExitCode.TERMINATED


class _ProgressReporter:
    """A rich progress bar on a terminal; plain periodic lines (no control characters) else;
    with ``--progress none`` only the failures (one line each, in every mode)."""

    def __init__(self, progress: str, interval: float = 5.0) -> None:
        self.bar = wants_bar(progress)
        self.quiet = progress == "none"
        self.interval = interval
        self._last = 0.0
        self._bar = None
        self._task = None

    def __enter__(self) -> _ProgressReporter:
        if self.bar:
            self._bar = progress_bar(
                "[bold]segment", "{task.fields[rate]:.2f} img/s", "{task.fields[failed]} failed"
            )
            self._task = self._bar.add_task("segment", total=None, rate=0.0, failed=0)
        return self

    def __call__(self, progress) -> None:
        say_failed(progress.row, self._bar)
        if self.quiet:
            return
        rate = progress.done / progress.elapsed if progress.elapsed > 0 else 0.0
        if self._bar is not None:
            self._bar.update(
                self._task,
                completed=progress.done,
                total=progress.total,
                rate=rate,
                failed=progress.failed,
            )
            return
        now = time.monotonic()
        if now - self._last < self.interval and progress.done < progress.total:
            return
        self._last = now
        remaining = (progress.total - progress.done) / rate if rate > 0 else float("nan")
        eta = f"{remaining:.0f}s" if remaining == remaining else "?"
        typer.echo(
            f"clipseg: {progress.done}/{progress.total} images, {progress.ok} ok, "
            f"{progress.failed} failed, {rate:.2f} img/s, ETA {eta}",
            err=True,
        )

    def __exit__(self, *exc) -> None:
        if self._bar is not None:
            self._bar.stop()


# Parameters of the commands whose config field has another name.
_FIELD_NAMES = {
    "out": "out_dir",
    "ref": "refs",
    "ref_mask": "ref_masks",
    "negative": "negatives",
    "export": "exports",
    "log": "log_path",
    "matte_bits": "soft_bits",
}


_VIDEO_OPTIONS = (
    "smooth",
    "video_codec",
    "every",
    "fps",
    "start",
    "end",
    "segment_frames",
    "frames",
    "sequence",
)


def segment_config(command: str, options: dict[str, Any]) -> SegmentConfig:
    """The :class:`SegmentConfig` of a command's parameters (``segment``, ``matte``, ``watch``
    pass their own by name): prompts and thresholds read from their files, kinds parsed.

    Raises:
        ValueError: an option is wrong (one line).
    """
    values = {_FIELD_NAMES.get(name, name): value for name, value in options.items()}
    del values["progress"]
    prompts = o.prompts_from(values.pop("prompt"), values.pop("prompts_file"))
    threshold = o.threshold_from(values.pop("threshold"), values.pop("threshold_from"))
    for name in ("inputs", "refs", "ref_masks", "negatives"):
        values[name] = tuple(values[name] or ())
    values["save"] = parse_kinds(values["save"] or [], command)
    if "exports" in values:
        values["exports"] = parse_exports(values["exports"] or [])
    video = {name: values.pop(name) for name in _VIDEO_OPTIONS if name in values}
    if video:
        values["video"] = VideoOptions(**video)
    return SegmentConfig(command=command, prompts=prompts, threshold=threshold, **values)


def run_images(
    config: SegmentConfig,
    progress: str,
    follow: Follow | None = None,
    reporter: AbstractContextManager[Callable[[Progress], None]] | None = None,
) -> None:
    """Run a segment/matte config (watching with ``follow``), say what it did, exit with the
    run's code. ``reporter``: the progress display, a context manager called with each
    :class:`Progress` (default: the bar or periodic lines of segment)."""
    from clipseg_cli.run.pipeline import run_segment

    with (
        exit_on_error(),
        _StopSignals() as signals,
        reporter or _ProgressReporter(progress) as shown,
    ):
        summary = run_segment(
            config,
            stdin=sys.stdin,
            on_progress=shown,
            should_stop=lambda: signals.received is not None,
            on_notice=lambda message: typer.echo(f"clipseg: {message}", err=True),
            follow=follow,
        )
    stages = summary.stages.line()
    if stages is not None:  # before the counts, which stay the last line
        typer.echo(f"clipseg: {stages}", err=True)
    typer.echo(
        f"clipseg: {summary.ok} ok, {summary.failed} failed, {summary.skipped} skipped "
        f"(unchanged) of {summary.total} in {summary.seconds:.1f}s "
        f"({summary.images_per_second:.2f} img/s); log {summary.log_path}",
        err=True,
    )
    if summary.report_path is not None:
        typer.echo(f"clipseg: report {summary.report_path}", err=True)
    named = MODEL_SPECS.get(config.model)
    if named is not None and named.run_note is not None and summary.ok:
        typer.echo(f"clipseg: note: {named.run_note}", err=True)
    stopped = signals.exit_code()
    if stopped is not None:
        again = "catch up and go on watching" if follow is not None else "resume"
        typer.echo(f"clipseg: interrupted; rerun the same command to {again}", err=True)
        raise typer.Exit(int(stopped))
    if summary.failed:
        raise typer.Exit(int(ExitCode.SOME_FAILED))


def segment(
    inputs: o.Inputs,
    out: o.OutOpt = Path("clipseg-out"),
    prompt: o.PromptOpt = None,
    prompts_file: o.PromptsFileOpt = None,
    ref: o.RefOpt = None,
    ref_mask: o.RefMaskOpt = None,
    ref_mode: o.RefModeOpt = None,
    mix: o.MixOpt = None,
    negative: o.NegativeOpt = None,
    save_prompt: o.SavePromptOpt = None,
    prompt_embedding: o.PromptEmbeddingOpt = None,
    save: o.SegmentSaveOpt = None,
    threshold: o.ThresholdOpt = None,
    threshold_from: o.ThresholdFromOpt = None,
    soft_bits: o.BitsOpt = 8,
    cutout_alpha: o.CutoutAlphaOpt = "soft",
    refine: o.RefineOpt = "guided",
    tiles: o.TilesOpt = "off",
    sam_model: o.SamModelOpt = DEFAULT_SAM_MODEL,
    grow: o.GrowOpt = 0,
    fill_holes: o.FillHolesOpt = False,
    min_area: o.MinAreaOpt = None,
    min_score: o.MinScoreOpt = DEFAULT_MIN_SCORE,
    split: o.SplitOpt = "auto",
    invert: o.InvertOpt = False,
    feather: o.FeatherOpt = 0,
    export: o.ExportOpt = None,
    coco_segmentation: o.CocoSegmentationOpt = "rle",
    yolo_copy: o.YoloCopyOpt = False,
    smooth: o.SmoothOpt = DEFAULT_SMOOTH,
    video_codec: o.VideoCodecOpt = "prores",
    every: o.EveryOpt = 1,
    fps: o.FpsOpt = None,
    start: o.StartOpt = None,
    end: o.EndOpt = None,
    segment_frames: o.SegmentFramesOpt = DEFAULT_SEGMENT_FRAMES,
    frames: o.FramesOpt = False,
    sequence: o.SequenceOpt = False,
    model: o.ModelOpt = DEFAULT_MODEL,
    clip_weights: o.ClipWeightsOpt = None,
    device: o.DeviceOpt = "auto",
    precision: o.PrecisionOpt = "auto",
    backend: o.BackendOpt = "auto",
    batch_size: o.BatchOpt = None,
    workers: o.WorkersOpt = 2,
    max_pixels: o.MaxPixelsOpt = DEFAULT_MAX_PIXELS,
    allow_truncated: o.TruncatedOpt = False,
    log: o.LogOpt = None,
    progress: o.ProgressOpt = "auto",
    overwrite: o.OverwriteOpt = False,
    retry_failed: o.RetryOpt = False,
    report: o.ReportOpt = False,
    engine: o.EngineOpt = "local",
    ray_address: o.RayAddressOpt = None,
    num_gpus: o.NumGpusOpt = None,
    actors: o.ActorsOpt = None,
) -> None:
    """Segment images and videos with text and/or image prompts; write masks and a JSON log."""
    with exit_on_error():
        config = segment_config("segment", locals())
    run_images(config, progress)


def matte(
    inputs: o.Inputs,
    out: o.OutOpt = Path("clipseg-out"),
    prompt: o.PromptOpt = None,
    prompts_file: o.PromptsFileOpt = None,
    ref: o.RefOpt = None,
    ref_mask: o.RefMaskOpt = None,
    ref_mode: o.RefModeOpt = None,
    mix: o.MixOpt = None,
    negative: o.NegativeOpt = None,
    save_prompt: o.SavePromptOpt = None,
    prompt_embedding: o.PromptEmbeddingOpt = None,
    save: Annotated[
        list[str] | None,
        typer.Option(
            help=f"Output kinds, comma-separated or repeated: {', '.join(COMMAND_KINDS['matte'])}.",
            show_default=COMMAND_KINDS["matte"][0],
        ),
    ] = None,
    refine: o.RefineOpt = "guided",
    tiles: o.TilesOpt = "off",
    sam_model: o.SamModelOpt = DEFAULT_SAM_MODEL,
    grow: o.GrowOpt = 0,
    fill_holes: o.FillHolesOpt = False,
    min_area: o.MinAreaOpt = None,
    min_score: o.MinScoreOpt = DEFAULT_MIN_SCORE,
    split: o.SplitOpt = "auto",
    invert: o.InvertOpt = False,
    feather: o.FeatherOpt = 0,
    background: Annotated[
        str,
        typer.Option(
            help="Composite background: a colour (white, #00ff00, 0,255,0), an image file, "
            "or blur (the blurred original)."
        ),
    ] = "white",
    threshold: o.ThresholdOpt = None,
    threshold_from: o.ThresholdFromOpt = None,
    matte_bits: o.BitsOpt = 8,
    smooth: o.SmoothOpt = DEFAULT_SMOOTH,
    video_codec: o.VideoCodecOpt = "prores",
    every: o.EveryOpt = 1,
    fps: o.FpsOpt = None,
    start: o.StartOpt = None,
    end: o.EndOpt = None,
    segment_frames: o.SegmentFramesOpt = DEFAULT_SEGMENT_FRAMES,
    frames: o.FramesOpt = False,
    sequence: o.SequenceOpt = False,
    model: o.ModelOpt = DEFAULT_MODEL,
    clip_weights: o.ClipWeightsOpt = None,
    device: o.DeviceOpt = "auto",
    precision: o.PrecisionOpt = "auto",
    backend: o.BackendOpt = "auto",
    batch_size: o.BatchOpt = None,
    workers: o.WorkersOpt = 2,
    max_pixels: o.MaxPixelsOpt = DEFAULT_MAX_PIXELS,
    allow_truncated: o.TruncatedOpt = False,
    log: o.LogOpt = None,
    progress: o.ProgressOpt = "auto",
    overwrite: o.OverwriteOpt = False,
    retry_failed: o.RetryOpt = False,
    report: o.ReportOpt = False,
    engine: o.EngineOpt = "local",
    ray_address: o.RayAddressOpt = None,
    num_gpus: o.NumGpusOpt = None,
    actors: o.ActorsOpt = None,
) -> None:
    """Full-resolution alpha mattes (and cutouts, composites) from text or image prompts."""
    with exit_on_error():
        config = segment_config("matte", locals())
    run_images(config, progress)
