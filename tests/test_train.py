"""``clipseg train``: manifest parsing, the validation split, learning, checkpoints and export.

Everything runs on tiny models and tiny synthetic scenes, a few steps each.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from clipseg_cli.commands.app import app
from clipseg_cli.commands.console import ExitCode
from clipseg_cli.io.files import sha256_file
from clipseg_cli.model.tokenizer import ClipTokenizer
from clipseg_cli.specs import MODEL_SPECS
from clipseg_cli.train import (
    CHECKPOINT_JSON,
    ManifestError,
    TrainConfig,
    TrainError,
    load_checkpoint,
    read_manifest,
    resume_fingerprint,
    split_examples,
    train,
    trainable_parameters,
)
from clipseg_cli.train.data import load_mask
from clipseg_cli.train.synthetic import write_training_set
from clipseg_cli.weights import load_weights

runner = CliRunner()


@pytest.fixture(scope="module")
def shapes(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Eight small synthetic scenes (64x64) with masks, negatives and manifest.jsonl."""
    directory = tmp_path_factory.mktemp("shapes")
    return write_training_set(directory, 8, first_seed=500, size=64)


@pytest.fixture(scope="module")
def small_model_dir(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny random model at a 64x64 input size (a 4x4 token grid): training steps take
    milliseconds instead of seconds, and every code path stays the same."""
    directory = tmp_path_factory.mktemp("small-model")
    for name in ("config.json", "model.safetensors"):
        (directory / name).write_bytes((tiny_model_dir / name).read_bytes())
    config = json.loads((directory / "config.json").read_text())
    config["clipseg_input_size"] = 64
    (directory / "config.json").write_text(json.dumps(config))
    return directory


def _config(manifest: Path, out: Path, model_dir: Path, **overrides) -> TrainConfig:
    values = {
        "manifest": manifest,
        "out_dir": out,
        "model": str(model_dir),
        "epochs": 1,
        "batch_size": 4,
        "lr": 1e-3,
        "warmup_steps": 0,
        "val_fraction": 0.25,
        "device": "cpu",
    }
    return TrainConfig(**{**values, **overrides})


def _write_manifest(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n")
    return path


# -- the manifest ---------------------------------------------------------------------------------


def test_manifest_paths_are_relative_to_its_folder_and_null_masks_are_negatives(shapes: Path):
    examples = read_manifest(shapes)
    assert all(e.image.is_file() and e.image.parent == shapes.parent / "images" for e in examples)
    negatives = [e for e in examples if e.mask is None]
    positives = [e for e in examples if e.mask is not None]
    assert len(negatives) == 8 and positives
    assert all(e.mask.is_file() for e in positives)
    # The synthetic writer names classes; the prompt is a phrasing of it.
    assert all(e.label in e.prompt for e in examples)
    assert [e.line for e in examples] == list(range(1, len(examples) + 1))


def test_class_defaults_to_the_prompt_and_comments_are_skipped(tmp_path: Path, shapes: Path):
    image = shapes.parent / "images" / "000500.png"
    manifest = _write_manifest(
        tmp_path / "m.jsonl",
        ["# a comment", "", json.dumps({"image": str(image), "mask": None, "prompt": " a dog "})],
    )
    (example,) = read_manifest(manifest)
    assert (example.prompt, example.label, example.line, example.split) == (
        "a dog",
        "a dog",
        3,
        None,
    )


def test_missing_file_is_one_line_naming_the_line_and_file(tmp_path: Path, shapes: Path):
    image = shapes.parent / "images" / "000500.png"
    manifest = _write_manifest(
        tmp_path / "m.jsonl",
        [
            json.dumps({"image": str(image), "mask": None, "prompt": "a dog"}),
            json.dumps({"image": "nowhere/x.png", "mask": None, "prompt": "a dog"}),
        ],
    )
    with pytest.raises(ManifestError) as info:
        read_manifest(manifest)
    message = str(info.value)
    assert message.startswith(f"{manifest}:2: image ") and "nowhere/x.png: no such file" in message
    assert "\n" not in message


def test_bad_json_line_names_its_line_number(tmp_path: Path, shapes: Path):
    image = shapes.parent / "images" / "000500.png"
    good = json.dumps({"image": str(image), "mask": None, "prompt": "a dog"})
    manifest = _write_manifest(tmp_path / "m.jsonl", [good, good, '{"image": "a.png", oops}'])
    with pytest.raises(ManifestError, match=r"m\.jsonl:3: not valid JSON \(") as info:
        read_manifest(manifest)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize(
    ("row", "reason"),
    [
        ({"image": "a.png", "prompt": "x"}, "missing 'mask'"),
        ({"image": "a.png", "mask": None, "prompt": ""}, "'prompt' must be a non-empty string"),
        ({"image": "a.png", "mask": None, "prompt": "x", "split": "test"}, "'split' must be"),
        ([1, 2], "expected a JSON object, got list"),
    ],
)
def test_malformed_rows_are_refused(tmp_path: Path, row, reason: str):
    manifest = _write_manifest(tmp_path / "m.jsonl", [json.dumps(row)])
    with pytest.raises(ManifestError, match=rf"m\.jsonl:1: {reason}"):
        read_manifest(manifest, check_files=False)


def test_missing_or_empty_manifest(tmp_path: Path):
    with pytest.raises(ManifestError, match=r"nope\.jsonl: no such file"):
        read_manifest(tmp_path / "nope.jsonl")
    with pytest.raises(ManifestError, match=r"empty\.jsonl: no examples"):
        read_manifest(_write_manifest(tmp_path / "empty.jsonl", ["# nothing"]))


# -- masks ----------------------------------------------------------------------------------------


def test_training_masks_mean_what_every_mask_file_means(tmp_path: Path):
    """Training reads masks with clipseg_cli.io.masks.read_mask, like eval and --ref-mask."""
    truth = np.zeros((6, 5), bool)
    truth[1:4, 2:4] = True
    grey = truth.astype(np.uint8) * 255
    files = {
        "binary-0-255.png": Image.fromarray(grey),
        "labels-0-1.png": Image.fromarray(truth.astype(np.uint8)),
        "deep-16-bit.png": Image.fromarray(truth.astype(np.uint16) * 65535),
        "one-bit.png": Image.fromarray(truth),
        "grey-rgb.png": Image.fromarray(np.repeat(grey[:, :, None], 3, axis=2)),
    }
    for name, image in files.items():
        image.save(tmp_path / name)
        assert np.array_equal(load_mask(tmp_path / name, (6, 5)), truth), name
    # Soft values: foreground above half scale, which for 8-bit masks is >= 128 as before.
    Image.fromarray(np.array([[0, 127, 128, 255]], np.uint8)).save(tmp_path / "soft.png")
    assert load_mask(tmp_path / "soft.png").tolist() == [[False, False, True, True]]


def test_a_mask_of_another_size_than_its_image_is_refused(tmp_path: Path):
    Image.fromarray(np.zeros((6, 5), np.uint8)).save(tmp_path / "m.png")
    with pytest.raises(ManifestError) as info:
        load_mask(tmp_path / "m.png", (4, 4))
    assert str(info.value) == f"{tmp_path / 'm.png'}: mask is 5x6 but its image is 4x4"


@pytest.mark.parametrize(
    ("kind", "reason"),
    [
        ("colour", "RGB image with coloured pixels: not a mask (save greyscale)"),
        ("transparent", "RGBA image with transparency: not a mask (save greyscale)"),
    ],
)
def test_a_colour_or_transparent_manifest_mask_is_one_line_naming_the_file(
    tmp_path: Path, shapes: Path, small_model_dir: Path, kind: str, reason: str
):
    rows = [json.loads(line) for line in shapes.read_text().splitlines()]
    for row in rows:
        row["image"] = str(shapes.parent / row["image"])
        if row["mask"] is not None:
            row["mask"] = str(shapes.parent / row["mask"])
    target = next(row for row in rows if row["mask"] is not None)
    foreground = np.asarray(Image.open(target["mask"])) > 0
    bad = tmp_path / f"{kind}.png"
    if kind == "colour":  # the object in red on black
        pixels = np.zeros((*foreground.shape, 3), np.uint8)
        pixels[foreground, 0] = 255
        Image.fromarray(pixels).save(bad)
    else:  # white, the background transparent
        pixels = np.full((*foreground.shape, 4), 255, np.uint8)
        pixels[~foreground, 3] = 0
        Image.fromarray(pixels, "RGBA").save(bad)
    target["mask"] = str(bad)
    manifest = _write_manifest(tmp_path / "m.jsonl", [json.dumps(row) for row in rows])
    with pytest.raises(ManifestError) as info:
        train(_config(manifest, tmp_path / "out", small_model_dir, val_fraction=0.0))
    assert str(info.value) == f"{bad}: {reason}"
    result = runner.invoke(
        app,
        [
            "train", str(manifest), "--model", str(small_model_dir), "--out",
            str(tmp_path / "o"), "--epochs", "1", "--val-fraction", "0", "--device", "cpu",
            "--progress", "none",
        ],
    )  # fmt: skip
    assert result.exit_code == ExitCode.USAGE
    assert result.output.strip().splitlines() == [f"clipseg: error: {bad}: {reason}"]
    assert not (tmp_path / "o" / "model.safetensors").exists()


# -- the validation split -------------------------------------------------------------------------


def test_val_split_is_seeded_per_image_and_independent_of_line_order(shapes: Path):
    examples = read_manifest(shapes)
    train_a, val_a = split_examples(examples, 0.25, seed=3)
    train_b, val_b = split_examples(list(reversed(examples)), 0.25, seed=3)
    assert {e.image for e in val_a} == {e.image for e in val_b}
    assert len({e.image for e in val_a}) == 2  # 25% of 8 images
    # Every example of an image lands on the same side.
    assert not {e.image for e in train_a} & {e.image for e in val_a}
    assert len(train_a) + len(val_a) == len(examples) == len(train_b) + len(val_b)
    others = {frozenset(e.image for e in split_examples(examples, 0.25, s)[1]) for s in range(8)}
    assert len(others) > 1  # the seed matters


def test_explicit_splits_are_honoured(tmp_path: Path, shapes: Path):
    images = sorted((shapes.parent / "images").glob("*.png"))
    lines = [
        json.dumps({"image": str(path), "mask": None, "prompt": "x", "split": "val"})
        for path in images[:2]
    ] + [json.dumps({"image": str(path), "mask": None, "prompt": "x"}) for path in images[2:]]
    examples = read_manifest(_write_manifest(tmp_path / "m.jsonl", lines))
    train_part, val_part = split_examples(examples, 0.0, seed=0)
    assert {e.image for e in val_part} == set(images[:2])
    assert {e.image for e in train_part} == set(images[2:])


# -- training -------------------------------------------------------------------------------------


def test_loss_decreases_on_a_tiny_task(tmp_path: Path, shapes: Path, small_model_dir: Path):
    config = _config(
        shapes, tmp_path / "out", small_model_dir, epochs=60, batch_size=8, val_fraction=0.0
    )
    result = train(config)
    losses = [stats.train_loss for stats in result.history]
    assert len(losses) == 60 and result.val_images == 0
    assert sum(losses[-4:]) / 4 < 0.5 * sum(losses[:4]) / 4, losses


def test_decoder_only_fine_tuning_leaves_clip_bit_identical_and_export_reloads(
    tmp_path: Path, shapes: Path, small_model_dir: Path
):
    before, _ = load_weights(str(small_model_dir))
    events = []
    result = train(_config(shapes, tmp_path / "out", small_model_dir), on_progress=events.append)
    trained = result.model
    for name, tensor in before.backbone.state_dict().items():
        assert torch.equal(tensor, trained.backbone.state_dict()[name]), name
    assert any(
        not torch.equal(tensor, trained.decoder.state_dict()[name])
        for name, tensor in before.decoder.state_dict().items()
    )
    # Progress: steps, then one epoch report with the validation IoU.
    assert [e.kind for e in events if e.kind != "validate"] == ["step", "step", "epoch"]
    assert events[-1].stats.val_iou is not None and 0.0 <= events[-1].stats.val_iou <= 1.0

    reloaded, info = load_weights(str(tmp_path / "out"))
    assert info.layout == "transformers"
    pixels = torch.randn(2, 3, 352, 352, generator=torch.Generator().manual_seed(0))
    conditionals = torch.randn(3, trained.arch.embed_dim, generator=torch.Generator())
    with torch.inference_mode():
        assert torch.equal(reloaded(pixels, conditionals), trained(pixels, conditionals))
    record = json.loads((tmp_path / "out" / "training.json").read_text())
    assert record["history"][0]["val_iou"] == result.history[0].val_iou


def test_trainable_parameters_respect_the_backbone_switch(small_model_dir: Path):
    model, _ = load_weights(str(small_model_dir))
    decoder_only = trainable_parameters(model, train_backbone=False)
    assert sum(p.numel() for p in decoder_only) == sum(
        p.numel() for p in model.decoder.parameters()
    )
    everything = trainable_parameters(model, train_backbone=True)
    assert len(everything) == len(list(model.parameters()))


class _StopError(Exception):
    """Raised from the progress callback to simulate an interrupted run."""


def test_resume_continues_from_the_saved_epoch_with_identical_state(
    tmp_path: Path, shapes: Path, small_model_dir: Path
):
    common = {"epochs": 3, "image_prompt_fraction": 0.5, "hflip": True}
    straight = train(
        _config(shapes, tmp_path / "a", small_model_dir, checkpoint_dir=tmp_path / "ca", **common)
    )

    def stop_after_first_epoch(progress) -> None:
        if progress.kind == "epoch" and progress.epoch == 1:
            raise _StopError

    interrupted = _config(
        shapes, tmp_path / "b", small_model_dir, checkpoint_dir=tmp_path / "cb", **common
    )
    with pytest.raises(_StopError):
        train(interrupted, on_progress=stop_after_first_epoch)
    meta = json.loads((tmp_path / "cb" / CHECKPOINT_JSON).read_text())
    assert meta["epoch"] == 1 and meta["global_step"] == 2

    # The saved optimizer state is the one the run had: restoring it into a fresh optimizer
    # reproduces the moments exactly.
    model, _ = load_weights(str(small_model_dir))
    params = trainable_parameters(model, train_backbone=False)
    optimizer = torch.optim.AdamW(params, lr=1e-3)
    epoch, step, history = load_checkpoint(
        tmp_path / "cb", model, optimizer, _fingerprint_of(interrupted)
    )
    assert (epoch, step, len(history)) == (1, 2, 1)
    assert all(len(optimizer.state[p]) == 3 for p in params)  # step, exp_avg, exp_avg_sq

    events = []
    resumed = train(replace_config(interrupted, resume=True), on_progress=events.append)
    assert resumed.resumed_from_epoch == 1
    assert {e.epoch for e in events} == {2, 3}
    assert [s.epoch for s in resumed.history] == [1, 2, 3]
    assert [s.train_loss for s in resumed.history] == [s.train_loss for s in straight.history]
    for name, tensor in straight.model.state_dict().items():
        assert torch.equal(tensor, resumed.model.state_dict()[name]), name


def _fingerprint_of(config: TrainConfig) -> dict:
    return resume_fingerprint(config, sha256_file(config.manifest))


def replace_config(config: TrainConfig, **changes) -> TrainConfig:
    from dataclasses import replace

    return replace(config, **changes)


def test_checkpoint_guards(tmp_path: Path, shapes: Path, small_model_dir: Path):
    config = _config(shapes, tmp_path / "out", small_model_dir, checkpoint_dir=tmp_path / "c")
    with pytest.raises(TrainError, match=r"no checkpoint\.json to resume from"):
        train(replace_config(config, resume=True))
    train(config)
    with pytest.raises(TrainError, match="already holds a checkpoint; pass --resume"):
        train(config)
    with pytest.raises(TrainError, match=r"different settings \(lr\)"):
        train(replace_config(config, resume=True, lr=5e-4, epochs=2))
    # Checkpoints hold tensors in safetensors and the rest in JSON: no pickles.
    files = sorted(p.name for p in (tmp_path / "c").iterdir())
    assert files == ["checkpoint.json", "epoch-0001.safetensors"]


def test_options_are_validated(tmp_path: Path, shapes: Path, small_model_dir: Path):
    config = _config(shapes, tmp_path / "out", small_model_dir)
    for changes, message in [
        ({"from_scratch": "tiny"}, "--model and --from-scratch exclude each other"),
        ({"val_fraction": 1.0}, "--val-fraction must be in"),
        ({"resume": True}, "--resume needs --checkpoint-dir"),
        ({"model": None, "from_scratch": "huge"}, "unknown architecture 'huge'"),
        ({"token_class_weight": 1.0}, "--token-class-weight trains the vision tower"),
    ]:
        with pytest.raises(TrainError, match=message):
            train(replace_config(config, **changes))


def test_token_classifier_labels_tokens_mostly_covered_by_one_mask():
    from types import SimpleNamespace

    from clipseg_cli.train import TokenClassifier

    classifier = TokenClassifier(width=3, classes=["a", "b"])
    with torch.no_grad():
        classifier.head.weight.copy_(torch.eye(2, 3) * 10)
        classifier.head.bias.zero_()
    target = torch.zeros(3, 8, 8)
    target[0, :4, :4] = 1.0  # token 0: class "a"
    target[1, :4, 4:] = 0.4  # token 1: not covered enough: ignored
    target[2, 4:, :] = 1.0  # tokens 2, 3: a negative example's target is never used
    batch = SimpleNamespace(
        targets=[target], positive=[[True, True, False]], labels=[["a", "b", "b"]]
    )
    features = torch.zeros(1, 5, 3)  # class token + 2x2 tokens
    features[0, 1] = torch.tensor([1.0, 0.0, 0.0])  # token 0 looks like "a": low loss
    assert classifier.loss(features, batch, patch=4).item() < 1e-3
    features[0, 1] = torch.tensor([0.0, 1.0, 0.0])  # now like "b": high loss
    assert classifier.loss(features, batch, patch=4).item() > 5


def test_prompts_are_cut_after_their_end_of_text_token_without_changing_embeddings(
    tiny_model_dir: Path,
):
    model, _ = load_weights(str(tiny_model_dir))
    prompts = ["a dog", "a picture of a red circle"]
    short = ClipTokenizer(77)(prompts, trim=True)  # as training tokenizes
    assert short.shape == (2, 8)  # start of text, 6 words, end of text
    full = torch.nn.functional.pad(short, (0, 77 - short.shape[1]))
    with torch.inference_mode():
        torch.testing.assert_close(model.encode_text(short), model.encode_text(full))


# -- the command line -----------------------------------------------------------------------------


def test_cli_trains_from_scratch_with_image_prompts(tmp_path: Path, shapes: Path):
    out = tmp_path / "model"
    result = runner.invoke(
        app,
        [
            "train", str(shapes), "--from-scratch", "tiny", "--out", str(out), "--epochs", "1",
            "--batch-size", "8", "--val-fraction", "0.25", "--image-prompt-fraction", "1",
            "--align-weight", "0.1", "--token-class-weight", "1", "--save-dtype", "fp16",
            "--device", "cpu",
            "--progress", "lines",
        ],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "epoch 1/1" in result.output and "(image prompts)" in result.output
    model, info = load_weights(str(out))
    assert info.variant == "demo"  # the tiny architecture is the demo model's
    assert model.arch == MODEL_SPECS["demo"].architecture
    header = json.loads((out / "model.safetensors").read_bytes()[8:].split(b"}}", 1)[0] + b"}}")
    assert {v["dtype"] for k, v in header.items() if k != "__metadata__"} == {"F16"}


def test_cli_progress_bar_spans_several_epochs(tmp_path: Path, shapes: Path, small_model_dir: Path):
    result = runner.invoke(
        app,
        [
            "train", str(shapes), "--model", str(small_model_dir), "--out", str(tmp_path / "m"),
            "--epochs", "2", "--batch-size", "4", "--device", "cpu", "--progress", "bar",
        ],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "epoch 2/2, loss" in result.output and "Traceback" not in result.output


def test_cli_reports_manifest_errors_in_one_line(tmp_path: Path):
    manifest = _write_manifest(tmp_path / "m.jsonl", ["{not json"])
    result = runner.invoke(app, ["train", str(manifest), "--out", str(tmp_path / "o")])
    assert result.exit_code == ExitCode.USAGE
    lines = result.output.strip().splitlines()
    assert lines == [f"clipseg: error: {manifest}:1: not valid JSON (Expecting property name "
                     "enclosed in double quotes)"]  # fmt: skip


def test_cli_synthetic_writes_a_training_set(tmp_path: Path):
    result = runner.invoke(app, ["synthetic", str(tmp_path / "s"), "--count", "2", "--size", "64"])
    assert result.exit_code == 0, result.output
    assert len(read_manifest(tmp_path / "s" / "manifest.jsonl")) >= 4
