"""The reusable prompt file (``--save-prompt`` / ``--prompt-embedding``): conditional vectors
with their labels and what made them, in one safetensors file. numpy only (never torch).
"""

from __future__ import annotations

import json
import os
from typing import Any

import numpy as np
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save_file

from clipseg_cli.version import __version__

CONDITIONALS_TENSOR = "conditionals"
CONDITIONALS_FORMAT = "clipseg-conditionals"


def save_conditionals(
    path: str | os.PathLike[str],
    vectors: np.ndarray,
    labels: list[str],
    metadata: dict[str, Any],
) -> None:
    """Write conditionals to a safetensors file for reuse.

    Layout: one float32 tensor ``"conditionals"`` ``[K, D]``; the safetensors header metadata
    holds one JSON document per key: ``format`` (``"clipseg-conditionals"``), ``labels``
    (list of K strings), ``embed_dim`` (D), ``created_by`` (``"clipseg_cli <version>"``) and
    every key of ``metadata`` (e.g. ``model``, ``weights_sha256``). The format's own keys
    override same-named keys of ``metadata``.

    Args:
        path: file to (over)write.
        vectors: [K, D] conditionals, any float dtype (stored as float32).
        labels: K prompt labels, one per row.
        metadata: JSON-serialisable values.
    """
    if vectors.ndim != 2 or vectors.shape[0] == 0 or vectors.shape[1] == 0:
        raise ValueError(f"expected non-empty [K,D] conditionals, got {list(vectors.shape)}")
    if len(labels) != vectors.shape[0] or not all(isinstance(s, str) for s in labels):
        raise ValueError(f"expected {vectors.shape[0]} string labels, got {labels!r}")
    header: dict[str, str] = {}
    own: dict[str, Any] = {
        "format": CONDITIONALS_FORMAT,
        "labels": list(labels),
        "embed_dim": int(vectors.shape[1]),
        "created_by": f"clipseg_cli {__version__}",
    }
    for key, value in {**metadata, **own}.items():
        try:
            header[str(key)] = json.dumps(value)
        except (TypeError, ValueError) as e:
            raise ValueError(f"metadata {key!r} is not JSON-serialisable: {e}") from None
    array = np.ascontiguousarray(vectors, dtype=np.float32)
    save_file({CONDITIONALS_TENSOR: array}, os.fspath(path), metadata=header)


def load_conditionals(
    path: str | os.PathLike[str],
) -> tuple[np.ndarray, list[str], dict[str, Any]]:
    """Read a file written by :func:`save_conditionals`.

    Returns:
        ``(vectors, labels, metadata)``: float32 [K, D] array, K labels, and the
        decoded metadata (every header key except ``labels``).

    Raises:
        ValueError: with a one-line reason: unreadable, not a safetensors file, not a
            conditionals file, no ``conditionals`` tensor, not [K, D], labels not matching.
    """
    where = os.fspath(path)
    try:
        with safe_open(where, framework="np") as f:
            header = f.metadata() or {}
            keys = set(f.keys())
            tensor = f.get_tensor(CONDITIONALS_TENSOR) if CONDITIONALS_TENSOR in keys else None
    except OSError as e:
        raise ValueError(f"{where}: cannot read: {e.strerror or e}") from None
    except SafetensorError as e:
        raise ValueError(f"{where}: not a safetensors file ({e})") from None

    decoded: dict[str, Any] = {}
    for key, value in header.items():
        try:
            decoded[key] = json.loads(value)
        except json.JSONDecodeError:
            raise ValueError(f"{where}: metadata {key!r} is not JSON") from None
    if decoded.get("format") != CONDITIONALS_FORMAT:
        raise ValueError(f"{where}: not a conditionals file (no format={CONDITIONALS_FORMAT!r})")
    if tensor is None:
        raise ValueError(f"{where}: no {CONDITIONALS_TENSOR!r} tensor")
    if tensor.ndim != 2:
        raise ValueError(f"{where}: conditionals must be [K,D], got {list(tensor.shape)}")
    if not np.issubdtype(tensor.dtype, np.floating):
        raise ValueError(f"{where}: conditionals must be floating point, got {tensor.dtype}")
    labels = decoded.pop("labels", None)
    if (
        not isinstance(labels, list)
        or len(labels) != tensor.shape[0]
        or not all(isinstance(s, str) for s in labels)
    ):
        raise ValueError(f"{where}: expected {tensor.shape[0]} string labels, got {labels!r}")
    return tensor.astype(np.float32), labels, decoded
