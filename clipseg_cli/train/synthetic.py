"""Procedurally generated scenes of coloured shapes: training data for the demo model and
held-out data for its tests, needing no download.

A scene is a textured background (smooth noise, a gradient or stripes, all in muted colours so
they cannot be mistaken for an object) with one to four objects, each a distinct
(colour, shape) class, that may overlap a little. Everything is a pure function of the seed.

Scenes only: nothing here trains, reads a file or prints; :func:`write_training_set` writes
them in the layout ``clipseg train`` reads (:mod:`clipseg_cli.train.manifest`).

Example::

    from clipseg_cli.train.synthetic import make_scene

    scene = make_scene(7)
    scene.image  # uint8 [224, 224, 3]
    scene.objects[0].mask  # bool [224, 224], the visible part of the object
    scene.objects[0].prompt  # e.g. "the red circle"
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
from PIL import Image

SHAPES = ("circle", "square", "triangle")
# Saturated, well separated hues; each object's colour is jittered around its entry.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (215, 35, 35),
    "green": (40, 170, 55),
    "blue": (35, 75, 215),
    "yellow": (235, 205, 35),
}
CLASSES = tuple(f"{colour} {shape}" for colour in COLOURS for shape in SHAPES)
# The phrasings of the prompts ("a red circle", "the red circle", ...).
TEMPLATES = ("a {}", "the {}", "a picture of a {}", "a photo of the {}")
BACKGROUNDS = ("noise", "gradient", "stripes")
DEFAULT_SIZE = 224
# An object may lose at most this fraction of its area to objects drawn over it.
_MAX_OCCLUDED = 0.25
# Squares are axis-aligned and triangles stand on their base: edge orientations then tell the
# shapes apart locally. A small ViT trained from scratch for minutes learns that; with rotated
# squares it could not tell them from circles (measured: ~65% vs ~94% shape accuracy on crops
# after 300 steps).


@dataclass(frozen=True)
class SceneObject:
    """One object of a scene: its class and the mask of its visible pixels."""

    colour: str
    shape: str
    mask: np.ndarray  # bool [H, W]
    prompt: str  # a phrasing of the class, e.g. "a picture of a blue square"

    @property
    def label(self) -> str:
        """The class name, e.g. ``"blue square"``."""
        return f"{self.colour} {self.shape}"


@dataclass(frozen=True)
class Scene:
    """A generated image with its objects (in drawing order, later ones on top)."""

    seed: int
    image: np.ndarray  # uint8 [H, W, 3]
    objects: tuple[SceneObject, ...]

    def absent_classes(self) -> list[str]:
        """Classes (``"yellow triangle"``) of which the scene shows nothing."""
        present = {obj.label for obj in self.objects}
        return [label for label in CLASSES if label not in present]


def phrase(label: str, rng: np.random.Generator) -> str:
    """A prompt for a class, in one of :data:`TEMPLATES` picked by ``rng``."""
    return TEMPLATES[int(rng.integers(len(TEMPLATES)))].format(label)


# -- backgrounds ----------------------------------------------------------------------------------


def _muted_colour(rng: np.random.Generator) -> np.ndarray:
    """A greyish colour: grey level plus a small tint, far from the saturated object colours."""
    grey = rng.uniform(50, 200)
    return np.clip(grey + rng.uniform(-25, 25, size=3), 0, 255)


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    """float32 ``[size, size, 3]`` in [0, 255]."""
    kind = BACKGROUNDS[int(rng.integers(len(BACKGROUNDS)))]
    first, second = _muted_colour(rng), _muted_colour(rng)
    yy, xx = np.mgrid[:size, :size].astype(np.float32) / size
    if kind == "noise":
        cells = int(rng.integers(3, 12))
        coarse = rng.random((cells, cells)).astype(np.float32)
        weight = cv2.resize(coarse, (size, size), interpolation=cv2.INTER_CUBIC)
    elif kind == "gradient":
        angle = rng.uniform(0, 2 * math.pi)
        weight = xx * math.cos(angle) + yy * math.sin(angle)
        weight = (weight - weight.min()) / max(float(np.ptp(weight)), 1e-6)
    else:
        angle = rng.uniform(0, math.pi)
        period = rng.uniform(0.05, 0.25)
        phase = xx * math.cos(angle) + yy * math.sin(angle)
        weight = 0.5 + 0.5 * np.sin(2 * math.pi * phase / period + rng.uniform(0, 2 * math.pi))
    weight = np.clip(weight, 0, 1)[..., None]
    image = first * (1 - weight) + second * weight
    # Fine grain on every background so flat regions are not trivially "not an object".
    image = image + rng.normal(0, rng.uniform(2, 12), size=image.shape)
    return image.astype(np.float32)


# -- objects --------------------------------------------------------------------------------------


def _shape_mask(shape: str, centre: tuple[float, float], radius: float, size: int) -> np.ndarray:
    """bool ``[size, size]``: an upright shape of circumradius-like size ``radius`` (pixels)."""
    canvas = np.zeros((size, size), np.uint8)
    cx, cy = centre
    if shape == "circle":
        cv2.circle(canvas, (round(cx * 16), round(cy * 16)), round(radius * 16), 1, -1, shift=4)
        return canvas.astype(bool)
    if shape == "square":
        # Half side ~ 0.85 r: a square about as large as a circle of radius r.
        corners, half, angle = 4, radius * 0.85 * math.sqrt(2), math.pi / 4
    else:
        # A triangle needs a larger circumradius to look as large as the others.
        corners, half, angle = 3, radius * 1.4, -math.pi / 2
    points = [
        (
            cx + half * math.cos(angle + 2 * math.pi * i / corners),
            cy + half * math.sin(angle + 2 * math.pi * i / corners),
        )
        for i in range(corners)
    ]
    poly = np.round(np.array(points) * 16).astype(np.int32)
    cv2.fillPoly(canvas, [poly], 1, lineType=cv2.LINE_8, shift=4)
    return canvas.astype(bool)


def _paint(image: np.ndarray, mask: np.ndarray, colour: str, rng: np.random.Generator) -> None:
    """Paint an object in place: its jittered colour, with a little shading and grain."""
    base = np.array(COLOURS[colour], np.float32) + rng.uniform(-20, 20, size=3)
    size = image.shape[0]
    yy, xx = np.mgrid[:size, :size].astype(np.float32) / size
    angle = rng.uniform(0, 2 * math.pi)
    shade = 1.0 + rng.uniform(0, 0.25) * (xx * math.cos(angle) + yy * math.sin(angle) - 0.5)
    painted = base * shade[..., None] + rng.normal(0, 4, size=image.shape)
    image[mask] = painted[mask]


def make_scene(
    seed: int,
    size: int = DEFAULT_SIZE,
    *,
    min_objects: int = 1,
    max_objects: int = 4,
    exclude: tuple[str, ...] = (),
) -> Scene:
    """A deterministic scene of ``size`` x ``size`` pixels.

    Args:
        seed: any non-negative integer; the same seed always gives the same scene.
        size: image side in pixels.
        min_objects, max_objects: how many objects (distinct classes) to try to place.
        exclude: classes (``"yellow triangle"``) never to draw.

    Returns:
        The image, and the objects whose visible area is large enough to be segmented.
    """
    rng = np.random.default_rng(seed)
    image = _background(rng, size)
    allowed = [label for label in CLASSES if label not in exclude]
    count = int(rng.integers(min_objects, max_objects + 1))
    labels = [allowed[i] for i in rng.permutation(len(allowed))[:count]]
    masks: list[np.ndarray] = []
    placed: list[str] = []
    for label in labels:
        colour, shape = label.split(" ")
        for _attempt in range(20):
            radius = rng.uniform(0.11, 0.2) * size
            margin = radius * 0.8
            centre = (rng.uniform(margin, size - margin), rng.uniform(margin, size - margin))
            mask = _shape_mask(shape, centre, radius, size)
            # Drawing it on top must leave every earlier object mostly visible.
            if all((m & ~mask).sum() >= (1 - _MAX_OCCLUDED) * m.sum() for m in masks):
                break
        else:
            continue
        masks = [m & ~mask for m in masks]
        masks.append(mask)
        placed.append(label)
        _paint(image, mask, colour, rng)
    rgb = np.clip(image, 0, 255).astype(np.uint8)
    objects = tuple(
        SceneObject(*label.split(" "), mask=mask, prompt=phrase(label, rng))
        for label, mask in zip(placed, masks, strict=True)
    )
    return Scene(seed=seed, image=rgb, objects=objects)


# -- training sets --------------------------------------------------------------------------------


def training_scene(seed: int, size: int = DEFAULT_SIZE, one_colour_fraction: float = 0.0) -> Scene:
    """The scene of a training set: :func:`make_scene`, except that a seeded
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
