"""The training manifest: its lines as :class:`Example` objects, the train/validation split, and
the grouping of examples by image.

Data layout: a JSON-lines file, one example per line::

    {"image": "images/0001.png", "mask": "masks/0001_dog.png", "prompt": "a dog"}
    {"image": "images/0001.png", "mask": null, "prompt": "a cat", "split": "val"}

* ``image``, ``mask``: paths relative to the manifest's folder (or absolute). The mask is an
  image of the same size, read as every mask file is (:func:`clipseg_cli.io.masks.read_mask`:
  greyscale 0/255 or 0/1, 16-bit, ...; foreground above half scale); ``null`` means nothing
  in the image matches the prompt (a negative example, which the model should learn to answer
  with an empty mask).
* ``prompt``: the text prompt.
* ``class`` (optional): examples of one class can serve as each other's visual prompts (an
  engineered crop of another image's object conditions the model instead of the text); the
  default class is the prompt itself.
* ``split`` (optional): ``"train"`` or ``"val"``. Images without one are split by a seeded
  draw (``val_fraction``); all examples of one image always land on the same side.

Only the manifest file itself is read here (and whether the files it names exist); decoding
images and masks is :mod:`.data`'s. Every problem is a one-line :class:`ManifestError`.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from clipseg_cli.errors import first_line
from clipseg_cli.train.config import ManifestError, TrainError

SPLITS = ("train", "val")


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
        raise ManifestError(f"{path}: unreadable ({first_line(error)})") from None
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


def group_by_image(examples: Sequence[Example]) -> list[tuple[Path, list[Example]]]:
    """``(image, its examples)`` in order of first appearance: the unit of a training step
    and of validation (every prompt of an image is decoded against one forward pass)."""
    groups: dict[Path, list[Example]] = {}
    for example in examples:
        groups.setdefault(example.image, []).append(example)
    return list(groups.items())
