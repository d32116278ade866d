"""End-to-end tests of ``clipseg segment`` / ``clipseg models`` on a tiny random model."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import numpy as np
import pytest
import torch
from hf_processor import reference_pixels
from PIL import Image
from typer.testing import CliRunner

from clipseg_cli.commands.app import app
from clipseg_cli.commands.console import ExitCode
from clipseg_cli.specs import MODEL_SPECS

runner = CliRunner()


def _photo(path: Path, size=(40, 30), color=(200, 60, 30), **save) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(abs(hash(path.name)) % 2**32)
    data = (rng.random((size[1], size[0], 3)) * 255).astype(np.uint8)
    data[: size[1] // 2] = color
    Image.fromarray(data).save(path, **save)
    return path


def _segment(args: list[str], model: Path, stdin: str | None = None):
    result = runner.invoke(
        app,
        ["segment", *args, "--model", str(model), "--device", "cpu", "--progress", "none"],
        input=stdin,
    )
    return result


def _rows(log: Path) -> list[dict]:
    return [json.loads(line) for line in log.read_text().splitlines()]


@pytest.fixture
def photos(tmp_path: Path) -> Path:
    root = tmp_path / "photos"
    _photo(root / "b.jpg")
    _photo(root / "a.png")
    _photo(root / "nested" / "deeper" / "c.webp")
    _photo(root / "nested" / "d.bmp")
    (root / "notes.txt").write_text("not an image")
    return root


def test_logits_contract_matches_transformers(tiny_model_dir, tiny_reference, tmp_path):
    """The contract other checks rely on: --save logits writes the raw model logits."""
    image = _photo(tmp_path / "in" / "x.png", size=(64, 48))
    out, log = tmp_path / "out", tmp_path / "log.jsonl"
    result = _segment(
        [str(image), "--prompt", "a dog", "--save", "logits", "--out", str(out), "--log", str(log),
         "--precision", "fp32"],  # exact: on a bf16 CPU auto may choose bf16
        tiny_model_dir,
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    (row,) = _rows(log)
    assert row["input"] == str(image) and row["status"] == "ok"
    (output,) = row["outputs"]
    assert output["prompt"] == "a dog" and output["kind"] == "logits"
    logits = np.load(output["path"])
    assert logits.dtype == np.float32 and logits.shape == (352, 352)

    from open_clip.tokenizer import SimpleTokenizer

    with torch.no_grad():
        expected = tiny_reference(
            input_ids=SimpleTokenizer()(["a dog"]), pixel_values=reference_pixels(Image.open(image))
        ).logits[0]
    assert np.abs(logits - expected.numpy()).max() <= 1e-4


def test_ref_raw_image_prompt_matches_transformers(tiny_model_dir, tiny_reference, tmp_path):
    image = _photo(tmp_path / "x.png", size=(64, 48))
    support = _photo(tmp_path / "support.jpg", size=(80, 60), color=(10, 200, 10))
    out = tmp_path / "out"
    result = _segment(
        [
            str(image),
            "--ref",
            str(support),
            "--ref-mode",
            "raw",
            "--save",
            "logits",
            "--out",
            str(out),
            "--precision",
            "fp32",
        ],
        tiny_model_dir,
    )
    assert result.exit_code == 0, result.output
    (row,) = _rows(out / "clipseg-log.jsonl")
    assert row["outputs"][0]["prompt"] == f"ref:{support}"
    logits = np.load(row["outputs"][0]["path"])

    with torch.no_grad():
        expected = tiny_reference(
            pixel_values=reference_pixels(Image.open(image)),
            conditional_pixel_values=reference_pixels(Image.open(support)),
        ).logits[0]
    assert np.abs(logits - expected.numpy()).max() <= 1e-4


def test_folder_walk_mirrors_the_tree_and_writes_every_kind(tiny_model_dir, photos, tmp_path):
    out = tmp_path / "out"
    result = _segment(
        [
            str(photos),
            "--prompt",
            "a dog",
            "--prompt",
            "a cat",
            "--save",
            "mask,soft",
            "--save",
            "overlay,cutout,logits,labels",
            "--soft-bits",
            "16",
            "--out",
            str(out),
        ],
        tiny_model_dir,
    )
    assert result.exit_code == 0, result.output
    assert "clipseg: stages: decode " in result.output and "bottleneck: " in result.output
    assert "note:" not in result.output  # only named models with a caveat add one
    rows = _rows(out / "clipseg-log.jsonl")
    # content-sniffed, sorted, recursive; notes.txt is not an image
    assert [r["key"] for r in rows] == ["a.png", "b.jpg", "nested/d.bmp", "nested/deeper/c.webp"]
    for row in rows:
        assert row["status"] == "ok" and row["error"] is None
        assert (row["width"], row["height"]) == (40, 30)
        assert {p["prompt"] for p in row["prompts"]} == {"a dog", "a cat"}
        for stats in row["prompts"]:
            assert 0.0 <= stats["mean"] <= stats["max"] <= 1.0
            assert 0.0 <= stats["coverage"] <= 1.0
            assert stats["empty"] == (stats["coverage"] == 0.0)
        kinds = sorted((o["kind"], o["prompt"]) for o in row["outputs"])
        expected = sorted(
            [
                (k, p)
                for k in ("mask", "soft", "overlay", "cutout", "logits")
                for p in ("a dog", "a cat")
            ]
            + [("labels", None)]
        )
        assert kinds == expected
        for output in row["outputs"]:
            path = Path(output["path"])
            assert path.is_file() and out in path.parents
            assert path.parent == out / Path(row["key"]).parent
            if output["kind"] == "logits":
                assert np.load(path).shape == (352, 352)
                continue
            image = Image.open(path)
            assert image.size == (40, 30)
            mode = {"mask": "L", "soft": "I;16", "overlay": "RGB", "cutout": "RGBA"}.get(
                output["kind"], "P"
            )
            assert image.mode == mode, output
    mask = np.asarray(Image.open(out / "a.png.a-dog.mask.png"))
    assert set(np.unique(mask)) <= {0, 255}
    labels = np.asarray(Image.open(out / "a.png.labels.png"))
    assert set(np.unique(labels)) <= {0, 1, 2}
    summary = json.loads((out / "clipseg-summary.json").read_text())
    assert summary["counts"] == {"total": 4, "ok": 4, "failed": 0, "with_empty_prompt": 0} or (
        summary["counts"]["ok"] == 4 and summary["counts"]["failed"] == 0
    )
    assert summary["model"]["sha256"] and summary["versions"]["torch"] == metadata.version("torch")
    assert summary["labels_legend"] == {"0": "background", "1": "a dog", "2": "a cat"}
    stages = summary["stages"]
    assert min(stages["decode"], stages["model"], stages["write"]) > 0
    assert set(stages["waited_for"]) == {"input", "decode", "write", "record"}
    assert stages["wait"] == pytest.approx(sum(stages["waited_for"].values()), abs=0.01)
    assert stages["bottleneck"] in ("model", "input", "decode", "write", "record")


def test_mask_matches_threshold_of_soft_output(tiny_model_dir, tmp_path):
    image = _photo(tmp_path / "x.png", size=(50, 40))
    out = tmp_path / "out"
    for threshold in ("0.3", "0.5"):
        result = _segment(
            [
                str(image),
                "-p",
                "a dog",
                "--save",
                "mask,soft",
                "--soft-bits",
                "16",
                "--threshold",
                threshold,
                "--out",
                str(out / threshold),
            ],
            tiny_model_dir,
        )
        assert result.exit_code == 0, result.output
        soft = np.asarray(Image.open(out / threshold / "x.png.a-dog.soft.png")) / 65535.0
        mask = np.asarray(Image.open(out / threshold / "x.png.a-dog.mask.png")) > 0
        confident = np.abs(soft - float(threshold)) > 1e-3
        assert np.array_equal(mask[confident], soft[confident] > float(threshold))


def test_globs_stdin_and_lists(tiny_model_dir, photos, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "g"
    result = _segment(
        ["photos/**/*.bmp", "photos/*.png", "-p", "x", "--out", str(out)], tiny_model_dir
    )
    assert result.exit_code == 0, result.output
    assert sorted(r["key"] for r in _rows(out / "clipseg-log.jsonl")) == ["a.png", "nested/d.bmp"]

    out = tmp_path / "s"
    result = _segment(["-", "-p", "x", "--out", str(out)], tiny_model_dir, stdin="photos/b.jpg\n")
    assert result.exit_code == 0, result.output
    assert [r["input"] for r in _rows(out / "clipseg-log.jsonl")] == ["photos/b.jpg"]

    listing = tmp_path / "list.txt"
    listing.write_text("# my list\nphotos/a.png\n\nphotos/nested/d.bmp\n")
    out = tmp_path / "l"
    result = _segment([f"@{listing}", "-p", "x", "--out", str(out)], tiny_model_dir)
    assert result.exit_code == 0, result.output
    assert [r["input"] for r in _rows(out / "clipseg-log.jsonl")] == [
        "photos/a.png",
        "photos/nested/d.bmp",
    ]


def test_outputs_never_collide(tiny_model_dir, tmp_path):
    root = tmp_path / "in"
    _photo(root / "dog.jpg")
    _photo(root / "dog.png", color=(0, 0, 255))
    _photo(root / "Cat.png")
    _photo(root / "cat.png", color=(0, 255, 0))
    out = tmp_path / "out"
    result = _segment(
        [
            str(root),
            "-p",
            "a dog",
            "-p",
            "A-Dog",
            "-p",
            "../../escape",
            "--save",
            "mask",
            "--out",
            str(out),
        ],
        tiny_model_dir,
    )
    assert result.exit_code == 0, result.output
    paths = [o["path"] for r in _rows(out / "clipseg-log.jsonl") for o in r["outputs"]]
    assert len(paths) == 4 * 3
    assert len({p.lower() for p in paths}) == len(paths)  # distinct even case-insensitively
    for path in paths:
        assert Path(path).resolve().is_relative_to(out.resolve())
        assert Path(path).is_file()
    assert not (tmp_path / "escape").exists()


def test_out_inside_input_folder_is_never_an_input(tiny_model_dir, tmp_path):
    root = tmp_path / "in"
    _photo(root / "a.png")
    out = root / "masks"
    for _ in range(2):
        result = _segment([str(root), "-p", "x", "--out", str(out)], tiny_model_dir)
        assert result.exit_code == 0, result.output
    rows = _rows(out / "clipseg-log.jsonl")
    assert {r["key"] for r in rows} == {"a.png"}


def test_exif_and_modes_come_out_as_displayed(tiny_model_dir, tmp_path):
    root = tmp_path / "in"
    root.mkdir()
    rotated = Image.new("RGB", (40, 20), (255, 0, 0))
    exif = rotated.getexif()
    exif[0x0112] = 6  # rotate 90° clockwise when displayed
    rotated.save(root / "rotated.jpg", exif=exif)
    Image.new("CMYK", (30, 20), (0, 255, 255, 0)).save(root / "cmyk.jpg")
    gradient = (np.linspace(0, 65535, 30 * 20).reshape(20, 30)).astype(np.uint16)
    Image.fromarray(gradient).save(root / "deep.png")
    palette = Image.new("P", (30, 20), 1)
    palette.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    palette.info["transparency"] = 0
    palette.save(root / "palette.png")
    Image.new("LA", (30, 20), (128, 200)).save(root / "la.png")
    Image.new("1", (30, 20), 1).save(root / "bilevel.png")
    frames = [Image.new("P", (30, 20), i) for i in range(3)]
    frames[0].save(root / "anim.gif", save_all=True, append_images=frames[1:])
    out = tmp_path / "out"
    result = _segment(
        [str(root), "-p", "x", "--save", "overlay", "--out", str(out)], tiny_model_dir
    )
    assert result.exit_code == 0, result.output
    rows = {r["key"]: r for r in _rows(out / "clipseg-log.jsonl")}
    assert set(rows) == {
        "rotated.jpg",
        "cmyk.jpg",
        "deep.png",
        "palette.png",
        "la.png",
        "bilevel.png",
        "anim.gif",
    }
    assert (rows["rotated.jpg"]["width"], rows["rotated.jpg"]["height"]) == (20, 40)
    overlay = Image.open(out / "rotated.jpg.x.overlay.png")
    assert overlay.size == (20, 40)
    deep = np.asarray(Image.open(out / "deep.png.x.overlay.png"))
    assert deep.min() < 100  # a 16-bit gradient must not come out all white


def test_bad_files_fail_alone_with_one_line_errors(tiny_model_dir, tmp_path):
    root = tmp_path / "in"
    _photo(root / "good.png")
    (root / "empty.jpg").write_bytes(b"")
    (root / "text.jpg").write_text("hello")
    out = tmp_path / "out"
    result = _segment([str(root), "-p", "x", "--out", str(out)], tiny_model_dir)
    assert result.exit_code == ExitCode.SOME_FAILED
    rows = {r["key"]: r for r in _rows(out / "clipseg-log.jsonl")}
    assert rows["good.png"]["status"] == "ok"
    for key in ("empty.jpg", "text.jpg"):
        assert rows[key]["status"] == "failed"
        assert rows[key]["error"] and "\n" not in rows[key]["error"]
        assert rows[key]["outputs"] == []
    # The terminal says which files failed and why (--progress none included), once each.
    said = [line for line in result.output.splitlines() if line.startswith("clipseg: failed ")]
    assert sorted(said) == sorted(
        f"clipseg: failed {rows[key]['input']}: {rows[key]['error']}"
        for key in ("empty.jpg", "text.jpg")
    )


def test_usage_errors_exit_2(tiny_model_dir, tmp_path):
    image = _photo(tmp_path / "x.png")
    assert _segment([str(image), "--out", str(tmp_path / "o")], tiny_model_dir).exit_code == 2
    bad_kind = _segment([str(image), "-p", "x", "--save", "masks"], tiny_model_dir)
    assert bad_kind.exit_code == 2 and "masks" in bad_kind.output
    bad_threshold = _segment([str(image), "-p", "x", "--threshold", "3"], tiny_model_dir)
    assert bad_threshold.exit_code == 2


def test_no_inputs_found_has_its_own_exit_code(tiny_model_dir, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    result = _segment([str(empty), "-p", "x", "--out", str(tmp_path / "o")], tiny_model_dir)
    assert result.exit_code == ExitCode.NO_INPUTS
    assert "no input files" in result.output


def test_unloadable_model_has_its_own_exit_code(tmp_path):
    image = _photo(tmp_path / "x.png")
    bad = tmp_path / "bad.pth"
    bad.write_text("nope")
    result = _segment([str(image), "-p", "x", "--out", str(tmp_path / "o")], bad)
    assert result.exit_code == ExitCode.MODEL
    assert "bad.pth" in result.output and "Traceback" not in result.output


def test_prompts_file(tiny_model_dir, tmp_path):
    image = _photo(tmp_path / "x.png")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a dog\n# comment\n\na cat\n")
    out = tmp_path / "o"
    result = _segment(
        [str(image), "--prompts-file", str(prompts), "--out", str(out)], tiny_model_dir
    )
    assert result.exit_code == 0, result.output
    (row,) = _rows(out / "clipseg-log.jsonl")
    assert [p["prompt"] for p in row["prompts"]] == ["a dog", "a cat"]


def test_real_process_non_terminal_output_and_exit_code(tiny_model_dir, photos, tmp_path):
    """A real `clipseg` process with stderr to a pipe: plain lines, no control characters."""
    (photos / "broken.jpg").write_bytes(b"\xff\xd8\xff garbage")
    out = tmp_path / "out"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "COLUMNS": "80"}
    completed = subprocess.run(
        [
            sys.executable,
            "-m",
            "clipseg_cli",
            "segment",
            str(photos),
            "-p",
            "a dog",
            "--model",
            str(tiny_model_dir),
            "--device",
            "cpu",
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
        check=False,
    )
    assert completed.returncode == ExitCode.SOME_FAILED, completed.stderr
    assert "\x1b" not in completed.stderr and "\r" not in completed.stderr
    lines = completed.stderr.strip().splitlines()
    assert any("5/5 images" in line for line in lines), completed.stderr
    assert "4 ok, 1 failed" in lines[-1]
    assert "Traceback" not in completed.stderr


def test_models_lists_the_known_models():
    result = runner.invoke(app, ["models"])
    assert result.exit_code == 0
    for name in ("CIDAS/clipseg-rd64-refined", "CIDAS/clipseg-rd64", "CIDAS/clipseg-rd16"):
        assert name in result.output
    assert "no" in result.output  # nothing is cached on a test machine


def test_help_shows_the_defaults_that_options_describe():
    """Rich would swallow "[default: ...]" in a help text as markup; ours must reach the user."""
    import re

    from clipseg_cli.specs import DEFAULT_BATCH_SIZES, DEFAULT_THRESHOLD

    result = runner.invoke(app, ["segment", "--help"], env={"COLUMNS": "300"})
    assert result.exit_code == 0
    text = re.sub(r"\s+", " ", re.sub(r"[│╭╮╰╯─]", " ", result.output))
    assert (
        f"(default: {DEFAULT_BATCH_SIZES['cpu']} on CPU, {DEFAULT_BATCH_SIZES['cuda']} on GPU)"
        in text
    )
    assert f"(default: {DEFAULT_THRESHOLD}, the paper's)" in text
    assert "(default: OUT/clipseg-log.jsonl)" in text


@pytest.mark.parametrize(
    ("option", "value"),
    [("--progress", "foo"), ("--batch-size", "abc"), ("--engine", "spark"), ("--ref-mode", "x")],
)
def test_bad_option_values_are_one_line_usage_errors(tmp_path, option, value):
    """Typer's own checks too: one `clipseg: error:` line naming the option, exit 2, nothing
    written (before, `--progress foo` was silently taken as `lines`)."""
    image = _photo(tmp_path / "x.png")
    out = tmp_path / "out"
    completed = subprocess.run(
        [sys.executable, "-m", "clipseg_cli", "segment", str(image), "-p", "a dog", option,
         value, "--out", str(out)],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert completed.returncode == ExitCode.USAGE, completed.stderr
    lines = completed.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("clipseg: error: "), completed.stderr
    assert option in lines[0] and "clipseg segment --help" in lines[0]
    assert not out.exists()


def test_models_prints_a_header_row_for_scripts():
    result = runner.invoke(app, ["models"])
    assert result.exit_code == 0
    lines = result.output.splitlines()
    header = ["name", "hub id", "cached", "onnx graph", "cpu backend", "original file"]
    assert lines[0].split("\t") == [*header, "description"]
    assert all(len(line.split("\t")) == 7 for line in lines)
    assert [line.split("\t")[0] for line in lines[1:]] == list(MODEL_SPECS)


def test_demo_note_only_follows_runs_that_processed_inputs(tmp_path):
    scene = Path(__file__).resolve().parent.parent / "sample_data" / "shapes-90000034.png"
    args = ["segment", str(scene), "-p", "a red circle", "--model", "demo", "--device", "cpu"]
    args += ["--progress", "none", "--out", str(tmp_path / "out")]
    first = runner.invoke(app, args)
    assert first.exit_code == 0, first.output
    assert "note: the demo model only knows coloured shapes" in first.output
    again = runner.invoke(app, args)  # everything is skipped: the note would be noise
    assert again.exit_code == 0 and "1 skipped" in again.output
    assert "note:" not in again.output
