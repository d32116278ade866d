"""Procedurally generated scenes of coloured shapes, needing no download: the training data of
the demo model (:mod:`clipseg_cli.train.synthetic` writes them as a training set), held-out
scenes for its tests, and large scenes for the measurements of refinement, tiles and instances.

A scene is a textured background (smooth noise, a gradient or stripes, all in muted colours so
they cannot be mistaken for an object) with objects, each a (colour, shape) class. Everything is
a pure function of the seed: no files.

Example::

    from clipseg_cli.ops.shapes import make_scene

    scene = make_scene(7)
    scene.image  # uint8 [224, 224, 3]
    scene.objects[0].mask  # bool [224, 224], the visible part of the object
    scene.objects[0].prompt  # e.g. "the red circle"
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass

import cv2
import numpy as np

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
    height, width = image.shape[:2]
    yy, xx = np.mgrid[:height, :width].astype(np.float32) / max(height, width)
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


def make_large_scene(
    seed: int,
    size: tuple[int, int] = (768, 1024),
    *,
    radius: tuple[float, float] = (60.0, 110.0),
    classes: tuple[int, int] = (1, 3),
    copies: tuple[int, int] = (1, 1),
    gap: int = 12,
    include: tuple[str, ...] = (),
    exclude: tuple[str, ...] = (),
    copies_of: Mapping[str, tuple[int, int]] | None = None,
    touching: float = 0.0,
    texture: float = 0.0,
) -> Scene:
    """A deterministic scene of ``size = (H, W)`` pixels whose objects never overlap.

    Between ``classes[0]`` and ``classes[1]`` classes are drawn (``include`` first, never one of
    ``exclude``), each ``copies[0]`` to ``copies[1]`` times, with radii in pixels drawn from
    ``radius``; every object stays ``gap`` pixels away from the others, so each mask is one
    whole shape (what instance counts need). An object that finds no free place after some
    tries is left out. ``copies_of`` overrides ``copies`` for the classes it names.

    ``touching``: the chance that a copy after a class's first is placed against the previous
    copy instead (the two touch, with neither gap nor overlap; it keeps ``gap`` from every other
    object): what splitting touching objects is measured on. At 0, the default, each seed
    draws exactly the scene it drew before this option existed.

    ``texture``: the strength (grey levels, about 0-50) of a coloured multi-scale noise added
    to the background, from a random stream of its own (0: none, the scene as before): a
    busy background on which a model fires here and there, the specks instance floors are
    measured on.
    """
    rng = np.random.default_rng([seed, 3])
    height, width = size
    canvas = max(height, width)
    image = _background(rng, canvas)[:height, :width].copy()
    allowed = [label for label in CLASSES if label not in exclude and label not in include]
    count = int(rng.integers(classes[0], classes[1] + 1))
    labels = [*include, *(allowed[i] for i in rng.permutation(len(allowed)))][:count]
    taken = np.zeros((height, width), bool)
    kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * gap + 1, 2 * gap + 1))
    objects: list[SceneObject] = []
    for label in labels:
        colour, shape = label.split(" ")
        previous: tuple[np.ndarray, tuple[float, float], float] | None = None
        low, high = (copies_of or {}).get(label, copies)
        for _copy in range(int(rng.integers(low, high + 1))):
            against = previous if previous and touching and rng.random() < touching else None
            for _attempt in range(50):
                r = rng.uniform(*radius)
                margin = r * 1.5
                if against is None:
                    centre = (
                        rng.uniform(margin, width - margin),
                        rng.uniform(margin, height - margin),
                    )
                    mask = _shape_mask(shape, centre, r, canvas)[:height, :width]
                    others = taken
                else:
                    centre, mask = _touching(shape, against, r, canvas, rng.uniform(0, 2 * math.pi))
                    mask = mask[:height, :width]
                    others = taken & ~against[0]
                    inside = margin <= centre[0] <= width - margin
                    if not (inside and margin <= centre[1] <= height - margin):
                        continue
                grown = cv2.dilate(mask.astype(np.uint8), kernel).astype(bool)
                if not (grown & others).any():
                    break
            else:
                continue
            taken |= mask
            previous = (mask, centre, r)
            _paint(image, mask, colour, rng)
            objects.append(SceneObject(colour, shape, mask=mask, prompt=phrase(label, rng)))
    if texture:
        image[~taken] += _texture(np.random.default_rng([seed, 4]), size, texture)[~taken]
    rgb = np.clip(image, 0, 255).astype(np.uint8)
    return Scene(seed=seed, image=rgb, objects=tuple(objects))


def _texture(rng: np.random.Generator, size: tuple[int, int], strength: float) -> np.ndarray:
    """float32 ``[H, W, 3]``: coloured noise at three scales (blotches a sixteenth, a
    sixty-fourth and a 256th of the width across), of standard deviation about ``strength``."""
    height, width = size
    texture = np.zeros((height, width, 3), np.float32)
    for cells, share in ((16, 0.8), (64, 0.5), (256, 0.3)):
        coarse = rng.normal(0, share * strength, (max(1, cells * height // width), cells, 3))
        texture += cv2.resize(
            coarse.astype(np.float32), (width, height), interpolation=cv2.INTER_CUBIC
        )
    return texture


def _touching(
    shape: str,
    partner: tuple[np.ndarray, tuple[float, float], float],
    radius: float,
    canvas: int,
    angle: float,
) -> tuple[tuple[float, float], np.ndarray]:
    """A ``shape`` of ``radius`` against ``partner`` (its mask, centre and radius) in the
    direction ``angle``: the nearest centre (to a tenth of a pixel) at which it does not overlap
    the partner, so the two touch."""
    partner_mask, (px, py), partner_radius = partner
    height, width = partner_mask.shape

    def placed(distance: float) -> tuple[tuple[float, float], np.ndarray]:
        centre = (px + distance * math.cos(angle), py + distance * math.sin(angle))
        return centre, _shape_mask(shape, centre, radius, canvas)[:height, :width]

    near, far = 0.0, 2.0 * (partner_radius + radius)  # overlapping at near, apart at far
    while far - near > 0.1:
        middle = (near + far) / 2
        if (placed(middle)[1] & partner_mask).any():
            near = middle
        else:
            far = middle
    centre, _ = placed(far)
    return centre, _shape_mask(shape, centre, radius, canvas)


# -- moving scenes (videos) -----------------------------------------------------------------------


@dataclass(frozen=True)
class Mover:
    """An object of a moving scene: its class, its size (circumradius as a fraction of the
    frame's shorter side), where it starts (fractions of the width and height) and its speed in
    pixels per frame; it bounces off the frame's edges."""

    label: str
    radius: float = 0.15
    start: tuple[float, float] = (0.3, 0.5)
    velocity: tuple[float, float] = (3.0, 1.0)


def moving_frames(
    count: int,
    size: tuple[int, int] = (180, 320),
    movers: tuple[Mover, ...] = (Mover("red circle"),),
    *,
    seed: int = 0,
    grain: float = 4.0,
) -> Iterator[tuple[np.ndarray, dict[str, np.ndarray]]]:
    """``count`` frames (uint8 ``[H, W, 3]``) of ``movers`` crossing a still background, each
    with its objects' visible masks by label (the ground truth). Every frame has its own fine
    grain (``grain``: its standard deviation), as a camera's sensor noise."""
    height, width = size
    rng = np.random.default_rng(seed)
    canvas = max(height, width)
    background = _background(rng, canvas)[:height, :width]
    side = min(height, width)
    positions = [[m.start[0] * width, m.start[1] * height] for m in movers]
    velocities = [list(m.velocity) for m in movers]
    for _frame in range(count):
        image = background + rng.normal(0, grain, size=background.shape).astype(np.float32)
        masks: dict[str, np.ndarray] = {}
        for mover, position in zip(movers, positions, strict=True):
            colour, shape = mover.label.split(" ")
            mask = _shape_mask(shape, (position[0], position[1]), mover.radius * side, canvas)
            mask = mask[:height, :width]
            masks = {label: m & ~mask for label, m in masks.items()}
            masks[mover.label] = mask
            _paint(image, mask, colour, np.random.default_rng(seed + 1))
        yield np.clip(image, 0, 255).astype(np.uint8), masks
        for mover, position, velocity in zip(movers, positions, velocities, strict=True):
            margin = mover.radius * side * 0.8
            for axis, limit in ((0, width), (1, height)):
                position[axis] += velocity[axis]
                if not margin <= position[axis] <= limit - margin:
                    velocity[axis] = -velocity[axis]
                    position[axis] = min(max(position[axis], margin), limit - margin)
