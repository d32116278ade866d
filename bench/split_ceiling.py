"""How far any post-processing of the model's probability can take the touching-pair split:
for each touching pair the model saw, whether some mask made from the probability, cut
between the two objects by an oracle (each pixel to the nearer object), gives both objects
IoU >= 0.8. If not, no split can; what is left is the model's.

    .venv/bin/python bench/split_ceiling.py --work DIR [--set tuning]

Reads a work folder of ``bench/instances_bench.py`` (its scenes and the run's 16-bit soft
maps: the tuning set by default; only ever look at the tuning set when choosing rules). The
masks tried: the probability cut at several thresholds (and the best threshold per pair),
hysteresis (regions of ``p > 0.3`` grown into ``p > low``), the mask opened or closed by a
disc, each part's holes filled, each part's convex hull.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import cv2
import numpy as np
from PIL import Image

BENCH_DIR = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH_DIR))

from instances_bench import (  # noqa: E402
    CLASSES,
    FRESH_SEED,
    PROMPTS,
    TUNING_SEED,
    Pair,
    iou,
    scene,
)

from clipseg_cli.io.naming import prompt_slugs  # noqa: E402
from clipseg_cli.ops.shape import fill_holes  # noqa: E402
from clipseg_cli.specs import DEFAULT_THRESHOLD  # noqa: E402

SETS = {"tuning": (TUNING_SEED, "tuning-out"), "fresh": (FRESH_SEED, "fresh-new")}
THRESHOLDS = (0.3, 0.4, 0.5, 0.6, 0.7)


def _disc(radius: int) -> np.ndarray:
    return cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * radius + 1, 2 * radius + 1))


def _hull(part: np.ndarray) -> np.ndarray:
    out = np.zeros(part.shape, np.uint8)
    contours, _ = cv2.findContours(
        part.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE
    )
    if contours:
        cv2.fillPoly(out, [cv2.convexHull(np.vstack(contours))], 1)
    return out > 0


def _hysteresis(prob: np.ndarray, low: float) -> np.ndarray:
    count, regions = cv2.connectedComponents((prob > low).astype(np.uint8), connectivity=8)
    holds = np.zeros(count, bool)
    holds[regions[prob > DEFAULT_THRESHOLD]] = True
    holds[0] = False
    return holds[regions]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", type=Path, required=True, help="instances_bench's work folder")
    parser.add_argument("--set", choices=sorted(SETS), default="tuning")
    args = parser.parse_args()
    first_seed, run = SETS[args.set]
    out = args.work / run
    names = sorted(p.name for p in (args.work / args.set).glob("s*.png"))
    slug = dict(zip(PROMPTS, prompt_slugs(PROMPTS), strict=True))
    tally: dict[str, int] = {}
    pairs = 0
    for name in names:
        seed = int(name[1:-4])
        made = scene(seed, seed - first_seed, hard=False)
        for prompt, label in zip(PROMPTS, CLASSES, strict=True):
            objects = [o.mask for o in made.objects if o.label == label]
            if len(objects) < 2:
                continue
            soft = Image.open(out / f"{name}.{slug[prompt]}.soft.png")
            prob = np.asarray(soft, np.float32) / 65535
            pair = Pair(prob, np.zeros(prob.shape, np.int64), [], objects)
            seen = pair.seen
            touching = [(i, j) for i, j in pair.touching_pairs() if seen[i] and seen[j]]
            if not touching:
                continue
            distances = [
                cv2.distanceTransform((~o).astype(np.uint8), cv2.DIST_L2, 5) for o in objects
            ]
            nearest = np.argmin(np.stack(distances), axis=0)
            base = prob > DEFAULT_THRESHOLD
            masks = {f"p > {t}": prob > t for t in THRESHOLDS}
            masks |= {
                f"hysteresis p > 0.3 grown into p > {low}": _hysteresis(prob, low)
                for low in (0.2, 0.1)
            }
            for radius in (5, 10, 20):
                as_bytes = base.astype(np.uint8)
                masks[f"opened, disc {radius} px"] = (
                    cv2.morphologyEx(as_bytes, cv2.MORPH_OPEN, _disc(radius)) > 0
                )
                masks[f"closed, disc {radius} px"] = (
                    cv2.morphologyEx(as_bytes, cv2.MORPH_CLOSE, _disc(radius)) > 0
                )
            for i, j in touching:
                pairs += 1
                cut = {k: base & (nearest == k) for k in (i, j)}
                results = {
                    key: all(iou(mask & (nearest == k), objects[k]) >= 0.8 for k in (i, j))
                    for key, mask in masks.items()
                }
                results["p > 0.3, each part's holes filled"] = all(
                    iou(fill_holes(cut[k]), objects[k]) >= 0.8 for k in (i, j)
                )
                results["p > 0.3, each part's convex hull"] = all(
                    iou(_hull(cut[k]), objects[k]) >= 0.8 for k in (i, j)
                )
                results["the best threshold of the pair (an oracle)"] = any(
                    results[f"p > {t}"] for t in THRESHOLDS
                )
                for key, ok in results.items():
                    tally[key] = tally.get(key, 0) + ok
    print(
        f"# Split ceiling: {args.set} scenes ({len(names)}), {pairs} touching pairs the model saw\n"
    )
    print(
        "| mask, cut between the two objects by an oracle | pairs both at IoU >= 0.8 |\n|---|---|"
    )
    for key, count in tally.items():
        print(f"| {key} | {count}/{pairs} ({count / max(pairs, 1):.1%}) |")


if __name__ == "__main__":
    main()
