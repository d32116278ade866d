"""The CPU gate: the model runs alone on the cores; decode and write tasks share them."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from clipseg_cli.commands.app import app
from clipseg_cli.run import items
from clipseg_cli.run.engines.cpu_gate import NO_GATE, CpuGate, gate_for

WAIT = 5.0  # seconds; generous so that a loaded CI machine does not fail the test


def _start(target) -> threading.Thread:
    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    return thread


def test_exclusive_waits_for_shared_holders_and_blocks_new_ones():
    gate = CpuGate()
    release_shared = threading.Event()
    shared_in = threading.Event()
    exclusive_in = threading.Event()
    late_shared_in = threading.Event()

    def hold_shared():
        with gate.shared():
            shared_in.set()
            release_shared.wait(WAIT)

    def take_exclusive():
        with gate.exclusive():
            exclusive_in.set()
            time.sleep(0.2)

    def late_shared():
        with gate.shared():
            late_shared_in.set()

    _start(hold_shared)
    assert shared_in.wait(WAIT)
    exclusive = _start(take_exclusive)
    time.sleep(0.1)
    assert not exclusive_in.is_set()  # a shared holder is still working
    late = _start(late_shared)
    time.sleep(0.1)
    assert not late_shared_in.is_set()  # the waiting exclusive request goes first
    release_shared.set()
    assert exclusive_in.wait(WAIT)
    assert not late_shared_in.is_set()  # still inside the exclusive section
    exclusive.join(WAIT)
    late.join(WAIT)
    assert late_shared_in.is_set()


def test_shared_holders_run_together():
    gate = CpuGate()
    barrier = threading.Barrier(2, timeout=WAIT)

    def work():
        with gate.shared():
            barrier.wait()  # raises BrokenBarrierError if the two could not overlap

    threads = [_start(work) for _ in range(2)]
    for thread in threads:
        thread.join(WAIT)
    assert not barrier.broken


def test_only_cpu_runs_are_gated():
    assert isinstance(gate_for("cpu"), CpuGate) and gate_for("cpu") is not NO_GATE
    assert gate_for("cuda") is NO_GATE and gate_for("mps") is NO_GATE


def test_the_model_never_overlaps_decoding_or_writing(tiny_model_dir, tmp_path, monkeypatch):
    """In a real CPU run, every model call happens while no decode or write task runs."""
    folder = tmp_path / "photos"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(9):
        pixels = (rng.random((60 + i, 80, 3)) * 255).astype(np.uint8)
        Image.fromarray(pixels).save(folder / f"{i}.png")

    lock = threading.Lock()
    active = {"helpers": 0, "model": 0}
    overlaps: list[str] = []
    calls = {"helpers": 0, "model": 0}

    def tracked(kind: str, function):
        def run(*args, **kwargs):
            with lock:
                active[kind] += 1
                calls[kind] += 1
                if active["model"] and active["helpers"]:
                    overlaps.append(kind)
            try:
                time.sleep(0.01)  # widen the window in which an overlap would show
                return function(*args, **kwargs)
            finally:
                with lock:
                    active[kind] -= 1

        return run

    monkeypatch.setattr(items, "prepare_item", tracked("helpers", items.prepare_item))
    monkeypatch.setattr(items, "write_or_fail", tracked("helpers", items.write_or_fail))
    monkeypatch.setattr(items, "predict_batch", tracked("model", items.predict_batch))
    result = CliRunner().invoke(
        app,
        ["segment", str(folder), "--model", str(tiny_model_dir), "--prompt", "a dog",
         "--out", str(tmp_path / "out"), "--device", "cpu", "--progress", "none",
         "--batch-size", "2"],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert calls["model"] == 5 and calls["helpers"] == 18
    assert overlaps == []


def test_gate_passes_results_and_exceptions_through():
    gate = CpuGate()
    assert gate.sharing(lambda x, y=1: x + y)(2, y=3) == 5

    def broken():
        raise OSError("disk gone")

    with pytest.raises(OSError, match="disk gone"):
        gate.sharing(broken)()
    with gate.exclusive():  # the failed task released its share
        pass
