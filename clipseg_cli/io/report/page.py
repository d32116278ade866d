"""Writing the review page: :func:`write_report` and the HTML around the page data.

The markup, style and script are the package files ``page.html``, ``report.css`` and
``report.js``, read with :mod:`importlib.resources`. In ``page.html`` these placeholders are
replaced, in this order: ``@CSP@`` (the Content-Security-Policy), ``@NONCE@`` (the per-page
nonce of the style and script elements), ``@TITLE@`` (the HTML-escaped title), ``@CSS@``,
``@JS@`` and ``@DATA@`` (the page data as script-safe JSON). This module owns that rendering
and the safety rules of the package docstring; it never decides what the data says
(:mod:`.data`) and never prints.
"""

from __future__ import annotations

import functools
import html
import json
import os
import secrets
from importlib import resources
from pathlib import Path
from typing import Any

from clipseg_cli.io.files import write_bytes_atomic
from clipseg_cli.io.naming import REPORT_NAME, THUMBNAIL_DIR
from clipseg_cli.io.report.data import PageBuilder, page_data
from clipseg_cli.io.report.entries import load_entries
from clipseg_cli.io.report.thumbnails import make_thumbnails, remove_stale_thumbnails


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
    builder = PageBuilder(out_abs, thumbnail_size)
    # Name order is the page's default and keeps the file stable between reports.
    rows = sorted(entries.rows, key=lambda r: str(r.get("key") or r.get("input") or ""))
    items = [builder.item(i, row) for i, row in enumerate(rows)]
    made = make_thumbnails(list(builder.jobs.values()), thumbnail_size)
    builder.link_thumbnails(items, made)
    remove_stale_thumbnails(
        Path(out_abs) / THUMBNAIL_DIR, [dest for dest, ok in made.items() if ok]
    )
    page = render(title, page_data(title, items, entries, Path(out_abs)))
    report = Path(out_abs) / REPORT_NAME
    write_bytes_atomic(report, page.encode("utf-8"))
    return report


@functools.cache
def _asset(name: str) -> str:
    """The text of one of the page's package files."""
    return resources.files(__package__).joinpath(name).read_text(encoding="utf-8")


def _script_json(data: Any) -> str:
    """JSON safe inside a ``<script>`` element.

    ``ensure_ascii`` turns every non-ASCII character (lone surrogates included) into a ``\\u``
    escape, and escaping ``<``, ``>`` and ``&`` means no ``</script>`` or ``<!--`` can appear;
    all three only ever occur inside JSON strings, where the escapes mean the same.
    """
    text = json.dumps(data, ensure_ascii=True, allow_nan=False, separators=(",", ":"))
    return text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


def render(title: str, data: dict) -> str:
    """The whole page: ``page.html`` with its placeholders filled and a fresh nonce."""
    nonce = secrets.token_urlsafe(16)
    # backslashreplace: a title with lone surrogates must not make the page unwritable.
    safe_title = html.escape(title.encode("utf-8", "backslashreplace").decode("utf-8"))
    csp = (
        "default-src 'none'; img-src 'self' file: data:; "
        f"style-src 'nonce-{nonce}'; script-src 'nonce-{nonce}'; "
        "base-uri 'none'; form-action 'none'"
    )
    return (
        _asset("page.html")
        .replace("@CSP@", csp)
        .replace("@NONCE@", nonce)
        .replace("@TITLE@", safe_title)
        .replace("@CSS@", _asset("report.css"))
        .replace("@JS@", _asset("report.js"))
        .replace("@DATA@", _script_json(data))
    )
