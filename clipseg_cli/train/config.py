"""A training run's options (:class:`TrainConfig`), what it reports while it runs
(:class:`TrainProgress`, :class:`EpochStats`) and what it returns (:class:`TrainResult`), and
the two errors that stop it before or while it starts (:class:`ManifestError`,
:class:`TrainError`).

Plain data and one-line validation only: nothing here reads a file, touches a model or prints.
Both errors are ``ValueError`` subclasses, so the commands report them as usage errors.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from clipseg_cli.model.precision import DTYPES
from clipseg_cli.specs import DEFAULT_THRESHOLD

if TYPE_CHECKING:
    from clipseg_cli.model.clipseg import ClipSegModel


class ManifestError(ValueError):
    """The manifest or a file it names is unusable. ``str()`` is one line naming the file."""


class TrainError(ValueError):
    """The training run cannot start or resume (bad options, mismatched checkpoint)."""


@dataclass(frozen=True)
class TrainConfig:
    """Everything a training run depends on."""

    manifest: Path
    out_dir: Path
    # Start from these weights (any spec load_weights accepts) ...
    model: str | None = None
    # ... or from random weights of an architecture (architecture_for: "tiny", "rd64", ...).
    from_scratch: str | None = None
    # Also train the CLIP towers (always when training from scratch).
    train_backbone: bool = False
    epochs: int = 10
    batch_size: int = 8
    lr: float = 1e-3
    weight_decay: float = 1e-4
    warmup_steps: int = 100
    val_fraction: float = 0.1
    seed: int = 0
    # Fraction of prompts replaced by an engineered crop of another image of the same class.
    image_prompt_fraction: float = 0.0
    # Weight of the contrastive text/image-embedding alignment loss (needs image prompts).
    align_weight: float = 0.0
    # Weight of the auxiliary per-token class loss (TokenClassifier; needs a trained backbone).
    token_class_weight: float = 0.0
    hflip: bool = False
    threshold: float = DEFAULT_THRESHOLD
    checkpoint_dir: Path | None = None
    resume: bool = False
    device: str = "auto"
    # A precision name of clipseg_cli.model.precision.DTYPES.
    save_dtype: str = "fp32"

    def validate(self) -> None:
        """Raise :class:`TrainError` (one line) for inconsistent options."""
        if self.model is not None and self.from_scratch is not None:
            raise TrainError("--model and --from-scratch exclude each other")
        if self.epochs < 1 or self.batch_size < 1:
            raise TrainError("--epochs and --batch-size must be at least 1")
        if self.lr <= 0 or self.weight_decay < 0 or self.warmup_steps < 0:
            raise TrainError("--lr must be > 0, --weight-decay and --warmup-steps >= 0")
        if not 0.0 <= self.image_prompt_fraction <= 1.0:
            raise TrainError("--image-prompt-fraction must be in [0, 1]")
        if self.align_weight < 0 or self.token_class_weight < 0:
            raise TrainError("--align-weight and --token-class-weight must be >= 0")
        if self.token_class_weight > 0 and not self.trains_backbone:
            raise TrainError(
                "--token-class-weight trains the vision tower: it needs --train-backbone or "
                "--from-scratch"
            )
        if not 0.0 < self.threshold < 1.0:
            raise TrainError("--threshold must be in (0, 1)")
        if self.save_dtype not in DTYPES:
            raise TrainError(f"--save-dtype must be one of {', '.join(DTYPES)}")
        if self.resume and self.checkpoint_dir is None:
            raise TrainError("--resume needs --checkpoint-dir")

    @property
    def trains_backbone(self) -> bool:
        """Whether the CLIP towers train too (asked for, or training from scratch)."""
        return self.train_backbone or self.from_scratch is not None


@dataclass(frozen=True)
class EpochStats:
    """One epoch's numbers. IoU_FG = TP/(TP+FP+FN) summed over the validation set."""

    epoch: int  # 1-based
    train_loss: float
    val_iou: float | None  # text prompts; None without a validation split
    val_iou_image: float | None  # engineered visual prompts; None unless trained with them
    seconds: float


@dataclass(frozen=True)
class TrainProgress:
    """A progress report: ``kind`` is "step" (after each optimiser step), "validate" (while
    validating) or "epoch" (an epoch finished; ``stats`` set)."""

    kind: str
    epoch: int  # 1-based
    epochs: int
    step: int  # steps done in this epoch
    steps: int  # steps per epoch
    loss: float  # running mean training loss of this epoch
    elapsed: float
    stats: EpochStats | None = None


@dataclass
class TrainResult:
    """What a run did."""

    out_dir: Path
    history: list[EpochStats] = field(default_factory=list)
    resumed_from_epoch: int = 0
    train_images: int = 0
    val_images: int = 0
    seconds: float = 0.0
    model: ClipSegModel | None = None  # the trained model (eval mode, float32) as exported
