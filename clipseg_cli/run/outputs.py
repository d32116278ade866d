"""Where one image's outputs go: files under ``--out`` (``segment``, ``matte``, ``watch``), bytes
in memory (``serve``), or frames of a video encoder. The write step (:mod:`.items`) makes each
output once, as an :class:`Output` (its pixels and the encoder of its file format), and hands
it to a sink; so an output the server returns is byte for byte the file ``segment`` writes.

numpy only; the encoders are :mod:`clipseg_cli.io.writers`'.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np

from clipseg_cli.io import writers
from clipseg_cli.io.naming import output_path
from clipseg_cli.io.paths import display_path


@dataclass(frozen=True)
class Output:
    """One output of one image: its ``--save`` kind, its prompt (None for per-image kinds such
    as ``labels``), what it shows (``pixels``, as :mod:`clipseg_cli.io.writers` makes them) and
    how its file is encoded."""

    kind: str
    prompt: str | None  # the prompt's label
    slug: str | None  # the prompt's file-name slug
    pixels: np.ndarray
    encoder: Callable[[np.ndarray], bytes]

    def encode(self) -> bytes:
        """The bytes of this output's file."""
        return self.encoder(self.pixels)


class OutputSink(Protocol):
    """Takes an image's outputs one by one; ``records`` is what the log row's ``outputs``
    says about them."""

    records: list[dict]

    def put(self, output: Output) -> None: ...


@dataclass
class FileSink:
    """Outputs written atomically under ``out_dir``, mirrored at ``out_key`` (names from
    :func:`clipseg_cli.io.naming.output_path`); records ``{"prompt", "kind", "path"}``."""

    out_dir: Path
    out_key: str
    records: list[dict] = field(default_factory=list)

    def put(self, output: Output) -> None:
        path = output_path(self.out_dir, self.out_key, output.kind, output.slug)
        self.records.append(
            {"prompt": output.prompt, "kind": output.kind, "path": display_path(path)}
        )
        writers.write_bytes(path, output.encode())


@dataclass
class MemorySink:
    """Outputs kept as encoded bytes (the server's answers); records
    ``{"prompt", "kind", "data"}``."""

    records: list[dict] = field(default_factory=list)

    def put(self, output: Output) -> None:
        self.records.append({"prompt": output.prompt, "kind": output.kind, "data": output.encode()})
