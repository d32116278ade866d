"""One frozen object per ``segment`` / ``matte`` run: every option is a field here.

Each field says once what it is to the run: whether it decides the outputs (then it is part of
the fingerprint that a rerun into the same ``--out`` must match, see :mod:`.ledger`) and whether
the run summary records it. :meth:`SegmentConfig.describe` and
:meth:`SegmentConfig.fingerprint_parts` are derived from that, never listed by hand.

Validation raises ``ValueError`` with a one-line message; the commands turn it into a usage
error. Light: standard library only (a rerun over a finished folder checks the fingerprint
without numpy or torch).
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from pathlib import Path
from types import MappingProxyType
from typing import Any

from clipseg_cli.io.files import file_identity, sha256_file
from clipseg_cli.io.naming import COMMAND_KINDS, EXPORT_FORMATS, LOG_NAME, SUMMARY_NAME
from clipseg_cli.specs import (
    BACKENDS,
    DEFAULT_BATCH_SIZES,
    DEFAULT_MAX_PIXELS,
    DEFAULT_MIN_AREA_FRACTION,
    DEFAULT_MIN_SCORE,
    DEFAULT_MODEL,
    DEFAULT_SAM_MODEL,
    DEFAULT_SEGMENT_FRAMES,
    DEFAULT_SMOOTH,
    DEFAULT_THRESHOLD,
    DEVICES,
    PRECISIONS,
    REFINE_METHODS,
    SMOOTH_MODES,
    SPLIT_MODES,
    VIDEO_CODECS,
    is_device_name,
    resolve_model,
)

REF_MODES = ("raw", "engineered")
COCO_SEGMENTATIONS = ("rle", "polygon")
CUTOUT_ALPHAS = ("soft", "mask")
ENGINES = ("local", "ray")

# Field metadata: how a field takes part in the fingerprint (see
# SegmentConfig.fingerprint_parts), or that the summary does not record it. Fields without
# metadata are recorded and do not change the outputs.
_VALUE = MappingProxyType({"fingerprint": "value"})  # as it is
# The sha256 of the file(s) it names: a changed reference image is a new configuration.
_DIGEST = MappingProxyType({"fingerprint": "digest"})
_SAM_ONLY = MappingProxyType({"fingerprint": "sam"})  # only --refine sam uses it
_COMPOSITE_ONLY = MappingProxyType({"fingerprint": "composite"})  # only composites use it
_NOT_RECORDED = MappingProxyType({"recorded": False})


@dataclass(frozen=True)
class VideoOptions:
    """How videos (and ``--sequence`` frame folders) are read, steadied and written."""

    smooth: str = DEFAULT_SMOOTH  # none, ema, flow (ops.temporal)
    video_codec: str = "prores"  # videos with alpha: prores, vp9, ffv1, png
    every: int = 1  # keep every N-th frame
    fps: float | None = None  # or at most F frames a second; a --sequence's frame rate
    start: float | None = None  # seconds
    end: float | None = None
    segment_frames: int = DEFAULT_SEGMENT_FRAMES  # frames per ledger segment
    frames: bool = False  # also every frame's outputs as PNGs
    sequence: bool = False  # a folder of numbered frames is one video

    def __post_init__(self) -> None:
        if self.smooth not in SMOOTH_MODES:
            raise ValueError(f"--smooth {self.smooth}: choose from {', '.join(SMOOTH_MODES)}")
        if self.video_codec not in VIDEO_CODECS:
            choices = ", ".join(VIDEO_CODECS)
            raise ValueError(f"--video-codec {self.video_codec}: choose from {choices}")
        if self.every < 1 or self.segment_frames < 1:
            raise ValueError("--every and --segment-frames must be at least 1")
        if self.fps is not None and self.fps <= 0:
            raise ValueError(f"--fps {self.fps}: must be positive")
        if self.every > 1 and self.fps is not None and not self.sequence:
            raise ValueError("give --every or --fps, not both")
        if self.start is not None and self.end is not None and self.end <= self.start:
            raise ValueError(f"--end {self.end} must be after --start {self.start}")


@dataclass(frozen=True)
class SegmentConfig:
    """A ``clipseg segment`` or ``clipseg matte`` run."""

    inputs: tuple[str, ...]
    out_dir: Path
    command: str = field(default="segment", metadata=_VALUE)  # or "matte": which kinds exist
    prompts: tuple[str, ...] = field(default=(), metadata=_VALUE)
    refs: tuple[Path, ...] = field(default=(), metadata=_DIGEST)
    # Paired with refs in order.
    ref_masks: tuple[Path, ...] = field(default=(), metadata=_DIGEST)
    # None: engineered when an object mask is known, else raw.
    ref_mode: str | None = field(default=None, metadata=_VALUE)
    mix: float | None = field(default=None, metadata=_VALUE)  # W: W * text + (1 - W) * image
    negatives: tuple[str, ...] = field(default=(), metadata=_VALUE)
    # Conditionals saved earlier by --save-prompt.
    prompt_embedding: Path | None = field(default=None, metadata=_DIGEST)
    save_prompt: Path | None = None
    save: tuple[str, ...] = field(default=("mask",), metadata=_VALUE)
    # Edge refinement of every output made from the probability (not logits), both commands.
    refine: str = field(default="guided", metadata=_VALUE)
    # off, auto or a number of tiles along the shorter side (ops.tiles).
    tiles: str = field(default="off", metadata=_VALUE)
    # The Segment Anything model of --refine sam (a hub id or a local folder).
    sam_model: str = field(default=DEFAULT_SAM_MODEL, metadata=_SAM_ONLY)
    # Mask shaping (ops.shape), applied once before every output made from the mask.
    grow: int = field(default=0, metadata=_VALUE)  # pixels; negative shrinks
    fill_holes: bool = field(default=False, metadata=_VALUE)
    min_area: int | None = field(default=None, metadata=_VALUE)  # None: 0.02% of the image
    invert: bool = field(default=False, metadata=_VALUE)
    feather: int = field(default=0, metadata=_VALUE)  # pixels of soft edge (soft, cutout)
    # Objects (ops.instances): touching ones split; those scored under min_score dropped.
    split: str = field(default="auto", metadata=_VALUE)
    min_score: float = field(default=DEFAULT_MIN_SCORE, metadata=_VALUE)
    # Dataset exports built from every finished image's instances (io.exports).
    exports: tuple[str, ...] = field(default=(), metadata=_VALUE)
    coco_segmentation: str = field(default="rle", metadata=_VALUE)  # or "polygon"
    yolo_copy: bool = field(default=False, metadata=_VALUE)  # copy images instead of links
    background: str = field(default="white", metadata=_COMPOSITE_ONLY)
    threshold: float = field(default=DEFAULT_THRESHOLD, metadata=_VALUE)
    soft_bits: int = field(default=8, metadata=_VALUE)
    cutout_alpha: str = field(default="soft", metadata=_VALUE)
    # The model: its weights' identity enters the fingerprint (see fingerprint_parts).
    model: str = field(default=DEFAULT_MODEL, metadata=_VALUE)
    clip_weights: Path | None = None
    device: str = "auto"
    precision: str = field(default="auto", metadata=_VALUE)
    # torch, ONNX Runtime or OpenVINO (run.backend): the same results, so no fingerprint.
    backend: str = "auto"
    batch_size: int | None = None  # None: by device (see batch_size_for)
    workers: int = 2
    # Not an option of the command line: the run's writer threads.
    writer_threads: int = field(default=2, metadata=_NOT_RECORDED)
    max_pixels: int | None = field(default=DEFAULT_MAX_PIXELS, metadata=_VALUE)
    allow_truncated: bool = field(default=False, metadata=_VALUE)
    # Where the log and the summary go: the summary names both already.
    log_path: Path | None = field(default=None, metadata=_NOT_RECORDED)
    summary_path: Path | None = field(default=None, metadata=_NOT_RECORDED)
    overwrite: bool = False
    retry_failed: bool = False
    report: bool = False  # write OUT/report.html after the run
    engine: str = "local"  # or "ray" (clipseg_cli.run.engines.ray)
    ray_address: str | None = None
    num_gpus: float | None = None  # per actor; None: 1 when the cluster has GPUs, else 0
    actors: int | None = None  # None: one per GPU, or per 8 CPUs (engines/ray.py)
    video: VideoOptions = field(default=VideoOptions(), metadata=_VALUE)

    def __post_init__(self) -> None:
        # The canonical spelling (AUTO -> auto, 03 -> 3): the fingerprint compares it.
        object.__setattr__(self, "tiles", _parse_tiles(self.tiles))
        self._check_prompts()
        self._check_choices()
        self._check_numbers()

    def _check_prompts(self) -> None:
        if not self.inputs:
            raise ValueError("no INPUT given: name files, folders, globs, '-' or @list.txt")
        if self.prompt_embedding is not None and (self.prompts or self.refs or self.negatives):
            raise ValueError("--prompt-embedding replaces --prompt/--ref/--negative; give one")
        if not self.prompts and not self.refs and self.prompt_embedding is None:
            raise ValueError("no prompt: give --prompt TEXT, --prompts-file FILE or --ref IMAGE")
        if any(not text.strip() for text in self.negatives):
            raise ValueError("--negative: empty prompt text")
        if any(not prompt.strip() for prompt in self.prompts):
            raise ValueError("--prompt: empty prompt text")
        if len(self.ref_masks) > len(self.refs):
            raise ValueError("more --ref-mask than --ref: masks pair with references in order")
        if self.mix is not None:
            if not (self.prompts and self.refs):
                raise ValueError("--mix needs both --prompt and --ref")
            if not 0.0 <= self.mix <= 1.0:
                raise ValueError(f"--mix {self.mix}: must be between 0 and 1")

    def _check_choices(self) -> None:
        if self.command not in COMMAND_KINDS:
            raise ValueError(f"unknown command {self.command}")
        for kind in self.save:
            if kind not in COMMAND_KINDS[self.command]:
                raise ValueError(f"--save {kind}: unknown kind")
        for name in self.exports:
            if name not in EXPORT_FORMATS:
                raise ValueError(f"--export {name}: choose from {', '.join(EXPORT_FORMATS)}")
        choices = (
            ("--engine", self.engine, ENGINES),
            ("--refine", self.refine, REFINE_METHODS),
            ("--precision", self.precision, PRECISIONS),
            ("--backend", self.backend, BACKENDS),
            ("--cutout-alpha", self.cutout_alpha, CUTOUT_ALPHAS),
            ("--coco-segmentation", self.coco_segmentation, COCO_SEGMENTATIONS),
            ("--split", self.split, SPLIT_MODES),
        )
        for option, value, allowed in choices:
            if value not in allowed:
                raise ValueError(f"{option} {value}: choose from {', '.join(allowed)}")
        if self.ref_mode is not None and self.ref_mode not in REF_MODES:
            raise ValueError(f"--ref-mode {self.ref_mode}: choose from {', '.join(REF_MODES)}")
        if not is_device_name(self.device):
            raise ValueError(f"--device {self.device}: choose from {', '.join(DEVICES)}, cuda:N")
        _check_backend(self)

    def _check_numbers(self) -> None:
        if not 0.0 <= self.threshold <= 1.0:
            raise ValueError(f"--threshold {self.threshold}: must be between 0 and 1")
        if self.soft_bits not in (8, 16):
            raise ValueError(f"--soft-bits {self.soft_bits}: must be 8 or 16")
        at_least_one = {
            "--batch-size": self.batch_size,
            "--actors": self.actors,
            "--workers": self.workers,
            "--writer-threads": self.writer_threads,
        }
        for option, value in at_least_one.items():
            if value is not None and value < 1:
                raise ValueError(f"{option} must be at least 1")
        if self.max_pixels is not None and self.max_pixels < 1:
            raise ValueError("--max-pixels must be positive")
        if self.min_area is not None and self.min_area < 0:
            raise ValueError(f"--min-area {self.min_area}: must be 0 or more pixels")
        if self.feather < 0:
            raise ValueError(f"--feather {self.feather}: must be 0 or more pixels")
        if not 0.0 <= self.min_score <= 1.0:
            raise ValueError(f"--min-score {self.min_score}: must be between 0 and 1")

    def batch_size_for(self, device_type: str) -> int:
        """``--batch-size``, or the device type's default (``specs.DEFAULT_BATCH_SIZES``)."""
        if self.batch_size is not None:
            return self.batch_size
        return DEFAULT_BATCH_SIZES.get(device_type, DEFAULT_BATCH_SIZES["cpu"])

    @property
    def wants_instances(self) -> bool:
        """Whether each prompt's mask is split into instances (--save instances, --export)."""
        return "instances" in self.save or bool(self.exports)

    @property
    def resolved_log_path(self) -> Path:
        return self.log_path if self.log_path is not None else self.out_dir / LOG_NAME

    @property
    def resolved_summary_path(self) -> Path:
        return self.summary_path if self.summary_path is not None else self.out_dir / SUMMARY_NAME

    def describe(self) -> dict:
        """JSON-ready view of the options, for the run summary."""
        return {
            option.name: _plain(getattr(self, option.name))
            for option in fields(self)
            if option.metadata.get("recorded", True)
        }

    def fingerprint_parts(self, tool_version: str) -> dict:
        """What determines the outputs, computable without loading the model (reruns into the
        same ``--out`` must match it). Inputs, batch sizes and paths of logs do not count."""
        parts: dict[str, Any] = {"tool_version": tool_version, "weights": self._weights()}
        for option in fields(self):
            rule = option.metadata.get("fingerprint")
            value = getattr(self, option.name)
            if rule is None:
                continue
            if rule == "digest":
                value = _digests(value, "--" + option.name.replace("_", "-").removesuffix("s"))
            elif rule == "sam":
                value = value if self.refine == "sam" else None
            elif rule == "composite":
                value = value if "composite" in self.save else None
            parts[option.name] = _plain(value)
        return parts

    def _weights(self) -> list:
        """The model's files by identity (a hub id stands for itself: its sha256 is noted in
        the ledger once loaded)."""
        kind, path = resolve_model(self.model)
        if kind == "dir":
            weights = [file_identity(p) for p in sorted(path.iterdir()) if p.is_file()]
        elif kind == "file":
            weights = [file_identity(path)]
        else:
            weights = [self.model]
        if self.clip_weights is not None:
            weights.append(file_identity(self.clip_weights))
        return weights


def instance_floors(config: SegmentConfig) -> dict:
    """What decided which objects became instances, as the exports record it."""
    return {
        "threshold": config.threshold,
        "min_area": config.min_area,  # None: min_area_fraction of each image
        "min_area_fraction": DEFAULT_MIN_AREA_FRACTION if config.min_area is None else None,
        "min_score": config.min_score,
        "score": "mean probability",
        "split": config.split,
    }


def _check_backend(config: SegmentConfig) -> None:
    """Backend, device and precision that cannot go together (ValueError)."""
    on_gpu = config.device not in ("auto", "cpu")
    cpu_runtime = config.backend in ("onnx", "openvino")
    if cpu_runtime and on_gpu:
        raise ValueError(
            f"--backend {config.backend} runs on the CPU; --device {config.device} needs "
            "--backend torch"
        )
    if config.backend == "onnx" and config.precision in ("bf16", "fp16"):
        raise ValueError(
            f"--backend onnx runs fp32 or int8; --precision {config.precision} needs "
            "--backend openvino (bf16) or torch"
        )
    if config.backend == "openvino" and config.precision == "fp16":
        raise ValueError("--backend openvino runs fp32, bf16 or int8; fp16 needs --backend torch")
    if config.precision == "int8" and (config.backend == "torch" or on_gpu):
        raise ValueError(
            "--precision int8 is the quantised graph, on the CPU: use it with --backend onnx, "
            "openvino (or auto) and --device cpu (or auto)"
        )


def _parse_tiles(value: str) -> str:
    """``--tiles``: ``off``, ``auto`` or a number of tiles (>= 1) along the shorter side."""
    text = str(value).strip().lower()
    if text in ("off", "auto"):
        return text
    if not text.isdigit():
        raise ValueError(f"--tiles {value}: choose off, auto or a number of tiles (at least 1)")
    if int(text) < 1:
        raise ValueError(f"--tiles {value}: the number of tiles must be at least 1")
    return str(int(text))


def _plain(value: Any) -> Any:
    """Tuples as lists and paths as strings, as JSON and the ledger's header hold them."""
    if isinstance(value, VideoOptions):
        return {option.name: _plain(getattr(value, option.name)) for option in fields(value)}
    if isinstance(value, tuple):
        return [_plain(item) for item in value]
    if isinstance(value, Path):
        return str(value)
    return value


def _digests(value: Path | tuple[Path, ...] | None, option: str) -> str | list[str] | None:
    if value is None:
        return None
    if isinstance(value, tuple):
        return [_digests(path, option) for path in value]
    try:
        return sha256_file(value)
    except OSError as error:
        raise ValueError(f"{option} {value}: cannot read ({error.strerror})") from None
