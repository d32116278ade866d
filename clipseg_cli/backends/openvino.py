"""The OpenVINO image backend: the same cached ONNX graphs as ONNX Runtime (no second export),
compiled by OpenVINO for the CPU, in fp32, bf16 or int8.

Why OpenVINO next to ONNX Runtime: on CPUs with native bf16 (AMX on Xeons since Sapphire
Rapids, AVX512_BF16 on Zen 4/5) OpenVINO runs the graph's matrix products in bf16 on those
units when asked (``INFERENCE_PRECISION_HINT``); ONNX Runtime's CPU provider and torch's fp32
path leave them idle. Measured on a 2-core AMX Xeon with the project's graph (ViT-B/16 blocks
0-9 + decoder, batch 1): ONNX Runtime fp32 0.33 s/img, OpenVINO fp32 0.29, OpenVINO bf16 0.087.
Which one a run uses is measured per machine (:mod:`.tuning`), not assumed.

Precisions:

* ``fp32``: exact to 1e-4 of the logits' magnitude (tested against torch);
* ``bf16``: only on CPUs with native bf16 (refused elsewhere: OpenVINO would emulate it,
  slower than fp32); masks agree with fp32's as measured by :mod:`.tuning`;
* ``int8``: the fp32 graph with every matrix product's weights stored in int8 (symmetric, one
  scale per output channel, from the weights alone: no calibration), dequantised by a
  Convert + Multiply that OpenVINO's CPU plugin folds into its matrix kernels, so the weights
  stay int8 in memory (:func:`compress_weights`). Made once per graph and kept as an OpenVINO
  IR next to the compiled blobs. Measured on a 2-core Xeon with AVX512_VNNI (no bf16), random
  full-size weights, batch 1, the machine loaded: 0.34 s/img against OpenVINO fp32's 0.53 and
  318 MB resident after the first inference against 708 MB; masks IoU 0.987 against fp32. It
  replaced compiling ONNX Runtime's dynamically quantised graph (the cache's ``int8``
  variant), which OpenVINO cannot fuse (DynamicQuantizeLinear + MatMulInteger): it decompressed
  those weights to fp32 and ran *slower* than fp32 (33.4 s against 26.6 s for 48 images, 1142 MB
  peak for a 1-prompt run). NNCF's calibrated static int8 was measured too (0.80 s/img against
  3.00 fp32 on a loaded AMX Xeon, IoU 0.967, but 429 s of calibration and nncf's scikit-learn /
  scipy dependencies). ONNX Runtime's int8 (``--backend onnx``), whose activations are quantised
  too, is faster still where VNNI is (0.21 s/img in a run): under ``--precision int8`` the
  measured choice (:mod:`.tuning`) decides between them.

Compiled models are cached by OpenVINO itself (``CACHE_DIR`` under the project's cache), so a
warm run loads the compiled blob instead of compiling again. OpenVINO maps the blob into memory
and, at the first inference, repacks each matrix's weights into its own buffers; from then on
the mapped pages of the blob are not read, yet count in the process's RSS (about 290 MB of the
fp32 ViT-B/16 graph, measured: 708 MB after the first inference, 435 MB once they are handed
back, the same logits bit for bit). :func:`release_mapped_blobs` hands them back after the first
inference. Importing this module imports
numpy and openvino, never torch or onnxruntime.
"""

from __future__ import annotations

import ctypes
import os
import sys
import tempfile
import threading
from functools import cache
from pathlib import Path

import numpy as np
import openvino as ov
import openvino.opset13 as opset

from clipseg_cli.backends.base import BackendError, check_inputs, empty_logits
from clipseg_cli.backends.machine import available_cores, native_bf16
from clipseg_cli.errors import first_line
from clipseg_cli.io.cache import cache_dir

#: Precisions this backend runs, and the cached graph each compiles (int8 compresses the fp32
#: graph's weights itself: :func:`compress_weights`).
PRECISION_GRAPHS = {"fp32": "fp32", "bf16": "fp32", "int8": "fp32"}
#: Weight matrices with fewer elements stay fp32 under int8 (the decoder's small projections:
#: a scale per channel would cost more than it saves).
MIN_COMPRESSED_WEIGHTS = 65_536
_INFERENCE_PRECISION = {"fp32": "f32", "bf16": "bf16", "int8": "f32"}


@cache
def _core() -> ov.Core:
    return ov.Core()


def openvino_version() -> str:
    """OpenVINO's version (``2026.4.1``), without its build suffix."""
    return ov.__version__.split("-")[0]


def openvino_capabilities() -> tuple[str, ...]:
    """What OpenVINO's CPU plugin says this CPU computes natively (``BF16``, ``INT8``, ...)."""
    try:
        return tuple(_core().get_property("CPU", "OPTIMIZATION_CAPABILITIES"))
    except RuntimeError:
        return ()


def model_cache_dir() -> Path | None:
    """Where OpenVINO keeps compiled blobs (``CLIPSEG_CACHE/openvino``), or None when that
    folder cannot be made (the model is then compiled on every run)."""
    folder = cache_dir() / "openvino"
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError:
        return None
    return folder if os.access(folder, os.W_OK) else None


class OpenVinoImageBackend:
    """:class:`~clipseg_cli.backends.base.ImageBackend` on an OpenVINO compiled model.

    Args:
        graph: the cached graph's path, or its serialised bytes (an in-memory graph).
        precision: ``fp32``, ``bf16`` (native bf16 CPUs only) or ``int8`` (``graph`` must then
            be the int8 graph).
        threads: inference threads (default: every available core).

    Raises:
        ValueError: ``bf16`` on a CPU without native bf16.
        BackendError: OpenVINO cannot read or compile the graph, or it is not an image graph.
    """

    name = "openvino"

    def __init__(
        self, graph: str | Path | bytes, *, precision: str = "fp32", threads: int | None = None
    ) -> None:
        if precision not in PRECISION_GRAPHS:
            raise ValueError(
                f"OpenVINO precision {precision!r}: expected one of {', '.join(PRECISION_GRAPHS)}"
            )
        if precision == "bf16" and not native_bf16():
            raise ValueError(
                "--backend openvino --precision bf16 needs a CPU with native bf16 (AVX512_BF16 "
                "or AMX); this one has neither (use fp32, or int8)"
            )
        self.precision = precision
        self.variant = PRECISION_GRAPHS[precision]
        self.path = None if isinstance(graph, bytes) else Path(graph)
        self.threads = threads or available_cores()
        where = self.path or "the in-memory graph"
        config = {
            "INFERENCE_PRECISION_HINT": _INFERENCE_PRECISION[precision],
            "INFERENCE_NUM_THREADS": self.threads,
            "PERFORMANCE_HINT": "LATENCY",
            "NUM_STREAMS": 1,
            # Pinning would tie OpenVINO's threads to cores the decode/write threads need.
            "ENABLE_CPU_PINNING": False,
        }
        blobs = model_cache_dir() if self.path is not None else None
        if blobs is not None:
            config["CACHE_DIR"] = str(blobs)
        try:
            # From the path, OpenVINO loads its compiled blob without parsing the ONNX file
            # (measured: 0.76 s and 728 MB peak against 2.35 s and 851 MB via read_model).
            self.compiled = self._compile(graph, config)
        except RuntimeError as error:
            raise BackendError(f"OpenVINO cannot compile {where} ({first_line(error)})") from None
        inputs = {port.get_any_name(): port for port in self.compiled.inputs}
        pixels, conditionals = inputs.get("pixels"), inputs.get("conditionals")
        if (
            pixels is None
            or conditionals is None
            or pixels.get_element_type() != ov.Type.u8
            or pixels.get_partial_shape().rank.get_length() != 4
            or not pixels.get_partial_shape()[1].is_static
            or not conditionals.get_partial_shape()[1].is_static
        ):
            raise BackendError(f"{where} is not a CLIPSeg image graph")
        self.input_size: int = pixels.get_partial_shape()[1].get_length()
        self.embed_dim: int = conditionals.get_partial_shape()[1].get_length()
        self._request = self.compiled.create_infer_request()
        # One infer request serves every caller (the server's batcher, a run's model thread).
        self._lock = threading.Lock()
        self._blobs = blobs  # whose mapped pages are handed back after the first inference

    def _compile(self, graph: str | Path | bytes, config: dict) -> ov.CompiledModel:
        if self.precision != "int8":
            return _core().compile_model(self._source(graph), "CPU", config)
        folder = model_cache_dir() if self.path is not None else None
        try:
            compressed = int8_model_path(self.path, folder) if folder is not None else None
        except OSError:  # the IR cannot be kept
            compressed = None
        if compressed is None:  # compressed in memory, on every run
            model = self._source(graph)
            model = _core().read_model(model) if isinstance(model, str) else model
            compress_weights(model)
            return _core().compile_model(model, "CPU", config)
        try:
            return _core().compile_model(str(compressed), "CPU", config)
        except RuntimeError:  # a damaged IR: made again, once
            compressed.unlink(missing_ok=True)
            compressed.with_suffix(".bin").unlink(missing_ok=True)
            return _core().compile_model(str(int8_model_path(self.path, folder)), "CPU", config)

    def _source(self, graph: str | Path | bytes) -> str | ov.Model:
        """What to compile: the graph's path, or in-memory bytes read into a model (OpenVINO
        reads files only: they go through a private temporary file)."""
        if not isinstance(graph, bytes):
            return str(graph)
        try:
            with tempfile.TemporaryDirectory(prefix="clipseg-ov-") as folder:
                source = Path(folder) / "graph.onnx"
                source.write_bytes(graph)
                return _core().read_model(str(source))
        except RuntimeError as error:
            raise BackendError(
                f"OpenVINO cannot read the in-memory graph ({first_line(error)})"
            ) from None

    def logits(self, pixels: np.ndarray, conditionals: np.ndarray) -> np.ndarray:
        """uint8 ``[B, S, S, 3]`` and ``[K, D]`` -> float32 logits ``[B, K, S, S]``."""
        pixels, conditionals = check_inputs(pixels, conditionals, self.input_size, self.embed_dim)
        if pixels.shape[0] == 0 or conditionals.shape[0] == 0:
            return empty_logits(pixels.shape[0], conditionals.shape[0], self.input_size)
        with self._lock:
            self._request.infer({"pixels": pixels, "conditionals": conditionals})
            out = self._request.get_output_tensor(0).data
            if self._blobs is not None:  # the weights are repacked now
                release_mapped_blobs(self._blobs)
                self._blobs = None
            return np.array(out, dtype=np.float32, copy=True)


def compress_weights(model: ov.Model) -> int:
    """In place: the constant fp32 weight matrix of each matrix product (``MatMul`` input 1,
    at least :data:`MIN_COMPRESSED_WEIGHTS` elements) stored in int8 with one scale per output
    channel (the largest magnitude / 127), dequantised by Convert + Multiply. Returns how many
    matrices were compressed."""
    compressed = 0
    for node in model.get_ordered_ops():
        if node.get_type_name() != "MatMul":
            continue
        source = node.input_value(1).get_node()
        if source.get_type_name() != "Constant":
            continue
        weights = source.get_data()
        if (
            weights.ndim != 2
            or weights.dtype != np.float32
            or weights.size < MIN_COMPRESSED_WEIGHTS
        ):
            continue
        # [K, N] weights reduce over axis 0; transposed ones ([N, K]) over axis 1.
        axis = 1 if node.get_attributes().get("transpose_b", False) else 0
        largest = np.abs(weights).max(axis=axis, keepdims=True)
        scale = np.where(largest > 0, largest / 127.0, 1.0).astype(np.float32)
        quantised = np.clip(np.round(weights / scale), -127, 127).astype(np.int8)
        dequantised = opset.multiply(
            opset.convert(opset.constant(quantised), ov.Type.f32), opset.constant(scale)
        )
        node.input(1).replace_source_output(dequantised.output(0))
        compressed += 1
    return compressed


def int8_model_state(graph: Path | bytes) -> str:
    """Where the OpenVINO int8 IR of ``graph`` (:func:`int8_model_path`) stands: ``ready``
    (made already), ``to make`` (made now and kept), or ``in memory`` (an in-memory graph, or
    a cache that cannot keep it: compressed again on every run)."""
    folder = model_cache_dir() if not isinstance(graph, bytes) else None
    if folder is None:
        return "in memory"
    try:
        target = _int8_target(Path(graph), folder)
    except OSError:  # the graph is gone: nothing made from it can be ready
        return "to make"
    return "ready" if target.exists() and target.with_suffix(".bin").exists() else "to make"


def _int8_target(graph: Path, folder: Path) -> Path:
    stat = graph.stat()
    return folder / f"{graph.stem}.{stat.st_size}.{stat.st_mtime_ns}.int8.xml"


def int8_model_path(graph: Path, folder: Path) -> Path:
    """The OpenVINO IR of ``graph`` with :func:`compress_weights` applied, in ``folder``:
    made on first use (written under a private name, then renamed: the ``.bin`` first, the
    ``.xml`` last, so an ``.xml`` is never seen without its weights). Named after the graph's
    file and its size and modification time, so a graph exported again gets a new one."""
    target = _int8_target(graph, folder)
    if target.exists() and target.with_suffix(".bin").exists():
        return target
    model = _core().read_model(str(graph))
    compress_weights(model)
    staging = folder / f".{target.stem}.{os.getpid()}.{threading.get_ident()}.xml"
    try:
        ov.save_model(model, str(staging), compress_to_fp16=False)
        staging.with_suffix(".bin").replace(target.with_suffix(".bin"))
        staging.replace(target)
    finally:
        staging.unlink(missing_ok=True)
        staging.with_suffix(".bin").unlink(missing_ok=True)
    return target


#: madvise's advice that drops a mapping's pages (Linux: the kernel reads them again from the
#: page cache if they are touched).
_MADV_DONTNEED = 4


def release_mapped_blobs(folder: Path) -> int:
    """Hand back to the system the resident pages of this process's read-only shared mappings
    of files in ``folder`` (OpenVINO's compiled blobs); returns how many mappings.

    Only ``r--s`` mappings: a read-only shared mapping of a file never holds data of its own,
    so dropping its pages loses nothing (a later read faults them in again from the file).
    Linux only (elsewhere: 0, nothing done).
    """
    if not sys.platform.startswith("linux"):
        return 0
    prefix = str(folder.resolve()) + os.sep
    try:
        lines = Path("/proc/self/maps").read_text(encoding="utf-8", errors="replace").splitlines()
    except OSError:
        return 0
    madvise = ctypes.CDLL(None, use_errno=True).madvise
    madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    released = 0
    for line in lines:
        fields = line.split(maxsplit=5)
        if len(fields) < 6 or fields[1] != "r--s" or not fields[5].strip().startswith(prefix):
            continue
        start, end = (int(bound, 16) for bound in fields[0].split("-"))
        released += madvise(start, end - start, _MADV_DONTNEED) == 0
    return released
