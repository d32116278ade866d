"""What a model's weight files are, remembered across runs: their sha256 and architecture.

Hashing 600 MB of weights costs about a third of a second, and knowing the architecture takes
reading the checkpoint with torch: a warm run on the ONNX backend needs neither. After every
load the identity is written to ``CACHE/weights/<hash of the paths>.json``, with each file's
size and modification time; it is believed only while those still match. Standard library
only: a warm run identifies its model without importing numpy or torch.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from clipseg_cli.io.cache import cache_dir
from clipseg_cli.io.files import sha256_file, write_json_atomic
from clipseg_cli.specs import ArchitectureSpec, architecture_from_dict, architecture_to_dict

#: Bumped when the layout of an identity file changes.
IDENTITY_FORMAT = 1


@dataclass(frozen=True)
class Identity:
    """The weight files' combined sha256 (what runs record) and the architecture they hold."""

    sha256: str
    arch: ArchitectureSpec


def _stamp(path: Path) -> dict:
    stat = path.stat()
    return {"path": str(path.resolve()), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}


def _record_path(files: Sequence[Path]) -> Path:
    joined = "\n".join(str(Path(f).resolve()) for f in files)
    return cache_dir() / "weights" / (hashlib.sha256(joined.encode()).hexdigest()[:32] + ".json")


def weights_sha256(files: Sequence[Path]) -> str:
    """sha256 of the one weight file, or of the concatenated hashes of several (config.json is
    not weights: it is left out)."""
    digests = [sha256_file(f) for f in files if Path(f).name != "config.json"]
    if len(digests) == 1:
        return digests[0]
    return hashlib.sha256("".join(digests).encode()).hexdigest()


def recall(files: Sequence[Path]) -> Identity | None:
    """The remembered identity of ``files``, or None when none is remembered or any file has
    changed (size or modification time) since; an unreadable record counts as none."""
    record = _record_path(files)
    try:
        data = json.loads(record.read_text())
        stamps = [_stamp(Path(f)) for f in files]
        if data.get("format") != IDENTITY_FORMAT or data.get("files") != stamps:
            return None
        return Identity(str(data["sha256"]), architecture_from_dict(data["architecture"]))
    except (OSError, ValueError, TypeError, KeyError):
        return None


def remember(files: Sequence[Path], identity: Identity) -> None:
    """Write the identity of ``files`` for later runs. Best effort: a cache folder that cannot
    be written only means the next run hashes the files again."""
    data = {
        "format": IDENTITY_FORMAT,
        "files": [_stamp(Path(f)) for f in files],
        "sha256": identity.sha256,
        "architecture": architecture_to_dict(identity.arch),
    }
    try:
        write_json_atomic(_record_path(files), data)
    except OSError:
        return  # read-only or full cache: identities are an optimisation, never required


def sha256_of(files: Sequence[Path]) -> str:
    """The files' sha256, from the remembered identity when the files have not changed (the
    architecture is not needed here), else hashed."""
    known = recall(files)
    return known.sha256 if known is not None else weights_sha256(files)


__all__ = ["Identity", "recall", "remember", "sha256_of", "weights_sha256"]
