"""A static HTML review page for a segment run: ``OUT/report.html``.

:func:`write_report` reads the JSON-lines log, makes small thumbnails under
``OUT/.clipseg/report/`` and writes one self-contained HTML file (inline CSS and JS, the data
embedded as JSON, no network) that opens straight from disk: a grid of cards with per-prompt
stats, filters by prompt and status, sorting by coverage or confidence, and a lightbox with the
full-size outputs. Every link in the page is relative to the report, so the output folder can be
moved or copied as a whole.

Modules
    :mod:`.entries` (which log rows are shown, and why), :mod:`.data` (the page data: items,
    links, the choice of pictures), :mod:`.thumbnails` (making and reusing them) and
    :mod:`.page` (:func:`write_report`, and the HTML around the data: ``page.html``,
    ``report.css`` and ``report.js``, package files).

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

This package imports only the standard library, Pillow and the standard-library modules of
:mod:`clipseg_cli.io` (never torch, numpy or cv2), and never prints.
"""

from __future__ import annotations

from clipseg_cli.io.naming import REPORT_NAME, THUMBNAIL_DIR
from clipseg_cli.io.report.entries import LogEntries, load_entries
from clipseg_cli.io.report.page import write_report

__all__ = ["REPORT_NAME", "THUMBNAIL_DIR", "LogEntries", "load_entries", "write_report"]
