"""``OUT/coco.json``: COCO's instance format, loadable with pycocotools' ``COCO()`` and usable
as detection results by ``COCOeval`` (each annotation has a ``score``).

``images``: ``id``, ``file_name`` (the input's key: its path relative to the input root, as
``--out`` mirrors it), ``width``, ``height``. ``categories``: one per prompt, ``name`` the prompt
text, ids 1, 2, ... in prompt order. ``annotations``: ``id``, ``image_id``, ``category_id``,
``segmentation`` (compressed RLE exactly as pycocotools encodes it, or polygons with
``--coco-segmentation polygon``), ``area``, ``bbox`` ``[x, y, w, h]`` (pycocotools' of the RLE),
``iscrowd`` 0, ``score`` (the mean probability inside). ``info`` records the floors that
decided which objects became instances (``threshold``, ``min_area``, ``min_score``, ``split``).

A video's frames are images with ``video_id`` and ``frame_index`` (and ``file_name`` the
frame's PNG under ``--out``: ``clip.mp4.frames/000012.png``), listed in ``videos`` (``id``,
``name``: the video's key, ``frames``); their annotations carry ``track_id``, the same for one
object over the frames (instances that overlap the previous frame's, IoU matched), so the
export is a track-annotated sequence (the fields of TAO and YouTube-VIS).

Ids stay the same across runs and growing folders: an image's id is a 48-bit number from the
SHA-1 of its key, an annotation's the image's id times 1000 plus the instance's id within the
image (at most 999 instances per image).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from pathlib import Path

from clipseg_cli.io.files import write_json_atomic
from clipseg_cli.version import __version__


def _hash_id(key: str, salt: int = 0) -> int:
    digest = hashlib.sha1(f"{key}\0{salt}".encode("utf-8", "surrogatepass")).hexdigest()
    return int(digest[:12], 16) or 1


def image_ids(keys: Sequence[str]) -> dict[str, int]:
    """Each key's image id; the (astronomically rare) collisions are resolved in key order by
    hashing again, so the ids depend on the keys alone."""
    ids: dict[str, int] = {}
    taken: set[int] = set()
    for key in sorted(keys):
        salt = 0
        while (value := _hash_id(key, salt)) in taken:
            salt += 1
        ids[key] = value
        taken.add(value)
    return ids


def build(
    parts: list[dict],
    prompts: Sequence[str],
    *,
    segmentation: str = "rle",
    floors: dict | None = None,
) -> dict:
    """The COCO dataset of the parts (in their order); ``info`` records the ``floors``."""
    ids = image_ids([part["key"] for part in parts])
    videos: dict[str, dict] = {}
    images, annotations = [], []
    for part in parts:
        image_id = ids[part["key"]]
        image = {
            "id": image_id,
            "file_name": part["key"],
            "width": part["width"],
            "height": part["height"],
        }
        video = None
        if "video" in part:
            video = videos.setdefault(
                part["video"], {"id": _hash_id(part["video"], 1 << 20), "name": part["video"]}
            )
            video["frames"] = video.get("frames", 0) + 1
            image |= {"video_id": video["id"], "frame_index": part["frame"]}
        images.append(image)
        for instance in part["instances"]:
            if segmentation == "polygon":
                shape: object = [instance["polygon"]]
            else:
                shape = instance["rle"]
            annotation = {
                "id": image_id * 1000 + instance["id"],
                "image_id": image_id,
                "category_id": instance["prompt"] + 1,
                "segmentation": shape,
                "area": instance["area"],
                "bbox": instance["bbox"],
                "iscrowd": 0,
                "score": instance["score"],
            }
            if video is not None:
                annotation["track_id"] = video["id"] * 1000 + instance["track"]
            annotations.append(annotation)
    info: dict = {"description": "clipseg instances", "version": __version__}
    if floors is not None:
        info["floors"] = floors
    dataset: dict = {"info": info}
    if videos:
        dataset["videos"] = list(videos.values())
    return dataset | {
        "images": images,
        "annotations": annotations,
        "categories": [
            {"id": k + 1, "name": prompt, "supercategory": "prompt"}
            for k, prompt in enumerate(prompts)
        ],
    }


def write(
    path: Path,
    parts: list[dict],
    prompts: Sequence[str],
    *,
    segmentation: str,
    floors: dict | None = None,
) -> None:
    """Write :func:`build`'s dataset to ``path``, atomically."""
    write_json_atomic(path, build(parts, prompts, segmentation=segmentation, floors=floors))
