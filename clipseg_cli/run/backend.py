"""Which backend runs a run's image side (vision blocks + decoder), and opening it.

On GPUs it is torch. On the CPU, ``--backend auto`` is whichever CPU runtime of the cached
graphs (ONNX Runtime or OpenVINO) and precision is fastest *on this machine*, measured once per
model and machine and remembered (:mod:`clipseg_cli.backends.tuning`): the machines differ too
much to assume (ONNX Runtime fp32 is the best on an AVX2-only Zen 3; OpenVINO bf16 is several
times faster on CPUs with AMX or AVX512_BF16). ``--precision auto`` on the CPU chooses between
fp32 and bf16 (where native) among candidates whose masks agree with fp32's; ``--precision
fp32`` stays exact; int8 is opt-in.

The fp32 CPU backends give the same logits as torch to 1e-4 of their magnitude, so the runtime
is recorded in the summary but is not part of a run's fingerprint. The precision *class* is
(exact fp32 vs reduced): a run folder notes it, and a resume keeps it (:func:`kept_choice`).

Deciding is torch-free unless a GPU may be present (``--device auto`` on a machine with an
NVIDIA driver, or a Mac): a warm CPU run with a cached graph and choice never imports torch.
"""

from __future__ import annotations

import platform
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from clipseg_cli.backends import machine
from clipseg_cli.backends.base import ImageBackend
from clipseg_cli.errors import ConfigMismatchError
from clipseg_cli.run.config import SegmentConfig
from clipseg_cli.specs import PRECISION_DTYPES, ArchitectureSpec, device_type

#: What segmenting needs: the vision blocks the decoder reads, and the decoder.
SEGMENTATION_PARTS = frozenset({"vision", "decoder"})
#: The runtimes of the cached graphs (the CPU backends besides torch).
CPU_RUNTIMES = ("onnx", "openvino")


def native_bf16() -> bool | None:
    """Whether the CPU computes bf16 natively (:func:`clipseg_cli.backends.machine.native_bf16`)."""
    return machine.native_bf16()


def _gpu_possible() -> bool:
    """Whether ``--device auto`` could find a GPU: an NVIDIA driver, or Apple silicon (MPS).
    False means the CPU for certain, without importing torch."""
    if Path("/proc/driver/nvidia/gpus").is_dir() or Path("/dev/nvidia0").exists():
        return True
    return platform.system() == "Darwin" and platform.machine() == "arm64"


@dataclass(frozen=True)
class BackendChoice:
    """The resolved ``--backend``, ``--device`` and ``--precision`` of a run. On the CPU,
    ``name`` and ``precision`` may still be ``auto`` until measured (:attr:`settled`)."""

    name: str  # "torch", "onnx", "openvino", or "auto" (a CPU runtime, to be measured)
    device: str  # "cpu", "cuda", "cuda:1", "mps"
    precision: str  # "fp32", "bf16", "fp16", "int8", or "auto" (to be measured)
    notes: tuple[str, ...] = ()  # one-line warnings for the user
    #: How a measured choice was made (the tuning record's summary), for the run summary.
    tuning: dict | None = field(default=None, compare=False)

    @property
    def device_type(self) -> str:
        return device_type(self.device)

    @property
    def settled(self) -> bool:
        """Whether the runtime and precision are known (nothing left to measure)."""
        return self.name != "auto" and self.precision != "auto"

    @property
    def cpu_runtime(self) -> bool:
        """Whether the image side runs on a CPU runtime of the cached graphs (not torch): then
        text prompts are embedded through the text graph too, without torch."""
        return self.device == "cpu" and self.name in ("auto", *CPU_RUNTIMES)

    @property
    def graph_variant(self) -> str:
        """The ONNX graph this choice runs (``fp32`` or ``int8``): ONNX Runtime's int8 runs the
        quantised graph; OpenVINO's compresses the fp32 graph's weights itself."""
        return "int8" if self.precision == "int8" and self.name == "onnx" else "fp32"


def choose_backend(config: SegmentConfig) -> BackendChoice:
    """Resolve ``auto`` for the device, and for the backend and precision where that needs no
    measurement; a CPU choice left ``auto`` is measured by :meth:`ModelOpener.settle`.

    Raises:
        ValueError: the device is not available, or a combination this CPU cannot run (one
            line).
    """
    cpu_only = config.backend in CPU_RUNTIMES or config.precision == "int8" or not _gpu_possible()
    if config.device == "cpu" or (config.device == "auto" and cpu_only):
        device = "cpu"
    else:
        from clipseg_cli.segmenter import resolve_device  # torch: a GPU may be there

        device = str(resolve_device(config.device))
    if device != "cpu":
        return _gpu_choice(config, device)
    return _cpu_choice(config.backend, config.precision)


def _gpu_choice(config: SegmentConfig, device: str) -> BackendChoice:
    if config.backend in CPU_RUNTIMES:
        raise ValueError(f"--backend {config.backend} runs on the CPU, not on {device}")
    if config.precision == "int8":
        raise ValueError(f"--precision int8 runs on the CPU, not on {device}")
    precision = config.precision
    if precision == "auto":
        from clipseg_cli.model.precision import precision_name
        from clipseg_cli.segmenter import resolve_device, resolve_precision

        precision = precision_name(resolve_precision("auto", resolve_device(device)))
    return BackendChoice("torch", device, precision)


def _cpu_choice(backend: str, precision: str) -> BackendChoice:
    native = native_bf16()
    emulated = (
        "--precision bf16: this CPU has no native bf16 (no AVX512_BF16 or AMX in its flags); "
        "torch emulates it, several times slower than fp32"
    )
    if backend == "torch":
        precision = "fp32" if precision == "auto" else precision
        notes = (emulated,) if precision == "bf16" and native is False else ()
        return BackendChoice("torch", "cpu", precision, notes)
    if backend == "onnx":
        # ONNX Runtime runs fp32 (exact) or the int8 graph; nothing to measure.
        return BackendChoice("onnx", "cpu", "fp32" if precision == "auto" else precision)
    if precision == "fp16":
        return BackendChoice("torch", "cpu", "fp16")
    if precision == "bf16" and not native:
        if backend == "openvino":
            raise ValueError(
                "--backend openvino --precision bf16 needs a CPU with native bf16 (AVX512_BF16 "
                "or AMX); this one has neither: use --precision fp32, or --backend torch to "
                "emulate bf16"
            )
        return BackendChoice("torch", "cpu", "bf16", (emulated,) if native is False else ())
    if backend == "auto" and not machine.runtime_available("openvino"):
        backend = "onnx"  # the one runtime there is: nothing to measure between runtimes
        if precision == "auto":
            precision = "fp32"
    return BackendChoice(backend, "cpu", precision)


def kept_choice(
    choice: BackendChoice, kept_precision: str | None, kept_runtime: str | None = None
) -> BackendChoice:
    """The choice for a run that continues a folder whose masks were made in
    ``kept_precision`` by ``kept_runtime`` (the ledger's notes; None for a new folder).

    ``--precision auto`` keeps the folder's precision class: a folder finished in fp32 is
    continued in fp32 (exact) even where bf16 is now faster, and a reduced-precision folder in
    the same precision when this CPU has it. ``--backend auto`` keeps the folder's CPU runtime
    where it is installed: ONNX Runtime and OpenVINO agree to 1e-4 of the logits' magnitude, but
    a pixel on the threshold may fall either way, and a resumed folder's exports must equal an
    uninterrupted run's (a second measurement could pick the other, equally fast runtime); so
    does a named precision under ``--backend auto`` (``--precision int8``: ONNX Runtime's int8
    and OpenVINO's are different quantisations) when the folder was made in it. A
    folder made in bf16 on a CPU with native bf16 that is resumed on one without it cannot be
    continued identically: that is an explained :class:`ConfigMismatchError`, not a silent
    switch to fp32.

    Raises:
        ConfigMismatchError: the folder's precision cannot be had on this machine.
    """
    if kept_precision is None or choice.device != "cpu":
        return choice
    runtime = choice.name
    if (
        runtime == "auto"
        and kept_runtime in CPU_RUNTIMES
        and machine.runtime_available(kept_runtime)
    ):
        runtime = kept_runtime
    if choice.precision != "auto":  # named: the runtime is kept where the precision is the same
        same = choice.precision == kept_precision and runtime != choice.name
        return _cpu_choice(runtime, choice.precision) if same else choice
    if kept_precision not in ("fp32", "bf16"):  # fp16 of a GPU: the CPU measures its own
        return choice
    if kept_precision == "fp32":
        return _cpu_choice(runtime, "fp32")
    if kept_precision == "bf16" and not native_bf16():
        raise ConfigMismatchError(
            "this --out folder's masks were made in bf16 (on a CPU with native bf16); this "
            "CPU has none, so they cannot be continued alike: rerun with --precision fp32 "
            "into a new --out, or with --backend torch --precision bf16 (emulated, slow) to "
            "continue here"
        )
    return _cpu_choice(runtime, kept_precision)


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
        if not choice.settled:
            choice = self.settle(choice)
        if choice.name in CPU_RUNTIMES:
            return self._open_cpu_runtime(choice, threads)
        return self._open_torch(choice, threads)

    def on(self, device_type: str) -> ModelOpener:
        """This opener for actors on ``device_type`` (``cpu``, or a GPU type: resolved there).
        CPU actors run the driver's CPU choice when it made one (measured on the driver's
        machine, which a cluster's CPU nodes usually match), else their own."""
        if device_type != "cpu":
            return replace(self, choice=None, on_progress=None)
        if self.choice is not None and self.choice.device == "cpu":
            return replace(self, on_progress=None)
        return replace(
            self,
            choice=choose_backend(replace(self.config, device="cpu")),
            on_progress=None,
        )

    def prepare(self) -> None:
        """Make sure the graph is cached (exported here, once) before actors open it."""
        if self.choice is not None and self.choice.name in CPU_RUNTIMES:
            self._open_cpu_runtime(self.choice, threads=1)

    def settle(self, choice: BackendChoice, *, force: bool = False) -> BackendChoice:
        """``choice`` with its runtime and precision decided: a CPU choice left ``auto`` is
        looked up in the tuning cache, or measured now (:func:`~clipseg_cli.backends.tuning.
        tuned`); ``force`` measures again (``clipseg tune``). Settled choices come back as
        they are unless forced.

        Raises:
            BackendError: no candidate could run, or none agrees with fp32.
        """
        if choice.device != "cpu" or (choice.settled and not force):
            return choice
        from clipseg_cli.backends.base import BackendError
        from clipseg_cli.backends.tuning import tuned

        runtime = choice.name if choice.name in CPU_RUNTIMES else "auto"
        precision = choice.precision
        found = tuned(
            self.weights_sha256,
            self.arch,
            self.open_candidate,
            precision=precision,
            runtime=runtime,
            label=self.label,
            force=force,
            on_progress=self.on_progress,
        )
        record = found.record
        if record.chosen is None:
            tried = "; ".join(
                f"{m.runtime} {m.precision}: "
                + (m.error or (f"masks IoU {m.iou} against fp32" if m.iou is not None else "?"))
                for m in record.measurements
            )
            raise BackendError(
                f"no CPU backend could run {self.label} in {precision} precision here ({tried})"
            )
        return replace(
            choice,
            name=record.chosen.runtime,
            precision=record.chosen.precision,
            tuning=record.summary(found.source),
        )

    def open_candidate(self, candidate: Any, threads: int | None = None) -> ImageBackend:
        """The image backend of a tuning candidate (a runtime and a precision)."""
        choice = BackendChoice(candidate.runtime, "cpu", candidate.precision)
        return self._open_cpu_runtime(choice, threads).backend

    def _open_openvino(self, graph: Path | bytes, precision: str, threads: int | None) -> Any:
        """OpenVINO's backend on ``graph``; for int8, said while its weights are compressed
        (the first time, and on every run where the cache cannot keep them)."""
        from clipseg_cli.backends.cache import record_seconds, recorded_seconds
        from clipseg_cli.backends.onnx import default_seconds
        from clipseg_cli.backends.openvino import OpenVinoImageBackend, int8_model_state

        state = int8_model_state(graph) if precision == "int8" else "ready"
        if state == "ready":
            return OpenVinoImageBackend(graph, precision=precision, threads=threads)
        step = "openvino-int8"
        say = self.on_progress or (lambda _: None)
        guess = recorded_seconds(step, self.arch) or default_seconds(step, self.arch)
        when = "once" if state == "to make" else "on every run: the cache cannot keep it"
        say(
            f"compressing the image graph of {self.label} to int8 weights for OpenVINO "
            f"({when}, ~{guess:.0f} s on this machine)"
        )
        start = time.perf_counter()
        backend = OpenVinoImageBackend(graph, precision=precision, threads=threads)
        seconds = time.perf_counter() - start
        record_seconds(step, self.arch, seconds)
        say(f"compressed and compiled the int8 graph of {self.label} in {seconds:.1f} s")
        return backend

    def _open_cpu_runtime(self, choice: BackendChoice, threads: int | None) -> OpenedModel:
        from clipseg_cli.backends.onnx import OnnxImageBackend, open_graph

        def runtime(graph: Path | bytes) -> Any:
            if choice.name == "openvino":
                return self._open_openvino(graph, choice.precision, threads)
            return OnnxImageBackend(graph, threads=threads, variant=choice.graph_variant)

        loaded = open_graph(
            self.weights_sha256,
            self.arch,
            self._fp32_model,
            runtime,
            variant=choice.graph_variant,
            label=self.label,
            on_progress=self.on_progress,
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
            "backend": choice.name,
            "device": "cpu",
            "dtype": PRECISION_DTYPES[choice.precision],
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
