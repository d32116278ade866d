"""One ``segment`` / ``matte`` / ``watch`` run: list inputs -> lock ``--out`` -> skip finished
ones -> embed the prompts once -> hand the stream of the rest to an engine -> record every
result -> write exports and the summary.

The pipeline is the only recorder: the log row of each input, then its ledger line, the
counters, the progress callback, the exports, the summary and the report are written here and
nowhere else. Engines (:mod:`clipseg_cli.run.engines`) take a stream of work and only yield
finished results. ``watch`` is the same run over a stream that does not end
(:mod:`.watching`); its exports, summary and report are rebuilt every ``flush_every`` seconds
when something was recorded. A stop request ends the stream: the engine finishes and yields
what it holds, and the pipeline records it.

It is torch-free until there is work: a rerun over a finished folder never imports torch or
loads the model. Nothing here prints or exits: progress goes to a callback, problems become log
rows or exceptions (:mod:`clipseg_cli.errors`).
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Callable, Iterable, Iterator
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
from clipseg_cli.run.config import SegmentConfig, instance_floors
from clipseg_cli.run.inputs import Work, failure_row, plan
from clipseg_cli.run.ledger import Ledger, RunLock, fingerprint
from clipseg_cli.run.stages import StageTimes
from clipseg_cli.specs import PRECISION_DTYPES
from clipseg_cli.version import __version__

if TYPE_CHECKING:
    from clipseg_cli.run.backend import BackendChoice
    from clipseg_cli.run.promptset import PromptModel, PromptSet
    from clipseg_cli.run.steps import Engine, Finished, Idle
    from clipseg_cli.run.watching import Follow, InputStream
    from clipseg_cli.segmenter import Segmenter
    from clipseg_cli.weights import WeightsInfo

__all__ = ["Progress", "RunSummary", "run_segment"]


@dataclass
class Progress:
    """Counts so far, for the CLI's progress display."""

    done: int
    total: int  # known so far: a watching run's grows as files arrive
    ok: int
    failed: int
    elapsed: float
    row: dict | None = None  # the input just recorded (None when one was queued)


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
    #: Where the time went (the summary's ``stages``; :mod:`clipseg_cli.run.stages`).
    stages: StageTimes = field(default_factory=StageTimes)

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
    follow: Follow | None = None,
) -> RunSummary:
    """Run ``clipseg segment`` / ``matte`` end to end, resuming whatever an earlier run in
    ``--out`` did; with ``follow``, ``clipseg watch``: the same, then every file that arrives.

    Args:
        config: the run's options.
        stdin: where ``-`` reads paths from (``sys.stdin`` when None).
        segmenter: a loaded model to use instead of loading ``config.model`` (local engine).
        on_progress: called after every recorded (and, watching, every queued) input.
        should_stop: asked between inputs; True ends the stream: the inputs in flight are
            finished and recorded, the summary says ``interrupted``, a rerun resumes.
        on_notice: receives one-line messages for the user while the run starts (the ONNX
            graph being exported once, an emulated ``--precision bf16``, a read-only cache).
        follow: watch the input folders (:class:`~clipseg_cli.run.watching.Follow`) until
            ``should_stop`` says so (or, with ``once``, until the catch-up is done).

    Raises:
        NoInputsError: the inputs named no files (watching: a folder does not exist).
        LockedError: another run holds ``config.out_dir``.
        ConfigMismatchError: ``out_dir`` holds results of another configuration.
        DiskFullError: outputs could not be written for lack of space (resumable).
        ValueError: a prompt or option problem found while starting (bad ``--ref`` image).
        WeightsError: the model could not be loaded.
        WatchError: the folders could not be watched.
    """
    started = time.perf_counter()
    notice = on_notice or (lambda _message: None)
    stop = should_stop or (lambda: False)
    if config.engine == "ray":
        from clipseg_cli.run.engines.ray import require_ray

        require_ray()  # before anything is locked, loaded or logged
    folders = None
    if follow is not None:
        from clipseg_cli.run.watching import watched_folders

        folders = watched_folders(config)
    if config.refine == "sam":
        from clipseg_cli.sam import locate, require_sam

        require_sam()
        locate(config.sam_model)  # offline without it: the one-line error, nothing written
    sources.configure_pillow_limits(config.max_pixels)
    listing = _listing(config, stdin) if follow is None else None
    parts = config.fingerprint_parts(__version__)
    summary = RunSummary(
        log_path=config.resolved_log_path, summary_path=config.resolved_summary_path
    )
    with RunLock(config.out_dir), _input_stream(config, follow, folders) as arrivals:
        if listing is None:  # watching: listed once the watch is on, so nothing falls between
            listing = _listing(config, stdin, allow_empty=True)
        if arrivals is not None:
            notice(arrivals.describe())
        removed = remove_stale_temporaries(config.out_dir)
        ledger = Ledger.load(config.out_dir)
        ledger.begin(fingerprint(parts), parts, overwrite=config.overwrite)
        try:
            with JsonlLog(config.resolved_log_path) as log, _parts_log(config) as export_parts:
                recorder = Recorder(summary, log, ledger, on_progress, started)
                recorder.parts = export_parts
                flusher = Flusher(config, recorder, follow.flush_every if follow else None)
                try:
                    todo = recorder.record_planned(listing, config.retry_failed)
                    stream: Iterable[Work | Idle] = todo
                    live = False  # a stream that may bring more than `todo`
                    if arrivals is not None and follow is not None and folders is not None:
                        recorder.details["watch"] = follow.describe(folders)
                        ready = arrivals.settle_recent(todo)
                        summary.total -= len(todo) - len(ready)  # counted when they settle
                        todo = ready
                        stream = arrivals.works(todo, ledger, recorder.queued)
                        live = not follow.once or arrivals.files.pending > 0
                    if (todo or live) and not stop():
                        _process(config, stream, recorder, segmenter, stop, notice, flusher)
                    flusher.write_exports()
                finally:
                    _write_summary(config, recorder)
        finally:
            ledger.close()
        if config.report:
            summary.report_path = flusher.write_report()
    summary.details["stale_temporaries_removed"] = removed
    return summary


@contextmanager
def _input_stream(
    config: SegmentConfig, follow: Follow | None, folders: list[Path] | None
) -> Iterator[InputStream | None]:
    """The watched folders' stream of inputs, listening while the run lasts (None: segment)."""
    if follow is None or folders is None:
        yield None
        return
    from clipseg_cli.run.watching import InputStream

    with InputStream(config, follow, folders) as stream:
        yield stream


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
        floors=instance_floors(config),
    )
    return [display_path(path) for path in written]


def _listing(
    config: SegmentConfig, stdin: TextIO | None, allow_empty: bool = False
) -> sources.InputListing:
    listing = sources.collect_inputs(
        config.inputs,
        stdin=stdin,
        exclude=[config.out_dir],
        folders_as_items=config.video.sequence,
    )
    if not listing.items and not allow_empty:
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
        self.recorded = 0  # rows written so far
        # Per prompt: instances made and objects dropped by each floor, over this run's images.
        self.instances: dict[str, dict] = {}

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
            for prompt in row["prompts"]:
                _add_instance_counts(self.instances, prompt)
        elif row["status"] == "failed":
            summary.failed += 1
        else:
            summary.skipped += 1
        self.recorded += 1
        self._progress(row)

    def queued(self, count: int) -> None:
        """``count`` more inputs arrived (a watching run's total grows)."""
        if count:
            self.summary.total += count
            self._progress(None)

    def _progress(self, row: dict | None) -> None:
        if self.on_progress is None:
            return
        summary = self.summary
        done = summary.ok + summary.failed + summary.skipped
        elapsed = time.perf_counter() - self.started
        self.on_progress(
            Progress(done, summary.total, summary.ok, summary.failed, elapsed, row=row)
        )

    def describe(self, details: dict) -> None:
        """What the run uses (model, prompts, engine): noted in the ledger (the weights' and
        the conditionals' sha256, the prompts' labels) and kept for the summary."""
        self.ledger.note(
            weights_sha256=details["model"]["sha256"],
            embeddings_sha256=details.pop("embeddings_sha256"),
            prompts=[prompt["label"] for prompt in details["prompts"]],
            precision=details["precision"],
            backend=details["backend"],
        )
        self.details.update(details)

    def record_finished(self, finished: Finished) -> None:
        """An engine's result: its export part, then its row (log, ledger); its share of model
        time, and what the engine reports."""
        self.details.update(finished.details)
        self.infer_seconds += finished.infer_seconds
        self.summary.stages.add(finished)
        if finished.row["status"] == "frame":  # a video's frame (run.frames): not an input
            if "segment" in finished.row:
                work = finished.work
                self.ledger.record_segment(work.key, work.signature, finished.row["segment"])
            return
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


def _add_instance_counts(totals: dict[str, dict], prompt: dict) -> None:
    """Add one log row's counts of a prompt (``instances``, ``dropped``; a row without them
    adds nothing) to the run's."""
    total = totals.setdefault(
        prompt["prompt"], {"instances": 0, "dropped": {"min_area": 0, "min_score": 0, "cap": 0}}
    )
    total["instances"] += prompt.get("instances", 0)
    for floor, count in prompt.get("dropped", {}).items():
        total["dropped"][floor] += count


def _process(
    config: SegmentConfig,
    todo: Iterable[Work | Idle],
    recorder: Recorder,
    segmenter: Segmenter | None,
    stop: Callable[[], bool],
    notice: Callable[[str], None],
    flusher: Flusher,
) -> None:
    """Embed the prompts, then let the engine process the stream ``todo`` while recording its
    results."""
    # Imported here: numpy, the backends (and torch, when needed) are only paid for when there
    # is work.
    from clipseg_cli.run.backend import (
        ModelOpener,
        choose_backend,
        given_model_choice,
        kept_choice,
    )
    from clipseg_cli.run.engines import local
    from clipseg_cli.run.promptset import PromptModel
    from clipseg_cli.run.steps import ItemSteps

    memory.tune_for_loading()
    if segmenter is not None:
        choice = given_model_choice(segmenter)
    else:
        choice = choose_backend(config)
        kept = recorder.ledger.noted.get("precision")
        choice = kept_choice(choice, kept, recorder.ledger.noted.get("backend"))
        if kept is not None and config.precision == "auto" and choice.device == "cpu":
            notice(f"continuing this --out folder in {kept}, the precision its masks were made in")
    for note in choice.notes:
        notice(note)
    if config.refine == "sam":
        from clipseg_cli.sam import refiner_for

        refiner_for(config.sam_model, config.device)  # loaded once, before any image
    prompt_model = PromptModel(config, choice, segmenter, on_progress=notice)
    info, arch = prompt_model.identity
    # A prompt file costs nothing to read: it is checked against the weights before a backend
    # is measured, so one made with other weights is refused at once, not after an export.
    from_file = (
        _embed_prompts(config, prompt_model) if config.prompt_embedding is not None else None
    )
    if not choice.settled:  # measured on this machine once, then read from the tuning cache
        choice = ModelOpener(config, info.sha256, arch, info.model_id, on_progress=notice).settle(
            choice
        )
    prompts = from_file if from_file is not None else _embed_prompts(config, prompt_model)
    for note in prompt_model.notes:
        notice(note)
    recorder.describe(_describe(config, info, choice, prompts))
    steps = ItemSteps(config, prompts, (arch.input_size, arch.input_size))
    keep = _segmentation_model(config, choice, segmenter, prompt_model)
    prompt_model.segmenter = None  # the towers are freed before the segmentation parts load
    memory.return_freed_memory()
    opener = ModelOpener(config, info.sha256, arch, info.model_id, choice, keep, notice)
    engine: Engine
    if config.engine == "ray":
        from clipseg_cli.run.engines import ray

        engine = ray.process  # actors open their own: GPU actors choose for their device
        cpu_choice = choice if choice.device == "cpu" else None
        opener = ModelOpener(config, info.sha256, arch, info.model_id, cpu_choice, None, notice)
    else:
        engine = local.process
        memory.tune_for_streaming()
    if config.engine == "local":
        from clipseg_cli.run.frames import expand

        todo = expand(iter(todo), config, recorder.ledger)  # a video: its frames, decoded as due
    results = engine(_until_stopped(todo, stop), steps, opener)
    # The local engine finishes what it holds once the stream ends; Ray's execution is closed.
    _record_results(results, recorder, stop, flusher, drains=config.engine == "local")


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


def _until_stopped(todo: Iterable[Work | Idle], stop: Callable[[], bool]) -> Iterator[Work | Idle]:
    """The stream, ended early when a stop is asked for (closing it stops a watch)."""
    stream = iter(todo)
    try:
        for entry in stream:
            if stop():
                return
            yield entry
    finally:
        close = getattr(stream, "close", None)
        if close is not None:
            close()


def _record_results(
    results: Iterator[Finished | Idle],
    recorder: Recorder,
    stop: Callable[[], bool],
    flusher: Flusher,
    drains: bool,
) -> None:
    """Record every result, rebuilding exports and the summary when they are due. A stop
    request ends the stream; a draining engine then yields what it had in flight, and the
    others are closed after the current result."""
    from clipseg_cli.run.steps import IDLE

    try:
        for finished in results:
            if finished is not IDLE:
                recorder.record_finished(finished)
            if stop():
                recorder.summary.interrupted = True
                if not drains:
                    break
            flusher.when_due()
        if stop():  # the stream ended for it: the engine finished what it held
            recorder.summary.interrupted = True
    finally:
        results.close()


class Flusher:
    """Exports, summary and review page, rebuilt atomically from the ledger and the log: at the
    end of a run, and while it runs at most every ``every`` seconds when rows were recorded."""

    def __init__(self, config: SegmentConfig, recorder: Recorder, every: float | None) -> None:
        self.config = config
        self.recorder = recorder
        self.every = every
        self._flushed_at = time.monotonic()
        self._recorded = recorder.recorded

    def when_due(self) -> None:
        """Rebuild everything if ``every`` seconds have passed and something was recorded."""
        if self.every is None or self.recorder.recorded == self._recorded:
            return
        if time.monotonic() - self._flushed_at < self.every:
            return
        self.write_exports()
        _write_summary(self.config, self.recorder)
        if self.config.report:
            self.write_report()
        self._flushed_at = time.monotonic()
        self._recorded = self.recorder.recorded

    def write_exports(self) -> None:
        recorder = self.recorder
        recorder.details["exports"] = _write_exports(self.config, recorder.ledger, recorder.parts)

    def write_report(self) -> Path:
        from clipseg_cli.io.report import write_report

        return write_report(self.config.out_dir, self.config.resolved_log_path)


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
        "precision": choice.precision,
        "dtype": PRECISION_DTYPES[choice.precision],
        # How a CPU backend was chosen: measured now or read from the tuning cache, with the
        # candidates' timings and agreement (None when it was named or is torch's).
        "backend_choice": choice.tuning,
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
        "openvino": "openvino",
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
        "stages": summary.stages.report(),
        "images_per_second": round(summary.images_per_second, 3),
        "config": config.describe(),
        "instances": recorder.instances,
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
