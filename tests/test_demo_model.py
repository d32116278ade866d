"""The bundled ``demo`` model really segments: held-out synthetic scenes, text and image prompts,
and an absent object answered with an empty mask through ``clipseg segment --model demo``.

Scenes come from :mod:`clipseg_cli.synthetic` with seeds from 10_000_000 up; the demo model was
trained on seeds 0..3999 (see clipseg_cli/assets/demo/README.md). IoU_FG = TP/(TP+FP+FN)
summed over all (scene, object) pairs at the paper's threshold 0.3 (prob > t).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from clipseg_cli.cli import app
from clipseg_cli.predictor import Segmenter
from clipseg_cli.prompts import engineer_reference
from clipseg_cli.specs import DEFAULT_THRESHOLD, MODEL_SPECS
from clipseg_cli.synthetic import Scene, make_scene

HELD_OUT_SEED = 10_000_000  # far from the training seeds 0..3999
SCENES = 30


@pytest.fixture(scope="module")
def demo() -> Segmenter:
    return Segmenter.load("demo", device="cpu", precision="fp32")


@pytest.fixture(scope="module")
def scenes() -> list[Scene]:
    return [make_scene(HELD_OUT_SEED + i) for i in range(SCENES)]


class _Counts:
    """TP/FP/FN summed over a data set."""

    def __init__(self) -> None:
        self.tp = self.fp = self.fn = 0

    def add(self, prob: np.ndarray, truth: np.ndarray) -> None:
        predicted = prob > DEFAULT_THRESHOLD
        self.tp += int(np.count_nonzero(predicted & truth))
        self.fp += int(np.count_nonzero(predicted & ~truth))
        self.fn += int(np.count_nonzero(~predicted & truth))

    @property
    def iou(self) -> float:
        return self.tp / (self.tp + self.fp + self.fn)


def test_demo_is_a_bundled_model_of_the_spec_table(demo: Segmenter):
    assert demo.info.model_id == "demo" and demo.info.variant == "demo"
    size = MODEL_SPECS["demo"].architecture.input_size
    assert demo.input_size == (size, size)
    files = [Path(f) for f in demo.info.files]
    assert sum(f.stat().st_size for f in files) <= 10 * 1024 * 1024


def test_text_prompts_segment_held_out_scenes(demo: Segmenter, scenes: list[Scene]):
    counts = _Counts()
    objects = 0
    for scene in scenes:
        conditionals = demo.embed_texts([obj.prompt for obj in scene.objects])
        (probs,) = demo.predict([scene.image], conditionals)
        for prob, obj in zip(probs, scene.objects, strict=True):
            counts.add(prob, obj.mask)
            objects += 1
    assert objects >= 50
    assert counts.iou >= 0.8, f"IoU_FG {counts.iou:.3f} over {objects} objects"


def test_engineered_image_prompts_segment_held_out_scenes(demo: Segmenter, scenes: list[Scene]):
    # One reference per class, from scenes the test images do not include.
    references: dict[str, np.ndarray] = {}
    seed = HELD_OUT_SEED + 500_000
    while len(references) < 12:
        reference_scene = make_scene(seed)
        seed += 1
        for obj in reference_scene.objects:
            if obj.label not in references and obj.mask.sum() > 1500:
                references[obj.label] = engineer_reference(reference_scene.image, obj.mask)
    labels = sorted(references)
    conditionals = demo.embed_images([references[label] for label in labels])
    counts = _Counts()
    for scene in scenes:
        (probs,) = demo.predict([scene.image], conditionals)
        for obj in scene.objects:
            counts.add(probs[labels.index(obj.label)], obj.mask)
    assert counts.iou >= 0.7, f"IoU_FG {counts.iou:.3f}"


def test_absent_object_is_empty_in_the_segment_log(tmp_path: Path, scenes: list[Scene]):
    scene = next(
        s
        for s in scenes
        if "yellow triangle" in s.absent_classes()
        and any(o.label == "red circle" for o in s.objects)
    )
    image = tmp_path / "scene.png"
    Image.fromarray(scene.image).save(image)
    out = tmp_path / "out"
    result = CliRunner().invoke(
        app,
        [
            "segment", str(image), "--model", "demo", "--prompt", "a yellow triangle",
            "--prompt", "a red circle", "--out", str(out), "--device", "cpu",
            "--progress", "none",
        ],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    (row,) = [json.loads(line) for line in (out / "clipseg-log.jsonl").read_text().splitlines()]
    stats = {p["prompt"]: p for p in row["prompts"]}
    assert stats["a yellow triangle"]["empty"] is True
    assert stats["a red circle"]["empty"] is False
