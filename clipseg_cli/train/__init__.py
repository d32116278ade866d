"""Fine-tuning (or training from scratch) on the user's own images, masks and prompts.

The manifest format is in :mod:`.manifest`. The CLIP towers stay frozen unless
``train_backbone`` (always when training from scratch); the loss is binary cross-entropy on the
mask logits, as in the paper. Checkpoints (model + optimizer + epoch + RNG state) are written at
every epoch end as safetensors + JSON, never pickles, and ``resume`` continues from the last one
with identical state. The final weights are written with
:func:`clipseg_cli.weights.save_transformers_dir`, so ``--model OUT`` loads them like any other
model.

The modules, in the order a run uses them:

* :mod:`.config`: the options, progress reports, results and the two errors;
* :mod:`.manifest`: the manifest's examples, the train/validation split;
* :mod:`.data`: decoding an example's image and mask, epoch plans, batches;
* :mod:`.trainable`: the starting model, what of it trains, the learning-rate schedule;
* :mod:`.losses`: the step loss (mask BCE, alignment, per-token classes);
* :mod:`.validation`: IoU_FG of a model on examples, an epoch's numbers;
* :mod:`.checkpoint`: checkpoints, the resume fingerprint, the exported model;
* :mod:`.loop`: :func:`train`, which runs them in order;
* :mod:`.synthetic`: a toy data set of coloured shapes.

This package re-exports the public API; nothing in it prints: progress goes to the
``on_progress`` callback.
"""

from __future__ import annotations

from clipseg_cli.train.checkpoint import (
    CHECKPOINT_JSON,
    export_model,
    load_checkpoint,
    resume_fingerprint,
    save_checkpoint,
)
from clipseg_cli.train.config import (
    EpochStats,
    ManifestError,
    TrainConfig,
    TrainError,
    TrainProgress,
    TrainResult,
)
from clipseg_cli.train.loop import train
from clipseg_cli.train.losses import TokenClassifier
from clipseg_cli.train.manifest import Example, read_manifest, split_examples
from clipseg_cli.train.trainable import build_training_model, trainable_parameters
from clipseg_cli.train.validation import evaluate

__all__ = [
    "CHECKPOINT_JSON",
    "EpochStats",
    "Example",
    "ManifestError",
    "TokenClassifier",
    "TrainConfig",
    "TrainError",
    "TrainProgress",
    "TrainResult",
    "build_training_model",
    "evaluate",
    "export_model",
    "load_checkpoint",
    "read_manifest",
    "resume_fingerprint",
    "save_checkpoint",
    "split_examples",
    "train",
    "trainable_parameters",
]
