"""``clipseg models``: the known models and whether their weights are here."""

from __future__ import annotations

import sys

import typer

from clipseg_cli.specs import DEFAULT_MODEL, MODEL_SPECS

COLUMNS = ("name", "hub id", "cached", "original file", "description")


def _rows() -> list[tuple[str, ...]]:
    from clipseg_cli.errors import WeightsError
    from clipseg_cli.weights import bundled_model_dir, cached_hub_files

    rows = []
    for spec in MODEL_SPECS.values():
        default = " (default)" if spec.hub_id == DEFAULT_MODEL else ""
        if spec.hub_id is None:
            source = "(bundled with clipseg)"
            try:
                cached = "yes" if bundled_model_dir(spec.name) else "no"
            except WeightsError:
                cached = "missing from this install"
        else:
            source, cached = spec.hub_id, "yes" if cached_hub_files(spec.hub_id) else "no"
        original = spec.original_filename or "-"
        rows.append((spec.name, source, cached, original, spec.description + default))
    return rows


def models() -> None:
    """List the known CLIPSeg models and whether their weights are in the local cache.

    On a terminal a table; otherwise tab-separated lines for scripts, a header line first
    (name, hub id, cached, original file, description).
    """
    rows = _rows()
    if not sys.stdout.isatty():
        for row in (COLUMNS, *rows):
            typer.echo("\t".join(row))
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(title="CLIPSeg models")
    for column in COLUMNS:
        table.add_column(column, no_wrap=column != "description")
    for row in rows:
        table.add_row(*row)
    Console().print(table)
