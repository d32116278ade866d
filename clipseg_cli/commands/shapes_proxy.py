"""``clipseg eval --shapes``: a reproducible proxy measurement of how sharp the masks are.

No labelled photos can be downloaded where clipseg is developed, so this measures what the
refinement and the tiles do with the bundled demo model on generated high-resolution shape
scenes (:func:`clipseg_cli.ops.shapes.make_large_scene`), through the real ``segment`` pipeline
and the real ``eval`` scoring:

* ``1024x768``: one to three large objects of distinct classes (radius 85-150 px: as large,
  relative to the image, as the demo model's training objects), every one of the 12 classes
  prompted (absent ones must stay empty);
* ``2048x1536``: three to five classes of small objects (radius 30-40 px, about 70 px across),
  always a red circle and never a yellow one; prompted with "a red circle" and "a yellow
  circle".

Each set runs with ``--refine none|guided`` and ``--tiles off|auto``; the table gives IoU_FG
and boundary F (2 px, :func:`clipseg_cli.ops.metrics.boundary_counts`) at the paper's
threshold 0.3 over the (image, prompt) pairs whose class the image shows, summed as ``eval``
sums them (in the 2048x1536 set: the red circle's IoU), and the mean share of pixels that
prompts for absent classes claim (there: the yellow circle's coverage). The demo model's 128-px
input makes it an exaggerated CLIPSeg: its input is a smaller share of a large photo than the
real model's 352 px.

This module orchestrates segment runs and scores them with the metrics ``eval`` uses, so it
lives at the top layer; it never prints (the eval command does).
"""

from __future__ import annotations

import shutil
import time
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import numpy as np

from clipseg_cli.io import writers
from clipseg_cli.io.masks import read_mask
from clipseg_cli.io.naming import output_path, prompt_slugs
from clipseg_cli.ops import metrics
from clipseg_cli.ops.shapes import CLASSES, make_large_scene
from clipseg_cli.run.config import SegmentConfig
from clipseg_cli.run.pipeline import run_segment

#: Seeds of the proxy's scenes: far from the demo model's training seeds (0..3199) and from the
#: tests' held-out seeds (10_000_000 up).
FIRST_SEED = 50_000_000
THRESHOLD = 0.3


@dataclass(frozen=True)
class SceneSet:
    """One kind of scene the proxy generates."""

    name: str
    size: tuple[int, int]  # (H, W)
    radius: tuple[float, float]
    classes: tuple[int, int]
    copies: tuple[int, int]
    prompts: tuple[str, ...]
    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()


SETS = (
    SceneSet(
        "1024x768",
        (768, 1024),
        radius=(85.0, 150.0),
        classes=(1, 3),
        copies=(1, 1),
        prompts=tuple(f"a {label}" for label in CLASSES),
    ),
    SceneSet(
        "2048x1536",
        (1536, 2048),
        radius=(30.0, 40.0),
        classes=(3, 5),
        copies=(1, 2),
        prompts=("a red circle", "a yellow circle"),
        include=("red circle",),
        exclude=("yellow circle",),
    ),
)
CONFIGS = (("none", "off"), ("guided", "off"), ("none", "auto"), ("guided", "auto"))


def write_scenes(folder: Path, scene_set: SceneSet, count: int, first_seed: int) -> dict:
    """``folder/images/<seed>.png`` and, for every prompt whose class the scene shows,
    ``folder/gt/<prompt slug>/<seed>.png`` (0/255). Returns ``{seed: [present prompts]}``."""
    slugs = prompt_slugs(list(scene_set.prompts))
    present = {}
    for seed in range(first_seed, first_seed + count):
        scene = make_large_scene(
            seed,
            scene_set.size,
            radius=scene_set.radius,
            classes=scene_set.classes,
            copies=scene_set.copies,
            include=scene_set.include,
            exclude=scene_set.exclude,
        )
        writers.write_rgb(folder / "images" / f"{seed}.png", scene.image)
        present[seed] = []
        for prompt, slug in zip(scene_set.prompts, slugs, strict=True):
            truth = np.zeros(scene_set.size, bool)
            for obj in scene.objects:
                if f"a {obj.label}" == prompt:
                    truth |= obj.mask
            if truth.any():
                writers.write_mask(folder / "gt" / slug / f"{seed}.png", truth)
                present[seed].append(prompt)
    return present


def measure(
    work: Path, scenes: int = 6, first_seed: int = FIRST_SEED, model: str = "demo"
) -> list[dict]:
    """Generate the scenes under ``work``, run every configuration, score it; one result row
    per (set, refine, tiles)."""
    results = []
    for offset, scene_set in enumerate(SETS):
        folder = work / scene_set.name
        present = write_scenes(folder, scene_set, scenes, first_seed + offset * 1_000_000)
        for refine, tiles in CONFIGS:
            results.append(_run(folder, scene_set, present, refine, tiles, model))
    return results


def _run(
    folder: Path, scene_set: SceneSet, present: dict, refine: str, tiles: str, model: str
) -> dict:
    """One segment run over the set, scored: IoU_FG and boundary F over the (image, prompt)
    pairs whose class is in the image (summed, as ``eval`` does), and the mean share of pixels
    the other prompts claim."""
    out = folder / f"out-{refine}-{tiles}"
    shutil.rmtree(out, ignore_errors=True)
    config = SegmentConfig(
        inputs=(str(folder / "images"),),
        out_dir=out,
        prompts=scene_set.prompts,
        save=("soft",),
        refine=refine,
        tiles=tiles,
        threshold=THRESHOLD,
        model=model,
        device="cpu",
    )
    started = time.perf_counter()
    summary = run_segment(config)
    seconds = time.perf_counter() - started
    counts = metrics.Counts.zeros(1)
    edges = metrics.BoundaryCounts()
    absent_coverage = []
    for seed, prompts in present.items():
        for prompt, slug in zip(
            scene_set.prompts, prompt_slugs(list(scene_set.prompts)), strict=True
        ):
            predicted = read_mask(output_path(out, PurePosixPath(f"{seed}.png"), "soft", slug))
            if prompt not in prompts:
                absent_coverage.append(float(np.mean(predicted.values > THRESHOLD)))
                continue
            truth = read_mask(folder / "gt" / slug / f"{seed}.png").foreground()
            counts = counts + metrics.confusion_counts(predicted.values, truth, (THRESHOLD,))
            edges = edges + metrics.boundary_counts(predicted.values > THRESHOLD, truth)
    return {
        "set": scene_set.name,
        "refine": refine,
        "tiles": tiles,
        "images": summary.ok,
        "iou_fg": float(metrics.iou_fg(counts)[0]),
        "boundary_f": edges.f_score,
        "absent_coverage": float(np.mean(absent_coverage)) if absent_coverage else None,
        "seconds": round(seconds, 1),
    }
