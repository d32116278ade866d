"""Fine-tuning (or training from scratch) on the user's own images, masks and prompts.

Data layout: a JSON-lines manifest, one example per line::

    {"image": "images/0001.png", "mask": "masks/0001_dog.png", "prompt": "a dog"}
    {"image": "images/0001.png", "mask": null, "prompt": "a cat", "split": "val"}

* ``image``, ``mask``: paths relative to the manifest's folder (or absolute). The mask is an
  image of the same size, foreground where it is >= 128 (or 1 in a 0/1 mask); ``null`` means
  nothing in the image matches the prompt (a negative example, which the model should learn to
  answer with an empty mask).
* ``prompt``: the text prompt.
* ``class`` (optional): examples of one class can serve as each other's visual prompts (an
  engineered crop of another image's object conditions the model instead of the text); the
  default class is the prompt itself.
* ``split`` (optional): ``"train"`` or ``"val"``. Images without one are split by a seeded
  draw (``val_fraction``); all examples of one image always land on the same side.

The CLIP towers stay frozen unless ``train_backbone`` (always when training from scratch); the
loss is binary cross-entropy on the mask logits, as in the paper. Checkpoints (model +
optimizer + epoch + RNG state) are written at every epoch end as safetensors + JSON, never
pickles, and ``resume`` continues from the last one with identical state. The final weights
are written with :func:`clipseg_cli.weights.save_transformers_dir`, so ``--model OUT`` loads
them like any other model.

Nothing here prints: progress goes to the ``on_progress`` callback.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from clipseg_cli.io import sources
from clipseg_cli.model.clipseg import ClipSegModel
from clipseg_cli.ops.transforms import probabilities_at_size, resize_rgb, stack_uint8
from clipseg_cli.segmenter import resolve_device
from clipseg_cli.specs import DEFAULT_THRESHOLD, architecture_for

SPLITS = ("train", "val")
CHECKPOINT_JSON = "checkpoint.json"
# At most this many examples (prompts) of one image per step: bounds the decoder's cost.
MAX_PROMPTS_PER_IMAGE = 8
# Temperature of the text/image alignment loss (cosine similarities / tau).
ALIGN_TEMPERATURE = 0.1
# Config fields that may change between a checkpoint and its resumption.
_RESUMABLE_CHANGES = frozenset({"epochs", "resume", "device", "checkpoint_dir", "out_dir"})


class ManifestError(ValueError):
    """The manifest or a file it names is unusable. ``str()`` is one line naming the file."""


class TrainError(ValueError):
    """The training run cannot start or resume (bad options, mismatched checkpoint)."""


# -- the manifest ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Example:
    """One manifest line: an image, the mask of what ``prompt`` names in it (None: nothing)."""

    image: Path
    mask: Path | None
    prompt: str
    label: str  # the class: examples of one class are each other's visual prompts
    split: str | None
    line: int  # 1-based line number in the manifest, for messages


def read_manifest(path: Path, *, check_files: bool = True) -> list[Example]:
    """Parse a JSON-lines manifest; every problem is a :class:`ManifestError` naming the line.

    Blank lines and lines starting with ``#`` are skipped. Relative paths are resolved against
    the manifest's folder.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ManifestError(f"{path}: no such file") from None
    except (OSError, UnicodeDecodeError) as error:
        raise ManifestError(f"{path}: unreadable ({_first_line(error)})") from None
    base = path.parent
    examples = []
    for number, raw in enumerate(text.splitlines(), start=1):
        if not raw.strip() or raw.lstrip().startswith("#"):
            continue
        where = f"{path}:{number}"
        try:
            row = json.loads(raw)
        except json.JSONDecodeError as error:
            raise ManifestError(f"{where}: not valid JSON ({error.msg})") from None
        if not isinstance(row, dict):
            raise ManifestError(f"{where}: expected a JSON object, got {type(row).__name__}")
        examples.append(_parse_row(row, where, number, base, check_files))
    if not examples:
        raise ManifestError(f"{path}: no examples")
    return examples


def _parse_row(row: dict, where: str, number: int, base: Path, check_files: bool) -> Example:
    for key in ("image", "mask", "prompt"):
        if key not in row:
            raise ManifestError(f"{where}: missing {key!r}")
    prompt, label, split = row["prompt"], row.get("class", row["prompt"]), row.get("split")
    if not isinstance(prompt, str) or not prompt.strip():
        raise ManifestError(f"{where}: 'prompt' must be a non-empty string")
    if not isinstance(label, str) or not label.strip():
        raise ManifestError(f"{where}: 'class' must be a non-empty string")
    if split is not None and split not in SPLITS:
        raise ManifestError(f"{where}: 'split' must be 'train' or 'val', not {split!r}")
    if not isinstance(row["image"], str) or not row["image"]:
        raise ManifestError(f"{where}: 'image' must be a path")
    if row["mask"] is not None and (not isinstance(row["mask"], str) or not row["mask"]):
        raise ManifestError(f"{where}: 'mask' must be a path or null")
    image = base / Path(row["image"]).expanduser()
    mask = base / Path(row["mask"]).expanduser() if row["mask"] is not None else None
    if check_files:
        for what, file in (("image", image), ("mask", mask)):
            if file is not None and not file.is_file():
                raise ManifestError(f"{where}: {what} {file}: no such file")
    return Example(image, mask, prompt.strip(), label.strip(), split, number)


def split_examples(
    examples: Sequence[Example], val_fraction: float, seed: int
) -> tuple[list[Example], list[Example]]:
    """(train, val): explicit ``split`` values first, the other images by a seeded draw.

    The draw depends only on the set of image paths and the seed (not on line order), and all
    examples of one image go to the same side.
    """
    if not 0.0 <= val_fraction < 1.0:
        raise TrainError(f"--val-fraction must be in [0, 1), not {val_fraction}")
    declared: dict[Path, str] = {}
    for example in examples:
        if example.split is None:
            continue
        if declared.setdefault(example.image, example.split) != example.split:
            raise ManifestError(
                f"line {example.line}: {example.image} is both in 'train' and 'val'"
            )
    undecided = sorted({e.image for e in examples if e.image not in declared}, key=str)
    order = np.random.default_rng([seed, 7]).permutation(len(undecided))
    n_val = round(len(undecided) * val_fraction)
    if val_fraction > 0 and n_val == 0 and len(undecided) >= 2:
        n_val = 1  # a requested validation split is never silently empty
    side = dict(declared)
    for rank, index in enumerate(order):
        side[undecided[index]] = "val" if rank < n_val else "train"
    train = [e for e in examples if side[e.image] == "train"]
    val = [e for e in examples if side[e.image] == "val"]
    return train, val


def _group_by_image(examples: Sequence[Example]) -> list[tuple[Path, list[Example]]]:
    groups: dict[Path, list[Example]] = {}
    for example in examples:
        groups.setdefault(example.image, []).append(example)
    return list(groups.items())


# -- configuration and results --------------------------------------------------------------------


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
        if self.save_dtype not in _SAVE_DTYPES:
            raise TrainError(f"--save-dtype must be one of {', '.join(_SAVE_DTYPES)}")
        if self.resume and self.checkpoint_dir is None:
            raise TrainError("--resume needs --checkpoint-dir")

    @property
    def trains_backbone(self) -> bool:
        return self.train_backbone or self.from_scratch is not None


_SAVE_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


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


# -- data -----------------------------------------------------------------------------------------


def load_mask(path: Path, size: tuple[int, int] | None = None) -> np.ndarray:
    """bool ``[H, W]``: foreground where the mask is >= 128, or 1 in a 0/1 mask.

    Args:
        path: a greyscale, binary or colour image (converted to greyscale).
        size: ``(H, W)`` the mask must have (its image's size); a mismatch is a ManifestError.
    """
    try:
        with Image.open(path) as image:
            values = np.asarray(image.convert("L"))
    except (OSError, ValueError) as error:
        raise ManifestError(f"{path}: unreadable mask ({_first_line(error)})") from None
    if size is not None and values.shape != tuple(size):
        raise ManifestError(
            f"{path}: mask is {values.shape[1]}x{values.shape[0]} but its image is "
            f"{size[1]}x{size[0]}"
        )
    return values >= 128 if values.max() > 1 else values == 1


def _load_rgb(path: Path) -> np.ndarray:
    try:
        return sources.decode_image(path).rgb
    except sources.ImageDecodeError as error:
        raise ManifestError(f"{path}: {error}") from None


def _soft_target(mask: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """bool ``[H, W]`` -> float32 ``[h, w]`` in [0, 1] at the model size (area-weighted edges)."""
    image = Image.fromarray(mask.astype(np.uint8) * 255)
    if image.size != (size[1], size[0]):
        image = image.resize((size[1], size[0]), Image.BILINEAR)
    return np.asarray(image, np.float32) / 255.0


def _engineer(rgb: np.ndarray, mask: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """uint8 ``[*size, 3]``: the paper's visual prompt engineering (crop around the object,
    background darkened to 10% and blurred), as ``clipseg segment`` applies it to references."""
    from clipseg_cli.ops.prompts import engineer_reference

    return engineer_reference(rgb, mask, size=size)


@dataclass
class _ImagePlan:
    """What one image contributes to a step (decided in the main thread, for determinism)."""

    image: Path
    examples: list[Example]
    refs: list[Example | None]  # per example: the visual prompt to use, or None for the text
    flip: bool


@dataclass
class _Batch:
    """Loaded tensors of one step; K_b prompts for image b, R visual prompts."""

    pixels: torch.Tensor  # uint8 [B, S, S, 3]
    targets: list[torch.Tensor]  # per image float32 [K_b, S, S]
    prompts: list[list[str]]  # per image, its K_b prompts
    ref_index: list[list[int]]  # per image and prompt: index into ref_pixels, or -1 for text
    ref_pixels: torch.Tensor | None  # uint8 [R, S, S, 3]
    ref_prompts: list[str]  # the text prompt each visual prompt stands for
    ref_labels: list[str]
    labels: list[list[str]]  # per image, the class of each of its K_b prompts
    positive: list[list[bool]]  # per image and prompt: has a mask (False: names nothing)


def _load_batch(plans: list[_ImagePlan], size: tuple[int, int]) -> _Batch:
    images, targets, prompts, ref_index, labels, positive = [], [], [], [], [], []
    ref_images: list[np.ndarray] = []
    ref_prompts: list[str] = []
    ref_labels: list[str] = []
    for plan in plans:
        rgb = _load_rgb(plan.image)
        masks = [
            load_mask(e.mask, rgb.shape[:2]) if e.mask is not None else None for e in plan.examples
        ]
        if plan.flip:
            rgb = rgb[:, ::-1]
            masks = [m[:, ::-1] if m is not None else None for m in masks]
        images.append(resize_rgb(np.ascontiguousarray(rgb), size))
        targets.append(
            torch.from_numpy(
                np.stack(
                    [
                        _soft_target(m, size) if m is not None else np.zeros(size, np.float32)
                        for m in masks
                    ]
                )
            )
        )
        prompts.append([e.prompt for e in plan.examples])
        labels.append([e.label for e in plan.examples])
        positive.append([e.mask is not None for e in plan.examples])
        indices = []
        for example, ref in zip(plan.examples, plan.refs, strict=True):
            if ref is None:
                indices.append(-1)
                continue
            ref_rgb = _load_rgb(ref.image)
            ref_mask = load_mask(ref.mask, ref_rgb.shape[:2])
            indices.append(len(ref_images))
            ref_images.append(_engineer(ref_rgb, ref_mask, size))
            ref_prompts.append(example.prompt)
            ref_labels.append(example.label)
        ref_index.append(indices)
    return _Batch(
        pixels=stack_uint8(images),
        targets=targets,
        prompts=prompts,
        ref_index=ref_index,
        ref_pixels=stack_uint8(ref_images) if ref_images else None,
        ref_prompts=ref_prompts,
        ref_labels=ref_labels,
        labels=labels,
        positive=positive,
    )


class _ReferencePool:
    """Positive examples by class, to draw visual prompts from (never the same image)."""

    def __init__(self, examples: Sequence[Example]) -> None:
        self.by_label: dict[str, list[Example]] = {}
        for example in examples:
            if example.mask is not None:
                self.by_label.setdefault(example.label, []).append(example)

    def draw(self, example: Example, rng: np.random.Generator) -> Example | None:
        candidates = self.by_label.get(example.label, [])
        if not candidates or (len(candidates) == 1 and candidates[0].image == example.image):
            return None
        for _ in range(8):
            pick = candidates[int(rng.integers(len(candidates)))]
            if pick.image != example.image:
                return pick
        others = [c for c in candidates if c.image != example.image]
        return others[int(rng.integers(len(others)))] if others else None


def _plan_epoch(
    groups: list[tuple[Path, list[Example]]],
    pool: _ReferencePool,
    config: TrainConfig,
    epoch: int,
) -> list[list[_ImagePlan]]:
    """The batches of one epoch. A pure function of (seed, epoch): resuming replays it."""
    rng = np.random.default_rng([config.seed, epoch])
    order = rng.permutation(len(groups))
    plans = []
    for index in order:
        image, examples = groups[index]
        if len(examples) > MAX_PROMPTS_PER_IMAGE:
            keep = np.sort(rng.permutation(len(examples))[:MAX_PROMPTS_PER_IMAGE])
            examples = [examples[i] for i in keep]
        refs = [
            pool.draw(e, rng) if rng.random() < config.image_prompt_fraction else None
            for e in examples
        ]
        flip = bool(config.hflip and rng.random() < 0.5)
        plans.append(_ImagePlan(image, examples, refs, flip))
    size = config.batch_size
    return [plans[i : i + size] for i in range(0, len(plans), size)]


# -- the model ------------------------------------------------------------------------------------


def build_training_model(config: TrainConfig) -> tuple[ClipSegModel, str]:
    """The model to train, float32 on the CPU, and a description of where it came from."""
    if config.from_scratch is not None:
        try:
            arch = architecture_for(config.from_scratch)
        except KeyError as error:
            raise TrainError(str(error.args[0])) from None
        torch.manual_seed(config.seed)
        model = ClipSegModel(arch)
        return model, f"from scratch ({config.from_scratch})"
    from clipseg_cli.specs import DEFAULT_MODEL
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


def _lr_at(step: int, total: int, config: TrainConfig) -> float:
    """Linear warm-up, then cosine decay to 0: a function of the global step only."""
    if step < config.warmup_steps:
        return config.lr * (step + 1) / config.warmup_steps
    span = max(total - config.warmup_steps, 1)
    progress = min((step - config.warmup_steps) / span, 1.0)
    return config.lr * 0.5 * (1.0 + math.cos(math.pi * progress))


class _Tokenizer:
    """open_clip's CLIP tokenizer, built once (it reads its vocabulary file)."""

    def __init__(self, context_length: int) -> None:
        from open_clip.tokenizer import SimpleTokenizer

        self._tokenizer = SimpleTokenizer(context_length=context_length)

    def __call__(self, prompts: Sequence[str]) -> torch.Tensor:
        """Token ids ``[K, L]``, cut after the longest prompt's end-of-text token (L <= the
        context length): the causal text tower gives the same embeddings, several times
        faster for short prompts."""
        tokens = self._tokenizer(list(prompts))
        return tokens[:, : int(tokens.argmax(dim=-1).max()) + 1]


class TokenClassifier(torch.nn.Module):
    """Training-only auxiliary head: the class of the object under each vision token.

    A linear layer on the deepest activation the decoder reads (class token dropped). Its
    cross-entropy, on tokens more than half covered by one annotated mask, makes every token of
    an object, not only the ones on its outline, carry what the object is (e.g. its shape);
    pretrained CLIP features have that, a backbone trained from scratch learns it only slowly
    from the mask loss. Never exported.
    """

    def __init__(self, width: int, classes: Sequence[str]) -> None:
        super().__init__()
        self.index = {label: i for i, label in enumerate(classes)}
        self.head = torch.nn.Linear(width, len(classes))

    def loss(self, activation: torch.Tensor, batch: _Batch, patch: int) -> torch.Tensor | None:
        """Mean cross-entropy over labelled tokens of ``activation`` ``[B, 1 + T, width]``;
        None if no token is labelled."""
        features, classes = [], []
        for b, target in enumerate(batch.targets):
            rows = [k for k, positive in enumerate(batch.positive[b]) if positive]
            if not rows:
                continue
            # Coverage of each patch by each mask: [P, T] in the token order of the ViT.
            cover = F.avg_pool2d(target[rows].to(activation.device), patch).flatten(1)
            best, which = cover.max(0)
            keep = best > 0.5
            if not keep.any():
                continue
            names = [batch.labels[b][rows[int(i)]] for i in which[keep]]
            classes.append(torch.tensor([self.index[n] for n in names], device=cover.device))
            features.append(activation[b, 1:][keep])
        if not features:
            return None
        logits = self.head(torch.cat(features).float())
        return F.cross_entropy(logits, torch.cat(classes))


def _step_loss(
    model: ClipSegModel,
    batch: _Batch,
    tokenizer: _Tokenizer,
    device: torch.device,
    config: TrainConfig,
    token_classifier: TokenClassifier | None = None,
) -> torch.Tensor:
    """BCE over every (image, prompt) pair of the batch, plus the alignment and token-class
    losses if asked."""
    backbone_grad = torch.enable_grad() if config.trains_backbone else torch.no_grad()
    unique = sorted({p for prompts in batch.prompts for p in prompts} | set(batch.ref_prompts))
    position = {prompt: i for i, prompt in enumerate(unique)}
    with backbone_grad:
        pixels = model.normalize(batch.pixels.to(device))
        activations = model.backbone.vision_intermediates(pixels, model.arch.decoder.extract_layers)
        text = model.encode_text(tokenizer(unique).to(device))  # [U, D]
        images = None
        if batch.ref_pixels is not None:
            images = model.encode_image(model.normalize(batch.ref_pixels.to(device)))  # [R, D]
    patch = model.arch.vision.patch_size
    grid = (pixels.shape[-2] // patch, pixels.shape[-1] // patch)
    losses = []
    for b, prompts in enumerate(batch.prompts):
        rows = [
            images[r] if r >= 0 else text[position[p]]
            for p, r in zip(prompts, batch.ref_index[b], strict=True)
        ]
        logits = model.decoder([a[b : b + 1] for a in activations], torch.stack(rows), grid)[0]
        target = batch.targets[b].to(device)
        losses.append(F.binary_cross_entropy_with_logits(logits, target, reduction="none"))
    loss = torch.cat([x.flatten(1).mean(1) for x in losses]).mean()
    if config.align_weight > 0 and images is not None and len(batch.ref_labels) > 1:
        ref_text = text[[position[p] for p in batch.ref_prompts]]
        loss = loss + config.align_weight * _alignment_loss(images, ref_text, batch.ref_labels)
    if token_classifier is not None:
        token_loss = token_classifier.loss(activations[-1], batch, patch)
        if token_loss is not None:
            loss = loss + config.token_class_weight * token_loss
    return loss


def _alignment_loss(images: torch.Tensor, texts: torch.Tensor, labels: list[str]) -> torch.Tensor:
    """Symmetric InfoNCE between image ``[R, D]`` and text ``[R, D]`` embeddings; pairs of the
    same class count as matches (soft targets), so duplicates in a batch are not negatives."""
    image_n = F.normalize(images.float(), dim=-1)
    text_n = F.normalize(texts.float(), dim=-1)
    logits = image_n @ text_n.t() / ALIGN_TEMPERATURE
    same = torch.tensor([[a == b for b in labels] for a in labels], device=images.device)
    target = same.float() / same.float().sum(1, keepdim=True)
    return 0.5 * (
        torch.sum(-target * logits.log_softmax(1), 1).mean()
        + torch.sum(-target * logits.t().log_softmax(1), 1).mean()
    )


# -- validation -----------------------------------------------------------------------------------


@torch.inference_mode()
def evaluate(
    model: ClipSegModel,
    examples: Sequence[Example],
    *,
    threshold: float = DEFAULT_THRESHOLD,
    batch_size: int = 8,
    device: torch.device | None = None,
    references: Sequence[Example] | None = None,
    seed: int = 0,
    on_batch: Callable[[], None] | None = None,
) -> float:
    """IoU_FG = TP / (TP + FP + FN), summed over all examples at ``threshold`` (prob > t),
    at each mask's own resolution.

    Args:
        references: if given, every example is prompted with an engineered crop of another
            positive example of its class drawn from these (seeded), instead of its text;
            examples without such a reference are skipped.
    """
    device = device or next(model.parameters()).device
    size = (model.arch.input_size, model.arch.input_size)
    tokenizer = _Tokenizer(model.arch.text.context_length)
    pool = _ReferencePool(references) if references is not None else None
    rng = np.random.default_rng([seed, 11])
    was_training = model.training
    model.eval()
    tp = fp = fn = 0
    groups = _group_by_image(examples)
    try:
        for start in range(0, len(groups), batch_size):
            chunk = groups[start : start + batch_size]
            rgbs = [_load_rgb(image) for image, _ in chunk]
            pixels = model.normalize(stack_uint8([resize_rgb(x, size) for x in rgbs]).to(device))
            for b, (_image, group) in enumerate(chunk):
                if pool is not None:
                    pairs = [(e, pool.draw(e, rng)) for e in group]
                    pairs = [(e, r) for e, r in pairs if r is not None]
                    if not pairs:
                        continue
                    crops = []
                    for _, ref in pairs:
                        ref_rgb = _load_rgb(ref.image)
                        ref_mask = load_mask(ref.mask, ref_rgb.shape[:2])
                        crops.append(_engineer(ref_rgb, ref_mask, size))
                    crops_px = model.normalize(stack_uint8(crops).to(device))
                    conditionals = model.encode_image(crops_px)
                    group = [e for e, _ in pairs]
                else:
                    tokens = tokenizer([e.prompt for e in group]).to(device)
                    conditionals = model.encode_text(tokens)
                logits = model(pixels[b : b + 1], conditionals)[0]
                probs = probabilities_at_size(logits, rgbs[b].shape[:2]).cpu().numpy()
                for k, example in enumerate(group):
                    predicted = probs[k] > threshold
                    truth = (
                        load_mask(example.mask, rgbs[b].shape[:2])
                        if example.mask is not None
                        else np.zeros_like(predicted)
                    )
                    tp += int(np.count_nonzero(predicted & truth))
                    fp += int(np.count_nonzero(predicted & ~truth))
                    fn += int(np.count_nonzero(~predicted & truth))
            if on_batch is not None:
                on_batch()
    finally:
        model.train(was_training)
    return tp / (tp + fp + fn) if tp + fp + fn else 1.0


# -- checkpoints ----------------------------------------------------------------------------------


def _fingerprint(config: TrainConfig, manifest_sha: str) -> dict:
    """What must not change between a checkpoint and its resumption."""
    values = {
        key: (str(value) if isinstance(value, Path) else value)
        for key, value in asdict(config).items()
        if key not in _RESUMABLE_CHANGES
    }
    values["manifest_sha256"] = manifest_sha
    return values


def save_checkpoint(
    directory: Path,
    model: ClipSegModel,
    optimizer: torch.optim.Optimizer,
    *,
    epoch: int,
    global_step: int,
    fingerprint: dict,
    history: list[EpochStats],
    token_classifier: TokenClassifier | None = None,
) -> Path:
    """Write ``epoch-N.safetensors`` (model, optimizer tensors, torch RNG, the training-only
    token classifier if any) and then
    ``checkpoint.json`` (everything else) atomically; older tensor files are removed.

    The JSON is written last with an atomic rename, so a crash leaves the previous checkpoint
    usable."""
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {f"model.{k}": v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    state = optimizer.state_dict()
    layout: dict[str, list[str]] = {}
    for index, slots in state["state"].items():
        layout[str(index)] = []
        for name, value in slots.items():
            if not isinstance(value, torch.Tensor):
                raise TypeError(f"optimizer state {name!r} is not a tensor")
            tensors[f"optim.{index}.{name}"] = value.detach().cpu().contiguous()
            layout[str(index)].append(name)
    tensors["rng.torch"] = torch.get_rng_state()
    if token_classifier is not None:
        for key, value in token_classifier.state_dict().items():
            tensors[f"aux.{key}"] = value.detach().cpu().contiguous()
    name = f"epoch-{epoch:04d}.safetensors"
    save_file(tensors, str(directory / (name + ".tmp")))
    (directory / (name + ".tmp")).replace(directory / name)
    meta = {
        "format": 1,
        "tensors": name,
        "epoch": epoch,
        "global_step": global_step,
        "fingerprint": fingerprint,
        "optimizer": {"param_groups": state["param_groups"], "state_layout": layout},
        "history": [asdict(s) for s in history],
    }
    tmp = directory / (CHECKPOINT_JSON + ".tmp")
    tmp.write_text(json.dumps(meta, indent=1) + "\n")
    tmp.replace(directory / CHECKPOINT_JSON)
    for old in directory.glob("epoch-*.safetensors"):
        if old.name != name:
            old.unlink()
    return directory / CHECKPOINT_JSON


def load_checkpoint(
    directory: Path,
    model: ClipSegModel,
    optimizer: torch.optim.Optimizer,
    fingerprint: dict,
    token_classifier: TokenClassifier | None = None,
) -> tuple[int, int, list[EpochStats]]:
    """Restore model, optimizer and torch RNG from ``directory``; (epoch, global step, history).

    Raises:
        TrainError: no checkpoint, unreadable, or made by a run with other settings.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    meta_path = Path(directory) / CHECKPOINT_JSON
    if not meta_path.is_file():
        raise TrainError(f"{directory}: no {CHECKPOINT_JSON} to resume from")
    try:
        meta = json.loads(meta_path.read_text())
        tensors = load_file(str(Path(directory) / meta["tensors"]))
    except (OSError, json.JSONDecodeError, KeyError, SafetensorError) as error:
        raise TrainError(f"{meta_path}: unreadable checkpoint ({_first_line(error)})") from None
    saved = meta.get("fingerprint", {})
    changed = sorted(k for k in set(saved) | set(fingerprint) if saved.get(k) != fingerprint.get(k))
    if changed:
        raise TrainError(
            f"{meta_path}: made with different settings ({', '.join(changed)}); resume with the "
            "same ones or use another --checkpoint-dir"
        )
    model_state = {k[len("model.") :]: v for k, v in tensors.items() if k.startswith("model.")}
    model.load_state_dict(model_state, strict=True)
    if token_classifier is not None:
        aux_state = {k[len("aux.") :]: v for k, v in tensors.items() if k.startswith("aux.")}
        token_classifier.load_state_dict(aux_state, strict=True)
    optim_state: dict = {"state": {}, "param_groups": meta["optimizer"]["param_groups"]}
    for index, names in meta["optimizer"]["state_layout"].items():
        optim_state["state"][int(index)] = {n: tensors[f"optim.{index}.{n}"] for n in names}
    optimizer.load_state_dict(optim_state)
    torch.set_rng_state(tensors["rng.torch"])
    history = [EpochStats(**s) for s in meta.get("history", [])]
    return int(meta["epoch"]), int(meta["global_step"]), history


# -- the run --------------------------------------------------------------------------------------


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
    examples = read_manifest(config.manifest)
    train_examples, val_examples = split_examples(examples, config.val_fraction, config.seed)
    if not train_examples:
        raise TrainError(f"{config.manifest}: no training examples after the validation split")
    groups = _group_by_image(train_examples)
    pool = _ReferencePool(train_examples)
    device = resolve_device(config.device)

    model, origin = build_training_model(config)
    model = model.float().to(device).train()
    params = trainable_parameters(model, config.trains_backbone)
    token_classifier = None
    if config.token_class_weight > 0:
        classes = sorted({e.label for e in train_examples if e.mask is not None})
        token_classifier = TokenClassifier(model.arch.vision.width, classes).to(device)
        params += list(token_classifier.parameters())
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    steps_per_epoch = math.ceil(len(groups) / config.batch_size)
    total_steps = steps_per_epoch * config.epochs
    fingerprint = _fingerprint(config, _sha256(config.manifest))

    first_epoch, global_step, history = 1, 0, []
    if config.checkpoint_dir is not None:
        exists = (config.checkpoint_dir / CHECKPOINT_JSON).is_file()
        if config.resume:
            done, global_step, history = load_checkpoint(
                config.checkpoint_dir, model, optimizer, fingerprint, token_classifier
            )
            first_epoch = done + 1
        elif exists:
            raise TrainError(
                f"{config.checkpoint_dir}: already holds a checkpoint; pass --resume to "
                "continue it, or choose another --checkpoint-dir"
            )
    result = TrainResult(
        out_dir=config.out_dir,
        history=list(history),
        resumed_from_epoch=first_epoch - 1,
        train_images=len(groups),
        val_images=len(_group_by_image(val_examples)),
    )
    tokenizer = _Tokenizer(model.arch.text.context_length)
    size = (model.arch.input_size, model.arch.input_size)

    # One loader thread: decoding the next batch overlaps the current step (PIL and cv2
    # release the GIL), while the batch plan itself is made here, deterministically.
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="clipseg-train-load") as loader:
        for epoch in range(first_epoch, config.epochs + 1):
            epoch_start = time.monotonic()
            batches = _plan_epoch(groups, pool, config, epoch)
            pending = loader.submit(_load_batch, batches[0], size)
            running, count = 0.0, 0
            for step, _plan in enumerate(batches, start=1):
                batch = pending.result()
                if step < len(batches):
                    pending = loader.submit(_load_batch, batches[step], size)
                for group in optimizer.param_groups:
                    group["lr"] = _lr_at(global_step, total_steps, config)
                loss = _step_loss(model, batch, tokenizer, device, config, token_classifier)
                if not torch.isfinite(loss):
                    raise TrainError(
                        f"the loss became {loss.item()} at epoch {epoch}, step {step}; lower --lr"
                    )
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(params, 1.0)
                optimizer.step()
                global_step += 1
                running += loss.item()
                count += 1
                if on_progress is not None:
                    on_progress(
                        TrainProgress(
                            "step",
                            epoch,
                            config.epochs,
                            step,
                            len(batches),
                            running / count,
                            time.monotonic() - start_time,
                        )
                    )
            stats = _validate(
                model,
                val_examples,
                train_examples,
                config,
                device,
                epoch,
                len(batches),
                running / max(count, 1),
                start_time,
                on_progress,
            )
            stats = replace(stats, seconds=round(time.monotonic() - epoch_start, 2))
            result.history.append(stats)
            if config.checkpoint_dir is not None:
                save_checkpoint(
                    config.checkpoint_dir,
                    model,
                    optimizer,
                    epoch=epoch,
                    global_step=global_step,
                    fingerprint=fingerprint,
                    history=result.history,
                    token_classifier=token_classifier,
                )
            if on_progress is not None:
                on_progress(
                    TrainProgress(
                        "epoch",
                        epoch,
                        config.epochs,
                        len(batches),
                        len(batches),
                        stats.train_loss,
                        time.monotonic() - start_time,
                        stats,
                    )
                )

    model.eval().requires_grad_(False)
    export_model(model, config, origin, result)
    result.model = model
    result.seconds = round(time.monotonic() - start_time, 2)
    return result


def _validate(
    model: ClipSegModel,
    val_examples: list[Example],
    train_examples: list[Example],
    config: TrainConfig,
    device: torch.device,
    epoch: int,
    steps: int,
    train_loss: float,
    start_time: float,
    on_progress: Callable[[TrainProgress], None] | None,
) -> EpochStats:
    def tick() -> None:
        if on_progress is not None:
            elapsed = time.monotonic() - start_time
            on_progress(
                TrainProgress("validate", epoch, config.epochs, steps, steps, train_loss, elapsed)
            )

    val_iou = val_iou_image = None
    if val_examples:
        common = {
            "threshold": config.threshold,
            "batch_size": config.batch_size,
            "device": device,
            "on_batch": tick,
        }
        val_iou = evaluate(model, val_examples, **common)
        if config.image_prompt_fraction > 0:
            # Visual prompts from the validation images themselves when they have the class,
            # else from the training images: never the image being segmented.
            val_iou_image = evaluate(
                model,
                val_examples,
                references=list(val_examples) + list(train_examples),
                seed=config.seed,
                **common,
            )
    return EpochStats(
        epoch=epoch,
        train_loss=round(train_loss, 6),
        val_iou=round(val_iou, 6) if val_iou is not None else None,
        val_iou_image=round(val_iou_image, 6) if val_iou_image is not None else None,
        seconds=0.0,
    )


def export_model(
    model: ClipSegModel, config: TrainConfig, origin: str, result: TrainResult
) -> Path:
    """``config.json`` + ``model.safetensors`` (loadable with ``--model OUT``) and
    ``training.json`` (settings and per-epoch numbers) in ``config.out_dir``."""
    from clipseg_cli.weights import save_transformers_dir

    out = save_transformers_dir(model, config.out_dir, dtype=_SAVE_DTYPES[config.save_dtype])
    record = {
        "started_from": origin,
        "settings": {
            k: (str(v) if isinstance(v, Path) else v)
            for k, v in asdict(config).items()
            if k not in {"out_dir", "checkpoint_dir", "resume", "device"}
        },
        "manifest_sha256": _sha256(config.manifest),
        "train_images": result.train_images,
        "val_images": result.val_images,
        "history": [asdict(s) for s in result.history],
        "iou_convention": "IoU_FG = TP/(TP+FP+FN) summed over the validation set, prob > t",
    }
    (out / "training.json").write_text(json.dumps(record, indent=1) + "\n")
    return out


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with Path(path).open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return text[0][:200] if text else type(error).__name__
