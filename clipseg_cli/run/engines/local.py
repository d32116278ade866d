"""The local engine: decode threads -> batched model -> writer threads, on this machine.

Bounded everywhere, so memory stays flat whatever the number of inputs: at most
``batch_size + workers`` decodes and ``batch_size + writer_threads`` writes are in flight.
Results come out in input order. On a CPU the model runs alone on the cores
(:mod:`.cpu_gate`): decode and write tasks wait for it, and the next batch is decoded before the
model starts on this one, so it overlaps the previous batch's writes.

An engine of :mod:`clipseg_cli.run.steps`: it never sees the run's state.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TypeVar

from clipseg_cli.run.backend import ModelOpener
from clipseg_cli.run.engines.cpu_gate import CpuGate, gate_for
from clipseg_cli.run.items import Failed, Prepared, Work, Written
from clipseg_cli.run.steps import Finished, ItemSteps

T = TypeVar("T")


def process(todo: Sequence[Work], steps: ItemSteps, open_model: ModelOpener) -> Iterator[Finished]:
    """Process ``todo`` on this machine; one :class:`Finished` per input, in input order.

    Raises:
        DiskFullError: outputs could not be written for lack of space (resumable).
    """
    model = open_model()
    config = steps.config
    batch_size = config.batch_size_for(model.device_type)
    details = {**model.details, "batch_size": batch_size}
    gate = gate_for(model.device_type)
    write = gate.sharing(steps.write)
    # (future of the row, the work, its share of the model's time); rows leave in input order.
    writes: deque[tuple[Future, Work, float]] = deque()

    def finished(limit: int) -> Iterator[Finished]:
        # Unfinished writes (and the images they hold) are bounded by `limit`.
        while len(writes) > limit:
            future, work, seconds = writes.popleft()
            written = future.result()
            yield Finished(work, written.row, seconds, details, written.part)

    with (
        ThreadPoolExecutor(config.workers, thread_name_prefix="decode") as decoders,
        ThreadPoolExecutor(config.writer_threads, thread_name_prefix="write") as writers,
    ):
        stream = _prepared(todo, steps, decoders, batch_size + config.workers, gate)
        rows = steps.rows(batch_size)

        model_seconds: dict[int, float] = {}  # per image, summed over its rows

        def predict(final: bool) -> None:
            # Full model batches of rows (an image's whole view, then its tiles); a short one,
            # padded to the batch size, only at the very end.
            while len(rows) >= batch_size or (final and len(rows)):
                taken = rows.next_rows()
                pixels = [prepared.model_inputs[index] for prepared, index in taken]
                with gate.exclusive():
                    start = time.perf_counter()
                    logits = steps.predict(model.backend, pixels, pad_to=batch_size)
                    share = (time.perf_counter() - start) / len(taken)
                for prepared, _index in taken:
                    model_seconds[id(prepared)] = model_seconds.get(id(prepared), 0.0) + share
                for prepared, prediction in rows.accept(taken, logits):
                    future = writers.submit(write, prepared, prediction)
                    writes.append((future, prepared.work, model_seconds.pop(id(prepared))))

        try:
            for batch, failures in _one_ahead(_batches(stream, batch_size)):
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


def _prepared(
    todo: Sequence[Work],
    steps: ItemSteps,
    pool: ThreadPoolExecutor,
    ahead: int,
    gate: CpuGate,
) -> Iterator[Prepared | Failed]:
    """Decode in the pool, yield in input order, at most ``ahead`` decodes in flight."""
    prepare = gate.sharing(steps.prepare)
    pending: deque[Future] = deque()
    try:
        for work in todo:
            pending.append(pool.submit(prepare, work))
            if len(pending) >= ahead:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()
    finally:
        for future in pending:
            future.cancel()


def _batches(
    stream: Iterator[Prepared | Failed], size: int
) -> Iterator[tuple[list[Prepared], list[Failed]]]:
    """Group prepared items into model batches; failures pass through with the next batch."""
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

    On a CPU the model holds the cores alone (:mod:`.cpu_gate`): decoding the next batch before
    the model starts on this one lets it run alongside the previous batch's writes, instead of
    after the model, on cores the model would then leave idle."""
    previous = next(batches, None)
    if previous is None:
        return
    for batch in batches:
        yield previous
        previous = batch
    yield previous


def _done(written: Written) -> Future:
    future: Future = Future()
    future.set_result(written)
    return future
