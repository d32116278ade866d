"""The review page's thumbnails: small JPEGs under ``OUT/.clipseg/report/``.

It owns how a thumbnail looks (an output alone, or the input tinted with a mask in the overlay
colours of :mod:`clipseg_cli.io.palette`), its name (a hash of its sources, so an unchanged one
is reused) and the cleanup of those no page links to any more. It never decides which source a
card shows (:mod:`.data` does) and never deletes a file whose name it did not make.
"""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageOps

from clipseg_cli.io.files import atomic_write
from clipseg_cli.io.palette import OVERLAY_COLOUR, OVERLAY_OPACITY

_JPEG_QUALITY = 82
_THUMB_NAME = re.compile(r"^[0-9a-f]{20}\.jpg$")


@dataclass(frozen=True)
class ThumbJob:
    """One thumbnail to make: from ``source`` alone, or ``source`` tinted with ``mask``."""

    dest: str
    source: str
    mask: str | None = None


def thumb_name(*parts: str) -> str:
    """The file name of the thumbnail made from ``parts`` (its size and relative sources)."""
    digest = hashlib.sha1("\0".join(parts).encode("utf-8", "surrogateescape")).hexdigest()
    return digest[:20] + ".jpg"


def _open_rgb(path: str, size: int) -> Image.Image:
    with Image.open(path) as image:
        image.draft("RGB", (size, size))  # JPEG: decode at reduced scale, much faster
        image = ImageOps.exif_transpose(image)  # inputs may be rotated; masks match the upright
        if image.mode in ("RGBA", "LA", "PA") or (
            image.mode == "P" and "transparency" in image.info
        ):
            # Cutouts: show transparency as mid grey rather than black.
            rgba = image.convert("RGBA")
            background = Image.new("RGBA", rgba.size, (128, 128, 128, 255))
            image = Image.alpha_composite(background, rgba)
        image = image.convert("RGB")
    image.thumbnail((size, size), Image.Resampling.LANCZOS)
    return image


def make_thumbnail(job: ThumbJob, size: int) -> bool:
    """Write one thumbnail unless an up-to-date one exists; False when it cannot be made."""
    dest = Path(job.dest)
    sources = [job.source] + ([job.mask] if job.mask else [])
    try:
        newest = max(os.stat(s).st_mtime for s in sources)  # noqa: PTH116
        if dest.is_file() and dest.stat().st_mtime >= newest:
            return True
        image = _open_rgb(job.source, size)
        if job.mask is not None:
            with Image.open(job.mask) as mask_file:
                mask = mask_file.convert("L").resize(image.size, Image.Resampling.BILINEAR)
            mask = mask.point(lambda v: 255 if v >= 128 else 0)
            tinted = Image.blend(
                image, Image.new("RGB", image.size, OVERLAY_COLOUR), OVERLAY_OPACITY
            )
            image = Image.composite(tinted, image, mask)
        atomic_write(dest, lambda f: image.save(f, "JPEG", quality=_JPEG_QUALITY))
    except (OSError, ValueError, Image.DecompressionBombError):
        # A missing, unreadable or huge file only costs this card its picture.
        return False
    return True


def make_thumbnails(jobs: Sequence[ThumbJob], size: int) -> dict[str, bool]:
    """Make every thumbnail (in threads); whether each destination could be made."""
    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        # Pillow releases the GIL while decoding and resizing, so threads scale.
        return dict(
            zip(
                (j.dest for j in jobs),
                pool.map(lambda j: make_thumbnail(j, size), jobs),
                strict=True,
            )
        )


def remove_stale_thumbnails(thumb_dir: Path, keep: Iterable[str]) -> None:
    """Delete the thumbnails in ``thumb_dir`` that are not in ``keep`` (names this module makes
    only: never anything a user put there)."""
    keep = {Path(p).name for p in keep}
    try:
        entries = list(thumb_dir.iterdir())
    except OSError:
        return
    for entry in entries:
        if _THUMB_NAME.match(entry.name) and entry.name not in keep:
            entry.unlink(missing_ok=True)
