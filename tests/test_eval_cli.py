"""End-to-end tests of ``clipseg eval`` / ``clipseg calibrate`` on small PNG folders."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from clipseg_cli import evaluate
from clipseg_cli.commands.app import app
from clipseg_cli.commands.console import ExitCode
from clipseg_cli.io import writers
from clipseg_cli.io.masks import MaskError, read_mask
from clipseg_cli.ops import metrics

runner = CliRunner()


def _save(path: Path, array: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)
    return path


def _mask(h: int, w: int, box: tuple[int, int, int, int]) -> np.ndarray:
    """uint8 [h, w] 0/255 with a filled box (y0, y1, x0, x1)."""
    out = np.zeros((h, w), np.uint8)
    y0, y1, x0, x1 = box
    out[y0:y1, x0:x1] = 255
    return out


def _soft(h: int, w: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(h, w)).astype(np.uint8)


def _eval(*args: str):
    return runner.invoke(app, ["eval", *args])


def _no_traceback(result) -> None:
    assert "Traceback" not in result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)


@pytest.fixture
def dataset(tmp_path: Path) -> dict[str, Path]:
    """gt/a.png + gt/sub/b.png with predictions at the same relative paths."""
    gt, pred = tmp_path / "gt", tmp_path / "pred"
    _save(gt / "a.png", _mask(12, 16, (2, 8, 3, 12)))
    _save(gt / "sub" / "b.png", _mask(10, 10, (0, 5, 0, 10)))
    _save(pred / "a.png", _soft(12, 16, 1))  # probabilities p/255
    _save(pred / "sub" / "b.png", _mask(10, 10, (0, 6, 0, 10)))  # binary mask
    return {"gt": gt, "pred": pred, "root": tmp_path}


def test_eval_pred_folders_matches_metrics(dataset):
    out = dataset["root"] / "report" / "eval.json"
    result = _eval("--pred", str(dataset["pred"]), "--gt", str(dataset["gt"]), "--json", str(out))
    assert result.exit_code == ExitCode.OK, result.output
    _no_traceback(result)
    report = json.loads(out.read_text())
    for key in ("iou_fg", "binary_iou", "miou", "ap", "precision", "recall", "best_threshold"):
        assert key in report, key
    assert report["per_threshold"]["thresholds"][30] == 0.3
    assert len(report["per_threshold"]["iou_fg"]) == 101
    assert report["counts"] == {"pairs": 2, "ok": 2, "errors": 0}
    assert "no +1" in report["conventions"]["iou_fg"]

    acc = metrics.SegmentationAccumulator()
    acc.update(_soft(12, 16, 1) / 255.0, _mask(12, 16, (2, 8, 3, 12)) > 0, "")
    acc.update(_mask(10, 10, (0, 6, 0, 10)) / 255.0, _mask(10, 10, (0, 5, 0, 10)) > 0, "sub")
    expected = acc.result()
    assert report["iou_fg"] == pytest.approx(expected.at(0.3)["iou_fg"])
    assert report["miou"] == pytest.approx(expected.at(0.3)["miou"])
    assert report["ap"] == pytest.approx(expected.ap)
    assert report["at_best"]["threshold"] == expected.best_threshold
    rows = {Path(r["gt"]).name: r for r in report["images"]}
    assert rows["b.png"]["iou_fg"] == pytest.approx(50 / 60) and rows["b.png"]["pred_binary"]
    assert set(report["per_class"]) == {"", "sub"}  # classes from the first folder

    with out.with_suffix(".csv").open(newline="") as f:
        csv_rows = list(csv.DictReader(f))
    assert len(csv_rows) == 2 and {r["status"] for r in csv_rows} == {"ok"}
    assert float(csv_rows[1]["iou_fg"]) == pytest.approx(50 / 60)
    with Image.open(out.with_suffix(".pr.png")) as plot:
        assert plot.format == "PNG" and plot.size == (560, 480)
    # The summary names the conventions next to the numbers (plain text when not a tty).
    assert "iou_fg\t" in result.stdout and "TP/(TP+FP+FN)" in result.stdout


def test_eval_segment_style_names(tmp_path):
    gt, pred = tmp_path / "gt", tmp_path / "pred"
    _save(gt / "x" / "dog.png", _mask(8, 8, (0, 4, 0, 8)))
    _save(pred / "x" / "dog.jpg.a-dog.mask.png", _mask(8, 8, (0, 4, 0, 8)))
    _save(pred / "x" / "dog.jpg.a-dog.soft.png", _soft(8, 8, 2))
    out = tmp_path / "r.json"
    result = _eval("--pred", str(pred), "--gt", str(gt), "--json", str(out))
    assert result.exit_code == ExitCode.OK, result.output
    (row,) = json.loads(out.read_text())["images"]
    assert row["pred"].endswith("dog.jpg.a-dog.soft.png") and row["class"] == "a-dog"

    # A second prompt makes the match ambiguous until --pred-slug picks one.
    _save(pred / "x" / "dog.jpg.a-cat.mask.png", _mask(8, 8, (0, 1, 0, 1)))
    result = _eval("--pred", str(pred), "--gt", str(gt))
    assert result.exit_code == ExitCode.SOME_FAILED
    assert "dog.png: several predictions match" in result.output and "--pred-slug" in result.output
    result = _eval("--pred", str(pred), "--gt", str(gt), "--pred-slug", "a-cat", "--json", str(out))
    assert result.exit_code == ExitCode.OK, result.output
    (row,) = json.loads(out.read_text())["images"]
    assert row["pred"].endswith("a-cat.mask.png")


def test_eval_reads_only_soft_and_mask_outputs_as_predictions(tmp_path):
    gt, pred = tmp_path / "gt", tmp_path / "pred"
    _save(gt / "dog.png", _mask(8, 8, (0, 4, 0, 8)))
    _save(pred / "dog.jpg.a-dog.mask.png", _mask(8, 8, (0, 4, 0, 8)))
    # Other segment outputs are plain files keyed by their stem: they match no ground truth.
    _save(pred / "dog.jpg.a-dog.overlay.png", np.zeros((8, 8, 3), np.uint8))
    _save(pred / "dog.jpg.labels.png", _mask(8, 8, (0, 4, 0, 8)))
    out = tmp_path / "r.json"
    result = _eval("--pred", str(pred), "--gt", str(gt), "--json", str(out))
    assert result.exit_code == ExitCode.SOME_FAILED
    report = json.loads(out.read_text())
    (row,) = report["images"]
    assert row["pred"].endswith("dog.jpg.a-dog.mask.png") and row["iou_fg"] == 1.0
    orphans = sorted(Path(e["file"]).name for e in report["errors"])
    assert orphans == ["dog.jpg.a-dog.overlay.png", "dog.jpg.labels.png"]
    assert {e["error"] for e in report["errors"]} == {"no ground truth for this prediction"}


def test_eval_gt_folder_per_prompt(tmp_path):
    gt, pred = tmp_path / "gt", tmp_path / "pred"
    _save(gt / "a-dog" / "p.png", _mask(6, 6, (0, 3, 0, 6)))
    _save(gt / "a-cat" / "p.png", _mask(6, 6, (3, 6, 0, 6)))
    _save(pred / "p.jpg.a-dog.mask.png", _mask(6, 6, (0, 3, 0, 6)))
    _save(pred / "p.jpg.a-cat.mask.png", _mask(6, 6, (0, 6, 0, 6)))
    out = tmp_path / "r.json"
    result = _eval("--pred", str(pred), "--gt", str(gt), "--json", str(out))
    assert result.exit_code == ExitCode.OK, result.output
    report = json.loads(out.read_text())
    assert report["per_class"]["a-dog"]["iou_fg"] == 1.0
    assert report["per_class"]["a-cat"]["iou_fg"] == 0.5
    assert report["miou"] == pytest.approx(0.75)
    assert report["iou_fg"] == pytest.approx(36 / 54)


def test_eval_per_file_errors(dataset):
    gt, pred = dataset["gt"], dataset["pred"]
    _save(pred / "orphan.png", _mask(4, 4, (0, 2, 0, 2)))  # no ground truth
    _save(gt / "nopred.png", _mask(4, 4, (0, 2, 0, 2)))  # no prediction
    _save(gt / "small.png", _mask(4, 4, (0, 2, 0, 2)))
    _save(pred / "small.png", _mask(5, 4, (0, 2, 0, 2)))  # size mismatch
    colour = np.zeros((4, 4, 3), np.uint8)
    colour[0, 0] = (255, 0, 0)
    _save(gt / "colour.png", colour)  # not a mask
    _save(pred / "colour.png", _mask(4, 4, (0, 2, 0, 2)))
    (gt / "broken.png").write_bytes(b"not a png at all")
    _save(pred / "broken.png", _mask(4, 4, (0, 2, 0, 2)))
    out = dataset["root"] / "r.json"
    result = _eval("--pred", str(pred), "--gt", str(gt), "--json", str(out))
    assert result.exit_code == ExitCode.SOME_FAILED
    _no_traceback(result)
    lines = [line for line in result.stderr.splitlines() if line.startswith("clipseg: ")]
    expected = {
        "orphan.png": "no ground truth for this prediction",
        "nopred.png": "no prediction for this ground truth",
        "small.png": "size mismatch: ground truth is 4x4 but the prediction is 4x5",
        "colour.png": "ground truth: RGB image with coloured pixels: not a mask",
        "broken.png": "ground truth: not an image",
    }
    for name, reason in expected.items():
        assert any(name in line and reason in line for line in lines), (name, lines)
    report = json.loads(out.read_text())
    assert report["counts"]["ok"] == 2 and len(report["errors"]) == 5
    with out.with_suffix(".csv").open(newline="") as f:
        statuses = sorted(r["status"] for r in csv.DictReader(f))
    assert statuses == ["failed"] * 3 + ["ok"] * 2  # orphans/no-pred have no row


def test_eval_usage_and_no_inputs(tmp_path, dataset):
    empty = tmp_path / "empty"
    empty.mkdir()
    result = _eval("--pred", str(dataset["pred"]), "--gt", str(empty))
    assert result.exit_code == ExitCode.NO_INPUTS and "no ground-truth images" in result.output
    result = _eval("--gt", str(dataset["gt"]))
    assert result.exit_code == ExitCode.USAGE and "--pred DIR or --images DIR" in result.output
    result = _eval("--pred", str(dataset["pred"]), "--gt", str(tmp_path / "missing"))
    assert result.exit_code == ExitCode.USAGE and "not a folder" in result.output
    result = _eval("--pred", str(dataset["pred"]), "--gt", str(dataset["gt"]), "--threshold", "2")
    assert result.exit_code == ExitCode.USAGE
    _no_traceback(result)
    # Both commands read --prompts-file into the config (which wants it with --images only).
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a dog\n")
    for command in ("eval", "calibrate"):
        args = [command, "--pred", str(dataset["pred"]), "--gt", str(dataset["gt"])]
        result = runner.invoke(app, [*args, "--prompts-file", str(prompts)])
        assert result.exit_code == ExitCode.USAGE, (command, result.output)
        assert "--prompt is only used with --images" in result.output
        _no_traceback(result)


def test_eval_matting(tmp_path):
    gt, pred = tmp_path / "gt", tmp_path / "pred"
    a_gt, a_pred = _soft(9, 11, 5), _soft(9, 11, 6)
    _save(gt / "m.png", a_gt)
    _save(pred / "m.png", a_pred)
    out = tmp_path / "m.json"
    result = _eval("--pred", str(pred), "--gt", str(gt), "--matting", "--json", str(out))
    assert result.exit_code == ExitCode.OK, result.output
    report = json.loads(out.read_text())
    expected = metrics.matting_errors(a_pred / 255.0, a_gt / 255.0)
    for key in ("sad", "mse", "mad", "grad", "conn"):
        assert report[key] == pytest.approx(expected[key]), key
        assert key in report["conventions"]
    assert "/ 1000" in report["conventions"]["sad"] and "/ N" in report["conventions"]["mse"]
    assert not out.with_suffix(".pr.png").exists()
    assert "sad\t" in result.stdout and "/ 1000" in result.stdout


def test_calibrate_finds_the_separating_threshold(tmp_path):
    gt, pred = tmp_path / "gt", tmp_path / "pred"
    truth = _mask(10, 10, (2, 7, 2, 7)) > 0
    # Foreground at 0.605, background at 0.595 or 0.2: only t = 0.60 separates them.
    prob = np.where(truth, 0.605, 0.2)
    prob[0, :] = 0.595
    _save(gt / "c.png", truth.astype(np.uint8) * 255)
    writers.write_soft(pred / "c.png", prob, bits=16)
    out = tmp_path / "t" / "threshold.json"
    result = runner.invoke(
        app, ["calibrate", "--pred", str(pred), "--gt", str(gt), "--out", str(out)]
    )
    assert result.exit_code == ExitCode.OK, result.output
    assert result.stdout.strip() == "0.6"
    content = json.loads(out.read_text())
    assert content["threshold"] == 0.6 and content["metric"] == "iou_fg"
    assert content["iou_fg"] == 1.0 and content["at_threshold"]["iou_fg"] < 1.0
    assert content["source"]["pred"] == str(pred)
    assert evaluate.read_threshold_file(out) == 0.6


def test_read_threshold_file_errors(tmp_path):
    cases = {
        "missing.json": (None, "file not found"),
        "bad.json": ("{nope", "not JSON"),
        "nokey.json": ('{"t": 0.4}', "no 'threshold' key"),
        "text.json": ('{"threshold": "0.4"}', "must be a number"),
        "bool.json": ('{"threshold": true}', "must be a number"),
        "range.json": ('{"threshold": 1.5}', "not between 0 and 1"),
    }
    for name, (text, reason) in cases.items():
        path = tmp_path / name
        if text is not None:
            path.write_text(text)
        with pytest.raises(ValueError, match=reason) as info:
            evaluate.read_threshold_file(path)
        assert str(info.value).startswith(str(path)) and "\n" not in str(info.value)
    (tmp_path / "bare.json").write_text("0.25\n")
    assert evaluate.read_threshold_file(tmp_path / "bare.json") == 0.25


def test_read_mask_rules(tmp_path):
    binary = read_mask(_save(tmp_path / "b.png", _mask(3, 3, (0, 1, 0, 3))))
    assert binary.binary and binary.values.dtype == np.float32 and binary.values.sum() == 3
    zero_one = read_mask(_save(tmp_path / "z.png", (_mask(3, 3, (0, 1, 0, 3)) > 0)))
    assert zero_one.binary and zero_one.values.sum() == 3  # mode "1"
    labels = read_mask(_save(tmp_path / "l.png", np.array([[0, 1]], np.uint8)))
    assert labels.binary and labels.values.tolist() == [[0.0, 1.0]]
    soft = read_mask(_save(tmp_path / "s.png", np.array([[0, 51, 255]], np.uint8)))
    assert not soft.binary and soft.values[0, 1] == pytest.approx(0.2)
    deep = read_mask(_save(tmp_path / "d.png", np.array([[0, 65535, 13107]], np.uint16)))
    assert deep.bits == 16 and deep.values[0, 2] == pytest.approx(0.2)
    grey = read_mask(_save(tmp_path / "g.png", np.full((2, 2, 3), 255, np.uint8)))
    assert grey.binary and grey.values.min() == 1.0
    rgba = np.zeros((2, 2, 4), np.uint8)
    with pytest.raises(MaskError, match="transparency"):
        read_mask(_save(tmp_path / "t.png", rgba))


def test_eval_images_mode_is_consistent(tmp_path, tiny_model_dir):
    images, gt, keep = tmp_path / "images", tmp_path / "gt", tmp_path / "keep"
    rng = np.random.default_rng(7)
    for name, (h, w) in {"one.png": (24, 32), "sub/two.jpg": (20, 20)}.items():
        _save(images / name, rng.integers(0, 256, size=(h, w, 3)).astype(np.uint8))
        _save((gt / name).with_suffix(".png"), _mask(h, w, (2, h - 4, 3, w - 5)))
    out = tmp_path / "r.json"
    args = ["--images", str(images), "--gt", str(gt), "--prompt", "a dog", "--json", str(out)]
    device = ["--model", str(tiny_model_dir), "--device", "cpu", "--precision", "fp32"]
    result = _eval(*args, *device, "--keep-preds", str(keep))
    assert result.exit_code == ExitCode.OK, result.output
    report = json.loads(out.read_text())
    assert report["counts"]["ok"] == 2 and report["source"]["prompts"] == ["a dog"]
    total_tp = 0
    for row in report["images"]:
        assert row["status"] == "ok" and row["prompt"] == "a dog"
        kept = np.asarray(Image.open(row["pred"])).astype(np.float64) / 65535
        truth = np.asarray(Image.open(row["gt"])) > 0
        assert kept.shape == truth.shape == (row["height"], row["width"])
        predicted = kept > 0.3
        inter, union = (predicted & truth).sum(), (predicted | truth).sum()
        assert row["iou_fg"] == pytest.approx(inter / union if union else 1.0, abs=5e-3)
        assert row["tp"] + row["fp"] + row["fn"] + row["tn"] == truth.size
        total_tp += row["tp"]
    assert report["at_threshold"]["tp"] == total_tp
    assert sorted(p.name for p in keep.rglob("*.png")) == [
        "one.png.a-dog.soft.png",
        "two.jpg.a-dog.soft.png",
    ]
    # The kept predictions evaluate to the same numbers through --pred.
    again = tmp_path / "again.json"
    result = _eval("--pred", str(keep), "--gt", str(gt), "--json", str(again))
    assert result.exit_code == ExitCode.OK, result.output
    assert json.loads(again.read_text())["iou_fg"] == pytest.approx(report["iou_fg"], abs=5e-3)
