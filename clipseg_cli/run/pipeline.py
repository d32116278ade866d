"""The local segment run: list inputs -> skip finished ones -> decode workers -> batched model ->
writer threads -> log and ledger.

Per-item logic lives in :mod:`clipseg_cli.items` (shared with other engines); this module only
schedules it, with bounded queues so memory stays flat whatever the number of inputs, and on
a CPU lets the model run alone on the cores (:mod:`clipseg_cli.cpu_gate`). It is
torch-free until there is work: a rerun over a finished folder never imports torch or loads
the model. Nothing here prints or exits: progress goes to a callback, problems become log rows
or exceptions (:mod:`clipseg_cli.errors`, :mod:`clipseg_cli.ledger`).
"""

from __future__ import annotations

import secrets
import time
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, TextIO, TypeVar

from clipseg_cli.errors import FATAL_WRITE_ERRNOS, DiskFullError, NoInputsError
from clipseg_cli.io import sources, writers
from clipseg_cli.run.config import SegmentConfig
from clipseg_cli.run.engines.cpu_gate import CpuGate, gate_for
from clipseg_cli.run.ledger import InputSignature, Ledger, RunLock, fingerprint
from clipseg_cli.run.logrows import failure_row
from clipseg_cli.version import __version__

if TYPE_CHECKING:
    from clipseg_cli.run import items
    from clipseg_cli.run.items import Failed, Prepared
    from clipseg_cli.segmenter import Segmenter

T = TypeVar("T")

__all__ = ["DiskFullError", "NoInputsError", "Progress", "RunSummary", "run_segment"]


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


@dataclass
class _Work:
    """One input to process, with what the ledger needs to record it."""

    item: sources.InputItem
    key: str  # display form of item.key: the ledger's and the log's key
    signature: InputSignature


def _listing(config: SegmentConfig, stdin: TextIO | None) -> sources.InputListing:
    listing = sources.collect_inputs(config.inputs, stdin=stdin, exclude=[config.out_dir])
    if not listing.items:
        problems = listing.missing + [sources.display_path(p) for p, _ in listing.unreadable]
        where = ", ".join(problems) if problems else ", ".join(config.inputs)
        raise NoInputsError(f"no input files found in {where}")
    return listing


def _plan(
    listing: sources.InputListing, ledger: Ledger, retry_failed: bool
) -> tuple[list[_Work], list[_Work]]:
    """Split inputs into (to do, already done and unchanged)."""
    todo, done = [], []
    for item in listing.items:
        key = sources.display_path(item.key)
        work = _Work(item, key, InputSignature.of(item.path))
        (done if ledger.is_done(key, work.signature, retry_failed) else todo).append(work)
    return todo, done


def run_segment(
    config: SegmentConfig,
    *,
    stdin: TextIO | None = None,
    segmenter: Segmenter | None = None,
    on_progress: Callable[[Progress], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> RunSummary:
    """Run ``clipseg segment`` end to end, resuming whatever an earlier run in ``--out`` did.

    Raises:
        NoInputsError: the inputs named no files.
        LockedError: another run holds ``config.out_dir``.
        ConfigMismatchError: ``out_dir`` holds results of another configuration.
        DiskFullError: outputs could not be written for lack of space (resumable).
        ValueError: a prompt or option problem found while starting (bad ``--ref`` image).
        WeightsError: the model could not be loaded.
    """
    started = time.perf_counter()
    if config.engine == "ray":
        from clipseg_cli.run.engines.ray import require_ray

        require_ray()  # before anything is locked, loaded or logged
    sources.configure_pillow_limits(config.max_pixels)
    listing = _listing(config, stdin)
    parts = config.fingerprint_parts(__version__)
    summary = RunSummary(
        log_path=config.resolved_log_path, summary_path=config.resolved_summary_path
    )
    # Unique per run (two runs can start within one second); sorts by start time.
    run_id = f"{time.strftime('%Y%m%dT%H%M%S')}-{secrets.token_hex(3)}"
    with RunLock(config.out_dir):
        removed = writers.remove_stale_temporaries(config.out_dir)
        ledger = Ledger.load(config.out_dir)
        ledger.begin(fingerprint(parts), parts, overwrite=config.overwrite)
        try:
            with writers.JsonlLog(config.resolved_log_path) as log:
                _Run(config, summary, log, ledger, run_id, on_progress, should_stop).execute(
                    listing, segmenter, started
                )
        finally:
            ledger.close()
        if config.report:
            from clipseg_cli.io.report import write_report

            summary.report_path = write_report(config.out_dir, config.resolved_log_path)
    summary.details["stale_temporaries_removed"] = removed
    return summary


class _Run:
    """State of one run: counters, the log, the ledger, and the scheduling loop."""

    def __init__(
        self,
        config: SegmentConfig,
        summary: RunSummary,
        log: writers.JsonlLog,
        ledger: Ledger,
        run_id: str,
        on_progress: Callable[[Progress], None] | None,
        should_stop: Callable[[], bool] | None,
    ) -> None:
        self.config = config
        self.summary = summary
        self.log = log
        self.ledger = ledger
        self.run_id = run_id
        self.on_progress = on_progress
        self.should_stop = should_stop or (lambda: False)
        self.started = 0.0
        self.infer_seconds = 0.0
        self.model_details: dict = {}

    # -- bookkeeping ----------------------------------------------------------------------------

    def record(self, row: dict, work: _Work | None = None) -> None:
        """Log one input's row, then (for a finished input) its ledger line."""
        row["run"] = self.run_id
        try:
            self.log.write(row)
            if work is not None and row["status"] in ("ok", "failed"):
                outputs = [output["path"] for output in row["outputs"]]
                self.ledger.record(work.key, work.signature, row["status"], outputs, row["error"])
        except OSError as error:
            if error.errno in FATAL_WRITE_ERRNOS:
                raise DiskFullError(
                    error.errno, f"cannot write the log: {error.strerror}"
                ) from None
            raise
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

    def execute(
        self, listing: sources.InputListing, segmenter: Segmenter | None, started: float
    ) -> None:
        self.started = started
        todo, done = _plan(listing, self.ledger, self.config.retry_failed)
        self.summary.total = len(listing.items) + len(listing.missing) + len(listing.unreadable)
        for spec in listing.missing:
            self.record(failure_row(spec, None, "no such file or no match"))
        for folder, reason in listing.unreadable:
            path = sources.display_path(folder)
            self.record(failure_row(path, None, f"unreadable folder: {reason}"))
        for work in done:
            row = failure_row(sources.display_path(work.item.path), work.key, None, "skipped")
            row["reason"] = "unchanged since it was processed"
            self.record(row)
        try:
            if todo and not self.should_stop():
                self._process(todo, segmenter)
        finally:
            self._write_summary()

    # -- the streaming loop ---------------------------------------------------------------------

    def _process(self, todo: list[_Work], segmenter: Segmenter | None) -> None:
        # Imported here: torch and the model are only paid for when there is work.
        from clipseg_cli.segmenter import Segmenter

        config = self.config
        _tune_malloc_for_loading()
        if config.engine == "ray":
            # Actors load their own model; the driver only embeds the prompts.
            prompter, prompts = self._prompts(Segmenter, segmenter)
            self._describe(prompter, prompts)
            input_size = prompter.input_size
            del prompter
            _return_freed_memory()
            from clipseg_cli.run.engines.ray import process_with_ray

            process_with_ray(self, todo, prompts, input_size)
            return
        if segmenter is None:
            prompter, prompts = self._prompts(Segmenter, None)
            if config.prompt_embedding is not None:
                segmenter = prompter  # already the segmentation parts
            else:
                del prompter
                _return_freed_memory()
                segmenter = self._load(Segmenter, frozenset({"vision", "decoder"}))
        else:
            _, prompts = self._prompts(Segmenter, segmenter)
            segmenter.release_prompt_encoders()
        self._describe(segmenter, prompts)
        _tune_malloc_for_streaming()
        self._stream_local(todo, segmenter, prompts)

    def _prompts(self, segmenter_class: type[Segmenter], segmenter: Segmenter | None):
        """(the segmenter that embedded them, the run's PromptSet), written to --save-prompt.

        Without a given segmenter, only the parts prompts need are loaded (text tower, or the
        full image tower for --ref), so peak memory is this phase or the segmentation phase
        (vision blocks up to the last one read + decoder), never the whole model.
        """
        from clipseg_cli.run import items

        config = self.config
        if segmenter is None:
            parts = {"text"} if config.prompts or config.negatives else set()
            if config.refs:
                parts |= {"vision", "image_head"}
            if config.prompt_embedding is not None:
                parts = {"vision", "decoder"}  # to check the file against these weights
            segmenter = self._load(segmenter_class, frozenset(parts))
        prompts = items.build_prompt_set(segmenter, config)
        if config.save_prompt is not None:
            items.save_prompt_set(config.save_prompt, prompts, segmenter.info)
        return segmenter, prompts

    def _describe(self, segmenter: Segmenter, prompts: items.PromptSet) -> None:
        """Record which weights and conditionals this run uses (ledger note, run summary)."""
        from clipseg_cli.run import items

        labels = prompts.positives
        self.ledger.note(
            weights_sha256=segmenter.info.sha256,
            embeddings_sha256=items.tensor_sha256(prompts.vectors),
        )
        self.model_details = {
            "model": {
                "id": segmenter.info.model_id,
                "layout": segmenter.info.layout,
                "variant": segmenter.info.variant,
                "files": list(segmenter.info.files),
                "sha256": segmenter.info.sha256,
            },
            "device": str(segmenter.device),
            "dtype": str(segmenter.dtype).removeprefix("torch."),
            "engine": self.config.engine,
            "prompts": [{"label": c.label, "slug": c.slug} for c in labels],
            "negatives": prompts.negatives,
            "labels_legend": {"0": "background"}
            | {str(i + 1): c.label for i, c in enumerate(labels)},
            "versions": items.versions(),
        }

    def _stream_local(
        self, todo: list[_Work], segmenter: Segmenter, prompts: items.PromptSet
    ) -> None:
        """Decode workers -> batched model -> writer threads, all bounded."""
        from clipseg_cli.run import items

        config = self.config
        prompts.vectors = prompts.vectors.to(segmenter.device)
        labels = prompts.positives
        batch_size = config.batch_size_for(segmenter.device.type)
        self.model_details["batch_size"] = batch_size
        out_keys = writers.casefold_collisions(work.item.key for work in todo)
        by_key = {work.item.key: work for work in todo}
        writes: deque[tuple[Future, _Work]] = deque()
        gate = gate_for(segmenter.device.type)
        write = gate.sharing(items.write_or_fail)

        def drain(limit: int) -> None:
            # Rows are logged in input order; unfinished writes (and the images they hold) are
            # bounded by `limit`.
            while len(writes) > limit:
                future, work = writes.popleft()
                self.record(future.result(), work)

        with (
            ThreadPoolExecutor(config.workers, thread_name_prefix="decode") as decoders,
            ThreadPoolExecutor(config.writer_threads, thread_name_prefix="write") as writer_pool,
        ):
            stream = self._prepared_stream(
                todo, out_keys, segmenter.input_size, decoders, batch_size + config.workers, gate
            )
            try:
                for batch, failures in _one_ahead(_batches(stream, batch_size)):
                    for failed in failures:
                        writes.append((_done(items.failure_for(failed)), by_key[failed.item.key]))
                    if batch:
                        with gate.exclusive():
                            start = time.perf_counter()
                            results = items.predict_batch(
                                segmenter, batch, prompts, pad_to=batch_size
                            )
                            self.infer_seconds += time.perf_counter() - start
                        for prepared, prediction in zip(batch, results, strict=True):
                            future = writer_pool.submit(write, prepared, prediction, config, labels)
                            writes.append((future, by_key[prepared.item.key]))
                    drain(batch_size + config.writer_threads)
                    if self.should_stop():
                        self.summary.interrupted = True
                        break
                drain(0)
            finally:
                stream.close()  # stops submitting decodes; pending ones are cancelled below
                decoders.shutdown(wait=True, cancel_futures=True)

    def _load(self, segmenter_class: type[Segmenter], components: frozenset[str]) -> Segmenter:
        config = self.config
        return segmenter_class.load(
            config.model,
            clip_weights=config.clip_weights,
            device=config.device,
            precision=config.precision,
            components=components,
        )

    def _prepared_stream(
        self,
        todo: list[_Work],
        out_keys: dict,
        size: tuple[int, int],
        pool: ThreadPoolExecutor,
        ahead: int,
        gate: CpuGate,
    ) -> Iterator[Prepared | Failed]:
        """Decode in the pool, yield in input order, at most ``ahead`` decodes in flight."""
        from clipseg_cli.run.items import prepare_item

        config = self.config
        prepare_item = gate.sharing(prepare_item)
        pending: deque[Future] = deque()
        try:
            for work in todo:
                key = work.item.key
                pending.append(pool.submit(prepare_item, work.item, out_keys[key], config, size))
                if len(pending) >= ahead:
                    yield pending.popleft().result()
            while pending:
                yield pending.popleft().result()
        finally:
            for future in pending:
                future.cancel()

    def _write_summary(self) -> None:
        summary, config = self.summary, self.config
        summary.seconds = time.perf_counter() - self.started
        summary.details = {
            "command": config.command,
            "run": self.run_id,
            "counts": {
                "total": summary.total,
                "ok": summary.ok,
                "failed": summary.failed,
                "skipped": summary.skipped,
                "with_empty_prompt": summary.empty,
            },
            "interrupted": summary.interrupted,
            "seconds": round(summary.seconds, 3),
            "inference_seconds": round(self.infer_seconds, 3),
            "images_per_second": round(summary.images_per_second, 3),
            "config": config.describe(),
            **self.model_details,
            "log": sources.display_path(config.resolved_log_path),
            "ledger": sources.display_path(self.ledger.path),
        }
        try:
            writers.write_json_atomic(config.resolved_summary_path, summary.details)
        except OSError as error:
            if error.errno not in FATAL_WRITE_ERRNOS:
                raise
            # Disk full: the summary is the one record we can do without; the log and the
            # ledger already hold every finished input, and the DiskFullError is on its way.


def _batches(stream: Iterator[Prepared | Failed], size: int) -> Iterator[tuple[list, list]]:
    """Group prepared items into model batches; failures pass through with the next batch."""
    from clipseg_cli.run.items import Failed

    batch: list[Prepared] = []
    failures: list[Failed] = []
    for entry in stream:
        if isinstance(entry, Failed):
            failures.append(entry)
            continue
        batch.append(entry)
        if len(batch) == size:
            yield batch, failures
            batch, failures = [], []
    if batch or failures:
        yield batch, failures


def _one_ahead(batches: Iterator[T]) -> Iterator[T]:
    """Yield each batch once the next one is decoded too.

    On a CPU the model holds the cores alone (:mod:`clipseg_cli.cpu_gate`): decoding the next
    batch before the model starts on this one lets it run alongside the previous batch's
    writes, instead of after the model, on cores the model would then leave idle."""
    previous = next(batches, None)
    if previous is None:
        return
    for batch in batches:
        yield previous
        previous = batch
    yield previous


def _mallopt(parameter: int, value: int) -> None:
    import ctypes

    try:
        ctypes.CDLL("libc.so.6").mallopt(parameter, value)
    except (OSError, AttributeError):
        return  # not glibc (macOS, musl): nothing to tune, the allocator does its own thing


_M_MMAP_THRESHOLD, _M_ARENA_MAX = -3, -8  # glibc's mallopt parameter numbers


def _tune_malloc_for_loading(arenas: int = 2) -> None:
    """Tune glibc's malloc while the model loads.

    Cap per-thread arenas: decode, write and torch threads each allocating multi-MB images would
    otherwise each grow and keep an arena, and resident memory would creep up with the thread
    count rather than stay at what the pipeline holds. A low fixed mmap threshold puts every
    weight-sized temporary of loading in its own mapping, returned to the OS when freed, so
    the loading phase leaves no holes in the heap."""
    _mallopt(_M_ARENA_MAX, arenas)
    _mallopt(_M_MMAP_THRESHOLD, 1 << 20)


def _tune_malloc_for_streaming() -> None:
    """Serve activations and image buffers (all under 32 MiB) from the heap while streaming.

    With the loading phase's 1 MiB threshold every activation of every forward pass is a fresh
    mapping whose pages fault in and are zeroed again: that doubled the model's time (0.117 ->
    0.225 s per image, bf16, 5 prompts, 2 cores). Reused heap memory stays flat over the run
    (README, Benchmarks: 1000 images)."""
    _mallopt(_M_MMAP_THRESHOLD, 32 << 20)


def _return_freed_memory() -> None:
    """Give freed model memory back to the OS now (glibc keeps large freed heaps otherwise, and
    the prompt phase's towers would count towards the segmentation phase's resident size)."""
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        return  # not glibc (macOS, musl): nothing to trim, the allocator does its own thing


def _done(row: dict) -> Future:
    future: Future = Future()
    future.set_result(row)
    return future
