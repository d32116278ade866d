"""Which backend runs a run's image side (vision blocks + decoder), and opening it.

``--backend auto`` is ONNX Runtime on the CPU and torch on GPUs: on the CPUs this project is
measured on, ONNX Runtime's fp32 kernels are about twice torch's (README, Benchmarks), and its
int8 graph another two. Both backends take the same uint8 pixels and float32 conditionals and
give the same logits to 1e-4 of their magnitude, so the backend is recorded in the summary but
is not part of a run's fingerprint (a run may resume on the other one).

Deciding is torch-free unless a GPU may be present (``--device auto`` on a machine with an
NVIDIA driver, or a Mac): a warm CPU run with a cached graph never imports torch.
"""

from __future__ import annotations

import platform
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from clipseg_cli.backends.base import ImageBackend
from clipseg_cli.run.config import SegmentConfig
from clipseg_cli.specs import ArchitectureSpec, device_type

#: What segmenting needs: the vision blocks the decoder reads, and the decoder.
SEGMENTATION_PARTS = frozenset({"vision", "decoder"})


def cpu_flags() -> frozenset[str] | None:
    """The CPU's feature flags as the kernel reports them (Linux), or None where unknown."""
    try:
        with Path("/proc/cpuinfo").open() as handle:
            for line in handle:
                if line.startswith(("flags", "Features")):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        return None
    return None


def native_bf16() -> bool | None:
    """Whether the CPU computes bf16 natively (AVX512_BF16 or AMX on x86, BF16 on Arm), from
    its flags; None where they cannot be read."""
    flags = cpu_flags()
    if flags is None:
        return None
    return bool(flags & {"avx512_bf16", "amx_bf16", "bf16"})


def _gpu_possible() -> bool:
    """Whether ``--device auto`` could find a GPU: an NVIDIA driver, or Apple silicon (MPS).
    False means the CPU for certain, without importing torch."""
    if Path("/proc/driver/nvidia/gpus").is_dir() or Path("/dev/nvidia0").exists():
        return True
    return platform.system() == "Darwin" and platform.machine() == "arm64"


@dataclass(frozen=True)
class BackendChoice:
    """The resolved ``--backend``, ``--device`` and ``--precision`` of a run."""

    name: str  # "torch" or "onnx"
    device: str  # "cpu", "cuda", "cuda:1", "mps"
    precision: str  # "fp32", "bf16", "fp16" or "int8"
    notes: tuple[str, ...] = ()  # one-line warnings for the user

    @property
    def device_type(self) -> str:
        return device_type(self.device)

    @property
    def cpu_runtime(self) -> bool:
        """Whether the image side runs on a CPU runtime of the cached graphs (not torch): then
        text prompts are embedded through the text graph too, without torch."""
        return self.name in ("onnx", "openvino")

    @property
    def graph_variant(self) -> str:
        """The ONNX graph this choice runs (``fp32`` or ``int8``)."""
        return "int8" if self.precision == "int8" else "fp32"


def choose_backend(config: SegmentConfig) -> BackendChoice:
    """Resolve ``auto`` for the backend, the device and the precision.

    Raises:
        ValueError: the device is not available (one line).
    """
    cpu_only = config.backend == "onnx" or config.precision == "int8" or not _gpu_possible()
    if config.device == "cpu" or (config.device == "auto" and cpu_only):
        device = "cpu"
    else:
        from clipseg_cli.segmenter import resolve_device  # torch: a GPU may be there

        device = str(resolve_device(config.device))
    precision = config.precision
    if precision == "auto":
        if device == "cpu":
            precision = "fp32"
        else:
            from clipseg_cli.model.precision import precision_name
            from clipseg_cli.segmenter import resolve_device, resolve_precision

            precision = precision_name(resolve_precision("auto", resolve_device(device)))
    if device != "cpu" and config.backend == "onnx":
        raise ValueError(f"--backend onnx runs on the CPU, not on {device}")
    if device != "cpu" and precision == "int8":
        raise ValueError(f"--precision int8 runs on the CPU, not on {device}")
    if config.backend == "auto":
        name = "onnx" if device == "cpu" and precision in ("fp32", "int8") else "torch"
    else:
        name = config.backend
    notes = ()
    if device == "cpu" and precision == "bf16" and native_bf16() is False:
        notes = (
            "--precision bf16: this CPU has no native bf16 (no AVX512_BF16 or AMX in its "
            "flags); torch emulates it, several times slower than fp32",
        )
    return BackendChoice(name, device, precision, notes)


def given_model_choice(segmenter) -> BackendChoice:
    """The choice a loaded :class:`~clipseg_cli.segmenter.Segmenter` stands for: torch, its
    device and dtype."""
    from clipseg_cli.model.precision import precision_name

    return BackendChoice("torch", str(segmenter.device), precision_name(segmenter.dtype))


@dataclass
class OpenedModel:
    """A run's image side, ready: the backend and what the summary says about it."""

    backend: ImageBackend
    device_type: str
    details: dict = field(default_factory=dict)  # device, dtype, backend (+ its graph)


@dataclass(frozen=True)
class ModelOpener:
    """Opens the run's image side where it is called: ``opener(threads=None)``. Picklable
    (each Ray actor opens its own) unless it holds a given ``segmenter`` or ``on_progress``.

    ``weights_sha256`` and ``arch`` say which graph the ONNX backend needs; the weights are only
    loaded (with torch) when that graph is not cached yet, or for the torch backend.
    """

    config: SegmentConfig
    weights_sha256: str
    arch: ArchitectureSpec
    label: str
    #: None: decided where the opener runs (a Ray actor on a GPU node picks torch on CUDA).
    choice: BackendChoice | None = None
    #: A model already loaded by the caller (the Python API): always the torch backend.
    segmenter: Any = None
    #: Receives one-line messages while a graph is exported or quantised.
    on_progress: Callable[[str], None] | None = field(default=None, compare=False)

    def __call__(self, threads: int | None = None) -> OpenedModel:
        """Open the image side; ``threads``: how many cores it may use (None: every core)."""
        if self.segmenter is not None:
            return torch_side(self.segmenter)
        choice = self.choice or choose_backend(self.config)
        if choice.name == "onnx":
            return self._open_onnx(choice, threads)
        return self._open_torch(choice, threads)

    def on(self, device_type: str) -> ModelOpener:
        """This opener for actors on ``device_type`` (``cpu``, or a GPU type: resolved there)."""
        if device_type != "cpu":
            return replace(self, choice=None, on_progress=None)
        return replace(self, choice=choose_backend(replace(self.config, device="cpu")))

    def prepare(self) -> None:
        """Make sure the ONNX graph is cached (exported here, once) before actors open it."""
        if self.choice is not None and self.choice.name == "onnx":
            self._open_onnx(self.choice, threads=1)

    def _open_onnx(self, choice: BackendChoice, threads: int | None) -> OpenedModel:
        from clipseg_cli.backends.onnx import open_onnx_backend

        loaded = open_onnx_backend(
            self.weights_sha256,
            self.arch,
            self._fp32_model,
            variant=choice.graph_variant,
            label=self.label,
            on_progress=self.on_progress,
            threads=threads,
        )
        if self.on_progress is not None:
            for warning in loaded.warnings:
                self.on_progress(warning)
        graph = {
            "variant": loaded.variant,
            "path": str(loaded.path) if loaded.path is not None else None,
            "built": list(loaded.built),
            "build_seconds": round(loaded.seconds, 2),
        }
        details = {
            "backend": "onnx",
            "device": "cpu",
            "dtype": "int8" if loaded.variant == "int8" else "float32",
            "onnx_graph": graph,
        }
        return OpenedModel(loaded.backend, "cpu", details)

    def _fp32_model(self):
        from clipseg_cli.weights import load_weights

        model, _info = load_weights(
            self.config.model,
            clip_weights=self.config.clip_weights,
            components=SEGMENTATION_PARTS,
        )
        return model

    def _open_torch(self, choice: BackendChoice, threads: int | None) -> OpenedModel:
        from clipseg_cli.segmenter import Segmenter

        if threads is not None and choice.device_type == "cpu":
            import torch

            # The thread count changes results in the last bits: set, never inherited.
            torch.set_num_threads(threads)
        segmenter = Segmenter.load(
            self.config.model,
            clip_weights=self.config.clip_weights,
            device=choice.device,
            precision=choice.precision,
            components=SEGMENTATION_PARTS,
        )
        return torch_side(segmenter)


def torch_side(segmenter) -> OpenedModel:
    """A loaded :class:`~clipseg_cli.segmenter.Segmenter` as a run's image side."""
    from clipseg_cli.backends.torch import TorchImageBackend
    from clipseg_cli.model.precision import dtype_name

    details = {
        "backend": "torch",
        "device": str(segmenter.device),
        "dtype": dtype_name(segmenter.dtype),
    }
    backend = TorchImageBackend(segmenter.model, segmenter.device)
    return OpenedModel(backend, segmenter.device.type, details)
