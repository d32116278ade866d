"""``clipseg train`` and ``clipseg synthetic``: fine-tuning on your own data, and a toy data set
of coloured shapes to try it on (the one the bundled ``demo`` model was trained on).

CLI layer only: parses options, shows progress, prints, exits (through
:func:`clipseg_cli.commands.console.exit_on_error`, the one exception -> exit code table). The
work is in :mod:`clipseg_cli.train` and :mod:`clipseg_cli.train.synthetic`.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from clipseg_cli.commands.console import ExitCode, exit_on_error, fail, progress_bar, wants_bar
from clipseg_cli.commands.options import DeviceOpt, ProgressOpt
from clipseg_cli.specs import DEFAULT_MODEL, DEFAULT_THRESHOLD, PRECISIONS

# --save-dtype: every precision but "auto" (the keys of clipseg_cli.model.precision.DTYPES,
# which TrainConfig.validate checks; named here from specs so that the CLI imports no torch).
SAVE_DTYPES = tuple(name for name in PRECISIONS if name != "auto")

if TYPE_CHECKING:  # clipseg_cli.train imports torch: only inside the command
    from clipseg_cli.train import TrainResult

TRAIN_HELP = "\n\n".join(
    [
        "Fine-tune CLIPSeg's decoder (CLIP frozen) on your own images, masks and prompts, or "
        "train a small model from scratch.",
        "MANIFEST is a JSON-lines file, one example per line, paths relative to its folder: "
        '{"image": "images/1.png", "mask": "masks/1_dog.png", "prompt": "a dog"}. '
        '"mask": null marks a prompt that names nothing in the image (learn to answer with an '
        'empty mask). Optional keys: "split" ("train" or "val"; otherwise --val-fraction '
        'decides, seeded, per image) and "class" (examples of one class are each other\'s '
        "visual prompts with --image-prompt-fraction; default: the prompt). Masks are read as "
        "everywhere else (greyscale 0/255 or 0/1, 16-bit, 1-bit or float; colour only when "
        "every pixel is grey, never with transparency): foreground above half scale.",
        "Each epoch reports the mean loss and the validation IoU_FG (TP/(TP+FP+FN) summed over "
        "the validation set at --threshold). OUT gets config.json + model.safetensors (load "
        "with --model OUT) and training.json.",
    ]
)


class _TrainReporter:
    """A rich progress bar on a terminal; otherwise a plain line every ``interval`` seconds.
    Epoch summaries are always printed as lines."""

    def __init__(self, mode: str, interval: float = 30.0) -> None:
        self.mode = "bar" if wants_bar(mode) else mode if mode == "none" else "lines"
        self.interval = interval
        self._last = time.monotonic()
        self._bar = None
        self._task = None
        self._epoch: str | None = None

    def __enter__(self) -> _TrainReporter:
        if self.mode == "bar":
            self._bar = progress_bar(
                "[bold]epoch {task.fields[epoch]}",
                "loss {task.fields[loss]:.4f}",
                "{task.fields[stage]}",
            )
        return self

    def __call__(self, progress) -> None:
        if progress.kind == "epoch":
            self._epoch_line(progress)
            return
        if self._bar is not None:
            self._update_bar(progress)
            return
        now = time.monotonic()
        if self.mode == "none" or now - self._last < self.interval:
            return
        self._last = now
        if progress.kind == "step":
            typer.echo(
                f"clipseg train: epoch {progress.epoch}/{progress.epochs} step "
                f"{progress.step}/{progress.steps} loss {progress.loss:.4f} "
                f"({progress.elapsed:.0f}s)",
                err=True,
            )

    def _update_bar(self, progress) -> None:
        epoch = f"{progress.epoch}/{progress.epochs}"
        stage = "validating" if progress.kind == "validate" else ""
        if self._epoch != epoch:  # one bar per epoch
            if self._task is not None:
                self._bar.remove_task(self._task)
            self._task = self._bar.add_task(
                "train", total=progress.steps, epoch=epoch, loss=progress.loss, stage=stage
            )
            self._epoch = epoch
        self._bar.update(self._task, completed=progress.step, loss=progress.loss, stage=stage)

    def _epoch_line(self, progress) -> None:
        if self.mode == "none":
            return
        stats = progress.stats
        parts = [f"epoch {stats.epoch}/{progress.epochs}", f"loss {stats.train_loss:.4f}"]
        if stats.val_iou is not None:
            parts.append(f"val IoU_FG {stats.val_iou:.3f} (text)")
        if stats.val_iou_image is not None:
            parts.append(f"{stats.val_iou_image:.3f} (image prompts)")
        parts.append(f"{stats.seconds:.0f}s")
        line = "clipseg train: " + ", ".join(parts)
        if self._bar is not None:
            self._bar.console.print(line, markup=False, highlight=False)
        else:
            typer.echo(line, err=True)

    def __exit__(self, *exc) -> None:
        if self._bar is not None:
            self._bar.stop()


def train_command(
    manifest: Annotated[
        Path, typer.Argument(help="JSON-lines manifest (see above).", show_default=False)
    ],
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder for the trained model.")] = Path(
        "clipseg-model"
    ),
    model: Annotated[
        str | None,
        typer.Option(
            help="Weights to start from: hub id, short name, folder or decoder file "
            f"(default: {DEFAULT_MODEL})."
        ),
    ] = None,
    from_scratch: Annotated[
        str | None,
        typer.Option(
            help="Train every weight from random initialisation with this architecture: "
            "'tiny' (the demo model's: small ViT and text towers) or a model name."
        ),
    ] = None,
    train_backbone: Annotated[
        bool, typer.Option(help="Also train the CLIP towers (always with --from-scratch).")
    ] = False,
    epochs: Annotated[int, typer.Option(help="Passes over the training images.")] = 10,
    batch_size: Annotated[int, typer.Option(help="Images per step (all their prompts).")] = 8,
    lr: Annotated[float, typer.Option(help="Peak learning rate (AdamW, cosine decay).")] = 1e-3,
    weight_decay: Annotated[float, typer.Option(help="AdamW weight decay.")] = 1e-4,
    warmup_steps: Annotated[int, typer.Option(help="Linear learning-rate warm-up steps.")] = 100,
    val_fraction: Annotated[
        float, typer.Option(help="Share of images without a 'split' used for validation.")
    ] = 0.1,
    seed: Annotated[int, typer.Option(help="Seed of the split, the order and the init.")] = 0,
    image_prompt_fraction: Annotated[
        float,
        typer.Option(
            help="Share of prompts replaced by an engineered crop of another image's object of "
            "the same class (trains image prompts)."
        ),
    ] = 0.0,
    align_weight: Annotated[
        float,
        typer.Option(help="Weight of the contrastive text/image-embedding alignment loss."),
    ] = 0.0,
    token_class_weight: Annotated[
        float,
        typer.Option(
            help="Weight of an auxiliary loss teaching every vision token the class of the "
            "object under it (needs a trained backbone; helps from scratch)."
        ),
    ] = 0.0,
    hflip: Annotated[bool, typer.Option(help="Randomly mirror training images.")] = False,
    threshold: Annotated[
        float, typer.Option(help="Probability threshold of the validation IoU.")
    ] = DEFAULT_THRESHOLD,
    checkpoint_dir: Annotated[
        Path | None,
        typer.Option(help="Write a resumable checkpoint here after every epoch."),
    ] = None,
    resume: Annotated[
        bool, typer.Option(help="Continue from the checkpoint in --checkpoint-dir.")
    ] = False,
    device: DeviceOpt = "auto",
    save_dtype: Annotated[
        str,
        typer.Option(
            help=f"dtype of the saved weights: {', '.join(SAVE_DTYPES)} (fp16 and bf16: half "
            "the size)."
        ),
    ] = "fp32",
    threads: Annotated[
        int | None,
        typer.Option(help="CPU threads for PyTorch (default: PyTorch's choice)."),
    ] = None,
    progress: ProgressOpt = "auto",
) -> None:
    from clipseg_cli.train import TrainConfig, train

    if threads is not None:
        if threads < 1:
            raise fail("--threads must be at least 1", ExitCode.USAGE)
        import torch

        torch.set_num_threads(threads)
    config = TrainConfig(
        manifest=manifest,
        out_dir=out,
        model=model,
        from_scratch=from_scratch,
        train_backbone=train_backbone,
        epochs=epochs,
        batch_size=batch_size,
        lr=lr,
        weight_decay=weight_decay,
        warmup_steps=warmup_steps,
        val_fraction=val_fraction,
        seed=seed,
        image_prompt_fraction=image_prompt_fraction,
        align_weight=align_weight,
        token_class_weight=token_class_weight,
        hflip=hflip,
        threshold=threshold,
        checkpoint_dir=checkpoint_dir,
        resume=resume,
        device=device,
        save_dtype=save_dtype,
    )
    # ManifestError and TrainError are ValueErrors (usage, like an unavailable --device);
    # WeightsError is a model error.
    interrupted = "interrupted"
    if checkpoint_dir is not None:
        interrupted += " (resume with --resume)"
    with exit_on_error(interrupted=interrupted), _TrainReporter(progress) as reporter:
        result = train(config, on_progress=reporter)
    typer.echo(_summary(result), err=True)


def _summary(result: TrainResult) -> str:
    """The closing line of ``clipseg train``: where the model went, the final validation IoU."""
    last = result.history[-1] if result.history else None
    summary = f"clipseg train: wrote {result.out_dir} in {result.seconds:.0f}s"
    if last is not None and last.val_iou is not None:
        summary += f"; final val IoU_FG {last.val_iou:.3f} (text)"
        if last.val_iou_image is not None:
            summary += f", {last.val_iou_image:.3f} (image prompts)"
    return summary


def synthetic_command(
    out: Annotated[Path, typer.Argument(help="Folder to write.", show_default=False)],
    count: Annotated[int, typer.Option(help="Number of scenes.")] = 1000,
    first_seed: Annotated[int, typer.Option(help="Seed of the first scene (then +1 each).")] = 0,
    size: Annotated[int, typer.Option(help="Image side in pixels.")] = 224,
    negatives: Annotated[
        int, typer.Option(help="Prompts per scene that name an absent object (empty mask).")
    ] = 1,
    one_colour_fraction: Annotated[
        float,
        typer.Option(help="Share of scenes in one colour, where only the shape tells apart."),
    ] = 0.0,
) -> None:
    """Write a toy training set of coloured shapes (images, masks, manifest.jsonl)."""
    from clipseg_cli.train.synthetic import write_training_set

    if count < 1 or size < 32 or negatives < 0 or first_seed < 0:
        raise fail(
            "--count must be >= 1, --size >= 32, --negatives and --first-seed >= 0",
            ExitCode.USAGE,
        )
    if not 0.0 <= one_colour_fraction <= 1.0:
        raise fail("--one-colour-fraction must be in [0, 1]", ExitCode.USAGE)
    with exit_on_error():
        try:
            manifest = write_training_set(
                out,
                count,
                first_seed=first_seed,
                size=size,
                negatives=negatives,
                one_colour_fraction=one_colour_fraction,
            )
        except OSError as error:  # not in the exit table: a folder we cannot write is usage
            raise fail(f"{out}: {error.strerror or error}", ExitCode.USAGE) from None
    typer.echo(f"clipseg synthetic: wrote {count} scenes, manifest {manifest}", err=True)


train_command.__doc__ = TRAIN_HELP
