"""``--engine ray``: same outputs, log rows and ledger as the local engine, on a local Ray."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from clipseg_cli.commands.app import app
from clipseg_cli.commands.console import ExitCode
from clipseg_cli.io.naming import LEDGER_NAME, STATE_DIR
from clipseg_cli.ops.shapes import make_large_scene
from clipseg_cli.run import pipeline
from clipseg_cli.run.config import SegmentConfig

runner = CliRunner()
SAVE = "mask,soft,logits,labels"


@pytest.fixture(scope="module")
def ray_cluster():
    """One local single-node cluster for the module (starting one takes seconds).

    Three logical CPUs: one actor holding two (so it runs torch on two threads, like the
    local engine on this machine's two cores: thread counts change the last bits) and one
    for the decode and write tasks. The CLI, run in this process, joins it.
    """
    ray = pytest.importorskip("ray")
    pytest.importorskip("ray.data")
    ray.init(num_cpus=3, include_dashboard=False, log_to_driver=False, configure_logging=False)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def photos(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Eight small photos in sub-folders, a zero-byte JPEG and a text file named .png."""
    root = tmp_path_factory.mktemp("ray-in")
    rng = np.random.default_rng(7)
    for i in range(8):
        path = root / f"sub{i % 2}" / f"img{i:02d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        size = (40 + 4 * i, 30 + 2 * i)  # sizes differ: outputs are upsampled to each
        Image.fromarray((rng.random((size[1], size[0], 3)) * 255).astype(np.uint8)).save(path)
    (root / "empty.jpg").write_bytes(b"")
    (root / "sub1" / "notes.png").write_text("not an image")
    return root


def _segment(inputs: Path, out: Path, model: Path, *extra: str, prompts=("a dog", "a cat")):
    args = ["segment", str(inputs), *(a for p in prompts for a in ("-p", p)), "--save", SAVE]
    args += ["--out", str(out), "--model", str(model), "--device", "cpu", "--progress", "none"]
    return runner.invoke(app, [*args, "--batch-size", "2", *extra])


def _ray(*extra: str) -> tuple[str, ...]:
    return ("--engine", "ray", "--actors", "1", *extra)


def _output_files(out: Path) -> dict[str, bytes]:
    """Every output file (not logs, summary or ledger) -> its bytes."""
    return {
        path.relative_to(out).as_posix(): path.read_bytes()
        for path in sorted(out.rglob("*"))
        if path.is_file() and not path.relative_to(out).as_posix().startswith((STATE_DIR, "clip"))
    }


def _text(path: Path, out: Path) -> str:
    """A file of the run in ``out``, with ``out`` itself written as ``OUT`` (to compare runs)."""
    return path.read_text().replace(json.dumps(str(out))[1:-1], "OUT")


def _ledger(out: Path) -> dict[str, tuple]:
    lines = _text(out / STATE_DIR / LEDGER_NAME, out).splitlines()
    rows = [row for row in map(json.loads, lines) if "key" in row]
    return {row["key"]: (row["status"], sorted(row["outputs"]), row["error"]) for row in rows}


def _log(out: Path) -> dict[str, dict]:
    """The log's rows by key, without what differs from run to run (run id, timings)."""
    rows = [json.loads(line) for line in _text(out / "clipseg-log.jsonl", out).splitlines()]
    return {
        row["key"]: {k: v for k, v in row.items() if k not in ("run", "timings")} for row in rows
    }


@pytest.fixture(scope="module")
def local_out(tiny_model_dir: Path, photos: Path, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("local") / "out"
    result = _segment(photos, out, tiny_model_dir)
    assert result.exit_code == ExitCode.SOME_FAILED, result.output
    return out


def test_ray_engine_matches_the_local_engine_byte_for_byte(
    ray_cluster, tiny_model_dir, photos, local_out, tmp_path
):
    out = tmp_path / "out"
    result = _segment(photos, out, tiny_model_dir, *_ray())
    assert result.exit_code == ExitCode.SOME_FAILED, result.output  # the two bad files
    expected = _output_files(local_out)
    assert len(expected) == 8 * (3 * 2 + 1)  # mask, soft, logits per prompt + labels
    assert _output_files(out) == expected
    assert _ledger(out) == _ledger(local_out)
    assert _log(out) == _log(local_out)
    statuses = {key: row["status"] for key, row in _log(out).items()}
    assert statuses.pop("empty.jpg") == statuses.pop("sub1/notes.png") == "failed"
    assert set(statuses.values()) == {"ok"}
    summary = json.loads((out / "clipseg-summary.json").read_text())
    assert summary["engine"] == "ray" and summary["ray"]["actors"] == 1
    assert summary["device"] == "cpu" and summary["batch_size"] == 2
    # Busy times from the rows and the actors; Ray's scheduler leaves the model's waits unknown.
    stages = summary["stages"]
    assert min(stages["decode"], stages["model"], stages["write"]) > 0
    assert stages["wait"] is stages["bottleneck"] is None


def test_interrupted_ray_run_resumes_from_the_ledger(
    ray_cluster, tiny_model_dir, photos, local_out, tmp_path
):
    out = tmp_path / "out"
    done = []
    config = SegmentConfig(
        inputs=(str(photos),),
        out_dir=out,
        prompts=("a dog", "a cat"),
        save=tuple(SAVE.split(",")),
        model=str(tiny_model_dir),
        device="cpu",
        batch_size=2,
        engine="ray",
        actors=1,
    )
    summary = pipeline.run_segment(
        config,
        on_progress=lambda progress: done.append(progress.done),
        should_stop=lambda: len(done) >= 3,
    )
    assert summary.interrupted and summary.ok + summary.failed == 3
    assert len(_ledger(out)) == 3  # only what the driver saw finished

    result = _segment(photos, out, tiny_model_dir, *_ray())
    assert result.exit_code == ExitCode.SOME_FAILED, result.output
    assert _ledger(out) == _ledger(local_out)
    assert _output_files(out) == _output_files(local_out)
    last_run = [json.loads(line) for line in (out / "clipseg-log.jsonl").read_text().splitlines()]
    last_run = [row for row in last_run if row["run"] == last_run[-1]["run"]]
    assert sum(row["status"] == "skipped" for row in last_run) == 3
    assert len(last_run) == 10


def test_without_ray_the_engine_says_how_to_install_it(tiny_model_dir, photos, tmp_path, uninstall):
    uninstall("ray")
    out = tmp_path / "out"
    result = _segment(photos, out, tiny_model_dir, *_ray())
    assert result.exit_code == ExitCode.USAGE
    message = result.output.strip()
    assert "\n" not in message and "pip install 'clipseg-cli[ray]'" in message
    assert not out.exists()  # refused before anything was locked or written


def test_ray_engine_with_tiles_and_refinement_matches_the_local_engine(
    ray_cluster, tiny_model_dir, photos, tmp_path
):
    """Tiles are more rows of the model's batches; an image's rows can span batches, and the
    Ray actors re-form batches differently from the local engine: the outputs are the same."""
    options = ("--tiles", "2", "--refine", "guided", "--batch-size", "3")
    local = tmp_path / "local"
    assert _segment(photos, local, tiny_model_dir, *options).exit_code == ExitCode.SOME_FAILED
    out = tmp_path / "ray"
    result = _segment(photos, out, tiny_model_dir, *options, *_ray())
    assert result.exit_code == ExitCode.SOME_FAILED, result.output
    assert _output_files(out) == _output_files(local)
    assert _log(out) == _log(local)
    summary = json.loads((out / "clipseg-summary.json").read_text())
    assert summary["config"]["tiles"] == "2"


def test_ray_engine_exports_the_same_datasets_as_the_local_engine(ray_cluster, tmp_path):
    """Export parts travel back from the Ray write tasks: COCO and YOLO files, instance maps
    and the summary's instance counts are the same, on scenes where the demo model's touching
    objects are split and specks dropped by the score floor."""
    scenes = tmp_path / "scenes"
    scenes.mkdir()
    for seed in range(84_000_000, 84_000_004):
        scene = make_large_scene(
            seed, (384, 512), radius=(36.0, 60.0), classes=(1, 2), copies=(1, 3), gap=16,
            include=("red circle",), touching=0.7, texture=40.0 * (seed % 2),
        )  # fmt: skip
        Image.fromarray(scene.image).save(scenes / f"s{seed}.png")
    (scenes / "empty.jpg").write_bytes(b"")
    options = ("--save", "mask,instances", "--export", "coco,yolo", "--yolo-copy")
    demo, prompts = Path("demo"), ("a red circle", "a green square")  # the bundled model
    local = tmp_path / "local"
    result = _segment(scenes, local, demo, *options, prompts=prompts)
    assert result.exit_code == ExitCode.SOME_FAILED, result.output
    out = tmp_path / "ray"
    result = _segment(scenes, out, demo, *options, *_ray(), prompts=prompts)
    assert result.exit_code == ExitCode.SOME_FAILED, result.output
    coco = json.loads((out / "coco.json").read_text())
    assert len(coco["images"]) == 4 and coco["annotations"]
    assert coco == json.loads((local / "coco.json").read_text())
    ray_files, local_files = _output_files(out), _output_files(local)
    data_yaml = "yolo/data.yaml"  # names its own folder: the same but for the path
    assert ray_files.pop(data_yaml).replace(b"/ray/", b"/local/") == local_files.pop(data_yaml)
    assert any(name.startswith("yolo/labels/") for name in ray_files)
    assert ray_files == local_files  # instance maps, YOLO labels and images
    summaries = [json.loads((o / "clipseg-summary.json").read_text()) for o in (out, local)]
    assert summaries[0]["instances"] == summaries[1]["instances"]
    assert sum(c["dropped"]["min_score"] for c in summaries[0]["instances"].values()) > 0
    split = 0  # instance maps with more instances than regions: touching circles split
    for path in out.glob("*.instances.png"):
        ids = np.asarray(Image.open(path))
        regions = cv2.connectedComponents((ids > 0).astype(np.uint8), connectivity=8)[0] - 1
        split += len(np.unique(ids[ids > 0])) > regions
    assert split > 0
    assert _log(out) == _log(local)


def test_ray_actors_run_the_backend_the_run_asks_for(ray_cluster, tiny_model_dir, photos, tmp_path):
    """CPU actors run ONNX Runtime by default (the graph exported once, by the driver) and
    torch with --backend torch; each matches the local engine on the same backend."""
    for backend in ("torch", "onnx"):
        local = tmp_path / f"local-{backend}"
        options = ("--backend", backend)
        assert _segment(photos, local, tiny_model_dir, *options).exit_code == 1
        out = tmp_path / f"ray-{backend}"
        result = _segment(photos, out, tiny_model_dir, *options, *_ray())
        assert result.exit_code == ExitCode.SOME_FAILED, result.output
        assert _output_files(out) == _output_files(local)
        summary = json.loads((out / "clipseg-summary.json").read_text())
        assert summary["backend"] == backend and summary["ray"]["actors"] == 1


@pytest.mark.slow  # a local run, then an actor loading the model: 104 s on the loaded 2 cores
def test_ray_engine_splits_a_video_into_parts_and_joins_them(ray_cluster, tmp_path):
    """A 32-frame video in parts of 12 (each part smoothed from up to 30 frames before it):
    the joined videos have the local engine's frames and timestamps; the first part is the
    local engine's exactly, the later ones within the warm-up's tolerance. A bad video is its
    own one-line failure."""
    from video_helpers import shapes_video

    from clipseg_cli.io import video

    inputs = tmp_path / "in"
    inputs.mkdir()
    source, _ = shapes_video(inputs / "clip.mp4", count=32, audio=True)
    (inputs / "broken.mp4").write_bytes(source.read_bytes()[:2000])
    options = ("--save", "mask,soft,overlay", "--segment-frames", "12", "--export", "coco")
    demo, prompts = Path("demo"), ("red circle",)
    local = tmp_path / "local"
    result = _segment(inputs, local, demo, *options, prompts=prompts)
    assert result.exit_code == ExitCode.SOME_FAILED, result.output
    out = tmp_path / "ray"
    result = _segment(inputs, out, demo, *options, *_ray(), prompts=prompts)
    assert result.exit_code == ExitCode.SOME_FAILED, result.output
    rows = _log(out)
    assert rows["broken.mp4"]["status"] == "failed" and "\n" not in rows["broken.mp4"]["error"]
    row, expected = rows["clip.mp4"], _log(local)["clip.mp4"]
    assert row["status"] == "ok" and row["video"] == expected["video"]
    assert row["video"]["frames"] == 32
    for prompt, want in zip(row["prompts"], expected["prompts"], strict=True):
        assert prompt["coverage"] == pytest.approx(want["coverage"], abs=1e-3)
        assert prompt["mean_abs_dp"] == pytest.approx(want["mean_abs_dp"], abs=1e-4)
    for kind in ("mask", "soft"):
        name = f"clip.mp4.red-circle.{kind}.mkv"
        mine = [f for f in video.grey_frames(out / name)]
        theirs = [f for f in video.grey_frames(local / name)]
        assert len(mine) == len(theirs) == 32
        assert all(np.array_equal(a, b) for a, b in zip(mine[:12], theirs[:12], strict=True))
        worst = max(float(np.abs(a - b).max()) for a, b in zip(mine, theirs, strict=True))
        assert worst <= 1 / 255, kind  # at most one level of an 8-bit soft map
        if kind == "mask":
            flipped = sum(int((a != b).sum()) for a, b in zip(mine, theirs, strict=True))
            assert flipped <= 0.0005 * mine[0].size * 32
    # The export: every frame, its instances tracked over the parts as over the whole.
    datasets = [json.loads((o / "coco.json").read_text()) for o in (out, local)]
    for dataset in datasets:
        assert dataset["videos"][0]["frames"] == 32 and len(dataset["images"]) == 32
    tracks = [[a["track_id"] % 1000 for a in d["annotations"]] for d in datasets]
    assert tracks[0] == tracks[1] and len(set(tracks[0])) >= 1
    overlay = out / "clip.mp4.red-circle.overlay.mp4"
    info = video.probe(overlay)
    assert info.has_audio and info.frames == 32
    assert not (out / STATE_DIR / "video").exists()


def test_a_ray_run_killed_mid_video_redoes_only_its_unfinished_parts(
    ray_cluster, tmp_path, monkeypatch
):
    """The driver dies right after the first of three parts is recorded; the rerun takes that
    part from the record, segments the other two, and the joined videos equal an uninterrupted
    Ray run's frame for frame."""
    from video_helpers import shapes_video

    from clipseg_cli.io import video
    from clipseg_cli.run import frames

    inputs = tmp_path / "in"
    inputs.mkdir()
    shapes_video(inputs / "clip.mp4", count=36)
    options = ("--save", "mask,soft", "--segment-frames", "12", *_ray())
    demo, prompts = Path("demo"), ("red circle",)
    whole = tmp_path / "whole"
    assert _segment(inputs, whole, demo, *options, prompts=prompts).exit_code == 0

    out = tmp_path / "out"
    record_part = frames.record_part

    def record_then_die(*args, **kwargs):
        record_part(*args, **kwargs)
        raise SystemError("the driver dies here")

    monkeypatch.setattr(frames, "record_part", record_then_die)
    result = _segment(inputs, out, demo, *options, prompts=prompts)
    assert isinstance(result.exception, SystemError)
    assert len(list((out / STATE_DIR / "video").rglob("*.part.json"))) == 1
    monkeypatch.undo()

    result = _segment(inputs, out, demo, *options, prompts=prompts)
    assert result.exit_code == 0, result.output
    row, expected = _log(out)["clip.mp4"], _log(whole)["clip.mp4"]
    assert row["video"]["reused_frames"] == 12 and expected["video"]["reused_frames"] == 0
    assert row["prompts"] == expected["prompts"]
    for kind in ("mask", "soft"):
        name = f"clip.mp4.red-circle.{kind}.mkv"
        mine, theirs = list(video.grey_frames(out / name)), list(video.grey_frames(whole / name))
        assert len(mine) == len(theirs) == 36
        assert all(np.array_equal(a, b) for a, b in zip(mine, theirs, strict=True)), kind
    assert not (out / STATE_DIR / "video").exists()
