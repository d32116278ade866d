"""Tests for clipseg_cli.io.sources: collecting inputs and decoding images."""

from __future__ import annotations

import io
import json
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path, PurePosixPath

import numpy as np
import pytest
from PIL import Image, ImageFile

from clipseg_cli.io.paths import display_path, parse_display_path
from clipseg_cli.io.sources import (
    DecodedImage,
    ImageDecodeError,
    collect_inputs,
    decode_image,
)


def _png(path: Path, size: tuple[int, int] = (4, 3), color: tuple[int, int, int] = (9, 9, 9)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path, format="PNG")
    return path


def _keys(listing) -> list[str]:
    return [str(item.key) for item in listing.items]


# ---------------------------------------------------------------------------------------------
# collect_inputs
# ---------------------------------------------------------------------------------------------


def test_folder_walk_is_recursive_sorted_and_deterministic(tmp_path: Path) -> None:
    # Created out of order so creation/directory order cannot pass for sorting.
    for rel in ["b.png", "sub/z.png", "a.png", "sub/deeper/c.png", "c.png", "aa/x.png"]:
        _png(tmp_path / "photos" / rel)
    first = collect_inputs([str(tmp_path / "photos")])
    assert _keys(first) == [
        "a.png",
        "aa/x.png",
        "b.png",
        "c.png",
        "sub/deeper/c.png",
        "sub/z.png",
    ]
    assert _keys(collect_inputs([str(tmp_path / "photos")])) == _keys(first)
    assert first.missing == []


def test_hidden_entries_are_skipped_in_walk(tmp_path: Path) -> None:
    _png(tmp_path / "d" / "ok.png")
    _png(tmp_path / "d" / ".hidden.png")
    _png(tmp_path / "d" / ".git" / "x.png")
    assert _keys(collect_inputs([str(tmp_path / "d")])) == ["ok.png"]


def test_glob_patterns_and_recursive_glob(tmp_path: Path) -> None:
    _png(tmp_path / "a.png")
    _png(tmp_path / "b.jpg.png")
    _png(tmp_path / "sub" / "c.png")
    (tmp_path / "notes.txt").write_text("x")
    flat = collect_inputs([str(tmp_path / "*.png")])
    assert _keys(flat) == ["a.png", "b.jpg.png"]
    deep = collect_inputs([str(tmp_path / "**" / "*.png")])
    assert _keys(deep) == ["a.png", "b.jpg.png", "sub/c.png"]
    # A glob names files explicitly: even a non-image file is returned.
    assert _keys(collect_inputs([str(tmp_path / "*.txt")])) == ["notes.txt"]


def test_glob_or_path_matching_nothing_is_reported_missing(tmp_path: Path) -> None:
    _png(tmp_path / "a.png")
    pattern = str(tmp_path / "*.webp")
    gone = str(tmp_path / "gone.png")
    listing = collect_inputs([str(tmp_path / "a.png"), pattern, gone])
    assert _keys(listing) == ["a.png"]
    assert listing.missing == [pattern, gone]


def test_empty_spec_is_missing_not_the_current_directory(tmp_path: Path, monkeypatch) -> None:
    _png(tmp_path / "a.png")
    monkeypatch.chdir(tmp_path)
    listing = collect_inputs([""])
    assert listing.items == [] and listing.missing == [""]


def test_literal_name_with_glob_characters_is_not_expanded(tmp_path: Path) -> None:
    odd = _png(tmp_path / "shot[1].png")
    _png(tmp_path / "shot1.png")
    listing = collect_inputs([str(odd)])
    assert [i.path for i in listing.items] == [odd]


def test_dash_reads_paths_from_stdin(tmp_path: Path) -> None:
    a = _png(tmp_path / "a.png")
    b = _png(tmp_path / "sub" / "b.png")
    text = f"# comment\n{a}\n\n   \n{b}\r\n{tmp_path / 'nope.png'}\n"
    listing = collect_inputs(["-"], stdin=io.StringIO(text))
    assert [i.path for i in listing.items] == [a, b]
    assert listing.missing == [str(tmp_path / "nope.png")]


def test_dash_accepts_nul_separated_paths(tmp_path: Path) -> None:
    a = _png(tmp_path / "a #1.png")  # '#' inside a NUL list is not a comment
    b = _png(tmp_path / "b.png")
    listing = collect_inputs(["-"], stdin=io.StringIO(f"{a}\0{b}\0"))
    assert [i.path for i in listing.items] == [a, b]


def test_at_list_paths_are_relative_to_cwd(tmp_path: Path, monkeypatch) -> None:
    _png(tmp_path / "imgs" / "one.png")
    _png(tmp_path / "imgs" / "two.png")
    lists = tmp_path / "lists"
    lists.mkdir()
    (lists / "in.txt").write_text("# my inputs\nimgs/two.png\n\nimgs/one.png\nimgs/missing.png\n")
    monkeypatch.chdir(tmp_path)
    listing = collect_inputs(["@lists/in.txt"])
    assert [str(i.path) for i in listing.items] == ["imgs/two.png", "imgs/one.png"]
    assert _keys(listing) == ["two.png", "one.png"]
    assert listing.missing == ["imgs/missing.png"]
    assert collect_inputs(["@lists/absent.txt"]).missing == ["@lists/absent.txt"]


def test_exclude_folder_inside_input_is_skipped(tmp_path: Path) -> None:
    _png(tmp_path / "in" / "a.png")
    _png(tmp_path / "in" / "out" / "a.png.a-dog.mask.png")
    _png(tmp_path / "in" / "outside.png")
    listing = collect_inputs([str(tmp_path / "in")], exclude=[tmp_path / "in" / "out"])
    assert _keys(listing) == ["a.png", "outside.png"]
    # Explicitly named files inside the excluded folder are dropped too.
    named = collect_inputs(
        [str(tmp_path / "in" / "out" / "a.png.a-dog.mask.png")], exclude=[tmp_path / "in" / "out"]
    )
    assert named.items == []


def test_symlink_loop_terminates(tmp_path: Path) -> None:
    _png(tmp_path / "d" / "a.png")
    _png(tmp_path / "d" / "sub" / "b.png")
    (tmp_path / "d" / "sub" / "loop").symlink_to(tmp_path / "d")
    (tmp_path / "d" / "self").symlink_to(".")
    result: list = []
    worker = threading.Thread(target=lambda: result.append(collect_inputs([str(tmp_path / "d")])))
    worker.start()
    worker.join(timeout=10)
    assert not worker.is_alive(), "folder walk did not terminate on a symlink loop"
    assert _keys(result[0]) == ["a.png", "sub/b.png"]


def test_symlinked_file_is_followed_and_deduplicated(tmp_path: Path) -> None:
    real = _png(tmp_path / "d" / "real.png")
    (tmp_path / "d" / "link.png").symlink_to(real)
    listing = collect_inputs([str(tmp_path / "d"), str(real)])
    # Same file via link and via a second mention: kept once, at its first (sorted) mention.
    assert _keys(listing) == ["link.png"]


def test_duplicates_appear_once(tmp_path: Path, monkeypatch) -> None:
    a = _png(tmp_path / "a.png")
    monkeypatch.chdir(tmp_path)
    listing = collect_inputs(["a.png", str(a), "./a.png", str(tmp_path)])
    assert len(listing.items) == 1
    assert listing.items[0].path == Path("a.png")


def test_broken_symlink_is_a_candidate_that_fails_decode(tmp_path: Path) -> None:
    _png(tmp_path / "d" / "ok.png")
    (tmp_path / "d" / "dangling").symlink_to(tmp_path / "d" / "nowhere.png")
    listing = collect_inputs([str(tmp_path / "d")])
    assert _keys(listing) == ["dangling", "ok.png"]
    with pytest.raises(ImageDecodeError, match="broken symbolic link"):
        decode_image(listing.items[0].path)


def test_content_sniffing_in_folder_walk(tmp_path: Path) -> None:
    d = tmp_path / "d"
    d.mkdir()
    Image.new("RGB", (2, 2)).save(d / "png_named.dat", format="PNG")
    Image.new("RGB", (2, 2)).save(d / "noext", format="JPEG")
    (d / "README.txt").write_text("hello")
    (d / "meta.json").write_text("{}")
    (d / "fake.JPG").write_text("not really a jpeg\n")
    (d / "empty.png").write_bytes(b"")
    listing = collect_inputs([str(d)])
    assert _keys(listing) == ["empty.png", "fake.JPG", "noext", "png_named.dat"]
    paths = {str(i.key): i.path for i in listing.items}
    assert decode_image(paths["png_named.dat"]).rgb.shape == (2, 2, 3)
    with pytest.raises(ImageDecodeError) as err:
        decode_image(paths["fake.JPG"])
    assert str(err.value) == "not an image (cannot identify image file)"
    with pytest.raises(ImageDecodeError, match=r"^empty file \(0 bytes\)$"):
        decode_image(paths["empty.png"])


def test_explicit_non_image_file_is_always_a_candidate(tmp_path: Path) -> None:
    readme = tmp_path / "README.txt"
    readme.write_text("hello")
    assert [i.path for i in collect_inputs([str(readme)]).items] == [readme]


def test_keys_use_the_common_ancestor(tmp_path: Path, monkeypatch) -> None:
    _png(tmp_path / "photos" / "dog.jpg.png")
    _png(tmp_path / "photos" / "sub" / "cat.png")
    assert _keys(collect_inputs([str(tmp_path / "photos")])) == ["dog.jpg.png", "sub/cat.png"]
    assert _keys(collect_inputs([str(tmp_path / "photos" / "sub" / "cat.png")])) == ["cat.png"]

    _png(tmp_path / "a" / "x" / "1.png")
    _png(tmp_path / "b" / "x" / "1.png")
    monkeypatch.chdir(tmp_path / "a")
    # Relative specs with '..' are normalised before finding the ancestor.
    listing = collect_inputs(["x", "../b/x"])
    assert _keys(listing) == ["a/x/1.png", "b/x/1.png"]
    assert all(isinstance(i.key, PurePosixPath) for i in listing.items)
    assert len({i.key for i in listing.items}) == 2


@pytest.mark.skipif(os.name != "posix", reason="byte file names are a POSIX feature")
def test_non_utf8_filename_round_trip(tmp_path: Path) -> None:
    raw = os.fsencode(tmp_path) + b"/caf\xe9 \\ \xff.png"
    Image.new("RGB", (3, 2)).save(raw.decode("utf-8", "surrogateescape"), format="PNG")
    listing = collect_inputs([str(tmp_path)])
    (item,) = listing.items
    assert os.fsencode(item.path) == raw
    shown = display_path(item.key)
    assert shown == "caf\\xe9 \\\\ \\xff.png"
    # Valid JSON text that encodes as UTF-8 ...
    encoded = json.dumps({"file": shown}, ensure_ascii=False).encode("utf-8")
    back = json.loads(encoded.decode("utf-8"))["file"]
    # ... from which the original bytes are recoverable, and the file reopens.
    assert os.fsencode(parse_display_path(display_path(item.path))) == raw
    assert os.fsencode(parse_display_path(back)) == os.fsencode(item.key)
    assert decode_image(item.path).rgb.shape == (2, 3, 3)


def test_display_path_leaves_normal_names_alone() -> None:
    assert display_path(Path("photos/über café.jpg")) == "photos/über café.jpg"
    with pytest.raises(ValueError, match="bad escape"):
        parse_display_path("a\\q")


def test_unreadable_folder_is_reported(tmp_path: Path, monkeypatch) -> None:
    _png(tmp_path / "d" / "ok.png")
    locked = tmp_path / "d" / "locked"
    _png(locked / "x.png")
    real_scandir = os.scandir

    def fake_scandir(path):
        if Path(path) == locked:
            raise PermissionError(13, "Permission denied")
        return real_scandir(path)

    # chmod does not stop root (CI containers), so simulate the failure.
    monkeypatch.setattr(os, "scandir", fake_scandir)
    listing = collect_inputs([str(tmp_path / "d")])
    assert _keys(listing) == ["ok.png"]
    assert listing.unreadable == [(locked, "permission denied")]


# ---------------------------------------------------------------------------------------------
# decode_image
# ---------------------------------------------------------------------------------------------


def test_exif_orientation_is_applied(tmp_path: Path) -> None:
    # Stored 40 wide x 20 high with a red block at the stored top-left corner.
    arr = np.zeros((20, 40, 3), np.uint8)
    arr[:6, :6] = (255, 0, 0)
    im = Image.fromarray(arr)
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90° clockwise to display
    path = tmp_path / "rot.jpg"
    im.save(path, quality=95, exif=exif.tobytes())
    dec = decode_image(path)
    assert dec.rgb.shape == (40, 20, 3)
    # Rotating clockwise moves the stored top-left corner to the displayed top-right.
    assert dec.rgb[1, 18, 0] > 200 and dec.rgb[1, 18, 1] < 60
    assert dec.rgb[1, 1, 0] < 60
    assert dec.format == "JPEG"


def test_rgb_png_is_exact(mode_images) -> None:
    dec = decode_image(mode_images["rgb_png"])
    expected = np.asarray(Image.open(mode_images["rgb_png"]))
    np.testing.assert_array_equal(dec.rgb, expected)
    assert dec.alpha is None and dec.mode == "RGB" and dec.format == "PNG"
    assert dec.rgb.dtype == np.uint8


def test_rgba_is_composited_over_white(mode_images) -> None:
    dec = decode_image(mode_images["rgba_png"])
    src = np.asarray(Image.open(mode_images["rgba_png"])).astype(np.float64)
    a = src[:, :, 3:] / 255.0
    expected = np.rint(src[:, :, :3] * a + 255.0 * (1 - a))
    assert dec.alpha is not None
    np.testing.assert_array_equal(dec.alpha, src[:, :, 3].astype(np.uint8))
    assert np.abs(dec.rgb.astype(np.int16) - expected).max() <= 1
    assert (dec.rgb[:, 0] == 255).all()  # fully transparent column is white


def test_la_has_alpha_and_composites(mode_images) -> None:
    dec = decode_image(mode_images["la_png"])
    assert dec.mode == "LA"
    assert dec.alpha is not None and (dec.alpha == 128).all()
    # black at alpha 128 over white: 255 * 127 / 255 = 127
    assert (dec.rgb == 127).all()


def test_palette_without_and_with_transparency(mode_images) -> None:
    plain = decode_image(mode_images["p_png"])
    assert plain.mode == "P" and plain.alpha is None
    assert tuple(plain.rgb[0, 1]) == (0, 255, 0)

    dec = decode_image(mode_images["p_trns_png"])
    idx = np.asarray(Image.open(mode_images["p_trns_png"]))
    assert dec.alpha is not None
    np.testing.assert_array_equal(dec.alpha, np.where(idx == 0, 0, 255))
    assert (dec.rgb[idx == 0] == 255).all()  # transparent red -> white
    assert (dec.rgb[idx == 2] == (0, 0, 255)).all()


def test_grey_and_bilevel(mode_images) -> None:
    grey = decode_image(mode_images["l_png"])
    src = np.asarray(Image.open(mode_images["l_png"]))
    for c in range(3):
        np.testing.assert_array_equal(grey.rgb[:, :, c], src)
    bi = decode_image(mode_images["bilevel_png"])
    assert bi.mode == "1"
    assert set(np.unique(bi.rgb)) == {0, 255}
    assert bi.rgb[0, 0, 0] == 0 and bi.rgb[0, 1, 0] == 255


@pytest.mark.parametrize("name", ["cmyk_jpg", "cmyk_tif"])
def test_cmyk_becomes_rgb(mode_images, name: str) -> None:
    dec = decode_image(mode_images[name])
    assert dec.mode == "CMYK" and dec.rgb.shape[2] == 3
    r, g, b = (int(v) for v in dec.rgb[5, 5])
    # Pure magenta ink: red and blue high, green low.
    assert r > 200 and b > 200 and g < 60


def test_16bit_png_gradient_spans_the_range(mode_images) -> None:
    dec = decode_image(mode_images["i16_png"])
    assert dec.mode.startswith("I;16")
    row = dec.rgb[0, :, 0].astype(int)
    src = np.asarray(Image.open(mode_images["i16_png"]))[0].astype(np.int64)
    np.testing.assert_array_equal(row, (src * 255 + 32767) // 65535)
    assert row.min() == 0 and row.max() == 255
    assert len(np.unique(row)) > 200  # not clipped to all-white
    assert np.all(np.diff(row) >= 0)


def test_32bit_int_and_float_tiff(mode_images) -> None:
    i32 = decode_image(mode_images["i32_tif"])
    assert i32.mode == "I"
    row = i32.rgb[0, :, 0].astype(int)
    assert row[0] == 0 and row[-1] == 255 and 100 < row[32] < 160
    f = decode_image(mode_images["f_tif"])
    assert f.mode == "F"
    frow = f.rgb[0, :, 0].astype(int)
    assert frow[0] == 0 and frow[-1] == 255 and np.all(np.diff(frow) >= 0)


def test_lab_tiff_is_colour_converted(tmp_path: Path) -> None:
    path = tmp_path / "lab.tif"
    Image.new("LAB", (4, 4), (128, 128, 128)).save(path)  # L=50%, a=b=0: neutral grey
    dec = decode_image(path)
    r, g, b = (int(v) for v in dec.rgb[0, 0])
    assert abs(r - g) <= 2 and abs(g - b) <= 2 and 100 < r < 140


def test_gif_first_frame(mode_images) -> None:
    dec = decode_image(mode_images["gif_anim"])
    assert dec.format == "GIF"
    assert tuple(dec.rgb[0, 0]) == (255, 0, 0)


def test_truncated_jpeg_fails_by_default_and_decodes_when_allowed(tmp_path: Path) -> None:
    im = Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8))
    buf = io.BytesIO()
    im.save(buf, format="JPEG", quality=90)
    path = tmp_path / "cut.jpg"
    path.write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    with pytest.raises(ImageDecodeError, match=r"^truncated image file$"):
        decode_image(path)
    dec = decode_image(path, allow_truncated=True)
    assert dec.rgb.shape == (64, 64, 3)
    # The process-wide Pillow flag is restored afterwards.
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False


def test_truncation_setting_is_per_call_under_threads(tmp_path: Path) -> None:
    im = Image.fromarray(np.random.default_rng(1).integers(0, 255, (128, 128, 3), dtype=np.uint8))
    buf = io.BytesIO()
    im.save(buf, format="JPEG")
    cut = tmp_path / "cut.jpg"
    cut.write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])

    def strict() -> bool:
        try:
            decode_image(cut)
        except ImageDecodeError:
            return True
        return False

    def lenient() -> bool:
        return decode_image(cut, allow_truncated=True).rgb.shape == (128, 128, 3)

    with ThreadPoolExecutor(8) as pool:
        futures = [pool.submit(strict if i % 2 else lenient) for i in range(40)]
        assert all(f.result() for f in futures)
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False


def test_oversized_image_is_rejected_before_decoding(tmp_path: Path, monkeypatch) -> None:
    path = tmp_path / "big.png"
    Image.new("1", (5000, 5000)).save(path)
    loads: list[int] = []
    real_load = ImageFile.ImageFile.load

    def spy_load(self):
        loads.append(1)
        return real_load(self)

    monkeypatch.setattr(ImageFile.ImageFile, "load", spy_load)
    with pytest.raises(ImageDecodeError) as err:
        decode_image(path, max_pixels=1_000_000)
    assert str(err.value) == (
        "image too large: 5000x5000 = 2.5e7 pixels exceeds --max-pixels 1.0e6"
    )
    assert loads == []


def test_pillow_bomb_error_becomes_decode_error(tmp_path: Path, monkeypatch) -> None:
    path = _png(tmp_path / "x.png", size=(100, 100))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # Pillow raises above 2x this
    with pytest.raises(ImageDecodeError, match=r"^image too large"):
        decode_image(path, max_pixels=None)


@pytest.mark.parametrize("size", [(1, 20000), (20000, 1)])
def test_extreme_aspect_ratio_decodes(tmp_path: Path, size: tuple[int, int]) -> None:
    path = _png(tmp_path / "thin.png", size=size, color=(10, 20, 30))
    dec = decode_image(path)
    assert dec.rgb.shape == (size[1], size[0], 3)
    assert (dec.rgb == (10, 20, 30)).all()


def test_decode_errors_are_one_line(tmp_path: Path) -> None:
    (tmp_path / "dir.png").mkdir()
    garbage = tmp_path / "garbage.png"
    garbage.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 40)
    cases = {
        tmp_path / "missing.png": "file not found",
        tmp_path / "dir.png": "is a directory",
    }
    for path, reason in cases.items():
        with pytest.raises(ImageDecodeError) as err:
            decode_image(path)
        assert str(err.value) == reason
    with pytest.raises(ImageDecodeError) as err:
        decode_image(garbage)
    assert "\n" not in str(err.value) and "Traceback" not in str(err.value)
    assert str(err.value)


def test_invalid_max_pixels_is_a_caller_error(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="max_pixels"):
        decode_image(_png(tmp_path / "a.png"), max_pixels=0)


def test_decoded_image_is_a_dataclass_with_plain_arrays(mode_images) -> None:
    dec = decode_image(mode_images["rgb_png"])
    assert isinstance(dec, DecodedImage)
    assert dec.rgb.flags.c_contiguous and dec.rgb.shape == (24, 32, 3)


def test_keys_are_relative_to_the_named_folder_and_stay_stable(tmp_path: Path) -> None:
    """Keys must not change when files appear elsewhere later (resume relies on it)."""
    root = tmp_path / "photos"
    (root / "2024").mkdir(parents=True)
    Image.new("RGB", (4, 4)).save(root / "2024" / "a.png")
    first = collect_inputs([str(root)])
    assert [str(item.key) for item in first.items] == ["2024/a.png"]
    (root / "2025").mkdir()
    Image.new("RGB", (4, 4)).save(root / "2025" / "b.png")
    second = collect_inputs([str(root)])
    assert [str(item.key) for item in second.items] == ["2024/a.png", "2025/b.png"]
    globbed = collect_inputs([str(root / "2024" / "*.png")])
    assert [str(item.key) for item in globbed.items] == ["a.png"]
