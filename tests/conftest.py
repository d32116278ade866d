"""Shared pytest fixtures."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

# No test may reach the network: huggingface_hub and open_clip read the cache only.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Nor write to the user's cache: graphs, text embeddings and weight identities go to a folder of
# this session (shared by its tests, so a tiny model's graph is exported once; tests of the
# cache itself point CLIPSEG_CACHE elsewhere).
os.environ["CLIPSEG_CACHE"] = tempfile.mkdtemp(prefix="clipseg-test-cache-")

# =============================================================================================
# Image-file fixtures for tests of clipseg_cli.io.sources / clipseg_cli.io.writers.
# Tiny images built on the fly in tmp_path, one per Pillow mode/format of interest.
# =============================================================================================

SaveImage = Callable[..., Path]


@pytest.fixture
def save_image(tmp_path: Path) -> SaveImage:
    """``save_image(name, image, **pil_save_kwargs) -> Path``: save a PIL image under tmp_path.

    ``name`` may contain folders; the format comes from the extension unless ``format=`` is
    passed (so a PNG can be saved under ``x.dat``).
    """

    def _save(name: str, image: Image.Image, **kwargs: object) -> Path:
        path = tmp_path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        image.save(path, **kwargs)
        return path

    return _save


def _gradient_rgb(height: int = 24, width: int = 32) -> np.ndarray:
    """uint8 [H,W,3] with distinct values along both axes (R ~ x, G ~ y, B constant)."""
    yy, xx = np.mgrid[:height, :width]
    r = (xx * 255 // max(width - 1, 1)).astype(np.uint8)
    g = (yy * 255 // max(height - 1, 1)).astype(np.uint8)
    b = np.full((height, width), 90, np.uint8)
    return np.dstack([r, g, b])


@pytest.fixture
def mode_images(save_image: SaveImage) -> dict[str, Path]:
    """One small file per interesting mode, keyed by a short name.

    Keys: rgb_png, rgba_png, l_png, la_png, p_png, p_trns_png, bilevel_png, cmyk_jpg,
    cmyk_tif, i16_png, i32_tif, f_tif, gif_anim.
    """
    rgb = _gradient_rgb()
    h, w = rgb.shape[:2]
    files: dict[str, Path] = {}
    files["rgb_png"] = save_image("rgb.png", Image.fromarray(rgb))

    alpha = np.tile(np.linspace(0, 255, w).astype(np.uint8), (h, 1))
    files["rgba_png"] = save_image("rgba.png", Image.fromarray(np.dstack([rgb, alpha])))

    files["l_png"] = save_image("l.png", Image.fromarray(rgb[:, :, 0]))
    la = Image.merge("LA", [Image.new("L", (w, h), 0), Image.new("L", (w, h), 128)])
    files["la_png"] = save_image("la.png", la)

    p = Image.fromarray((np.arange(h * w) % 4).astype(np.uint8).reshape(h, w))
    p.putpalette([255, 0, 0, 0, 255, 0, 0, 0, 255, 10, 20, 30])
    files["p_png"] = save_image("p.png", p)
    files["p_trns_png"] = save_image("p_trns.png", p, transparency=0)

    checker = ((np.indices((h, w)).sum(axis=0) % 2) * 255).astype(np.uint8)
    files["bilevel_png"] = save_image("bilevel.png", Image.fromarray(checker).convert("1"))

    cmyk = Image.new("CMYK", (w, h), (0, 255, 0, 0))  # pure magenta ink
    files["cmyk_jpg"] = save_image("cmyk.jpg", cmyk, quality=95)
    files["cmyk_tif"] = save_image("cmyk.tif", cmyk)

    grad16 = np.tile(np.linspace(0, 65535, 256).round().astype(np.uint16), (4, 1))
    files["i16_png"] = save_image("i16.png", Image.fromarray(grad16))
    grad32 = np.tile(np.linspace(0, 65535, 64).round().astype(np.int32), (4, 1))
    files["i32_tif"] = save_image("i32.tif", Image.fromarray(grad32))
    gradf = np.tile(np.linspace(0.0, 1.0, 64, dtype=np.float32), (4, 1))
    files["f_tif"] = save_image("f.tif", Image.fromarray(gradf))

    frames = [Image.new("RGB", (w, h), c) for c in ((255, 0, 0), (0, 0, 255))]
    files["gif_anim"] = save_image(
        "anim.gif", frames[0], save_all=True, append_images=frames[1:], duration=100, loop=0
    )
    return files


# =============================================================================================
# End of sources/writers fixtures.
# =============================================================================================


# =============================================================================================
# Model fixtures: tiny random CLIPSeg checkpoints in the real formats (see factories.py).
# =============================================================================================


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random rd64-refined model saved with transformers' ``save_pretrained``."""
    from factories import save_random_hf_checkpoint

    return save_random_hf_checkpoint(tmp_path_factory.mktemp("tiny-rd64-refined"), size="tiny")


@pytest.fixture(scope="session")
def tiny_reference(tiny_model_dir: Path):
    """The transformers model behind ``tiny_model_dir`` (eval mode)."""
    from transformers import CLIPSegForImageSegmentation

    return CLIPSegForImageSegmentation.from_pretrained(tiny_model_dir).eval()


@pytest.fixture(scope="session")
def tiny_segmenter(tiny_model_dir: Path):
    """Our Segmenter on the tiny model (CPU, fp32); shared, do not release its towers."""
    from clipseg_cli.segmenter import Segmenter

    return Segmenter.load(str(tiny_model_dir), device="cpu", precision="fp32")


@pytest.fixture
def uninstall(monkeypatch: pytest.MonkeyPatch) -> Callable[[str], None]:
    """``uninstall("ray")``: from now on in this test, importing the package (or any of its
    modules) fails as if it were not installed."""

    def hide(package: str) -> None:
        import builtins

        real_import = builtins.__import__

        def without(name: str, *args: object, **kwargs: object) -> object:
            if name == package or name.startswith(package + "."):
                raise ImportError(f"No module named {name!r}")
            return real_import(name, *args, **kwargs)

        monkeypatch.setattr(builtins, "__import__", without)

    return hide


@pytest.fixture
def cache_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A fresh, empty ``CLIPSEG_CACHE`` for one test (graphs, text embeddings, tuning)."""
    folder = tmp_path / "cache"
    monkeypatch.setenv("CLIPSEG_CACHE", str(folder))
    return folder
