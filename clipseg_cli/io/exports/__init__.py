"""Dataset exports (``--export coco,yolo``), built from every finished image's part.

Each image's part (its key, where it is, its size, its instances with their COCO RLE, box,
area, score and polygon) is appended to ``OUT/.clipseg/exports.jsonl`` before that image's
ledger line, so after any crash every ledger line has its part. At the end of every run the
exports are rebuilt from the latest part of each key the ledger calls ``ok``, in key order:
an interrupted and resumed run writes the same files as an uninterrupted one, a run over a
grown folder extends them, a failed image is in none of them. The final files are written
atomically. Image and annotation ids come from the keys (:func:`.coco.image_ids`), so they
stay the same across runs.

A video's part holds its frames' parts (``frames``: each written frame is an image, its PNG
under ``NAME.frames/`` in ``--out``, its instances with a ``track`` id that follows an object
from frame to frame); the exports take every frame as an image of that video.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

from clipseg_cli.io.exports import coco, yolo
from clipseg_cli.io.naming import COCO_NAME, YOLO_DIR


def latest_parts(path: Path, keep: set[str]) -> list[dict]:
    """The last part of each key in ``keep`` from the parts file, in key order (a line cut
    short by a crash is skipped: its image has no ledger line)."""
    parts: dict[str, dict] = {}
    if path.exists():
        with path.open("rb") as handle:
            for raw in handle:
                if not raw.endswith(b"\n"):
                    break
                try:
                    part = json.loads(raw)
                except json.JSONDecodeError:
                    continue
                if isinstance(part, dict) and part.get("key") in keep:
                    parts[part["key"]] = part
    return [parts[key] for key in sorted(parts)]


def frames_as_images(parts: list[dict]) -> list[dict]:
    """The parts with each video's part replaced by its frames' (each naming its ``video``)."""
    images = []
    for part in parts:
        if "frames" in part:
            images += [frame | {"video": part["key"]} for frame in part["frames"]]
        else:
            images.append(part)
    return images


def write_exports(
    out_dir: Path,
    formats: Sequence[str],
    parts: list[dict],
    prompts: Sequence[str],
    *,
    coco_segmentation: str = "rle",
    yolo_copy: bool = False,
    floors: dict | None = None,
) -> list[Path]:
    """Write every requested export; returns the paths written. ``floors``: what decided which
    objects became instances (threshold, minimum area and score, split), recorded in both."""
    parts = frames_as_images(parts)
    written = []
    if "coco" in formats:
        path = out_dir / COCO_NAME
        coco.write(path, parts, prompts, segmentation=coco_segmentation, floors=floors)
        written.append(path)
    if "yolo" in formats:
        folder = out_dir / YOLO_DIR
        yolo.write_dataset(folder, parts, prompts, copy=yolo_copy, floors=floors)
        written.append(folder)
    return written
