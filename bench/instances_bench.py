"""Instances a detector can be trained on: the score floor, the split of touching objects, and
the counts they give, measured through ``clipseg segment --model demo`` on generated scenes.

    .venv/bin/python bench/instances_bench.py [--tuning-scenes 150] [--scenes 100] [--work DIR]

The scenes (:func:`clipseg_cli.ops.shapes.make_large_scene`, 1024x768): one to three red
circles, one blue square and one green triangle, radius 60-110 px, red circles placed against
each other with a chance of 0.7 (touching pairs), backgrounds plain, textured (25) or busy (50)
in turn; prompted "a red circle", "a blue square", "a green triangle". A second, harder set
gives squares and triangles one to three copies too, touching as often (squares then share
an edge), for the split rate by shape.

1. **Tuning scenes** (seeds from 230,000,000): one run with ``--min-score 0 --split auto``; each
   score candidate (mean, peak, stability: :data:`clipseg_cli.ops.instances.SCORE_KINDS`)
   scored on its instances, an instance being an object when it matches one at IoU >= 0.5:
   the candidates' separation (AUC: the chance that an object outscores a speck) and, for
   each floor of a grid, the objects and specks it keeps. The default floor is the grid's
   best F1 (objects kept against specks kept) for the best-separating candidate.
2. **Fresh scenes** (seeds from 231,500,000; never used for choosing anything): ``today``
   (``--min-score 0 --split none``, what earlier versions did) against the defaults, in the
   same run of this script: instance precision (one-to-one matches at IoU >= 0.5 over all
   instances), counts right on the (image, prompt) pairs whose objects the model saw (each
   object at least half under ``probability > 0.3``, the mask before any floor), the objects
   the model missed, touching pairs the model saw split into two instances each at IoU >= 0.8,
   COCOeval segm AP against the scenes' own masks, and the write step's time per image.
3. **Harder fresh scenes** (seeds from 232,500,000): the split rate by shape.

The demo model sees 128 px: it misses objects outright and merges what it sees coarsely; the
numbers judge what the post-processing decides on what the model saw. How far any split or
reshaping of the model's mask could go: ``bench/split_ceiling.py --work DIR`` on this script's
work folder.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np
from PIL import Image
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

BENCH_DIR = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH_DIR))

from onnx_bench import cpu_summary  # noqa: E402

from clipseg_cli.io.naming import prompt_slugs  # noqa: E402
from clipseg_cli.ops.instances import SCORE_KIND, SCORE_KINDS, object_scores  # noqa: E402
from clipseg_cli.ops.shapes import Scene, make_large_scene  # noqa: E402
from clipseg_cli.specs import DEFAULT_MIN_SCORE, DEFAULT_THRESHOLD  # noqa: E402

PROMPTS = ("a red circle", "a blue square", "a green triangle")
CLASSES = tuple(prompt.removeprefix("a ") for prompt in PROMPTS)
TEXTURES = (0.0, 25.0, 50.0)
TUNING_SEED, FRESH_SEED, HARD_SEED = 230_000_000, 231_500_000, 232_500_000
TODAY = ("--min-score", "0", "--split", "none")
FLOOR_GRIDS = {
    "mean": [round(0.30 + 0.05 * i, 2) for i in range(11)],
    "peak": [round(0.30 + 0.05 * i, 2) for i in range(15)],
    "stability": [round(0.1 * i, 1) for i in range(10)],
}


def scene(seed: int, index: int, *, hard: bool) -> Scene:
    copies = {} if hard else {"red circle": (1, 3)}
    return make_large_scene(
        seed, (768, 1024), radius=(60.0, 110.0), classes=(3, 3), include=CLASSES,
        copies=(1, 3) if hard else (1, 1), copies_of=copies, gap=24, touching=0.7,
        texture=TEXTURES[index % len(TEXTURES)],
    )  # fmt: skip


def write_scenes(folder: Path, first_seed: int, count: int, *, hard: bool) -> dict[str, Scene]:
    folder.mkdir(parents=True, exist_ok=True)
    scenes = {}
    for index in range(count):
        made = scene(first_seed + index, index, hard=hard)
        name = f"s{first_seed + index}.png"
        Image.fromarray(made.image).save(folder / name)
        scenes[name] = made
    return scenes


def segment(images: Path, out: Path, *options: str) -> float:
    """One ``clipseg segment`` run; returns its wall time."""
    command = [sys.executable, "-m", "clipseg_cli", "segment", str(images), "--out", str(out)]
    command += [a for prompt in PROMPTS for a in ("-p", prompt)]
    command += ["--model", "demo", "--device", "cpu", "--progress", "none", "--overwrite"]
    command += ["--save", "soft,instances", "--soft-bits", "16", "--export", "coco", *options]
    start = time.perf_counter()
    subprocess.run(command, check=True, capture_output=True)
    return time.perf_counter() - start


# -- reading a run --------------------------------------------------------------------------------


def iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.count_nonzero(a | b)
    return np.count_nonzero(a & b) / union if union else 0.0


def touching(a: np.ndarray, b: np.ndarray) -> bool:
    grown = np.zeros_like(a)
    grown[1:] |= a[:-1]
    grown[:-1] |= a[1:]
    grown[:, 1:] |= a[:, :-1]
    grown[:, :-1] |= a[:, 1:]
    return bool((grown & b).any())


@dataclass
class Pair:
    """One (image, prompt) of a run: the probability, the instances, the class's objects."""

    prob: np.ndarray
    ids: np.ndarray  # uint16 id map of this prompt's instances
    instance_ids: list[int]
    objects: list[np.ndarray]
    ious: np.ndarray = field(init=False)  # [instances, objects]

    def __post_init__(self) -> None:
        masks = [self.ids == i for i in self.instance_ids]
        self.ious = np.array([[iou(m, o) for o in self.objects] for m in masks]).reshape(
            len(masks), len(self.objects)
        )

    @property
    def seen(self) -> list[bool]:
        above = self.prob > DEFAULT_THRESHOLD
        return [np.count_nonzero(above & o) >= 0.5 * np.count_nonzero(o) for o in self.objects]

    def matched(self, at: float = 0.5) -> list[bool]:
        """Per instance: matched one-to-one to an object at IoU >= ``at`` (greedy, best
        first)."""
        matched = [False] * len(self.instance_ids)
        taken = set()
        order = sorted(np.ndindex(*self.ious.shape), key=lambda ij: -self.ious[ij])
        for i, j in order:
            if self.ious[i, j] >= at and not matched[i] and j not in taken:
                matched[i] = True
                taken.add(j)
        return matched

    def touching_pairs(self) -> list[tuple[int, int]]:
        objects = self.objects
        return [
            (i, j)
            for i in range(len(objects))
            for j in range(i + 1, len(objects))
            if touching(objects[i], objects[j])
        ]

    def splittable(self, i: int, j: int) -> bool:
        """Whether the model's mask (``probability > 0.3``, before any floor), each pixel given
        to the nearest object, gives objects ``i`` and ``j`` both IoU >= 0.8: if not, no split
        can, and the pair is lost to the model's mask, not to the post-processing."""
        mask = self.prob > DEFAULT_THRESHOLD
        distances = np.stack(
            [cv2.distanceTransform((~o).astype(np.uint8), cv2.DIST_L2, 5) for o in self.objects]
        )
        nearest = distances.argmin(axis=0)
        return all(iou(mask & (nearest == k), self.objects[k]) >= 0.8 for k in (i, j))

    def split(self, i: int, j: int) -> bool:
        """Objects ``i`` and ``j`` are two instances, each at IoU >= 0.8."""
        ious = self.ious
        return any(
            ious[a, i] >= 0.8 and ious[b, j] >= 0.8
            for a in range(len(ious))
            for b in range(len(ious))
            if a != b
        )


def read_run(out: Path, scenes: dict[str, Scene]) -> list[tuple[str, str, Pair]]:
    rows = {}
    for line in (out / "clipseg-log.jsonl").read_text().splitlines():
        row = json.loads(line)
        rows[row["key"]] = row
    pairs = []
    for name, made in scenes.items():
        row = rows[name]
        for prompt, slug, label in zip(PROMPTS, prompt_slugs(PROMPTS), CLASSES, strict=True):
            stem = out / f"{name}.{slug}"
            prob = np.asarray(Image.open(f"{stem}.soft.png"), np.float32) / 65535
            ids = np.asarray(Image.open(f"{stem}.instances.png")).astype(np.int64)
            wanted = [i["id"] for i in row["instances"] if i["prompt"] == prompt]
            objects = [o.mask for o in made.objects if o.label == label]
            pairs.append((name, prompt, Pair(prob, ids, wanted, objects)))
    return pairs


def write_seconds(out: Path) -> float:
    rows = [json.loads(line) for line in (out / "clipseg-log.jsonl").read_text().splitlines()]
    times = [row["timings"]["write_s"] for row in rows if row["status"] == "ok"]
    return float(np.mean(times))


# -- measures -------------------------------------------------------------------------------------


@dataclass
class Measures:
    instances: int = 0
    matched: int = 0
    pairs_seen: int = 0
    counts_right: int = 0
    objects: int = 0
    not_seen: int = 0
    missed_outright: int = 0
    touching_seen: int = 0
    touching_split: int = 0
    touching_all: int = 0
    touching_splittable: int = 0  # of those seen: the model's mask allows IoU >= 0.8 for both
    touching_splittable_split: int = 0
    by_shape: dict = field(default_factory=dict)  # class -> [split, seen]

    @property
    def precision(self) -> float:
        return self.matched / self.instances if self.instances else float("nan")


def measure(pairs: list[tuple[str, str, Pair]]) -> Measures:
    m = Measures()
    for _name, prompt, pair in pairs:
        m.instances += len(pair.instance_ids)
        m.matched += sum(pair.matched())
        seen = pair.seen
        above = pair.prob > DEFAULT_THRESHOLD
        m.objects += len(pair.objects)
        m.not_seen += seen.count(False)
        m.missed_outright += sum(np.count_nonzero(above & o) == 0 for o in pair.objects)
        if pair.objects and all(seen):
            m.pairs_seen += 1
            m.counts_right += len(pair.instance_ids) == len(pair.objects)
        shape = m.by_shape.setdefault(prompt.removeprefix("a "), [0, 0])
        for i, j in pair.touching_pairs():
            m.touching_all += 1
            if seen[i] and seen[j]:
                ok = pair.split(i, j)
                m.touching_seen += 1
                m.touching_split += ok
                if pair.splittable(i, j):
                    m.touching_splittable += 1
                    m.touching_splittable_split += ok
                shape[0] += ok
                shape[1] += 1
    return m


def coco_ap(out: Path, scenes: dict[str, Scene]) -> float:
    """COCOeval segm AP of the run's coco.json against the scenes' object masks."""
    predicted = json.loads((out / "coco.json").read_text())
    categories = [{"id": k + 1, "name": p} for k, p in enumerate(PROMPTS)]
    truth = {"images": predicted["images"], "categories": categories, "annotations": []}
    for image in predicted["images"]:
        for obj in scenes[image["file_name"]].objects:
            rle = mask_utils.encode(np.asfortranarray(obj.mask.astype(np.uint8)))
            truth["annotations"].append(
                {
                    "id": len(truth["annotations"]) + 1,
                    "image_id": image["id"],
                    "category_id": CLASSES.index(obj.label) + 1,
                    "segmentation": {"size": rle["size"], "counts": rle["counts"].decode()},
                    "area": float(mask_utils.area(rle)),
                    "bbox": [float(v) for v in mask_utils.toBbox(rle)],
                    "iscrowd": 0,
                }
            )
    if not predicted["annotations"]:
        return 0.0
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints as it goes
        ground = COCO()
        ground.dataset = truth
        ground.createIndex()
        evaluation = COCOeval(ground, ground.loadRes(predicted["annotations"]), "segm")
        evaluation.evaluate()
        evaluation.accumulate()
        evaluation.summarize()
    return float(evaluation.stats[0])


def separation(pairs: list[tuple[str, str, Pair]]) -> dict[str, tuple[list, list]]:
    """Per score kind: the scores of the instances that are objects, and of the others."""
    scores: dict[str, tuple[list, list]] = {kind: ([], []) for kind in SCORE_KINDS}
    for _name, _prompt, pair in pairs:
        if not pair.instance_ids:
            continue
        count = int(pair.ids.max()) + 1
        matched = pair.matched()
        for kind in SCORE_KINDS:
            values = object_scores(kind, pair.ids, count, pair.prob, DEFAULT_THRESHOLD)
            for instance, is_object in zip(pair.instance_ids, matched, strict=True):
                scores[kind][0 if is_object else 1].append(float(values[instance]))
    return scores


def auc(objects: list[float], specks: list[float]) -> tuple[float, float]:
    """The chance that an object outscores a speck, and its standard error (Hanley and McNeil,
    Radiology 1982)."""
    a, b = np.array(objects)[:, None], np.array(specks)[None, :]
    area = float(((a > b).sum() + 0.5 * (a == b).sum()) / (a.size * b.size))
    q1, q2 = area / (2 - area), 2 * area**2 / (1 + area)
    n1, n2 = a.size, b.size
    variance = (area * (1 - area) + (n1 - 1) * (q1 - area**2) + (n2 - 1) * (q2 - area**2)) / (
        n1 * n2
    )
    return area, float(np.sqrt(max(variance, 0.0)))


def smooth_blobs(floors: dict[str, float]) -> list[str]:
    """Each candidate's score of a smooth blob (a Gaussian of sigma 40 px, as CLIPSeg's
    upsampled probability looks without saturating) of each peak, and whether the candidate's
    best floor keeps it."""
    yy, xx = np.mgrid[:320, :320]
    shape = np.exp(-((yy - 160.0) ** 2 + (xx - 160.0) ** 2) / (2 * 40.0**2))
    lines = []
    for peak in (0.45, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0):
        prob = (peak * shape).astype(np.float32)
        labels = (prob > DEFAULT_THRESHOLD).astype(np.int64)
        cells = []
        for kind in SCORE_KINDS:
            value = float(object_scores(kind, labels, 2, prob, DEFAULT_THRESHOLD)[1])
            cells.append(f"{value:.2f} ({'kept' if value >= floors[kind] else 'dropped'})")
        lines.append(f"| {peak:.2f} | " + " | ".join(cells) + " |")
    return lines


def best_floor(kind: str, objects: list[float], specks: list[float]) -> tuple[float, list[str]]:
    lines, best = [], (-1.0, 0.0)
    for floor in FLOOR_GRIDS[kind]:
        kept = sum(v >= floor for v in objects)
        false = sum(v >= floor for v in specks)
        precision = kept / (kept + false) if kept + false else 1.0
        recall = kept / len(objects)
        f1 = 2 * precision * recall / (precision + recall) if kept else 0.0
        best = max(best, (round(f1, 6), -floor))
        lines.append(
            f"|   {floor:.2f} | {kept}/{len(objects)} | {false}/{len(specks)} | "
            f"{precision:.3f} | {f1:.3f} |"
        )
    return -best[1], lines


# -- the report -----------------------------------------------------------------------------------


def tuning(work: Path, count: int) -> None:
    scenes = write_scenes(work / "tuning", TUNING_SEED, count, hard=False)
    out = work / "tuning-out"
    segment(work / "tuning", out, "--min-score", "0", "--split", "auto")
    pairs = read_run(out, scenes)
    scores = separation(pairs)
    print(f"\n## 1. Tuning scenes: {count} (seeds {TUNING_SEED}..{TUNING_SEED + count - 1})\n")
    objects, specks = len(scores["mean"][0]), len(scores["mean"][1])
    print(f"{objects + specks} instances with --min-score 0 --split auto: {objects} objects "
          f"(IoU >= 0.5 with one), {specks} specks\n")  # fmt: skip
    print("| score | AUC (object > speck) | objects: min, 5%, median | specks: median, 95%, "
          "max | best F1 floor |")  # fmt: skip
    print("|---|---|---|---|---|")
    chosen, sweeps, areas = {}, {}, {}
    for kind in SCORE_KINDS:
        good, bad = scores[kind]
        chosen[kind], sweeps[kind] = best_floor(kind, good, bad)
        areas[kind] = auc(good, bad)
        print(
            f"| {kind} | {areas[kind][0]:.3f} +- {areas[kind][1]:.3f} | {min(good):.3f}, "
            f"{np.percentile(good, 5):.3f}, {np.median(good):.3f} | {np.median(bad):.3f}, "
            f"{np.percentile(bad, 95):.3f}, {max(bad):.3f} | {chosen[kind]} |"
        )
    for kind in SCORE_KINDS:
        print(f"\n{kind}: each floor's objects and specks kept\n")
        print("| floor | objects kept | specks kept | precision | F1 |\n|---|---|---|---|---|")
        print("\n".join(sweeps[kind]))
    print("\nA smooth blob of each peak (sigma 40 px), scored by each candidate; kept or dropped "
          "by the candidate's best floor above\n")  # fmt: skip
    print("| blob peak | " + " | ".join(SCORE_KINDS) + " |\n|---|---|---|---|")
    print("\n".join(smooth_blobs(chosen)))
    agree = "agree" if chosen[SCORE_KIND] == DEFAULT_MIN_SCORE else "DIFFER"
    print(f"\nthe default: --min-score {DEFAULT_MIN_SCORE} on {SCORE_KIND}; the best-F1 floor "
          f"of {SCORE_KIND} here: {chosen[SCORE_KIND]} ({agree})")  # fmt: skip


def share(part: int, whole: int) -> str:
    return f"{part / whole:.1%} ({part}/{whole})" if whole else "- (0/0)"


def fresh(work: Path, count: int) -> None:
    scenes = write_scenes(work / "fresh", FRESH_SEED, count, hard=False)
    runs = {}
    for name, options in (("today", TODAY), ("new", ())):
        out = work / f"fresh-{name}"
        wall = segment(work / "fresh", out, *options)
        runs[name] = (measure(read_run(out, scenes)), coco_ap(out, scenes), wall, out)
    today, new = runs["today"][0], runs["new"][0]
    print(f"\n## 2. Fresh scenes: {count} (seeds {FRESH_SEED}..{FRESH_SEED + count - 1})\n")
    seen = new.objects - new.not_seen
    print(
        f"objects: {new.objects}; the demo model saw {seen} (at least half under p > 0.3) and "
        f"missed {share(new.not_seen, new.objects)}, {new.missed_outright} of them outright "
        f"(no pixel above 0.3); touching pairs: {new.touching_all}, both objects seen: "
        f"{new.touching_seen}\n"
    )
    rows = [
        ("instance precision (IoU >= 0.5, one-to-one)", ">= 0.9",
         lambda m: f"{m.precision:.3f} ({m.matched}/{m.instances})"),
        ("counts right, (image, prompt) pairs the model saw", ">= 85%",
         lambda m: share(m.counts_right, m.pairs_seen)),
        ("touching pairs the model saw, split, IoU >= 0.8 each", ">= 80%",
         lambda m: share(m.touching_split, m.touching_seen)),
        ("... of those whose mask allows it (nearest-object cut: both IoU >= 0.8)", "",
         lambda m: share(m.touching_splittable_split, m.touching_splittable)),
    ]  # fmt: skip
    print("| measure | today (--min-score 0 --split none) | defaults | target |")
    print("|---|---|---|---|")
    for label, target, cell in rows:
        print(f"| {label} | {cell(today)} | {cell(new)} | {target} |")
    print(f"| COCOeval segm AP | {runs['today'][1]:.3f} | {runs['new'][1]:.3f} | not lower |")
    writes = [write_seconds(runs[name][3]) for name in ("today", "new")]
    print(f"| write step per image (s, 3 prompts, the log's mean) | {writes[0]:.3f} | "
          f"{writes[1]:.3f} | |")  # fmt: skip
    print(f"| run wall time (s) | {runs['today'][2]:.1f} | {runs['new'][2]:.1f} | |")
    summary = json.loads((runs["new"][3] / "clipseg-summary.json").read_text())
    print(f"\nthe defaults' run summary, instances: {json.dumps(summary['instances'])}")


def hard(work: Path, count: int) -> None:
    scenes = write_scenes(work / "hard", HARD_SEED, count, hard=True)
    out = work / "hard-new"
    segment(work / "hard", out)
    m = measure(read_run(out, scenes))
    print(f"\n## 3. Harder fresh scenes: {count} (seeds {HARD_SEED}..{HARD_SEED + count - 1}), "
          f"every class one to three times, touching\n")  # fmt: skip
    print("| shape | touching pairs the model saw, split (IoU >= 0.8 each) |\n|---|---|")
    for shape, (split, seen) in m.by_shape.items():
        print(f"| {shape} | {split}/{seen} ({split / max(seen, 1):.0%}) |")
    print(f"\nprecision {m.precision:.3f}, counts right {m.counts_right}/{m.pairs_seen}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tuning-scenes", type=int, default=150, help="tuning scenes")
    parser.add_argument("--scenes", type=int, default=100, help="fresh scenes")
    parser.add_argument("--work", type=Path, default=None, help="folder for scenes and runs")
    args = parser.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="clipseg-instances-bench-"))
    print("# Instances bench (demo model, 1024x768 scenes)\n")
    for line in cpu_summary():
        print(line)
    print(f"work folder: {work}")
    tuning(work, args.tuning_scenes)
    fresh(work, args.scenes)
    hard(work, max(args.scenes // 2, 1))


if __name__ == "__main__":
    main()
