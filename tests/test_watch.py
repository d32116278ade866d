"""``clipseg watch``: complete files only, each once (again when replaced), batched bursts,
nothing lost across kill -9, one writer per --out, polling where no events come; and the
watcher's rules (io.watch.FileArrivals) on their own."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from clipseg_cli.commands.app import app
from clipseg_cli.commands.console import ExitCode
from clipseg_cli.io.files import TEMP_NAME
from clipseg_cli.io.naming import LEDGER_NAME, STATE_DIR
from clipseg_cli.io.watch import FileArrivals
from clipseg_cli.run.config import SegmentConfig
from clipseg_cli.run.pipeline import run_segment
from clipseg_cli.run.watching import Follow

runner = CliRunner()


# -- helpers ----------------------------------------------------------------------------------


def _image_bytes(seed: int, size=(48, 32), fmt: str = "PNG") -> bytes:
    rng = np.random.default_rng(seed)
    pixels = (rng.random((size[1], size[0], 3)) * 255).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format=fmt)
    return buffer.getvalue()


def _write_old(path: Path, data: bytes) -> None:
    """A file that has been there a while (settled long ago)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    past = time.time() - 600
    os.utime(path, (past, past))


def _options(out: Path, model: Path, *extra: str) -> list[str]:
    # Plain probabilities, so different random images give different soft maps to compare.
    return [
        "-p", "a dog", "--save", "mask,soft", "--refine", "none", "--export", "coco",
        "--out", str(out), "--model", str(model), "--device", "cpu", "--progress", "none",
        "--batch-size", "4", *extra,
    ]  # fmt: skip


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "clipseg_cli", *args]


class Watcher:
    """A ``clipseg watch`` process; its stderr goes to a file (a pipe could fill up)."""

    def __init__(self, folder: Path, out: Path, model: Path, *extra: str) -> None:
        self.stderr_path = out.parent / f"{out.name}-watch-{time.monotonic_ns()}.txt"
        self.stderr = self.stderr_path.open("w")
        env = {**os.environ, "HF_HUB_OFFLINE": "1"}
        command = _cli("watch", str(folder), *_options(out, model, *extra))
        self.process = subprocess.Popen(command, env=env, stderr=self.stderr)
        _wait_for(lambda: "clipseg: watching" in self.text(), self, what="the watch to start")

    def text(self) -> str:
        return self.stderr_path.read_text()

    def stop(self, signum: int = signal.SIGINT, timeout: float = 120) -> int:
        self.process.send_signal(signum)
        code = self.process.wait(timeout)
        self.stderr.close()
        return code

    def kill(self) -> None:
        self.process.kill()  # SIGKILL: no handler, no cleanup
        self.process.wait()
        self.stderr.close()


def _wait_for(
    condition: Callable[[], bool], watcher: Watcher | None, what: str, timeout: float = 120
) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        if watcher is not None and watcher.process.poll() is not None:
            pytest.fail(f"the watcher exited ({watcher.process.returncode}): {watcher.text()}")
        time.sleep(0.05)
    pytest.fail(f"timed out waiting for {what}")


def _rows(out: Path) -> list[dict]:
    log = out / "clipseg-log.jsonl"
    return [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []


def _ledger_rows(out: Path) -> list[dict]:
    path = out / STATE_DIR / LEDGER_NAME
    if not path.exists():
        return []
    lines = path.read_text().splitlines()
    return [row for row in map(json.loads, lines) if "key" in row]


def _done(out: Path, status: str = "ok") -> Counter:
    return Counter(row["key"] for row in _rows(out) if row["status"] == status)


def _output_files(out: Path) -> dict[str, bytes]:
    """Every output file (not logs, summary, ledger or exports) -> its bytes."""
    files = {}
    for path in sorted(out.rglob("*")):
        relative = path.relative_to(out).as_posix()
        if path.is_file() and relative.endswith(".png"):
            files[relative] = path.read_bytes()
    return files


def _write_in_chunks(path: Path, data: bytes, chunks: int, pause: float) -> None:
    size = -(-len(data) // chunks)
    with path.open("wb") as handle:
        for start in range(0, len(data), size):
            handle.write(data[start : start + size])
            handle.flush()
            time.sleep(pause)


# -- the watcher end to end ----------------------------------------------------------------------


def _arrivals_scenario(tmp_path: Path, model: Path, burst: int, settle: float, chunks: int):
    """Files arriving every way at once; returns (out, the expected ok counts, summary)."""
    folder, out = tmp_path / "in", tmp_path / "out"
    _write_old(folder / "old" / "a.png", _image_bytes(1))
    _write_old(folder / "old" / "b.png", _image_bytes(2))
    watcher = Watcher(folder, out, model, "--settle", str(settle), "--flush-every", "1")

    # A large PNG written in chunks, each pause shorter than --settle, over about 3 seconds.
    big = _image_bytes(3, size=(640, 480))
    pause = min(3.0 / chunks, settle * 0.6)
    chunked = threading.Thread(
        target=_write_in_chunks, args=(folder / "big.png", big, chunks, pause)
    )
    chunked.start()
    # A burst of files in one go.
    (folder / "burst").mkdir()
    for i in range(burst):
        (folder / "burst" / f"f{i:02d}.png").write_bytes(_image_bytes(100 + i))
    # A JPEG renamed into place from x.jpg.part, and a broken file.
    (folder / "x.jpg.part").write_bytes(_image_bytes(4, fmt="JPEG"))
    (folder / "x.jpg.part").rename(folder / "x.jpg")
    (folder / "broken.jpg").write_bytes(b"\xff\xd8\xff this is not a JPEG")
    chunked.join()

    expected = Counter({"old/a.png": 1, "old/b.png": 1, "big.png": 1, "x.jpg": 1})
    expected.update({f"burst/f{i:02d}.png": 1 for i in range(burst)})
    _wait_for(lambda: _done(out) == expected, watcher, "every file to be done")
    _wait_for(lambda: _done(out, "failed") == {"broken.jpg": 1}, watcher, "the broken row")

    # Replaced after it was done: done again.
    (folder / "burst" / "f00.png").write_bytes(_image_bytes(999, size=(40, 40)))
    expected["burst/f00.png"] = 2
    _wait_for(lambda: _done(out) == expected, watcher, "the replaced file to be redone")
    assert watcher.stop(signal.SIGINT) == ExitCode.INTERRUPTED, watcher.text()
    # With --progress none the terminal still says which file failed and why, once.
    said = [line for line in watcher.text().splitlines() if " failed " in line]
    assert len(said) == 1 and f" failed {folder / 'broken.jpg'}: " in said[0], watcher.text()
    summary = json.loads((out / "clipseg-summary.json").read_text())
    return folder, out, expected, summary, big


def _check_arrivals(folder: Path, out: Path, expected: Counter, summary: dict, big: bytes):
    rows = _rows(out)
    # Exactly once each (twice the replaced one), the broken one a failed row, nothing else.
    assert _done(out) == expected
    assert _done(out, "failed") == {"broken.jpg": 1}
    assert {row["status"] for row in rows} == {"ok", "failed"}
    # No row from a partial file: each recorded size is the file's size when it was complete.
    sizes = {}
    for row in _ledger_rows(out):
        sizes.setdefault(row["key"], []).append(row["size"])
    assert sizes["big.png"] == [len(big)]
    for key, recorded in sizes.items():
        if key != "burst/f00.png":
            assert recorded == [(folder / key).stat().st_size], key
    (big_row,) = [row for row in rows if row["key"] == "big.png"]
    assert (big_row["width"], big_row["height"]) == (640, 480)
    assert not any(".part" in row["key"] for row in rows)
    assert [p for p in out.rglob("*") if TEMP_NAME.match(p.name)] == []
    # The burst was batched; the summary's counts are the run's.
    assert summary["model_batches"]["mean_images"] > 1
    assert summary["interrupted"] is True
    assert summary["counts"]["failed"] == 1
    assert summary["watch"]["events"] == "native"
    # Exports were rebuilt while it ran and at exit: every ok image is in them once.
    coco = json.loads((out / "coco.json").read_text())
    assert sorted(image["file_name"] for image in coco["images"]) == sorted(expected)


def test_watch_takes_each_complete_file_once(tiny_model_dir, tmp_path):
    _check_arrivals(*_arrivals_scenario(tmp_path, tiny_model_dir, burst=12, settle=1, chunks=8))


@pytest.mark.slow
def test_watch_takes_each_complete_file_once_with_the_default_settle(tiny_model_dir, tmp_path):
    _check_arrivals(*_arrivals_scenario(tmp_path, tiny_model_dir, burst=50, settle=2, chunks=6))


def _kill_then_restart(tmp_path: Path, model: Path, burst: int, live_restart: bool):
    folder, out, reference = tmp_path / "in", tmp_path / "out", tmp_path / "reference"
    for i in range(4):
        _write_old(folder / f"old{i}.png", _image_bytes(i))
    watcher = Watcher(folder, out, model, "--settle", "0.5")
    for i in range(burst):
        (folder / "burst" / f"f{i:02d}.png").parent.mkdir(exist_ok=True)
        (folder / "burst" / f"f{i:02d}.png").write_bytes(_image_bytes(100 + i))
    _wait_for(lambda: len(_ledger_rows(out)) >= 8, watcher, "part of the burst")
    watcher.kill()
    assert len(_ledger_rows(out)) < 4 + burst  # killed in the middle of the burst

    if live_restart:
        watcher = Watcher(folder, out, model, "--settle", "0.5")
        (folder / "late.png").write_bytes(_image_bytes(7))
        _wait_for(lambda: len(_done(out)) == 4 + burst + 1, watcher, "the rest")
        assert watcher.stop(signal.SIGTERM) == ExitCode.TERMINATED
    else:
        once = subprocess.run(
            _cli("watch", str(folder), *_options(out, model, "--once")),
            env={**os.environ, "HF_HUB_OFFLINE": "1"},
            capture_output=True,
            text=True,
        )
        assert once.returncode == 0, once.stderr
    plain = runner.invoke(app, ["segment", str(folder), *_options(reference, model)])
    assert plain.exit_code == 0, plain.output
    expected = _output_files(reference)
    assert len(expected) == (4 + burst + live_restart) * 2
    assert _output_files(out) == expected  # byte for byte
    assert json.loads((out / "coco.json").read_text()) == json.loads(
        (reference / "coco.json").read_text()
    )
    # Nothing finished was redone: each input has one ok ledger line.
    assert Counter(row["key"] for row in _ledger_rows(out)).most_common(1)[0][1] == 1


def test_kill_9_mid_burst_then_restart_equals_a_plain_segment(tiny_model_dir, tmp_path):
    _kill_then_restart(tmp_path, tiny_model_dir, burst=16, live_restart=False)


@pytest.mark.slow
def test_kill_9_mid_burst_then_a_live_restart_equals_a_plain_segment(tiny_model_dir, tmp_path):
    _kill_then_restart(tmp_path, tiny_model_dir, burst=40, live_restart=True)


def test_a_second_writer_on_the_same_out_exits_5(tiny_model_dir, tmp_path):
    folder, out = tmp_path / "in", tmp_path / "out"
    _write_old(folder / "a.png", _image_bytes(1))
    watcher = Watcher(folder, out, tiny_model_dir)
    try:
        for command in (["watch", "--once"], ["watch"], ["segment"]):
            args = [command[0], str(folder), *_options(out, tiny_model_dir), *command[1:]]
            result = runner.invoke(app, args)
            assert result.exit_code == ExitCode.LOCKED, (command, result.output)
            assert "another clipseg run is writing to" in result.output
    finally:
        assert watcher.stop(signal.SIGTERM) == ExitCode.TERMINATED


def test_watch_refuses_what_it_cannot_watch(tmp_path):
    image = tmp_path / "a.png"
    image.write_bytes(_image_bytes(1))
    common = ["-p", "a dog", "--out", str(tmp_path / "out"), "--model", "demo"]
    cases = [
        ([str(tmp_path / "nope")], ExitCode.NO_INPUTS, "no such folder"),
        ([str(image)], ExitCode.USAGE, "watch takes folders"),
        ([str(tmp_path), "--engine", "ray"], ExitCode.USAGE, "watch runs on the local engine"),
        ([str(tmp_path), "--settle", "-1"], ExitCode.USAGE, "--settle -1"),
        ([str(tmp_path), "--poll", "0"], ExitCode.USAGE, "--poll 0"),
    ]
    for args, code, message in cases:
        result = runner.invoke(app, ["watch", *args, *common])
        assert result.exit_code == code, (args, result.output)
        assert message in result.output
        assert "Traceback" not in result.output


# -- polling where no events come ------------------------------------------------------------------


def _run_in_thread(config: SegmentConfig, follow: Follow) -> Callable:
    """Start a watching run; returns the function that stops it and gives its summary."""
    stopping = threading.Event()
    result: dict = {}

    def run() -> None:
        result["summary"] = run_segment(config, should_stop=stopping.is_set, follow=follow)

    thread = threading.Thread(target=run)
    thread.start()

    def stop():
        stopping.set()
        thread.join(60)
        return result["summary"]

    return stop


@pytest.mark.parametrize("poll", [None, 0.2])
def test_poll_finds_files_where_no_events_come(poll, tiny_model_dir, tmp_path, monkeypatch):
    """A filesystem that sends no events (NFS, SMB) is forced here: watchfiles' native watcher
    reports nothing. Without --poll nothing arrives; with it, files are found and taken once
    settled, as with events."""
    import watchfiles

    real_watch = watchfiles.watch

    def eventless(*paths, force_polling=False, stop_event=None, **kwargs):
        if force_polling:
            yield from real_watch(*paths, force_polling=True, stop_event=stop_event, **kwargs)
            return
        while not stop_event.is_set():  # listening, but the filesystem never tells
            time.sleep(0.05)
            yield set()

    monkeypatch.setattr(watchfiles, "watch", eventless)
    folder, out = tmp_path / "in", tmp_path / "out"
    folder.mkdir()
    config = SegmentConfig(
        inputs=(str(folder),),
        out_dir=out,
        prompts=("a dog",),
        save=("mask",),
        model=str(tiny_model_dir),
        device="cpu",
    )
    stop = _run_in_thread(config, Follow(settle=0.5, poll=poll))
    _wait_for(lambda: (out / STATE_DIR / LEDGER_NAME).exists(), None, "the run to start")
    time.sleep(1.0)  # the model is loaded and the stream waiting
    (folder / "sub").mkdir()
    (folder / "sub" / "a.png").write_bytes(_image_bytes(1))
    (folder / "b.png.part").write_bytes(_image_bytes(2))
    (folder / "b.png.part").rename(folder / "b.png")
    if poll is None:
        time.sleep(3)
        summary = stop()
        assert summary.ok == 0  # the forced filesystem really sends no events
        return
    _wait_for(lambda: len(_done(out)) == 2, None, "the polled files")
    summary = stop()
    assert _done(out) == {"sub/a.png": 1, "b.png": 1}
    assert summary.interrupted and summary.details["watch"]["events"] == "polling"


# -- the watcher's rules -------------------------------------------------------------------------


def _collect(arrivals: FileArrivals, seconds: float) -> list[tuple[float, str]]:
    start = time.monotonic()
    taken = []
    while time.monotonic() - start < seconds:
        for path in arrivals.wait(0.05):
            taken.append((time.monotonic() - start, path.name))
    return taken


def test_renamed_into_place_is_taken_at_once_and_written_in_place_after_settling(tmp_path):
    with FileArrivals([tmp_path], settle=1.0) as arrivals:
        (tmp_path / "slow.png").write_bytes(b"first part")
        (tmp_path / "x.jpg.part").write_bytes(b"complete")
        time.sleep(0.2)  # the temporary name is seen before the rename
        (tmp_path / "x.jpg.part").rename(tmp_path / "x.jpg")
        (tmp_path / "y.jpg.part").write_bytes(b"complete")  # renamed within one batch
        (tmp_path / "y.jpg.part").rename(tmp_path / "y.jpg")
        taken = _collect(arrivals, 0.6)
        assert sorted(name for _, name in taken) == ["x.jpg", "y.jpg"]
        with (tmp_path / "slow.png").open("ab") as handle:
            handle.write(b" and more")  # still being written: its settle time starts again
        taken = _collect(arrivals, 1.6)
    (when, name), *others = taken
    assert name == "slow.png" and others == []
    assert when > 0.9  # settled: unchanged for a whole second after the last write


def test_a_new_file_is_not_taken_for_a_deleted_one(tmp_path):
    """Another file deleted in the same batch (even one whose inode a new file reuses) or a
    temporary of another name is no rename: the new file is settled."""
    (tmp_path / "gone.png").write_bytes(b"old")
    with FileArrivals([tmp_path], settle=0.8) as arrivals:
        (tmp_path / "gone.png").unlink()
        (tmp_path / "new.png").write_bytes(b"being written")
        (tmp_path / "other.jpg.part").write_bytes(b"x")
        (tmp_path / "other.jpg.part").unlink()
        taken = _collect(arrivals, 0.5)
        assert taken == []
        assert [name for _, name in _collect(arrivals, 1.0)] == ["new.png"]


def test_ignored_names_excluded_folders_and_new_folders(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    with FileArrivals([tmp_path], settle=0.3, exclude=[out]) as arrivals:
        for name in (".hidden.png", "a.png.tmp", "b.jpg.crdownload", "~c.png", "Thumbs.db"):
            (tmp_path / name).write_bytes(b"x")
        (tmp_path / "@eaDir").mkdir()
        (tmp_path / "@eaDir" / "thumb.png").write_bytes(b"x")
        (out / "mask.png").write_bytes(b"x")
        # A folder with a file already in it when its watch is added.
        (tmp_path / "new" / "deep").mkdir(parents=True)
        (tmp_path / "new" / "deep" / "d.png").write_bytes(b"x")
        taken = _collect(arrivals, 1.2)
    assert [name for _, name in taken] == ["d.png"]


def test_a_file_is_taken_again_only_when_it_changes(tmp_path):
    with FileArrivals([tmp_path], settle=0.3) as arrivals:
        (tmp_path / "a.png").write_bytes(b"one")
        assert [name for _, name in _collect(arrivals, 0.8)] == ["a.png"]
        assert _collect(arrivals, 0.5) == []  # once per completion
        (tmp_path / "a.png").write_bytes(b"two, longer")
        assert [name for _, name in _collect(arrivals, 0.8)] == ["a.png"]
