"""Image prompts, mixing, negatives, saved prompts and `clipseg matte`, end to end."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from hf_processor import reference_pixels
from PIL import Image
from typer.testing import CliRunner

from clipseg_cli.commands.app import app
from clipseg_cli.commands.console import ExitCode
from clipseg_cli.io.conditionals import load_conditionals
from clipseg_cli.ops.prompts import engineer_reference

runner = CliRunner()


def _image(path: Path, size=(64, 48), seed=0, mode="RGB") -> Path:
    rng = np.random.default_rng(seed)
    data = (rng.random((size[1], size[0], 3)) * 255).astype(np.uint8)
    image = Image.fromarray(data)
    if mode == "RGBA":
        alpha = np.zeros((size[1], size[0]), np.uint8)
        alpha[10:30, 20:50] = 255
        image = Image.fromarray(np.dstack([data, alpha]))
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)
    return path


def _run(command: str, *args: str, model: Path):
    return runner.invoke(
        app, [command, *args, "--model", str(model), "--device", "cpu", "--progress", "none"]
    )


def _saved(tmp_path: Path, model: Path, *args: str) -> tuple[torch.Tensor, list[str], dict]:
    image = _image(tmp_path / "query.png", seed=9)
    prompt_file = tmp_path / f"prompts-{len(list(tmp_path.glob('prompts-*')))}.safetensors"
    result = _run(
        "segment", str(image), *args, "--save-prompt", str(prompt_file),
        "--out", str(tmp_path / f"out-{prompt_file.stem}"), model=model,
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    vectors, labels, metadata = load_conditionals(prompt_file)
    return torch.from_numpy(vectors), labels, metadata


def test_several_references_are_averaged_into_one_conditional(
    tiny_model_dir, tiny_segmenter, tmp_path
):
    refs = [_image(tmp_path / f"ref{i}.png", seed=i) for i in range(3)]
    vectors, labels, _ = _saved(
        tmp_path, tiny_model_dir, *[a for r in refs for a in ("--ref", str(r))]
    )
    assert vectors.shape == (1, tiny_segmenter.model.arch.embed_dim)
    assert labels == ["ref:" + ",".join(str(r) for r in refs)]
    raw = [np.asarray(Image.open(r).convert("RGB")) for r in refs]
    expected = tiny_segmenter.embed_images(raw).mean(dim=0)
    assert torch.allclose(vectors[0], expected, atol=1e-5)


def test_rgba_reference_is_engineered_around_its_alpha(tiny_model_dir, tiny_segmenter, tmp_path):
    ref = _image(tmp_path / "cutout.png", mode="RGBA")
    vectors, _, _ = _saved(tmp_path, tiny_model_dir, "--ref", str(ref))
    rgba = np.asarray(Image.open(ref))
    # decode composites transparent pixels over white; the object pixels are what matter
    rgb = rgba[..., :3].copy()
    rgb[rgba[..., 3] == 0] = 255
    engineered = engineer_reference(rgb, rgba[..., 3] > 0, size=None)
    expected = tiny_segmenter.embed_images([engineered])[0]
    raw = tiny_segmenter.embed_images([rgb])[0]
    assert torch.allclose(vectors[0], expected, atol=1e-5)
    assert not torch.allclose(vectors[0], raw, atol=1e-3)
    raw_vectors, _, _ = _saved(tmp_path, tiny_model_dir, "--ref", str(ref), "--ref-mode", "raw")
    assert torch.allclose(raw_vectors[0], raw, atol=1e-5)


def test_ref_mask_file_selects_the_object(tiny_model_dir, tiny_segmenter, tmp_path):
    ref = _image(tmp_path / "ref.png", seed=3)
    mask = np.zeros((48, 64), np.uint8)
    mask[5:20, 8:30] = 255
    Image.fromarray(mask).save(tmp_path / "mask.png")
    vectors, _, _ = _saved(
        tmp_path, tiny_model_dir, "--ref", str(ref), "--ref-mask", str(tmp_path / "mask.png")
    )
    engineered = engineer_reference(np.asarray(Image.open(ref)), mask > 127, size=None)
    assert torch.allclose(vectors[0], tiny_segmenter.embed_images([engineered])[0], atol=1e-5)


def test_raw_square_reference_equals_the_reference_clip_image_embedding(
    tiny_model_dir, tiny_reference, tmp_path
):
    ref = _image(tmp_path / "square.png", size=(352, 352), seed=4)
    vectors, _, _ = _saved(tmp_path, tiny_model_dir, "--ref", str(ref), "--ref-mode", "raw")
    with torch.no_grad():
        pixels = reference_pixels(Image.open(ref))
        expected = tiny_reference.clip.get_image_features(pixels).pooler_output
    assert (vectors[0] - expected[0]).abs().max().item() <= 1e-4


def test_mix_is_the_documented_weighted_sum(tiny_model_dir, tiny_segmenter, tmp_path):
    ref = _image(tmp_path / "ref.png", seed=5)
    vectors, labels, _ = _saved(
        tmp_path, tiny_model_dir, "-p", "a dog", "-p", "a cat", "--ref", str(ref), "--mix", "0.3"
    )
    text = tiny_segmenter.embed_texts(["a dog", "a cat"])
    image = tiny_segmenter.embed_images([np.asarray(Image.open(ref))])[0]
    assert vectors.shape[0] == 2 and "mix 0.3" in labels[0]
    assert torch.allclose(vectors, 0.3 * text + 0.7 * image, atol=1e-5)


def test_negative_prompt_suppresses_by_the_documented_rule(tiny_model_dir, tmp_path):
    image = _image(tmp_path / "x.png", seed=6)

    def soft(out: Path, *args: str) -> dict[str, np.ndarray]:
        result = _run(
            "segment", str(image), *args, "--save", "soft", "--soft-bits", "16",
            "--out", str(out), model=tiny_model_dir,
        )  # fmt: skip
        assert result.exit_code == 0, result.output
        return {p.name: np.asarray(Image.open(p)) / 65535.0 for p in out.glob("*.soft.png")}

    plain = soft(tmp_path / "plain", "-p", "a dog", "-p", "a cat", "-p", "grass")
    suppressed = soft(tmp_path / "neg", "-p", "a dog", "--negative", "a cat", "--negative", "grass")
    assert list(suppressed) == ["x.png.a-dog.soft.png"]  # negatives write nothing
    dog, cat, grass = (plain[f"x.png.{s}.soft.png"] for s in ("a-dog", "a-cat", "grass"))
    expected = dog * (1 - np.maximum(cat, grass))
    assert np.abs(suppressed["x.png.a-dog.soft.png"] - expected).max() < 3 / 65535


def test_saved_prompts_reproduce_the_run_and_refuse_another_model(tiny_model_dir, tmp_path):
    image = _image(tmp_path / "x.png", seed=7)
    prompts = tmp_path / "nightly.safetensors"
    first = _run(
        "segment", str(image), "-p", "a dog", "--negative", "a cat", "--save", "soft",
        "--save-prompt", str(prompts), "--out", str(tmp_path / "a"), model=tiny_model_dir,
    )  # fmt: skip
    assert first.exit_code == 0, first.output
    again = _run(
        "segment", str(image), "--prompt-embedding", str(prompts), "--save", "soft",
        "--out", str(tmp_path / "b"), model=tiny_model_dir,
    )  # fmt: skip
    assert again.exit_code == 0, again.output
    a = (tmp_path / "a" / "x.png.a-dog.soft.png").read_bytes()
    assert (tmp_path / "b" / "x.png.a-dog.soft.png").read_bytes() == a

    from factories import save_random_hf_checkpoint

    other = save_random_hf_checkpoint(tmp_path / "other", size="tiny", seed=99)
    refused = _run(
        "segment", str(image), "--prompt-embedding", str(prompts), "--out",
        str(tmp_path / "c"), model=other,
    )  # fmt: skip
    assert refused.exit_code == ExitCode.USAGE
    assert "other weights" in refused.output
    assert "export" not in refused.output and "measuring" not in refused.output  # at once


def test_matte_writes_full_resolution_kinds(tiny_model_dir, tmp_path):
    image = _image(tmp_path / "in" / "photo.png", size=(160, 120), seed=8)
    out = tmp_path / "out"
    result = _run(
        "matte", str(image), "-p", "a dog", "--save", "matte,cutout,composite",
        "--background", "#00ff00", "--matte-bits", "16", "--out", str(out), model=tiny_model_dir,
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    (row,) = [json.loads(line) for line in (out / "clipseg-log.jsonl").read_text().splitlines()]
    assert [o["kind"] for o in row["outputs"]] == ["matte", "cutout", "composite"]
    matte = Image.open(out / "photo.png.a-dog.matte.png")
    assert matte.size == (160, 120) and matte.mode == "I;16"
    alpha = np.asarray(matte) / 65535.0
    cutout = np.asarray(Image.open(out / "photo.png.a-dog.cutout.png"))
    assert cutout.shape == (120, 160, 4)
    assert np.abs(cutout[..., 3] / 255.0 - alpha).max() <= 1 / 255 + 1e-6
    composite = np.asarray(Image.open(out / "photo.png.a-dog.composite.png")).astype(float)
    rgb = np.asarray(Image.open(image)).astype(float)
    green = np.array([0.0, 255.0, 0.0])
    expected = rgb * alpha[..., None] + green * (1 - alpha[..., None])
    assert np.abs(composite - expected).max() <= 1.0


def test_matte_and_segment_share_one_refinement(tiny_model_dir, tmp_path):
    """matte's alpha is segment's soft output, refined the same way (none: the plain
    probability; guided by default)."""
    image = _image(tmp_path / "x.png", size=(96, 64), seed=10)
    for refine in ("none", "guided"):
        _run("matte", str(image), "-p", "a dog", "--refine", refine, "--matte-bits", "16",
             "--out", str(tmp_path / f"m-{refine}"), model=tiny_model_dir)  # fmt: skip
        _run("segment", str(image), "-p", "a dog", "--save", "soft", "--soft-bits", "16",
             "--refine", refine, "--out", str(tmp_path / f"s-{refine}"),
             model=tiny_model_dir)  # fmt: skip
        matte = np.asarray(Image.open(tmp_path / f"m-{refine}" / "x.png.a-dog.matte.png"))
        soft = np.asarray(Image.open(tmp_path / f"s-{refine}" / "x.png.a-dog.soft.png"))
        np.testing.assert_array_equal(matte, soft)
    plain = np.asarray(Image.open(tmp_path / "s-none" / "x.png.a-dog.soft.png"))
    refined = np.asarray(Image.open(tmp_path / "s-guided" / "x.png.a-dog.soft.png"))
    assert not np.array_equal(plain, refined)


def test_threshold_from_a_calibration_file(tiny_model_dir, tmp_path):
    image = _image(tmp_path / "x.png", seed=11)
    threshold_file = tmp_path / "threshold.json"
    threshold_file.write_text(json.dumps({"threshold": 0.55}))
    out = tmp_path / "out"
    result = _run("segment", str(image), "-p", "x", "--threshold-from", str(threshold_file),
                  "--out", str(out), model=tiny_model_dir)  # fmt: skip
    assert result.exit_code == 0, result.output
    summary = json.loads((out / "clipseg-summary.json").read_text())
    assert summary["config"]["threshold"] == 0.55
    both = _run("segment", str(image), "-p", "x", "--threshold", "0.4", "--threshold-from",
                str(threshold_file), model=tiny_model_dir)  # fmt: skip
    assert both.exit_code == ExitCode.USAGE


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--mix", "0.5", "-p", "x"], "--mix needs both"),
        (["--ref-mode", "engineered", "--ref", "REF"], "needs an object mask"),
        (["--prompt-embedding", "nope.safetensors"], "nope.safetensors"),
        (["-p", "x", "--save", "matte"], "unknown kind for segment"),
    ],
)
def test_prompt_usage_errors(tiny_model_dir, tmp_path, args, message):
    image = _image(tmp_path / "x.png")
    ref = _image(tmp_path / "ref.png", seed=1)
    args = [str(ref) if a == "REF" else a for a in args]
    result = _run("segment", str(image), *args, "--out", str(tmp_path / "o"), model=tiny_model_dir)
    assert result.exit_code == ExitCode.USAGE, result.output
    assert message in result.output
