"""Deterministic photo-like JPEGs for the benchmark.

Pure noise or flat colours would make JPEG decoding unrealistically slow or fast, so each image
has what real photos have: a smooth sky/ground gradient, a few blurred blobs and rectangles
("objects"), fine texture and mild sensor noise, saved at JPEG quality 90.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import cv2
import numpy as np

DEFAULT_SIZE = (1024, 768)  # (width, height)


def _render(rng: np.random.Generator, width: int, height: int) -> np.ndarray:
    """One RGB uint8 image; all randomness comes from ``rng`` so output is reproducible."""
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    yy /= height
    xx /= width

    # Vertical two-tone gradient (sky over ground) with a slight horizontal tilt.
    top, bottom = rng.uniform(0, 255, size=(2, 3)).astype(np.float32)
    horizon = rng.uniform(0.35, 0.65)
    t = np.clip((yy - horizon + 0.2 * (xx - 0.5) * rng.uniform(-1, 1)) * 3 + 0.5, 0, 1)
    img = top * (1 - t[..., None]) + bottom * t[..., None]

    # Objects: filled ellipses and rectangles, then the whole picture is blurred so their edges
    # look like out-of-focus photo content rather than vector art.
    layer = img.copy()
    for _ in range(int(rng.integers(3, 8))):
        color = tuple(float(c) for c in rng.uniform(0, 255, size=3))
        cx, cy = int(rng.integers(0, width)), int(rng.integers(0, height))
        if rng.random() < 0.6:
            axes = (
                int(rng.integers(width // 20, width // 4)),
                int(rng.integers(height // 20, height // 4)),
            )
            angle = float(rng.uniform(0, 180))
            cv2.ellipse(layer, (cx, cy), axes, angle, 0, 360, color, thickness=-1)
        else:
            w, h = (
                int(rng.integers(width // 16, width // 3)),
                int(rng.integers(height // 16, height // 3)),
            )
            cv2.rectangle(layer, (cx - w // 2, cy - h // 2), (cx + w // 2, cy + h // 2), color, -1)
    sigma = float(rng.uniform(1.5, 4.0))
    img = cv2.GaussianBlur(layer, (0, 0), sigmaX=sigma)

    # Texture: low-resolution noise upscaled (grass/cloud-like), then per-pixel sensor noise.
    small = rng.normal(0, 1, size=(height // 16, width // 16, 1)).astype(np.float32)
    texture = cv2.resize(small, (width, height), interpolation=cv2.INTER_CUBIC)
    img += texture[..., None] * float(rng.uniform(4, 12))
    # Uniform integer noise (std ~3 levels) instead of Gaussian: drawing 2.4M normals costs
    # ~30 ms per image, which would dominate generating 1000 images for the RSS run.
    noise = rng.integers(-5, 6, size=img.shape, dtype=np.int8)
    return np.clip(img + noise, 0, 255).astype(np.uint8)


def make_photo_like_jpegs(
    folder: Path, count: int, size: tuple[int, int] = DEFAULT_SIZE, seed: int = 0
) -> list[Path]:
    """Create ``count`` JPEGs ``img_00000.jpg``... in ``folder`` and return their paths.

    Image ``i`` depends only on ``(seed, i, size)``, so growing ``count`` later reuses the files
    already there, and existing files are skipped to make reruns cheap.
    """
    width, height = size
    folder.mkdir(parents=True, exist_ok=True)
    paths: list[Path] = []
    for i in range(count):
        path = folder / f"img_{i:05d}.jpg"
        paths.append(path)
        if path.exists():
            continue
        rng = np.random.default_rng([seed, i, width, height])
        rgb = _render(rng, width, height)
        # Write to a temp name and rename, so an interrupted run never leaves a truncated JPEG
        # that a later run would skip as "already there".
        tmp = path.with_suffix(".tmp.jpg")
        if not cv2.imwrite(
            str(tmp), cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, 90]
        ):
            raise OSError(f"could not write {tmp}")
        tmp.replace(path)
    return paths


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("folder", type=Path)
    parser.add_argument("--count", type=int, default=16)
    parser.add_argument("--width", type=int, default=DEFAULT_SIZE[0])
    parser.add_argument("--height", type=int, default=DEFAULT_SIZE[1])
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    paths = make_photo_like_jpegs(args.folder, args.count, (args.width, args.height), args.seed)
    print(f"{len(paths)} images in {args.folder}")


if __name__ == "__main__":
    main()
