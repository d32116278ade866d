"""What the review page shows, as the JSON its script reads: one item per input, with per-prompt
stats, the thumbnail to make, the lightbox views and links relative to the page.

It owns finding the files a log names (also after the output folder was moved) and the choice
of each card's picture (see the package docstring). It never opens an image (the thumbnails are
:mod:`.thumbnails`' jobs) and never writes; the log's texts stay data, never markup.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any
from urllib.parse import quote

from clipseg_cli.io.naming import SUMMARY_NAME, THUMBNAIL_DIR
from clipseg_cli.io.paths import parse_display_path
from clipseg_cli.io.report.entries import LogEntries
from clipseg_cli.io.report.thumbnails import ThumbJob, thumb_name

# Kinds shown as images in the lightbox, in order of preference for the default view.
_VIEW_KINDS = ("overlay", "cutout", "mask", "soft", "labels")
_IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".gif", ".bmp", ".avif"}


# -- locating files and making links ----------------------------------------------------------


def _os_path(shown: str) -> str:
    """The OS path a log's display path names; a text ``display_path`` never makes is taken
    literally (a report is best effort)."""
    try:
        return parse_display_path(shown)
    except ValueError:
        return shown


def _inside(path: str, root: str) -> bool:
    return os.path.commonpath([root, path]) == root and path != root


def _locate_output(shown: str, out_dir: str) -> str | None:
    """The absolute path of an output the log names, or None when it is gone.

    The log holds paths as given relative to the run's working directory (or absolute). If the
    report is written from elsewhere, or the folder was moved, the same file is found by the
    longest tail of the path that exists under ``out_dir`` (outputs always lie inside it).
    """
    raw = _os_path(shown)
    direct = os.path.abspath(raw)  # noqa: PTH100 - must not resolve symlinks, like relpath
    if _inside(direct, out_dir) and os.path.isfile(direct):  # noqa: PTH113
        return direct
    # The log writes "/" on POSIX; a backslash there is part of a name, not a separator.
    parts = [p for p in raw.replace(os.sep, "/").split("/") if p not in ("", ".", "..")]
    for start in range(len(parts)):
        candidate = os.path.join(out_dir, *parts[start:])  # noqa: PTH118
        if os.path.isfile(candidate):  # noqa: PTH113
            return candidate
    return None


def _locate_input(shown: str) -> str | None:
    path = os.path.abspath(_os_path(shown))  # noqa: PTH100
    return path if os.path.isfile(path) else None  # noqa: PTH113


def href(target: str, out_dir: str) -> str:
    """A URL relative to the report for an absolute file path; raw bytes percent-encoded."""
    rel = os.path.relpath(target, out_dir)
    # fsencode gives back the original bytes of undecodable names; browsers request %XX bytes.
    return "/".join(quote(os.fsencode(part), safe="") for part in Path(rel).parts)


# -- the page data ----------------------------------------------------------------------------


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value) if value == value and abs(value) != float("inf") else None


def _text(value: Any) -> str | None:
    return value if isinstance(value, str) else None


class PageBuilder:
    """Turns resolved log rows into the page's items, collecting thumbnail jobs in ``jobs``."""

    def __init__(self, out_dir: str, thumbnail_size: int) -> None:
        self.out_dir = out_dir
        self.thumb_dir = os.path.join(out_dir, THUMBNAIL_DIR)  # noqa: PTH118
        self.size = thumbnail_size
        self.jobs: dict[str, ThumbJob] = {}

    def _thumb(self, source: str, mask: str | None = None) -> str:
        # Relative names: a moved or copied folder keeps (and reuses) its thumbnails.
        parts = [os.path.relpath(p, self.out_dir) for p in (source, mask) if p is not None]
        name = thumb_name(str(self.size), *parts)
        dest = os.path.join(self.thumb_dir, name)  # noqa: PTH118
        self.jobs[dest] = ThumbJob(dest, source, mask)
        return dest

    def item(self, index: int, row: dict) -> dict:
        """The page item of one resolved log row (its ``thumb`` entries are destinations until
        :meth:`link_thumbnails`)."""
        outputs: dict[str | None, list[tuple[str, str]]] = {}
        links: dict[str | None, list[dict]] = {}
        for output in row.get("outputs") or []:
            if not isinstance(output, dict) or not isinstance(output.get("path"), str):
                continue
            prompt, kind = _text(output.get("prompt")), _text(output.get("kind")) or "output"
            found = _locate_output(output["path"], self.out_dir)
            if found is None:
                continue
            outputs.setdefault(prompt, []).append((kind, found))
            links.setdefault(prompt, []).append(
                {"kind": kind, "href": href(found, self.out_dir), "name": output["path"]}
            )
        input_path = _locate_input(row["input"]) if isinstance(row.get("input"), str) else None
        prompts = []
        for stats in row.get("prompts") or []:
            if not isinstance(stats, dict):
                continue
            label = _text(stats.get("prompt")) or ""
            # Per-image outputs (labels) belong to every prompt's views.
            mine = outputs.get(label, []) + outputs.get(None, [])
            prompts.append(
                {
                    "prompt": label,
                    "coverage": _number(stats.get("coverage")),
                    "max": _number(stats.get("max")),
                    "mean": _number(stats.get("mean")),
                    "empty": bool(stats.get("empty")),
                    **self._pictures(mine, input_path),
                    "links": links.get(label, []) + links.get(None, []),
                }
            )
        return {
            "id": index,
            "key": _text(row.get("key")) or _text(row.get("input")) or "?",
            "input": _text(row.get("input")),
            "inputHref": href(input_path, self.out_dir) if input_path else None,
            "status": _text(row.get("status")) or "failed",
            "error": _text(row.get("error")) or _text(row.get("reason")),
            "width": _number(row.get("width")),
            "height": _number(row.get("height")),
            "run": _text(row.get("run")),
            "resumed": bool(row.get("resumed")),
            "prompts": prompts,
        }

    def _pictures(self, outputs: list[tuple[str, str]], input_path: str | None) -> dict:
        """Thumbnail and lightbox views for one prompt of one image."""
        by_kind: dict[str, str] = {}
        for kind, path in outputs:
            if Path(path).suffix.lower() in _IMAGE_SUFFIXES:
                by_kind.setdefault(kind, path)
        views = [
            {"kind": kind, "href": href(by_kind[kind], self.out_dir)}
            for kind in _VIEW_KINDS
            if kind in by_kind
        ]
        if input_path is not None:
            views.append({"kind": "input", "href": href(input_path, self.out_dir)})
        if "overlay" in by_kind:
            thumb = self._thumb(by_kind["overlay"])
        elif "mask" in by_kind and input_path is not None:
            thumb = self._thumb(input_path, by_kind["mask"])
        else:
            # Without an input a lone mask (or cutout) is still better than nothing.
            fallback = next((by_kind[k] for k in ("mask", "soft", "cutout") if k in by_kind), None)
            thumb = self._thumb(fallback) if fallback else None
        return {"thumb": thumb, "views": views}

    def link_thumbnails(self, items: list[dict], made: dict[str, bool]) -> None:
        """Replace each prompt's thumbnail destination by its link, or None where it could not
        be made (``made``: destination -> made)."""
        for item in items:
            for prompt in item["prompts"]:
                dest = prompt.pop("thumb")
                prompt["thumb"] = href(dest, self.out_dir) if dest and made.get(dest) else None


def _summary(out_dir: Path) -> dict | None:
    """The parts of ``clipseg-summary.json`` the header shows, or None if there is none."""
    try:
        data = json.loads((out_dir / SUMMARY_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict):
        return None
    counts = data.get("counts") if isinstance(data.get("counts"), dict) else {}
    return {
        "run": _text(data.get("run")),
        "command": _text(data.get("command")),
        "interrupted": bool(data.get("interrupted")),
        "seconds": _number(data.get("seconds")),
        "counts": {str(k): v for k, v in counts.items() if _number(v) is not None},
    }


def page_data(title: str, items: list[dict], entries: LogEntries, out_dir: Path) -> dict:
    """Everything the page's script reads: the items, the prompts in order of appearance, the
    last run's summary and what the log could not say."""
    prompts: list[str] = []
    for item in items:
        for prompt in item["prompts"]:
            if prompt["prompt"] not in prompts:
                prompts.append(prompt["prompt"])
    return {
        "title": title,
        "generated": time.strftime("%Y-%m-%d %H:%M:%S"),
        "prompts": prompts,
        "items": items,
        "summary": _summary(out_dir),
        "latestRun": entries.latest_run,
        "badLines": entries.bad_lines,
    }
