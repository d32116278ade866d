"""The local engine: decode threads -> batched model -> writer threads, on this machine.

Bounded everywhere, so memory stays flat whatever the length of the stream: at most ``batch_size
+ workers`` decodes and ``batch_size + writer_threads`` writes are in flight. Results come out
in input order. A model batch holds up to ``batch_size`` images; when the stream says nothing
more is ready (:data:`~clipseg_cli.run.steps.IDLE`), the images it holds run at once in a
shorter batch (padded, so their numbers do not depend on the grouping), and the model's batch
sizes are reported with every result (``model_batches``). On a CPU the model runs alone on the
cores (:mod:`.cpu_gate`): decode and write tasks wait for it, and the next batch is decoded
before the model starts on this one, so it overlaps the previous batch's writes. Writes start
in waves of ``writer_threads``: a batch's write waits for the next batch's model call (unless
nothing more is ready), so that the writes run side by side on the cores between two model
calls instead of one at a time with a core idle while the model waits for it.

Each result says how long the model stood idle since the previous one, and for what
(:attr:`~clipseg_cli.run.steps.Finished.waited`): the loop that feeds the model is either in a
model call or blocked on exactly one thing, timed where it blocks: a decode still running
(``decode``; also when decode tasks hold the cores the model waits for), a write slot
(``write``: the bounded backlog is full, or writes hold the cores), the input stream
(``input``: a watch waiting for files, a video's frames being demuxed) or the pipeline
recording a result (``record``).

An engine of :mod:`clipseg_cli.run.steps`: it never sees the run's state."""

from __future__ import annotations

import threading
import time
from collections import Counter, deque
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from typing import TypeVar

from clipseg_cli.run.backend import ModelOpener
from clipseg_cli.run.engines.cpu_gate import NO_GATE, CpuGate, gate_for
from clipseg_cli.run.items import Failed, Prediction, Prepared, Work, Written
from clipseg_cli.run.steps import IDLE, Finished, Idle, ItemSteps

T = TypeVar("T")


def process(
    todo: Iterator[Work | Idle], steps: ItemSteps, open_model: ModelOpener
) -> Iterator[Finished | Idle]:
    """Process the stream ``todo`` on this machine; one :class:`Finished` per input, in input
    order, and :data:`IDLE` back for each :data:`IDLE` of the stream once all before it is done.

    Raises:
        DiskFullError: outputs could not be written for lack of space (resumable).
    """
    model = open_model()
    config = steps.config
    batch_size = config.batch_size_for(model.device_type)
    details = {**model.details, "batch_size": batch_size}
    sizes: Counter[int] = Counter()  # images per model call -> calls
    gate = gate_for(model.device_type)
    waits = _Waits()

    def write(prepared: Prepared, prediction: Prediction, started: threading.Event) -> Written:
        @contextmanager
        def cores() -> Iterator[None]:
            with gate.shared("write"):
                started.set()
                yield

        try:
            return steps.write(prepared, prediction, cores)
        finally:
            started.set()  # also when it never needed the cores (a failed video's frame)

    # (future of the row, the work, its share of the model's time); rows leave in input order.
    writes: deque[tuple[Future, Work, float]] = deque()
    # Predictions whose writes wait for company: a wave of writes fills the cores at once
    # (GPU runs: the model does not need the cores, writes start at once).
    wave = config.writer_threads if gate is not NO_GATE else 1
    held: list[tuple[Prepared, Prediction, float]] = []

    def finished(limit: int) -> Iterator[Finished]:
        # Unfinished writes (and the images they hold) are bounded by `limit`.
        while len(writes) > limit:
            future, work, seconds = writes.popleft()
            with waits.on("write"):
                written = future.result()
            reported = {**details, "model_batches": _batch_report(sizes)}
            result = Finished(work, written.row, seconds, reported, written.part, waits.take())
            with waits.on("record"):  # the pipeline records it before asking for more
                yield result

    with (
        ThreadPoolExecutor(config.workers, thread_name_prefix="decode") as decoders,
        ThreadPoolExecutor(config.writer_threads, thread_name_prefix="write") as writers,
    ):
        stream = _prepared(todo, steps, decoders, batch_size + config.workers, gate, waits)
        rows = steps.rows(batch_size)

        model_seconds: dict[int, float] = {}  # per image, summed over its rows

        def start_writes() -> None:
            started = []
            for prepared, prediction, seconds in held:
                started.append(threading.Event())
                future = writers.submit(write, prepared, prediction, started[-1])
                writes.append((future, prepared.work, seconds))
            held.clear()
            # The wave holds the cores before the model asks for them again: a model call that
            # came first would make the writes of the wave run one at a time after all.
            with waits.on("write"):
                for event in started:
                    event.wait()

        def predict(final: bool) -> None:
            # Full model batches of rows (an image's whole view, then its tiles); a short one,
            # padded to the batch size, only when nothing more is coming for now.
            while len(rows) >= batch_size or (final and len(rows)):
                taken = rows.next_rows()
                pixels = [prepared.model_inputs[index] for prepared, index in taken]
                asked = time.perf_counter()
                with gate.exclusive() as holder:
                    start = time.perf_counter()
                    if holder is not None:  # decode or write tasks held the cores
                        waits.add(holder, start - asked)
                    logits = steps.predict(model.backend, pixels, pad_to=batch_size)
                    share = (time.perf_counter() - start) / len(taken)
                sizes[len({id(prepared) for prepared, _index in taken})] += 1
                for prepared, _index in taken:
                    model_seconds[id(prepared)] = model_seconds.get(id(prepared), 0.0) + share
                for prepared, prediction in rows.accept(taken, logits):
                    held.append((prepared, prediction, model_seconds.pop(id(prepared))))
                if len(held) >= wave:
                    start_writes()
            if final:
                start_writes()

        try:
            for entry in _one_ahead(_batches(stream, batch_size)):
                if entry is IDLE:
                    predict(final=True)
                    yield from finished(0)
                    with waits.on("record"):
                        yield IDLE
                    continue
                batch, failures = entry
                if failures:
                    start_writes()  # results leave in input order
                for failed in failures:
                    writes.append((_done(Written(steps.fail(failed))), failed.work, 0.0))
                for prepared in batch:
                    rows.add(prepared)
                predict(final=False)
                yield from finished(batch_size + config.writer_threads)
            predict(final=True)
            yield from finished(0)
        finally:
            stream.close()  # stops submitting decodes; pending ones are cancelled below
            decoders.shutdown(wait=True, cancel_futures=True)


def _batch_report(sizes: Counter[int]) -> dict:
    """How full the model's batches were: calls, images per call (mean), calls by size."""
    calls = sum(sizes.values())
    images = sum(size * count for size, count in sizes.items())
    return {
        "calls": calls,
        "mean_images": round(images / calls, 3) if calls else 0.0,
        "sizes": {str(size): sizes[size] for size in sorted(sizes)},
    }


class _Waits:
    """Seconds the model's loop was blocked, by reason, since they were last taken."""

    def __init__(self) -> None:
        self._seconds: dict[str, float] = {}

    def add(self, reason: str, seconds: float) -> None:
        self._seconds[reason] = self._seconds.get(reason, 0.0) + seconds

    @contextmanager
    def on(self, reason: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.add(reason, time.perf_counter() - start)

    def take(self) -> dict[str, float]:
        taken, self._seconds = self._seconds, {}
        return taken


def _prepared(
    todo: Iterator[Work | Idle],
    steps: ItemSteps,
    pool: ThreadPoolExecutor,
    ahead: int,
    gate: CpuGate,
    waits: _Waits,
) -> Iterator[Prepared | Failed | Idle]:
    """Decode in the pool, yield in input order, at most ``ahead`` decodes in flight; at
    :data:`IDLE`, everything decoded so far, then :data:`IDLE`. Time spent waiting for the
    stream or for a decode is added to ``waits`` (``input``, ``decode``)."""
    prepare = gate.sharing(steps.prepare, "decode")
    pending: deque[Future] = deque()

    def oldest() -> Prepared | Failed:
        with waits.on("decode"):
            return pending.popleft().result()

    stream = iter(todo)
    try:
        while True:
            with waits.on("input"):
                work = next(stream, None)
            if work is None:
                break
            if work is IDLE:
                while pending:
                    yield oldest()
                yield IDLE
                continue
            pending.append(pool.submit(prepare, work))
            if len(pending) >= ahead:
                yield oldest()
        while pending:
            yield oldest()
    finally:
        for future in pending:
            future.cancel()


def _batches(
    stream: Iterator[Prepared | Failed | Idle], size: int
) -> Iterator[tuple[list[Prepared], list[Failed]] | Idle]:
    """Group prepared items into model batches; failures pass through with the next batch. At
    :data:`IDLE`, what is grouped so far, then :data:`IDLE`."""
    batch: list[Prepared] = []
    failures: list[Failed] = []
    for entry in stream:
        if entry is IDLE:
            if batch or failures:
                yield batch, failures
                batch, failures = [], []
            yield IDLE
            continue
        if isinstance(entry, Failed):
            failures.append(entry)
            continue
        batch.append(entry)
        if len(batch) == size:
            yield batch, failures
            batch, failures = [], []
    if batch or failures:
        yield batch, failures


def _one_ahead(batches: Iterator[T | Idle]) -> Iterator[T | Idle]:
    """Yield each batch once the next one is decoded too (or the stream has gone idle).

    On a CPU the model holds the cores alone (:mod:`.cpu_gate`): decoding the next batch before
    the model starts on this one lets it run alongside the previous batch's writes, instead of
    after the model, on cores the model would then leave idle."""
    previous: T | None = None
    for batch in batches:
        if previous is not None:
            yield previous
            previous = None
        if batch is IDLE:
            yield IDLE
        else:
            previous = batch
    if previous is not None:
        yield previous


def _done(written: Written) -> Future:
    future: Future = Future()
    future.set_result(written)
    return future
