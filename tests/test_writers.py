"""Tests for clipseg_cli.io: output names (naming), atomic files and logs (files), the image and
array writers (writers), the palette."""

from __future__ import annotations

import json
import math
import re
import threading
from pathlib import Path, PurePosixPath

import numpy as np
import pytest
from PIL import Image

from clipseg_cli.io import naming
from clipseg_cli.io.files import JsonlLog, write_json_atomic
from clipseg_cli.io.naming import casefold_collisions, output_path, prompt_slugs
from clipseg_cli.io.palette import label_palette
from clipseg_cli.io.writers import (
    write_cutout,
    write_labels,
    write_logits,
    write_mask,
    write_overlay,
    write_soft,
)

SLUG_RE = re.compile(r"^[a-z0-9]+(-[a-z0-9]+)*$")


def _disk_mask(h: int = 40, w: int = 60) -> np.ndarray:
    yy, xx = np.mgrid[:h, :w]
    return (yy - h // 2) ** 2 + (xx - w // 2) ** 2 < (min(h, w) // 3) ** 2


def _rgb(h: int = 40, w: int = 60) -> np.ndarray:
    rng = np.random.default_rng(3)
    return rng.integers(0, 256, (h, w, 3), dtype=np.uint8)


def _temp_files(folder: Path) -> list[Path]:
    return [p for p in folder.rglob(".*") if ".tmp-" in p.name]


# ---------------------------------------------------------------------------------------------
# Naming
# ---------------------------------------------------------------------------------------------


def test_slug_basics() -> None:
    assert prompt_slugs(["a dog", "Café au lait!", "x.y/z", "  A  Cup "]) == [
        "a-dog",
        "cafe-au-lait",
        "x-y-z",
        "a-cup",
    ]
    assert prompt_slugs([""]) == ["prompt"]
    assert prompt_slugs(["..."]) == ["prompt"]
    long = prompt_slugs(["word " * 40])[0]
    assert len(long) <= naming.SLUG_MAX_LEN and SLUG_RE.match(long)


def test_empty_slugs_are_disambiguated_by_hash() -> None:
    a, b = prompt_slugs(["", "..."])
    assert a != b
    assert a.startswith("prompt-") and b.startswith("prompt-")


def test_slug_collisions_get_deterministic_hash_suffix() -> None:
    slugs = prompt_slugs(["a dog", "A-Dog", "a cat"])
    assert slugs[2] == "a-cat"
    assert slugs[0] != slugs[1]
    assert all(s.startswith("a-dog-") and len(s) == len("a-dog-") + 6 for s in slugs[:2])
    # Depends on the prompt text, not its position.
    assert prompt_slugs(["A-Dog", "a dog"]) == [slugs[1], slugs[0]]


def test_slugs_are_safe_and_unique_even_for_hostile_prompts(tmp_path: Path) -> None:
    prompts = ["../../x", "x", "/etc/passwd", "..", "C:\\win", "a" * 200, "a" * 201, "x", "日本"]
    slugs = prompt_slugs(prompts)
    assert len({s.casefold() for s in slugs}) == len(prompts)
    for slug in slugs:
        assert SLUG_RE.match(slug), slug
        assert "." not in slug and "/" not in slug and "\\" not in slug
        assert len(slug) <= naming.SLUG_MAX_LEN + 3
        out = output_path(tmp_path, PurePosixPath("img.jpg"), "mask", slug)
        assert out.parent == tmp_path


def test_output_path_layout(tmp_path: Path) -> None:
    key = PurePosixPath("sub/dog.jpg")
    assert output_path(tmp_path, key, "mask", "a-dog") == (
        tmp_path / "sub" / "dog.jpg.a-dog.mask.png"
    )
    assert output_path(tmp_path, key, "labels") == tmp_path / "sub" / "dog.jpg.labels.png"
    # Same stem, different extension: different outputs.
    other = output_path(tmp_path, PurePosixPath("sub/dog.png"), "mask", "a-dog")
    assert other != output_path(tmp_path, key, "mask", "a-dog")


@pytest.mark.parametrize(
    "key", ["../x.jpg", "a/../../x.jpg", "/etc/x.jpg", ".", ""], ids=lambda k: repr(k)
)
def test_output_path_rejects_escaping_keys(tmp_path: Path, key: str) -> None:
    with pytest.raises(ValueError):
        output_path(tmp_path, PurePosixPath(key), "mask", "a-dog")


def test_output_path_rejects_unsafe_parts(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="slug"):
        output_path(tmp_path, PurePosixPath("a.jpg"), "mask", "../x")
    with pytest.raises(ValueError, match="kind"):
        output_path(tmp_path, PurePosixPath("a.jpg"), "png/../..", None)


def test_casefold_collisions() -> None:
    keys = [
        PurePosixPath("Dog.jpg"),
        PurePosixPath("dog.jpg"),
        PurePosixPath("cat.jpg"),
        PurePosixPath("A/x.png"),
        PurePosixPath("a/x.png"),
    ]
    mapping = casefold_collisions(keys)
    assert mapping[PurePosixPath("cat.jpg")] == PurePosixPath("cat.jpg")
    for k in keys[:2] + keys[3:]:
        new = mapping[k]
        assert new != k and new.parent == k.parent
        assert re.fullmatch(re.escape(k.name) + r"~[0-9a-f]{6}", new.name)
    folded = {str(v).casefold() for v in mapping.values()}
    assert len(folded) == len(keys)
    assert casefold_collisions(keys) == mapping  # deterministic


def test_casefold_collisions_unicode_normalisation() -> None:
    nfc = PurePosixPath("caf\u00e9.jpg")
    nfd = PurePosixPath("cafe\u0301.jpg")
    mapping = casefold_collisions([nfc, nfd])
    assert mapping[nfc] != nfc and mapping[nfd] != nfd


def test_label_palette() -> None:
    pal = label_palette(255)
    assert len(pal) == 256 and pal[0] == (0, 0, 0)
    assert len(set(pal)) == 256
    assert all(0 <= c <= 255 for rgb in pal for c in rgb)
    assert label_palette(3) == pal[:4] == label_palette(3)
    with pytest.raises(ValueError):
        label_palette(256)


# ---------------------------------------------------------------------------------------------
# Image writers
# ---------------------------------------------------------------------------------------------


def test_write_mask(tmp_path: Path) -> None:
    mask = _disk_mask()
    path = tmp_path / "deep" / "er" / "m.png"  # parents are created
    write_mask(path, mask)
    im = Image.open(path)
    assert im.mode == "L" and im.size == (60, 40)
    arr = np.asarray(im)
    assert set(np.unique(arr)) == {0, 255}
    np.testing.assert_array_equal(arr == 255, mask)
    assert _temp_files(tmp_path) == []


def test_mask_png_is_valid_for_every_reader(tmp_path: Path) -> None:
    """Our own PNG encoder: CRCs and zlib stream check out (Pillow verify, a full decode),
    OpenCV reads the same pixels, odd sizes and a single row work, and it is smaller than
    Pillow's own encoding of the same mask."""
    import cv2

    rng = np.random.default_rng(3)
    for height, width in [(1, 1), (1, 7), (37, 1), (41, 333)]:
        mask = rng.random((height, width)) > 0.5
        path = tmp_path / f"m{height}x{width}.png"
        write_mask(path, mask)
        with Image.open(path) as im:
            im.verify()  # chunk CRCs
        with Image.open(path) as im:
            im.load()
            np.testing.assert_array_equal(np.asarray(im) == 255, mask)
            assert set(np.unique(np.asarray(im))) <= {0, 255}
        np.testing.assert_array_equal(cv2.imread(str(path), cv2.IMREAD_UNCHANGED) == 255, mask)
    blob = _disk_mask()
    ours = tmp_path / "ours.png"
    write_mask(ours, blob)
    pillow = tmp_path / "pillow.png"
    Image.fromarray(blob.astype(np.uint8) * 255).save(pillow, compress_level=1)
    assert ours.stat().st_size <= pillow.stat().st_size


def test_mask_with_another_extension_goes_through_pillow(tmp_path: Path) -> None:
    mask = _disk_mask()
    write_mask(tmp_path / "m.jpg", mask)
    with Image.open(tmp_path / "m.jpg") as im:
        assert im.format == "JPEG" and im.mode == "L"
        assert np.mean((np.asarray(im) > 127) == mask) > 0.98


@pytest.mark.parametrize("bits", [8, 16])
def test_write_soft(tmp_path: Path, bits: int) -> None:
    prob = np.tile(np.linspace(0, 1, 300, dtype=np.float32), (5, 1))
    prob[0, 0] = np.nan
    prob[0, 1] = 1.5
    path = tmp_path / "s.png"
    write_soft(path, prob, bits=bits)
    im = Image.open(path)
    maxval = 255 if bits == 8 else 65535
    assert im.size == (300, 5)
    assert im.mode == ("L" if bits == 8 else "I;16")
    assert path.read_bytes()[24] == bits  # PNG IHDR bit depth
    arr = np.asarray(im).astype(np.int64)
    expected = np.rint(np.nan_to_num(np.clip(prob, 0, 1)) * maxval).astype(np.int64)
    expected[0, 0] = 0
    np.testing.assert_array_equal(arr, expected)
    if bits == 16:
        assert len(np.unique(arr[1])) == 300  # finer than 8 bits could hold


def test_write_soft_rejects_bad_bits(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="bits"):
        write_soft(tmp_path / "s.png", np.zeros((2, 2), np.float32), bits=12)
    assert not (tmp_path / "s.png").exists()


def test_write_overlay(tmp_path: Path) -> None:
    rgb = _rgb()
    mask = _disk_mask()
    path = tmp_path / "o.png"
    color = (255, 0, 80)
    write_overlay(path, rgb, mask, color=color, opacity=0.45)
    im = Image.open(path)
    assert im.mode == "RGB" and im.size == (60, 40)
    out = np.asarray(im).astype(int)
    # Centre: tinted; far corner: untouched.
    expected_centre = np.rint(rgb[20, 30] * 0.55 + np.array(color) * 0.45)
    assert np.abs(out[20, 30] - expected_centre).max() <= 1
    np.testing.assert_array_equal(out[0, 0], rgb[0, 0])
    # The outline is drawn at full colour along the mask edge.
    row = out[20]
    edge_cols = np.nonzero(mask[20])[0]
    assert tuple(row[edge_cols[0]]) == color and tuple(row[edge_cols[-1]]) == color
    assert (out != rgb).any(axis=2).sum() > mask.sum()  # outline reaches beyond the mask


def test_write_overlay_rejects_mismatched_shapes(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="mask"):
        write_overlay(tmp_path / "o.png", _rgb(10, 10), _disk_mask(12, 10))


def test_write_cutout(tmp_path: Path) -> None:
    rgb = _rgb()
    alpha = np.tile(np.linspace(0, 1, 60, dtype=np.float32), (40, 1))
    path = tmp_path / "c.png"
    write_cutout(path, rgb, alpha)
    im = Image.open(path)
    assert im.mode == "RGBA" and im.size == (60, 40)
    arr = np.asarray(im)
    np.testing.assert_array_equal(arr[:, :, :3], rgb)
    np.testing.assert_array_equal(arr[:, :, 3], np.rint(alpha * 255).astype(np.uint8))


def test_write_logits_round_trips_exactly(tmp_path: Path) -> None:
    logits = np.random.default_rng(4).standard_normal((22, 22)).astype(np.float32) * 10
    path = tmp_path / "l.npy"
    write_logits(path, logits)
    back = np.load(path, allow_pickle=False)
    assert back.dtype == np.float32
    np.testing.assert_array_equal(back, logits)


def test_write_labels(tmp_path: Path) -> None:
    labels = np.zeros((30, 40), np.uint8)
    labels[5:10, 5:10] = 1
    labels[20:, 30:] = 2
    pal = label_palette(2)
    path = tmp_path / "labels.png"
    write_labels(path, labels, pal)
    im = Image.open(path)
    assert im.mode == "P" and im.size == (40, 30)
    np.testing.assert_array_equal(np.asarray(im), labels)
    flat = im.getpalette()
    assert [tuple(flat[i * 3 : i * 3 + 3]) for i in range(3)] == pal
    assert tuple(np.asarray(im.convert("RGB"))[25, 35]) == pal[2]


def test_write_labels_rejects_label_without_colour(tmp_path: Path) -> None:
    labels = np.full((2, 2), 3, np.uint8)
    with pytest.raises(ValueError, match="no colour"):
        write_labels(tmp_path / "x.png", labels, label_palette(2))


# ---------------------------------------------------------------------------------------------
# Atomicity
# ---------------------------------------------------------------------------------------------


def test_overwrite_replaces_whole_file_and_leaves_no_temp(tmp_path: Path) -> None:
    path = tmp_path / "m.png"
    write_mask(path, np.zeros((8, 8), bool))
    write_mask(path, np.ones((8, 8), bool))
    assert (np.asarray(Image.open(path)) == 255).all()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.png"]


def test_failed_write_keeps_previous_file_and_removes_temp(tmp_path: Path, monkeypatch) -> None:
    path = tmp_path / "m.png"
    write_soft(path, np.zeros((8, 8), np.float32))
    before = path.read_bytes()
    seen_temp: list[str] = []
    real_open = Path.open

    class DiskFills:
        """A file handle whose disk fills after the first few bytes."""

        def __init__(self, handle) -> None:
            self.handle = handle

        def __enter__(self):
            return self

        def __exit__(self, *exc) -> None:
            self.handle.close()

        def write(self, data: bytes) -> int:
            self.handle.write(data[:5])
            seen_temp.extend(p.name for p in tmp_path.iterdir() if p.name != "m.png")
            raise OSError(28, "No space left on device")

    def open_filling(self, mode="r", *args, **kwargs):
        handle = real_open(self, mode, *args, **kwargs)
        return DiskFills(handle) if "w" in mode else handle

    monkeypatch.setattr(Path, "open", open_filling)
    with pytest.raises(OSError, match="No space"):
        write_soft(path, np.ones((8, 8), np.float32))
    assert path.read_bytes() == before
    assert seen_temp and seen_temp[0].startswith(".m.png.tmp-")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.png"]


def test_failed_npy_write_leaves_nothing(tmp_path: Path, monkeypatch) -> None:
    def broken_save(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(np, "save", broken_save)
    with pytest.raises(KeyboardInterrupt):
        write_logits(tmp_path / "l.npy", np.zeros((2, 2), np.float32))
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------------------------------------
# JSON
# ---------------------------------------------------------------------------------------------


def test_jsonl_log(tmp_path: Path) -> None:
    path = tmp_path / "logs" / "run.jsonl"
    weird = Path("caf\udce9.png")  # a non-UTF-8 byte held as a surrogate escape
    with JsonlLog(path) as log:
        log.write({"file": weird, "score": np.float32(0.5), "n": np.int64(3), "bad": math.nan})
        log.write({"text": "über\nline", "shape": (2, 3)})
    with JsonlLog(path) as log:  # append mode: a second run adds lines
        log.write({"again": True})
    raw = path.read_bytes()
    assert "über".encode() in raw  # ensure_ascii=False
    lines = raw.decode("utf-8").splitlines()
    assert len(lines) == 3
    rows = [json.loads(line) for line in lines]
    assert rows[0] == {"file": "caf\\xe9.png", "score": 0.5, "n": 3, "bad": None}
    assert rows[1] == {"text": "über\nline", "shape": [2, 3]}
    assert rows[2] == {"again": True}


def test_jsonl_log_is_line_atomic_across_threads(tmp_path: Path) -> None:
    path = tmp_path / "run.jsonl"
    with JsonlLog(path) as log:

        def work(t: int) -> None:
            for i in range(200):
                log.write({"t": t, "i": i, "pad": "x" * 500})

        threads = [threading.Thread(target=work, args=(t,)) for t in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
    assert len(rows) == 800


def test_write_json_atomic(tmp_path: Path) -> None:
    path = tmp_path / "summary.json"
    write_json_atomic(path, {"ok": 3, "paths": [Path("a/b.jpg")], "ratio": math.inf})
    assert json.loads(path.read_text(encoding="utf-8")) == {
        "ok": 3,
        "paths": ["a/b.jpg"],
        "ratio": None,
    }
    assert _temp_files(tmp_path) == []
