"""Which prediction (or image and prompt) is compared with which ground-truth file: :class:`Pair`.

It owns the matching rules below and the per-file error entries (``{"file", "error"}``,
:func:`file_error`) for whatever is left unmatched. It only lists folders and parses file
names: it never opens an image or a mask, never computes a number and never loads a model.

Matching predictions to ground truth (``--pred DIR --gt DIR``)
---------------------------------------------------------------
Files are walked recursively (hidden files skipped) and keyed by their relative path without
the extension: ground truth ``gt/x/dog.png`` has key ``x/dog``. A prediction is keyed the same
way, except that a ``clipseg segment`` output ``<input name>.<prompt slug>.<kind>.png``
(kind ``soft`` or ``mask``, parsed by :func:`clipseg_cli.io.naming.parse_output_name`) is keyed
by its input's name without extension, so ``pred/x/dog.jpg.a-dog.soft.png`` also has key
``x/dog``, with slug ``a-dog``. For each ground-truth file:

1. a prediction at the very same relative path wins;
2. else the predictions with the same key (``--pred-slug SLUG`` keeps only that prompt's);
3. else, for ground truth laid out one folder per prompt (``gt/<slug>/x/dog.png``), the
   predictions with key ``x/dog`` and that slug.

Several prompts for one key is an error (choose with ``--pred-slug``); ``soft`` is preferred
over ``mask`` for the same prompt. The class of a pair (for mIoU) is the prompt slug when known,
else the first folder of the ground-truth path, else one class for everything.

Images + prompts (``--images DIR --gt DIR --prompt TEXT``)
----------------------------------------------------------
Image ``images/x/dog.jpg`` is compared with ground truth of key ``x/dog``; with several prompts
the ground truth of prompt P lies under ``gt/<slug of P>/``. Predictions can be kept as 16-bit
soft PNGs named like ``clipseg segment``'s, so a later ``--pred`` run finds them.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from clipseg_cli.errors import NoInputsError
from clipseg_cli.io import sources
from clipseg_cli.io.naming import parse_output_name, prompt_slugs
from clipseg_cli.io.paths import display_path

#: The ``clipseg segment`` outputs read as predictions, preferred in this order for one prompt.
PREDICTION_KINDS = ("soft", "mask")


@dataclass
class Pair:
    """One comparison: a ground-truth file and its prediction file or image + prompt index."""

    gt: Path
    class_id: str
    pred: Path | None = None
    image: Path | None = None
    image_key: PurePosixPath | None = None
    prompt_index: int | None = None
    prompt: str | None = None


def file_error(path: Path, reason: str) -> dict[str, str]:
    """One per-file problem as the report lists it: ``{"file": shown path, "error": reason}``."""
    return {"file": display_path(path), "error": reason}


@dataclass(frozen=True)
class _PredictionFile:
    path: Path
    rel: PurePosixPath
    key: PurePosixPath
    slug: str | None
    kind: str | None


def _walk(folder: Path) -> list[tuple[PurePosixPath, Path]]:
    """``(relative path, path)`` of the image-like files under ``folder``, sorted."""
    found = []
    for path in folder.rglob("*"):
        rel = PurePosixPath(path.relative_to(folder).as_posix())
        # Hidden files include the temp files of atomic writes in progress.
        if any(part.startswith(".") for part in rel.parts) or not path.is_file():
            continue
        if sources.looks_like_image(path):
            found.append((rel, path))
    return sorted(found, key=lambda item: item[0].parts)


def _walk_ground_truth(gt_dir: Path) -> list[tuple[PurePosixPath, Path]]:
    gts = _walk(gt_dir)
    if not gts:
        raise NoInputsError(f"no ground-truth images in {display_path(gt_dir)}")
    return gts


def _key(rel: PurePosixPath) -> PurePosixPath:
    return rel.with_name(rel.stem)


def _prediction_file(rel: PurePosixPath, path: Path) -> _PredictionFile:
    name = parse_output_name(rel.name)
    if name is None or name.kind not in PREDICTION_KINDS:
        return _PredictionFile(path, rel, _key(rel), None, None)
    key = rel.with_name(PurePosixPath(name.input_name).stem)
    return _PredictionFile(path, rel, key, name.slug, name.kind)


def _choose_prediction(
    gt_rel: PurePosixPath, candidates: list[_PredictionFile]
) -> tuple[_PredictionFile | None, str | None]:
    """The prediction for one ground-truth file, or None and the reason."""
    exact = [c for c in candidates if c.rel == gt_rel]
    if exact:
        return exact[0], None
    plain = [c for c in candidates if c.slug is None]
    slugs = sorted({c.slug for c in candidates if c.slug is not None})
    if len(plain) + len(slugs) > 1:
        names = [c.rel.name for c in plain] + [f"slug {s}" for s in slugs]
        return None, f"several predictions match ({', '.join(names)}); choose with --pred-slug"
    if plain:
        return plain[0], None
    if slugs:
        named = sorted(candidates, key=lambda c: PREDICTION_KINDS.index(c.kind or "mask"))
        return named[0], None
    return None, "no prediction for this ground truth"


def pair_predictions(
    gt_dir: Path, pred_dir: Path, pred_slug: str | None = None
) -> tuple[list[Pair], list[dict[str, str]]]:
    """Match prediction files to ground-truth files (rules in the module docstring).

    Returns:
        The pairs, in ground-truth order, and per-file errors (``{"file", "error"}``) for
        ground truth without a prediction, ambiguous matches and predictions without ground
        truth.

    Raises:
        NoInputsError: the ground-truth folder holds no image file.
    """
    gts = _walk_ground_truth(gt_dir)
    by_key: dict[PurePosixPath, list[_PredictionFile]] = defaultdict(list)
    for rel, path in _walk(pred_dir):
        pred = _prediction_file(rel, path)
        if pred_slug is None or pred.slug == pred_slug:
            by_key[pred.key].append(pred)
    pairs: list[Pair] = []
    errors: list[dict[str, str]] = []
    used: set[Path] = set()
    for rel, path in gts:
        key = _key(rel)
        candidates = by_key.get(key, [])
        if not candidates and len(rel.parts) > 1:
            # One folder per prompt: gt/<slug>/x/dog.png <- pred/x/dog.jpg.<slug>.soft.png
            inner = PurePosixPath(*rel.parts[1:])
            candidates = [c for c in by_key.get(_key(inner), []) if c.slug == rel.parts[0]]
        used.update(c.path for c in candidates)
        chosen, reason = _choose_prediction(rel, candidates)
        if chosen is None:
            errors.append(file_error(path, reason or "no prediction"))
            continue
        class_id = chosen.slug or (rel.parts[0] if len(rel.parts) > 1 else "")
        pairs.append(Pair(gt=path, pred=chosen.path, class_id=class_id))
    for preds in by_key.values():
        for pred in preds:
            if pred.path not in used:
                errors.append(file_error(pred.path, "no ground truth for this prediction"))
    return pairs, errors


def pair_images(
    gt_dir: Path, images_dir: Path, prompts: Sequence[str]
) -> tuple[list[Pair], list[dict[str, str]]]:
    """Match images (and prompts) to ground-truth files (rules in the module docstring).

    Raises:
        NoInputsError: the ground-truth folder holds no image file.
    """
    gts = _walk_ground_truth(gt_dir)
    gt_by_key: dict[PurePosixPath, list[Path]] = defaultdict(list)
    for rel, path in gts:
        gt_by_key[_key(rel)].append(path)
    slugs = prompt_slugs(list(prompts))
    pairs: list[Pair] = []
    errors: list[dict[str, str]] = []
    used: set[Path] = set()
    for rel, image in _walk(images_dir):
        key = _key(rel)
        found = False
        for k, (prompt, slug) in enumerate(zip(prompts, slugs, strict=True)):
            candidates = gt_by_key.get(PurePosixPath(slug) / key, [])
            if not candidates and len(prompts) == 1:
                candidates = gt_by_key.get(key, [])
            if not candidates:
                continue
            found = True
            used.update(candidates)
            if len(candidates) > 1:
                names = ", ".join(sorted(p.name for p in candidates))
                errors.append(file_error(image, f"several ground-truth files match ({names})"))
                continue
            pairs.append(
                Pair(
                    gt=candidates[0],
                    class_id=slug,
                    image=image,
                    image_key=rel,
                    prompt_index=k,
                    prompt=prompt,
                )
            )
        if not found:
            where = "gt/<prompt slug>/" if len(prompts) > 1 else "the --gt folder"
            errors.append(
                file_error(image, f"no ground truth for this image (looked for {key}.* in {where})")
            )
    for _, path in gts:
        if path not in used:
            errors.append(file_error(path, "no image for this ground truth"))
    return pairs, errors
