"""One frozen object per run: every CLI option maps onto a field here.

Validation raises ``ValueError`` with a one-line message; the CLI turns it into a usage error.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from clipseg_cli.io.sources import DEFAULT_MAX_PIXELS
from clipseg_cli.specs import DEFAULT_MODEL, DEFAULT_THRESHOLD, resolve_model

SEGMENT_KINDS = ("mask", "soft", "overlay", "cutout", "logits", "labels")
MATTE_KINDS = ("matte", "cutout", "composite")
OUTPUT_KINDS = {"segment": SEGMENT_KINDS, "matte": MATTE_KINDS}
DEFAULT_KIND = {"segment": "mask", "matte": "matte"}
REFINE_METHODS = ("none", "guided")  # kept equal to matting.REFINE_METHODS (tested)
DEVICES = ("auto", "cpu", "cuda", "mps")
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
REF_MODES = ("raw", "engineered")
CUTOUT_ALPHAS = ("soft", "mask")
ENGINES = ("local", "ray")
LOG_NAME = "clipseg-log.jsonl"
SUMMARY_NAME = "clipseg-summary.json"


def parse_kinds(values: list[str] | tuple[str, ...], command: str = "segment") -> tuple[str, ...]:
    """``["mask,soft", "overlay"]`` -> ``("mask", "soft", "overlay")``, order kept, no repeats."""
    allowed = OUTPUT_KINDS[command]
    kinds: list[str] = []
    for value in values:
        for kind in (part.strip().lower() for part in value.split(",")):
            if not kind:
                continue
            if kind not in allowed:
                choices = ", ".join(allowed)
                raise ValueError(
                    f"--save {kind}: unknown kind for {command}; choose from {choices}"
                )
            if kind not in kinds:
                kinds.append(kind)
    return tuple(kinds) or (DEFAULT_KIND[command],)


def read_prompts_file(path: Path) -> list[str]:
    """One prompt per line; blank lines and lines starting with ``#`` are ignored."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise ValueError(f"--prompts-file {path}: cannot read ({error})") from None
    return [line.strip() for line in text.splitlines() if line.strip() and not line.startswith("#")]


#: Images per model batch when --batch-size is not given (see SegmentConfig.batch_size_for).
DEFAULT_BATCH_SIZES = {"cpu": 1, "cuda": 16, "mps": 4}


@dataclass(frozen=True)
class SegmentConfig:
    """A ``clipseg segment`` or ``clipseg matte`` run."""

    inputs: tuple[str, ...]
    out_dir: Path
    command: str = "segment"  # or "matte": which output kinds exist
    prompts: tuple[str, ...] = ()
    refs: tuple[Path, ...] = ()
    ref_masks: tuple[Path, ...] = ()  # paired with refs in order
    ref_mode: str | None = None  # None: engineered when an object mask is known, else raw
    mix: float | None = None  # W: W * text + (1 - W) * image
    negatives: tuple[str, ...] = ()
    prompt_embedding: Path | None = None  # conditionals saved earlier by --save-prompt
    save_prompt: Path | None = None
    save: tuple[str, ...] = ("mask",)
    refine: str = "guided"
    background: str = "white"
    threshold: float = DEFAULT_THRESHOLD
    soft_bits: int = 8
    cutout_alpha: str = "soft"
    model: str = DEFAULT_MODEL
    clip_weights: Path | None = None
    device: str = "auto"
    precision: str = "auto"
    batch_size: int | None = None  # None: by device (see batch_size_for)
    workers: int = 2
    writer_threads: int = 2
    max_pixels: int | None = DEFAULT_MAX_PIXELS
    allow_truncated: bool = False
    log_path: Path | None = None
    summary_path: Path | None = None
    overwrite: bool = False
    retry_failed: bool = False
    report: bool = False  # write OUT/report.html after the run
    engine: str = "local"  # or "ray" (clipseg_cli.engines.ray_engine)
    ray_address: str | None = None
    num_gpus: float | None = None  # per actor; None: 1 when the cluster has GPUs, else 0
    actors: int | None = None  # None: one per GPU, or per 8 CPUs (engines/ray_engine.py)

    def __post_init__(self) -> None:
        if not self.inputs:
            raise ValueError("no INPUT given: name files, folders, globs, '-' or @list.txt")
        if self.command not in OUTPUT_KINDS:
            raise ValueError(f"unknown command {self.command}")
        if self.prompt_embedding is not None and (self.prompts or self.refs or self.negatives):
            raise ValueError("--prompt-embedding replaces --prompt/--ref/--negative; give one")
        if not self.prompts and not self.refs and self.prompt_embedding is None:
            raise ValueError("no prompt: give --prompt TEXT, --prompts-file FILE or --ref IMAGE")
        if any(not text.strip() for text in self.negatives):
            raise ValueError("--negative: empty prompt text")
        if len(self.ref_masks) > len(self.refs):
            raise ValueError("more --ref-mask than --ref: masks pair with references in order")
        if self.mix is not None:
            if not (self.prompts and self.refs):
                raise ValueError("--mix needs both --prompt and --ref")
            if not 0.0 <= self.mix <= 1.0:
                raise ValueError(f"--mix {self.mix}: must be between 0 and 1")
        if self.engine not in ENGINES:
            raise ValueError(f"--engine {self.engine}: choose from {', '.join(ENGINES)}")
        if self.actors is not None and self.actors < 1:
            raise ValueError("--actors must be at least 1")
        if self.refine not in REFINE_METHODS:
            raise ValueError(f"--refine {self.refine}: choose from {', '.join(REFINE_METHODS)}")
        if any(not prompt.strip() for prompt in self.prompts):
            raise ValueError("--prompt: empty prompt text")
        for kind in self.save:
            if kind not in OUTPUT_KINDS[self.command]:
                raise ValueError(f"--save {kind}: unknown kind")
        if not 0.0 <= self.threshold <= 1.0:
            raise ValueError(f"--threshold {self.threshold}: must be between 0 and 1")
        if self.soft_bits not in (8, 16):
            raise ValueError(f"--soft-bits {self.soft_bits}: must be 8 or 16")
        if self.ref_mode is not None and self.ref_mode not in REF_MODES:
            raise ValueError(f"--ref-mode {self.ref_mode}: choose from {', '.join(REF_MODES)}")
        if self.cutout_alpha not in CUTOUT_ALPHAS:
            raise ValueError(f"--cutout-alpha {self.cutout_alpha}: choose soft or mask")
        if self.device not in DEVICES and not self.device.startswith("cuda:"):
            raise ValueError(f"--device {self.device}: choose from {', '.join(DEVICES)}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"--precision {self.precision}: choose from {', '.join(PRECISIONS)}")
        if self.batch_size is not None and self.batch_size < 1:
            raise ValueError("--batch-size must be at least 1")
        for name in ("workers", "writer_threads"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be at least 1")
        if self.max_pixels is not None and self.max_pixels < 1:
            raise ValueError("--max-pixels must be positive")

    def batch_size_for(self, device_type: str) -> int:
        """The batch size to use on a device: on a CPU one image (485 tokens) already keeps the
        cores busy, and each extra image costs ~50 MB of fp32 activations (measured on 2 cores:
        batches of 1 as fast as of 2, peak memory 60-100 MB lower); GPUs need larger batches to
        be fed."""
        if self.batch_size is not None:
            return self.batch_size
        return DEFAULT_BATCH_SIZES.get(device_type, DEFAULT_BATCH_SIZES["cpu"])

    @property
    def resolved_log_path(self) -> Path:
        return self.log_path if self.log_path is not None else self.out_dir / LOG_NAME

    @property
    def resolved_summary_path(self) -> Path:
        return self.summary_path if self.summary_path is not None else self.out_dir / SUMMARY_NAME

    def describe(self) -> dict:
        """JSON-ready view for the run summary."""
        return {
            "inputs": list(self.inputs),
            "out_dir": str(self.out_dir),
            "prompts": list(self.prompts),
            "command": self.command,
            "refs": [str(ref) for ref in self.refs],
            "ref_masks": [str(mask) for mask in self.ref_masks],
            "ref_mode": self.ref_mode,
            "mix": self.mix,
            "negatives": list(self.negatives),
            "prompt_embedding": str(self.prompt_embedding) if self.prompt_embedding else None,
            "save_prompt": str(self.save_prompt) if self.save_prompt else None,
            "refine": self.refine,
            "background": self.background,
            "save": list(self.save),
            "threshold": self.threshold,
            "soft_bits": self.soft_bits,
            "cutout_alpha": self.cutout_alpha,
            "model": self.model,
            "clip_weights": str(self.clip_weights) if self.clip_weights else None,
            "device": self.device,
            "precision": self.precision,
            "batch_size": self.batch_size,
            "workers": self.workers,
            "max_pixels": self.max_pixels,
            "allow_truncated": self.allow_truncated,
            "overwrite": self.overwrite,
            "retry_failed": self.retry_failed,
            "report": self.report,
            "engine": self.engine,
            "ray_address": self.ray_address,
            "num_gpus": self.num_gpus,
            "actors": self.actors,
        }

    def fingerprint_parts(self, tool_version: str) -> dict:
        """What determines the outputs, computable without loading the model (reruns into the
        same ``--out`` must match it). Inputs, batch sizes and paths of logs do not count."""
        from clipseg_cli.run.ledger import file_identity

        kind, path = resolve_model(self.model)
        if kind == "dir":
            weights = [file_identity(p) for p in sorted(path.iterdir()) if p.is_file()]
        elif kind == "file":
            weights = [file_identity(path)]
        else:
            weights = [self.model]  # a hub id (its sha256 is noted in the ledger once loaded)
        if self.clip_weights is not None:
            weights.append(file_identity(self.clip_weights))
        return {
            "tool_version": tool_version,
            "model": self.model,
            "weights": weights,
            "prompts": list(self.prompts),
            "command": self.command,
            "refs": [_digest(ref, "--ref") for ref in self.refs],
            "ref_masks": [_digest(mask, "--ref-mask") for mask in self.ref_masks],
            "ref_mode": self.ref_mode,
            "mix": self.mix,
            "negatives": list(self.negatives),
            "prompt_embedding": (
                _digest(self.prompt_embedding, "--prompt-embedding")
                if self.prompt_embedding
                else None
            ),
            "refine": self.refine if self.command == "matte" else None,
            "background": self.background if "composite" in self.save else None,
            "precision": self.precision,
            "save": list(self.save),
            "threshold": self.threshold,
            "soft_bits": self.soft_bits,
            "cutout_alpha": self.cutout_alpha,
            "allow_truncated": self.allow_truncated,
            "max_pixels": self.max_pixels,
        }


def _digest(path: Path, option: str) -> str:
    from clipseg_cli.run.ledger import small_file_sha256

    try:
        return small_file_sha256(path)
    except OSError as error:
        raise ValueError(f"{option} {path}: cannot read ({error.strerror})") from None
