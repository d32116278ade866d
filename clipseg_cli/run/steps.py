"""The contract between the pipeline and its engines.

An engine is a function with the signature of :class:`Engine`: it takes the inputs to process,
the per-item steps of this run (:class:`ItemSteps`) and a way to get the model, schedules them
where it runs (threads on this machine, tasks and actors on a Ray cluster), and yields each
input's :class:`Finished` result. It never sees the run's state: the pipeline alone records
results (log, ledger, counters, summary), and stops an engine by closing its generator; an
engine cleans up in ``finally`` and leaves no partial output (every write is atomic), while the
inputs it had in flight are simply redone by the next run.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from clipseg_cli.run import items
from clipseg_cli.run.config import SegmentConfig
from clipseg_cli.run.items import Failed, Prediction, Prepared, RowBatcher, Work, Written
from clipseg_cli.run.promptset import PromptSet
from clipseg_cli.segmenter import Segmenter


@dataclass(frozen=True)
class Finished:
    """One input done: its log row (ok or failed), the model time spent on it, and what the
    engine knows about how it ran (device, dtype, batch size; cluster sizing) for the summary."""

    work: Work
    row: dict
    infer_seconds: float = 0.0
    details: dict = field(default_factory=dict)
    part: dict | None = None  # the image's part of the exports (io.exports), if any


@dataclass(frozen=True)
class ItemSteps:
    """The per-item work of one run, bound to its options and prompts. Picklable: the Ray
    engine ships it to its workers.

    ``prompts.vectors`` live on the CPU; an engine moves them to its model's device once.
    """

    config: SegmentConfig
    prompts: PromptSet
    input_size: tuple[int, int]  # the model's input (h, w): decode resizes to it

    def prepare(self, work: Work) -> Prepared | Failed:
        """Decode one input and resize it for the model."""
        return items.prepare_item(work, self.config, self.input_size)

    def predict(
        self, segmenter: Segmenter, rows: list[np.ndarray], prompts: PromptSet, pad_to: int
    ) -> np.ndarray:
        """Logits ``[len(rows), K + N, h, w]`` of one model batch of rows (whole images and
        tiles, see :class:`~clipseg_cli.run.items.RowBatcher`); ``prompts`` are :attr:`prompts`
        on the segmenter's device."""
        return items.predict_batch(segmenter, rows, prompts, pad_to=pad_to)

    def rows(self, batch_size: int) -> RowBatcher:
        """A fresh :class:`~clipseg_cli.run.items.RowBatcher` for model batches of this size."""
        return RowBatcher(batch_size, self.prompts.count)

    def write(self, prepared: Prepared, prediction: Prediction) -> Written:
        """Write one input's outputs: its log row and export part. Raises DiskFullError when
        the disk is full."""
        return items.write_or_fail(prepared, prediction, self.config, self.prompts.positives)

    def fail(self, failed: Failed) -> dict:
        """The log row of an input that could not be decoded."""
        return items.failure_for(failed)


@dataclass(frozen=True)
class SegmenterLoader:
    """Loads the segmentation parts of the run's model where it is called (picklable: a Ray
    actor loads its own copy)."""

    config: SegmentConfig
    parts: frozenset[str]

    def __call__(self) -> Segmenter:
        return Segmenter.load_for(self.config, self.parts)


class Engine(Protocol):
    """``engine(todo, steps, load_segmenter)``: process ``todo`` in order of completion."""

    def __call__(
        self,
        todo: Sequence[Work],
        steps: ItemSteps,
        load_segmenter: Callable[[], Segmenter],
    ) -> Iterator[Finished]: ...
