"""Resume state and locking for an output folder (torch-free: a no-op rerun must not pay for
importing torch).

``OUT/.clipseg/ledger.jsonl`` holds a header line (the run configuration's fingerprint) and one
line per finished input: its key, size and mtime, status and outputs. A row is appended only
after that input's outputs are renamed into place, so after a crash every row is true and an
input without a row is redone. ``OUT/.clipseg/lock`` is held with ``flock`` for the whole run:
the kernel drops it when the process dies, so a crashed run never leaves a stale lock.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from stat import S_ISDIR

from clipseg_cli.errors import ConfigMismatchError, LockedError
from clipseg_cli.io.files import drop_partial_last_line
from clipseg_cli.io.naming import LEDGER_NAME, LOCK_NAME, STATE_DIR

LEDGER_VERSION = 1


def fingerprint(parts: dict) -> str:
    """sha256 of a canonical JSON rendering of ``parts``."""
    canonical = json.dumps(parts, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(canonical.encode()).hexdigest()


@dataclass(frozen=True)
class InputSignature:
    """What makes an input "unchanged": same size and modification time."""

    size: int | None
    mtime_ns: int | None

    @classmethod
    def of(cls, path: Path) -> InputSignature:
        try:
            stat = path.stat()
            if S_ISDIR(stat.st_mode):
                return cls._of_folder(path, stat.st_mtime_ns)
        except OSError:
            return cls(None, None)  # broken link, unreadable: always retried, fails at decode
        return cls(stat.st_size, stat.st_mtime_ns)

    @classmethod
    def _of_folder(cls, folder: Path, mtime_ns: int) -> InputSignature:
        """A frame folder (``--sequence``): its files' sizes summed, the latest time of the
        folder and of its files (a frame added, removed, renamed or rewritten changes it)."""
        size, latest = 0, mtime_ns
        with os.scandir(folder) as entries:
            for entry in entries:
                if entry.is_file():
                    stat = entry.stat()
                    size += stat.st_size
                    latest = max(latest, stat.st_mtime_ns)
        return cls(size, latest)


@dataclass
class LedgerEntry:
    status: str
    signature: InputSignature


@dataclass
class Ledger:
    """The ledger of one output folder, loaded in memory; append with :meth:`record`."""

    path: Path
    header: dict | None = None
    entries: dict[str, LedgerEntry] = field(default_factory=dict)
    # The facts of the latest note (weights_sha256, embeddings_sha256, prompts): what a rerun
    # that embeds nothing still needs to know (the exports' category names).
    noted: dict = field(default_factory=dict)
    # A video's finished segments (run.frames), in order: what a rerun continues from.
    segments: dict[str, list[dict]] = field(default_factory=dict)
    _handle: object = None

    @classmethod
    def load(cls, out_dir: Path) -> Ledger:
        path = out_dir / STATE_DIR / LEDGER_NAME
        ledger = cls(path)
        if not path.exists():
            return ledger
        with path.open("rb") as handle:
            for raw in handle:
                if not raw.endswith(b"\n"):
                    break  # a row cut short by a crash: its input was not finished
                try:
                    row = json.loads(raw)
                except json.JSONDecodeError:
                    continue  # a damaged line is one more input to redo, never a reason to stop
                if "fingerprint" in row and ledger.header is None:
                    ledger.header = row
                elif isinstance(row.get("note"), dict):
                    ledger.noted.update(row["note"])
                elif "segment" in row and "key" in row:
                    ledger.segments.setdefault(row["key"], []).append(row)
                elif "key" in row:
                    signature = InputSignature(row.get("size"), row.get("mtime_ns"))
                    ledger.entries[row["key"]] = LedgerEntry(row.get("status", ""), signature)
        return ledger

    def is_done(self, key: str, signature: InputSignature, retry_failed: bool) -> bool:
        """Whether ``key`` needs no work: recorded with the same signature, and ok (or failed
        and failures are not being retried)."""
        entry = self.entries.get(key)
        if entry is None or signature.size is None or entry.signature != signature:
            return False
        return entry.status == "ok" or (entry.status == "failed" and not retry_failed)

    def begin(self, fingerprint_value: str, parts: dict, overwrite: bool) -> None:
        """Check the folder's configuration, or start a new ledger.

        Raises:
            ConfigMismatchError: results of another configuration are there and ``overwrite``
                is False.
        """
        if self.header is not None and self.header.get("fingerprint") == fingerprint_value:
            self._open()
            return
        if self.header is not None and not overwrite:
            changed = sorted(
                key
                for key in set(parts) | set(self.header.get("parts", {}))
                if parts.get(key) != self.header.get("parts", {}).get(key)
            )
            raise ConfigMismatchError(
                f"{self.path.parent.parent} holds results of a different configuration "
                f"(changed: {', '.join(changed) or 'tool version'}); use another --out, or "
                "--overwrite to redo everything with the new one"
            )
        if self.path.exists():
            # Keep the previous ledger for the record; the new configuration starts from scratch.
            self.path.replace(self.path.with_name(f"{LEDGER_NAME}.{int(time.time())}.old"))
        self.entries.clear()
        self.noted.clear()
        self.segments.clear()
        self.header = {
            "ledger": LEDGER_VERSION,
            "fingerprint": fingerprint_value,
            "parts": parts,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        self._open()
        self._append(self.header)

    def _open(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        drop_partial_last_line(self.path)
        self._handle = self.path.open("a", encoding="utf-8", buffering=1)

    def _append(self, row: dict) -> None:
        self._handle.write(json.dumps(row, ensure_ascii=False) + "\n")
        self._handle.flush()

    def note(self, **facts: object) -> None:
        """Append facts learnt during the run (e.g. the weights' sha256), for the record."""
        self._append({"note": facts, "time": time.strftime("%Y-%m-%dT%H:%M:%S%z")})
        self.noted.update(facts)

    def record(
        self,
        key: str,
        signature: InputSignature,
        status: str,
        outputs: list[str],
        error: str | None,
    ) -> None:
        """Append one finished input. Call only after its outputs are in place."""
        row = {
            "key": key,
            "size": signature.size,
            "mtime_ns": signature.mtime_ns,
            "status": status,
            "outputs": outputs,
            "error": error,
        }
        self._append(row)
        self.entries[key] = LedgerEntry(status, signature)

    def record_segment(self, key: str, signature: InputSignature, segment: dict) -> None:
        """Append one finished segment of a video. Call only after its files are complete."""
        row = {"key": key, "size": signature.size, "mtime_ns": signature.mtime_ns}
        row["segment"] = segment
        self._append(row)
        self.segments.setdefault(key, []).append(row)

    def segments_of(self, key: str, signature: InputSignature) -> list[dict]:
        """The finished segments of ``key`` recorded for this very file (a changed video is
        redone), in order, numbered from 0 without a gap."""
        found: list[dict] = []
        for row in self.segments.get(key, []):
            if signature.size is None or (row.get("size"), row.get("mtime_ns")) != (
                signature.size,
                signature.mtime_ns,
            ):
                continue
            segment = row["segment"]
            if segment.get("segment") == len(found):
                found.append(segment)
            elif segment.get("segment", -1) < len(found):
                found = [*found[: segment["segment"]], segment]  # redone after a resume
        return found

    def close(self) -> None:
        if self._handle is not None:
            self._handle.flush()
            os.fsync(self._handle.fileno())
            self._handle.close()
            self._handle = None


class RunLock:
    """Exclusive, non-blocking lock on an output folder for the duration of a run."""

    def __init__(self, out_dir: Path) -> None:
        self.path = out_dir / STATE_DIR / LOCK_NAME
        self._fd: int | None = None

    def __enter__(self) -> RunLock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise LockedError(
                f"another clipseg run is writing to {self.path.parent.parent} (lock "
                f"{self.path}); wait for it to finish"
            ) from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._fd = fd
        return self

    def __exit__(self, *exc: object) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None
