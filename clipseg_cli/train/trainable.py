"""What trains and how fast: the model a run starts from (loaded weights or a random
architecture), which of its parameters train, and the learning-rate schedule.

Nothing here steps an optimiser, reads the manifest or writes a file; the weights are loaded
by :func:`clipseg_cli.weights.load_weights` like every other model.
"""

from __future__ import annotations

import math

import torch

from clipseg_cli.model.clipseg import ClipSegModel
from clipseg_cli.specs import DEFAULT_MODEL, architecture_for
from clipseg_cli.train.config import TrainConfig, TrainError


def build_training_model(config: TrainConfig) -> tuple[ClipSegModel, str]:
    """The model to train, float32 on the CPU, and a description of where it came from.

    From scratch, the random initialisation is seeded with ``config.seed``.
    """
    if config.from_scratch is not None:
        try:
            arch = architecture_for(config.from_scratch)
        except KeyError as error:
            raise TrainError(str(error.args[0])) from None
        torch.manual_seed(config.seed)
        model = ClipSegModel(arch)
        return model, f"from scratch ({config.from_scratch})"
    from clipseg_cli.weights import load_weights

    model, info = load_weights(config.model or DEFAULT_MODEL, dtype=torch.float32)
    return model, f"{info.model_id} ({info.variant}, sha256 {info.sha256[:12]})"


def trainable_parameters(model: ClipSegModel, train_backbone: bool) -> list[torch.nn.Parameter]:
    """Mark what trains (the decoder; the CLIP towers too if asked) and return it."""
    model.requires_grad_(False)
    model.decoder.requires_grad_(True)
    if train_backbone:
        model.backbone.requires_grad_(True)
    return [p for p in model.parameters() if p.requires_grad]


def lr_at(step: int, total: int, config: TrainConfig) -> float:
    """Linear warm-up, then cosine decay to 0: a function of the global step only."""
    if step < config.warmup_steps:
        return config.lr * (step + 1) / config.warmup_steps
    span = max(total - config.warmup_steps, 1)
    progress = min((step - config.warmup_steps) / span, 1.0)
    return config.lr * 0.5 * (1.0 + math.cos(math.pi * progress))
