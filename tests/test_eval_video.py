"""``clipseg eval`` on videos: DAVIS J, F and J&F per sequence against ground-truth frame
folders or mask videos, the means, flicker without ground truth, pairing by name, and the
model run on a video first (``--images clip.mp4``)."""

from __future__ import annotations

import json
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner
from video_helpers import shapes_video

from clipseg_cli.commands.app import app
from clipseg_cli.evaluate.video import SequencePair, run_video_eval, score_sequence
from clipseg_cli.io import video
from clipseg_cli.ops import temporal

runner = CliRunner()


def _disc_masks(count: int, size: tuple[int, int] = (48, 64)) -> list[np.ndarray]:
    """A disc moving right: bool masks."""
    yy, xx = np.mgrid[: size[0], : size[1]]
    return [(yy - 24) ** 2 + (xx - 12 - 3 * t) ** 2 < 100 for t in range(count)]


def _mask_video(path: Path, masks: list[np.ndarray]) -> Path:
    first = masks[0].astype(np.uint8) * 255
    writer = video.VideoWriter(path, first, 25.0, Fraction(1, 25))
    for index, mask in enumerate(masks):
        writer.write(mask.astype(np.uint8) * 255, index, index)
    writer.close()
    return path


def _frame_folder(folder: Path, masks: list[np.ndarray], palette: bool = False) -> Path:
    folder.mkdir(parents=True)
    for index, mask in enumerate(masks):
        if palette:  # DAVIS: object 1 in a palette PNG
            image = Image.fromarray(mask.astype(np.uint8), mode="P")
            image.putpalette([0, 0, 0, 128, 0, 0] + [0] * 762)
        else:
            image = Image.fromarray(mask.astype(np.uint8) * 255)
        image.save(folder / f"{index:05d}.png")
    return folder


def test_j_f_and_flicker_of_one_sequence(tmp_path: Path) -> None:
    truth = _disc_masks(10)
    gt = _frame_folder(tmp_path / "gt", truth, palette=True)
    # The first half exact, the second half empty: J and F are 1 then 0.
    predicted = truth[:5] + [np.zeros_like(truth[0])] * 5
    pred = _mask_video(tmp_path / "clip.mp4.a-disc.mask.mkv", predicted)
    row = score_sequence(SequencePair("clip", pred, gt), 0.5)
    assert row["frames"] == 10
    assert row["J"] == pytest.approx(0.5) and row["F"] == pytest.approx(0.5)
    assert row["J&F"] == pytest.approx(0.5)
    assert row["J_per_frame"] == [1.0] * 5 + [0.0] * 5
    # Flicker from the prediction alone, as the log row measures it.
    meter = temporal.Flicker()
    for mask in predicted:
        meter.add(mask.astype(np.float32), mask)
    flicker = meter.result()
    assert row["mean_abs_dp"] == pytest.approx(flicker["mean_abs_dp"], abs=1e-6)
    assert row["mean_iou"] == pytest.approx(flicker["mean_iou"], abs=1e-6)
    alone = score_sequence(SequencePair("clip", pred, None), 0.5)
    assert alone["J"] is None and alone["mean_iou"] == row["mean_iou"]


def test_a_shifted_prediction_scores_what_davis_says(tmp_path: Path) -> None:
    truth = _disc_masks(6)
    shifted = [np.roll(mask, 4, axis=1) for mask in truth]
    gt = _mask_video(tmp_path / "gt.mkv", truth)
    pred = _frame_folder(tmp_path / "pred", shifted)
    row = score_sequence(SequencePair("s", pred, gt), 0.5)
    expected = temporal.SequenceScores()
    for mask, true in zip(shifted, truth, strict=True):
        expected.add(mask, true)
    assert row["J"] == pytest.approx(expected.result()["J"], abs=1e-6)
    assert row["F"] == pytest.approx(expected.result()["F"], abs=1e-6)
    assert 0.3 < row["J"] < 0.9


def test_folders_of_sequences_pair_by_name_and_report_problems(tmp_path: Path) -> None:
    truth = _disc_masks(8)
    pred, gt = tmp_path / "pred", tmp_path / "gt"
    pred.mkdir()
    _mask_video(pred / "walk.mp4.a-disc.mask.mkv", truth)
    _mask_video(pred / "run.mp4.a-disc.mask.mkv", truth[:6])  # 6 frames against 8
    _mask_video(pred / "alone.mp4.a-disc.mask.mkv", truth)  # no ground truth
    _frame_folder(gt / "walk", truth)
    _frame_folder(gt / "run", truth)
    _mask_video(gt / "missing.mkv", truth)  # no prediction
    report = run_video_eval(gt, pred, 0.5)
    rows = {row["sequence"]: row for row in report.rows}
    assert rows["walk"]["status"] == "ok" and rows["walk"]["J&F"] == pytest.approx(1.0)
    assert rows["run"]["status"] == "failed"
    assert "ground truth has more frames" in rows["run"]["error"]
    assert rows["alone"]["J"] is None and rows["alone"]["mean_iou"] is not None
    errors = " | ".join(entry["error"] for entry in report.errors)
    assert (
        "no ground truth named alone" in errors
        and "no prediction for the sequence missing" in errors
    )
    assert report.means()["J&F"] == pytest.approx(1.0)  # over the scored sequences


def test_eval_cli_runs_the_model_on_a_video(tmp_path: Path) -> None:
    source, truths = shapes_video(tmp_path / "clip.mp4", count=10)
    gt = _frame_folder(tmp_path / "gt", [t["red circle"] for t in truths])
    report_path = tmp_path / "report.json"
    args = ["eval", "--images", str(source), "--gt", str(gt), "--prompt", "red circle"]
    args += ["--model", "demo", "--json", str(report_path), "--keep-preds", str(tmp_path / "p")]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    report = json.loads(report_path.read_text())
    (row,) = report["sequences"]
    assert row["sequence"] == "clip" and row["frames"] == 10
    assert row["J&F"] > 0.7 and report["mean"]["J&F"] == row["J&F"]
    assert (tmp_path / "p" / "clip.mp4.red-circle.soft.mkv").exists()
    # The same soft video scored with --pred, and flicker alone without --gt.
    pred = tmp_path / "p" / "clip.mp4.red-circle.soft.mkv"
    again = runner.invoke(app, ["eval", "--pred", str(pred), "--gt", str(gt)])
    assert again.exit_code == 0, again.output
    assert f"{row['J&F']:.4f}" in again.output
    alone = runner.invoke(app, ["eval", "--pred", str(pred)])
    assert alone.exit_code == 0, alone.output
    assert "mean_abs_dp" in alone.output
