"""Text prompts -> conditionals on ONNX Runtime, and finding or building the text graph.

:class:`OnnxTextEncoder` runs the text tower's graph (:func:`.export.export_text_graph_bytes`)
on the package's own tokenizer (:mod:`clipseg_cli.ops.tokenizer`): a CPU run with a text prompt
that is not in the embedding cache needs neither torch nor open_clip once the graph is cached.
Its session follows the image backend's thread rules (:func:`.onnx.session_options`), with
ONNX Runtime's memory arena off: the session runs once per run, and an arena sized for that
call would only hold memory (arena on vs off not measured; the warm runs' peak RSS with new
prompts is in docs/backends.md, from bench/text_bench.py).

:func:`open_text_encoder` finds the graph in the cache (:mod:`.cache`, variant ``text``) or
exports it from the weights (torch, once), stores it like the image graph (atomic, sidecar with
sha256; corrupt -> rebuilt; read-only cache -> kept in memory with a one-line warning).

Importing this module imports numpy and onnxruntime, never torch.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import onnxruntime as ort

from clipseg_cli.backends.base import BackendError
from clipseg_cli.backends.cache import (
    discard_graph,
    graph_key,
    graph_key_fields,
    graphs_dir,
    record_seconds,
    recorded_seconds,
    store_graph,
    verify_graph,
)
from clipseg_cli.backends.onnx import available_cores, session_options
from clipseg_cli.errors import first_line
from clipseg_cli.ops.tokenizer import BpeTokenizer
from clipseg_cli.specs import ArchitectureSpec

if TYPE_CHECKING:
    from clipseg_cli.model.clipseg import ClipSegModel

Progress = Callable[[str], None]
VARIANT = "text"
#: The step's name in the cache's timings (``once, ~N s`` messages).
STEP = "text-export"


class OnnxTextEncoder:
    """The text tower on an ONNX Runtime session: prompts (or token ids) -> float32 ``[K, D]``.

    Args:
        graph: the text graph's path, or its serialised bytes (an in-memory graph).
        threads: intra-op threads (default: every available core).

    Raises:
        BackendError: ONNX Runtime cannot load the graph, or it is not a text graph.
    """

    name = "onnx"

    def __init__(self, graph: str | Path | bytes, *, threads: int | None = None) -> None:
        self.path = None if isinstance(graph, bytes) else Path(graph)
        self.threads = threads or available_cores()
        options = session_options(self.threads)
        options.enable_cpu_mem_arena = False
        source = graph if isinstance(graph, bytes) else str(graph)
        try:
            self.session = ort.InferenceSession(
                source, sess_options=options, providers=["CPUExecutionProvider"]
            )
        except Exception as error:  # InvalidProtobuf, Fail, NoSuchFile ... from the runtime
            where = self.path or "the in-memory text graph"
            raise BackendError(f"ONNX Runtime cannot load {where} ({first_line(error)})") from None
        inputs = {i.name: i for i in self.session.get_inputs()}
        outputs = {o.name: o for o in self.session.get_outputs()}
        tokens, conditionals = inputs.get("tokens"), outputs.get("conditionals")
        if (
            tokens is None
            or conditionals is None
            or len(inputs) != 1
            or tokens.type != "tensor(int64)"
            or len(tokens.shape) != 2
            or not isinstance(tokens.shape[1], int)
            or len(conditionals.shape) != 2
            or not isinstance(conditionals.shape[1], int)
        ):
            raise BackendError(f"{self.path or 'the graph'} is not a CLIPSeg text graph")
        self.context_length: int = tokens.shape[1]
        self.embed_dim: int = conditionals.shape[1]
        self._tokenizer: BpeTokenizer | None = None

    def embed_tokens(self, tokens: np.ndarray) -> np.ndarray:
        """int64 token ids ``[K, L]`` -> float32 conditionals ``[K, D]``."""
        tokens = np.ascontiguousarray(tokens)
        if tokens.ndim != 2 or tokens.shape[1] != self.context_length:
            raise ValueError(
                f"expected token ids [K, {self.context_length}], got {list(tokens.shape)}"
            )
        if not np.issubdtype(tokens.dtype, np.integer):
            raise ValueError(f"token ids are integers, not {tokens.dtype}")
        if tokens.shape[0] == 0:
            return np.zeros((0, self.embed_dim), np.float32)
        (out,) = self.session.run(["conditionals"], {"tokens": tokens.astype(np.int64)})
        return out

    def embed_texts(self, prompts: Sequence[str]) -> np.ndarray:
        """float32 ``[K, D]`` conditionals of text prompts, as ``Segmenter.embed_texts``."""
        if self._tokenizer is None:
            self._tokenizer = BpeTokenizer(self.context_length)
        return self.embed_tokens(self._tokenizer(list(prompts)))


@dataclass(frozen=True)
class TextLoad:
    """What :func:`open_text_encoder` found or built."""

    encoder: OnnxTextEncoder
    #: The cached graph file, or None when the graph lives in memory only.
    path: Path | None
    #: ``("text-export",)`` when the graph was exported now; empty when it came from the cache.
    built: tuple[str, ...]
    #: Seconds the export took.
    seconds: float
    #: One-line warnings for the user (a cache that could not be written).
    warnings: tuple[str, ...] = ()


def default_seconds(arch: ArchitectureSpec) -> float:
    """A first guess of the export's seconds before this machine has done it once. Measured on
    2 cores of an AMD EPYC (Zen 5): ~3 s for a tiny model's 2-block text tower; 10 s for
    ViT-B/16's 12 blocks of width 512 on a loaded machine (bench/text_bench.py), where this
    guess says 6 s; the run records the real time for the next estimate."""
    text = arch.text
    millions = text.layers * 12 * text.width**2 / 1e6  # ~38 M parameters for ViT-B/16's tower
    return 3.0 + 0.08 * millions


@dataclass
class _Builder:
    weights_sha256: str
    arch: ArchitectureSpec
    build_model: Callable[[], ClipSegModel]
    label: str
    say: Progress
    built: list[str] = field(default_factory=list)
    seconds: float = 0.0
    warnings: list[str] = field(default_factory=list)

    def graph(self, *, force: bool = False) -> Path | bytes:
        """A verified cached text graph, else exported (and stored if the cache can be
        written, else returned as bytes)."""
        key = graph_key(self.weights_sha256, self.arch, VARIANT)
        if not force:
            path, reason = verify_graph(key)
            if path is not None:
                return path
            if reason is not None:
                self.say(
                    f"the cached text ONNX graph of {self.label} is corrupt ({reason}); "
                    "rebuilding it"
                )
                discard_graph(key)
        from clipseg_cli.backends.export import timed_text_export  # the one step with torch

        estimate = recorded_seconds(STEP, self.arch) or default_seconds(self.arch)
        self.say(
            f"exporting the text graph of {self.label} for ONNX Runtime (once, "
            f"~{max(estimate, 1):.0f} s on this machine)"
        )
        data, seconds = timed_text_export(self.build_model())
        self.say(f"exported the text graph of {self.label} in {seconds:.1f} s")
        self.built.append(STEP)
        self.seconds += seconds
        record_seconds(STEP, self.arch, seconds)
        meta = {
            **graph_key_fields(self.weights_sha256, self.arch, VARIANT),
            "label": self.label,
            "build_seconds": round(seconds, 2),
        }
        try:
            return store_graph(key, data, meta)
        except OSError as error:
            if not self.warnings:
                self.warnings.append(
                    f"the ONNX graph cache {graphs_dir()} is not writable ({first_line(error)}): "
                    f"the text graph of {self.label} is kept in memory and built again next "
                    "run (set CLIPSEG_CACHE to a writable folder)"
                )
            return data


def open_text_encoder(
    weights_sha256: str,
    arch: ArchitectureSpec,
    build_model: Callable[[], ClipSegModel],
    *,
    label: str = "the model",
    on_progress: Progress | None = None,
    threads: int | None = None,
) -> TextLoad:
    """An :class:`OnnxTextEncoder` for these weights, from the cache or exported once.

    Args:
        weights_sha256: the weights' sha256 (``WeightsInfo.sha256``).
        arch: the model's architecture.
        build_model: returns the float32 :class:`ClipSegModel` with its text tower; called only
            when the text graph is not cached (load it with ``components={"text"}``).
        label: the model's name in messages.
        on_progress: receives one-line messages (``exporting the text graph of ... (once, ~6 s
            on this machine)``, ``exported ... in 5.8 s``, a corrupt graph being rebuilt).
        threads: intra-op threads (default: every available core).

    Raises:
        ValueError: a weights sha256 that is not a hex digest.
        BackendError: export or loading failed (one line).
    """
    builder = _Builder(weights_sha256, arch, build_model, label, on_progress or (lambda _: None))
    graph = builder.graph()
    try:
        encoder = OnnxTextEncoder(graph, threads=threads)
    except BackendError as error:
        if not isinstance(graph, Path) or builder.built:
            raise
        # Intact bytes that the runtime refuses: rebuild once from the weights.
        builder.say(f"{error}; rebuilding the text graph of {label}")
        discard_graph(graph_key(weights_sha256, arch, VARIANT))
        graph = builder.graph(force=True)
        encoder = OnnxTextEncoder(graph, threads=threads)
    return TextLoad(
        encoder=encoder,
        path=graph if isinstance(graph, Path) else None,
        built=tuple(builder.built),
        seconds=builder.seconds,
        warnings=tuple(builder.warnings),
    )
