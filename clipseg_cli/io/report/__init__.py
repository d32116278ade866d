"""A static HTML review page for a segment run: ``OUT/report.html``.

:func:`write_report` reads the JSON-lines log, makes small thumbnails under
``OUT/.clipseg/report/`` and writes one self-contained HTML file (inline CSS and JS, the data
embedded as JSON, no network) that opens straight from disk: a grid of cards with per-prompt
stats, filters by prompt and status, sorting by coverage or confidence, and a lightbox with the
full-size outputs. Every link in the page is relative to the report, so the output folder can be
moved or copied as a whole.

Which rows are shown
    The latest row per input key wins (reruns append rows). A ``skipped`` row means "unchanged
    since an earlier run", so it is replaced by that key's latest earlier ``ok``/``failed`` row
    (marked ``resumed``); only when the log has no such row is it shown as ``skipped``. Rows
    without a key (a missing input or an unreadable folder) are shown only from the latest run:
    they describe the command line, not a file, and an old typo should not haunt every report.

Thumbnails
    Per image and prompt, from the first that exists: the saved ``overlay`` (what the review is
    about); else the input image tinted with the ``mask`` in the overlay colours (so a run that
    saved only masks still shows the mask in context); else the mask, soft mask or cutout
    alone. They are JPEGs whose longest side is ``thumbnail_size``, named by a hash of their
    source and reused while newer than it, so rewriting a report is cheap. The lightbox shows the
    full-size original files (overlay, cutout, mask, soft, labels, input) and can switch between
    them.

Safety
    File names, prompts and errors are untrusted. They reach the page only as JSON inside a
    ``<script type="application/json">`` block with ``<``, ``>`` and ``&`` escaped, and the
    script builds the DOM with ``textContent``/``setAttribute``, never ``innerHTML``. A
    Content-Security-Policy with a per-report nonce blocks any other script and all network.

This module imports only the standard library and Pillow (never torch or numpy), and never
prints.
"""

from __future__ import annotations

import hashlib
import html
import json
import os
import re
import secrets
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO
from urllib.parse import quote

from PIL import Image, ImageOps

__all__ = ["REPORT_NAME", "THUMBNAIL_DIR", "load_entries", "write_report"]

#: File name of the page inside the output folder.
REPORT_NAME = "report.html"
#: Thumbnail folder relative to the output folder: hidden, so a later run never lists the
#: thumbnails as inputs, and next to the ledger in the tool's own state folder.
THUMBNAIL_DIR = Path(".clipseg") / "report"
# Mirrors clipseg_cli.config.SUMMARY_NAME (a test keeps them equal); importing config would
# pull in numpy through sources.
SUMMARY_NAME = "clipseg-summary.json"

# The colours of writers.write_overlay, so tinted thumbnails look like saved overlays.
_TINT = (255, 0, 80)
_OPACITY = 0.45
_JPEG_QUALITY = 82
_THUMB_NAME = re.compile(r"^[0-9a-f]{20}\.jpg$")
# Kinds shown as images in the lightbox, in order of preference for the default view.
_VIEW_KINDS = ("overlay", "cutout", "mask", "soft", "labels")
_IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".gif", ".bmp", ".avif"}


# ---------------------------------------------------------------------------------------------
# Reading the log
# ---------------------------------------------------------------------------------------------


@dataclass
class LogEntries:
    """The rows a report shows, in log order of their keys' first appearance."""

    rows: list[dict]
    #: Lines that were not JSON objects (a killed writer's half line, hand edits).
    bad_lines: int
    #: Run id of the last row in the log.
    latest_run: str | None


def _row_ident(row: dict) -> str:
    key = row.get("key")
    # Input-level failures have no key; the input spec identifies them instead.
    return f"key:{key}" if isinstance(key, str) else f"input:{row.get('input')}"


def load_entries(log_path: Path) -> LogEntries:
    """Read a segment log and resolve it to one row per input (see the module docstring).

    A resolved ``skipped`` row is a copy of the earlier row with ``resumed`` set to True and
    ``skipped_in`` set to the skipping run's id.

    Raises:
        FileNotFoundError: there is no log at ``log_path``.
    """
    latest: dict[str, dict] = {}
    processed: dict[str, dict] = {}  # latest ok/failed row per ident
    bad_lines = 0
    latest_run = None
    with Path(log_path).open(encoding="utf-8", errors="replace") as handle:
        for line in handle:
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except ValueError:
                bad_lines += 1
                continue
            if not isinstance(row, dict) or not isinstance(row.get("status"), str):
                bad_lines += 1
                continue
            ident = _row_ident(row)
            latest_run = row.get("run", latest_run)
            if row["status"] == "skipped":
                earlier = processed.get(ident)
                if earlier is not None:
                    row = {**earlier, "resumed": True, "skipped_in": row.get("run")}
            else:
                processed[ident] = row
            # Re-insert so dict order follows the latest appearance only for new keys.
            latest[ident] = row
    rows = [
        row
        for ident, row in latest.items()
        if ident.startswith("key:") or row.get("run") == latest_run
    ]
    return LogEntries(rows, bad_lines, latest_run)


def _parse_display_path(text: str) -> str:
    """Invert ``sources.display_path`` (``\\\\`` and ``\\xNN`` escapes) to an OS path string.

    Kept local (the same rules as ``sources.parse_display_path``) so this module needs no
    numpy; an unknown escape is kept literally rather than raising, as a report is best effort.
    """
    out: list[str] = []
    i = 0
    while i < len(text):
        ch = text[i]
        if ch == "\\" and text[i + 1 : i + 2] == "\\":
            out.append("\\")
            i += 2
        elif ch == "\\" and re.fullmatch(r"x[0-9a-f]{2}", text[i + 1 : i + 4]):
            out.append(chr(0xDC00 + int(text[i + 2 : i + 4], 16)))
            i += 4
        elif ch == "\\" and re.fullmatch(r"u[0-9a-f]{4}", text[i + 1 : i + 6]):
            out.append(chr(int(text[i + 2 : i + 6], 16)))
            i += 6
        else:
            out.append(ch)
            i += 1
    return "".join(out)


# ---------------------------------------------------------------------------------------------
# Locating files and making links
# ---------------------------------------------------------------------------------------------


def _inside(path: str, root: str) -> bool:
    return os.path.commonpath([root, path]) == root and path != root


def _locate_output(shown: str, out_dir: str) -> str | None:
    """The absolute path of an output the log names, or None when it is gone.

    The log holds paths as given relative to the run's working directory (or absolute). If the
    report is written from elsewhere, or the folder was moved, the same file is found by the
    longest tail of the path that exists under ``out_dir`` (outputs always lie inside it).
    """
    raw = _parse_display_path(shown)
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
    path = os.path.abspath(_parse_display_path(shown))  # noqa: PTH100
    return path if os.path.isfile(path) else None  # noqa: PTH113


def _href(target: str, out_dir: str) -> str:
    """A URL relative to the report for an absolute file path; raw bytes percent-encoded."""
    rel = os.path.relpath(target, out_dir)
    # fsencode gives back the original bytes of undecodable names; browsers request %XX bytes.
    return "/".join(quote(os.fsencode(part), safe="") for part in Path(rel).parts)


# ---------------------------------------------------------------------------------------------
# Thumbnails
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _ThumbJob:
    """One thumbnail to make: from ``source`` alone, or ``source`` tinted with ``mask``."""

    dest: str
    source: str
    mask: str | None = None


def _atomic_write(path: Path, write: Callable[[BinaryIO], None]) -> None:
    """Write through a hidden temp file and rename it over ``path``.

    The temp name follows writers.TEMP_NAME (``.{name}.tmp-{8 hex}``) so a later run's stale
    temp cleanup also removes what a killed report left behind.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{secrets.token_hex(4)}")
    try:
        with tmp.open("xb") as handle:
            write(handle)
        tmp.replace(path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


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


def _make_thumbnail(job: _ThumbJob, size: int) -> bool:
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
            tinted = Image.blend(image, Image.new("RGB", image.size, _TINT), _OPACITY)
            image = Image.composite(tinted, image, mask)
        _atomic_write(dest, lambda f: image.save(f, "JPEG", quality=_JPEG_QUALITY))
    except (OSError, ValueError, Image.DecompressionBombError):
        # A missing, unreadable or huge file only costs this card its picture.
        return False
    return True


def _thumb_name(*parts: str) -> str:
    digest = hashlib.sha1("\0".join(parts).encode("utf-8", "surrogateescape")).hexdigest()
    return digest[:20] + ".jpg"


# ---------------------------------------------------------------------------------------------
# Building the page data
# ---------------------------------------------------------------------------------------------


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value) if value == value and abs(value) != float("inf") else None


def _text(value: Any) -> str | None:
    return value if isinstance(value, str) else None


class _PageBuilder:
    """Turns resolved log rows into the page's JSON data, collecting thumbnail jobs."""

    def __init__(self, out_dir: str, thumbnail_size: int) -> None:
        self.out_dir = out_dir
        self.thumb_dir = os.path.join(out_dir, THUMBNAIL_DIR)  # noqa: PTH118
        self.size = thumbnail_size
        self.jobs: dict[str, _ThumbJob] = {}

    def _thumb(self, source: str, mask: str | None = None) -> str:
        # Relative names: a moved or copied folder keeps (and reuses) its thumbnails.
        parts = [os.path.relpath(p, self.out_dir) for p in (source, mask) if p is not None]
        name = _thumb_name(str(self.size), *parts)
        dest = os.path.join(self.thumb_dir, name)  # noqa: PTH118
        self.jobs[dest] = _ThumbJob(dest, source, mask)
        return dest

    def item(self, index: int, row: dict) -> dict:
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
                {"kind": kind, "href": _href(found, self.out_dir), "name": output["path"]}
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
            "inputHref": _href(input_path, self.out_dir) if input_path else None,
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
            {"kind": kind, "href": _href(by_kind[kind], self.out_dir)}
            for kind in _VIEW_KINDS
            if kind in by_kind
        ]
        if input_path is not None:
            views.append({"kind": "input", "href": _href(input_path, self.out_dir)})
        if "overlay" in by_kind:
            thumb = self._thumb(by_kind["overlay"])
        elif "mask" in by_kind and input_path is not None:
            thumb = self._thumb(input_path, by_kind["mask"])
        else:
            # Without an input a lone mask (or cutout) is still better than nothing.
            fallback = next((by_kind[k] for k in ("mask", "soft", "cutout") if k in by_kind), None)
            thumb = self._thumb(fallback) if fallback else None
        return {"thumb": thumb, "views": views}


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


def _script_json(data: Any) -> str:
    """JSON safe inside a ``<script>`` element.

    ``ensure_ascii`` turns every non-ASCII character (lone surrogates included) into a ``\\u``
    escape, and escaping ``<``, ``>`` and ``&`` means no ``</script>`` or ``<!--`` can appear;
    all three only ever occur inside JSON strings, where the escapes mean the same.
    """
    text = json.dumps(data, ensure_ascii=True, allow_nan=False, separators=(",", ":"))
    return text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


def _remove_stale_thumbnails(thumb_dir: Path, keep: Iterable[str]) -> None:
    keep = {Path(p).name for p in keep}
    try:
        entries = list(thumb_dir.iterdir())
    except OSError:
        return
    for entry in entries:
        # Only names we make: never delete anything a user put there.
        if _THUMB_NAME.match(entry.name) and entry.name not in keep:
            entry.unlink(missing_ok=True)


def write_report(
    out_dir: Path,
    log_path: Path,
    *,
    title: str = "clipseg review",
    thumbnail_size: int = 256,
) -> Path:
    """Write ``out_dir/report.html`` (and its thumbnails) from the segment log at ``log_path``.

    Relative ``out_dir``/``log_path`` and relative paths inside the log are taken relative to
    the current directory, as the CLI wrote them. Returns the report's path.

    Raises:
        FileNotFoundError: there is no log at ``log_path``.
        ValueError: ``thumbnail_size`` is not positive.
    """
    if thumbnail_size < 1:
        raise ValueError(f"thumbnail_size must be positive, got {thumbnail_size}")
    out_abs = os.path.abspath(out_dir)  # noqa: PTH100 - keep symlinked folders as named
    entries = load_entries(Path(log_path))
    builder = _PageBuilder(out_abs, thumbnail_size)
    # Name order is the page's default and keeps the file stable between reports.
    rows = sorted(entries.rows, key=lambda r: str(r.get("key") or r.get("input") or ""))
    items = [builder.item(i, row) for i, row in enumerate(rows)]

    jobs = list(builder.jobs.values())
    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        # Pillow releases the GIL while decoding and resizing, so threads scale.
        made = dict(
            zip(
                (j.dest for j in jobs),
                pool.map(lambda j: _make_thumbnail(j, thumbnail_size), jobs),
                strict=True,
            )
        )
    for item in items:
        for prompt in item["prompts"]:
            dest = prompt.pop("thumb")
            prompt["thumb"] = _href(dest, out_abs) if dest and made.get(dest) else None
    thumb_dir = Path(out_abs) / THUMBNAIL_DIR
    _remove_stale_thumbnails(thumb_dir, [dest for dest, ok in made.items() if ok])

    prompts: list[str] = []
    for item in items:
        for prompt in item["prompts"]:
            if prompt["prompt"] not in prompts:
                prompts.append(prompt["prompt"])
    data = {
        "title": title,
        "generated": time.strftime("%Y-%m-%d %H:%M:%S"),
        "prompts": prompts,
        "items": items,
        "summary": _summary(Path(out_abs)),
        "latestRun": entries.latest_run,
        "badLines": entries.bad_lines,
    }
    page = _render(title, data)
    report = Path(out_abs) / REPORT_NAME
    _atomic_write(report, lambda f: f.write(page.encode("utf-8")))
    return report


# ---------------------------------------------------------------------------------------------
# The page
# ---------------------------------------------------------------------------------------------


def _render(title: str, data: dict) -> str:
    nonce = secrets.token_urlsafe(16)
    # backslashreplace: a title with lone surrogates must not make the page unwritable.
    safe_title = html.escape(title.encode("utf-8", "backslashreplace").decode("utf-8"))
    csp = (
        "default-src 'none'; img-src 'self' file: data:; "
        f"style-src 'nonce-{nonce}'; script-src 'nonce-{nonce}'; "
        "base-uri 'none'; form-action 'none'"
    )
    return (
        _TEMPLATE.replace("@CSP@", csp)
        .replace("@NONCE@", nonce)
        .replace("@TITLE@", safe_title)
        .replace("@CSS@", _CSS)
        .replace("@JS@", _JS)
        .replace("@DATA@", _script_json(data))
    )


_TEMPLATE = """<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<meta http-equiv="Content-Security-Policy" content="@CSP@">
<meta name="referrer" content="no-referrer">
<title>@TITLE@</title>
<style nonce="@NONCE@">@CSS@</style>
</head>
<body>
<header class="top">
  <h1 id="title">@TITLE@</h1>
  <p id="summary" class="summary" aria-live="polite"></p>
  <p id="last-run" class="summary"></p>
  <form id="controls" class="controls" role="search">
    <label>Prompt <select id="f-prompt"><option value="">all prompts</option></select></label>
    <label>Status <select id="f-status">
      <option value="all">all</option><option value="ok">ok</option>
      <option value="failed">failed</option><option value="empty">empty</option>
      <option value="skipped">skipped</option></select></label>
    <label>Sort <select id="f-sort">
      <option value="name">name</option>
      <option value="coverage-desc">coverage, high first</option>
      <option value="coverage-asc">coverage, low first</option>
      <option value="max-desc">confidence, high first</option>
      <option value="max-asc">confidence, low first</option></select></label>
    <label>Find <input id="f-q" type="search" placeholder="file name (press /)"
      autocomplete="off"></label>
    <span id="count" class="count" role="status"></span>
  </form>
</header>
<main>
  <p id="empty-note" class="note" hidden>No images match.</p>
  <ul id="grid" class="grid" aria-label="Results"></ul>
  <p class="more-wrap"><button id="more" type="button" hidden>Show more</button></p>
</main>
<dialog id="lightbox" aria-labelledby="lb-title">
  <div class="lb-head">
    <h2 id="lb-title"></h2>
    <span class="lb-nav">
      <button id="lb-prev" type="button" aria-label="Previous image">&larr;</button>
      <button id="lb-next" type="button" aria-label="Next image">&rarr;</button>
      <button id="lb-close" type="button" aria-label="Close">&times;</button>
    </span>
  </div>
  <div id="lb-views" class="lb-views" role="group" aria-label="View"></div>
  <figure class="lb-figure"><img id="lb-img" alt=""><figcaption id="lb-note"></figcaption>
  </figure>
  <div id="lb-body"></div>
</dialog>
<noscript><p class="note">This report needs JavaScript to show its results.</p></noscript>
<script id="report-data" type="application/json">@DATA@</script>
<script nonce="@NONCE@">@JS@</script>
</body>
</html>
"""

_CSS = """
:root { color-scheme: light dark; --bg: #f6f7f9; --card: #fff; --fg: #1d232b; --muted: #5d6875;
  --line: #d9dee4; --ok: #1f7a3a; --bad: #b3261e; --warn: #8a5a00; --accent: #ff0050; }
@media (prefers-color-scheme: dark) { :root { --bg: #15181c; --card: #1f242a; --fg: #e6e9ed;
  --muted: #9aa5b1; --line: #333a42; --ok: #5cc27a; --bad: #ff8a80; --warn: #e0b34f; } }
* { box-sizing: border-box; }
body { margin: 0; font: 14px/1.4 system-ui, sans-serif; background: var(--bg); color: var(--fg); }
.top { position: sticky; top: 0; z-index: 2; background: var(--bg); padding: 12px 20px 8px;
  border-bottom: 1px solid var(--line); }
h1 { font-size: 20px; margin: 0 0 4px; }
.summary { margin: 2px 0; color: var(--muted); }
.controls { display: flex; flex-wrap: wrap; gap: 8px 16px; align-items: center; margin-top: 8px; }
.controls select, .controls input { font: inherit; padding: 3px 6px; margin-left: 4px; }
.count { color: var(--muted); margin-left: auto; }
main { padding: 16px 20px 40px; }
.grid { list-style: none; margin: 0; padding: 0; display: grid; gap: 14px;
  grid-template-columns: repeat(auto-fill, minmax(240px, 1fr)); }
.card { background: var(--card); border: 1px solid var(--line); border-radius: 8px;
  overflow: hidden; display: flex; flex-direction: column; }
.card[data-status="failed"] { border-color: var(--bad); }
.thumb { display: block; width: 100%; aspect-ratio: 4 / 3; padding: 0; border: 0;
  background: repeating-conic-gradient(#8882 0 25%, #0000 0 50%) 0 0 / 16px 16px;
  cursor: zoom-in; }
.thumb img { width: 100%; height: 100%; object-fit: contain; display: block; }
.thumb:focus-visible, button:focus-visible, select:focus-visible, input:focus-visible,
a:focus-visible { outline: 3px solid var(--accent); outline-offset: 2px; }
.placeholder { display: flex; align-items: center; justify-content: center; height: 100%;
  color: var(--muted); font-size: 13px; padding: 8px; text-align: center; }
.meta { padding: 8px 10px 10px; }
.key { font-weight: 600; word-break: break-all; margin: 0 0 6px; }
.badges { display: flex; gap: 6px; flex-wrap: wrap; margin-bottom: 6px; }
.badge { font-size: 11px; padding: 1px 7px; border-radius: 10px; border: 1px solid; }
.badge.ok { color: var(--ok); } .badge.failed, .badge.skipped { color: var(--bad); }
.badge.empty { color: var(--warn); } .badge.resumed { color: var(--muted); }
.error { color: var(--bad); word-break: break-word; margin: 4px 0 0; white-space: pre-wrap; }
table.stats { width: 100%; border-collapse: collapse; font-size: 12px; table-layout: fixed;
  font-variant-numeric: tabular-nums; }
.stats th, .stats td { text-align: left; padding: 2px 4px; border-top: 1px solid var(--line);
  overflow-wrap: anywhere; vertical-align: top; }
.stats .c-num { width: 4.8em; } .stats .c-flag { width: 4.4em; }
.stats td.num { white-space: nowrap; }
.stats td.num, .stats thead th.c-num { text-align: right; }
.stats .badge { padding: 0 5px; white-space: nowrap; font-size: 10px; }
.stats tr.active { background: #ff005014; font-weight: 600; }
.note { color: var(--muted); }
.more-wrap { text-align: center; }
dialog { width: min(1100px, 96vw); max-height: 94vh; border: 1px solid var(--line);
  border-radius: 10px; background: var(--card); color: var(--fg); padding: 14px 18px; }
dialog::backdrop { background: #000b; }
.lb-head { display: flex; gap: 12px; align-items: start; justify-content: space-between; }
.lb-head h2 { font-size: 16px; margin: 0; word-break: break-all; }
.lb-nav button, .lb-views button { font: inherit; padding: 3px 10px; }
.lb-views { display: flex; gap: 6px; flex-wrap: wrap; margin: 8px 0; }
.lb-views button[aria-pressed="true"] { font-weight: 700; border-color: var(--accent); }
.lb-figure { margin: 0; text-align: center; }
.lb-figure img { width: 100%; height: 62vh; object-fit: contain;
  background: repeating-conic-gradient(#8882 0 25%, #0000 0 50%) 0 0 / 16px 16px; }
.lb-figure figcaption { color: var(--muted); }
#lb-body a { margin-right: 10px; }
"""

_JS = r"""
(() => {
  "use strict";
  const DATA = JSON.parse(document.getElementById("report-data").textContent);
  const EAGER = 48;   // first cards load at once; the rest lazily, for big collections
  const PAGE = 600;   // cards per "Show more" step, to keep huge reports responsive
  const $ = (id) => document.getElementById(id);
  const state = { prompt: "", status: "all", sort: "name", q: "" };
  let limit = PAGE;
  let shown = [];
  let current = -1;
  let view = 0;

  // Every piece of data goes through textContent / setAttribute: never innerHTML.
  function el(tag, attrs, ...children) {
    const node = document.createElement(tag);
    for (const [name, value] of Object.entries(attrs || {})) {
      if (value !== null && value !== undefined && value !== false) {
        node.setAttribute(name, value === true ? "" : String(value));
      }
    }
    for (const child of children) {
      if (child === null || child === undefined) continue;
      node.append(child instanceof Node ? child : document.createTextNode(String(child)));
    }
    return node;
  }
  const pct = (v) => (v === null ? "–" : (100 * v).toFixed(v > 0 && v < 0.001 ? 3 : 1) + "%");
  const num = (v) => (v === null ? "–" : v.toFixed(3));
  const collator = new Intl.Collator(undefined, { numeric: true, sensitivity: "base" });

  function activeStats(item) {
    if (!item.prompts.length) return null;
    if (state.prompt) return item.prompts.find((p) => p.prompt === state.prompt) || null;
    return item.prompts[0];
  }
  // With all prompts, an image counts as its best prompt (the one most worth a look).
  function metric(item, field) {
    if (state.prompt) {
      const p = activeStats(item);
      return p ? p[field] : null;
    }
    const values = item.prompts.map((p) => p[field]).filter((v) => v !== null);
    return values.length ? Math.max(...values) : null;
  }
  function isEmpty(item) {
    if (item.status !== "ok") return false;
    if (state.prompt) { const p = activeStats(item); return !!(p && p.empty); }
    return item.prompts.some((p) => p.empty);
  }
  function matches(item) {
    // Failed rows have no stats; they failed for every prompt, so every prompt shows them.
    if (state.prompt && item.prompts.length && !activeStats(item)) return false;
    if (state.status === "empty" && !isEmpty(item)) return false;
    if (["ok", "failed", "skipped"].includes(state.status) && item.status !== state.status) {
      return false;
    }
    if (state.q && !item.key.toLowerCase().includes(state.q.toLowerCase())) return false;
    return true;
  }
  function compare(a, b) {
    const [field, dir] = state.sort.split("-");
    if (field === "coverage" || field === "max") {
      const va = metric(a, field), vb = metric(b, field);
      // Images without numbers (failures) go last whichever the direction.
      if (va === null || vb === null) {
        if (va !== vb) return va === null ? 1 : -1;
      } else if (va !== vb) {
        return dir === "asc" ? va - vb : vb - va;
      }
    }
    return collator.compare(a.key, b.key) || a.id - b.id;
  }

  // -- URL state: #prompt=..&status=..&sort=..&q=.. so views can be bookmarked and scripted ----
  function readHash() {
    const raw = location.hash.length > 1 ? location.hash.slice(1) : location.search.slice(1);
    const params = new URLSearchParams(raw);
    const prompt = params.get("prompt") || "";
    state.prompt = DATA.prompts.includes(prompt) ? prompt : "";
    const status = params.get("status") || "all";
    state.status = ["all", "ok", "failed", "empty", "skipped"].includes(status) ? status : "all";
    const sort = params.get("sort") || "name";
    state.sort = ["name", "coverage-asc", "coverage-desc", "max-asc", "max-desc"]
      .includes(sort) ? sort : "name";
    state.q = params.get("q") || "";
    $("f-prompt").value = state.prompt;
    $("f-status").value = state.status;
    $("f-sort").value = state.sort;
    $("f-q").value = state.q;
  }
  function writeHash() {
    const params = new URLSearchParams();
    if (state.prompt) params.set("prompt", state.prompt);
    if (state.status !== "all") params.set("status", state.status);
    if (state.sort !== "name") params.set("sort", state.sort);
    if (state.q) params.set("q", state.q);
    const hash = params.toString();
    if (hash !== location.hash.slice(1)) {
      // replace: filtering should not fill the back button's history.
      location.replace("#" + hash);
    }
  }

  // -- cards -----------------------------------------------------------------------------------
  function image(src, alt, eager, holder) {
    const img = el("img", { alt, decoding: "async", loading: eager ? "eager" : "lazy" });
    // State in the DOM: readable by tests and by anyone debugging a broken report.
    img.addEventListener("load", () => {
      img.dataset.loaded = "true";
      holder.dataset.loaded = "true";
    });
    img.addEventListener("error", () => {
      img.dataset.broken = "true";
      holder.dataset.broken = "true";
      img.replaceWith(el("span", { class: "placeholder" }, "image missing"));
    });
    img.src = src;
    return img;
  }
  function statsTable(item, active) {
    const body = item.prompts.map((p) =>
      el("tr", { class: p === active ? "active" : null },
        el("th", { scope: "row" }, p.prompt),
        el("td", { class: "num", title: "coverage" }, pct(p.coverage)),
        el("td", { class: "num", title: "max probability" }, num(p.max)),
        el("td", null, p.empty ? el("span", { class: "badge empty" }, "empty") : "")));
    return el("table", { class: "stats" },
      el("thead", null, el("tr", null, el("th", null, "prompt"),
        el("th", { class: "c-num", title: "share of pixels above the threshold" }, "cover"),
        el("th", { class: "c-num", title: "highest probability" }, "max"),
        el("th", { class: "c-flag" }, ""))),
      el("tbody", null, ...body));
  }
  function badges(item) {
    return el("div", { class: "badges" },
      el("span", { class: "badge " + item.status }, item.status),
      isEmpty(item) ? el("span", { class: "badge empty" }, "empty") : null,
      item.resumed ? el("span", { class: "badge resumed", title: "unchanged since run " +
        (item.run || "?") }, "from earlier run") : null);
  }
  function card(item, position) {
    const active = activeStats(item);
    const li = el("li", {
      class: "card", "data-id": item.id, "data-key": item.key, "data-status": item.status,
      "data-empty": isEmpty(item) ? "true" : "false",
      "data-prompt": active ? active.prompt : null,
      "data-coverage": active && active.coverage !== null ? active.coverage : null,
      "data-max": active && active.max !== null ? active.max : null,
    });
    const button = el("button", { type: "button", class: "thumb",
      "aria-label": "Open " + item.key });
    if (active && active.thumb) {
      li.dataset.thumb = "true";
      button.append(image(active.thumb, item.key, position < EAGER, li));
    } else {
      button.append(el("span", { class: "placeholder" },
        item.status === "ok" ? "no preview" : item.status));
    }
    button.addEventListener("click", () => openBox(position));
    li.append(button, el("div", { class: "meta" },
      el("p", { class: "key", title: item.input || item.key }, item.key),
      badges(item),
      item.prompts.length ? statsTable(item, active) : null,
      item.error ? el("p", { class: "error" }, item.error) : null));
    return li;
  }

  function render() {
    shown = DATA.items.filter(matches).sort(compare);
    const grid = $("grid");
    const cards = shown.slice(0, limit).map(card);
    grid.replaceChildren(...cards);
    $("more").hidden = shown.length <= limit;
    $("empty-note").hidden = shown.length > 0;
    $("count").textContent = shown.length + " of " + DATA.items.length + " shown";
    grid.dataset.visible = String(cards.length);
    document.body.dataset.ready = "true";
  }
  function update() { limit = PAGE; writeHash(); render(); }

  // -- lightbox --------------------------------------------------------------------------------
  function openBox(position) {
    current = position;
    view = 0;
    fillBox();
    const box = $("lightbox");
    if (!box.open) box.showModal();
  }
  function fillBox() {
    const item = shown[current];
    const active = activeStats(item);
    const views = active ? active.views : (item.inputHref ? [{ kind: "input",
      href: item.inputHref }] : []);
    $("lb-title").textContent = item.key + "  (" + (current + 1) + " / " + shown.length + ")";
    const buttons = views.map((v, i) => {
      const b = el("button", { type: "button", "aria-pressed": i === view ? "true" : "false" },
        v.kind);
      b.addEventListener("click", () => { view = i; fillBox(); });
      return b;
    });
    $("lb-views").replaceChildren(...buttons);
    const img = $("lb-img");
    $("lb-note").textContent = "";
    if (views.length) {
      img.hidden = false;
      img.alt = item.key + " " + views[view].kind;
      img.onerror = () => { img.hidden = true;
        $("lb-note").textContent = "This file cannot be shown (moved, or a format the " +
          "browser does not display)."; };
      img.src = views[view].href;
    } else {
      img.hidden = true;
      img.removeAttribute("src");
      $("lb-note").textContent = "No image for this result.";
    }
    const links = (active ? active.links : []).map((l) =>
      el("a", { href: l.href, target: "_blank", rel: "noopener" }, l.kind));
    if (item.inputHref) {
      links.push(el("a", { href: item.inputHref, target: "_blank", rel: "noopener" }, "input"));
    }
    // replaceChildren would print a null as "null": drop the parts this item lacks.
    const parts = [
      badges(item),
      item.width ? el("p", null, item.width + " × " + item.height + " px" +
        (item.run ? " · run " + item.run : "")) : null,
      item.prompts.length ? statsTable(item, active) : null,
      item.error ? el("p", { class: "error" }, item.error) : null,
      links.length ? el("p", null, "Open: ", ...links) : null,
    ];
    $("lb-body").replaceChildren(...parts.filter((part) => part !== null));
  }
  function step(delta) {
    if (!shown.length) return;
    current = (current + delta + shown.length) % shown.length;
    view = 0;
    fillBox();
  }

  // -- wiring ----------------------------------------------------------------------------------
  function init() {
    document.title = DATA.title;
    for (const prompt of DATA.prompts) $("f-prompt").append(el("option", { value: prompt },
      prompt));
    const count = (pred) => DATA.items.filter(pred).length;
    const parts = [DATA.items.length + " images",
      count((i) => i.status === "ok") + " ok",
      count((i) => i.status === "failed") + " failed",
      count((i) => i.status === "ok" && i.prompts.some((p) => p.empty)) + " with an empty prompt",
      DATA.prompts.length + " prompts"];
    const resumed = count((i) => i.resumed);
    if (resumed) parts.push(resumed + " unchanged from earlier runs");
    if (count((i) => i.status === "skipped")) parts.push(count((i) => i.status === "skipped") +
      " skipped without an earlier result");
    if (DATA.badLines) parts.push(DATA.badLines + " unreadable log lines ignored");
    $("summary").textContent = parts.join(" · ") + " — generated " + DATA.generated;
    const s = DATA.summary;
    if (s) {
      const c = Object.entries(s.counts).map(([k, v]) => v + " " + k.replaceAll("_", " "));
      $("last-run").textContent = "Last run " + (s.run || "?") + ": " + c.join(", ") +
        (s.seconds !== null ? " in " + s.seconds.toFixed(1) + " s" : "") +
        (s.interrupted ? " (interrupted)" : "");
    }
    $("controls").addEventListener("submit", (e) => e.preventDefault());
    $("f-prompt").addEventListener("change", (e) => { state.prompt = e.target.value; update(); });
    $("f-status").addEventListener("change", (e) => { state.status = e.target.value; update(); });
    $("f-sort").addEventListener("change", (e) => { state.sort = e.target.value; update(); });
    $("f-q").addEventListener("input", (e) => { state.q = e.target.value; update(); });
    $("more").addEventListener("click", () => { limit += PAGE; render(); });
    window.addEventListener("hashchange", () => { readHash(); render(); });
    $("lb-prev").addEventListener("click", () => step(-1));
    $("lb-next").addEventListener("click", () => step(1));
    $("lb-close").addEventListener("click", () => $("lightbox").close());
    $("lightbox").addEventListener("close", () => {
      // Back to the card that opened it, so keyboard users keep their place.
      const button = document.querySelectorAll("#grid .thumb")[current];
      if (button) button.focus();
    });
    $("lightbox").addEventListener("click", (e) => {
      if (e.target === $("lightbox")) $("lightbox").close();  // click on the backdrop
    });
    document.addEventListener("keydown", (e) => {
      if ($("lightbox").open) {
        if (e.key === "ArrowLeft") { step(-1); e.preventDefault(); }
        if (e.key === "ArrowRight") { step(1); e.preventDefault(); }
      } else if (e.key === "/" && document.activeElement !== $("f-q")) {
        $("f-q").focus();
        e.preventDefault();
      }
    });
    readHash();
    render();
    // #open=<key> opens that image's lightbox: a shareable link to one result.
    const hash = location.hash.length > 1 ? location.hash.slice(1) : location.search.slice(1);
    const open = new URLSearchParams(hash).get("open");
    const position = open === null ? -1 : shown.findIndex((item) => item.key === open);
    if (position >= 0) openBox(position);
  }
  init();
})();
"""
