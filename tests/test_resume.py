"""Cron-grade runs: resume, config fingerprint, locking, signals, disk full, crash safety."""

from __future__ import annotations

import errno
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from clipseg_cli.commands.app import app
from clipseg_cli.commands.console import ExitCode
from clipseg_cli.io import files, writers
from clipseg_cli.io.naming import LEDGER_NAME, STATE_DIR
from clipseg_cli.run.config import SegmentConfig
from clipseg_cli.run.ledger import RunLock
from clipseg_cli.run.pipeline import run_segment

runner = CliRunner()


def _photos(root: Path, count: int, size=(48, 32)) -> Path:
    rng = np.random.default_rng(count)
    for i in range(count):
        path = root / f"sub{i % 3}" / f"img{i:03d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray((rng.random((size[1], size[0], 3)) * 255).astype(np.uint8)).save(path)
    return root


def _segment(inputs: Path, out: Path, model: Path, *extra: str):
    # Plain probabilities: the random tiny model's are smooth enough that a refined soft map
    # would come out the same for different images, and these tests compare outputs.
    args = ["segment", str(inputs), "-p", "a dog", "--save", "mask,soft", "--refine", "none"]
    args += ["--out", str(out)]
    args += ["--model", str(model), "--device", "cpu", "--progress", "none", *extra]
    return runner.invoke(app, args)


def _rows(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "clipseg-log.jsonl").read_text().splitlines()]


def _last_run(out: Path) -> list[dict]:
    rows = _rows(out)
    return [row for row in rows if row["run"] == rows[-1]["run"]]


def _ledger_rows(out: Path) -> list[dict]:
    lines = (out / STATE_DIR / LEDGER_NAME).read_text().splitlines()
    return [row for row in map(json.loads, lines) if "key" in row]


def _output_files(out: Path) -> dict[str, bytes]:
    """Every output file (not logs, summary or ledger) -> its bytes."""
    files = {}
    for path in sorted(out.rglob("*")):
        relative = path.relative_to(out).as_posix()
        if path.is_file() and not relative.startswith((STATE_DIR, "clipseg-")):
            files[relative] = path.read_bytes()
    return files


def _temporaries(out: Path) -> list[Path]:
    return [p for p in out.rglob("*") if files.TEMP_NAME.match(p.name)]


def test_rerun_processes_only_new_and_changed_inputs(tiny_model_dir, tmp_path):
    inputs, out = _photos(tmp_path / "in", 6), tmp_path / "out"
    assert _segment(inputs, out, tiny_model_dir).exit_code == 0
    before = _output_files(out)

    new = _photos(tmp_path / "extra", 1)
    (new / "sub0" / "img000.png").rename(inputs / "sub1" / "new.png")
    changed = inputs / "sub0" / "img000.png"
    Image.new("RGB", (48, 32), (255, 255, 255)).save(changed)
    result = _segment(inputs, out, tiny_model_dir)
    assert result.exit_code == 0, result.output
    statuses = {row["key"]: row["status"] for row in _last_run(out)}
    assert statuses.pop("sub1/new.png") == "ok"
    assert statuses.pop("sub0/img000.png") == "ok"
    assert set(statuses.values()) == {"skipped"}
    after = _output_files(out)
    assert after["sub0/img000.png.a-dog.soft.png"] != before["sub0/img000.png.a-dog.soft.png"]
    unchanged = [k for k in before if not k.startswith("sub0/img000")]
    assert all(after[k] == before[k] for k in unchanged)


def test_finished_folder_reruns_without_loading_the_model(tiny_model_dir, tmp_path, monkeypatch):
    inputs, out = _photos(tmp_path / "in", 4), tmp_path / "out"
    assert _segment(inputs, out, tiny_model_dir).exit_code == 0
    from clipseg_cli.segmenter import Segmenter

    def refuse(*_args, **_kwargs):
        raise AssertionError("the model must not be loaded when nothing changed")

    monkeypatch.setattr(Segmenter, "load", refuse)
    result = _segment(inputs, out, tiny_model_dir)
    assert result.exit_code == 0, result.output
    assert {row["status"] for row in _last_run(out)} == {"skipped"}


def test_other_configuration_is_refused_unless_overwrite(tiny_model_dir, tmp_path):
    inputs, out = _photos(tmp_path / "in", 2), tmp_path / "out"
    assert _segment(inputs, out, tiny_model_dir).exit_code == 0
    log_before = (out / "clipseg-log.jsonl").read_text()
    refused = _segment(inputs, out, tiny_model_dir, "--threshold", "0.6")
    assert refused.exit_code == ExitCode.CONFIG_MISMATCH
    assert "threshold" in refused.output and "--overwrite" in refused.output
    assert (out / "clipseg-log.jsonl").read_text() == log_before  # nothing written
    redone = _segment(inputs, out, tiny_model_dir, "--threshold", "0.6", "--overwrite")
    assert redone.exit_code == 0
    assert {row["status"] for row in _last_run(out)} == {"ok"}


def test_failed_inputs_are_retried_only_when_asked(tiny_model_dir, tmp_path):
    inputs, out = _photos(tmp_path / "in", 2), tmp_path / "out"
    (inputs / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    assert _segment(inputs, out, tiny_model_dir).exit_code == ExitCode.SOME_FAILED
    again = _segment(inputs, out, tiny_model_dir)
    assert again.exit_code == 0
    assert {r["key"]: r["status"] for r in _last_run(out)}["broken.png"] == "skipped"
    retried = _segment(inputs, out, tiny_model_dir, "--retry-failed")
    assert retried.exit_code == ExitCode.SOME_FAILED
    rows = {r["key"]: r for r in _last_run(out)}
    assert rows["broken.png"]["status"] == "failed"
    assert all(r["status"] == "skipped" for k, r in rows.items() if k != "broken.png")


def test_second_concurrent_run_exits_at_once_and_writes_nothing(tiny_model_dir, tmp_path):
    inputs, out = _photos(tmp_path / "in", 2), tmp_path / "out"
    with RunLock(out):
        result = _segment(inputs, out, tiny_model_dir)
    assert result.exit_code == ExitCode.LOCKED
    assert "another clipseg run" in result.output
    assert sorted(p.name for p in out.rglob("*") if p.is_file()) == ["lock"]
    assert _segment(inputs, out, tiny_model_dir).exit_code == 0  # the lock died with its holder


def test_stale_temporaries_of_a_killed_run_are_removed(tiny_model_dir, tmp_path):
    inputs, out = _photos(tmp_path / "in", 2), tmp_path / "out"
    stale = out / "sub0" / ".img000.png.a-dog.mask.png.tmp-0123abcd"
    stale.parent.mkdir(parents=True)
    stale.write_bytes(b"half a png")
    mine = out / "sub0" / "notes.tmp-keep"  # not one of ours: left alone
    mine.write_text("x")
    assert _segment(inputs, out, tiny_model_dir).exit_code == 0
    assert not stale.exists() and mine.exists()


def test_disk_full_stops_cleanly_and_the_rerun_resumes(tiny_model_dir, tmp_path, monkeypatch):
    inputs, out = _photos(tmp_path / "in", 6), tmp_path / "out"
    reference = tmp_path / "reference"
    assert _segment(inputs, reference, tiny_model_dir).exit_code == 0

    real_write_bytes = writers.write_bytes
    calls = {"n": 0}

    def fill_up(path, data):
        calls["n"] += path.name.endswith(".soft.png")
        if calls["n"] >= 3:
            # What a full disk looks like half-way through writing a temp file.
            files.atomic_write(path, lambda f: _raise_enospc(f))
        real_write_bytes(path, data)

    monkeypatch.setattr(writers, "write_bytes", fill_up)
    result = _segment(inputs, out, tiny_model_dir, "--batch-size", "1")
    assert result.exit_code == ExitCode.DISK_FULL, result.output
    assert "rerun to resume" in result.output and "Traceback" not in result.output
    # The message names the output that could not be written (a full disk's OSError has
    # none): once the disk is full every write fails, and with writes on several threads the
    # first to fail may be another image's mask rather than the third soft matte.
    named = re.search(
        r"cannot write (\S+\.(?:soft|mask|overlay)\.png): No space left", result.output
    )
    assert named is not None, result.output
    assert Path(named[1]).parent.is_relative_to(out) and not Path(named[1]).exists()
    assert _temporaries(out) == []
    monkeypatch.setattr(writers, "write_bytes", real_write_bytes)
    assert _segment(inputs, out, tiny_model_dir).exit_code == 0
    assert _output_files(out) == _output_files(reference)
    assert len({row["key"] for row in _ledger_rows(out)}) == 6


def _raise_enospc(handle):
    handle.write(b"partial")
    raise OSError(errno.ENOSPC, "No space left on device")


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "clipseg_cli", *args]


def _segment_command(inputs: Path, out: Path, model: Path) -> list[str]:
    return _cli(
        "segment", str(inputs), "-p", "a dog", "-p", "a cat", "--save", "mask,soft,overlay",
        "--out", str(out), "--model", str(model), "--device", "cpu", "--batch-size", "2",
    )  # fmt: skip


def _wait_for_rows(out: Path, count: int, process: subprocess.Popen, timeout: float = 120):
    ledger = out / STATE_DIR / LEDGER_NAME
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and process.poll() is None:
        if ledger.exists() and ledger.read_text().count('"key"') >= count:
            return
        time.sleep(0.02)


def test_sigterm_stops_after_the_batch_and_rerun_completes(tiny_model_dir, tmp_path):
    inputs, out = _photos(tmp_path / "in", 24), tmp_path / "out"
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    process = subprocess.Popen(
        _segment_command(inputs, out, tiny_model_dir), env=env, stderr=subprocess.PIPE, text=True
    )
    _wait_for_rows(out, 2, process)
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == ExitCode.TERMINATED, stderr
    summary = json.loads((out / "clipseg-summary.json").read_text())
    assert summary["interrupted"] is True
    assert 0 < summary["counts"]["ok"] < 24
    assert _temporaries(out) == []
    rerun = subprocess.run(
        _segment_command(inputs, out, tiny_model_dir), env=env, capture_output=True, check=False
    )
    assert rerun.returncode == 0
    assert len({row["key"] for row in _ledger_rows(out)}) == 24


def test_kill_9_at_any_point_then_rerun_equals_an_uninterrupted_run(tiny_model_dir, tmp_path):
    inputs = _photos(tmp_path / "in", 30)
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    reference = tmp_path / "reference"
    subprocess.run(_segment_command(inputs, reference, tiny_model_dir), env=env, check=True)
    expected = _output_files(reference)
    assert len(expected) == 30 * 2 * 3

    out = tmp_path / "out"
    for kill_after_rows in (0, 5, 13, 22):
        process = subprocess.Popen(
            _segment_command(inputs, out, tiny_model_dir), env=env, stderr=subprocess.DEVNULL
        )
        _wait_for_rows(out, kill_after_rows, process)
        process.kill()  # SIGKILL: no handler, no cleanup
        process.wait()
    final = subprocess.run(_segment_command(inputs, out, tiny_model_dir), env=env, check=False)
    assert final.returncode == 0
    assert _output_files(out) == expected  # same files, byte-identical
    assert _temporaries(out) == []
    ledger_keys = {row["key"] for row in _ledger_rows(out) if row["status"] == "ok"}
    assert ledger_keys == {f"sub{i % 3}/img{i:03d}.png" for i in range(30)}
    for line in (out / "clipseg-log.jsonl").read_text().splitlines():
        json.loads(line)  # a kill mid-line never leaves a broken log line


@pytest.mark.parametrize("prompt", ["../../x", "/etc/passwd", "a/b\\c", ".."])
def test_prompt_that_looks_like_a_path_stays_inside_out(tiny_model_dir, tmp_path, prompt):
    inputs, out = _photos(tmp_path / "in", 1), tmp_path / "deep" / "out"
    args = ["segment", str(inputs), "-p", prompt, "--out", str(out), "--model", str(tiny_model_dir)]
    result = runner.invoke(app, [*args, "--device", "cpu", "--progress", "none"])
    assert result.exit_code == 0, result.output
    (row,) = _rows(out)
    for output in row["outputs"]:
        assert Path(output["path"]).resolve().is_relative_to(out.resolve())
    written = {p for p in tmp_path.rglob("*") if p.is_file()}
    assert all(p.is_relative_to(out) or p.is_relative_to(inputs) for p in written)


def test_a_stopped_local_run_records_what_finished_and_the_rerun_completes_it(
    tiny_model_dir, tmp_path
):
    """A stop request ends the stream of inputs: the local engine finishes the images it had in
    flight and the pipeline records them, so every output on disk has its ledger line and no
    image is left half done; the rest is untouched, and a rerun does it into the same files an
    uninterrupted run writes."""
    inputs, out, reference = _photos(tmp_path / "in", 20), tmp_path / "out", tmp_path / "ref"
    assert _segment(inputs, reference, tiny_model_dir).exit_code == 0
    recorded: list[int] = []
    config = SegmentConfig(
        inputs=(str(inputs),),
        out_dir=out,
        prompts=("a dog",),
        save=("mask", "soft"),
        refine="none",
        model=str(tiny_model_dir),
        device="cpu",
    )
    summary = run_segment(
        config,
        on_progress=lambda progress: recorded.append(progress.done),
        should_stop=lambda: len(recorded) >= 3,
    )
    assert summary.interrupted and 3 <= summary.ok < 20 and summary.total == 20
    ledger = _ledger_rows(out)
    assert len(ledger) == summary.ok
    recorded_outputs = {Path(path).resolve() for row in ledger for path in row["outputs"]}
    on_disk = {(out / name).resolve() for name in _output_files(out)}
    assert on_disk == recorded_outputs  # nothing in flight was dropped half done
    assert _temporaries(out) == []
    assert _segment(inputs, out, tiny_model_dir).exit_code == 0
    assert sum(row["status"] == "skipped" for row in _last_run(out)) == summary.ok
    assert _output_files(out) == _output_files(reference)
