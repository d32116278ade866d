"""The ONNX Runtime image backend, and finding or building its graph.

:class:`OnnxImageBackend` runs an exported image graph (:mod:`.export`) on ONNX Runtime's CPU
execution provider: all cores for intra-op work, inter-op parallelism off, graph optimisations
on, and worker threads that sleep instead of spinning while they wait (spinning threads take the
cores that decode and write threads need between two model calls; measured in
bench/onnx_bench.py to cost no model speed).

:func:`open_onnx_backend` is what a caller uses: the graph comes from the cache
(:mod:`.cache`) when it is there and intact, else it is exported (the only step that needs
torch, imported then) and/or quantised, stored, and loaded; a read-only cache keeps it in
memory and says so in :attr:`OnnxLoad.warnings`.

Importing this module imports numpy and onnxruntime, never torch.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import onnxruntime as ort

from clipseg_cli.backends import IMAGE_VARIANTS
from clipseg_cli.backends.base import BackendError, check_inputs, empty_logits
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
from clipseg_cli.backends.machine import available_cores
from clipseg_cli.errors import first_line
from clipseg_cli.specs import ArchitectureSpec

if TYPE_CHECKING:
    from clipseg_cli.model.clipseg import ClipSegModel

Progress = Callable[[str], None]


def session_options(threads: int | None = None, spinning: bool = False) -> ort.SessionOptions:
    """ONNX Runtime session options: ``threads`` intra-op threads (default: every available
    core), sequential execution, all graph optimisations, spinning off unless asked for."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads or available_cores()
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.add_session_config_entry("session.intra_op.allow_spinning", "1" if spinning else "0")
    options.add_session_config_entry("session.inter_op.allow_spinning", "1" if spinning else "0")
    options.log_severity_level = 3  # errors only: ONNX Runtime's own warnings go nowhere
    return options


class OnnxImageBackend:
    """:class:`~clipseg_cli.backends.base.ImageBackend` on an ONNX Runtime session.

    Args:
        graph: the graph's path, or its serialised bytes (an in-memory graph).
        threads: intra-op threads (default: every available core).
        spinning: let idle worker threads spin (ONNX Runtime's default; off here).
        variant: ``fp32`` or ``int8``, for the record.

    Raises:
        BackendError: ONNX Runtime cannot load the graph, or it is not an image graph.
    """

    name = "onnx"

    def __init__(
        self,
        graph: str | Path | bytes,
        *,
        threads: int | None = None,
        spinning: bool = False,
        variant: str = "fp32",
    ) -> None:
        self.variant = variant
        self.path = None if isinstance(graph, bytes) else Path(graph)
        self.threads = threads or available_cores()
        source = graph if isinstance(graph, bytes) else str(graph)
        try:
            self.session = ort.InferenceSession(
                source,
                sess_options=session_options(self.threads, spinning),
                providers=["CPUExecutionProvider"],
            )
        except Exception as error:  # InvalidProtobuf, Fail, NoSuchFile ... from the runtime
            where = self.path or "the in-memory graph"
            raise BackendError(f"ONNX Runtime cannot load {where} ({first_line(error)})") from None
        inputs = {i.name: i for i in self.session.get_inputs()}
        pixels, conditionals = inputs.get("pixels"), inputs.get("conditionals")
        if (
            pixels is None
            or conditionals is None
            or pixels.type != "tensor(uint8)"
            or len(pixels.shape) != 4
            or not isinstance(pixels.shape[1], int)
            or not isinstance(conditionals.shape[1], int)
        ):
            raise BackendError(f"{self.path or 'the graph'} is not a CLIPSeg image graph")
        self.input_size: int = pixels.shape[1]
        self.embed_dim: int = conditionals.shape[1]

    def logits(self, pixels: np.ndarray, conditionals: np.ndarray) -> np.ndarray:
        """uint8 ``[B, S, S, 3]`` and ``[K, D]`` -> float32 logits ``[B, K, S, S]``."""
        pixels, conditionals = check_inputs(pixels, conditionals, self.input_size, self.embed_dim)
        if pixels.shape[0] == 0 or conditionals.shape[0] == 0:
            return empty_logits(pixels.shape[0], conditionals.shape[0], self.input_size)
        (out,) = self.session.run(["logits"], {"pixels": pixels, "conditionals": conditionals})
        return out


@dataclass(frozen=True)
class OnnxLoad:
    """What :func:`open_graph` (and :func:`open_onnx_backend`) found or built."""

    #: The runtime's backend on the graph (:class:`OnnxImageBackend`, or OpenVINO's).
    backend: Any
    variant: str
    #: The cached graph file, or None when the graph lives in memory only.
    path: Path | None
    #: The steps done now (``export``, ``int8``); empty when the graph came from the cache.
    built: tuple[str, ...]
    #: Seconds those steps took.
    seconds: float
    #: One-line warnings for the user (a cache that could not be written).
    warnings: tuple[str, ...] = ()


def default_seconds(step: str, arch: ArchitectureSpec) -> float:
    """A first guess of how long ``step`` takes before this machine has done it once (then
    :func:`~clipseg_cli.backends.cache.recorded_seconds` knows). Tracing costs the same for any
    width: measured on 2 cores of an AMD EPYC (Zen 5), ~8 s to export ViT-B/16's blocks 0-9 and
    the decoder on an idle machine (13-18 s while another job ran), ~7 s for a tiny model;
    ~5 s to quantise ViT-B/16, ~0.2 s a tiny model."""
    vision = arch.vision
    blocks = arch.last_needed_layer + 1
    millions = blocks * 12 * vision.width**2 / 1e6  # ~71 M parameters for ViT-B/16
    if step == "int8":
        return 0.3 + 0.065 * millions
    if step == "openvino-int8":  # ~9 s for ViT-B/16 on 2 cores of a Xeon (AVX512_VNNI)
        return 1.0 + 0.12 * millions
    return 6.0 + 0.03 * millions


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

    def estimate(self, step: str) -> str:
        seconds = recorded_seconds(step, self.arch) or default_seconds(step, self.arch)
        return f"~{seconds:.0f} s" if seconds >= 1.5 else "~1 s"

    def graph(self, variant: str, *, force: bool = False) -> Path | bytes:
        """The graph of ``variant``: a verified cached file, else built (and stored if the
        cache can be written, else returned as bytes)."""
        key = graph_key(self.weights_sha256, self.arch, variant)
        if not force:
            path, reason = verify_graph(key)
            if path is not None:
                return path
            if reason is not None:
                self.say(
                    f"the cached {variant} ONNX graph of {self.label} is corrupt ({reason}); "
                    "rebuilding it"
                )
                discard_graph(key)
        if variant == "fp32":
            from clipseg_cli.backends.export import timed_export  # the one step that needs torch

            self.say(
                f"exporting the image graph of {self.label} for the CPU runtimes (once, "
                f"{self.estimate('export')} on this machine)"
            )
            data, seconds = timed_export(self.build_model())
            self.say(f"exported the image graph of {self.label} in {seconds:.1f} s")
            step = "export"
        else:
            from clipseg_cli.backends.quantize import timed_quantize

            source = self.graph("fp32")
            self.say(
                f"quantising the image graph of {self.label} to int8 (once, "
                f"{self.estimate('int8')} on this machine)"
            )
            data, seconds = timed_quantize(source)
            self.say(f"quantised the image graph of {self.label} to int8 in {seconds:.1f} s")
            step = "int8"
        self.built.append(step)
        self.seconds += seconds
        record_seconds(step, self.arch, seconds)
        meta = {
            **graph_key_fields(self.weights_sha256, self.arch, variant),
            "label": self.label,
            "build_seconds": round(seconds, 2),
        }
        try:
            return store_graph(key, data, meta)
        except OSError as error:
            if not self.warnings:
                self.warnings.append(
                    f"the ONNX graph cache {graphs_dir()} is not writable ({first_line(error)}): "
                    f"the image graph of {self.label} is kept in memory and built again next "
                    "run (set CLIPSEG_CACHE to a writable folder)"
                )
            return data


def open_graph(
    weights_sha256: str,
    arch: ArchitectureSpec,
    build_model: Callable[[], ClipSegModel],
    runtime: Callable[[Path | bytes], Any],
    *,
    variant: str = "fp32",
    label: str = "the model",
    on_progress: Progress | None = None,
) -> OnnxLoad:
    """Open the cached image graph of ``variant`` with ``runtime`` (ONNX Runtime's or
    OpenVINO's backend class, given the graph's path or bytes): the graph comes from the cache,
    or is exported/quantised once and stored. Graph bytes that are intact but refused by the
    runtime (:class:`BackendError`) are rebuilt once from the weights.

    Raises:
        ValueError: unknown variant, or a weights sha256 that is not a hex digest.
        BackendError: export, quantisation or loading failed (one line).
    """
    if variant not in IMAGE_VARIANTS:
        raise ValueError(f"graph variant {variant!r}: expected one of {', '.join(IMAGE_VARIANTS)}")
    builder = _Builder(weights_sha256, arch, build_model, label, on_progress or (lambda _: None))
    graph = builder.graph(variant)
    try:
        backend = runtime(graph)
    except BackendError as error:
        if not isinstance(graph, Path) or builder.built:
            raise
        builder.say(f"{error}; rebuilding the {variant} graph of {label}")
        discard_graph(graph_key(weights_sha256, arch, variant))
        if variant == "int8":
            discard_graph(graph_key(weights_sha256, arch, "fp32"))
        graph = builder.graph(variant, force=True)
        backend = runtime(graph)
    return OnnxLoad(
        backend=backend,
        variant=variant,
        path=graph if isinstance(graph, Path) else None,
        built=tuple(builder.built),
        seconds=builder.seconds,
        warnings=tuple(builder.warnings),
    )


def open_onnx_backend(
    weights_sha256: str,
    arch: ArchitectureSpec,
    build_model: Callable[[], ClipSegModel],
    *,
    variant: str = "fp32",
    label: str = "the model",
    on_progress: Progress | None = None,
    threads: int | None = None,
    spinning: bool = False,
) -> OnnxLoad:
    """An :class:`OnnxImageBackend` for these weights, from the cache or built once.

    Args:
        weights_sha256: the weights' sha256 (``WeightsInfo.sha256``).
        arch: the model's architecture (``ClipSegModel.arch``).
        build_model: returns the float32 :class:`ClipSegModel` to export; called only when the
            fp32 graph is not cached (load it with ``components={"vision", "decoder"}``).
        variant: ``fp32`` or ``int8`` (built from the fp32 graph, which is cached too).
        label: the model's name in messages (``WeightsInfo.model_id``).
        on_progress: receives one-line messages (``exporting ... (once, ~8 s on this
            machine)``, ``exported ... in 8.2 s``, a corrupt cache being rebuilt).
        threads, spinning: see :class:`OnnxImageBackend`.

    Raises:
        ValueError: unknown variant, or a weights sha256 that is not a hex digest.
        BackendError: export, quantisation or loading failed (one line).
    """

    def runtime(graph: Path | bytes) -> OnnxImageBackend:
        return OnnxImageBackend(graph, threads=threads, spinning=spinning, variant=variant)

    return open_graph(
        weights_sha256,
        arch,
        build_model,
        runtime,
        variant=variant,
        label=label,
        on_progress=on_progress,
    )
