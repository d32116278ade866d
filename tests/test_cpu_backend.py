"""``--backend auto|torch|onnx|openvino`` and ``--precision int8`` through the CLI: the same
masks from every backend, warm runs that never import torch, resume across backends, and the
one-line errors and warnings. (The backends themselves, their cache and parity to 1e-4 for every
variant: ``test_backends.py``.)"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from clipseg_cli.backends import machine
from clipseg_cli.commands.app import app
from clipseg_cli.commands.console import ExitCode
from clipseg_cli.run import backend
from clipseg_cli.run.config import SegmentConfig

runner = CliRunner()
PROMPTS = ("-p", "a dog", "-p", "a cat", "--negative", "a car")


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> Path:
    """Non-square photos of several sizes, and a reference image for an image prompt."""
    root = tmp_path_factory.mktemp("backend-photos")
    rng = np.random.default_rng(15)
    for i, size in enumerate([(64, 40), (37, 90), (120, 80)]):
        data = (rng.random((size[1], size[0], 3)) * 255).astype(np.uint8)
        data[: size[1] // 2, : size[0] // 3] = (220, 40, 40)
        Image.fromarray(data).save(root / f"img{i}.png")
    return root


def _segment(photos: Path, out: Path, model: Path, *extra: str, env: dict | None = None):
    args = ["segment", str(photos), *PROMPTS, "--out", str(out), "--model", str(model)]
    args += ["--progress", "none", "--save", "mask,logits", "--min-area", "0", *extra]
    return runner.invoke(app, args, env=env)


def _masks(out: Path) -> dict[str, np.ndarray]:
    return {p.name: np.asarray(Image.open(p)) > 0 for p in sorted(out.glob("*.mask.png"))}


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    union = (a | b).sum()
    return 1.0 if union == 0 else float((a & b).sum() / union)


def test_every_fp32_backend_gives_the_same_masks_and_logits(photos, tiny_model_dir, tmp_path):
    """ONNX Runtime and OpenVINO in fp32 against torch: non-square photos, text prompts and a
    negative, to 1e-4 of the logits' magnitude."""
    outs = {}
    for name in ("onnx", "openvino", "torch"):
        outs[name] = tmp_path / name
        result = _segment(
            photos, outs[name], tiny_model_dir, "--backend", name, "--precision", "fp32"
        )
        assert result.exit_code == 0, result.output
        summary = json.loads((outs[name] / "clipseg-summary.json").read_text())
        assert summary["backend"] == name and summary["config"]["backend"] == name
    torch = _masks(outs["torch"])
    for runtime in ("onnx", "openvino"):
        masks = _masks(outs[runtime])
        assert len(masks) == 6 and masks.keys() == torch.keys()
        for name in masks:
            assert _iou(masks[name], torch[name]) >= 0.999, (runtime, name)
        for path in sorted(outs["torch"].glob("*.logits.npy")):
            expected = np.load(path)
            got = np.load(outs[runtime] / path.name)
            assert np.abs(got - expected).max() <= 1e-4 * np.abs(expected).max(), path.name


def _config(**options) -> SegmentConfig:
    return SegmentConfig(inputs=("x",), out_dir=Path("out"), prompts=("a",), **options)


def test_auto_on_the_cpu_is_left_to_measurement_and_bf16_needs_native_bf16(monkeypatch):
    monkeypatch.setattr(machine, "cpu_flags", lambda: frozenset({"avx512f", "amx_bf16"}))
    assert backend.choose_backend(_config(device="cpu")) == backend.BackendChoice(
        "auto", "cpu", "auto"
    )
    assert not backend.choose_backend(_config(device="cpu")).settled
    assert backend.choose_backend(_config(device="cpu", precision="bf16")) == (
        backend.BackendChoice("auto", "cpu", "bf16")
    )
    assert backend.choose_backend(_config(precision="int8")) == backend.BackendChoice(
        "auto", "cpu", "int8"
    )
    # Named runtimes with nothing to measure are settled at once.
    assert backend.choose_backend(_config(device="cpu", backend="onnx")).settled
    assert backend.choose_backend(_config(device="cpu", precision="fp32", backend="openvino"))
    monkeypatch.setattr(machine, "cpu_flags", lambda: frozenset({"avx2", "fma"}))
    assert backend.choose_backend(_config(device="cpu", precision="bf16")).name == "torch"
    with pytest.raises(ValueError, match="needs a CPU with native bf16"):
        backend.choose_backend(_config(device="cpu", precision="bf16", backend="openvino"))


def test_bf16_on_a_cpu_without_native_bf16_says_it_is_emulated(monkeypatch):
    config = _config(device="cpu", precision="bf16", backend="torch")
    monkeypatch.setattr(machine, "cpu_flags", lambda: frozenset({"avx2", "fma", "avx512f"}))
    (note,) = backend.choose_backend(config).notes
    assert "emulates" in note and "slower than fp32" in note
    monkeypatch.setattr(machine, "cpu_flags", lambda: frozenset({"avx512f", "avx512_bf16"}))
    assert backend.choose_backend(config).notes == ()
    monkeypatch.setattr(machine, "cpu_flags", lambda: None)  # flags unknown: no guess
    assert backend.choose_backend(config).notes == ()


def test_the_bf16_warning_reaches_the_user(photos, tiny_model_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(machine, "cpu_flags", lambda: frozenset({"avx2"}))
    result = _segment(photos, tmp_path / "out", tiny_model_dir, "--precision", "bf16")
    assert result.exit_code == 0, result.output
    warnings = [line for line in result.output.splitlines() if "no native bf16" in line]
    assert len(warnings) == 1 and warnings[0].startswith("clipseg: --precision bf16")


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (("--backend", "banana"), "--backend banana: choose from auto, torch, onnx, openvino"),
        (("--backend", "onnx", "--device", "cuda"), "--backend onnx runs on the CPU"),
        (("--backend", "openvino", "--device", "cuda"), "--backend openvino runs on the CPU"),
        (("--backend", "onnx", "--precision", "bf16"), "--backend onnx runs fp32 or int8"),
        (("--backend", "openvino", "--precision", "fp16"), "--backend openvino runs fp32, bf16"),
        (("--backend", "torch", "--precision", "int8"), "--precision int8 is the quantised graph"),
    ],
)
def test_impossible_backend_options_are_one_line_usage_errors(
    photos, tiny_model_dir, tmp_path, options, message
):
    out = tmp_path / "out"
    result = _segment(photos, out, tiny_model_dir, *options)
    assert result.exit_code == ExitCode.USAGE, result.output
    (line,) = result.output.strip().splitlines()
    assert message in line
    assert not out.exists()


def test_a_run_resumes_on_the_other_backend_but_not_at_another_precision(
    photos, tiny_model_dir, tmp_path
):
    """The backend is recorded, not fingerprinted (same results); the precision is both."""
    out = tmp_path / "out"
    assert _segment(photos, out, tiny_model_dir, "--backend", "onnx").exit_code == 0
    again = _segment(photos, out, tiny_model_dir, "--backend", "torch")
    assert again.exit_code == 0, again.output
    assert "0 ok, 0 failed, 3 skipped" in again.output
    other = _segment(photos, out, tiny_model_dir, "--precision", "int8")
    assert other.exit_code == ExitCode.CONFIG_MISMATCH, other.output
    assert "precision" in other.output


def test_int8_runs_the_quantised_graph_and_keeps_the_masks(tmp_path):
    """On the demo model (trained, so its masks are not empty) and the sample scenes."""
    scenes = Path(__file__).resolve().parent.parent / "sample_data"
    prompts = ("-p", "a red circle", "-p", "a blue square", "-p", "a yellow triangle")
    outs = {}
    for precision in ("fp32", "int8"):
        outs[precision] = tmp_path / precision
        args = ["segment", *map(str, sorted(scenes.glob("shapes-*.png"))), *prompts]
        args += ["--model", "demo", "--precision", precision, "--out", str(outs[precision])]
        result = runner.invoke(app, [*args, "--progress", "none"])
        assert result.exit_code == 0, result.output
    summary = json.loads((outs["int8"] / "clipseg-summary.json").read_text())
    # ONNX Runtime runs the quantised graph; OpenVINO compresses the fp32 graph's weights.
    expected_graph = "int8" if summary["backend"] == "onnx" else "fp32"
    assert summary["dtype"] == "int8" and summary["onnx_graph"]["variant"] == expected_graph
    exact, quantised = _masks(outs["fp32"]), _masks(outs["int8"])
    assert len(exact) == 12 and exact.keys() == quantised.keys()
    pooled_inter = sum(int((exact[n] & quantised[n]).sum()) for n in exact)
    pooled_union = sum(int((exact[n] | quantised[n]).sum()) for n in exact)
    assert pooled_union > 10_000 and pooled_inter / pooled_union >= 0.9


WARM_RUN = """
import sys
from clipseg_cli.commands.app import main
sys.argv = ["clipseg", "segment", *sys.argv[1:]]
try:
    main()
except SystemExit as stop:
    code = stop.code
print("IMPORTED", "torch" in sys.modules, "open_clip" in sys.modules, code)
"""


def test_warm_cpu_runs_import_neither_torch_nor_open_clip_even_with_new_text_prompts(
    photos, tiny_model_dir, tmp_path
):
    """One cold run exports the graphs and embeds its prompts; then a warm run of the same
    prompts, and one with prompts never seen, import neither torch nor open_clip."""
    from clipseg_cli.backends.cache import load_text_embeddings
    from clipseg_cli.segmenter import Segmenter
    from clipseg_cli.weights import identify

    env = {**os.environ, "CLIPSEG_CACHE": str(tmp_path / "cache")}
    base = [str(photos), "--model", str(tiny_model_dir), "--progress", "none"]

    def run(out: str, *prompts: str) -> tuple[str, str]:
        args = [*base, *prompts, "--out", str(tmp_path / out)]
        command = [sys.executable, "-c", WARM_RUN, *args]
        done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr
        return done.stdout.strip().splitlines()[-1], done.stderr

    known = ("-p", "a dog", "--negative", "a car")
    cold, cold_messages = run("cold", *known)
    assert cold == "IMPORTED True True 0"  # the first run exports the graphs and embeds
    assert "exporting the image graph" in cold_messages and "exported" in cold_messages
    assert "exporting the text graph of" in cold_messages, cold_messages
    warm, warm_messages = run("warm", *known)  # a new --out: every image is processed again
    assert warm == "IMPORTED False False 0", warm_messages
    assert "export" not in warm_messages
    cold_masks, warm_masks = _masks(tmp_path / "cold"), _masks(tmp_path / "warm")
    assert len(cold_masks) == 3 and cold_masks.keys() == warm_masks.keys()
    for name, mask in cold_masks.items():
        np.testing.assert_array_equal(warm_masks[name], mask)

    new = ["a never seen prompt", "ünïcode 🐶 and a very long prompt " * 8]
    fresh, fresh_messages = run("new", "-p", "a dog", *(x for p in new for x in ("-p", p)))
    assert fresh == "IMPORTED False False 0", fresh_messages
    assert "export" not in fresh_messages
    assert len(_masks(tmp_path / "new")) == 9
    # What the text graph computed (and cached) is the torch tower's conditionals.
    os.environ["CLIPSEG_CACHE"], before = env["CLIPSEG_CACHE"], os.environ["CLIPSEG_CACHE"]
    try:
        info, _arch = identify(str(tiny_model_dir))
        cached = load_text_embeddings(info.sha256, new)
    finally:
        os.environ["CLIPSEG_CACHE"] = before
    assert cached is not None
    towers = Segmenter.load(str(tiny_model_dir), device="cpu", precision="fp32")
    expected = towers.embed_texts(new).numpy()
    assert np.abs(cached - expected).max() <= 1e-4 * np.abs(expected).max()


def test_a_text_graph_that_cannot_be_built_falls_back_to_the_torch_tower(
    photos, tiny_model_dir, tmp_path, monkeypatch
):
    import clipseg_cli.backends.text as text
    from clipseg_cli.backends.base import BackendError

    def broken(*args, **kwargs):
        raise BackendError("the ONNX export failed (no exporter here)")

    monkeypatch.setattr(text, "open_text_encoder", broken)
    out = tmp_path / "out"
    # The session's cache (its image graph exported once for all tests), with prompts no other
    # test embeds: no cached embedding can spare the text tower.
    args = ["segment", str(photos), "-p", "a dog without a text graph", "-p", "a cat without one"]
    args += ["--out", str(out), "--model", str(tiny_model_dir), "--progress", "none"]
    result = runner.invoke(app, [*args, "--save", "mask", "--min-area", "0"])
    assert result.exit_code == 0, result.output
    assert "no exporter here): text prompts are embedded with torch instead" in result.output
    assert len(_masks(out)) == 6


def test_an_unwritable_cache_warns_once_and_the_run_goes_on(photos, tiny_model_dir, tmp_path):
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("a file where the cache folder should be")
    out = tmp_path / "out"
    # A named backend: nothing to measure, so the run is the cache's story alone (an unwritable
    # tuning cache: tests/test_tuning.py); every OpenVINO compile without a blob cache is slow.
    named = ("--backend", "onnx", "--precision", "fp32")
    result = _segment(photos, out, tiny_model_dir, *named, env={"CLIPSEG_CACHE": str(blocker)})
    assert result.exit_code == 0, result.output
    assert len(_masks(out)) == 6
    warnings = [line for line in result.output.splitlines() if "not writable" in line]
    assert warnings and all(line.startswith("clipseg: ") for line in warnings)
    assert blocker.read_text() == "a file where the cache folder should be"


def test_models_lists_the_cached_graphs(tmp_path):
    env = {"CLIPSEG_CACHE": str(tmp_path / "cache")}
    before = runner.invoke(app, ["models"], env=env)
    rows = {line.split("\t")[0]: line.split("\t") for line in before.output.splitlines()}
    assert rows["name"][3] == "onnx graph" and rows["demo"][3].startswith("not yet known")
    assert rows["name"][4] == "cpu backend" and rows["demo"][4] == "not measured yet"
    photo = tmp_path / "shapes.png"
    Image.fromarray(np.full((64, 64, 3), 200, np.uint8)).save(photo)
    args = ["segment", str(photo), "-p", "a red circle", "--model", "demo", "--progress", "none"]
    assert runner.invoke(app, [*args, "--out", str(tmp_path / "out")], env=env).exit_code == 0
    after = runner.invoke(app, ["models"], env=env)
    rows = {line.split("\t")[0]: line.split("\t") for line in after.output.splitlines()}
    assert rows["demo"][3] == "fp32, text"  # the image graph, and the text tower's
    # The backend measured on this machine, with its speed (clipseg tune measures again).
    assert re.fullmatch(r"(onnx|openvino) (fp32|bf16) \(\d+\.\d{3} s/img\)", rows["demo"][4])


def test_eval_refuses_int8_and_says_how_to_score_it(photos, tmp_path):
    args = ["eval", "--images", str(photos), "--gt", str(photos), "-p", "a dog"]
    result = runner.invoke(app, [*args, "--precision", "int8"])
    assert result.exit_code == ExitCode.USAGE
    (line,) = result.output.strip().splitlines()
    assert "--precision int8" in line and "eval --pred" in line
