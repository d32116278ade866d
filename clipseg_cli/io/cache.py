"""Where clipseg keeps what it can rebuild (exported ONNX graphs, text-prompt embeddings, what
each weight file is): ``$CLIPSEG_CACHE``, else the platform's user cache folder. Deleting the
folder is always safe; the next run rebuilds what it needs."""

from __future__ import annotations

import os
import sys
from pathlib import Path

#: The environment variable that moves the cache.
CACHE_ENV = "CLIPSEG_CACHE"


def cache_dir() -> Path:
    """The cache folder (it need not exist yet): ``$CLIPSEG_CACHE``, else
    ``$XDG_CACHE_HOME/clipseg``, ``~/Library/Caches/clipseg`` (macOS),
    ``%LOCALAPPDATA%/clipseg`` (Windows) or ``~/.cache/clipseg``."""
    configured = os.environ.get(CACHE_ENV)
    if configured:
        return Path(configured).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    if xdg and Path(xdg).is_absolute():
        return Path(xdg) / "clipseg"
    if sys.platform == "darwin":
        return Path.home() / "Library" / "Caches" / "clipseg"
    if os.name == "nt" and os.environ.get("LOCALAPPDATA"):
        return Path(os.environ["LOCALAPPDATA"]) / "clipseg"
    return Path.home() / ".cache" / "clipseg"
