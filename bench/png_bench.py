"""Mask PNG encoders on 1024x768 masks: what ``writers.write_mask`` uses, and why.

    python bench/png_bench.py [--masks 40] [--repeat 7]

Compares OpenCV's ``cv2.imencode`` (compression 1, RLE strategy; with libpng's default row
filters and with filters off), Pillow at level 1, and the hand-written encoder clipseg used
before (rows unfiltered, zlib level 1 with ``Z_RLE``, written out below for the comparison).
Masks are thresholded upsampled low-resolution noise: large smooth blobs, like CLIPSeg's. Prints
the best mean time per mask over the repeats and the mean file size; every encoding is decoded
back and checked against the mask.
"""

from __future__ import annotations

import argparse
import io
import platform
import struct
import time
import zlib
from collections.abc import Callable

import cv2
import numpy as np
from PIL import Image

OPENCV_RLE = [
    cv2.IMWRITE_PNG_COMPRESSION,
    1,
    cv2.IMWRITE_PNG_STRATEGY,
    cv2.IMWRITE_PNG_STRATEGY_RLE,
]
OPENCV_RLE_NO_FILTER = [*OPENCV_RLE, cv2.IMWRITE_PNG_FILTER, cv2.IMWRITE_PNG_FILTER_NONE]


def hand_written_png(data: np.ndarray) -> bytes:
    """The encoder clipseg had before (8-bit grey, rows unfiltered, zlib level 1, Z_RLE)."""
    height, width = data.shape
    rows = np.empty((height, width + 1), np.uint8)
    rows[:, 0] = 0
    rows[:, 1:] = data
    deflate = zlib.compressobj(1, zlib.DEFLATED, 15, 8, zlib.Z_RLE)
    pixels = deflate.compress(rows.tobytes()) + deflate.flush()

    def chunk(kind: bytes, body: bytes) -> bytes:
        crc = zlib.crc32(kind + body) & 0xFFFFFFFF
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", crc)

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", pixels) + chunk(b"IEND", b"")
    )


def pillow_png(data: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(data).save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()


ENCODERS: dict[str, Callable[[np.ndarray], bytes]] = {
    "cv2.imencode, level 1, RLE (what write_mask uses, + filter NONE)": lambda m: cv2.imencode(
        ".png", m, OPENCV_RLE_NO_FILTER
    )[1].tobytes(),
    "cv2.imencode, level 1, RLE, libpng's default filters": lambda m: cv2.imencode(
        ".png", m, OPENCV_RLE
    )[1].tobytes(),
    "hand-written encoder (clipseg before)": hand_written_png,
    "Pillow, compress_level=1": pillow_png,
}


def masks(count: int, size: tuple[int, int] = (768, 1024)) -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    out = []
    for _ in range(count):
        low = rng.random((22, 22)).astype(np.float32)
        up = cv2.resize(low, (size[1], size[0]), interpolation=cv2.INTER_CUBIC)
        out.append(np.where(up > 0.55, 255, 0).astype(np.uint8))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--masks", type=int, default=40)
    parser.add_argument("--repeat", type=int, default=7)
    args = parser.parse_args()
    data = masks(args.masks)
    print(f"{args.masks} masks of 1024x768, best of {args.repeat}; {platform.processor() or ''}")
    print(f"opencv {cv2.__version__}, zlib {zlib.ZLIB_RUNTIME_VERSION}")
    for name, encode in ENCODERS.items():
        for mask in data[:3]:
            decoded = np.asarray(Image.open(io.BytesIO(encode(mask))))
            assert decoded.dtype == np.uint8 and (decoded == mask).all(), name
        best = float("inf")
        for _ in range(args.repeat):
            start = time.perf_counter()
            for mask in data:
                encode(mask)
            best = min(best, (time.perf_counter() - start) / len(data))
        size = np.mean([len(encode(mask)) for mask in data]) / 1024
        print(f"{best * 1e3:6.2f} ms/mask  {size:5.1f} KiB  {name}")


if __name__ == "__main__":
    main()
