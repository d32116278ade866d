"""``clipseg watch``: the stream of inputs of a run that does not end. The first inputs are what
``segment`` would do over the folders (catch-up); then every file that becomes complete under
them (:class:`clipseg_cli.io.watch.FileArrivals`) is planned against the ledger like a listed
input, and whatever is ready is followed by :data:`~clipseg_cli.run.steps.IDLE`, so the engine
runs it at once instead of waiting for a full batch.

No second pipeline: the pipeline hands this stream to the same engine, and records results the
same way. Each input is in the stream at most once at a time: a file that completes again while
its earlier version is still being processed waits until that one is recorded.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from clipseg_cli.errors import NoInputsError
from clipseg_cli.io.sources import InputListing, keyed_items, looks_like_image
from clipseg_cli.io.watch import FileArrivals
from clipseg_cli.run.config import SegmentConfig
from clipseg_cli.run.inputs import Work, plan
from clipseg_cli.run.ledger import InputSignature, Ledger
from clipseg_cli.run.steps import IDLE, Idle

__all__ = ["Follow", "InputStream", "watched_folders"]

#: How often the stream checks files that are settling (and says it is idle).
TICK_SECONDS = 0.25


@dataclass(frozen=True)
class Follow:
    """How ``clipseg watch`` follows its folders (none of it changes the outputs)."""

    settle: float = 2.0  # seconds a file's size and mtime must stay unchanged
    poll: float | None = None  # scan every POLL seconds instead of listening for events
    flush_every: float = 30.0  # rebuild exports, summary and report at most this often
    once: bool = False  # catch up, then stop

    def __post_init__(self) -> None:
        if self.settle < 0:
            raise ValueError(f"--settle {self.settle}: must be 0 or more seconds")
        if self.poll is not None and self.poll <= 0:
            raise ValueError(f"--poll {self.poll}: must be more than 0 seconds")
        if self.flush_every <= 0:
            raise ValueError(f"--flush-every {self.flush_every}: must be more than 0 seconds")

    def describe(self, folders: list[Path]) -> dict:
        """For the run summary."""
        return {
            "folders": [str(folder) for folder in folders],
            "settle": self.settle,
            "poll": self.poll,
            "events": "once" if self.once else "polling" if self.poll else "native",
            "flush_every": self.flush_every,
        }


def watched_folders(config: SegmentConfig) -> list[Path]:
    """The folders of ``clipseg watch``: every input must be an existing folder.

    Raises:
        NoInputsError: a folder does not exist.
        ValueError: an input is not a folder, or the engine cannot take a stream.
    """
    if config.engine != "local":
        raise ValueError(
            f"--engine {config.engine} reads its inputs to the end before it starts; "
            "watch runs on the local engine"
        )
    folders = []
    for spec in config.inputs:
        folder = Path(spec)
        if not folder.exists():
            raise NoInputsError(f"no such folder: {spec}")
        if not folder.is_dir():
            raise ValueError(f"{spec}: watch takes folders (use segment for files and lists)")
        folders.append(folder)
    return folders


class InputStream:
    """The inputs of a watching run, as a stream for the engine.

    Args:
        config: the run.
        follow: how to watch.
        folders: :func:`watched_folders`.
    """

    def __init__(self, config: SegmentConfig, follow: Follow, folders: list[Path]) -> None:
        self.config = config
        self.follow = follow
        self.roots = [os.path.abspath(folder) for folder in folders]  # noqa: PTH100
        self.files = FileArrivals(
            folders, settle=follow.settle, poll=follow.poll, exclude=[config.out_dir]
        )
        # Keys handed to the engine and the signature they went with, until recorded.
        self._in_flight: dict[str, InputSignature] = {}
        self._waiting: set[Path] = set()  # complete, but an earlier version is in flight

    def __enter__(self) -> InputStream:
        if not self.follow.once:
            self.files.start()  # before the listing: a file arriving meanwhile is not missed
        return self

    def __exit__(self, *exc: object) -> None:
        self.files.close()

    def describe(self) -> str:
        """One line for the user: what is watched, and how."""
        folders = ", ".join(self.roots)
        if self.follow.once:
            return f"catching up on {folders} (settle {self.follow.settle:g} s)"
        how = f"polling every {self.follow.poll:g} s" if self.follow.poll else "file events"
        return f"watching {folders} ({how}, settle {self.follow.settle:g} s)"

    def settle_recent(self, todo: list[Work]) -> list[Work]:
        """The catch-up's inputs, less those changed within the settle time: they may still be
        being written, so they are watched until they settle, like new arrivals."""
        now = time.time_ns()
        window = self.follow.settle * 1e9
        recent = [
            work
            for work in todo
            if work.signature.mtime_ns is not None and now - work.signature.mtime_ns < window
        ]
        self.files.track(work.item.path for work in recent)
        keep = set(map(id, recent))
        return [work for work in todo if id(work) not in keep]

    def works(
        self,
        first: list[Work],
        ledger: Ledger,
        on_queued: Callable[[int], None],
    ) -> Iterator[Work | Idle]:
        """``first`` (the catch-up), then each file as it completes, with :data:`IDLE`
        whenever nothing more is ready. With ``once``, ends when nothing is left to settle.

        Raises:
            WatchError: the folders can no longer be watched.
        """
        for work in first:
            self._in_flight[work.key] = work.signature
            yield work
        yield IDLE
        while not (self.follow.once and not self.files.pending and not self._waiting):
            arrived = self.files.wait(TICK_SECONDS)
            ready = self._ready(arrived, ledger)
            on_queued(len(ready))
            yield from ready
            yield IDLE

    def _ready(self, arrived: list[Path], ledger: Ledger) -> list[Work]:
        """Complete files as work: new or changed ones whose earlier version is not in flight."""
        for key, signature in list(self._in_flight.items()):
            entry = ledger.entries.get(key)
            if entry is not None and entry.signature == signature:
                del self._in_flight[key]  # recorded
        candidates = sorted(self._waiting | set(arrived))
        self._waiting.clear()
        images = [path for path in candidates if path.is_file() and looks_like_image(path)]
        listing = InputListing(keyed_items(images, self.roots), [])
        todo, _unchanged = plan(listing, ledger, self.config.retry_failed)
        ready = []
        for work in todo:
            if work.key in self._in_flight:
                self._waiting.add(work.item.path)
                continue
            self._in_flight[work.key] = work.signature
            ready.append(work)
        return ready
