"""Every name clipseg writes under ``--out``, and the rule that turns it back into its parts.

* The run's own files: the log, the summary, the report and the hidden state folder (ledger,
  lock, thumbnails) that a rerun finds again.
* The output kinds: one table of what ``--save`` can ask for, its file extension, whether it is
  written once per prompt, and which command writes it.
* Output names: ``<input name>.<prompt slug>.<kind>.<ext>`` (no slug for per-image kinds),
  mirrored under ``--out`` (:func:`output_path`), and :func:`parse_output_name`, its inverse,
  for the commands that read outputs back (``eval``). Prompt slugs (:func:`prompt_slugs`) and
  case-insensitive collisions (:func:`casefold_collisions`) are settled here too.

Standard library only: a rerun over a finished folder reads these names without numpy.
"""

from __future__ import annotations

import hashlib
import os
import re
import unicodedata
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from clipseg_cli.io.paths import display_path

# -- the run's own files --------------------------------------------------------------------------

#: The JSON-lines log, one row per input per run (``--log`` chooses another place).
LOG_NAME = "clipseg-log.jsonl"
#: The last run's summary (``counts``, ``config``, ``model``...).
SUMMARY_NAME = "clipseg-summary.json"
#: The review page (``--report``).
REPORT_NAME = "report.html"
#: The hidden state folder: resume state, the lock, the report's thumbnails. Hidden, so a later
#: run over a folder that contains ``--out`` never lists what is inside as inputs.
STATE_DIR = ".clipseg"
LEDGER_NAME = "ledger.jsonl"
LOCK_NAME = "lock"
#: Each finished image's part of the exports (instances, encoded), next to the ledger.
EXPORT_PARTS_NAME = "exports.jsonl"
#: The exports (``--export``) under the output folder.
COCO_NAME = "coco.json"
YOLO_DIR = "yolo"
#: Thumbnails of the review page, relative to the output folder.
THUMBNAIL_DIR = PurePosixPath(STATE_DIR) / "report"


# -- output kinds ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class OutputKind:
    """What one ``--save`` kind is on disk."""

    extension: str
    per_prompt: bool  # one file per prompt; else one per image (labels)


#: Every ``--save`` kind. What each holds is in the README's output table.
OUTPUT_KINDS: dict[str, OutputKind] = {
    "mask": OutputKind("png", per_prompt=True),
    "soft": OutputKind("png", per_prompt=True),
    "overlay": OutputKind("png", per_prompt=True),
    "cutout": OutputKind("png", per_prompt=True),
    "logits": OutputKind("npy", per_prompt=True),
    "labels": OutputKind("png", per_prompt=False),
    "instances": OutputKind("png", per_prompt=True),
    "matte": OutputKind("png", per_prompt=True),
    "composite": OutputKind("png", per_prompt=True),
}
#: The kinds each command can save, in the order its help lists them; the first is the default.
COMMAND_KINDS: dict[str, tuple[str, ...]] = {
    "segment": ("mask", "soft", "overlay", "cutout", "logits", "labels", "instances"),
    "matte": ("matte", "cutout", "composite"),
}


#: ``--export`` formats, written under the output folder from every finished image's instances.
EXPORT_FORMATS = ("coco", "yolo")


def parse_exports(values: Sequence[str]) -> tuple[str, ...]:
    """``["coco,yolo"]`` or ``["coco", "yolo"]`` -> ``("coco", "yolo")``, order kept.

    Raises:
        ValueError: an unknown format.
    """
    formats: list[str] = []
    for value in values:
        for name in (part.strip().lower() for part in value.split(",")):
            if name and name not in EXPORT_FORMATS:
                raise ValueError(
                    f"--export {name}: unknown format; choose from {', '.join(EXPORT_FORMATS)}"
                )
            if name and name not in formats:
                formats.append(name)
    return tuple(formats)


def parse_kinds(values: Sequence[str], command: str = "segment") -> tuple[str, ...]:
    """``["mask,soft", "overlay"]`` -> ``("mask", "soft", "overlay")``, order kept, no repeats;
    nothing given -> the command's default kind.

    Raises:
        ValueError: a kind the command cannot save.
    """
    allowed = COMMAND_KINDS[command]
    kinds: list[str] = []
    for value in values:
        for kind in (part.strip().lower() for part in value.split(",")):
            if not kind:
                continue
            if kind not in allowed:
                choices = ", ".join(allowed)
                raise ValueError(
                    f"--save {kind}: unknown kind for {command}; choose from {choices}"
                )
            if kind not in kinds:
                kinds.append(kind)
    return tuple(kinds) or (allowed[0],)


# -- output names ---------------------------------------------------------------------------------

#: Longest slug :func:`prompt_slugs` returns, hash suffix included (plus "-N" in the
#: pathological case of identical prompts).
SLUG_MAX_LEN = 48
_HASH_LEN = 6


def _sha6(text: str) -> str:
    return hashlib.sha1(text.encode("utf-8", "surrogatepass")).hexdigest()[:_HASH_LEN]


def _base_slug(prompt: str) -> str:
    # NFKD splits accents off letters so "café" -> "cafe" instead of "caf".
    ascii_text = unicodedata.normalize("NFKD", prompt).encode("ascii", "ignore").decode("ascii")
    slug = re.sub(r"[^a-z0-9]+", "-", ascii_text.lower()).strip("-")
    slug = slug[:SLUG_MAX_LEN].rstrip("-")
    return slug or "prompt"


def prompt_slugs(prompts: Sequence[str]) -> list[str]:
    """One filesystem-safe slug per prompt, unique within the list.

    A slug is lowercase ASCII letters, digits and ``-`` (no dots, slashes or spaces), never
    empty (``prompt`` when nothing is left) and at most :data:`SLUG_MAX_LEN` characters:
    ``"a dog"`` -> ``"a-dog"``, ``"../../x"`` -> ``"x"``. When several prompts give the same
    slug (``"a dog"``/``"A-Dog"``), each of those gets ``-`` + the first 6 hex digits of the
    SHA-1 of its exact prompt text, so the result depends only on the prompts, not their order.
    Identical prompts additionally get ``-2``, ``-3``... in list order.
    """
    bases = [_base_slug(p) for p in prompts]
    counts = Counter(bases)
    slugs = []
    for prompt, base in zip(prompts, bases, strict=True):
        if counts[base] > 1:
            stem = base[: SLUG_MAX_LEN - _HASH_LEN - 1].rstrip("-")
            base = f"{stem}-{_sha6(prompt)}"
        slugs.append(base)
    # Guarantee uniqueness even for identical prompts or a prompt that spells another's
    # hashed slug; the sets are tiny.
    taken: set[str] = set()
    unique = []
    for slug in slugs:
        candidate, n = slug, 1
        while candidate in taken:
            n += 1
            candidate = f"{slug}-{n}"
        taken.add(candidate)
        unique.append(candidate)
    return unique


_PART_RE = re.compile(r"^[A-Za-z0-9_-]+$")


def output_path(out_dir: Path, key: PurePosixPath, kind: str, slug: str | None = None) -> Path:
    """Where the ``kind`` output of input ``key`` goes.

    ``out_dir / key.parent / "{key.name}.{slug}.{kind}.{ext}"`` with the kind's extension from
    :data:`OUTPUT_KINDS` (no slug for per-image outputs such as ``labels``). Keeping the input's
    full name including its extension keeps ``dog.jpg`` and ``dog.png`` apart; slugs contain no
    dots, so names split unambiguously (:func:`parse_output_name`).

    Raises:
        ValueError: ``key`` is absolute, empty or contains ``..``; ``kind`` is unknown or
            ``slug`` is not a plain ``[A-Za-z0-9_-]`` word; or the result would lie outside
            ``out_dir``.
    """
    if kind not in OUTPUT_KINDS:
        raise ValueError(f"unknown output kind {kind!r}")
    ext = OUTPUT_KINDS[kind].extension
    if key.is_absolute() or not key.name or ".." in key.parts:
        raise ValueError(f"unsafe output key {display_path(str(key))!r}")
    if slug is not None and not _PART_RE.match(slug):
        raise ValueError(f"invalid slug {slug!r} for an output file name")
    name = ".".join(p for p in (key.name, slug, kind, ext) if p is not None)
    result = out_dir / Path(*key.parent.parts) / name
    # Defence in depth against a key that slipped through (e.g. a backslash on Windows).
    root = os.path.normpath(os.path.abspath(out_dir))  # noqa: PTH100
    target = os.path.normpath(os.path.abspath(result))  # noqa: PTH100
    if os.path.commonpath([root, target]) != root or target == root:
        raise ValueError(f"output path {display_path(result)!r} escapes {display_path(out_dir)!r}")
    return result


def casefold_collisions(keys: Iterable[PurePosixPath]) -> dict[PurePosixPath, PurePosixPath]:
    """Disambiguate keys whose outputs would overwrite each other on case-insensitive disks.

    Keys are compared after Unicode NFC normalisation and case folding (macOS and Windows
    filesystems ignore both), on the whole path so that ``A/dog.jpg`` and ``a/dog.jpg`` also
    collide. Each colliding key maps to the same key with ``~`` + the first 6 hex digits of the
    SHA-1 of the exact key string appended after its full name (``Dog.jpg`` ->
    ``Dog.jpg~1a2b3c``): the input's name stays a prefix of every output name. Other keys map
    to themselves.
    """
    keys = list(keys)
    folded = Counter(_fold(k) for k in keys)
    mapping: dict[PurePosixPath, PurePosixPath] = {}
    for key in keys:
        if folded[_fold(key)] > 1:
            mapping[key] = key.with_name(f"{key.name}~{_sha6(str(key))}")
        else:
            mapping[key] = key
    return mapping


def _fold(key: PurePosixPath) -> str:
    return unicodedata.normalize("NFC", str(key)).casefold()


_OUTPUT_NAME = re.compile(
    r"^(?P<input>.+?)(?:\.(?P<slug>[a-z0-9][a-z0-9-]*))?\.(?P<kind>"
    + "|".join(OUTPUT_KINDS)
    + r")\.(?P<ext>[a-z0-9]+)$"
)


@dataclass(frozen=True)
class OutputName:
    """The parts of an output file name (see :func:`output_path`)."""

    input_name: str  # the input's file name (with a ``~hash`` suffix when it collided)
    slug: str | None  # None for per-image kinds
    kind: str


def parse_output_name(name: str) -> OutputName | None:
    """The parts of a file name :func:`output_path` makes, or None for any other name.

    ``dog.jpg.a-dog.soft.png`` -> ``("dog.jpg", "a-dog", "soft")``; ``dog.jpg.labels.png`` ->
    ``("dog.jpg", None, "labels")``. The extension must be the kind's, and per-prompt kinds
    need a slug.
    """
    match = _OUTPUT_NAME.match(name)
    if match is None:
        return None
    kind = OUTPUT_KINDS[match["kind"]]
    if match["ext"] != kind.extension or (match["slug"] is None) == kind.per_prompt:
        return None
    return OutputName(match["input"], match["slug"], match["kind"])
