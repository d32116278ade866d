"""Files a cron job did not make: each gets a one-line error in the log, and the run goes on."""

from __future__ import annotations

import io
import json
import os
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from clipseg_cli.commands.app import app
from clipseg_cli.commands.console import ExitCode
from clipseg_cli.io.paths import display_path, parse_display_path

runner = CliRunner()


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG that declares a huge size and holds almost nothing (a decompression bomb)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        crc = zlib.crc32(kind + data) & 0xFFFFFFFF
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\0" * 64)
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")
    )


def _jpeg_bytes(size=(64, 48)) -> bytes:
    buffer = io.BytesIO()
    rng = np.random.default_rng(0)
    Image.fromarray((rng.random((size[1], size[0], 3)) * 255).astype(np.uint8)).save(buffer, "JPEG")
    return buffer.getvalue()


NON_UTF8 = os.fsdecode(b"caf\xe9.png")


@pytest.fixture(scope="module")
def hostile_run(tiny_model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("hostile")
    inputs = root / "in"
    inputs.mkdir()
    (inputs / "good.jpg").write_bytes(_jpeg_bytes())
    (inputs / "zero.jpg").write_bytes(b"")
    (inputs / "text.jpg").write_text("this is not a picture\n")
    (inputs / "truncated.jpg").write_bytes(_jpeg_bytes()[:-600])
    (inputs / "bomb.png").write_bytes(_png_header_only(60000, 60000))
    (inputs / "medium.png").write_bytes(_png_header_only(3000, 3000))  # over --max-pixels below
    Image.new("RGB", (1, 20000), (10, 200, 30)).save(inputs / "tall.png")
    rotated = Image.new("RGB", (40, 20), (255, 0, 0))
    exif = rotated.getexif()
    exif[0x0112] = 8
    rotated.save(inputs / "exif.jpg", exif=exif)
    Image.new("CMYK", (30, 20), (0, 255, 255, 0)).save(inputs / "cmyk.jpg")
    gradient = np.linspace(0, 65535, 40 * 30).reshape(30, 40).astype(np.uint16)
    Image.fromarray(gradient).save(inputs / "deep.png")
    palette = Image.new("P", (30, 20), 1)
    palette.putpalette([0, 0, 0, 0, 0, 255] + [0] * 762)
    palette.info["transparency"] = 0
    palette.save(inputs / "palette.png")
    frames = [Image.new("P", (30, 20), i) for i in range(4)]
    frames[0].save(inputs / "anim.gif", save_all=True, append_images=frames[1:], duration=50)
    (inputs / "loop").mkdir()
    (inputs / "loop" / "again").symlink_to(inputs, target_is_directory=True)
    (inputs / "broken.png").symlink_to(inputs / "does-not-exist.png")
    (inputs / "locked.png").write_bytes((inputs / "good.jpg").read_bytes())
    (inputs / "private").mkdir()
    (inputs / "private" / "hidden.png").write_bytes((inputs / "good.jpg").read_bytes())
    (inputs / NON_UTF8).write_bytes((inputs / "good.jpg").read_bytes())
    Image.new("RGB", (20, 10), (1, 2, 3)).save(inputs / "Dog.png")
    Image.new("RGB", (20, 10), (3, 2, 1)).save(inputs / "dog.png")

    # We run as root in CI, and root reads files whatever their mode bits: make "permission
    # denied" real for one file and one folder by injecting the error the OS would raise.
    locked, private = str(inputs / "locked.png"), str(inputs / "private")
    real_open, real_scandir = Path.open, os.scandir

    def guarded_open(self, *args, **kwargs):
        if str(self) == locked:
            raise PermissionError(13, "Permission denied", locked)
        return real_open(self, *args, **kwargs)

    def guarded_scandir(path="."):
        if str(path) == private:
            raise PermissionError(13, "Permission denied", private)
        return real_scandir(path)

    out = root / "out"
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(Path, "open", guarded_open)
        patch.setattr(os, "scandir", guarded_scandir)
        result = runner.invoke(
            app,
            ["segment", str(inputs), "-p", "a dog", "-p", "../../escape", "--save",
             "mask,overlay", "--max-pixels", "5000000", "--out", str(out), "--model",
             str(tiny_model_dir), "--device", "cpu", "--progress", "none"],
        )  # fmt: skip
    text = (out / "clipseg-log.jsonl").read_text(encoding="utf-8")
    rows = [json.loads(line) for line in text.splitlines()]
    by_name = {Path(row["input"]).name: row for row in rows}
    return result, by_name, inputs, out


def test_the_run_finishes_and_reports_partial_failure(hostile_run):
    result, rows, _, _ = hostile_run
    assert result.exit_code == ExitCode.SOME_FAILED, result.output
    assert "Traceback" not in result.output
    assert rows["good.jpg"]["status"] == "ok"


@pytest.mark.parametrize(
    ("name", "reason"),
    [
        ("zero.jpg", "empty"),
        ("text.jpg", "not an image"),
        ("truncated.jpg", "truncated"),
        ("bomb.png", "too large"),
        ("medium.png", "--max-pixels"),
        ("broken.png", "broken symbolic link"),
        ("locked.png", "ermission denied"),
        ("private", "ermission denied"),
    ],
)
def test_each_bad_input_gets_a_one_line_error(hostile_run, name, reason):
    _, rows, _, _ = hostile_run
    row = rows[name]
    assert row["status"] == "failed"
    assert reason in row["error"] and "\n" not in row["error"]
    assert row["outputs"] == []


@pytest.mark.parametrize(
    ("name", "size"),
    [
        ("tall.png", (1, 20000)),
        ("exif.jpg", (20, 40)),  # orientation 8: rotated as displayed
        ("cmyk.jpg", (30, 20)),
        ("deep.png", (40, 30)),
        ("palette.png", (30, 20)),
        ("anim.gif", (30, 20)),
    ],
)
def test_odd_but_valid_images_are_processed_as_displayed(hostile_run, name, size):
    _, rows, _, _ = hostile_run
    row = rows[name]
    assert row["status"] == "ok", row["error"]
    assert (row["width"], row["height"]) == size
    for output in row["outputs"]:
        assert Image.open(output["path"]).size == size


def test_sixteen_bit_input_is_not_flattened_to_white(hostile_run):
    _, rows, _, _ = hostile_run
    overlay = next(o for o in rows["deep.png"]["outputs"] if o["kind"] == "overlay")
    pixels = np.asarray(Image.open(overlay["path"]).convert("L"))
    assert pixels.min() < 60 and pixels.max() > 150


def test_symlink_loop_is_not_followed(hostile_run):
    _, rows, _, _ = hostile_run
    assert not any("again" in key for key in (row["key"] or "" for row in rows.values()))


def test_non_utf8_name_stays_valid_json_and_recoverable(hostile_run):
    _, rows, inputs, _ = hostile_run
    row = rows[Path(display_path(inputs / NON_UTF8)).name]
    assert row["status"] == "ok"
    recovered = parse_display_path(row["input"])
    assert os.fsencode(recovered).endswith(b"caf\xe9.png")
    for output in row["outputs"]:
        assert Path(parse_display_path(output["path"])).exists()


def test_case_colliding_inputs_get_distinct_outputs(hostile_run):
    _, rows, _, _ = hostile_run
    upper = {o["path"] for o in rows["Dog.png"]["outputs"]}
    lower = {o["path"] for o in rows["dog.png"]["outputs"]}
    assert len(upper | lower) == len(upper) + len(lower)
    assert len({p.lower() for p in upper | lower}) == len(upper | lower)


def test_path_like_prompt_writes_inside_out(hostile_run):
    _, rows, _, out = hostile_run
    for row in rows.values():
        for output in row["outputs"]:
            path = Path(parse_display_path(output["path"]))
            assert path.resolve().is_relative_to(out.resolve())


def test_truncated_jpeg_is_accepted_with_the_documented_option(tiny_model_dir, tmp_path):
    (tmp_path / "cut.jpg").write_bytes(_jpeg_bytes()[:-600])
    result = runner.invoke(
        app,
        ["segment", str(tmp_path / "cut.jpg"), "-p", "x", "--allow-truncated", "--out",
         str(tmp_path / "out"), "--model", str(tiny_model_dir), "--device", "cpu"],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
