"""One ``segment`` / ``matte`` run: list inputs -> lock ``--out`` -> skip finished ones -> embed
the prompts once -> hand the rest to an engine -> record every result -> write the summary.

The pipeline is the only recorder: the log row of each input, then its ledger line, the
counters, the progress callback and the summary are written here and nowhere else. Engines
(:mod:`clipseg_cli.run.engines`) only yield finished results; the pipeline stops one by closing
its generator.

It is torch-free until there is work: a rerun over a finished folder never imports torch or
loads the model. Nothing here prints or exits: progress goes to a callback, problems become log
rows or exceptions (:mod:`clipseg_cli.errors`).
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, TextIO

from clipseg_cli.errors import NoInputsError, disk_full
from clipseg_cli.io import sources
from clipseg_cli.io.files import JsonlLog, remove_stale_temporaries, write_json_atomic
from clipseg_cli.io.naming import EXPORT_PARTS_NAME, STATE_DIR
from clipseg_cli.io.paths import display_path
from clipseg_cli.run import memory
from clipseg_cli.run.config import SegmentConfig
from clipseg_cli.run.inputs import Work, failure_row, plan
from clipseg_cli.run.ledger import Ledger, RunLock, fingerprint
from clipseg_cli.specs import PRECISION_DTYPES
from clipseg_cli.version import __version__

if TYPE_CHECKING:
    from clipseg_cli.run.backend import BackendChoice
    from clipseg_cli.run.promptset import PromptModel, PromptSet
    from clipseg_cli.run.steps import Engine, Finished
    from clipseg_cli.segmenter import Segmenter
    from clipseg_cli.weights import WeightsInfo

__all__ = ["Progress", "RunSummary", "run_segment"]


@dataclass
class Progress:
    """Counts so far, for the CLI's progress display."""

    done: int
    total: int
    ok: int
    failed: int
    elapsed: float


@dataclass
class RunSummary:
    """What a run did; also written as JSON (``details``) next to the log."""

    total: int = 0
    ok: int = 0
    failed: int = 0
    skipped: int = 0
    empty: int = 0
    seconds: float = 0.0
    interrupted: bool = False
    log_path: Path | None = None
    summary_path: Path | None = None
    report_path: Path | None = None
    details: dict = field(default_factory=dict)

    @property
    def images_per_second(self) -> float:
        return self.ok / self.seconds if self.seconds > 0 else 0.0


def run_segment(
    config: SegmentConfig,
    *,
    stdin: TextIO | None = None,
    segmenter: Segmenter | None = None,
    on_progress: Callable[[Progress], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
    on_notice: Callable[[str], None] | None = None,
) -> RunSummary:
    """Run ``clipseg segment`` / ``matte`` end to end, resuming whatever an earlier run in
    ``--out`` did.

    Args:
        config: the run's options.
        stdin: where ``-`` reads paths from (``sys.stdin`` when None).
        segmenter: a loaded model to use instead of loading ``config.model`` (local engine).
        on_progress: called after every recorded input.
        should_stop: asked after every recorded input; True stops the run (the summary says
            ``interrupted``, a rerun resumes).
        on_notice: receives one-line messages for the user while the run starts (the ONNX
            graph being exported once, an emulated ``--precision bf16``, a read-only cache).

    Raises:
        NoInputsError: the inputs named no files.
        LockedError: another run holds ``config.out_dir``.
        ConfigMismatchError: ``out_dir`` holds results of another configuration.
        DiskFullError: outputs could not be written for lack of space (resumable).
        ValueError: a prompt or option problem found while starting (bad ``--ref`` image).
        WeightsError: the model could not be loaded.
    """
    started = time.perf_counter()
    notice = on_notice or (lambda _message: None)
    if config.engine == "ray":
        from clipseg_cli.run.engines.ray import require_ray

        require_ray()  # before anything is locked, loaded or logged
    if config.refine == "sam":
        from clipseg_cli.sam import locate, require_sam

        require_sam()
        locate(config.sam_model)  # offline without it: the one-line error, nothing written
    sources.configure_pillow_limits(config.max_pixels)
    listing = _listing(config, stdin)
    parts = config.fingerprint_parts(__version__)
    summary = RunSummary(
        log_path=config.resolved_log_path, summary_path=config.resolved_summary_path
    )
    with RunLock(config.out_dir):
        removed = remove_stale_temporaries(config.out_dir)
        ledger = Ledger.load(config.out_dir)
        ledger.begin(fingerprint(parts), parts, overwrite=config.overwrite)
        try:
            with JsonlLog(config.resolved_log_path) as log, _parts_log(config) as export_parts:
                recorder = Recorder(summary, log, ledger, on_progress, started)
                recorder.parts = export_parts
                try:
                    todo = recorder.record_planned(listing, config.retry_failed)
                    if todo and not (should_stop and should_stop()):
                        _process(config, todo, recorder, segmenter, should_stop, notice)
                    recorder.details["exports"] = _write_exports(config, ledger, export_parts)
                finally:
                    _write_summary(config, recorder)
        finally:
            ledger.close()
        if config.report:
            from clipseg_cli.io.report import write_report

            summary.report_path = write_report(config.out_dir, config.resolved_log_path)
    summary.details["stale_temporaries_removed"] = removed
    return summary


@contextmanager
def _parts_log(config: SegmentConfig) -> Iterator[JsonlLog | None]:
    """The exports' parts file of ``--out`` (only when the run exports)."""
    if not config.exports:
        yield None
        return
    with JsonlLog(config.out_dir / STATE_DIR / EXPORT_PARTS_NAME) as parts:
        yield parts


def _write_exports(config: SegmentConfig, ledger: Ledger, parts: JsonlLog | None) -> list[str]:
    """Rebuild the exports from the parts of every image the ledger calls ``ok``."""
    if parts is None:
        return []
    from clipseg_cli.io.exports import latest_parts, write_exports

    done = {key for key, entry in ledger.entries.items() if entry.status == "ok"}
    prompts = ledger.noted.get("prompts")
    if prompts is None:  # nothing was ever embedded into this folder: nothing to export
        return []
    written = write_exports(
        config.out_dir,
        config.exports,
        latest_parts(parts.path, done),
        prompts,
        coco_segmentation=config.coco_segmentation,
        yolo_copy=config.yolo_copy,
    )
    return [display_path(path) for path in written]


def _listing(config: SegmentConfig, stdin: TextIO | None) -> sources.InputListing:
    listing = sources.collect_inputs(config.inputs, stdin=stdin, exclude=[config.out_dir])
    if not listing.items:
        problems = listing.missing + [display_path(p) for p, _ in listing.unreadable]
        where = ", ".join(problems) if problems else ", ".join(config.inputs)
        raise NoInputsError(f"no input files found in {where}")
    return listing


class Recorder:
    """The one writer of a run's records: each input's log row, then its ledger line; the
    counters, the progress callback, and what the summary will say."""

    def __init__(
        self,
        summary: RunSummary,
        log: JsonlLog,
        ledger: Ledger,
        on_progress: Callable[[Progress], None] | None,
        started: float,
    ) -> None:
        self.summary = summary
        self.log = log
        self.ledger = ledger
        self.on_progress = on_progress
        self.started = started
        # Unique per run (two runs can start within one second); sorts by start time.
        self.run_id = f"{time.strftime('%Y%m%dT%H%M%S')}-{secrets.token_hex(3)}"
        self.infer_seconds = 0.0
        # The model, prompts and engine of the run, for the summary.
        self.details: dict = {}
        # Each finished image's part of the exports, appended before its ledger line.
        self.parts: JsonlLog | None = None

    def record(self, row: dict, work: Work | None = None) -> None:
        """Log one input's row, then (for a finished input) its ledger line.

        Raises:
            DiskFullError: the log or the ledger cannot be written for lack of space.
        """
        row["run"] = self.run_id
        try:
            self.log.write(row)
            if work is not None and row["status"] in ("ok", "failed"):
                outputs = [output["path"] for output in row["outputs"]]
                self.ledger.record(work.key, work.signature, row["status"], outputs, row["error"])
        except OSError as error:
            stop = disk_full(error, "the log")
            if stop is not None:
                raise stop from None
            raise
        self._count(row)

    def _count(self, row: dict) -> None:
        summary = self.summary
        if row["status"] == "ok":
            summary.ok += 1
            summary.empty += any(p["empty"] for p in row["prompts"])
        elif row["status"] == "failed":
            summary.failed += 1
        else:
            summary.skipped += 1
        if self.on_progress is not None:
            done = summary.ok + summary.failed + summary.skipped
            elapsed = time.perf_counter() - self.started
            self.on_progress(Progress(done, summary.total, summary.ok, summary.failed, elapsed))

    def describe(self, details: dict) -> None:
        """What the run uses (model, prompts, engine): noted in the ledger (the weights' and
        the conditionals' sha256, the prompts' labels) and kept for the summary."""
        self.ledger.note(
            weights_sha256=details["model"]["sha256"],
            embeddings_sha256=details.pop("embeddings_sha256"),
            prompts=[prompt["label"] for prompt in details["prompts"]],
        )
        self.details.update(details)

    def record_finished(self, finished: Finished) -> None:
        """An engine's result: its export part, then its row (log, ledger); its share of model
        time, and what the engine reports."""
        self.details.update(finished.details)
        self.infer_seconds += finished.infer_seconds
        if finished.part is not None and self.parts is not None:
            try:
                self.parts.write(finished.part)
            except OSError as error:
                stop = disk_full(error, "the exports' parts")
                if stop is not None:
                    raise stop from None
                raise
        self.record(finished.row, finished.work)

    def record_planned(self, listing: sources.InputListing, retry_failed: bool) -> list[Work]:
        """Log the inputs that need no work (missing, unreadable, unchanged); the rest to do."""
        todo, done = plan(listing, self.ledger, retry_failed)
        self.summary.total = len(listing.items) + len(listing.missing) + len(listing.unreadable)
        for spec in listing.missing:
            self.record(failure_row(spec, None, "no such file or no match"))
        for folder, reason in listing.unreadable:
            self.record(failure_row(display_path(folder), None, f"unreadable folder: {reason}"))
        for work in done:
            row = failure_row(display_path(work.item.path), work.key, None, "skipped")
            row["reason"] = "unchanged since it was processed"
            self.record(row)
        return todo


def _process(
    config: SegmentConfig,
    todo: list[Work],
    recorder: Recorder,
    segmenter: Segmenter | None,
    should_stop: Callable[[], bool] | None,
    notice: Callable[[str], None],
) -> None:
    """Embed the prompts, then let the engine process ``todo`` while recording its results."""
    # Imported here: numpy, the backends (and torch, when needed) are only paid for when there
    # is work.
    from clipseg_cli.run.backend import ModelOpener, choose_backend, given_model_choice
    from clipseg_cli.run.engines import local
    from clipseg_cli.run.promptset import PromptModel
    from clipseg_cli.run.steps import ItemSteps

    memory.tune_for_loading()
    choice = given_model_choice(segmenter) if segmenter is not None else choose_backend(config)
    for note in choice.notes:
        notice(note)
    if config.refine == "sam":
        from clipseg_cli.sam import refiner_for

        refiner_for(config.sam_model, config.device)  # loaded once, before any image
    prompt_model = PromptModel(config, choice, segmenter)
    prompts = _embed_prompts(config, prompt_model)
    for note in prompt_model.notes:
        notice(note)
    info, arch = prompt_model.identity
    recorder.describe(_describe(config, info, choice, prompts))
    steps = ItemSteps(config, prompts, (arch.input_size, arch.input_size))
    keep = _segmentation_model(config, choice, segmenter, prompt_model)
    prompt_model.segmenter = None  # the towers are freed before the segmentation parts load
    memory.return_freed_memory()
    opener = ModelOpener(config, info.sha256, arch, info.model_id, choice, keep, notice)
    engine: Engine
    if config.engine == "ray":
        from clipseg_cli.run.engines import ray

        engine = ray.process  # actors open their own: the choice is made for their device
        opener = ModelOpener(config, info.sha256, arch, info.model_id, on_progress=notice)
    else:
        engine = local.process
        memory.tune_for_streaming()
    _record_results(engine(todo, steps, opener), recorder, should_stop)


def _segmentation_model(
    config: SegmentConfig,
    choice: BackendChoice,
    segmenter: Segmenter | None,
    prompt_model: PromptModel,
) -> Segmenter | None:
    """A loaded model the local engine segments with, or None to open one: the caller's, or
    the prompt phase's when it is the segmentation parts (loaded to check a
    ``--prompt-embedding`` file) and the torch backend runs. Other towers are let go, so the
    whole model is never resident."""
    if segmenter is not None:
        segmenter.release_prompt_encoders()
        return segmenter
    reusable = config.prompt_embedding is not None and choice.name == "torch"
    return prompt_model.segmenter if reusable and config.engine == "local" else None


def _embed_prompts(config: SegmentConfig, model: PromptModel) -> PromptSet:
    """The run's prompts (float32, on the host), written to ``--save-prompt``."""
    from clipseg_cli.run.promptset import build_prompt_set, save_prompt_set

    prompts = build_prompt_set(model, config)
    if config.save_prompt is not None:
        save_prompt_set(config.save_prompt, prompts, model.identity[0])
    return prompts


def _record_results(
    results: Iterator[Finished], recorder: Recorder, should_stop: Callable[[], bool] | None
) -> None:
    """Record every result; when asked to stop, close the engine after the current one."""
    try:
        for finished in results:
            recorder.record_finished(finished)
            if should_stop is not None and should_stop():
                recorder.summary.interrupted = True
                break
    finally:
        results.close()


def _describe(
    config: SegmentConfig, info: WeightsInfo, choice: BackendChoice, prompts: PromptSet
) -> dict:
    """Which weights, backend and conditionals this run uses (ledger note, run summary); the
    engine's results say again where the model ran."""
    from clipseg_cli.run.promptset import vectors_sha256

    labels = prompts.positives
    return {
        "model": {
            "id": info.model_id,
            "layout": info.layout,
            "variant": info.variant,
            "files": list(info.files),
            "sha256": info.sha256,
        },
        "backend": choice.name,
        "device": choice.device,
        "dtype": PRECISION_DTYPES[choice.precision],
        "engine": config.engine,
        "prompts": [{"label": c.label, "slug": c.slug} for c in labels],
        "negatives": prompts.negatives,
        "labels_legend": {"0": "background"} | {str(i + 1): c.label for i, c in enumerate(labels)},
        "versions": _versions(),
        "embeddings_sha256": vectors_sha256(prompts.vectors),
    }


def _versions() -> dict:
    """Versions of what computed the outputs, from package metadata (nothing is imported)."""
    from importlib import metadata

    versions = {"clipseg_cli": __version__}
    names = {
        "torch": "torch",
        "open_clip": "open_clip_torch",
        "onnxruntime": "onnxruntime",
        "numpy": "numpy",
        "pillow": "pillow",
        "opencv": "opencv-python-headless",
    }
    for name, distribution in names.items():
        try:
            versions[name] = metadata.version(distribution)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def _write_summary(config: SegmentConfig, recorder: Recorder) -> None:
    summary = recorder.summary
    summary.seconds = time.perf_counter() - recorder.started
    summary.details = {
        "command": config.command,
        "run": recorder.run_id,
        "counts": {
            "total": summary.total,
            "ok": summary.ok,
            "failed": summary.failed,
            "skipped": summary.skipped,
            "with_empty_prompt": summary.empty,
        },
        "interrupted": summary.interrupted,
        "seconds": round(summary.seconds, 3),
        "inference_seconds": round(recorder.infer_seconds, 3),
        "images_per_second": round(summary.images_per_second, 3),
        "config": config.describe(),
        **recorder.details,
        "log": display_path(config.resolved_log_path),
        "ledger": display_path(recorder.ledger.path),
    }
    try:
        write_json_atomic(config.resolved_summary_path, summary.details)
    except OSError as error:
        if disk_full(error, "the summary") is None:
            raise
        # Disk full: the summary is the one record we can do without; the log and the ledger
        # already hold every finished input, and the DiskFullError is on its way.
