"""File primitives every writer shares: atomic writes, strict JSON, the JSON-lines log, file
hashes, and the cleanup of what a killed run leaves behind. Standard library only, never prints.

Every file is written atomically: written into ``.{name}.tmp-{random}`` in the destination
folder, then renamed over the destination with ``os.replace``. A reader (or a crashed run)
therefore sees either the old file or the complete new one, never half a PNG. Temp files are
removed when writing fails. Files are not fsync'ed: this guards against interrupted runs, not
power loss, and keeps writing thousands of small files fast.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import secrets
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from types import TracebackType
from typing import Any, BinaryIO

from clipseg_cli.io.paths import display_path, escape_undecodable

# Temp files are ``.{final name}.tmp-{8 hex}``: hidden, next to their target, and recognisably
# ours, so a later run can remove the leftovers of a killed one without touching anything else.
TEMP_NAME = re.compile(r"^\..+\.tmp-[0-9a-f]{8}$")


@contextmanager
def atomic_target(path: Path) -> Iterator[Path]:
    """A fresh, empty temp file next to ``path`` to write to; renamed over ``path`` when the
    block ends without an error, removed otherwise (also on KeyboardInterrupt).

    For writers that want a file name rather than a handle (``safetensors.save_file``). An
    ``OSError`` raised while writing names ``path`` as its file (a full disk raises one without
    a name), so a message can say which output could not be written.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    while True:
        tmp = path.with_name(f".{path.name}.tmp-{secrets.token_hex(4)}")
        try:
            # O_EXCL reserves the name; 0o666 honours the umask like a normal file (mkstemp
            # would force 0600).
            os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
            break
        except FileExistsError:
            continue
    try:
        yield tmp
        tmp.replace(path)  # os.replace: atomic within one filesystem
    except BaseException as error:
        tmp.unlink(missing_ok=True)
        if isinstance(error, OSError) and error.filename in (None, os.fspath(tmp)):
            error.filename = os.fspath(path)
        raise


def atomic_write(path: Path, write: Callable[[BinaryIO], None]) -> None:
    """Run ``write`` on a temp file next to ``path``, then rename it over ``path``."""
    with atomic_target(path) as tmp, tmp.open("wb") as handle:
        write(handle)


def write_bytes_atomic(path: Path, data: bytes) -> None:
    """``data`` into ``path``, atomically."""
    atomic_write(path, lambda handle: handle.write(data))


def remove_stale_temporaries(folder: Path) -> int:
    """Delete our leftover temp files under ``folder`` (after a crash); returns how many.

    Only call this while holding the folder's run lock: a live run's temp files look the same.
    """
    removed = 0
    for dirpath, _dirnames, filenames in os.walk(folder):
        for name in filenames:
            if TEMP_NAME.match(name):
                Path(dirpath, name).unlink(missing_ok=True)
                removed += 1
    return removed


def drop_partial_last_line(path: Path) -> None:
    """Cut a JSON-lines file back to its last complete line (a killed writer can leave half a
    line; appending after it would corrupt the next row too)."""
    try:
        with path.open("rb+") as handle:
            size = handle.seek(0, os.SEEK_END)
            if size == 0:
                return
            handle.seek(size - 1)
            if handle.read(1) == b"\n":
                return
            step = min(size, 1 << 16)
            handle.seek(size - step)
            tail = handle.read(step)
            cut = tail.rfind(b"\n")
            handle.truncate(size - step + cut + 1 if cut >= 0 else (0 if step == size else size))
    except FileNotFoundError:
        return


# ---------------------------------------------------------------------------------------------
# Hashes and identities
# ---------------------------------------------------------------------------------------------


def sha256_file(path: Path) -> str:
    """The sha256 of a file's bytes, read in 4 MiB chunks."""
    digest = hashlib.sha256()
    with Path(path).open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 22), b""):
            digest.update(chunk)
    return digest.hexdigest()


def file_identity(path: Path) -> dict:
    """Cheap identity of a file (no hashing): absolute path, size, mtime."""
    stat = Path(path).stat()
    return {"path": os.path.abspath(path), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}  # noqa: PTH100


# ---------------------------------------------------------------------------------------------
# JSON
# ---------------------------------------------------------------------------------------------


def jsonable(obj: Any) -> Any:
    """Make ``obj`` valid strict JSON: numpy scalars/arrays to Python, paths via
    :func:`display_path`, non-finite floats to None, undecodable path bytes escaped."""
    if isinstance(obj, dict):
        return {str(jsonable(k)): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple | set | frozenset):
        return [jsonable(v) for v in obj]
    if isinstance(obj, str):
        # Lone surrogates (raw os.fsdecode names) cannot be encoded as UTF-8.
        if any(0xD800 <= ord(c) <= 0xDFFF for c in obj):
            return escape_undecodable(obj)
        return obj
    if isinstance(obj, os.PathLike):
        return display_path(obj)
    if type(obj).__module__ == "numpy" and hasattr(obj, "tolist"):
        # numpy arrays and scalars, recognised without importing numpy (this module is light).
        return jsonable(obj.tolist())
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def json_text(obj: Any, indent: int | None = None) -> str:
    """Strict JSON (no NaN) of ``obj`` made :func:`jsonable`, non-ASCII kept as it is."""
    return json.dumps(jsonable(obj), ensure_ascii=False, allow_nan=False, indent=indent)


def write_json_atomic(path: Path, obj: Any) -> None:
    """Write ``obj`` as pretty-printed UTF-8 JSON (e.g. the run summary), atomically."""
    write_bytes_atomic(path, (json_text(obj, indent=2) + "\n").encode("utf-8"))


class JsonlLog:
    """Append-only JSON Lines log, one object per line, safe to share between threads.

    Values are made strictly JSON-valid (see :func:`jsonable`); pass paths as ``Path`` objects
    or through :func:`display_path`. Each line is flushed as written, so a crash loses at most
    the row being written.
    """

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        drop_partial_last_line(self.path)
        self._f = self.path.open("a", encoding="utf-8", buffering=1)
        self._lock = threading.Lock()

    def write(self, row: dict[str, Any]) -> None:
        """Append ``row`` as one JSON line and flush."""
        line = json_text(row) + "\n"
        with self._lock:
            self._f.write(line)
            self._f.flush()

    def close(self) -> None:
        """Close the file; further writes raise ValueError."""
        with self._lock:
            self._f.close()

    def __enter__(self) -> JsonlLog:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
