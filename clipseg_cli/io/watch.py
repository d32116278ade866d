"""Files that are complete, as they arrive under folders: watchfiles' events (or its polling)
in, paths out. Knows nothing of models or runs.

What "complete" means here, and exactly what it relies on:

- **Settled**: a regular file whose size and modification time (``st_size``, ``st_mtime_ns``)
  have not changed, and about which no event arrived, for ``settle`` seconds of observation.
  This is the rule for every file written in place (a copy, a scanner, an upload, an NFS
  writer): a writer that pauses longer than ``settle`` between two writes can be taken early, so
  ``settle`` is the longest pause to wait out.
- **Renamed into place**: watchfiles reports a rename inside the watched tree as the old name
  ``deleted`` and the new name ``added`` in the same batch of changes (notify's paired
  ``Name(From)`` / ``Name(To)``). A file ``added`` in a batch where a temporary name of it in
  the same folder (a name containing its name: ``x.jpg.part``, rsync's ``.x.jpg.Ab12Cd``,
  ``x.jpg.crdownload``) is ``deleted`` is complete at once, if that name was last seen (when
  its own event came) with the same device and inode, or was already gone when its event came
  (renamed moments after it was created): the writer finished it under the temporary name and
  renamed it. Other renames (``mv a.jpg b.jpg``, a temporary ``tmpAb12``, one in another folder,
  one that was there before the watch began) and files moved in from outside the watched
  folders are settled like any other.
- **Close-after-write is not seen**: watchfiles maps inotify's ``IN_CLOSE_WRITE`` to no change
  at all (its debug output shows ``Access(Close(Write))`` as "no change detected"), so a file
  written in place is taken by the settle rule, never at its close.

Names that are never taken (:func:`clipseg_cli.io.sources.is_ignored_name`): hidden and
temporary names, thumbnail caches, and anything under folders of those names or under
``exclude`` (the output folder). A folder that appears is walked at once, because files
created in it before its watch was added send no event. Events are only hints: each candidate
is checked by ``stat`` at every tick, so a lost event delays a file (until the next event for
it) but never lets a changing one through. With ``poll`` (network filesystems, which send no
events) watchfiles scans the tree every ``poll`` seconds instead of listening.
"""

from __future__ import annotations

import os
import queue
import stat
import threading
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from clipseg_cli.errors import WatchError
from clipseg_cli.io.sources import is_ignored_name

__all__ = ["FileArrivals"]

# watchfiles groups changes until none arrives for this long (ms), then hands them over.
_STEP_MS = 50
# With no change for this long (ms), watchfiles yields an empty set (the first says it is on).
_QUIET_MS = 200
# A deleted name no event had named before.
_UNHEARD = object()
# How long start() waits for the watches to be set up (a huge tree takes a while to walk).
_START_SECONDS = 10.0


@dataclass
class _Candidate:
    size: int
    mtime_ns: int
    since: float  # when this size and mtime were first seen, or the last event


def _identity(status: os.stat_result) -> tuple[int, int]:
    return status.st_dev, status.st_ino


def _stat(path: str) -> os.stat_result | None:
    try:
        return os.stat(path)  # noqa: PTH116 - follows links to files, as listings do
    except OSError:
        return None


def _identity_of(path: str) -> tuple[int, int] | None:
    status = _stat(path)
    return None if status is None else _identity(status)


class CompletionRules:
    """When a file under ``roots`` is complete (the module's rules), from the changes and
    listings it is told of; no threads, no waiting: :class:`FileArrivals` feeds it."""

    def __init__(self, roots: Sequence[Path], settle: float, exclude: Sequence[Path]) -> None:
        self.roots = [Path(os.path.abspath(root)) for root in roots]  # noqa: PTH100
        self.settle = settle
        self._excluded = [os.path.realpath(path) for path in exclude]
        self._candidates: dict[str, _Candidate] = {}
        # Last seen identity of the names not yet taken (candidates, ignored temporaries): how a
        # rename is recognised; None for a name that was gone before it could be seen. Taken
        # files leave it, so it is bounded by what is in progress.
        self._identities: dict[str, tuple[int, int] | None] = {}

    @property
    def pending(self) -> int:
        """Files seen but not yet complete."""
        return len(self._candidates)

    def wanted(self, _change: object, path: str) -> bool:
        """Changes outside the excluded folders (watchfiles' filter; names are judged later,
        since the deletion of an ignored temporary name pairs a rename)."""
        if not self._excluded:
            return True
        real = os.path.realpath(path)
        return not any(real == root or real.startswith(root + os.sep) for root in self._excluded)

    def track(self, paths: Iterable[Path]) -> None:
        """Settle these files too (found by a listing while they may still be written)."""
        now = time.monotonic()
        for path in paths:
            self.observe(str(path), now)

    def apply(self, changes: set[tuple[int, str, tuple[int, int] | None]]) -> set[str]:
        """Take one batch of changes; the files renamed into place by it."""
        from watchfiles import Change

        now = time.monotonic()
        added = {path for change, path, _ in changes if change == Change.added}
        deleted = {path for change, path, _ in changes if change == Change.deleted}
        touched = {path for change, path, _ in changes if change != Change.deleted}
        for _change, path, identity in changes:
            if path in touched and (identity is not None or path not in self._identities):
                self._identities[path] = identity
        # The names this batch removed, as last seen: the old name of a rename is gone by now.
        vanished = {path: self._identities.pop(path, _UNHEARD) for path in deleted}
        for path in deleted:
            self._candidates.pop(path, None)
        ready = set()
        for path in sorted(touched - deleted):
            status = _stat(path)
            if status is None:
                continue
            if stat.S_ISDIR(status.st_mode):
                self._walk(Path(path), now)
                continue
            complete = stat.S_ISREG(status.st_mode) and not self._ignored(path)
            if complete and path in added and self._renamed_into_place(path, status, vanished):
                self._candidates.pop(path, None)
                self._identities.pop(path, None)
                ready.add(path)
                continue
            self.observe(path, now, status)
        return ready

    @staticmethod
    def _renamed_into_place(path: str, status: os.stat_result, vanished: dict[str, object]) -> bool:
        new = Path(path)
        for old, identity in vanished.items():
            gone = Path(old)
            # A temporary name of this file in its folder (x.jpg.part, .x.jpg.Ab12Cd): a
            # deleted file's inode may be reused by a new one, and other files may be created
            # in the same batch, so neither the identity nor the batch alone will do.
            if gone.parent != new.parent or gone.name == new.name or new.name not in gone.name:
                continue
            # Its identity as last seen; or, an event named it but it was gone before it could
            # be looked at (renamed within moments of its creation), none. A name no event
            # ever named (there before the watch began) is not known well enough.
            if identity is None or identity == _identity(status):
                return True
        return False

    def observe(self, path: str, now: float, status: os.stat_result | None = None) -> None:
        """A file was named by an event or a listing: (re)start its settle time."""
        status = status if status is not None else _stat(path)
        if status is None:
            return
        self._identities[path] = _identity(status)
        if not stat.S_ISREG(status.st_mode) or self._ignored(path):
            self._candidates.pop(path, None)
            return
        self._candidates[path] = _Candidate(status.st_size, status.st_mtime_ns, now)

    def settled(self, now: float) -> set[str]:
        ready = set()
        for path, seen in list(self._candidates.items()):
            status = _stat(path)
            if status is None or not stat.S_ISREG(status.st_mode):
                del self._candidates[path]
                continue
            if (status.st_size, status.st_mtime_ns) != (seen.size, seen.mtime_ns):
                self._candidates[path] = _Candidate(status.st_size, status.st_mtime_ns, now)
            elif now - seen.since >= self.settle:
                del self._candidates[path]
                self._identities.pop(path, None)
                ready.add(path)
        return ready

    def _walk(self, folder: Path, now: float) -> None:
        """A folder appeared (created, moved in): its files, which may predate its watch."""
        if self._ignored(str(folder)):
            return
        for parent, folders, files in os.walk(folder):
            folders[:] = [name for name in folders if not is_ignored_name(name)]
            for name in files:
                self.observe(os.path.join(parent, name), now)  # noqa: PTH118

    def _ignored(self, path: str) -> bool:
        """Hidden or temporary names, in the file's name or any folder below a root; anything
        under an excluded folder."""
        if not self.wanted(None, path):
            return True
        for root in self.roots:
            try:
                relative = Path(path).relative_to(root)
            except ValueError:
                continue
            return any(is_ignored_name(part) for part in relative.parts)
        return True  # outside every root (a symlink's target): not ours to take


class FileArrivals:
    """Watches ``roots`` (recursively) from :meth:`start` on; :meth:`wait` hands out the files
    that became complete, each once per completion.

    Args:
        roots: the folders to watch.
        settle: seconds a file's size and mtime must stay unchanged.
        poll: scan every ``poll`` seconds instead of listening for events (network shares).
        exclude: folders whose files are never taken (the output folder).
    """

    def __init__(
        self,
        roots: Sequence[Path],
        *,
        settle: float = 2.0,
        poll: float | None = None,
        exclude: Sequence[Path] = (),
    ) -> None:
        self.rules = CompletionRules(roots, settle, exclude)
        self.roots = self.rules.roots
        self.poll = poll
        # Batches of (change, path, its device and inode when the batch came, if it existed).
        self._changes: queue.Queue[set[tuple[int, str, tuple[int, int] | None]]] = queue.Queue()
        self._stop = threading.Event()
        self._listening = threading.Event()  # watchfiles has set its watches up
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None

    # -- lifecycle ---------------------------------------------------------------------------

    def start(self) -> FileArrivals:
        """Start listening, and return once the folders are watched (list what is already
        there after this, so that nothing falls between)."""
        self._thread = threading.Thread(target=self._listen, name="watch", daemon=True)
        self._thread.start()
        self._listening.wait(_START_SECONDS)
        return self

    def close(self) -> None:
        """Stop listening; watchfiles notices within one step (50 ms)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    def __enter__(self) -> FileArrivals:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def pending(self) -> int:
        """Files seen but not yet complete."""
        return self.rules.pending

    def track(self, paths: Iterable[Path]) -> None:
        """Settle these files too (found by a listing while they may still be written)."""
        self.rules.track(paths)

    def _listen(self) -> None:
        from watchfiles import watch

        try:
            for changes in watch(
                *self.roots,
                watch_filter=self.rules.wanted,
                step=_STEP_MS,
                stop_event=self._stop,  # checked every step
                # An empty yield now and then: the first one says the watches are set up.
                rust_timeout=_QUIET_MS,
                yield_on_timeout=True,
                force_polling=self.poll is not None,
                poll_delay_ms=round((self.poll or 0.3) * 1000),
                recursive=True,
                ignore_permission_denied=True,
                raise_interrupt=False,
            ):
                self._listening.set()
                if changes:
                    # Identities now: a temporary name may be renamed before wait() looks.
                    self._changes.put({(int(c), path, _identity_of(path)) for c, path in changes})
        except Exception as error:  # any failure of the watcher: raised in wait()'s thread
            self._error = error
            self._changes.put(set())
        finally:
            self._listening.set()

    # -- what the caller sees ----------------------------------------------------------------

    def wait(self, timeout: float) -> list[Path]:
        """Wait up to ``timeout`` seconds for changes; the files complete now, in name order.

        Raises:
            WatchError: the folders can no longer be watched.
        """
        ready: set[str] = set()
        try:
            changes = self._changes.get(timeout=timeout)
            while True:  # take every batch already there, so a burst comes out together
                ready |= self.rules.apply(changes)
                changes = self._changes.get_nowait()
        except queue.Empty:
            pass
        if self._error is not None:
            error, self._error = self._error, None
            where = ", ".join(str(root) for root in self.roots)
            hint = "" if self.poll is not None else "; try --poll SECONDS"
            raise WatchError(f"cannot watch {where}: {error}{hint}") from None
        ready |= self.rules.settled(time.monotonic())
        return [Path(path) for path in sorted(ready)]
