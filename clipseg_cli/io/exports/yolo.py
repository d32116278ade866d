"""``OUT/yolo/``: a segmentation dataset that ultralytics' YOLO loader reads as it is.

* ``data.yaml``: ``path`` (this folder, absolute: ultralytics resolves a relative one against its
  own datasets folder), ``train`` and ``val`` (both ``images``: the loader refuses a file without
  ``val``), ``names`` (``{0: first prompt, ...}``, prompt order), ``clipseg_floors`` (the
  floors that decided which objects became instances: threshold, minimum area and score,
  split; the loader ignores keys it does not know).
* ``images/<key>``: a symbolic link to each input (a copy with ``--yolo-copy``; a PNG of the
  image as displayed when its format is one the loader cannot read, e.g. GIF).
* ``labels/...txt``: one line per instance, ``class x1 y1 x2 y2 ...``, its outer polygon
  normalised to [0, 1]; an empty file for an image without instances. The label of an image is
  where the loader looks for it: the image's path with its last ``/images/`` made ``/labels/``
  and its extension ``.txt``; two images of one folder that would share a label (``dog.jpg``,
  ``dog.png``) get their full name as the label's stem (``dog.png.png``).

Every file is written atomically; files of images no longer exported are removed.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Sequence
from pathlib import Path, PurePosixPath

import yaml

from clipseg_cli.io.files import atomic_target, write_bytes_atomic
from clipseg_cli.io.naming import YOLO_DIR
from clipseg_cli.io.paths import parse_display_path

#: What ultralytics' loader reads (ultralytics.data.utils.IMG_FORMATS).
IMAGE_SUFFIXES = frozenset(
    {"bmp", "dng", "jpeg", "jpg", "mpo", "png", "tif", "tiff", "webp", "pfm", "heic"}
)


def readable(path: str | os.PathLike) -> bool:
    """Whether the YOLO loader can read this image file (by its extension, as it decides)."""
    return Path(path).suffix.lower().lstrip(".") in IMAGE_SUFFIXES


def converted_image_path(out_dir: Path, out_key: PurePosixPath) -> Path:
    """Where the PNG of an unreadable input goes: ``yolo/images/<key>.png``."""
    return out_dir / YOLO_DIR / "images" / Path(*out_key.parent.parts) / f"{out_key.name}.png"


def label_path(image: str) -> str:
    """The label file ultralytics reads for ``image`` (its ``img2label_paths`` rule)."""
    images, labels = f"{os.sep}images{os.sep}", f"{os.sep}labels{os.sep}"
    return labels.join(image.rsplit(images, 1)).rsplit(".", 1)[0] + ".txt"


def _image_names(folder: Path, parts: list[dict]) -> list[Path]:
    """Each part's image path under ``folder/images``, unique in the label it maps to."""
    names, labels = [], set()
    for part in parts:
        if "converted" in part:
            image = Path(parse_display_path(part["converted"]))
        else:
            image = folder / "images" / PurePosixPath(part["key"])
        if label_path(str(image)) in labels:
            image = image.with_name(image.name + image.suffix)
        labels.add(label_path(str(image)))
        names.append(image)
    return names


def _link(image: Path, source: str, copy: bool) -> None:
    """``image`` -> ``source``: a symbolic link, or a copy; replaced atomically."""
    if copy:
        with atomic_target(image) as tmp:
            shutil.copyfile(source, tmp)
        return
    if image.is_symlink() and str(image.readlink()) == source:
        return
    with atomic_target(image) as tmp:
        tmp.unlink()
        tmp.symlink_to(source)


def _label_lines(part: dict) -> str:
    width, height = part["width"], part["height"]
    lines = []
    for instance in part["instances"]:
        polygon = instance["polygon"]
        # COCO's edge coordinates -> pixel centres (what the loader rasterises), normalised.
        xs = [min(max((x - 0.5) / width, 0.0), 1.0) for x in polygon[0::2]]
        ys = [min(max((y - 0.5) / height, 0.0), 1.0) for y in polygon[1::2]]
        coords = " ".join(f"{x:.6f} {y:.6f}" for x, y in zip(xs, ys, strict=True))
        lines.append(f"{instance['prompt']} {coords}\n")
    return "".join(lines)


def write_dataset(
    folder: Path,
    parts: list[dict],
    prompts: Sequence[str],
    *,
    copy: bool,
    floors: dict | None = None,
) -> None:
    """Write (or update) the dataset in ``folder`` for ``parts`` (in key order); ``floors``
    go to ``data.yaml`` as ``clipseg_floors``."""
    keep: set[Path] = set()
    for part, image in zip(parts, _image_names(folder, parts), strict=True):
        if "converted" not in part:
            _link(image, parse_display_path(part["source"]), copy)
        label = Path(label_path(str(image)))
        write_bytes_atomic(label, _label_lines(part).encode())
        keep |= {image, label}
    for sub in ("images", "labels"):
        for path in sorted((folder / sub).rglob("*")) if (folder / sub).exists() else []:
            if (path.is_file() or path.is_symlink()) and path not in keep:
                path.unlink()
    config = {
        "path": os.path.abspath(folder),  # noqa: PTH100 - keep links as named
        "train": "images",
        "val": "images",
        "names": dict(enumerate(prompts)),
    }
    if floors is not None:
        config["clipseg_floors"] = floors
    write_bytes_atomic(folder / "data.yaml", yaml.safe_dump(config, sort_keys=False).encode())
