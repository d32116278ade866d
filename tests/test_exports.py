"""Dataset-grade labels: instances, mask shaping, COCO and YOLO exports that survive resume,
and ``clipseg eval --gt`` on COCO files."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import pytest
import yaml
from PIL import Image
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval
from typer.testing import CliRunner

from clipseg_cli.commands.app import app
from clipseg_cli.commands.console import ExitCode
from clipseg_cli.io.naming import prompt_slugs
from clipseg_cli.ops import shape
from clipseg_cli.ops.shapes import make_large_scene

runner = CliRunner()
PROMPTS = ["a red circle", "a blue square", "a yellow triangle", "a green circle"]


def _scenes(folder: Path, count: int, first_seed: int, size=(384, 512)) -> dict:
    """Scenes with 1-3 objects of a kind, some touching, on plain and busy backgrounds (so
    that touching objects are split and specks dropped); returns {file name: scene}."""
    folder.mkdir(parents=True, exist_ok=True)
    scenes = {}
    for seed in range(first_seed, first_seed + count):
        scene = make_large_scene(
            seed, size, radius=(36.0, 60.0), classes=(1, 3), copies=(1, 3), gap=16,
            include=(("red circle", "blue square", "yellow triangle")[seed % 3],),
            touching=0.5, texture=40.0 * (seed % 2),
        )  # fmt: skip
        Image.fromarray(scene.image).save(folder / f"s{seed}.png")
        scenes[f"s{seed}.png"] = scene
    return scenes


def _segment(inputs: Path, out: Path, *extra: str, prompts=PROMPTS):
    args = ["segment", str(inputs), *(a for p in prompts for a in ("-p", p)), "--model", "demo"]
    args += ["--device", "cpu", "--progress", "none", "--out", str(out), *extra]
    return runner.invoke(app, args)


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> tuple[Path, Path, dict]:
    root = tmp_path_factory.mktemp("exports")
    scenes = _scenes(root / "in", 5, 81_000_000)
    Image.new("RGB", (200, 150), (128, 128, 128)).save(root / "in" / "blank.png")
    out = root / "out"
    result = _segment(root / "in", out, "--save", "mask,instances", "--export", "coco,yolo")
    assert result.exit_code == 0, result.output
    return root / "in", out, scenes


def _rows(out: Path) -> dict[str, dict]:
    lines = (out / "clipseg-log.jsonl").read_text().splitlines()
    return {row["key"]: row for row in map(json.loads, lines)}


# -- round trips ----------------------------------------------------------------------------------


def test_coco_rle_decodes_to_exactly_each_instance_and_the_union_to_the_mask(exported):
    _, out, _ = exported
    coco = COCO(str(out / "coco.json"))
    slugs = dict(zip(PROMPTS, prompt_slugs(PROMPTS), strict=True))
    assert [c["name"] for c in coco.loadCats(coco.getCatIds())] == PROMPTS
    checked = 0
    for image in coco.loadImgs(coco.getImgIds()):
        for category in coco.loadCats(coco.getCatIds()):
            stem = f"{image['file_name']}.{slugs[category['name']]}"
            ids = np.asarray(Image.open(out / f"{stem}.instances.png"))
            mask = np.asarray(Image.open(out / f"{stem}.mask.png")) > 0
            union = np.zeros(mask.shape, bool)
            annotations = coco.loadAnns(
                coco.getAnnIds(imgIds=[image["id"]], catIds=[category["id"]])
            )
            for annotation in annotations:
                decoded = coco.annToMask(annotation).astype(bool)
                instance = annotation["id"] - image["id"] * 1000
                np.testing.assert_array_equal(decoded, ids == instance)
                assert annotation["area"] == decoded.sum() and annotation["iscrowd"] == 0
                x, y, w, h = annotation["bbox"]
                rows, cols = np.nonzero(decoded)
                assert (x, y, w, h) == (cols.min(), rows.min(), np.ptp(cols) + 1, np.ptp(rows) + 1)
                union |= decoded
                checked += 1
            np.testing.assert_array_equal(union, mask)
            np.testing.assert_array_equal(ids > 0, mask)
    assert checked >= 5


def test_the_round_trips_cover_split_and_dropped_objects(exported):
    """The scenes of these tests make the defaults split regions and drop specks."""
    _, out, _ = exported
    rows = _rows(out)
    dropped = sum(p["dropped"]["min_score"] for row in rows.values() for p in row["prompts"])
    assert dropped > 0
    split = 0
    for row in rows.values():
        for slug in prompt_slugs(PROMPTS):
            ids = np.asarray(Image.open(out / f"{row['key']}.{slug}.instances.png"))
            regions = cv2.connectedComponents((ids > 0).astype(np.uint8), connectivity=8)[0] - 1
            split += len(np.unique(ids[ids > 0])) > regions
    assert split > 0


def test_instances_are_in_the_log_with_their_box_area_and_score(exported):
    _, out, _ = exported
    rows = _rows(out)
    instances = rows["s81000000.png"]["instances"]
    assert instances and {"prompt", "id", "bbox", "area", "score"} <= set(instances[0])
    assert [i["id"] for i in instances] == list(range(1, len(instances) + 1))
    assert all(0 < i["score"] <= 1 and i["area"] > 0 for i in instances)
    assert rows["blank.png"]["instances"] == []


def test_coco_export_works_as_detection_results_for_cocoeval(exported):
    _, out, _ = exported
    truth = COCO(str(out / "coco.json"))
    results = truth.loadRes(json.loads((out / "coco.json").read_text())["annotations"])
    evaluation = COCOeval(truth, results, "segm")
    evaluation.evaluate()
    evaluation.accumulate()
    evaluation.summarize()
    assert evaluation.stats[0] == pytest.approx(1.0)  # itself, as its own ground truth


def test_coco_polygons_rasterise_back_onto_the_instances(exported, tmp_path):
    inputs, _, _ = exported
    polygons = tmp_path / "polygons"
    result = _segment(inputs, polygons, "--save", "instances", "--export", "coco",
                      "--coco-segmentation", "polygon")  # fmt: skip
    assert result.exit_code == 0, result.output
    coco = json.loads((polygons / "coco.json").read_text())
    images = {image["id"]: image for image in coco["images"]}
    slugs = prompt_slugs(PROMPTS)
    assert coco["annotations"]
    for annotation in coco["annotations"]:
        image = images[annotation["image_id"]]
        h, w = image["height"], image["width"]
        drawn = mask_utils.decode(
            mask_utils.merge(mask_utils.frPyObjects(annotation["segmentation"], h, w))
        )
        slug = slugs[annotation["category_id"] - 1]
        ids = np.asarray(Image.open(polygons / f"{image['file_name']}.{slug}.instances.png"))
        instance = ids == annotation["id"] - image["id"] * 1000
        iou = (drawn.astype(bool) & instance).sum() / (drawn.astype(bool) | instance).sum()
        assert iou >= 0.9, (annotation["id"], iou)


def _ultralytics_label_path(image: Path) -> Path:
    """ultralytics.data.utils.img2label_paths, for one image (written out here, so the test
    does not trust the code it checks)."""
    text = str(image)
    images, labels = f"{os.sep}images{os.sep}", f"{os.sep}labels{os.sep}"
    return Path(labels.join(text.rsplit(images, 1)).rsplit(".", 1)[0] + ".txt")


def test_yolo_dataset_follows_the_loader_rules_and_rasterises_onto_the_masks(exported):
    inputs, out, _ = exported
    folder = out / "yolo"
    config = yaml.safe_load((folder / "data.yaml").read_text())
    assert Path(config["path"]).is_absolute() and Path(config["path"]) == folder.resolve()
    assert config["train"] == config["val"] == "images"
    assert config["names"] == dict(enumerate(PROMPTS))
    images = sorted((folder / "images").iterdir())
    assert {p.name for p in images} == {p.name for p in inputs.iterdir()}
    slugs = prompt_slugs(PROMPTS)
    for image in images:
        assert image.is_symlink() and image.resolve() == (inputs / image.name).resolve()
        label = _ultralytics_label_path(image)
        lines = label.read_text().splitlines()
        if image.name == "blank.png":
            assert lines == []  # an image without instances has an empty label file
        h, w = np.asarray(Image.open(image)).shape[:2]
        drawn = {k: np.zeros((h, w), np.uint8) for k in range(len(PROMPTS))}
        for line in lines:
            values = line.split()
            cls, coords = int(values[0]), np.array(values[1:], float)
            assert coords.size % 2 == 0 and coords.size >= 6
            assert coords.min() >= 0 and coords.max() <= 1
            points = np.round(coords.reshape(-1, 2) * (w, h)).astype(np.int32)
            cv2.fillPoly(drawn[cls], [points], 1)
        for k, slug in enumerate(slugs):
            mask = np.asarray(Image.open(out / f"{image.name}.{slug}.mask.png")) > 0
            union = drawn[k].astype(bool)
            if mask.any():
                assert (union & mask).sum() / (union | mask).sum() >= 0.9
            else:
                assert not union.any()


# -- quality: instance counts --------------------------------------------------------------------


def test_instance_counts_are_right_for_most_image_prompt_pairs(tmp_path):
    """Fresh high-resolution scenes with 1-3 objects of a kind (seeds the demo model never saw)."""
    folder = tmp_path / "in"
    scenes = {}
    for seed in range(82_000_000, 82_000_008):
        scene = make_large_scene(seed, (768, 1024), radius=(85.0, 130.0), classes=(1, 2),
                                 copies=(1, 3), gap=24)  # fmt: skip
        folder.mkdir(exist_ok=True)
        Image.fromarray(scene.image).save(folder / f"s{seed}.png")
        scenes[f"s{seed}.png"] = scene
    labels = sorted({obj.label for scene in scenes.values() for obj in scene.objects})
    prompts = [f"a {label}" for label in labels]
    out = tmp_path / "out"
    result = _segment(folder, out, "--export", "coco", prompts=prompts)
    assert result.exit_code == 0, result.output
    rows = _rows(out)
    right = total = 0
    for name, scene in scenes.items():
        for prompt in prompts:
            expected = sum(f"a {obj.label}" == prompt for obj in scene.objects)
            if expected == 0:
                continue
            found = sum(i["prompt"] == prompt for i in rows[name]["instances"])
            right += found == expected
            total += 1
    assert total >= 10 and right / total >= 0.7, (right, total)


# -- resume and growth ---------------------------------------------------------------------------


def _exports(out: Path) -> tuple[dict, dict]:
    coco = json.loads((out / "coco.json").read_text())
    coco.pop("info")
    labels = {
        p.relative_to(out / "yolo").as_posix(): p.read_text()
        for p in sorted((out / "yolo" / "labels").rglob("*.txt"))
    }
    return coco, labels


def _command(inputs: Path, out: Path) -> list[str]:
    args = [sys.executable, "-m", "clipseg_cli", "segment", str(inputs)]
    args += [a for p in PROMPTS for a in ("-p", p)]
    args += ["--model", "demo", "--device", "cpu", "--progress", "none", "--out", str(out)]
    return [*args, "--export", "coco,yolo", "--save", "mask"]


def test_killed_runs_resume_into_the_same_exports_and_growth_adds_exactly_the_new(tmp_path):
    inputs = tmp_path / "in"
    _scenes(inputs, 12, 83_000_000)
    reference = tmp_path / "reference"
    assert (
        subprocess.run(_command(inputs, reference), capture_output=True, check=False).returncode
        == 0
    )
    out = tmp_path / "out"
    log = out / "clipseg-log.jsonl"
    for kill_after_rows in (3, 8):  # SIGKILL at two moments
        process = subprocess.Popen(_command(inputs, out), stdout=subprocess.DEVNULL,
                                   stderr=subprocess.DEVNULL)  # fmt: skip
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and process.poll() is None:
            if log.exists() and len(log.read_text().splitlines()) >= kill_after_rows:
                break
            time.sleep(0.05)
        process.send_signal(signal.SIGKILL)
        process.wait()
    completed = subprocess.run(_command(inputs, out), capture_output=True, text=True, check=False)
    assert completed.returncode == 0, completed.stderr
    assert _exports(out) == _exports(reference)

    before = _exports(out)[0]
    _scenes(inputs, 2, 83_500_000)  # two new images
    completed = subprocess.run(_command(inputs, out), capture_output=True, text=True, check=False)
    assert completed.returncode == 0, completed.stderr
    after = _exports(out)[0]
    added = {image["file_name"] for image in after["images"]} - {
        image["file_name"] for image in before["images"]
    }
    assert added == {"s83500000.png", "s83500001.png"}
    new_ids = {image["id"] for image in after["images"] if image["file_name"] in added}
    kept = [a for a in after["annotations"] if a["image_id"] not in new_ids]
    assert kept == before["annotations"]  # same annotations, same ids
    assert len(after["annotations"]) > len(before["annotations"])


# -- mask shaping ---------------------------------------------------------------------------------


def test_shaping_never_shifts_a_mask():
    mask = np.zeros((80, 100), bool)
    mask[20:50, 30:70] = True
    mask[33:37, 48:52] = False  # a hole in the middle, so the centroid stays put
    for pixels in (-5, 4):
        grown = shape.grow(mask, pixels)
        rows, cols = np.nonzero(grown)
        assert abs(rows.mean() - 34.5) < 0.6 and abs(cols.mean() - 49.5) < 0.6
    assert shape.fill_holes(mask).sum() == 30 * 40
    assert shape.grow(mask, 3).sum() > mask.sum() > shape.grow(mask, -3).sum()
    speck = mask.copy()
    speck[70:72, 5:7] = True
    assert shape.drop_small_regions(speck, 10)[0].sum() == mask.sum()
    assert shape.drop_small_regions(speck, 10)[1] == 1
    solid = shape.fill_holes(mask)
    soft = shape.feathered(solid, 6)
    assert soft.max() == 1.0 and 0 < soft[20, 50] < 1  # soft on the edge
    np.testing.assert_allclose(soft[::-1, ::-1], shape.feathered(solid[::-1, ::-1], 6), atol=1e-6)
    inverted, _ = shape.shape_mask(mask, shape.MaskShaping(invert=True, min_area=0))
    np.testing.assert_array_equal(inverted, ~mask)


def test_shaping_options_reach_every_output(exported, tmp_path):
    inputs, plain, _ = exported
    out = tmp_path / "shaped"
    result = _segment(inputs, out, "--save", "mask,soft,instances", "--grow", "6",
                      "--fill-holes", "--feather", "4")  # fmt: skip
    assert result.exit_code == 0, result.output
    name = "s81000000.png." + prompt_slugs(PROMPTS)[0]
    base = np.asarray(Image.open(plain / f"{name}.mask.png")) > 0
    grown = np.asarray(Image.open(out / f"{name}.mask.png")) > 0
    assert grown.sum() > base.sum() and (grown | base).sum() == grown.sum()
    np.testing.assert_array_equal(np.asarray(Image.open(out / f"{name}.instances.png")) > 0, grown)
    soft = np.asarray(Image.open(out / f"{name}.soft.png"))
    assert ((soft > 0) & (soft < 255)).any()  # the feathered edge
    inverted = tmp_path / "inverted"
    result = _segment(inputs, inverted, "--save", "mask", "--invert", "--min-area", "0")
    assert result.exit_code == 0, result.output
    inverse = np.asarray(Image.open(inverted / f"{name}.mask.png")) > 0
    np.testing.assert_array_equal(inverse, ~base | (inverse & base))
    assert (inverse & base).sum() <= base.size * 2e-4  # only specks the default removed


# -- bad input ------------------------------------------------------------------------------------


def test_colliding_slugs_still_give_distinct_categories(exported, tmp_path):
    inputs, _, _ = exported
    prompts = ["a red circle", "A Red Circle", "a red circle!"]
    assert len(set(prompt_slugs(prompts))) == 3 and len({p.lower() for p in prompts}) < 3
    out = tmp_path / "out"
    result = _segment(inputs, out, "--export", "coco", prompts=prompts)
    assert result.exit_code == 0, result.output
    categories = json.loads((out / "coco.json").read_text())["categories"]
    assert [c["name"] for c in categories] == prompts
    assert len({c["id"] for c in categories}) == 3


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (["--min-area", "-3"], "--min-area -3"),
        (["--export", "coco,voc"], "--export voc"),
        (["--feather", "-1"], "--feather -1"),
    ],
)
def test_bad_shaping_and_export_options_are_one_line_errors(exported, tmp_path, options, message):
    inputs, _, _ = exported
    out = tmp_path / "out"
    result = _segment(inputs, out, *options)
    assert result.exit_code == ExitCode.USAGE, result.output
    assert message in result.output and result.output.strip().count("\n") == 0
    assert not out.exists()


def test_grow_larger_than_the_image_fails_that_image_and_keeps_the_rest(exported, tmp_path):
    inputs, _, _ = exported
    out = tmp_path / "out"
    # 512x384 scenes; the blank one is 200x150 (and a dilation's cost grows with its radius)
    result = _segment(inputs, out, "--grow", "201")
    assert result.exit_code == ExitCode.SOME_FAILED, result.output
    rows = _rows(out)
    assert rows["blank.png"]["status"] == "failed"
    assert (
        rows["blank.png"]["error"]
        == "--grow 201 is larger than the image (200x150); grow by at most 200 px"
    )
    assert rows["s81000000.png"]["status"] == "ok"


# -- clipseg eval --gt on COCO files --------------------------------------------------------------


def _noisy_copy(coco_path: Path, path: Path) -> Path:
    """Ground truth made from an export: some instances dropped, the rest grown a little, an
    extra category that no prompt names."""
    data = json.loads(coco_path.read_text())
    annotations = []
    for i, annotation in enumerate(data["annotations"]):
        if i % 4 == 3:
            continue
        rle = dict(annotation["segmentation"], counts=annotation["segmentation"]["counts"].encode())
        mask = shape.grow(mask_utils.decode(rle).astype(bool), 2 if i % 2 else -1)
        encoded = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
        annotation = {k: v for k, v in annotation.items() if k != "score"}
        annotation["segmentation"] = {"size": encoded["size"], "counts": encoded["counts"].decode()}
        annotation["area"] = int(mask.sum())
        annotation["bbox"] = [float(v) for v in mask_utils.toBbox(encoded)]
        annotations.append(annotation)
    data["annotations"] = annotations
    data["categories"].append({"id": 99, "name": "a purple hexagon"})
    path.write_text(json.dumps(data))
    return path


def test_eval_on_coco_agrees_with_a_direct_cocoeval(exported, tmp_path):
    _, out, _ = exported
    gt = _noisy_copy(out / "coco.json", tmp_path / "gt.json")
    report_path = tmp_path / "eval.json"
    result = runner.invoke(app, ["eval", "--gt", str(gt), "--pred", str(out / "coco.json"),
                                 "--json", str(report_path)])  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "warning: a purple hexagon: matches no prompt" in result.output
    report = json.loads(report_path.read_text())

    truth = COCO(str(gt))
    results = truth.loadRes(json.loads((out / "coco.json").read_text())["annotations"])
    direct = COCOeval(truth, results, "segm")
    direct.params.catIds = [c["id"] for c in truth.loadCats(truth.getCatIds()) if c["id"] != 99]
    direct.evaluate()
    direct.accumulate()
    direct.summarize()
    for index, key in enumerate(("AP", "AP50", "AP75")):
        assert report["coco"]["segm"][key] == pytest.approx(direct.stats[index], abs=1e-6)
    assert 0 < report["coco"]["segm"]["AP"] < 1
    assert 0 < report["iou_fg"] < 1


def test_eval_refuses_a_gt_file_that_is_not_coco(tmp_path):
    bad = tmp_path / "gt.json"
    bad.write_text(json.dumps({"annotations": []}))
    result = runner.invoke(app, ["eval", "--gt", str(bad), "--pred", str(bad)])
    assert result.exit_code == ExitCode.USAGE
    assert "not a COCO instance file" in result.output and result.output.count("\n") == 1
    bad.write_text("{not json")
    result = runner.invoke(app, ["eval", "--gt", str(bad), "--pred", str(bad)])
    assert result.exit_code == ExitCode.USAGE and "not JSON" in result.output


def test_eval_with_images_runs_segment_first(exported, tmp_path):
    inputs, out, _ = exported
    report_path = tmp_path / "eval.json"
    args = ["eval", "--gt", str(out / "coco.json"), "--images", str(inputs), "--model", "demo",
            "--device", "cpu", "--json", str(report_path)]  # fmt: skip
    result = runner.invoke(app, [*args, *(a for p in PROMPTS for a in ("-p", p))])
    assert result.exit_code == 0, result.output
    report = json.loads(report_path.read_text())
    assert report["coco"]["segm"]["AP"] == pytest.approx(1.0)  # the same run, as ground truth
