"""``clipseg watch``: ``segment`` over folders that keep filling. The same options, outputs,
log, ledger, exports and report as ``clipseg segment`` (the same run: the pipeline over the
stream of :mod:`clipseg_cli.run.watching`), with the model loaded once; files are taken once
complete (:mod:`clipseg_cli.io.watch`); exports, summary and report are rebuilt every
``--flush-every`` seconds while it runs. Stops on SIGINT/SIGTERM (130/143) after recording the
images in flight, or after the catch-up with ``--once``.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated

import typer

from clipseg_cli.commands import options as o
from clipseg_cli.commands.console import exit_on_error, progress_bar, say_failed, wants_bar
from clipseg_cli.commands.segment import run_images, segment_config
from clipseg_cli.specs import (
    DEFAULT_MAX_PIXELS,
    DEFAULT_MIN_SCORE,
    DEFAULT_MODEL,
    DEFAULT_SAM_MODEL,
)

WatchedFolders = Annotated[
    list[str],
    typer.Argument(help="Folders to watch (recursive).", show_default=False),
]
SettleOpt = Annotated[
    float,
    typer.Option(
        help="Seconds a file's size and modification time must stay unchanged before it is "
        "read (a file renamed into place is read at once)."
    ),
]
PollOpt = Annotated[
    float | None,
    typer.Option(
        help="Scan the folders every POLL seconds instead of listening for events (network "
        "filesystems: NFS, SMB, FUSE).",
        show_default="listen for events",
    ),
]
FlushEveryOpt = Annotated[
    float,
    typer.Option(help="Rebuild exports, summary and report at most this often (seconds)."),
]
OnceOpt = Annotated[
    bool, typer.Option(help="Catch up on what is in the folders, then exit (for cron).")
]


class WatchReporter:
    """On a terminal, one live line: the folders, queued, done and failed; piped, one plain
    line per file processed; with ``--progress none`` only the failures."""

    def __init__(self, progress: str, folders: list[str]) -> None:
        self.bar = wants_bar(progress)
        self.quiet = progress == "none"
        self.folders = ", ".join(folders)
        self._bar = None
        self._task = None

    def __enter__(self) -> WatchReporter:
        if self.bar:
            self._bar = progress_bar(
                f"[bold]watching {self.folders}",
                "{task.fields[queued]} queued",
                "{task.fields[failed]} failed",
            )
            self._task = self._bar.add_task("watch", total=None, queued=0, failed=0)
        return self

    def __call__(self, progress) -> None:
        say_failed(progress.row, self._bar, f"{time.strftime('%H:%M:%S')} failed")
        if self.quiet:
            return
        if self._bar is not None:
            self._bar.update(
                self._task,
                completed=progress.done,
                total=progress.total,
                queued=progress.total - progress.done,
                failed=progress.failed,
            )
            return
        row = progress.row
        if row is None or row["status"] != "ok":  # a failure is said above
            return
        typer.echo(f"clipseg: {time.strftime('%H:%M:%S')} ok {row['input']}", err=True)

    def __exit__(self, *exc: object) -> None:
        if self._bar is not None:
            self._bar.stop()


def watch(
    inputs: WatchedFolders,
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
    settle: SettleOpt = 2.0,
    poll: PollOpt = None,
    flush_every: FlushEveryOpt = 30.0,
    once: OnceOpt = False,
) -> None:
    """Segment images as they arrive in folders: catch up first, then each file once complete."""
    from clipseg_cli.run.watching import Follow

    follow_options = {"settle": settle, "poll": poll, "flush_every": flush_every, "once": once}
    with exit_on_error():
        options = {k: v for k, v in locals().items() if k not in follow_options}
        del options["follow_options"], options["Follow"]
        follow = Follow(**follow_options)
        config = segment_config("segment", options)
    run_images(config, progress, follow, WatchReporter(progress, list(inputs)))
