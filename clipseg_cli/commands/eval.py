"""The ``clipseg eval`` and ``clipseg calibrate`` commands: options -> one
:class:`~clipseg_cli.evaluate.EvalConfig` -> :func:`~clipseg_cli.evaluate.run_eval` -> the
summary table, the report files and an exit code.

Like every command module, this one prints and exits; the work is in :mod:`clipseg_cli.evaluate`
and the numbers in :mod:`clipseg_cli.ops.metrics`. Shared options come from :mod:`.options`
and are passed by name to the config; failures become exit codes through
:func:`~clipseg_cli.commands.console.exit_on_error`. The evaluation package (numpy) is imported
only when one of these commands runs.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from clipseg_cli.commands import options as o
from clipseg_cli.commands.console import ExitCode, exit_on_error, fail
from clipseg_cli.specs import DEFAULT_MODEL, DEFAULT_THRESHOLD

if TYPE_CHECKING:
    from clipseg_cli.evaluate import EvalConfig, EvalReport

# Shown on the terminal: at most this many per-file errors (all of them are in the JSON).
_MAX_ERRORS_SHOWN = 20

# -- the options only eval and calibrate have -----------------------------------------------------

GtOpt = Annotated[
    Path | None,
    typer.Option("--gt", help="Folder of ground-truth masks (or mattes with --matting)."),
]
PredOpt = Annotated[
    Path | None,
    typer.Option(
        "--pred",
        help="Folder of predictions: same relative paths as --gt, or clipseg segment outputs "
        "(<name>.<slug>.soft.png / .mask.png).",
    ),
]
ImagesOpt = Annotated[
    Path | None,
    typer.Option("--images", help="Folder of images: run the model on them (needs --prompt)."),
]
PredSlugOpt = Annotated[
    str | None,
    typer.Option(help="Use only predictions of this prompt slug (several prompts in --pred)."),
]
EvalBatchOpt = Annotated[int, typer.Option(help="Images per model batch (--images).")]
VideoEvalOpt = Annotated[
    bool,
    typer.Option(
        "--video",
        help="Score mask sequences (videos, or folders of numbered frames): DAVIS J, F and J&F "
        "per sequence and their means, and flicker (also without --gt). On when --pred, --gt "
        "or --images is a video file.",
    ),
]
KeepPredsOpt = Annotated[
    Path | None,
    typer.Option(help="With --images: also write the predictions here as 16-bit soft PNGs."),
]


def _run(config: EvalConfig) -> EvalReport:
    """Run the evaluation, with progress lines for ``--images``; print the per-file errors."""
    from clipseg_cli import evaluate

    last = [0.0]

    def progress(done: int, total: int) -> None:
        now = time.monotonic()
        if now - last[0] >= 5.0 or done == total:
            last[0] = now
            typer.echo(f"clipseg: {done}/{total} images", err=True)

    report = evaluate.run_eval(
        config, on_progress=progress if config.images_dir is not None else None
    )
    for entry in report.errors[:_MAX_ERRORS_SHOWN]:
        typer.echo(f"clipseg: {entry['file']}: {entry['error']}", err=True)
    if len(report.errors) > _MAX_ERRORS_SHOWN:
        more = len(report.errors) - _MAX_ERRORS_SHOWN
        typer.echo(f"clipseg: ... and {more} more errors (all listed in the JSON)", err=True)
    return report


def _fmt(value: float | None, digits: int = 4) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def _summary_rows(report: EvalReport) -> tuple[list[str], list[tuple[str, ...]]]:
    """Table header and rows: the numbers with their convention next to them."""
    from clipseg_cli.ops import metrics

    if report.matting is not None:
        conventions = metrics.MATTING_CONVENTIONS
        rows = [
            (key, _fmt(report.matting[key], 6), conventions[key]) for key in metrics.MATTING_KEYS
        ]
        return ["metric", "mean over images", "convention"], rows
    scores = report.segmentation
    if scores is None:  # the caller checks that there are numbers
        return [], []
    conventions = metrics.SEGMENTATION_CONVENTIONS
    at = scores.at(report.config.threshold)
    best = scores.at(scores.best_threshold)
    rows = [("threshold", _fmt(at["threshold"], 2), _fmt(best["threshold"], 2), "prob > t")]
    for key in ("iou_fg", "binary_iou", "miou", "precision", "recall"):
        rows.append((key, _fmt(at[key]), _fmt(best[key]), conventions[key]))
    rows.append(("iou_fg_plus1", _fmt(at["iou_fg_plus1"]), _fmt(best["iou_fg_plus1"]),
                 conventions["iou_fg_plus1"]))  # fmt: skip
    rows.append(("ap", _fmt(scores.ap), "", conventions["ap"]))
    if report.boundary is not None:
        rows.append(("boundary_f", _fmt(report.boundary.f_score), "", conventions["boundary_f"]))
    header = ["metric", f"at t={at['threshold']:g}", f"at best t={best['threshold']:g}"]
    return [*header, "convention"], rows


def _print_summary(report: EvalReport) -> None:
    if report.segmentation is None and report.matting is None:
        return
    header, rows = _summary_rows(report)
    counts = f"{report.ok} evaluated, {report.failed} errors"
    if not sys.stdout.isatty():
        typer.echo(f"# {report.mode}: {counts}")
        typer.echo("\t".join(header))
        for row in rows:
            typer.echo("\t".join(row))
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"clipseg eval ({report.mode}): {counts}")
    for i, column in enumerate(header):
        table.add_column(column, justify="right" if 0 < i < len(header) - 1 else "left")
    for row in rows:
        table.add_row(*row)
    Console().print(table)


def _write_outputs(
    report: EvalReport, json_path: Path | None, csv_path: Path | None, plot: Path | None
) -> list[str]:
    """Write the requested report files; the names written, for the closing line."""
    from clipseg_cli import evaluate

    if json_path is not None:
        csv_path = csv_path or json_path.with_suffix(".csv")
        plot = plot or json_path.with_suffix(".pr.png")
    if report.segmentation is None:
        plot = None  # no curve without segmentation numbers
    try:
        if json_path is not None:
            evaluate.write_report_json(json_path, report)
        if csv_path is not None:
            evaluate.write_per_image_csv(csv_path, report)
        if plot is not None and report.segmentation is not None:
            evaluate.write_pr_curve(plot, report.segmentation, report.config.threshold)
    except (OSError, ValueError) as error:
        raise fail(f"cannot write the report: {error}", ExitCode.SOME_FAILED) from None
    return [str(p) for p in (json_path, csv_path, plot) if p is not None]


def eval_command(
    gt: GtOpt = None,
    pred: PredOpt = None,
    images: ImagesOpt = None,
    prompt: o.PromptOpt = None,
    prompts_file: o.PromptsFileOpt = None,
    pred_slug: PredSlugOpt = None,
    matting: Annotated[
        bool, typer.Option("--matting", help="Matting metrics (SAD, MSE, MAD, Grad, Conn).")
    ] = False,
    threshold: Annotated[
        float, typer.Option(help="Threshold to report at: foreground = probability > t.")
    ] = DEFAULT_THRESHOLD,
    json_path: Annotated[
        Path | None, typer.Option("--json", help="Write every number here as JSON.")
    ] = None,
    csv_path: Annotated[
        Path | None,
        typer.Option("--csv", help="Per-image CSV.", show_default="--json path with .csv"),
    ] = None,
    plot: Annotated[
        Path | None,
        typer.Option(help="Precision/recall curve PNG.", show_default="--json path with .pr.png"),
    ] = None,
    keep_preds: KeepPredsOpt = None,
    video: VideoEvalOpt = False,
    model: o.ModelOpt = DEFAULT_MODEL,
    clip_weights: o.ClipWeightsOpt = None,
    device: o.DeviceOpt = "auto",
    precision: o.PrecisionOpt = "auto",
    batch_size: EvalBatchOpt = 4,
    shapes: Annotated[
        bool,
        typer.Option(
            "--shapes",
            help="Instead: the proxy measurement of refinement and tiles on generated "
            "high-resolution shape scenes with the demo model (no --gt needed).",
        ),
    ] = False,
    scenes: Annotated[int, typer.Option(help="--shapes: scenes per set.")] = 6,
    first_seed: Annotated[
        int, typer.Option(help="--shapes: seed of the first scene.")
    ] = 50_000_000,
    work: Annotated[
        Path | None,
        typer.Option(help="--shapes: keep the scenes and outputs here (default: a temp folder)."),
    ] = None,
) -> None:
    """Score predictions against ground truth (IoU_FG, mIoU, binary IoU, AP, boundary F; or
    matting).

    With --images and several prompts, the ground truth of each prompt lies under
    gt/<prompt slug>/.
    """
    from clipseg_cli.evaluate import EvalConfig

    if shapes:
        _shapes_proxy(scenes, first_seed, work, json_path)
        return
    if video or _any_video(gt, pred, images):
        _video_eval(
            gt, pred, images, o.prompts_from(prompt, prompts_file), threshold, pred_slug,
            json_path, keep_preds, model=model, clip_weights=clip_weights, device=device,
            precision=precision,
        )  # fmt: skip
        return
    if gt is not None and gt.is_file():
        _coco_eval(
            gt, pred, images, o.prompts_from(prompt, prompts_file), json_path, keep_preds,
            model=model, clip_weights=clip_weights, device=device, precision=precision,
        )  # fmt: skip
        return
    with exit_on_error():
        if gt is None:
            raise ValueError("give --gt DIR or FILE.json (or --shapes for the proxy measurement)")
        config = EvalConfig(
            gt_dir=gt,
            pred_dir=pred,
            images_dir=images,
            prompts=o.prompts_from(prompt, prompts_file),
            pred_slug=pred_slug,
            matting=matting,
            threshold=threshold,
            model=model,
            clip_weights=clip_weights,
            device=device,
            precision=precision,
            batch_size=batch_size,
            keep_preds=keep_preds,
        )
        report = _run(config)
    written = _write_outputs(report, json_path, csv_path, plot)
    _print_summary(report)
    if written:
        typer.echo(f"clipseg: wrote {', '.join(written)}", err=True)
    if report.ok == 0:
        raise fail("no pair could be evaluated", ExitCode.SOME_FAILED)
    if report.failed:
        raise typer.Exit(int(ExitCode.SOME_FAILED))


def _any_video(*paths: Path | None) -> bool:
    from clipseg_cli.io.video import sniff_video

    return any(path is not None and path.is_file() and sniff_video(path) for path in paths)


def _video_eval(
    gt: Path | None,
    pred: Path | None,
    images: Path | None,
    prompts: tuple[str, ...],
    threshold: float,
    pred_slug: str | None,
    json_path: Path | None,
    keep_preds: Path | None,
    **model_options: object,
) -> None:
    """``eval --video``: mask sequences against ground-truth sequences (or flicker alone),
    predicted first by ``segment`` (its defaults, ``--save soft``) for ``--images``."""
    import tempfile

    from clipseg_cli.evaluate.video import run_video_eval

    with exit_on_error(), tempfile.TemporaryDirectory(prefix="clipseg-eval-") as scratch:
        if (pred is None) == (images is None):
            raise ValueError("give either --pred (videos or frame folders) or --images VIDEO")
        if not 0.0 <= threshold <= 1.0:
            raise ValueError(f"--threshold {threshold}: must be between 0 and 1")
        for name, path in (("--gt", gt), ("--pred", pred), ("--images", images)):
            if path is not None and not path.exists():
                raise ValueError(f"{name} {path}: no such file or folder")
        if images is not None:
            if len(prompts) != 1:
                raise ValueError("with videos, --images takes one --prompt TEXT")
            pred = _segment_videos(images, prompts, keep_preds or Path(scratch), model_options)
        assert pred is not None
        report = run_video_eval(gt, pred, threshold, pred_slug)
    for entry in report.errors[:_MAX_ERRORS_SHOWN]:
        typer.echo(f"clipseg: {entry['file']}: {entry['error']}", err=True)
    keys = ("frames", "J", "F", "J&F", "mean_abs_dp", "mean_iou")
    typer.echo(f"# video: {report.ok} sequences evaluated, {report.failed} errors")
    typer.echo("\t".join(("sequence", *keys)))
    for row in report.rows:
        if row["status"] == "ok":
            cells = [str(row["frames"])] + [_fmt(row[key]) for key in keys[1:]]
            typer.echo("\t".join((row["sequence"], *cells)))
    means = report.means()
    typer.echo("\t".join(("mean", str(report.ok), *(_fmt(means[key]) for key in keys[1:]))))
    if json_path is not None:
        from clipseg_cli.io.files import write_json_atomic

        with exit_on_error():
            write_json_atomic(json_path, report.to_json())
        typer.echo(f"clipseg: wrote {json_path}", err=True)
    if report.ok == 0:
        raise fail("no sequence could be evaluated", ExitCode.SOME_FAILED)
    if report.failed:
        raise typer.Exit(int(ExitCode.SOME_FAILED))


def _segment_videos(images: Path, prompts: tuple[str, ...], out: Path, model_options: dict) -> Path:
    """Run ``segment --save soft`` on the videos (a video file, a frame folder, or a folder of
    videos and frame folders) into ``out``; returns ``out``."""
    from clipseg_cli.evaluate.video import is_sequence
    from clipseg_cli.io.video import sniff_video
    from clipseg_cli.run.config import SegmentConfig, VideoOptions
    from clipseg_cli.run.pipeline import run_segment

    if images.is_file() or is_sequence(images):
        inputs = [images]
    else:
        inputs = [
            path
            for path in sorted(images.iterdir())
            if not path.name.startswith(".")
            and ((path.is_file() and sniff_video(path)) or is_sequence(path))
        ]
    config = SegmentConfig(
        inputs=tuple(str(path) for path in inputs),
        out_dir=out,
        prompts=prompts,
        save=("soft",),
        soft_bits=16,
        video=VideoOptions(sequence=any(path.is_dir() for path in inputs)),
        **model_options,
    )
    run_segment(config)
    return out


def _coco_eval(
    gt: Path,
    pred: Path | None,
    images: Path | None,
    prompts: tuple[str, ...],
    json_path: Path | None,
    keep_preds: Path | None,
    **model_options: object,
) -> None:
    """``eval --gt annotations.json``: COCO ground truth, against ``--pred`` (a COCO file as
    ``segment --export coco`` writes it) or the model run on ``--images`` first (through
    ``segment``, with its defaults)."""
    import tempfile

    from clipseg_cli.evaluate.coco import evaluate_coco

    with exit_on_error(), tempfile.TemporaryDirectory(prefix="clipseg-eval-") as scratch:
        if (pred is None) == (images is None):
            raise ValueError("with a COCO --gt file give either --pred coco.json or --images DIR")
        if images is not None:
            if not prompts:
                raise ValueError("--images needs at least one --prompt TEXT")
            pred = _segment_for_coco(images, prompts, keep_preds or Path(scratch), model_options)
        report = evaluate_coco(gt, pred)
    for warning in report.warnings[:_MAX_ERRORS_SHOWN]:
        subject = warning.get("category") or warning.get("prompt") or warning.get("file")
        typer.echo(f"clipseg: warning: {subject}: {warning['warning']}", err=True)
    data = report.to_json()
    rows = [("coco.segm." + k, _fmt(v)) for k, v in report.segm.items()]
    rows += [
        (k, _fmt(data.get(k))) for k in ("iou_fg", "binary_iou", "miou", "precision", "recall")
    ]
    typer.echo(f"# coco: {report.images} images, {len(report.matched_categories)} categories")
    for name, value in rows:
        typer.echo(f"{name}\t{value}")
    if json_path is not None:
        from clipseg_cli.io.files import write_json_atomic

        with exit_on_error():
            write_json_atomic(json_path, data)
        typer.echo(f"clipseg: wrote {json_path}", err=True)


def _segment_for_coco(
    images: Path, prompts: tuple[str, ...], out: Path, model_options: dict
) -> Path:
    """Run ``segment`` on ``images`` with a COCO export into ``out``; the export's path."""
    from clipseg_cli.io.naming import COCO_NAME
    from clipseg_cli.run.config import SegmentConfig
    from clipseg_cli.run.pipeline import run_segment

    config = SegmentConfig(
        inputs=(str(images),), out_dir=out, prompts=prompts, exports=("coco",), **model_options
    )
    run_segment(config)
    return out / COCO_NAME


def _shapes_proxy(scenes: int, first_seed: int, work: Path | None, json_path: Path | None) -> None:
    """``eval --shapes``: run the proxy, print its table, write its JSON."""
    import tempfile

    from clipseg_cli.commands import shapes_proxy

    with exit_on_error():
        if scenes < 1 or first_seed < 0:
            raise ValueError("--scenes must be >= 1 and --first-seed >= 0")
        if work is not None:
            results = shapes_proxy.measure(work, scenes, first_seed)
        else:
            with tempfile.TemporaryDirectory(prefix="clipseg-shapes-") as folder:
                results = shapes_proxy.measure(Path(folder), scenes, first_seed)
    header = ["set", "refine", "tiles", "IoU_FG", "boundary F", "absent coverage", "seconds"]
    keys = ["set", "refine", "tiles", "iou_fg", "boundary_f", "absent_coverage", "seconds"]
    lines = [header] + [
        [_fmt(row[k], 4) if isinstance(row[k], float) and k != "seconds" else str(row[k])
         for k in keys]
        for row in results
    ]  # fmt: skip
    for line in lines:
        typer.echo("\t".join("n/a" if cell == "None" else cell for cell in line))
    if json_path is not None:
        from clipseg_cli.io.files import write_json_atomic

        write_json_atomic(json_path, {"proxy": "shapes", "scenes": scenes,
                                      "first_seed": first_seed, "results": results})  # fmt: skip
        typer.echo(f"clipseg: wrote {json_path}", err=True)


def calibrate_command(
    gt: GtOpt,
    out: Annotated[
        Path, typer.Option("--out", "-o", help="Threshold file (JSON) for segment/matte.")
    ] = Path("clipseg-threshold.json"),
    pred: PredOpt = None,
    images: ImagesOpt = None,
    prompt: o.PromptOpt = None,
    prompts_file: o.PromptsFileOpt = None,
    pred_slug: PredSlugOpt = None,
    metric: Annotated[
        str, typer.Option(help="Metric to maximise: iou_fg, binary_iou or miou.")
    ] = "iou_fg",
    threshold: Annotated[
        float, typer.Option(help="Current threshold, reported for comparison.")
    ] = DEFAULT_THRESHOLD,
    model: o.ModelOpt = DEFAULT_MODEL,
    clip_weights: o.ClipWeightsOpt = None,
    device: o.DeviceOpt = "auto",
    precision: o.PrecisionOpt = "auto",
    batch_size: EvalBatchOpt = 4,
) -> None:
    """Find the threshold that maximises IoU_FG on a labelled set and write it to --out."""
    from clipseg_cli import evaluate

    with exit_on_error():
        if metric not in evaluate.CALIBRATION_METRICS:
            choices = ", ".join(evaluate.CALIBRATION_METRICS)
            raise ValueError(f"--metric {metric}: choose from {choices}")
        config = evaluate.EvalConfig(
            gt_dir=gt,
            pred_dir=pred,
            images_dir=images,
            prompts=o.prompts_from(prompt, prompts_file),
            pred_slug=pred_slug,
            threshold=threshold,
            model=model,
            clip_weights=clip_weights,
            device=device,
            precision=precision,
            batch_size=batch_size,
        )
        report = _run(config)
    if report.ok == 0:
        raise fail("nothing to calibrate on: no pair could be evaluated", ExitCode.SOME_FAILED)
    content = evaluate.calibration(report, metric)
    try:
        evaluate.write_threshold_file(out, content)
    except OSError as error:
        reason = error.strerror or error
        raise fail(f"{out}: cannot write ({reason})", ExitCode.SOME_FAILED) from None
    now = content["at_threshold"][metric]
    typer.echo(
        f"clipseg: best threshold {content['threshold']:g} ({metric} {content[metric]:.4f}; "
        f"{now:.4f} at {threshold:g}) on {report.ok} images; written to {out}",
        err=True,
    )
    typer.echo(f"{content['threshold']:g}")
    if report.failed:
        raise typer.Exit(int(ExitCode.SOME_FAILED))
