"""How to combine the tiles with the whole-image pass: the measurement behind ops.tiles.combine.

    python bench/tile_combination.py [--scenes 10] [--first-seed 2000]

The demo model on generated scenes (clipseg_cli.ops.shapes.make_large_scene) of three kinds:
small objects in a large image (2048x1536, ~70 px across), medium objects (1024x768, radius
60-110 px) and objects larger than a tile (1024x768, radius 150-200 px); every scene shows a red
circle and no yellow one. For each kind and each way of combining the whole image's logits with
the stitched tiles' (``--tiles auto``) it prints the red circle's IoU and boundary F, plain and
after the guided refinement, and how much of the image the absent "a yellow circle" claims.
"""

from __future__ import annotations

import argparse

import cv2
import numpy as np
import torch

from clipseg_cli.ops import tiles
from clipseg_cli.ops.matting import refine_matte
from clipseg_cli.ops.metrics import BoundaryCounts, boundary_counts
from clipseg_cli.ops.shapes import make_large_scene
from clipseg_cli.ops.transforms import resize_rgb
from clipseg_cli.segmenter import Segmenter

KINDS = {
    "small objects, 2048x1536": ((1536, 2048), (30.0, 40.0), (3, 5), (1, 2)),
    "medium objects, 1024x768": ((768, 1024), (60.0, 110.0), (3, 5), (1, 2)),
    "objects larger than a tile, 1024x768": ((768, 1024), (150.0, 200.0), (1, 2), (1, 1)),
}
COMBINATIONS = {
    "whole image only": lambda whole, tiled: whole,
    "tiles only": lambda whole, tiled: tiled,
    "maximum (clipseg)": tiles.combine,
    "average": lambda whole, tiled: (whole + tiled) / 2,
    "product of probabilities": None,  # computed on probabilities below
}
THRESHOLD = 0.3


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


def _logits(segmenter: Segmenter, rgb: np.ndarray, conditionals) -> tuple[np.ndarray, object]:
    size = rgb.shape[:2]
    grid = tiles.tile_grid(size, tiles.tiles_along_short_side("auto", size, 128))
    rows = [resize_rgb(rgb, segmenter.input_size)]
    rows += [
        resize_rgb(np.ascontiguousarray(c), segmenter.input_size)
        for c in tiles.tile_crops(rgb, grid)
    ]
    chunks = [
        segmenter.logits(torch.from_numpy(np.stack(rows[i : i + 16])), conditionals).numpy()
        for i in range(0, len(rows), 16)
    ]
    return np.concatenate(chunks), grid


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--scenes", type=int, default=10)
    parser.add_argument("--first-seed", type=int, default=2000)
    args = parser.parse_args()
    segmenter = Segmenter.load("demo", device="cpu", precision="fp32")
    conditionals = segmenter.embed_texts(["a red circle", "a yellow circle"])
    print("| scenes | combination | red circle IoU / boundary F | + guided | yellow circle |")
    print("|---|---|---|---|---|")
    for kind, (size, radius, classes, copies) in KINDS.items():
        totals = {
            name: [0, 0, BoundaryCounts(), 0, 0, BoundaryCounts(), []] for name in COMBINATIONS
        }
        for seed in range(args.first_seed, args.first_seed + args.scenes):
            scene = make_large_scene(
                seed, size, radius=radius, classes=classes, copies=copies,
                include=("red circle",), exclude=("yellow circle",),
            )  # fmt: skip
            truth = np.zeros(size, bool)
            for obj in scene.objects:
                if obj.label == "red circle":
                    truth |= obj.mask
            logits, grid = _logits(segmenter, scene.image, conditionals)
            for k in range(2):
                whole = cv2.resize(logits[0, k], (size[1], size[0]), interpolation=cv2.INTER_LINEAR)
                tiled = tiles.stitch(logits[1:, k], grid)
                for name, combine in COMBINATIONS.items():
                    if combine is None:
                        prob = _sigmoid(whole) * _sigmoid(tiled)
                    else:
                        prob = _sigmoid(combine(whole, tiled))
                    guided = refine_matte(scene.image, prob, method="guided", threshold=THRESHOLD)
                    t = totals[name]
                    if k == 1:
                        t[6].append(float(np.mean(prob > THRESHOLD)))
                        continue
                    for offset, p in ((0, prob), (3, guided)):
                        mask = p > THRESHOLD
                        t[offset] += int((mask & truth).sum())
                        t[offset + 1] += int((mask | truth).sum())
                        t[offset + 2] = t[offset + 2] + boundary_counts(mask, truth)
        for name, t in totals.items():
            plain = f"{t[0] / max(t[1], 1):.3f} / {t[2].f_score:.3f}"
            guided = f"{t[3] / max(t[4], 1):.3f} / {t[5].f_score:.3f}"
            print(f"| {kind} | {name} | {plain} | {guided} | {100 * np.mean(t[6]):.3f}% |")


if __name__ == "__main__":
    main()
