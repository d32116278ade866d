"""The measured choice of a CPU backend (``clipseg_cli.backends.tuning``): which candidates a
request has, how one is chosen, the cache of the choice (hit, corrupt, truncated, read-only,
concurrent, keyed by what changes it), the precision a folder keeps on resume, and what the
run summary says. Real runtimes on the tiny model: ``test_backends.py`` (parity) and the
CLI tests below."""

from __future__ import annotations

import errno
import json
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from clipseg_cli.backends import machine, tuning
from clipseg_cli.backends.tuning import Candidate, Measurement
from clipseg_cli.commands.app import app
from clipseg_cli.commands.console import ExitCode
from clipseg_cli.errors import ConfigMismatchError
from clipseg_cli.run import backend
from clipseg_cli.specs import ArchitectureSpec

runner = CliRunner()
SHA = "ab" * 32
AMX = frozenset({"avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_int8", "amx_tile"})
AVX2 = frozenset({"avx2", "fma"})


@pytest.fixture
def arch() -> ArchitectureSpec:
    return ArchitectureSpec(embed_dim=8, input_size=16)


class FakeBackend:
    """Logits = the reference's, plus ``noise`` of its spread; each call takes ``delay`` s."""

    def __init__(self, delay: float, noise: float) -> None:
        self.delay, self.noise = delay, noise

    def logits(self, pixels: np.ndarray, conditionals: np.ndarray) -> np.ndarray:
        time.sleep(self.delay)
        grey = pixels.mean(axis=3).astype(np.float32) / 255.0 - 0.5
        out = grey[:, None] * conditionals[None, :, :1, None] / 10.0
        rng = np.random.default_rng(int(pixels.sum()) % 1000)
        return (out + self.noise * rng.standard_normal(out.shape)).astype(np.float32)


class Opens:
    """``opens(candidate)`` for :func:`tuning.tuned`, counting its calls."""

    def __init__(self, specs: dict[str, tuple[float, float]]) -> None:
        self.specs = specs
        self.calls: list[str] = []
        self.lock = threading.Lock()

    def __call__(self, candidate: Candidate) -> FakeBackend:
        with self.lock:
            self.calls.append(candidate.label)
        if candidate.label not in self.specs:
            raise RuntimeError(f"{candidate.label} cannot compile this graph")
        return FakeBackend(*self.specs[candidate.label])


FAST_BF16 = {
    "onnx fp32": (0.03, 0.0),
    "openvino fp32": (0.02, 0.0),
    "openvino bf16": (0.0, 0.0),
}


def test_candidates_follow_the_cpu_and_the_request(monkeypatch):
    monkeypatch.setattr(machine, "cpu_flags", lambda: AMX)
    labels = [c.label for c in tuning.candidates()]
    assert labels == ["onnx fp32", "openvino fp32", "openvino bf16"]  # int8 only when asked
    assert [c.label for c in tuning.candidates("int8")] == ["onnx int8", "openvino int8"]
    assert [c.label for c in tuning.candidates("auto", "openvino")] == [
        "openvino fp32",
        "openvino bf16",
    ]
    assert [c.label for c in tuning.candidates("fp32")] == ["onnx fp32", "openvino fp32"]
    monkeypatch.setattr(machine, "cpu_flags", lambda: AVX2)  # no native bf16: never a candidate
    assert [c.label for c in tuning.candidates()] == ["onnx fp32", "openvino fp32"]
    assert tuning.candidates("bf16") == []
    monkeypatch.setattr(tuning, "runtime_available", lambda runtime: runtime == "onnx")
    assert [c.label for c in tuning.candidates()] == ["onnx fp32"]


def test_agreement_is_judged_at_the_decision_threshold_or_the_median():
    rng = np.random.default_rng(0)
    reference = rng.standard_normal((2, 1, 32, 32)).astype(np.float32)
    assert tuning.agreement(reference, reference) == (1.0, 0.0)
    flipped = reference.copy()
    flipped[0, 0, :8] = -flipped[0, 0, :8]  # an eighth of the pixels change side
    iou, error = tuning.agreement(flipped, reference)
    assert 0.7 < iou < 0.95 and error > 0.05
    # All logits positive (untrained weights can do that): judged at the median, not at 0,
    # so a candidate that moves half of the pixels across it does not agree.
    shifted = reference + 10.0
    order = np.argsort(shifted, axis=None)
    worse = shifted.copy().reshape(-1)
    worse[order[len(order) // 4 : len(order) // 2]] += 2.0  # lower half's top crosses median
    iou, _ = tuning.agreement(worse.reshape(shifted.shape), shifted)
    assert iou < 0.9


def test_choose_takes_the_fastest_that_agrees_or_for_named_precisions_is_close():
    exact = Measurement("onnx", "fp32", 0.30, 1.0, 0.0)
    close = Measurement("openvino", "bf16", 0.09, 0.993, 0.01)
    off = Measurement("openvino", "bf16", 0.08, 0.95, 0.02)
    broken = Measurement("openvino", "fp32", None, error="cannot compile")
    assert tuning.choose([exact, close, broken], "auto") is close
    nearly = Measurement("onnx", "fp32", 0.10, 1.0, 0.0)  # bf16 not 1.2x faster: exact wins
    assert tuning.choose([nearly, close], "auto") is nearly
    assert tuning.choose([nearly, close], "bf16") is close
    assert tuning.choose([exact, off], "auto") is exact  # IoU 0.95: not the same masks
    assert tuning.choose([off], "bf16") is off  # asked for bf16: 0.95 is what bf16 gives
    assert tuning.choose([Measurement("onnx", "int8", 0.1, 0.8, 0.2)], "int8") is None
    assert tuning.choose([broken], "auto") is None
    noisy = Measurement("openvino", "bf16", 0.05, 0.999, 0.08)  # logits too far off
    assert not noisy.agrees


def test_choose_keeps_the_reference_runtime_unless_another_is_clearly_faster():
    """Runtimes within noise of each other: the same choice on every measurement."""
    onnx = Measurement("onnx", "fp32", 0.100, 1.0, 0.0)
    openvino_close = Measurement("openvino", "fp32", 0.095, 1.0, 1e-6)
    openvino_fast = Measurement("openvino", "fp32", 0.080, 1.0, 1e-6)
    assert tuning.choose([onnx, openvino_close], "auto") is onnx
    assert tuning.choose([onnx, openvino_close], "fp32") is onnx
    assert tuning.choose([onnx, openvino_fast], "auto") is openvino_fast
    onnx_int8 = Measurement("onnx", "int8", 0.050, 0.97, 0.02)
    openvino_int8 = Measurement("openvino", "int8", 0.048, 0.98, 0.01)
    assert tuning.choose([onnx_int8, openvino_int8], "int8") is onnx_int8
    # A reduced precision is weighed against the chosen exact one, as before.
    bf16 = Measurement("openvino", "bf16", 0.060, 0.995, 0.01)
    assert tuning.choose([onnx, openvino_close, bf16], "auto") is bf16


def test_tuned_measures_once_then_reads_the_cache(cache_dir, arch, monkeypatch):
    monkeypatch.setattr(machine, "cpu_flags", lambda: AMX)
    opens = Opens(FAST_BF16)
    messages: list[str] = []
    first = tuning.tuned(SHA, arch, opens, label="tiny", on_progress=messages.append)
    assert first.source == "measured" and first.record.chosen == Candidate("openvino", "bf16")
    assert opens.calls == ["onnx fp32", "openvino fp32", "openvino bf16"]
    assert any("measuring which CPU backend runs tiny" in m for m in messages)
    assert any(m.startswith("chose openvino bf16") for m in messages)
    rows = {m.candidate.label: m for m in first.record.measurements}
    assert rows["onnx fp32"].seconds_per_image > rows["openvino bf16"].seconds_per_image
    assert all(m.agrees for m in rows.values())
    second = tuning.tuned(SHA, arch, opens, label="tiny")
    assert second.source == "cache" and second.record.chosen == first.record.chosen
    assert len(opens.calls) == 3  # nothing opened again
    summary = second.record.summary("cache")
    assert summary["choice"] == "openvino bf16" and len(summary["candidates"]) == 3
    forced = tuning.tuned(SHA, arch, opens, label="tiny", force=True)
    assert forced.source == "measured" and len(opens.calls) == 6


def test_a_candidate_that_disagrees_or_fails_is_not_chosen(cache_dir, arch, monkeypatch):
    monkeypatch.setattr(machine, "cpu_flags", lambda: AMX)
    specs = {"onnx fp32": (0.02, 0.0), "openvino bf16": (0.0, 0.5)}  # ov fp32 cannot compile
    found = tuning.tuned(SHA, arch, Opens(specs))
    assert found.record.chosen == Candidate("onnx", "fp32")
    rows = {m.candidate.label: m for m in found.record.measurements}
    assert rows["openvino fp32"].error == "openvino fp32 cannot compile this graph"
    assert rows["openvino bf16"].iou < tuning.MIN_IOU and not rows["openvino bf16"].agrees


@pytest.mark.parametrize("damage", ["corrupt", "truncated", "edited"])
def test_a_damaged_record_is_measured_again_and_said(cache_dir, arch, monkeypatch, damage):
    monkeypatch.setattr(machine, "cpu_flags", lambda: AMX)
    opens = Opens(FAST_BF16)
    first = tuning.tuned(SHA, arch, opens)
    (path,) = (cache_dir / "tuning").glob("*.json")
    text = path.read_text()
    if damage == "corrupt":
        path.write_bytes(b"\x00garbage")
    elif damage == "truncated":
        path.write_text(text[: len(text) // 2])
    else:  # a plausible record whose contents no longer match its checksum
        stored = json.loads(text)
        stored["body"]["chosen"] = {"runtime": "onnx", "precision": "int8"}
        path.write_text(json.dumps(stored))
    messages: list[str] = []
    again = tuning.tuned(SHA, arch, opens, on_progress=messages.append)
    assert again.source == "measured" and again.record.chosen == first.record.chosen
    assert any("is damaged" in m and "measuring again" in m for m in again.messages)
    assert tuning.read_record(first.record.key)[0] is not None  # rewritten intact


def test_a_read_only_cache_measures_with_one_warning(cache_dir, arch, monkeypatch):
    monkeypatch.setattr(machine, "cpu_flags", lambda: AMX)

    def refuse(*args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(tuning, "write_json_atomic", refuse)
    found = tuning.tuned(SHA, arch, Opens(FAST_BF16))
    assert found.record.chosen == Candidate("openvino", "bf16")
    (warning,) = [m for m in found.messages if "not writable" in m]
    assert "\n" not in warning and "this run only" in warning


def test_concurrent_first_runs_measure_once(cache_dir, arch, monkeypatch):
    monkeypatch.setattr(machine, "cpu_flags", lambda: AMX)
    opens = Opens(FAST_BF16)
    results = []
    threads = [
        threading.Thread(target=lambda: results.append(tuning.tuned(SHA, arch, opens)))
        for _ in range(3)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(r.source for r in results) == ["cache", "cache", "measured"]
    assert len(opens.calls) == 3  # the candidates of one measurement
    assert len({r.record.chosen for r in results}) == 1


def test_the_key_changes_with_the_cpu_the_runtimes_the_weights_and_the_request(arch, monkeypatch):
    monkeypatch.setattr(machine, "cpu_flags", lambda: AMX)
    key, fields = tuning.tuning_key(SHA, arch, "auto", "auto")
    assert fields["machine"]["flags"] == sorted(AMX & machine.MATRIX_FLAGS)
    assert tuning.tuning_key(SHA, arch, "auto", "auto")[0] == key
    assert tuning.tuning_key("cd" * 32, arch, "auto", "auto")[0] != key
    assert tuning.tuning_key(SHA, arch, "fp32", "auto")[0] != key
    assert tuning.tuning_key(SHA, arch, "auto", "openvino")[0] != key
    monkeypatch.setattr(tuning, "runtime_versions", lambda: {"onnxruntime": "9", "openvino": "9"})
    assert tuning.tuning_key(SHA, arch, "auto", "auto")[0] != key
    monkeypatch.undo()
    monkeypatch.setattr(machine, "cpu_flags", lambda: AVX2)
    assert tuning.tuning_key(SHA, arch, "auto", "auto")[0] != key


def test_a_resume_keeps_the_folders_precision_or_explains_why_it_cannot(monkeypatch):
    auto = backend.BackendChoice("auto", "cpu", "auto")
    assert backend.kept_choice(auto, None) == auto  # a new folder: measured
    assert backend.kept_choice(auto, "fp32") == backend.BackendChoice("auto", "cpu", "fp32")
    monkeypatch.setattr(machine, "cpu_flags", lambda: AMX)
    assert backend.kept_choice(auto, "bf16") == backend.BackendChoice("auto", "cpu", "bf16")
    monkeypatch.setattr(machine, "cpu_flags", lambda: AVX2)
    with pytest.raises(ConfigMismatchError, match=r"made in bf16.*--precision fp32"):
        backend.kept_choice(auto, "bf16")
    named = backend.BackendChoice("onnx", "cpu", "fp32")
    assert backend.kept_choice(named, "bf16") == named  # named precisions are fingerprinted


def test_a_resume_keeps_the_folders_runtime_where_it_is_installed(monkeypatch):
    """Both fp32 runtimes are about as fast; a resume must not measure again and switch."""
    auto = backend.BackendChoice("auto", "cpu", "auto")
    assert backend.kept_choice(auto, "fp32", "openvino") == backend.BackendChoice(
        "openvino", "cpu", "fp32"
    )
    assert backend.kept_choice(auto, "fp32", "onnx") == backend.BackendChoice("onnx", "cpu", "fp32")
    monkeypatch.setattr(machine, "cpu_flags", lambda: AMX)
    assert backend.kept_choice(auto, "bf16", "openvino") == backend.BackendChoice(
        "openvino", "cpu", "bf16"
    )
    assert backend.kept_choice(auto, "fp32", "torch") == backend.BackendChoice(
        "auto", "cpu", "fp32"
    )
    named = backend.BackendChoice("onnx", "cpu", "auto")
    assert backend.kept_choice(named, "fp32", "openvino").name == "onnx"  # asked for by name
    int8 = backend.BackendChoice("auto", "cpu", "int8")  # --precision int8, --backend auto
    assert backend.kept_choice(int8, "int8", "openvino") == backend.BackendChoice(
        "openvino", "cpu", "int8"
    )
    assert backend.kept_choice(int8, "int8", None) == int8  # measured
    assert backend.kept_choice(int8, "fp32", "openvino") == int8  # another precision: measured
    monkeypatch.setattr(machine, "runtime_available", lambda name: name != "openvino")
    assert backend.kept_choice(auto, "fp32", "openvino") == backend.BackendChoice(
        "onnx", "cpu", "fp32"
    )


def _segment(images: Path, out: Path, model: Path, *extra: str, env: dict):
    args = ["segment", str(images), "-p", "a dog", "--out", str(out), "--model", str(model)]
    return runner.invoke(app, [*args, "--progress", "none", "--min-area", "0", *extra], env=env)


@pytest.fixture(scope="module")
def shared_cache(tmp_path_factory) -> Path:
    """One cache for the CLI tests below: the tiny model's graphs are exported once; each
    test starts without a tuning record (see :func:`_fresh_tuning`)."""
    return tmp_path_factory.mktemp("tuning-cache")


def _fresh_tuning(cache: Path) -> dict:
    import shutil

    shutil.rmtree(cache / "tuning", ignore_errors=True)
    return {"CLIPSEG_CACHE": str(cache)}


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("tuning-images")
    rng = np.random.default_rng(3)
    for i in range(2):
        Image.fromarray((rng.random((40, 56, 3)) * 255).astype(np.uint8)).save(root / f"{i}.png")
    return root


def test_the_summary_says_how_the_backend_was_chosen(
    images, tiny_model_dir, tmp_path, shared_cache
):
    env = _fresh_tuning(shared_cache)
    first = _segment(images, tmp_path / "a", tiny_model_dir, env=env)
    assert first.exit_code == 0, first.output
    assert "measuring which CPU backend runs" in first.output
    summary = json.loads((tmp_path / "a" / "clipseg-summary.json").read_text())
    choice = summary["backend_choice"]
    assert choice["source"] == "measured"
    assert choice["choice"] == f"{summary['backend']} {summary['precision']}"
    labels = [row["runtime"] + " " + row["precision"] for row in choice["candidates"]]
    assert labels[:2] == ["onnx fp32", "openvino fp32"]
    second = _segment(images, tmp_path / "b", tiny_model_dir, env=env)
    assert second.exit_code == 0 and "measuring" not in second.output
    again = json.loads((tmp_path / "b" / "clipseg-summary.json").read_text())
    assert again["backend_choice"]["source"] == "cache"
    assert again["backend_choice"]["choice"] == choice["choice"]
    named = _segment(images, tmp_path / "c", tiny_model_dir, "--backend", "onnx", env=env)
    assert named.exit_code == 0
    summary = json.loads((tmp_path / "c" / "clipseg-summary.json").read_text())
    assert summary["backend_choice"] is None and summary["backend"] == "onnx"


def test_a_resumed_folder_is_finished_by_the_runtime_that_began_it(
    images, tiny_model_dir, tmp_path, monkeypatch, shared_cache
):
    """The first run measured OpenVINO fp32 fastest; when the folder is resumed, a new
    measurement would pick ONNX Runtime (the fp32 runtimes are within noise of each other):
    the folder is finished by OpenVINO, whose masks it began with."""
    env = _fresh_tuning(shared_cache)
    monkeypatch.setattr(machine, "cpu_flags", lambda: AVX2)

    def prefer(runtime: str):
        def choose(measurements, precision):
            return next(m for m in measurements if m.runtime == runtime and m.precision == "fp32")

        return choose

    monkeypatch.setattr(tuning, "choose", prefer("openvino"))
    out = tmp_path / "out"
    made = _segment(images, out, tiny_model_dir, env=env)
    assert made.exit_code == 0, made.output
    assert json.loads((out / "clipseg-summary.json").read_text())["backend"] == "openvino"
    new_image = images / "3.png"
    new_image.write_bytes((images / "1.png").read_bytes())
    env = _fresh_tuning(shared_cache)
    monkeypatch.setattr(tuning, "choose", prefer("onnx"))
    try:
        resumed = _segment(images, out, tiny_model_dir, env=env)
    finally:
        new_image.unlink()
    assert resumed.exit_code == 0, resumed.output
    assert "1 ok, 0 failed, 2 skipped" in resumed.output
    assert "measuring" not in resumed.output
    summary = json.loads((out / "clipseg-summary.json").read_text())
    assert (summary["backend"], summary["precision"]) == ("openvino", "fp32")
    # A new folder is measured afresh: the resume's runtime came from the folder, not chance.
    fresh = _segment(images, tmp_path / "fresh", tiny_model_dir, env=env)
    assert fresh.exit_code == 0, fresh.output
    fresh_summary = json.loads((tmp_path / "fresh" / "clipseg-summary.json").read_text())
    assert fresh_summary["backend"] == "onnx"


def test_a_folder_made_in_bf16_resumed_without_native_bf16_is_explained(
    images, tiny_model_dir, tmp_path, monkeypatch, shared_cache
):
    """--precision auto chose bf16 on a CPU with native bf16; the folder is resumed where
    there is none: not continued in fp32 silently, not an unexplained mismatch."""
    env = _fresh_tuning(shared_cache)
    monkeypatch.setattr(machine, "cpu_flags", lambda: AMX)
    real_choose = tuning.choose

    def prefer_bf16(measurements, precision):
        bf16 = [m for m in measurements if m.precision == "bf16" and m.seconds_per_image]
        return bf16[0] if bf16 else real_choose(measurements, precision)

    monkeypatch.setattr(tuning, "choose", prefer_bf16)
    out = tmp_path / "out"
    made = _segment(images, out, tiny_model_dir, env=env)
    assert made.exit_code == 0, made.output
    assert json.loads((out / "clipseg-summary.json").read_text())["precision"] == "bf16"
    new_image = images / "2.png"  # something left to do in the folder
    new_image.write_bytes((images / "0.png").read_bytes())
    try:
        monkeypatch.setattr(machine, "cpu_flags", lambda: AVX2)
        resumed = _segment(images, out, tiny_model_dir, env=env)
        assert resumed.exit_code == ExitCode.CONFIG_MISMATCH, resumed.output
        (line,) = resumed.output.strip().splitlines()
        assert "made in bf16" in line and "--precision fp32" in line
        # Where bf16 is native again, the folder goes on in bf16 (and says so).
        monkeypatch.setattr(machine, "cpu_flags", lambda: AMX)
        again = _segment(images, out, tiny_model_dir, env=env)
    finally:
        new_image.unlink()
    assert again.exit_code == 0, again.output
    assert "continuing this --out folder in bf16" in again.output
    assert "1 ok, 0 failed, 2 skipped" in again.output
    assert json.loads((out / "clipseg-summary.json").read_text())["precision"] == "bf16"
