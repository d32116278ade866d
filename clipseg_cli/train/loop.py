"""The training loop: :func:`train` reads the manifest, builds what trains, restores the
checkpoint it resumes, runs the epochs (optimiser steps, validation, a checkpoint, the epoch
report) and exports the model.

The loop owns the order of these steps and the run's state (global step, history), nothing
else: the data is planned and loaded by :mod:`.data`, the loss is :mod:`.losses`', validation
is :mod:`.validation`'s and files are :mod:`.checkpoint`'s. Nothing here prints: progress goes
to the ``on_progress`` callback.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from clipseg_cli.io.files import sha256_file
from clipseg_cli.model.clipseg import ClipSegModel
from clipseg_cli.model.tokenizer import ClipTokenizer
from clipseg_cli.segmenter import resolve_device
from clipseg_cli.train.checkpoint import (
    CHECKPOINT_JSON,
    export_model,
    load_checkpoint,
    resume_fingerprint,
    save_checkpoint,
)
from clipseg_cli.train.config import (
    EpochStats,
    TrainConfig,
    TrainError,
    TrainProgress,
    TrainResult,
)
from clipseg_cli.train.data import Batch, ImagePlan, ReferencePool, load_batch, plan_epoch
from clipseg_cli.train.losses import TokenClassifier, step_loss
from clipseg_cli.train.manifest import Example, group_by_image, read_manifest, split_examples
from clipseg_cli.train.trainable import build_training_model, lr_at, trainable_parameters
from clipseg_cli.train.validation import validate_epoch


@dataclass(frozen=True)
class _Data:
    """The manifest's examples as the run uses them."""

    train_examples: list[Example]
    val_examples: list[Example]
    groups: list[tuple[Path, list[Example]]]  # the training examples by image
    pool: ReferencePool  # visual prompts drawn from the training examples


@dataclass(frozen=True)
class _Trainee:
    """What trains: the model, where it came from, its trainable parameters (the token
    classifier's included) and their optimiser."""

    model: ClipSegModel
    origin: str
    params: list[torch.nn.Parameter]
    optimizer: torch.optim.Optimizer
    token_classifier: TokenClassifier | None


@dataclass
class _Run:
    """A running loop: what it works with, and its state (``global_step``, ``result``)."""

    config: TrainConfig
    data: _Data
    trainee: _Trainee
    device: torch.device
    fingerprint: dict
    tokenizer: ClipTokenizer
    size: tuple[int, int]  # the model's input size
    total_steps: int
    start_time: float
    on_progress: Callable[[TrainProgress], None] | None
    global_step: int
    result: TrainResult

    def report(
        self,
        kind: str,
        epoch: int,
        step: int,
        steps: int,
        loss: float,
        stats: EpochStats | None = None,
    ) -> None:
        """Send a :class:`TrainProgress` to the callback, if any."""
        if self.on_progress is not None:
            elapsed = time.monotonic() - self.start_time
            self.on_progress(
                TrainProgress(kind, epoch, self.config.epochs, step, steps, loss, elapsed, stats)
            )


def train(
    config: TrainConfig, on_progress: Callable[[TrainProgress], None] | None = None
) -> TrainResult:
    """Train, validate every epoch, checkpoint, and write the final model to ``out_dir``.

    Raises:
        ManifestError: the manifest or one of its files is unusable.
        TrainError: inconsistent options, or a checkpoint that does not match.
        WeightsError: the starting model cannot be loaded.
    """
    config.validate()
    start_time = time.monotonic()
    data = _read_data(config)
    device = resolve_device(config.device)
    trainee = _build_trainee(config, data.train_examples, device)
    fingerprint = resume_fingerprint(config, sha256_file(config.manifest))
    first_epoch, global_step, history = _restore(config, trainee, fingerprint)
    model = trainee.model
    run = _Run(
        config=config,
        data=data,
        trainee=trainee,
        device=device,
        fingerprint=fingerprint,
        tokenizer=ClipTokenizer(model.arch.text.context_length),
        size=(model.arch.input_size, model.arch.input_size),
        total_steps=math.ceil(len(data.groups) / config.batch_size) * config.epochs,
        start_time=start_time,
        on_progress=on_progress,
        global_step=global_step,
        result=TrainResult(
            out_dir=config.out_dir,
            history=list(history),
            resumed_from_epoch=first_epoch - 1,
            train_images=len(data.groups),
            val_images=len(group_by_image(data.val_examples)),
        ),
    )
    # One loader thread: decoding the next batch overlaps the current step (PIL and cv2
    # release the GIL), while the batch plan itself is made here, deterministically.
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="clipseg-train-load") as loader:
        for epoch in range(first_epoch, config.epochs + 1):
            _run_epoch(run, loader, epoch)

    model.eval().requires_grad_(False)
    export_model(model, config, trainee.origin, run.result)
    run.result.model = model
    run.result.seconds = round(time.monotonic() - start_time, 2)
    return run.result


def _read_data(config: TrainConfig) -> _Data:
    """Read the manifest and split it; a TrainError when nothing is left to train on."""
    examples = read_manifest(config.manifest)
    train_examples, val_examples = split_examples(examples, config.val_fraction, config.seed)
    if not train_examples:
        raise TrainError(f"{config.manifest}: no training examples after the validation split")
    return _Data(
        train_examples=train_examples,
        val_examples=val_examples,
        groups=group_by_image(train_examples),
        pool=ReferencePool(train_examples),
    )


def _build_trainee(
    config: TrainConfig, train_examples: list[Example], device: torch.device
) -> _Trainee:
    """The starting model in float32 on ``device`` in training mode, what of it trains, the
    token classifier when asked for (one class per annotated label), and the optimiser."""
    model, origin = build_training_model(config)
    model = model.float().to(device).train()
    params = trainable_parameters(model, config.trains_backbone)
    token_classifier = None
    if config.token_class_weight > 0:
        classes = sorted({e.label for e in train_examples if e.mask is not None})
        token_classifier = TokenClassifier(model.arch.vision.width, classes).to(device)
        params += list(token_classifier.parameters())
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    return _Trainee(model, origin, params, optimizer, token_classifier)


def _restore(
    config: TrainConfig, trainee: _Trainee, fingerprint: dict
) -> tuple[int, int, list[EpochStats]]:
    """(first epoch to run, global step, history so far): from the checkpoint when resuming;
    a TrainError when ``checkpoint_dir`` holds one that was not asked to be resumed."""
    if config.checkpoint_dir is None:
        return 1, 0, []
    if config.resume:
        done, global_step, history = load_checkpoint(
            config.checkpoint_dir,
            trainee.model,
            trainee.optimizer,
            fingerprint,
            trainee.token_classifier,
        )
        return done + 1, global_step, history
    if (config.checkpoint_dir / CHECKPOINT_JSON).is_file():
        raise TrainError(
            f"{config.checkpoint_dir}: already holds a checkpoint; pass --resume to "
            "continue it, or choose another --checkpoint-dir"
        )
    return 1, 0, []


def _run_epoch(run: _Run, loader: ThreadPoolExecutor, epoch: int) -> None:
    """One epoch: its steps, validation, the checkpoint, then the "epoch" report."""
    config, trainee = run.config, run.trainee
    epoch_start = time.monotonic()
    batches = plan_epoch(run.data.groups, run.data.pool, config, epoch)
    steps = len(batches)
    train_loss = _train_steps(run, loader, epoch, batches)
    stats = validate_epoch(
        trainee.model,
        run.data.val_examples,
        run.data.train_examples,
        config,
        run.device,
        TrainProgress("validate", epoch, config.epochs, steps, steps, train_loss, 0.0),
        run.on_progress,
        run.start_time,
    )
    stats = replace(stats, seconds=round(time.monotonic() - epoch_start, 2))
    run.result.history.append(stats)
    if config.checkpoint_dir is not None:
        save_checkpoint(
            config.checkpoint_dir,
            trainee.model,
            trainee.optimizer,
            epoch=epoch,
            global_step=run.global_step,
            fingerprint=run.fingerprint,
            history=run.result.history,
            token_classifier=trainee.token_classifier,
        )
    run.report("epoch", epoch, steps, steps, stats.train_loss, stats)


def _train_steps(
    run: _Run, loader: ThreadPoolExecutor, epoch: int, batches: list[list[ImagePlan]]
) -> float:
    """Every optimiser step of one epoch, each batch loaded while the previous one trains; a
    "step" report after each. Returns the epoch's mean training loss."""
    pending: Future[Batch] = loader.submit(load_batch, batches[0], run.size)
    running, count = 0.0, 0
    for step in range(1, len(batches) + 1):
        batch = pending.result()
        if step < len(batches):
            pending = loader.submit(load_batch, batches[step], run.size)
        running += _optimizer_step(run, batch, epoch, step)
        count += 1
        run.report("step", epoch, step, len(batches), running / count)
    return running / max(count, 1)


def _optimizer_step(run: _Run, batch: Batch, epoch: int, step: int) -> float:
    """One step on ``batch`` at the scheduled learning rate (gradients clipped to norm 1);
    returns its loss. A TrainError when the loss is no longer finite."""
    config, trainee = run.config, run.trainee
    for group in trainee.optimizer.param_groups:
        group["lr"] = lr_at(run.global_step, run.total_steps, config)
    loss = step_loss(
        trainee.model, batch, run.tokenizer, run.device, config, trainee.token_classifier
    )
    if not torch.isfinite(loss):
        raise TrainError(f"the loss became {loss.item()} at epoch {epoch}, step {step}; lower --lr")
    trainee.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(trainee.params, 1.0)
    trainee.optimizer.step()
    run.global_step += 1
    return loss.item()
