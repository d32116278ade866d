"""The on-disk cache of exported image graphs and of text-prompt embeddings.

Folder: ``$CLIPSEG_CACHE`` when set, else the user's cache folder: ``$XDG_CACHE_HOME/clipseg``,
``~/Library/Caches/clipseg`` on macOS, ``%LOCALAPPDATA%\\clipseg`` on Windows,
``~/.cache/clipseg`` elsewhere. Layout::

    graphs/{key}.onnx      an ONNX graph (fp32, int8 or text), written by ONNX Runtime's user
    graphs/{key}.json      its sidecar: size and sha256 of the .onnx file, and what the key hashed
    text/{weights sha256}/{sha256 of the prompt}.npz   one prompt's conditional vector
    timings.json           how long the last export / quantisation took, per architecture

A graph's key is the sha256 over the weights' sha256, the architecture spec, the ONNX opset,
the ONNX Runtime version, the variant (fp32 | int8; int8 with :data:`INT8_SETTINGS`) and
:data:`GRAPH_FORMAT`: new weights, a new exporter or quantiser setting or another ONNX Runtime
give a new file, never a stale one.

Every file is written to a temp file in its folder and renamed into place
(:mod:`clipseg_cli.io.files`), so two processes exporting the same graph at the same moment
each leave a complete file and a reader never sees half of one. Where ``fcntl`` exists, writing
a graph and its sidecar holds an exclusive ``flock`` on ``graphs/{key}.lock`` and checking them a
shared one, so the pair a reader checks is always one writer's (two exports of the same
weights can differ in bytes: the graph depends on which parts of the model were loaded). A graph
is trusted only when its size and sha256 match its sidecar (:func:`verify_graph`); anything else
is reported as corrupt and rebuilt by the caller.

Standard library only (plus ONNX Runtime's version string, read from the package metadata);
the text-embedding functions import numpy when called. No torch anywhere.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
import re
import time
import zipfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from clipseg_cli.backends import GRAPH_VARIANTS
from clipseg_cli.errors import first_line
from clipseg_cli.io.cache import cache_dir
from clipseg_cli.io.files import (
    atomic_write,
    sha256_file,
    write_bytes_atomic,
    write_json_atomic,
)
from clipseg_cli.specs import ArchitectureSpec, architecture_to_dict

if TYPE_CHECKING:
    import numpy as np

#: Environment variable that names the cache folder.
#: The ONNX opset the graphs are exported with (part of every graph's key).
OPSET = 20
#: Bumped whenever what a graph holds changes for the same weights, opset and runtime (the
#: exported module, the exporter's options, the quantisation settings).
GRAPH_FORMAT = 1
#: How the int8 graph is quantised (:mod:`.quantize` reads it; the int8 key hashes it, so a
#: change of settings never reuses an old int8 graph).
INT8_SETTINGS: dict[str, Any] = {
    "method": "dynamic",
    "op_types": ["MatMul", "Gemm"],
    "per_channel": True,
    "weight_type": "QInt8",
    "MatMulConstBOnly": True,
}
#: Text-embedding files: bumped if their layout changes.
TEXT_FORMAT = 1

_HEX = re.compile(r"^[0-9a-f]{16,128}$")


# ---------------------------------------------------------------------------------------------
# Where
# ---------------------------------------------------------------------------------------------


def graphs_dir() -> Path:
    return cache_dir() / "graphs"


# ---------------------------------------------------------------------------------------------
# Keys
# ---------------------------------------------------------------------------------------------


@functools.cache
def ort_version() -> str:
    """The installed ONNX Runtime's version, without importing it (package metadata first: any
    of its distributions; the import only as a fallback); ``none`` when it is not installed."""
    from importlib import metadata

    for dist in ("onnxruntime", "onnxruntime-gpu", "onnxruntime-openvino", "onnxruntime-directml"):
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            continue
    try:
        import onnxruntime
    except ImportError:
        return "none"
    return str(onnxruntime.__version__)


def _check_sha256(weights_sha256: str) -> str:
    if not isinstance(weights_sha256, str) or not _HEX.match(weights_sha256):
        raise ValueError(f"weights sha256 must be a lowercase hex digest, got {weights_sha256!r}")
    return weights_sha256


def graph_key_fields(weights_sha256: str, arch: ArchitectureSpec, variant: str) -> dict[str, Any]:
    """What a graph's key hashes (also recorded in its sidecar)."""
    if variant not in GRAPH_VARIANTS:
        raise ValueError(f"graph variant {variant!r}: expected one of {', '.join(GRAPH_VARIANTS)}")
    fields = {
        "format": GRAPH_FORMAT,
        "weights_sha256": _check_sha256(weights_sha256),
        "architecture": architecture_to_dict(arch),
        "opset": OPSET,
        "onnxruntime": ort_version(),
        "variant": variant,
    }
    if variant == "int8":
        fields["int8"] = INT8_SETTINGS
    return fields


def graph_key(weights_sha256: str, arch: ArchitectureSpec, variant: str) -> str:
    """The cache key (64 hex digits) of the graph of these weights, architecture and variant
    under the current opset and ONNX Runtime."""
    fields = graph_key_fields(weights_sha256, arch, variant)
    payload = json.dumps(fields, sort_keys=True, separators=(",", ":")).encode()
    return hashlib.sha256(payload).hexdigest()


def graph_paths(key: str) -> tuple[Path, Path]:
    """``(graph file, sidecar)`` of a key."""
    folder = graphs_dir()
    return folder / f"{key}.onnx", folder / f"{key}.json"


# ---------------------------------------------------------------------------------------------
# Graphs
# ---------------------------------------------------------------------------------------------


@contextlib.contextmanager
def _graph_lock(key: str, exclusive: bool) -> Iterator[None]:
    """``flock`` on the key's lock file; no lock where there is no ``fcntl`` or the file can be
    neither created nor opened (a read-only cache: then nobody writes there anyway)."""
    try:
        import fcntl
    except ImportError:  # Windows
        yield
        return
    lock = graphs_dir() / f"{key}.lock"
    try:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o666)
    except OSError:
        try:
            fd = os.open(lock, os.O_RDONLY)
        except OSError:
            yield
            return
    try:
        fcntl.flock(fd, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
        yield
    finally:
        os.close(fd)  # releases the lock


def _read_sidecar(sidecar: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(sidecar.read_text(encoding="utf-8"))
    except (OSError, ValueError, UnicodeDecodeError):
        return None
    if not isinstance(data, dict) or not isinstance(data.get("size"), int):
        return None
    if not isinstance(data.get("sha256"), str) or not isinstance(data.get("key"), str):
        return None
    return data


def cached_graph(weights_sha256: str, arch: ArchitectureSpec, variant: str) -> Path | None:
    """The cached graph of these weights, or None: a quick check for listings (``clipseg
    models``) that reads the sidecar and the file's size but does not hash the file;
    :func:`verify_graph` (what loading uses) does."""
    key = graph_key(weights_sha256, arch, variant)
    path, sidecar = graph_paths(key)
    meta = _read_sidecar(sidecar)
    if meta is None or meta["key"] != key:
        return None
    try:
        size = path.stat().st_size
    except OSError:
        return None
    return path if size == meta["size"] else None


def verify_graph(key: str) -> tuple[Path | None, str | None]:
    """Check the cached graph of ``key`` against its sidecar: its size, then its modification
    time (unchanged since it was hashed: trusted), else the sha256 of its bytes.

    Returns:
        ``(path, None)``: present and intact; ``(None, None)``: not cached;
        ``(None, reason)``: present but not to be trusted (one line saying why): rebuild it.
    """
    with _graph_lock(key, exclusive=False):
        return _verify_unlocked(key)


def _verify_unlocked(key: str) -> tuple[Path | None, str | None]:
    path, sidecar = graph_paths(key)
    graph_there, sidecar_there = path.exists(), sidecar.exists()
    if not graph_there and not sidecar_there:
        return None, None
    if not graph_there:
        return None, "its sidecar is there but the graph file is missing"
    meta = _read_sidecar(sidecar) if sidecar_there else None
    if meta is None:
        return None, "its sidecar is missing or unreadable"
    if meta["key"] != key:
        return None, "its sidecar belongs to another key"
    try:
        stat = path.stat()
        if stat.st_size != meta["size"]:
            return None, f"{stat.st_size} bytes where {meta['size']} were written (truncated?)"
        if meta.get("mtime_ns") == stat.st_mtime_ns:
            # Untouched since it was written and hashed: believed without reading its 290 MB
            # again (0.8 s of every warm run), as the weights are (weights.identity).
            return path, None
        if sha256_file(path) != meta["sha256"]:
            return None, "its sha256 differs from the one recorded when it was written"
    except OSError as error:
        return None, f"unreadable ({first_line(error)})"
    _remember_mtime(sidecar, meta, stat.st_mtime_ns)
    return path, None


def _remember_mtime(sidecar: Path, meta: dict[str, Any], mtime_ns: int) -> None:
    """Record the modification time of a graph just hashed intact, so the next run trusts it
    without hashing (best effort: a read-only cache hashes every time)."""
    # A read-only cache: nothing to remember, and nothing wrong with the graph.
    with contextlib.suppress(OSError):
        write_json_atomic(sidecar, {**meta, "mtime_ns": mtime_ns})


def store_graph(key: str, data: bytes, meta: dict[str, Any] | None = None) -> Path:
    """Write a graph and then its sidecar, each atomically; returns the graph's path.

    Raises:
        OSError: the cache folder cannot be written (read-only, permissions, disk full).
    """
    path, sidecar = graph_paths(key)
    path.parent.mkdir(parents=True, exist_ok=True)
    record = {
        **(meta or {}),
        "key": key,
        "size": len(data),
        "sha256": hashlib.sha256(data).hexdigest(),
        "written": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    with _graph_lock(key, exclusive=True):
        write_bytes_atomic(path, data)
        record["mtime_ns"] = path.stat().st_mtime_ns
        write_json_atomic(sidecar, record)
    return path


def discard_graph(key: str) -> None:
    """Remove a graph and its sidecar (best effort: a read-only cache keeps them)."""
    with _graph_lock(key, exclusive=True):
        for file in graph_paths(key):
            with contextlib.suppress(OSError):
                file.unlink(missing_ok=True)


# ---------------------------------------------------------------------------------------------
# How long building takes on this machine (for "once, ~N s" messages)
# ---------------------------------------------------------------------------------------------


def _arch_id(arch: ArchitectureSpec) -> str:
    text = json.dumps(architecture_to_dict(arch), sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def recorded_seconds(step: str, arch: ArchitectureSpec) -> float | None:
    """Seconds the last ``step`` (``export`` | ``int8``) of this architecture took here."""
    try:
        data = json.loads((cache_dir() / "timings.json").read_text(encoding="utf-8"))
        value = data[step][_arch_id(arch)]
    except (OSError, ValueError, KeyError, TypeError, UnicodeDecodeError):
        return None
    return float(value) if isinstance(value, int | float) and value > 0 else None


def record_seconds(step: str, arch: ArchitectureSpec, seconds: float) -> None:
    """Remember how long ``step`` took (best effort: never raises)."""
    path = cache_dir() / "timings.json"
    try:
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            if not isinstance(data, dict):
                data = {}
        except (OSError, ValueError, UnicodeDecodeError):
            data = {}
        entry = data.get(step) if isinstance(data.get(step), dict) else {}
        entry[_arch_id(arch)] = round(float(seconds), 2)
        data[step] = entry
        path.parent.mkdir(parents=True, exist_ok=True)
        write_json_atomic(path, data)
    except OSError:
        return  # a read-only cache: the next estimate is the default one, nothing worse


# ---------------------------------------------------------------------------------------------
# Text-prompt embeddings
# ---------------------------------------------------------------------------------------------


def _text_file(weights_sha256: str, prompt: str) -> Path:
    if not isinstance(prompt, str):
        raise TypeError(f"prompts are strings, got {type(prompt).__name__}")
    digest = hashlib.sha256(prompt.encode("utf-8", "surrogatepass")).hexdigest()
    return cache_dir() / "text" / _check_sha256(weights_sha256) / f"{digest}.npz"


def store_text_embeddings(
    weights_sha256: str, prompts: Sequence[str], vectors: np.ndarray
) -> str | None:
    """Remember each prompt's conditional vector (a row of ``vectors``, ``[K, D]``), keyed by the
    weights' sha256 and the exact prompt text. Store the float32 vectors the full-precision
    text tower gives (what ``Segmenter.embed_texts`` returns on an fp32 model).

    Returns:
        None when stored, else a one-line reason they could not be (read-only cache, disk
        full): the run goes on without the cache.

    Raises:
        ValueError: ``vectors`` is not ``[len(prompts), D]`` of finite floats.
    """
    import numpy as np

    array = np.asarray(vectors)
    if array.ndim != 2 or array.shape[0] != len(prompts) or array.shape[1] == 0:
        raise ValueError(
            f"expected vectors [K={len(prompts)}, D], got {list(array.shape)} ({array.dtype})"
        )
    if not np.issubdtype(array.dtype, np.floating) or not np.isfinite(array).all():
        raise ValueError("text embeddings must be finite floating-point numbers")
    array = array.astype(np.float32)
    try:
        for prompt, vector in zip(prompts, array, strict=True):
            path = _text_file(weights_sha256, prompt)
            path.parent.mkdir(parents=True, exist_ok=True)

            def write(handle, prompt=prompt, vector=vector) -> None:
                np.savez(
                    handle, format=np.int64(TEXT_FORMAT), prompt=np.array(prompt), vector=vector
                )

            atomic_write(path, write)
    except OSError as error:
        return f"text embeddings not cached: {cache_dir()} is not writable ({first_line(error)})"
    return None


def load_text_embeddings(weights_sha256: str, prompts: Sequence[str]) -> np.ndarray | None:
    """The cached float32 ``[K, D]`` conditionals of ``prompts``, in order; None unless every
    prompt is cached (and readable, of one size, for exactly this text) under these weights."""
    import numpy as np

    if not prompts:
        return None
    rows = []
    for prompt in prompts:
        path = _text_file(weights_sha256, prompt)
        try:
            with np.load(path, allow_pickle=False) as data:
                if int(data["format"]) != TEXT_FORMAT or str(data["prompt"][()]) != prompt:
                    return None
                vector = np.array(data["vector"])
        except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile):
            return None  # missing or damaged: a miss, never an error
        if vector.dtype != np.float32 or vector.ndim != 1 or not np.isfinite(vector).all():
            return None
        if rows and vector.shape != rows[0].shape:
            return None
        rows.append(vector)
    return np.stack(rows)
