"""The ``clipseg`` command line: parses options into a config, runs, prints, exits.

With :mod:`.commands_eval`, :mod:`.commands_train` and :mod:`.console` this is the CLI layer,
the only one that prints or exits. Exit codes are listed in :class:`.console.ExitCode` (and in
the README).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Annotated

import typer

from clipseg_cli.commands.console import ExitCode, fail, progress_bar, wants_bar
from clipseg_cli.io.sources import DEFAULT_MAX_PIXELS
from clipseg_cli.run.config import (
    DEFAULT_BATCH_SIZES,
    MATTE_KINDS,
    SEGMENT_KINDS,
    SegmentConfig,
    parse_kinds,
    read_prompts_file,
)
from clipseg_cli.specs import DEFAULT_MODEL, DEFAULT_THRESHOLD, MODEL_SPECS


class _StopSignals:
    """First SIGINT/SIGTERM asks the run to stop after the current batch; a second one stops
    at once (Python's default)."""

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


app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="Segment image collections from free-form text or image prompts with CLIPSeg.",
)


class _ProgressReporter:
    """A rich progress bar on a terminal; plain periodic lines (no control characters) else."""

    def __init__(self, interactive: bool, interval: float = 5.0) -> None:
        self.interactive = interactive
        self.interval = interval
        self._last = 0.0
        self._bar = None
        self._task = None

    def __enter__(self) -> _ProgressReporter:
        if self.interactive:
            self._bar = progress_bar(
                "[bold]segment", "{task.fields[rate]:.2f} img/s", "{task.fields[failed]} failed"
            )
            self._task = self._bar.add_task("segment", total=None, rate=0.0, failed=0)
        return self

    def __call__(self, progress) -> None:
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


# Options shared by `segment` and `matte`: declared once, used by both commands.
Inputs = Annotated[
    list[str],
    typer.Argument(
        help="Image files, folders (recursive), quoted globs, '-' (paths on stdin) or "
        "@list.txt (a file of paths).",
        show_default=False,
    ),
]
OutOpt = Annotated[Path, typer.Option("--out", "-o", help="Output folder.")]
PromptOpt = Annotated[
    list[str] | None, typer.Option("--prompt", "-p", help="Text prompt (repeatable).")
]
PromptsFileOpt = Annotated[Path | None, typer.Option(help="File with one text prompt per line.")]
RefOpt = Annotated[
    list[Path] | None,
    typer.Option(
        help="Image prompt: a support image of the object (repeatable: averaged into one)."
    ),
]
RefMaskOpt = Annotated[
    list[Path] | None,
    typer.Option(help="Object mask of the n-th --ref (else the reference's alpha, if any)."),
]
RefModeOpt = Annotated[
    str | None,
    typer.Option(
        help="engineered: crop around the object, background dimmed to 10% and blurred "
        "(default with a mask); raw: the whole image as it is (default without).",
        show_default=False,
    ),
]
MixOpt = Annotated[
    float | None, typer.Option(help="Combine text and image prompts: W*text + (1-W)*image.")
]
NegativeOpt = Annotated[
    list[str] | None,
    typer.Option(help="Suppress what matches this text: p * (1 - max p_negative). Repeatable."),
]
SavePromptOpt = Annotated[
    Path | None, typer.Option(help="Write the embedded prompts to FILE for --prompt-embedding.")
]
PromptEmbeddingOpt = Annotated[
    Path | None,
    typer.Option(help="Use prompts saved by --save-prompt (no text tower or reference needed)."),
]
ThresholdOpt = Annotated[
    float | None,
    typer.Option(
        help=f"Probability above which a pixel is foreground (default: {DEFAULT_THRESHOLD}, the "
        "paper's).",
        show_default=False,
    ),
]
ThresholdFromOpt = Annotated[
    Path | None, typer.Option(help="Read the threshold from a file written by clipseg calibrate.")
]
ModelOpt = Annotated[
    str,
    typer.Option(
        help="Hub id, short name (rd64-refined, rd64, rd16, demo), local transformers folder, "
        "or original decoder file (.pth)."
    ),
]
ClipWeightsOpt = Annotated[
    Path | None,
    typer.Option(help="OpenAI-format CLIP ViT-B/16 weights for an original decoder file."),
]
DeviceOpt = Annotated[str, typer.Option(help="auto, cpu, cuda, cuda:N or mps.")]
PrecisionOpt = Annotated[
    str, typer.Option(help="auto (half on GPU, fp32 on CPU), fp32, bf16 or fp16.")
]
BatchOpt = Annotated[
    int | None,
    typer.Option(
        help=f"Images per model batch (default: {DEFAULT_BATCH_SIZES['cpu']} on CPU, "
        f"{DEFAULT_BATCH_SIZES['cuda']} on GPU).",
        show_default=False,
    ),
]
WorkersOpt = Annotated[int, typer.Option(help="Decode/resize worker threads.")]
MaxPixelsOpt = Annotated[
    int, typer.Option(help="Refuse images with more pixels than this (decompression bombs).")
]
TruncatedOpt = Annotated[bool, typer.Option(help="Decode truncated files instead of failing them.")]
LogOpt = Annotated[
    Path | None,
    typer.Option(help="JSON-lines log, one row per input (default: OUT/clipseg-log.jsonl)."),
]
ProgressOpt = Annotated[
    str, typer.Option(help="auto (bar on a terminal, lines otherwise), bar, lines, none.")
]
OverwriteOpt = Annotated[
    bool, typer.Option(help="Redo everything when --out holds results of another configuration.")
]
RetryOpt = Annotated[
    bool, typer.Option(help="Retry inputs that failed in earlier runs into the same --out.")
]
BitsOpt = Annotated[int, typer.Option(help="Bit depth of probability/alpha PNGs: 8 or 16.")]
ReportOpt = Annotated[
    bool, typer.Option(help="Write OUT/report.html: a static page to review every result.")
]
EngineOpt = Annotated[
    str,
    typer.Option(
        help="local (this machine) or ray (a Ray cluster: pip install 'clipseg-cli[ray]'; "
        "see docs/ray.md)."
    ),
]
RayAddressOpt = Annotated[
    str | None,
    typer.Option(
        help="Ray cluster to join (auto, ray://host:10001, host:6379) (default: $RAY_ADDRESS, "
        "else a local cluster started for the run).",
        show_default=False,
    ),
]
NumGpusOpt = Annotated[
    float | None,
    typer.Option(
        help="GPUs per Ray actor (fractions share a GPU) (default: 1 if the cluster has GPUs, "
        "else 0).",
        show_default=False,
    ),
]
ActorsOpt = Annotated[
    int | None,
    typer.Option(
        help="Ray actors holding the model (default: one per GPU, else one per 8 CPUs).",
        show_default=False,
    ),
]


def _run_images(common: dict, progress: str) -> None:
    """Build the config from the options of `segment`/`matte`, run it, print, exit."""
    from clipseg_cli.errors import WeightsError
    from clipseg_cli.run import pipeline
    from clipseg_cli.run.ledger import ConfigMismatchError, LockedError

    try:
        prompts = list(common.pop("prompt") or [])
        prompts_file = common.pop("prompts_file")
        if prompts_file is not None:
            prompts += read_prompts_file(prompts_file)
        threshold, threshold_from = common.pop("threshold"), common.pop("threshold_from")
        if threshold is not None and threshold_from is not None:
            raise ValueError("give --threshold or --threshold-from, not both")
        if threshold_from is not None:
            from clipseg_cli.evaluate import read_threshold_file

            threshold = read_threshold_file(threshold_from)
        command = common["command"]
        config = SegmentConfig(
            inputs=tuple(common.pop("inputs")),
            prompts=tuple(prompts),
            refs=tuple(common.pop("ref") or ()),
            ref_masks=tuple(common.pop("ref_mask") or ()),
            negatives=tuple(common.pop("negative") or ()),
            save=parse_kinds(common.pop("save") or [], command),
            threshold=DEFAULT_THRESHOLD if threshold is None else threshold,
            **common,
        )
    except ValueError as error:
        raise fail(str(error), ExitCode.USAGE) from None

    interactive = wants_bar(progress)
    quiet = progress == "none"
    try:
        with _StopSignals() as signals, _ProgressReporter(interactive) as reporter:
            summary = pipeline.run_segment(
                config,
                stdin=sys.stdin,
                on_progress=None if quiet else reporter,
                should_stop=lambda: signals.received is not None,
            )
    except pipeline.NoInputsError as error:
        raise fail(str(error), ExitCode.NO_INPUTS) from None
    except LockedError as error:
        raise fail(str(error), ExitCode.LOCKED) from None
    except ConfigMismatchError as error:
        raise fail(str(error), ExitCode.CONFIG_MISMATCH) from None
    except pipeline.DiskFullError as error:
        message = f"{error.strerror}; finished outputs are kept, rerun to resume"
        raise fail(message, ExitCode.DISK_FULL) from None
    except WeightsError as error:
        raise fail(str(error), ExitCode.MODEL) from None
    except ValueError as error:
        raise fail(str(error), ExitCode.USAGE) from None

    typer.echo(
        f"clipseg: {summary.ok} ok, {summary.failed} failed, {summary.skipped} skipped "
        f"(unchanged) of {summary.total} in {summary.seconds:.1f}s "
        f"({summary.images_per_second:.2f} img/s); log {summary.log_path}",
        err=True,
    )
    if summary.report_path is not None:
        typer.echo(f"clipseg: report {summary.report_path}", err=True)
    named = MODEL_SPECS.get(config.model)
    if named is not None and named.run_note is not None:
        typer.echo(f"clipseg: note: {named.run_note}", err=True)
    stopped = signals.exit_code()
    if stopped is not None:
        typer.echo("clipseg: interrupted; rerun the same command to resume", err=True)
        raise typer.Exit(int(stopped))
    if summary.failed:
        raise typer.Exit(int(ExitCode.SOME_FAILED))


@app.command()
def segment(
    inputs: Inputs,
    out: OutOpt = Path("clipseg-out"),
    prompt: PromptOpt = None,
    prompts_file: PromptsFileOpt = None,
    ref: RefOpt = None,
    ref_mask: RefMaskOpt = None,
    ref_mode: RefModeOpt = None,
    mix: MixOpt = None,
    negative: NegativeOpt = None,
    save_prompt: SavePromptOpt = None,
    prompt_embedding: PromptEmbeddingOpt = None,
    save: Annotated[
        list[str] | None,
        typer.Option(
            help=f"Output kinds, comma-separated or repeated: {', '.join(SEGMENT_KINDS)}.",
            show_default="mask",
        ),
    ] = None,
    threshold: ThresholdOpt = None,
    threshold_from: ThresholdFromOpt = None,
    soft_bits: BitsOpt = 8,
    cutout_alpha: Annotated[
        str, typer.Option(help="Alpha of 'cutout' PNGs: soft (probability) or mask.")
    ] = "soft",
    model: ModelOpt = DEFAULT_MODEL,
    clip_weights: ClipWeightsOpt = None,
    device: DeviceOpt = "auto",
    precision: PrecisionOpt = "auto",
    batch_size: BatchOpt = None,
    workers: WorkersOpt = 2,
    max_pixels: MaxPixelsOpt = DEFAULT_MAX_PIXELS,
    allow_truncated: TruncatedOpt = False,
    log: LogOpt = None,
    progress: ProgressOpt = "auto",
    overwrite: OverwriteOpt = False,
    retry_failed: RetryOpt = False,
    report: ReportOpt = False,
    engine: EngineOpt = "local",
    ray_address: RayAddressOpt = None,
    num_gpus: NumGpusOpt = None,
    actors: ActorsOpt = None,
) -> None:
    """Segment images with text and/or image prompts; write masks and a JSON log."""
    common = dict(locals())
    common.update(command="segment", out_dir=common.pop("out"), log_path=common.pop("log"))
    _run_images(common, common.pop("progress"))


@app.command()
def matte(
    inputs: Inputs,
    out: OutOpt = Path("clipseg-out"),
    prompt: PromptOpt = None,
    prompts_file: PromptsFileOpt = None,
    ref: RefOpt = None,
    ref_mask: RefMaskOpt = None,
    ref_mode: RefModeOpt = None,
    mix: MixOpt = None,
    negative: NegativeOpt = None,
    save_prompt: SavePromptOpt = None,
    prompt_embedding: PromptEmbeddingOpt = None,
    save: Annotated[
        list[str] | None,
        typer.Option(
            help=f"Output kinds, comma-separated or repeated: {', '.join(MATTE_KINDS)}.",
            show_default="matte",
        ),
    ] = None,
    refine: Annotated[
        str,
        typer.Option(
            help="Edge refinement against the full-resolution image: guided (guided filter) "
            "or none (plain upsampled probabilities)."
        ),
    ] = "guided",
    background: Annotated[
        str,
        typer.Option(
            help="Composite background: a colour (white, #00ff00, 0,255,0), an image file, "
            "or blur (the blurred original)."
        ),
    ] = "white",
    threshold: ThresholdOpt = None,
    threshold_from: ThresholdFromOpt = None,
    matte_bits: BitsOpt = 8,
    model: ModelOpt = DEFAULT_MODEL,
    clip_weights: ClipWeightsOpt = None,
    device: DeviceOpt = "auto",
    precision: PrecisionOpt = "auto",
    batch_size: BatchOpt = None,
    workers: WorkersOpt = 2,
    max_pixels: MaxPixelsOpt = DEFAULT_MAX_PIXELS,
    allow_truncated: TruncatedOpt = False,
    log: LogOpt = None,
    progress: ProgressOpt = "auto",
    overwrite: OverwriteOpt = False,
    retry_failed: RetryOpt = False,
    report: ReportOpt = False,
    engine: EngineOpt = "local",
    ray_address: RayAddressOpt = None,
    num_gpus: NumGpusOpt = None,
    actors: ActorsOpt = None,
) -> None:
    """Full-resolution alpha mattes (and cutouts, composites) from text or image prompts."""
    common = dict(locals())
    common.update(command="matte", out_dir=common.pop("out"), log_path=common.pop("log"))
    common["soft_bits"] = common.pop("matte_bits")
    _run_images(common, common.pop("progress"))


@app.command()
def models() -> None:
    """List the known CLIPSeg models and whether their weights are in the local cache.

    On a terminal a table; otherwise tab-separated lines (name, hub id, cached, original file,
    description) for scripts.
    """
    from clipseg_cli.errors import WeightsError
    from clipseg_cli.weights import bundled_model_dir, cached_hub_files

    rows = []
    for spec in MODEL_SPECS.values():
        default = " (default)" if spec.hub_id == DEFAULT_MODEL else ""
        if spec.hub_id is None:
            source = "(bundled with clipseg)"
            try:
                cached = "yes" if bundled_model_dir(spec.name) else "no"
            except WeightsError:
                cached = "missing from this install"
        else:
            source, cached = spec.hub_id, "yes" if cached_hub_files(spec.hub_id) else "no"
        original = spec.original_filename or "-"
        rows.append((spec.name, source, cached, original, spec.description + default))
    if not sys.stdout.isatty():
        for row in rows:
            typer.echo("\t".join(row))
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(title="CLIPSeg models")
    for column in ("name", "hub id", "cached", "original file", "description"):
        table.add_column(column, no_wrap=column != "description")
    for row in rows:
        table.add_row(*row)
    Console().print(table)


# --- subcommands defined in their own modules (one line each) ---------------------------------
from clipseg_cli.commands.eval import register as _register_eval  # noqa: E402
from clipseg_cli.commands.train import register as _register_train  # noqa: E402

_register_eval(app)
_register_train(app)


def main() -> None:
    """Console-script entry point."""
    app()


if __name__ == "__main__":
    main()
