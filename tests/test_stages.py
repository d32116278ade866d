"""The summary's ``stages``: where a run's time went, and its bottleneck (run.stages, measured by
the local engine)."""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

import numpy as np
import pytest
from PIL import Image

from clipseg_cli.io.sources import InputItem
from clipseg_cli.run.backend import OpenedModel
from clipseg_cli.run.config import SegmentConfig
from clipseg_cli.run.engines import local
from clipseg_cli.run.engines.cpu_gate import CpuGate
from clipseg_cli.run.inputs import Work
from clipseg_cli.run.ledger import InputSignature
from clipseg_cli.run.promptset import Conditional, PromptSet
from clipseg_cli.run.stages import StageTimes
from clipseg_cli.run.steps import Finished, ItemSteps

SIZE = 16  # the stand-in model's input size
SLOW = 0.06  # seconds the slow stage takes per image; the others take next to nothing


class _Backend:
    """A stand-in model: constant logits, after ``delay`` seconds a call."""

    name = "fake"
    input_size = SIZE

    def __init__(self, delay: float, events: list | None = None) -> None:
        self.delay = delay
        self.events = events if events is not None else []

    def logits(self, pixels: np.ndarray, conditionals: np.ndarray) -> np.ndarray:
        time.sleep(self.delay)
        self.events.append(("model", time.perf_counter()))
        return np.zeros((len(pixels), len(conditionals), SIZE, SIZE), np.float32)


@dataclass(frozen=True)
class _Steps(ItemSteps):
    """The run's real steps, with a decode and a write that take ``decode_delay`` and
    ``write_delay`` seconds more."""

    decode_delay: float = 0.0
    write_delay: float = 0.0
    events: list = field(default_factory=list, compare=False)

    def prepare(self, work):
        start = time.perf_counter()
        prepared = super().prepare(work)
        time.sleep(self.decode_delay)
        prepared.decode_seconds = time.perf_counter() - start  # as the decoder measures it
        return prepared

    def write(self, prepared, prediction, cores=contextlib.nullcontext):
        with cores():
            self.events.append(("write", prepared.work.key, time.perf_counter()))
            time.sleep(self.write_delay)
            self.events.append(("written", prepared.work.key, time.perf_counter()))
        written = super().write(prepared, prediction, cores)
        written.row["timings"]["write_s"] += self.write_delay
        return written


def _run(tmp_path: Path, *, decode=0.0, model=0.0, write=0.0, count=6, events=None) -> StageTimes:
    """The stage times of ``count`` tiny images through the local engine on a CPU."""
    works = []
    for index in range(count):
        path = tmp_path / f"{index}.png"
        Image.fromarray(np.full((12, 20, 3), index * 20, np.uint8)).save(path)
        item = InputItem(path, path.name)
        works.append(Work(item, path.name, InputSignature.of(path), PurePosixPath(path.name)))
    config = SegmentConfig(
        inputs=(str(tmp_path),), out_dir=tmp_path / "out", prompts=("a dog",), refine="none"
    )
    prompts = PromptSet(np.ones((1, 8), np.float32), [Conditional("a dog", "a-dog")], [])
    events = events if events is not None else []
    steps = _Steps(config, prompts, (SIZE, SIZE), decode, write, events)

    def opener(threads: int | None = None) -> OpenedModel:
        return OpenedModel(_Backend(model, events), "cpu")

    stages = StageTimes()
    results = list(local.process(iter(works), steps, opener))
    assert [result.row["status"] for result in results] == ["ok"] * count
    for result in results:
        stages.add(result)
    return stages


def test_a_slow_decoder_is_the_bottleneck(tmp_path):
    stages = _run(tmp_path, decode=SLOW)
    report = stages.report()
    assert report["bottleneck"] == "decode"
    assert report["decode"] >= 6 * SLOW
    # Two decoders at a time: the model waited about half the decoding, and for little else.
    assert report["waited_for"]["decode"] >= 2 * SLOW
    assert report["waited_for"]["decode"] > 3 * report["waited_for"]["write"]
    assert report["model_busy"] < 0.5


def test_a_slow_model_is_the_bottleneck(tmp_path):
    stages = _run(tmp_path, model=SLOW)
    report = stages.report()
    assert report["bottleneck"] == "model"
    assert report["model"] == pytest.approx(6 * SLOW, rel=0.3)
    assert report["model"] > 3 * report["wait"]
    assert report["model_busy"] > 0.75


def test_slow_writes_are_the_bottleneck(tmp_path):
    stages = _run(tmp_path, write=SLOW)
    report = stages.report()
    assert report["bottleneck"] == "write"
    assert report["write"] >= 6 * SLOW
    assert report["waited_for"]["write"] >= 2 * SLOW
    assert report["waited_for"]["write"] > 3 * report["waited_for"]["decode"]


def test_writes_start_in_waves_that_fill_the_cores(tmp_path):
    """On a CPU (one image a model call, two write threads) an image's write waits for the
    next image's model call, then the two writes run side by side: each write started alone
    would leave a core idle while the model waits for it (the CPU gate)."""
    events: list = []
    _run(tmp_path, decode=0.02, model=0.02, write=0.05, count=6, events=events)
    model_done = [event[1] for event in events if event[0] == "model"]
    started = {key: at for kind, key, at in (e for e in events if len(e) == 3) if kind == "write"}
    ended = {key: at for kind, key, at in (e for e in events if len(e) == 3) if kind == "written"}
    assert len(model_done) == 6
    for first, second in ((0, 1), (2, 3), (4, 5)):
        a, b = f"{first}.png", f"{second}.png"
        assert started[a] >= model_done[second]  # waited for its companion's model call
        assert started[b] < ended[a] and started[a] < ended[b]  # side by side


def test_the_cpu_gate_says_whom_the_model_waited_for():
    gate = CpuGate()
    with gate.exclusive() as holder:
        assert holder is None  # free cores: no wait
    with gate.shared("write"):
        pass
    with gate.exclusive() as holder:
        assert holder is None  # the write had left before the model asked
    import threading

    entered, leave = threading.Event(), threading.Event()

    def decode() -> None:
        with gate.shared("decode"):
            entered.set()
            leave.wait()

    thread = threading.Thread(target=decode)
    thread.start()
    entered.wait()
    threading.Timer(0.05, leave.set).start()
    with gate.exclusive() as holder:
        assert holder == "decode"
    thread.join()


def _finished(row: dict, infer: float, waited: dict | None = None) -> Finished:
    return Finished(None, row, infer, {}, None, waited or {})  # type: ignore[arg-type]


def test_stage_times_sum_rows_once_and_leave_waits_unknown_when_unmeasured():
    stages = StageTimes()
    assert stages.report() is None and stages.line() is None
    ok = {"status": "ok", "timings": {"decode_s": 0.5, "write_s": 0.25}}
    stages.add(_finished(ok, 1.0))
    # A video's frame: model time counts, its decode and write come with the video's row.
    stages.add(_finished({"status": "frame", "timings": {"decode_s": 9, "write_s": 9}}, 1.0))
    stages.add(_finished({"status": "failed", "error": "bad"}, 0.0))  # no timings
    report = stages.report()
    assert report == {
        "decode": 0.5,
        "model": 2.0,
        "write": 0.25,
        "wait": None,
        "waited_for": None,
        "model_busy": None,
        "bottleneck": None,  # an engine that does not time waits (Ray): nothing to judge by
    }
    assert stages.line() == "stages: decode 0.5s, model 2.0s, write 0.2s"
    stages.add(_finished(ok, 1.0, {"write": 4.0, "record": 0.5}))
    report = stages.report()
    assert report["wait"] == 4.5 and report["waited_for"]["write"] == 4.0
    assert report["waited_for"]["decode"] == 0.0 and report["bottleneck"] == "write"
    assert report["model_busy"] == round(3.0 / 7.5, 3)
    assert stages.line() == (
        "stages: decode 1.0s, model 3.0s, write 0.5s; the model waited 4.5s (write 4.0s, "
        "record 0.5s); bottleneck: write (the model ran 40% of the time)"
    )
