"""Training sets of coloured shapes for ``clipseg train`` (the one the bundled ``demo`` model was
trained on): the scenes of :mod:`clipseg_cli.ops.shapes`, written with their masks and a
manifest."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image

from clipseg_cli.ops.shapes import CLASSES, COLOURS, DEFAULT_SIZE, Scene, make_scene, phrase


def training_scene(seed: int, size: int = DEFAULT_SIZE, one_colour_fraction: float = 0.0) -> Scene:
    """The scene of a training set: :func:`~clipseg_cli.ops.shapes.make_scene`, except that a seeded
    ``one_colour_fraction`` of the scenes only use one colour, so that only the shape tells
    the objects apart (colour alone is learnt first, and then shape only slowly)."""
    rng = np.random.default_rng([seed, 2])
    if rng.random() >= one_colour_fraction:
        return make_scene(seed, size)
    colour = list(COLOURS)[int(rng.integers(len(COLOURS)))]
    others = tuple(label for label in CLASSES if not label.startswith(colour + " "))
    return make_scene(seed, size, min_objects=2, exclude=others)


def hard_negatives(scene: Scene, count: int, rng: np.random.Generator) -> list[str]:
    """``count`` absent classes, those sharing a colour with a present object first (the
    mistakes a colour-only model makes), each group in random order."""
    colours = {obj.colour for obj in scene.objects}
    absent = [scene.absent_classes()[i] for i in rng.permutation(len(scene.absent_classes()))]
    absent.sort(key=lambda label: label.split(" ")[0] not in colours)  # stable: keeps the draw
    return absent[:count]


def write_training_set(
    directory: Path,
    count: int,
    *,
    first_seed: int = 0,
    size: int = DEFAULT_SIZE,
    negatives: int = 1,
    one_colour_fraction: float = 0.0,
    on_progress: Callable[[int, int], None] | None = None,
) -> Path:
    """Write ``count`` scenes (seeds ``first_seed ..``) in the ``clipseg train`` layout.

    ``images/NNNNNN.png``, ``masks/NNNNNN_K.png`` (0/255) and ``manifest.jsonl`` with one line
    per object (``image``, ``mask``, ``prompt``, ``class``) plus ``negatives`` lines per scene
    naming a class the scene does not show (``"mask": null``: nothing matches; see
    :func:`hard_negatives`). ``one_colour_fraction``: see :func:`training_scene`.

    Returns:
        The manifest's path.
    """
    directory = Path(directory)
    (directory / "images").mkdir(parents=True, exist_ok=True)
    (directory / "masks").mkdir(exist_ok=True)
    lines = []
    for index in range(count):
        seed = first_seed + index
        scene = training_scene(seed, size, one_colour_fraction)
        # A separate stream for the negatives, so they do not change the scene.
        rng = np.random.default_rng([seed, 1])
        name = f"{seed:06d}"
        image_rel = f"images/{name}.png"
        Image.fromarray(scene.image).save(directory / image_rel)
        for k, obj in enumerate(scene.objects):
            mask_rel = f"masks/{name}_{k}.png"
            Image.fromarray(obj.mask.astype(np.uint8) * 255).save(directory / mask_rel)
            lines.append(
                {"image": image_rel, "mask": mask_rel, "prompt": obj.prompt, "class": obj.label}
            )
        for label in hard_negatives(scene, negatives, rng):
            lines.append(
                {"image": image_rel, "mask": None, "prompt": phrase(label, rng), "class": label}
            )
        if on_progress is not None:
            on_progress(index + 1, count)
    manifest = directory / "manifest.jsonl"
    manifest.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return manifest
