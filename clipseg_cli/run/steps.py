"""The contract between the pipeline and its engines.

An engine is a function with the signature of :class:`Engine`: it takes a stream of inputs to
process (an iterator, which may never end: ``clipseg watch``), the per-item steps of this run
(:class:`ItemSteps`) and a way to open the model's image side
(:class:`~clipseg_cli.run.backend.ModelOpener`, or the Python API's loaded model), schedules
them where it runs (threads on this machine, tasks and actors on a Ray cluster), and yields each
input's :class:`Finished` result. It never sees the run's state: the pipeline alone records
results (log, ledger, counters, summary), and stops an engine by closing its generator; an
engine cleans up in ``finally`` and leaves no partial output (every write is atomic), while the
inputs it had in flight are simply redone by the next run.

A stream may yield :data:`IDLE` between inputs: nothing more is ready now. The engine then runs
what it holds (a short model batch rather than a lone file kept waiting for company) and yields
:data:`IDLE` back once every earlier input has its :class:`Finished`: the pipeline's heartbeat
while a stream waits (periodic exports, stop requests). When the stream ends, the engine
finishes what it holds and ends too."""

from __future__ import annotations

import contextlib
import enum
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import Final, Literal, Protocol, TypeAlias

import numpy as np

from clipseg_cli.backends.base import ImageBackend
from clipseg_cli.run import frames, items
from clipseg_cli.run.backend import ModelOpener
from clipseg_cli.run.config import SegmentConfig
from clipseg_cli.run.items import Failed, Prediction, Prepared, RowBatcher, Work, Written
from clipseg_cli.run.promptset import PromptSet


class _Idle(enum.Enum):
    IDLE = "idle"


#: In a stream of inputs (and an engine's results): nothing more is ready now.
IDLE: Final = _Idle.IDLE
Idle: TypeAlias = Literal[_Idle.IDLE]


@dataclass(frozen=True)
class Finished:
    """One input done: its log row (ok or failed), the model time spent on it, and what the
    engine knows about how it ran (device, dtype, batch size; cluster sizing) for the summary."""

    work: Work
    row: dict
    infer_seconds: float = 0.0
    details: dict = field(default_factory=dict)
    part: dict | None = None  # the image's part of the exports (io.exports), if any
    #: Seconds the model stood idle since the engine's previous result, by what it waited
    #: for (:data:`~clipseg_cli.run.stages.WAIT_REASONS`); empty where the engine does not
    #: measure it (Ray).
    waited: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class ItemSteps:
    """The per-item work of one run, bound to its options and prompts. Picklable: the Ray
    engine ships it to its workers."""

    config: SegmentConfig
    prompts: PromptSet
    input_size: tuple[int, int]  # the model's input (h, w): decode resizes to it

    def prepare(self, work: Work) -> Prepared | Failed:
        """Decode one input (or take a video's decoded frame) and resize it for the model."""
        if frames.is_frame(work):
            return frames.prepare_frame(work, self.config, self.input_size)
        return items.prepare_item(work, self.config, self.input_size)

    def predict(self, model: ImageBackend, rows: list[np.ndarray], pad_to: int) -> np.ndarray:
        """Logits ``[len(rows), K + N, h, w]`` of one model batch of rows (whole images and
        tiles, see :class:`~clipseg_cli.run.items.RowBatcher`)."""
        return items.predict_batch(model, rows, self.prompts.vectors, pad_to=pad_to)

    def rows(self, batch_size: int) -> RowBatcher:
        """A fresh :class:`~clipseg_cli.run.items.RowBatcher` for model batches of this size."""
        return RowBatcher(batch_size, self.prompts.count)

    def write(
        self,
        prepared: Prepared,
        prediction: Prediction,
        cores: Callable[[], AbstractContextManager] = contextlib.nullcontext,
    ) -> Written:
        """Write one input's outputs: its log row and export part (a video's frame: into the
        video, see :mod:`.frames`). ``cores`` is held while working, never while a video's
        frame waits for the frame before it (the CPU gate). Raises DiskFullError when the disk
        is full."""
        job = getattr(prepared.work, "job", None)
        if job is not None:
            return job.write(prepared, prediction, self.prompts.positives, cores)
        with cores():
            return items.write_or_fail(prepared, prediction, self.config, self.prompts.positives)

    def fail(self, failed: Failed) -> dict:
        """The log row of an input that could not be decoded."""
        return items.failure_for(failed)


class Engine(Protocol):
    """``engine(todo, steps, open_model)``: process the stream ``todo``; one result per input
    (and :data:`IDLE` for each :data:`IDLE` of the stream, once everything before it is done)."""

    def __call__(
        self,
        todo: Iterator[Work | Idle],
        steps: ItemSteps,
        open_model: ModelOpener,
    ) -> Iterator[Finished | Idle]: ...
