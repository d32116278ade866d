"""Where a run's time went, stage by stage (the summary's ``stages``), so that any run shows its
bottleneck.

* ``decode``, ``model``, ``write``: seconds each stage was busy, summed over the run's inputs.
  ``decode`` reads, decodes and resizes an input to the model's input (the log row's
  ``decode_s``), ``model`` is its share of the model calls (``inference_seconds``), ``write``
  refines, shapes, encodes and writes its outputs (``write_s``). Decodes and writes run in
  threads, several at a time, so their sums can exceed the wall time.
* ``wait``: seconds the model stood idle between its calls while the engine's loop was blocked,
  and ``waited_for``: that time by what it waited for (``input``, ``decode``, ``write``,
  ``record``: :data:`WAIT_REASONS`). On a CPU, where the model has the
  cores to itself (:mod:`~clipseg_cli.run.engines.cpu_gate`), waiting for decode or write tasks
  to leave the cores counts for that stage.
* ``model_busy``: ``model / (model + wait)``, the share of the loop's time the model ran.
* ``bottleneck``: the largest of ``model`` and the ``waited_for`` entries: ``model`` when the
  model ran more than it waited for any one stage (a faster model is what would speed the run
  up), else the stage it waited for most.

Engines that do not measure the model's idle time (Ray, whose scheduler runs the stages on
many workers at once) give ``wait``, ``waited_for``, ``model_busy`` and ``bottleneck`` as null;
the busy sums are still there.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from clipseg_cli.run.steps import Finished

#: What a model can wait for between its calls: the input stream (``input``: a watch waiting
#: for files, a video's frames being demuxed), a decoded input (``decode``: the decoders are
#: behind, or hold the cores the model needs), a write slot (``write``: the writers' backlog is
#: full, or they hold the cores), or the pipeline recording the results it was handed
#: (``record``: log, ledger, exports' parts, periodic flushes).
WAIT_REASONS = ("input", "decode", "write", "record")


@dataclass
class StageTimes:
    """The stage times of a run so far, from the engine's results."""

    decode: float = 0.0
    model: float = 0.0
    write: float = 0.0
    #: Per reason; None until an engine reports that it measures waits.
    waited: dict[str, float] | None = None
    _results: int = field(default=0, repr=False)

    def add(self, finished: Finished) -> None:
        """Count one engine result."""
        self._results += 1
        self.model += finished.infer_seconds
        if finished.row.get("status") in ("ok", "failed"):
            # A video's frames add theirs to the video's row, which comes last.
            timings = finished.row.get("timings") or {}
            self.decode += float(timings.get("decode_s", 0.0))
            self.write += float(timings.get("write_s", 0.0))
        if finished.waited:
            if self.waited is None:
                self.waited = dict.fromkeys(WAIT_REASONS, 0.0)
            for reason, seconds in finished.waited.items():
                self.waited[reason] = self.waited.get(reason, 0.0) + seconds

    @property
    def bottleneck(self) -> str | None:
        """``model`` or the stage the model waited for most; None when waits are unknown."""
        if self.waited is None:
            return None
        candidates = {"model": self.model, **self.waited}
        return max(candidates, key=lambda name: candidates[name])

    def report(self) -> dict | None:
        """The summary's ``stages`` (None before any result)."""
        if not self._results:
            return None
        report: dict = {
            "decode": round(self.decode, 3),
            "model": round(self.model, 3),
            "write": round(self.write, 3),
            "wait": None,
            "waited_for": None,
            "model_busy": None,
            "bottleneck": self.bottleneck,
        }
        if self.waited is not None:
            wait = sum(self.waited.values())
            loop = self.model + wait
            report["wait"] = round(wait, 3)
            report["waited_for"] = {name: round(value, 3) for name, value in self.waited.items()}
            report["model_busy"] = round(self.model / loop, 3) if loop > 0 else None
        return report

    def line(self) -> str | None:
        """One line for the CLI's end of run: the busy stages, the model's waits, the
        bottleneck; None before any result."""
        report = self.report()
        if report is None:
            return None
        text = (
            f"stages: decode {self.decode:.1f}s, model {self.model:.1f}s, write {self.write:.1f}s"
        )
        if self.waited is None:
            return text
        waits = ", ".join(
            f"{name} {seconds:.1f}s"
            for name, seconds in sorted(self.waited.items(), key=lambda item: -item[1])
            if seconds >= 0.05
        )
        busy = report["model_busy"]
        share = f" (the model ran {busy:.0%} of the time)" if busy is not None else ""
        text += f"; the model waited {report['wait']:.1f}s" + (f" ({waits})" if waits else "")
        return text + f"; bottleneck: {self.bottleneck}{share}"
